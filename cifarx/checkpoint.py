"""Checkpoints: atomic save; load with weights_only=True; everything needed to rebuild the model is inside."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifarx.errors import CifarxError
from cifarx.io import atomic_torch_save
from cifarx.registry import create_model

FORMAT = "cifarx-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, *, model_name: str, model_kwargs: dict, class_names: list[str],
                    state_dict: dict, config: dict, metrics: dict, train_state: dict | None = None,
                    export_metadata: dict | None = None) -> None:
    """Write a checkpoint atomically. `state_dict` holds the weights to use for inference (EMA if any).

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
    }
    atomic_torch_save(payload, path)


def resolve_checkpoint(path: str | Path, name: str = "best.pt") -> Path:
    """A run folder means its `name` checkpoint (falling back to last.pt); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / name, path / "last.pt"):
            if candidate.is_file():
                return candidate
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
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # torch.load skips the CRCs: a flipped bit in the weights would load silently
        if damaged is not None:
            raise CifarxError(f"{path} is damaged (checksum mismatch in {damaged.split('/')[-1]})")
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
    return payload


def build_model(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model of a checkpoint dict with its inference weights, in eval mode."""
    spec = payload["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder."""
    payload = read_checkpoint(resolve_checkpoint(path))
    return build_model(payload), payload


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
