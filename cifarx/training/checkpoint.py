"""Checkpoints: atomic save; load with weights_only=True; everything needed to rebuild the model is inside."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifarx.errors import CifarxError
from cifarx.io import atomic_torch_save, check_zip_checksums, folder_locked
from cifarx.models.registry import create_model

FORMAT = "cifarx-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, *, model_name: str, model_kwargs: dict, class_names: list[str],
                    state_dict: dict, config: dict, metrics: dict, train_state: dict | None = None,
                    export_metadata: dict | None = None, val_digest: str | None = None) -> None:
    """Write a checkpoint atomically. `state_dict` holds the weights to use for inference (EMA if any).

    `val_digest`: what identifies the validation images the run held out (`cifarx.data.split.images_digest`).

    `export_metadata`: extra ONNX metadata of the model (e.g. a transfer backbone's name and weights source).
    """
    model = {"name": model_name, "kwargs": model_kwargs, "num_classes": len(class_names)}
    if export_metadata:
        model["export_metadata"] = export_metadata
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "class_names": list(class_names),
        "state_dict": state_dict,
        "config": config,
        "metrics": metrics,
        "train_state": train_state,
        "val_digest": val_digest,
    }
    atomic_torch_save(payload, path)


def resolve_checkpoint(path: str | Path, name: str = "best.pt") -> Path:
    """A run folder means its `name` checkpoint (falling back to last.pt); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / name, path / "last.pt"):
            if candidate.is_file():
                return candidate
        if folder_locked(path):
            raise CifarxError(f"{path} is a run in progress that has not written a checkpoint yet (its first one comes "
                              "at the end of epoch 1, or on Ctrl-C); try again then")
        raise CifarxError(f"no checkpoint ({name} or last.pt) in run folder {path}")
    if not path.is_file():
        raise CifarxError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely: weights_only=True refuses pickles that would run code."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CifarxError(f"{path} is not a readable cifarx checkpoint (not a torch.save archive)")
    try:
        check_zip_checksums(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CifarxError(f"refusing to load {path}: it holds Python objects beyond plain tensors and "
                          "containers, which could run code (loaded with weights_only=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CifarxError(f"{path} is not a readable cifarx checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CifarxError(f"{path} is not a cifarx checkpoint")
    if payload.get("version", 0) > VERSION:
        raise CifarxError(f"{path} was written by a newer cifarx (checkpoint version {payload['version']})")
    _check_structure(payload, path)
    return payload


def _check_structure(payload: dict, path: Path) -> None:
    """The fields every later step reads, with their types: a crafted file stops here, not in a traceback."""
    model, names = payload.get("model"), payload.get("class_names")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("kwargs"), dict)
            and isinstance(model.get("num_classes"), int)):
        raise CifarxError(f"{path} has no valid model entry (name, kwargs, num_classes): not a cifarx checkpoint")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CifarxError(f"{path} has no list of class names")
    if len(names) != model["num_classes"]:
        raise CifarxError(f"{path} lists {len(names)} class names but its model has {model['num_classes']} outputs")
    for key in ("state_dict", "config"):
        if not isinstance(payload.get(key), dict):
            raise CifarxError(f"{path} has no {key} dict")
    train_state = payload.get("train_state")
    if train_state is not None and not (isinstance(train_state, dict)
                                        and all(isinstance(train_state.get(k), dict) for k in ("model", "optimizer", "run"))):
        raise CifarxError(f"{path} holds an incomplete training state (model, optimizer and run are needed)")


def load_weights(model: nn.Module, state_dict: dict, path: str | Path, model_name: str) -> None:
    """`model.load_state_dict`, with weights of another shape or name reported as one line naming the file."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # torch lists every key on many lines: the first says what kind of mismatch
        first = str(error).strip().splitlines()[0]
        raise CifarxError(f"the weights in {path} do not fit model {model_name!r} ({first})") from None


# Builder arguments that change what the same weights compute without changing their shapes (a timm backbone's
# padding and BatchNorm epsilon, the input normalisation): a run started from a checkpoint must share them.
FUNCTION_KWARGS = ("timm_kwargs", "mean", "std")


def load_initial_weights(model: nn.Module, path: str | Path, model_name: str, model_kwargs: dict,
                         class_names: list[str]) -> None:
    """Start a new run from a trained checkpoint's inference weights (timm's --initial-checkpoint): the same network
    for the same classes, or one line saying why not. Optimiser, schedule and epochs are the new run's own."""
    path = resolve_checkpoint(path)
    payload = read_checkpoint(path)
    saved = payload["model"]
    if saved["name"] != model_name:
        raise CifarxError(f"--init-from {path} holds a {saved['name']} model; this run trains {model_name}")
    differ = [key for key in FUNCTION_KWARGS if saved["kwargs"].get(key) != model_kwargs.get(key)]
    if differ:
        key = differ[0]
        raise CifarxError(f"--init-from {path} was built with {key} {saved['kwargs'].get(key)}, this run with "
                          f"{model_kwargs.get(key)}: build it the same way (e.g. the same --weights)")
    if payload["class_names"] != list(class_names):
        raise CifarxError(f"--init-from {path} was trained on the classes {', '.join(payload['class_names'])}; "
                          f"this run's data has {', '.join(class_names)}")
    load_weights(model, payload["state_dict"], path, model_name)


def build_model(payload: dict[str, Any], path: str | Path = "the checkpoint") -> nn.Module:
    """Rebuild the model of a checkpoint dict with its inference weights, in eval mode."""
    spec = payload["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    load_weights(model, payload["state_dict"], path, spec["name"])
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder."""
    path = resolve_checkpoint(path)
    payload = read_checkpoint(path)
    return build_model(payload, path), payload
