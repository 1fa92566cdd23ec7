"""Model cards: FILE.json (for programs) and FILE.md (for people) beside an exported ONNX file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cifarx.training.checkpoint import read_checkpoint, resolve_checkpoint
from cifarx.errors import CifarxError
from cifarx.io import atomic_write_json, atomic_write_text, check_writable, file_sha256
from cifarx.training.runfolder import portable_command, portable_run_path, run_record, train_command


def _run_summary(run: str | Path) -> dict:
    if not Path(run).is_dir():
        raise CifarxError(f"run folder not found: {run}")
    return run_record(Path(run))


def _tta_accuracy(summary: dict) -> float | None:
    return next((v for k, v in summary.items() if k.startswith("best_val_accuracy_tta")), None)


def validation_figures(runs: list[str | Path]) -> dict:
    """Validation accuracy of one or more runs of a recipe: each run, and mean/std when there are several."""
    rows = []
    for run in runs:
        summary = _run_summary(run)
        rows.append({"run": portable_run_path(run), "seed": summary.get("seed"), "val_images": summary.get("val_images"),
                     "final_val_accuracy": summary.get("final_val_accuracy"),
                     "best_val_accuracy": summary.get("best_val_accuracy"), "val_accuracy_tta": _tta_accuracy(summary)})
    key = "val_accuracy_tta" if all(r["val_accuracy_tta"] is not None for r in rows) else "best_val_accuracy"
    values = [r[key] for r in rows]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "measure": key, "runs": rows}


FAMILY_FIELDS = ("backbone", "img_size", "weights", "freeze", "labelled", "unlabelled", "method")  # what family_fields may add


def family_fields(model_kwargs: dict, config: dict) -> dict:
    """What a reader of a transfer-learning or semi-supervised card needs first: input size and weights' origin,
    or the label budget and the method; for an ensemble (`cifarx combine`), each member's in order."""
    if "members" in model_kwargs:
        per_member = [family_fields(spec["kwargs"], config) for spec in model_kwargs["members"]]
        return {name: [fields.get(name) for fields in per_member] for name in FAMILY_FIELDS
                if any(name in fields for fields in per_member)}
    fields = {}
    if "img_size" in model_kwargs:
        fields["backbone"] = str(config.get("model", "")).removeprefix("timm/")
        fields["img_size"] = model_kwargs["img_size"]
        fields["weights"] = model_kwargs.get("weights_source") or model_kwargs.get("weights") or (
            "timm pretrained" if model_kwargs.get("pretrained") else "random init")
        fields["freeze"] = model_kwargs.get("freeze", "none")
    if config.get("labelled"):
        method, objective_kwargs = config.get("objective"), config.get("objective_kwargs") or {}
        if objective_kwargs.get("consistency"):
            method += "+fixmatch"  # the consistency term changes what the unlabelled images teach; say so
        if objective_kwargs.get("elbo_weight", 1) == 0:
            method = method.replace("vae-m2+", "")  # no generative term left: FixMatch alone
        if config.get("pseudo_labels"):
            method = "self-training"  # a student: its unlabelled images carried its teacher's labels
        fields.update(labelled=config["labelled"], unlabelled=config.get("unlabelled"), method=method)
    return fields


def check_card_inputs(onnx_path: str | Path, val_runs: list) -> None:
    """Before the export writes anything: the validation runs are readable and the card files can be written."""
    if val_runs:
        validation_figures(val_runs)
    base = Path(onnx_path).with_suffix("")
    for target in (base.with_suffix(".json"), base.with_suffix(".md")):
        check_writable(target)


def write_model_card(checkpoint: str | Path, onnx_path: str | Path, export_report: dict, val_runs: list,
                     export_command: str, note: str | None = None) -> list[Path]:
    """Write ONNX_STEM.json and ONNX_STEM.md describing the model, how it was trained and how well it does."""
    checkpoint = resolve_checkpoint(checkpoint)
    payload = read_checkpoint(checkpoint)
    run_dir = checkpoint.parent
    config = payload["config"]
    is_run = (run_dir / "last.pt").is_file() or (run_dir / "summary.json").is_file()
    summary = run_record(run_dir) if is_run else {}
    runs = list(val_runs) or ([run_dir] if summary.get("best_val_accuracy") is not None else [])
    validation = validation_figures(runs) if runs else None
    onnx_path = Path(onnx_path)
    card = {
        "model": payload["model"]["name"],
        "model_kwargs": payload["model"]["kwargs"],
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "class_names": payload["class_names"],
        "input": "float32 [N,3,32,32] RGB in [0,1]; normalisation inside the graph",
        "outputs": ["logits", "probabilities"],
        "val_accuracy": validation,
        "train_images": summary.get("train_images"),
        "train_seconds": summary.get("train_seconds"),
        "machine": summary.get("machine"),  # where train_seconds was measured
        "training_precision": summary.get("training_precision"),  # bfloat16 trained fast 1.6-3x faster on some CPUs
        "epochs": summary.get("epochs_run", config.get("epochs")),
        "finished": summary.get("finished"),  # False: exported while training (or after it stopped)
        "epochs_planned": config.get("epochs"),
        "preset": config.get("preset"),
        "seed": config.get("seed"),
        "command": train_command(config),
        "note": note,
        "export_command": portable_command(export_command),
        "tta_in_graph": export_report.get("tta", "none"),
        "parity": {k: export_report[k] for k in ("images", "top1_agreement", "max_abs_logit_delta")},
        "opset": export_report["opset"],
        "members": summary.get("members"),  # an ensemble's: each run, its command, time and validation figures
        **family_fields(payload["model"]["kwargs"], config),
    }
    base = onnx_path.with_suffix("")
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    atomic_write_json(json_path, card)
    atomic_write_text(md_path, _markdown(card))
    return [json_path, md_path]


