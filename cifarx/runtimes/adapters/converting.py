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


def run_converter(command: list[str], what: str, cwd: Path | None = None, timeout: float = CONVERT_TIMEOUT_S) -> str:
    """Run a converter's command; its output, or RuntimeError with its own reason (or the timeout)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
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
