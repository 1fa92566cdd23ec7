"""A cifarx ONNX file converted for the runtimes that need their own format (ncnn, MNN, LiteRT, IREE, ...).

Each conversion runs the runtime's own converter in a child process (`runtimes/child.py`): a converter that
crashes, hangs or refuses an operator gives a failed result with its reason. Artifacts are written into a
temporary folder beside the target and moved into place whole, with a card (`card.json`) naming the converter,
its version, the source file's sha256 and what the application feeds the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cifarx.errors import CifarxError
from cifarx.io import current_umask, file_sha256
from cifarx.runtimes.child import CHILD_TIMEOUT_S, run_in_child
from cifarx.data.split import calibration_images
from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split
from cifarx.runtimes.table import CALIBRATION_IMAGES, RUNTIMES, missing, parse_runtimes, quantises

CARD_NAME = "card.json"


def convertible(runtime: str) -> bool:
    """Whether a runtime loads an artifact of its own (a converter's output) rather than the .onnx file."""
    return RUNTIMES[runtime].converter is not None


def artifact_folder(model_path: Path, runtime: str, out_dir: Path) -> Path:
    """Where a runtime's artifacts for a model go: OUT/MODEL.RUNTIME/ (e.g. exported/fast.ncnn/)."""
    return out_dir / f"{model_path.stem}.{runtime}"


def _card(model_path: Path, info: dict, runtime: str, converted: dict, calibration: dict | None,
          command: str | None = None) -> dict:
    row = RUNTIMES[runtime]
    return {**({"command": command} if command else {}),**({"precision": row.precision, "calibration": calibration} if calibration else {}),
        "format": "cifarx-artifact", "version": 1, "runtime": runtime, "title": row.title,
        "runtime_version": converted.get("version"), "converter": converted.get("converter"),
        "converter_version": converted.get("converter_version"), "artifacts": converted["artifacts"],
        "artifact_bytes": converted["artifact_bytes"], "convert_seconds": converted.get("convert_seconds"),
        "source": model_path.name, "source_sha256": file_sha256(model_path), "class_names": info["class_names"],
        "input": row.feed,
        "outputs": info["output_names"], "embed": row.embed,
    }


def _move_into_place(built: Path, target: Path) -> None:
    """Swap a finished folder in for `target`: the old one (if any) is replaced whole, never merged."""
    if target.exists() and not target.is_dir():
        raise CifarxError(f"{target} exists and is not a folder: refusing to replace it")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_onnx(model_path: str | Path, runtimes: list[str], out_dir: str | Path | None = None,
                 timeout: float = CHILD_TIMEOUT_S, data: str | None = None, data_root: str | None = None,
                 calibration_count: int = CALIBRATION_IMAGES, command: str | None = None) -> list[dict]:
    """Convert a cifarx ONNX file for each runtime; one result per runtime (`status` "ok", "failed: why",
    "not installed ..." or "reads the .onnx file itself"), artifacts in OUT/MODEL.RUNTIME/. An int8 row quantises
    on `calibration_count` training images of `data` outside the model's validation split."""
    model_path = Path(model_path)
    info = model_info(create_session(model_path))  # refuses a file that is not a cifarx export, before any work
    runtimes = parse_runtimes(",".join(runtimes))
    calibration = None
    if any(quantises(runtime) for runtime in runtimes):  # the images exist and are enough, before anything is written
        if data is None:
            raise CifarxError(f"{', '.join(r for r in runtimes if quantises(r))} quantises the model on training "
                              "images: give --data")
        calibration = calibration_images(data, recorded_val_split(info), calibration_count, data_root)
    out_dir = Path(out_dir) if out_dir is not None else model_path.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise CifarxError(f"--out {out_dir} is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for runtime in runtimes:
        result = {"runtime": runtime, "model": str(model_path)}
        not_installed = missing(runtime)
        if not convertible(runtime):
            results.append({**result, "status": "reads the .onnx file itself: nothing to convert"})
            continue
        if not_installed:
            results.append({**result, "status": not_installed})
            continue
        target = artifact_folder(model_path, runtime, out_dir)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out_dir))
        try:
            calibrated = calibration if quantises(runtime) else None
            converted = run_in_child(runtime, model_path, None, [], out_dir=building, timeout=timeout,
                                     calibration=calibrated)
            if "failed" in converted:
                results.append({**result, "status": f"failed: {converted['failed']}"})
                continue
            card = _card(model_path, info, runtime, converted, None if calibrated is None else {
                "images": len(calibrated), "from": "training images outside the model's validation split",
                "data": Path(data).name if data != "cifar10" else data, "method": converted.get("converter")}, command)
            (building / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
            os.chmod(building, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders
            _move_into_place(building, target)
            results.append({**result, **card, "status": "ok", "folder": str(target)})
        finally:
            if building.exists():  # a failed or interrupted conversion leaves nothing behind
                shutil.rmtree(building, ignore_errors=True)
    return results

