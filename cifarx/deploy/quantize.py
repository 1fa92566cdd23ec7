"""Static int8 quantisation with ONNX Runtime's own tools, and the int8 model measured against its fp32 source.

The steps are ONNX Runtime's recommended ones: `quant_pre_process` (shape inference, graph clean-up), calibration
on training images the model did not validate on, QDQ format, int8 weights with per-channel scales. Activations
default to uint8 (U8S8), ONNX Runtime's choice for x86 CPUs: on a 2-core AMD EPYC with AVX-512 VNNI, int8
activations (S8S8) ran at 0.6x fp32 and uint8 ones at 2x.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                      quantize_static)

from cifarx.data import datasets as datamod
from cifarx.data.split import calibration_images, load_eval_images
from cifarx.errors import CifarxError
from cifarx.io import atomic_path
from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split
from cifarx.process import cpu_info
from cifarx.runtimes.measuring import compare_outputs, environment, float_batch, measure_latency, predict_logits, score

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
PERCENTILE = 99.999  # of |activation| kept by the percentile calibrator (ONNX Runtime's default)


class ImageBatches(CalibrationDataReader):
    """Feeds uint8 [N,3,32,32] images to the calibrator as float batches in [0,1], the exported graph's input."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int):
        self.images, self.input_name, self.batch_size = images, input_name, batch_size
        self.start = 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: float_batch(batch, len(batch))}

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeLinear"}


# The CPU's int8 dot-product instructions, best first, by their /proc/cpuinfo flag.
INT8_ISA = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512bw": "AVX-512", "avx2": "AVX2"}


def cpu_int8_isa(cpuinfo: str | None = None) -> str | None:
    """The best int8 instruction set this CPU has (a key of INT8_ISA), from /proc/cpuinfo's flags; None if unknown."""
    _, flags = cpu_info(cpuinfo)
    return next((isa for isa in INT8_ISA if isa in flags), None)


def int8_types_for(isa: str | None) -> tuple[str, bool, str]:
    """(activation type, reduce_range, why) for a CPU, as ONNX Runtime's quantisation docs advise.

    x86 runs U8S8 (uint8 activations, int8 weights). With VNNI (VPDPBUSD) the products accumulate in 32 bits; without
    it, AVX2/AVX-512 use VPMADDUBSW, whose 16-bit pair sums can saturate, so weights get 7 bits (reduce_range). An
    unknown CPU (ARM...) gets ONNX Runtime's default S8S8, which has no such saturation."""
    if isa in ("avx512_vnni", "avx_vnni"):
        return "uint8", False, f"{INT8_ISA[isa]}: U8S8 accumulates in 32 bits, no saturation, full 8-bit weights"
    if isa in ("avx512bw", "avx2"):
        return "uint8", True, (f"{INT8_ISA[isa]} without VNNI: U8S8 via VPMADDUBSW can saturate its 16-bit sums, "
                               "so weights use 7 bits (reduce_range)")
    return "int8", False, "no x86 int8 instruction set found: ONNX Runtime's default S8S8"


def end_layers(model: onnx.ModelProto) -> list[str]:
    """Names of every node that uses the first convolution's or the classifier's weights (TTA graphs repeat them).

    The usual int8 recipe keeps the ends in float: the first layer sees raw pixels (on `fast`, through a whitening
    filter with a wide weight range) and the last layer's error lands on the logits directly; both are a small share
    of the FLOPs. On the fast model, quantising the two ends took validation accuracy from 90.6% to 43%."""
    weighted = [node for node in model.graph.node if node.op_type in WEIGHTED_OPS and len(node.input) > 1]
    if not weighted:
        return []
    ends = {weighted[0].input[1], weighted[-1].input[1]}
    return [node.name for node in weighted if node.input[1] in ends]


