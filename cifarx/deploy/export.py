"""Checkpoint -> self-describing ONNX file: normalisation (and resize, TTA) inside the graph, metadata, parity check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import cifarx
from cifarx.data import datasets as datamod
from cifarx.training import runfolder
from cifarx.training.checkpoint import load_model, resolve_checkpoint
from cifarx.data.split import ValidationSplit
from cifarx.errors import CifarxError
from cifarx.io import atomic_path, check_writable, file_sha256, folder_locked
from cifarx.models.common import TestTimeAugmentation, preprocessing_of
from cifarx.deploy.portable import make_portable
from cifarx.runtimes.measuring import compare_outputs
from cifarx.runtimes.onnxfile import create_session

DEFAULT_OPSET = 18  # the lowest opset torch's dynamo exporter writes natively; ORT >= 1.14 runs it


def opset_range() -> tuple[int, int]:
    """Opsets export accepts: from the exporter's lowest native one to the newest this onnx package defines."""
    import onnx

    return DEFAULT_OPSET, onnx.defs.onnx_opset_version()
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")


class LogitsAndProbabilities(nn.Module):
    """The exported interface: [N,3,32,32] floats in [0,1] -> (logits, softmax probabilities)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        return logits, logits.softmax(dim=1)


def parity_images(payload: dict, data: str | None, data_root: str | None, count: int) -> torch.Tensor:
    """Up to `count` real validation images of the checkpoint's run (float [0,1]); `data` overrides its source."""
    config = payload["config"]
    source = data or config.get("data")
    try:
        full = datamod.load_split(source, "train", data_root or config.get("data_root"))
    except CifarxError as error:
        raise CifarxError(f"parity check needs real images: {error} (pass --data DIR)") from None
    split = ValidationSplit.of_checkpoint(payload)
    # a run that held nothing out trained on every image: any of them shows parity
    index = split.indices(full, source)[1] if split.size else torch.arange(len(full))
    return datamod.to_float(full.images[index[:count]])


def check_parity(onnx_path: Path, torch_model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict:
    """ONNX Runtime CPU against PyTorch on the same images (`compare_outputs`: top-1 agreement, max |delta logit|)."""
    try:
        session = create_session(onnx_path)
    except CifarxError as error:  # e.g. an opset newer than this ONNX Runtime knows
        reason = str(error).split(": ", 1)[-1]
        raise CifarxError(f"ONNX Runtime cannot load the exported graph: {reason}; no file written") from None
    float16 = "float16" in session.get_inputs()[0].type
    expected, got = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            expected.append(torch_model(batch).float().numpy())
            feed = batch.half().numpy() if float16 else batch.numpy()
            got.append(session.run(["logits"], {INPUT_NAME: feed})[0].astype(np.float32))
    expected, got = np.concatenate(expected), np.concatenate(got)
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):  # Python's max would skip a NaN
        raise CifarxError("parity check failed: the model's logits are not finite (NaN or inf weights?); no file written")
    return compare_outputs(expected, got)


def build_metadata(payload: dict, checkpoint: Path, opset: int, tta: str, preprocessing: dict, fp16: bool) -> dict[str, str]:
    config = payload["config"]
    metrics = payload.get("metrics") or {}
    split = ValidationSplit.of_run(config)
    metadata = {
        "cifarx_format": "1",
        "class_names": json.dumps(payload["class_names"]),
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_color": "RGB",
        "input_size": "32",
        "input_range": "[0, 1]",
        "input_dtype": "float16" if fp16 else "float32",
        "normalization": json.dumps({k: preprocessing[k] for k in ("mean", "std") if k in preprocessing}),
        "resize_to": str(preprocessing.get("resize_to", 32)),
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "opset": str(opset),
        "tta": tta,
        "model_name": payload["model"]["name"],
        "model_kwargs": json.dumps(payload["model"]["kwargs"]),
        "val_accuracy": json.dumps(metrics.get("val_accuracy")),
        "val_split": json.dumps({"data": config.get("data"), "val_size": config.get("val_size"), "seed": split.seed,
                                 "digest": payload.get("val_digest")}),
        "checkpoint_sha256": file_sha256(checkpoint),
        "cifarx_version": cifarx.__version__,
        "torch_version": torch.__version__,
        "training": json.dumps({k: config.get(k) for k in ("preset", "epochs", "optimizer", "lr", "batch_size", "seed")}),
    }
    metadata.update({k: str(v) for k, v in (payload["model"].get("export_metadata") or {}).items()})
    return metadata


