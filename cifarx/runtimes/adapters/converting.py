"""What the adapters of converted runtimes share: running a converter, its one-line reason, a rewritten copy of
the ONNX file for a runtime's known bug, and silencing C++ banners printed to stdout."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

CONVERT_TIMEOUT_S = 1800
FAILURE_WORDS = ("not support", "unsupported", "don't support", "error", "can't", "cannot", "failed", "invalid",
                 "abort", "segmentation")


def reason(text: str) -> str:
    """A converter's own one-line reason: its first line that names a failure, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = next((line for line in lines if any(word in line.lower() for word in FAILURE_WORDS)), None)
    return (named or (lines[-1] if lines else "no output"))[:300]


def run_converter(command: list[str], what: str, cwd: Path | None = None, timeout: float = CONVERT_TIMEOUT_S,
                  env: dict | None = None) -> str:
    """Run a converter's command; its output, or RuntimeError with its own reason (or the timeout)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took more than {timeout:g} s") from None
    output = f"{done.stdout or ''}\n{done.stderr or ''}"
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {reason(output)}")
    return output


def rewritten_copy(onnx_path: Path, folder: Path, *rewrites) -> Path:
    """The ONNX file with `rewrites` (each `rewrite(model) -> count`) applied, saved in `folder` (a private
    temporary one): converters read and write beside their input, never beside a shipped file."""
    import onnx

    model = onnx.load(str(onnx_path))
    for rewrite in rewrites:
        rewrite(model)
    copy = Path(folder) / "model.onnx"
    onnx.save(model, str(copy))
    return copy


def constants(graph) -> dict:
    """Every constant tensor of a graph by name (initializers and Constant nodes), as numpy arrays."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@contextlib.contextmanager
def quiet_stdout():
    """Send file descriptor 1 to /dev/null meanwhile: some runtimes' C++ code prints banners with printf."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def python_tool(module: str, *arguments: str) -> list[str]:
    """A command that runs a converter shipped as a Python module with this interpreter."""
    return [sys.executable, "-m", module, *arguments]


def flips_as_gathers(model) -> int:
    """Each Slice with a negative step (the exports' horizontal-flip TTA) as Gathers of explicit indices: the same
    elements, picked otherwise. Why: MNN 3.6 segfaults at run time on a negative-step Slice, on every API, and
    onnx2tf 1.29 silently turns it into an identity (the flip is dropped: max |delta p| 0.25 on fast)."""
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
            raise RuntimeError(f"Slice {node.name!r} steps backwards (MNN and onnx2tf get it wrong) with parameters that are not "
                               "constants, so it cannot be written as a Gather")
        current = node.input[0]
        for k, (start, end, axis, step) in enumerate(zip(starts, ends, axes, steps)):
            axis = axis % len(shape)
            if shape[axis] is None:
                raise RuntimeError(f"Slice {node.name!r} steps backwards (MNN and onnx2tf get it wrong) along an axis of "
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
