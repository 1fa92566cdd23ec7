"""MNN (Alibaba's mobile engine): MNNConvert from the MNN wheel writes a .mnn file; its Module API runs it on the CPU.

The converter's compiled core is called directly (`_tools.mnnconvert`), never the `mnnconvert` console script:
that script's Python wrapper pip-installs a logging SDK when missing (downgrading protobuf below what onnx needs)
and posts conversion details to a remote logging service.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cifarx.runtimes.adapters.converting import constants, quiet_stdout, reason, rewritten_copy, run_converter

CONVERTER = "MNNConvert"
# ONNX in, float32 weights, NCHW input kept, the exact (erf) GELU: the default tanh approximation moved fast's
# probabilities by 6.6e-4 against 3.0e-7; level 1 keeps only rewrites valid for every input shape.
CONVERT_FLAGS = ["-f", "ONNX", "--bizCode", "cifarx", "--keepInputFormat", "--useGeluApproximation", "0",
                 "--optimizeLevel", "1"]
CONVERTER_CALL = "import sys, _tools; _tools.mnnconvert(['MNNConvert'] + sys.argv[1:])"


def versions() -> dict:
    from importlib.metadata import version

    return {"runtime": version("MNN"), "converter": version("MNN")}  # MNNConvert ships inside the same wheel


def flips_as_gathers(model) -> int:
    """Each Slice with a negative step (the exports' horizontal-flip TTA) as Gathers of explicit indices: the same
    elements, picked otherwise. Why: MNN 3.6 segfaults at run time on a negative-step Slice, on every API."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {name: value.reshape(-1).tolist() for name, value in constants(graph).items()}
    flips = [node for node in graph.node if node.op_type == "Slice" and len(node.input) >= 5 and node.input[4]
             and any(step < 0 for step in values.get(node.input[4], []))]
    if not flips:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {info.name: [dim.dim_value if dim.HasField("dim_value") else None for dim in info.type.tensor_type.shape.dim]
              for info in [*inferred.input, *inferred.value_info]}
    nodes = []
    for node in graph.node:
        if node not in flips:
            nodes.append(node)
            continue
        starts, ends, steps = (values.get(name) for name in (node.input[1], node.input[2], node.input[4]))
        axes = values.get(node.input[3]) if node.input[3] else list(range(len(starts or [])))
        shape = shapes.get(node.input[0])
        if None in (starts, ends, axes, shape):
            raise RuntimeError(f"Slice {node.name!r} steps backwards (MNN crashes on it) with parameters that are not "
                               "constants, so it cannot be written as a Gather")
        current = node.input[0]
        for k, (start, end, axis, step) in enumerate(zip(starts, ends, axes, steps)):
            axis = axis % len(shape)
            if shape[axis] is None:
                raise RuntimeError(f"Slice {node.name!r} steps backwards (MNN crashes on it) along an axis of "
                                   "unknown size, so it cannot be written as a Gather")
            index = np.arange(*slice(start, end, step).indices(shape[axis]), dtype=np.int64)  # ONNX's clamping
            index_name = f"{node.output[0]}/gather_index{k}"
            graph.initializer.append(numpy_helper.from_array(index, index_name))
            output = node.output[0] if k == len(starts) - 1 else f"{node.output[0]}/gather{k}"
            nodes.append(helper.make_node("Gather", [current, index_name], [output], axis=axis))
            current = output
    del graph.node[:]
    graph.node.extend(nodes)
    return len(flips)


def convert(onnx_path: Path, out_dir: Path) -> list[Path]:
    import sys

    artifact = Path(out_dir).resolve() / f"{Path(onnx_path).stem}.mnn"
    with tempfile.TemporaryDirectory(prefix="cifarx-mnn-") as folder:
        source = rewritten_copy(Path(onnx_path), Path(folder), flips_as_gathers)
        output = run_converter([sys.executable, "-c", CONVERTER_CALL, *CONVERT_FLAGS, "--modelFile", str(source),
                                "--MNNModel", str(artifact)], "MNNConvert", cwd=Path(folder))
    # MNNConvert reports most failures in its log and still exits 0: its own success line and the file decide
    if "Converted Success" not in output or not artifact.is_file() or not artifact.stat().st_size:
        raise RuntimeError(f"MNNConvert failed: {reason(output)}")
    return [artifact]


def open_runtime(artifact: Path, threads: int | None):
    import numpy as np

    with quiet_stdout():
        import MNN
        import MNN.expr as expr
        import MNN.nn as nn

        config = {"backend": "CPU", "precision": "high"}  # high: float32 arithmetic
        if threads:
            config["numThread"] = int(threads)
        manager = nn.create_runtime_manager((config,))
        # no names: the model's own input and outputs, in the ONNX file's order; shape_mutable: any batch size
        module = nn.load_module_from_file(str(artifact), [], [], runtime_manager=manager, shape_mutable=True,
                                          rearrange=True)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outputs = module.forward([expr.const(batch, list(batch.shape), expr.NCHW)])
        return [np.array((expr.convert(output, expr.NCHW) if output.data_format == expr.NC4HW4 else output).read(),
                         dtype=np.float32) for output in outputs]

    return run, f"CPU (MNN {MNN.version()}, {threads or 'default'} threads)"