def quantize_onnx(model_path: str | Path, output: str | Path, *, data: str, calibration_count: int = 512,
                  calibration_method: str = "minmax", activation_type: str = "auto", per_channel: bool = True,
                  reduce_range: bool | None = None, keep_ends_fp32: bool = True, batch_size: int = 64,
                  data_root: str | None = None, seed: int = 0, compare_split: str | None = None) -> dict:
    """Write the int8 QDQ version of a float32 cifarx export to `output` (atomically, metadata carried over).

    `activation_type="auto"` and `reduce_range=None` take what this CPU's int8 instructions need (`int8_types_for`).
    `compare_split`: the split `compare_int8` will score afterwards, loaded here first, so a missing test/ folder
    or a data folder too small for the model's validation split is refused before the int8 file is written."""
    isa = cpu_int8_isa()
    auto_type, auto_reduce, why = int8_types_for(isa)
    chosen_by = {"activations": "cpu" if activation_type == "auto" else "option",
                 "reduce_range": "cpu" if reduce_range is None else "option"}
    activation_type = auto_type if activation_type == "auto" else activation_type
    reduce_range = auto_reduce if reduce_range is None else reduce_range
    model_path, output = Path(model_path), Path(output)
    if output.suffix != ".onnx":
        raise CifarxError(f"output file should end in .onnx: {output}")
    if output.resolve() == model_path.resolve():
        raise CifarxError("the quantised file must not replace its float32 source; choose another -o")
    if calibration_method not in CALIBRATION_METHODS:
        raise CifarxError(f"unknown calibration method {calibration_method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise CifarxError(f"unknown activation type {activation_type!r}; choose from {', '.join(ACTIVATION_TYPES)}")
    info = model_info(create_session(model_path))
    if info["input_dtype"] != "float32":
        raise CifarxError(f"{model_path} takes {info['input_dtype']} input; quantise a float32 export")
    quantized_ops = sorted({node.op_type for node in onnx.load(str(model_path)).graph.node} & QUANTIZED_OPS)
    if quantized_ops:  # ONNX Runtime's tools would fail deep inside on a graph that already has them
        raise CifarxError(f"{model_path} is already quantised (it has {', '.join(quantized_ops)} nodes); "
                          "quantise its float32 export")
    if compare_split is not None:  # the images it will be compared on exist, before calibration's long pass
        load_eval_images(data, compare_split, recorded_val_split(info), data_root)
    images = calibration_images(data, recorded_val_split(info), calibration_count, data_root, seed)
    settings = {"format": "QDQ", "weights": "int8", "activations": activation_type, "per_channel": per_channel,
                "reduce_range": reduce_range, "keep_ends_fp32": keep_ends_fp32, "op_types": list(WEIGHTED_OPS),
                "calibration_method": calibration_method, "cpu_int8_isa": INT8_ISA.get(isa), "chosen_by": chosen_by,
                "advice_for_this_cpu": {"activations": auto_type, "reduce_range": auto_reduce, "why": why},
                "calibration_images": len(images), "calibration_data": str(data)}
    with tempfile.TemporaryDirectory() as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        # The calibrators print progress to stdout; the CLI prints its own summary (and may print JSON).
        with contextlib.redirect_stdout(io.StringIO()):
            # ONNX shape inference is enough for these convolutional graphs; ORT's symbolic pass is for dynamic
            # sequence shapes and crashes on the Reshape of a TTA-folded export (its views stacked on the batch axis).
            quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(quantized), ImageBatches(images, info["input_name"], batch_size),
                op_types_to_quantize=list(WEIGHTED_OPS),
                nodes_to_exclude=end_layers(onnx.load(str(prepared))) if keep_ends_fp32 else [],
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=ACTIVATION_TYPES[activation_type], weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[calibration_method],
                extra_options={"CalibPercentile": PERCENTILE} if calibration_method == "percentile" else None,
            )
        model = onnx.load(str(quantized))
    del model.metadata_props[:]
    for key, value in {**info["metadata"], "quantization": json.dumps(settings)}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    with atomic_path(output) as temporary:
        onnx.save(model, str(temporary))
    return {"output": str(output), "bytes": output.stat().st_size, "source": str(model_path),
            "source_bytes": model_path.stat().st_size, **settings}


def _precision(event_args: dict) -> str:
    """What a profiled node computes in, from its first input's and first output's element types."""
    def is_int8(shapes):
        return bool(shapes) and next(iter(shapes[0])) in ("int8", "uint8")

    into, out = is_int8(event_args.get("input_type_shape")), is_int8(event_args.get("output_type_shape"))
    return {(True, True): "int8", (False, True): "float->int8", (True, False): "int8->float"}.get((into, out), "float")