def _warn_if_unfinished(checkpoint: Path, payload: dict) -> None:
    """Say so when the checkpoint belongs to a run that has not finished (still training, or stopped)."""
    if not (checkpoint.parent / "last.pt").is_file():
        return  # a checkpoint outside a run folder: nothing to compare with
    record = runfolder.run_record(checkpoint.parent)
    if not record["finished"]:
        state = "in progress" if folder_locked(checkpoint.parent) else "stopped before its end"
        epoch = (payload.get("metrics") or {}).get("epoch")
        if epoch is None:  # a Ctrl-C last.pt: mid-epoch weights
            run_state = (payload.get("train_state") or {}).get("run", {})
            held = f"from epoch {run_state.get('epoch', 0) + 1}, step {run_state.get('step_in_epoch', 0)}"
        else:
            held = f"after epoch {epoch}"
        warnings.warn(f"{checkpoint.parent} is a run {state} ({record['epochs_run']} of {record['epochs']} epochs "
                      f"trained): exporting {checkpoint.name}, the weights {held}")


def export_onnx(checkpoint: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET, tta: str = "none",
                fp16: bool = False, data: str | None = None, data_root: str | None = None,
                parity_count: int = 256, tolerance: float | None = None) -> dict:
    """Export a checkpoint (or run folder) to `output`; returns the parity report. Nothing is left on failure."""
    lowest, highest = opset_range()
    if not lowest <= opset <= highest:
        raise CifarxError(f"--opset must be in [{lowest}, {highest}] (the exporter writes {lowest} or newer), got {opset}")
    checkpoint = resolve_checkpoint(checkpoint)
    model, payload = load_model(checkpoint)
    _warn_if_unfinished(checkpoint, payload)
    preprocessing = preprocessing_of(model)
    if tta != "none":
        model = TestTimeAugmentation(model, tta).eval()
    wrapper = LogitsAndProbabilities(model).eval()
    example = torch.rand(2, 3, 32, 32)
    output = Path(output)
    if output.suffix != ".onnx":
        raise CifarxError(f"output file should end in .onnx: {output}")
    check_writable(output)
    with torch.no_grad():
        outputs = wrapper(example)[0].shape[-1]
    if outputs != len(payload["class_names"]):  # a file whose metadata names other classes than it outputs is unusable
        raise CifarxError(f"{checkpoint} lists {len(payload['class_names'])} class names but its model has {outputs} outputs")
    images = parity_images(payload, data, data_root, parity_count)
    # Relative to the largest logit: float32 kernels sum in different orders, so error grows with magnitude.
    tolerance = tolerance if tolerance is not None else (1e-2 if fp16 else 1e-4)
    with atomic_path(output) as temporary:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
            )
        onnx_model = program.model_proto
        make_portable(onnx_model)  # the same numbers in a form every runtime runs right (OpenCV 5.0, see portable.py)
        if fp16:
            from onnxconverter_common import float16

            onnx_model = float16.convert_float_to_float16(onnx_model, keep_io_types=False)
        import onnx

        del onnx_model.metadata_props[:]
        # what the exporter wrote, which is what the metadata and the report say
        opset = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
        for key, value in build_metadata(payload, checkpoint, opset, tta, preprocessing, fp16).items():
            onnx_model.metadata_props.add(key=key, value=value)
        onnx_model.producer_name = "cifarx"
        onnx_model.producer_version = cifarx.__version__
        onnx.checker.check_model(onnx_model, full_check=True)
        onnx.save(onnx_model, str(temporary))
        report = check_parity(temporary, model, images)
        report["tolerance"] = tolerance
        if report["max_abs_logit_delta"] > tolerance * max(1.0, report["max_abs_logit"]):
            raise CifarxError(
                f"parity check failed: largest |delta logit| {report['max_abs_logit_delta']:.2e} > {tolerance:.0e} "
                f"x max(1, largest |logit| {report['max_abs_logit']:.3g}) "
                f"(top-1 agreement {report['top1_agreement']:.4f}); no file written"
            )
    report.update({"output": str(output), "opset": opset, "tta": tta, "bytes": output.stat().st_size})
    return report
