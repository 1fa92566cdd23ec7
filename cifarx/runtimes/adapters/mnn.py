"""MNN (Alibaba's mobile engine): MNNConvert from the MNN wheel writes a .mnn file; its Module API runs it on the CPU.

The converter's compiled core is called directly (`_tools.mnnconvert`), never the `mnnconvert` console script:
that script's Python wrapper pip-installs a logging SDK when missing (downgrading protobuf below what onnx needs)
and posts conversion details to a remote logging service.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cifarx.runtimes.adapters.converting import flips_as_gathers, quiet_stdout, reason, rewritten_copy, run_converter

CONVERTER = "MNNConvert"
# ONNX in, float32 weights, NCHW input kept, the exact (erf) GELU: the default tanh approximation moved fast's
# probabilities by 6.6e-4 against 3.0e-7; level 1 keeps only rewrites valid for every input shape.
CONVERT_FLAGS = ["-f", "ONNX", "--bizCode", "cifarx", "--keepInputFormat", "--useGeluApproximation", "0",
                 "--optimizeLevel", "1"]
CONVERTER_CALL = "import sys, _tools; _tools.mnnconvert(['MNNConvert'] + sys.argv[1:])"


def versions() -> dict:
    from importlib.metadata import version

    return {"runtime": version("MNN"), "converter": version("MNN")}  # MNNConvert ships inside the same wheel


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
