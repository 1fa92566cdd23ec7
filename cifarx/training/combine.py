"""`cifarx combine`: trained runs made into one `ensemble` checkpoint answering with their members' mean logits, so
`cifarx export` ships them as one file.

Why: networks trained apart make different mistakes (the two shipped transfer models, 93.6% and 93.7%,
disagree on 6% of the validation images and reach 94.6% together). `--preset fast-ensemble` trains its members in
one run, which needs one recipe; members with their own recipes (Lite0 and Lite2, each at its own image size and
schedule) are trained apart and combined here. The result is an ordinary checkpoint in a run folder with a
summary.json: export (with its parity check), eval, predict and the model card treat it like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cifarx.data import datasets as datamod
from cifarx.training.checkpoint import load_weights, read_checkpoint, resolve_checkpoint, save_checkpoint
from cifarx.data.split import ValidationSplit
from cifarx.errors import CifarxError
from cifarx.io import atomic_write_json, file_sha256
from cifarx.models.registry import create_model
from cifarx.training.runfolder import check_new_run_folder, portable_run_path, run_record, train_command
from cifarx.training.loop import evaluate

MEMBER_FIGURES = ("train_seconds", "epochs_run", "train_images", "best_val_accuracy", "machine", "training_precision")


def _check_members(checkpoints: list[Path], payloads: list[dict]) -> None:
    """Same classes and the same validation images, else the ensemble's validation figure would be meaningless."""
    first, reference = checkpoints[0], payloads[0]
    reference_split = ValidationSplit.of_checkpoint(reference)
    for path, payload in zip(checkpoints[1:], payloads[1:]):
        if payload["class_names"] != reference["class_names"]:
            raise CifarxError(f"{path} was trained on the classes {', '.join(payload['class_names'])}; {first} on "
                              f"{', '.join(reference['class_names'])}")
        split = ValidationSplit.of_checkpoint(payload)
        digests = {split.digest, reference_split.digest} - {None}
        if split != reference_split or len(digests) > 1:
            raise CifarxError(f"{path} held out val_size {split.size} with seed {split.seed}, {first} "
                              f"val_size {reference_split.size} with seed {reference_split.seed}: a member would be "
                              "validated on images another one trained on")


def _member_record(checkpoint: Path, payload: dict) -> dict:
    run = checkpoint.parent
    record = run_record(run) if (run / "summary.json").is_file() or (run / "last.pt").is_file() else {}
    tta = next((k for k in record if k.startswith("best_val_accuracy_tta")), None)
    return {"run": portable_run_path(run), "model": payload["model"]["name"], "command": train_command(payload["config"]),
            **{key: record.get(key) for key in MEMBER_FIGURES + ((tta,) if tta else ())}}


def combine_runs(runs: list[str | Path], out: str | Path, *, data: str | None = None, data_root: str | None = None,
                 tta: str | None = None, batch_size: int = 100, command: str | None = None) -> dict:
    """Write OUT/best.pt (an `ensemble` of the runs' best checkpoints) and OUT/summary.json (its validation accuracy
    measured on the members' common split, with and without `tta`, and the members' training time summed);
    returns the summary."""
    if len(runs) < 2:
        raise CifarxError("combine needs two or more runs")
    out = Path(out)
    check_new_run_folder(out)
    checkpoints = [resolve_checkpoint(run) for run in runs]
    digests = [file_sha256(path) for path in checkpoints]
    for index, digest in enumerate(digests):
        if digest in digests[:index]:  # an ensemble of one network, its training time counted twice
            raise CifarxError(f"{checkpoints[index]} is the same checkpoint as {checkpoints[digests.index(digest)]}: "
                              "combine different runs")
    payloads = [read_checkpoint(path) for path in checkpoints]
    _check_members(checkpoints, payloads)
    reference = payloads[0]
    class_names = reference["class_names"]
    members = [{"model": p["model"]["name"], "kwargs": p["model"]["kwargs"]} for p in payloads]
    model = create_model("ensemble", num_classes=len(class_names), members=members)
    state = {f"members.{i}.{key}": value for i, p in enumerate(payloads) for key, value in p["state_dict"].items()}
    load_weights(model, state, out, "ensemble")
    model.eval()

    split = ValidationSplit.of_checkpoint(reference)
    data = data or reference["config"].get("data")
    data_root = data_root or reference["config"].get("data_root")
    if not split.size:
        raise CifarxError(f"{checkpoints[0]} was trained without a validation split: nothing to measure the ensemble on")
    full = datamod.load_split(data, "train", data_root)
    if full.class_names != class_names:
        raise CifarxError(f"{data} has the classes {', '.join(full.class_names)}; the runs were trained on "
                          f"{', '.join(class_names)}")
    val_set = split.held_out(full, data)
    tta = tta or reference["config"].get("tta") or "none"
    device = torch.device("cpu")
    records = [_member_record(path, payload) for path, payload in zip(checkpoints, payloads)]
    # channels_last: 1.8x faster for EfficientNet-Lite2 at 160 px in eager mode (AMD EPYC, 2 threads)
    figures = evaluate(model.to(memory_format=torch.channels_last), val_set, batch_size, device, tta=tta,
                       channels_last=True)
    accuracy = figures["plain_accuracy"]
    summary = {"model": "ensemble", "preset": None, "epochs_run": "+".join(str(r.get("epochs_run")) for r in records),
               "train_images": records[0].get("train_images"), "final_val_accuracy": accuracy,
               "best_val_accuracy": accuracy, "val_images": len(val_set), "seed": split.seed}
    if tta != "none":
        summary[f"best_val_accuracy_tta_{tta}"] = figures["accuracy"]
    times = [record.get("train_seconds") for record in records]
    # the members' training times add up; each was measured on its own machine (in `members`)
    summary["train_seconds"] = round(sum(times), 1) if None not in times else None
    for shared in ("machine", "training_precision"):  # the card's "wall time on ..." when every member says the same
        values = [record.get(shared) for record in records]
        summary[shared] = values[0] if all(value == values[0] for value in values) else None
    summary["members"] = records

    config = {"model": "ensemble", "data": data, "data_root": data_root, "val_size": split.size, "seed": split.seed,
              "tta": tta, "command": command, "out": str(out)}
    members_metadata = [{"model": p["model"]["name"], **(p["model"].get("export_metadata") or {})} for p in payloads]
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best.pt", model_name="ensemble", model_kwargs={"members": members}, class_names=class_names,
                    state_dict=state, config=config,
                    metrics={"val_accuracy": accuracy, **{k: v for k, v in summary.items() if k.startswith("best_val_accuracy_tta")}},
                    export_metadata={"members": json.dumps(members_metadata)}, val_digest=split.digest)
    atomic_write_json(out / "summary.json", summary)
    return summary
