"""Checkpoint -> self-describing ONNX file: normalisation (and resize, TTA) inside the graph, metadata, parity check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import cifarx
from cifarx import data as datamod
from cifarx import runfolder
from cifarx.batches import recorded_split, validation_split
from cifarx.checkpoint import file_sha256, load_model, resolve_checkpoint
from cifarx.errors import CifarxError
from cifarx.io import atomic_path, check_writable
from cifarx.models.common import TestTimeAugmentation, preprocessing_of
from cifarx.portable import make_portable
from cifarx.runtimes import PROVIDERS

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
    val_size, split_seed = recorded_split(config)
    if 0 < (val_size or 0) < len(full):
        _, index = validation_split(full.labels, val_size, split_seed, source)
    else:  # no held-out images in this data (trained on all of it, or other --data): any of its images show parity
        index = torch.arange(len(full))
    return datamod.to_float(full.images[index[:count]])


def check_parity(onnx_path: Path, torch_model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict:
    """ONNX Runtime CPU against PyTorch on the same images: top-1 agreement and the largest |delta logit|."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=[PROVIDERS["cpu"]])
    except Exception as error:  # e.g. an opset newer than this ONNX Runtime knows
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CifarxError(f"ONNX Runtime cannot load the exported graph: {message}; no file written") from None
    input_type = session.get_inputs()[0].type
    agree, max_delta, scale = 0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            expected = torch_model(batch).float()
            feed = batch.half().numpy() if "float16" in input_type else batch.numpy()
            got = torch.from_numpy(session.run(["logits"], {INPUT_NAME: feed})[0]).float()
            agree += (got.argmax(1) == expected.argmax(1)).sum().item()
            if not (torch.isfinite(got).all() and torch.isfinite(expected).all()):  # Python's max would skip a NaN
                raise CifarxError("parity check failed: the model's logits are not finite (NaN or inf weights?); "
                                  "no file written")
            max_delta = max(max_delta, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    return {"images": len(images), "top1_agreement": agree / max(1, len(images)), "max_abs_logit_delta": max_delta,
            "max_abs_logit": scale}


def build_metadata(payload: dict, checkpoint: Path, opset: int, tta: str, preprocessing: dict, fp16: bool) -> dict[str, str]:
    config = payload["config"]
    metrics = payload.get("metrics") or {}
    val_size, split_seed = recorded_split(config)
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
        "val_split": json.dumps({"data": config.get("data"), "val_size": val_size, "seed": split_seed}),
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
        epoch = (payload.get("metrics") or {}).get("epoch", "?")
        warnings.warn(f"{checkpoint.parent} is an unfinished run ({record['epochs_run']} of {record['epochs']} epochs "
                      f"trained): exporting {checkpoint.name} from epoch {epoch}")


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