def rewrite_card_note(onnx_path: str | Path, note: str, compared_with: str | None = None) -> list[Path]:
    """Replace the free-text note (and `compared_with`) of an exported file's card and write both card files again;
    the card must describe this very file (its sha256), and the recorded export command gets the new note."""
    import shlex

    onnx_path = Path(onnx_path)
    base = onnx_path.with_suffix("")
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    try:
        card = json.loads(json_path.read_text())
    except (OSError, ValueError):
        raise CifarxError(f"no readable model card {json_path} beside {onnx_path}") from None
    if not isinstance(card, dict) or card.get("sha256") != file_sha256(onnx_path):
        raise CifarxError(f"{json_path} does not describe {onnx_path} (its sha256 differs): export the card again")
    for target in (json_path, md_path):
        check_writable(target)
    card["note"] = note
    if compared_with is not None:
        card["compared_with"] = compared_with
    words = shlex.split(card.get("export_command") or "")
    if "--card-note" in words[:-1]:
        words[words.index("--card-note") + 1] = note
        card["export_command"] = shlex.join(words)
    atomic_write_json(json_path, card)
    atomic_write_text(md_path, _markdown(card))
    return [json_path, md_path]


def _machine_text(machine: dict | None) -> str:
    if not machine:  # runs from before summaries recorded their machine
        return ""
    threads = f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}"
    return f", {threads} of {machine['cpu']} ({', '.join(machine['isa_flags']) or 'no AVX2'})"


def _precision_text(precision: str | None) -> str:
    return f", training step in {precision}" if precision else ""  # runs from before summaries recorded it: nothing


def _cell(value) -> str:
    """A table cell for people, not Python's repr: no value is a dash, a per-member list is comma-separated."""
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value)
    return "—" if value is None else str(value)


def _members_text(members: list | None) -> list[str]:
    if not members:
        return []
    lines = ["Members (the training time above is theirs, summed):", ""]
    for member in members:
        tta = next((v for k, v in member.items() if k.startswith("best_val_accuracy_tta")), None)
        accuracy = f"{member['best_val_accuracy']:.2%}" + (f" ({tta:.2%} with TTA)" if tta is not None else "") \
            if member.get("best_val_accuracy") is not None else "not measured"
        lines += [f"- `{member['model']}`: validation {accuracy}, {member.get('train_seconds')} s"
                  f"{_machine_text(member.get('machine'))}: `{member['command']}`"]
    return lines + [""]


def _markdown(card: dict) -> str:
    validation = card["val_accuracy"]
    if validation:
        spread = f" ± {validation['std']:.2%} over {validation['n']} runs" if validation["n"] > 1 else ""
        accuracy = f"{validation['mean']:.2%}{spread} ({validation['measure'].replace('_', ' ')}, validation split)"
    else:
        accuracy = "not measured (trained without a validation split)"
    unfinished = f" of {card.get('epochs_planned')} (unfinished run)" if card.get("finished") is False else ""
    lines = [
        f"# {card['file']}",
        "",
        f"`{card['model']}` classifier for {len(card['class_names'])} classes: {', '.join(card['class_names'])}.",
        "",
        "| | |",
        "|---|---|",
        f"| validation accuracy | {accuracy} |",
        f"| trained on | {card['train_images']} images, {card['epochs']} epochs{unfinished}, {card['train_seconds']} s "
        f"wall time{_precision_text(card.get('training_precision'))}{_machine_text(card.get('machine'))} |",
        f"| preset / seed | {_cell(card['preset'])} / {_cell(card['seed'])} |",
        *[f"| {name.replace('_', ' ')} | {_cell(card[name])} |" for name in FAMILY_FIELDS if name in card],
        f"| input | {card['input']} |",
        "| outputs | logits, probabilities |",
        f"| test-time augmentation in graph | {card['tta_in_graph']} |",
        f"| parity with PyTorch | top-1 agreement {card['parity']['top1_agreement']:.2%} on {card['parity']['images']} images, "
        f"max abs logit delta {card['parity']['max_abs_logit_delta']:.1e} |",
        f"| size / sha256 | {card['bytes'] / 1e6:.2f} MB / `{card['sha256'][:16]}…` |",
        "",
        *([f"Note: {card['note']}", ""] if card["note"] else []),
        *([card["compared_with"], ""] if card.get("compared_with") else []),
        *_members_text(card.get("members")),
        "Made by:",
        "",
        "```bash",
        str(card["command"]),
        card["export_command"],
        "```",
        "",
        "Use it: `cifarx predict FILE image.jpg` or the ten-line snippet in the README (onnxruntime, numpy, Pillow).",
        "",
    ]
    return "\n".join(lines)