def op_profile(path: str | Path, images: np.ndarray, batch_size: int, threads: int | None = None, runs: int = 3) -> dict:
    """Per (op type, precision) after ONNX Runtime's graph optimisation: node count and share of node run time.

    From ONNX Runtime's own profiler over `runs` runs of one batch (after one untimed run); the op types are the
    kernels that really ran (QLinearConv, NhwcMaxPool...), so a float island between int8 layers shows up."""
    with tempfile.TemporaryDirectory() as folder:
        session = create_session(path, threads=threads, profile_prefix=Path(folder) / "profile")
        info = model_info(session)
        feed = {info["input_name"]: float_batch(images, batch_size)}
        for _ in range(1 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [event for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
    seen_runs = [event for event in events if event.get("name") == "model_run"][1:]  # the first run is warm-up
    start = seen_runs[0]["ts"] if seen_runs else 0
    by_op: dict[tuple[str, str], dict] = {}
    for event in nodes:
        if event["ts"] < start:
            continue
        key = (event["args"]["op_name"], _precision(event["args"]))
        entry = by_op.setdefault(key, {"op_type": key[0], "precision": key[1], "nodes": set(), "us": 0})
        entry["nodes"].add(event["name"])
        entry["us"] += event["dur"]
    total = sum(entry["us"] for entry in by_op.values()) or 1
    ops = sorted(({"op_type": e["op_type"], "precision": e["precision"], "nodes": len(e["nodes"]),
                   "ms_per_run": round(e["us"] / 1000 / runs, 3), "share": round(e["us"] / total, 4)}
                  for e in by_op.values()), key=lambda op: -op["share"])
    return {"batch_size": batch_size, "runs": runs, "ops": ops,
            "int8_share": round(sum(op["share"] for op in ops if op["precision"] == "int8"), 4)}


def compare_int8(fp32_path: str | Path, int8_path: str | Path, *, data: str, split: str = "val",
                 batch_sizes: list[int] = (1, 256), threads: int | None = None, warmup: int = 5, repeats: int = 30,
                 data_root: str | None = None) -> dict:
    """Accuracy, agreement and CPU speed of an int8 file against its fp32 source, on the same images and threads."""
    sessions = {"fp32": create_session(fp32_path, threads=threads), "int8": create_session(int8_path, threads=threads)}
    infos = {name: model_info(session) for name, session in sessions.items()}
    if infos["fp32"]["class_names"] != infos["int8"]["class_names"]:
        raise CifarxError(f"{int8_path} and {fp32_path} name different classes: not a quantised copy")
    image_set = load_eval_images(data, split, recorded_val_split(infos["fp32"]), data_root)
    labels = datamod.class_index(infos["fp32"]["class_names"], image_set.class_names).numpy()[image_set.labels.numpy()]
    images = image_set.images.numpy()
    models, logits = {}, {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        logits[name] = predict_logits(sessions[name], infos[name], images)
        models[name] = {
            "file": str(path), "bytes": Path(path).stat().st_size,
            "accuracy": score(logits[name], labels, infos[name]["class_names"])["accuracy"],
            "latency": measure_latency(sessions[name], infos[name], images, list(batch_sizes), "cpu", warmup, repeats),
        }
    return {
        "split": split, "images": len(images), "threads": threads, "models": models,
        "accuracy_drop_points": round(100 * (models["fp32"]["accuracy"] - models["int8"]["accuracy"]), 3),
        "speedup": {batch: round(models["int8"]["latency"][batch]["images_per_s"] / stats["images_per_s"], 3)
                    for batch, stats in models["fp32"]["latency"].items()},
        "agreement": compare_outputs(logits["fp32"], logits["int8"]),
        "quantization": json.loads(infos["int8"]["metadata"].get("quantization", "null")),
        "op_profile": {name: op_profile(path, images, max(batch_sizes), threads)
                       for name, path in (("fp32", fp32_path), ("int8", int8_path))},
        "cpu_int8_isa": INT8_ISA.get(cpu_int8_isa()),
        "environment": environment(sessions["int8"]),
    }
