"""LiteRT (TensorFlow Lite): onnx2tf converts the ONNX file to a float32 .tflite; ai-edge-litert runs it (XNNPACK).

onnx2tf needs TensorFlow and pins old numpy / onnx releases, so it lives in an environment of its own: the Python
named by CIFARX_ONNX2TF_PYTHON (docs/runtimes.md says how to make one). The runtime itself is the `litert` extra.

Why the options: the batch is fixed at 1 for the conversion (with a dynamic batch onnx2tf fails on the TTA graphs'
Slice at Shape(input)[0] and on the in-graph normalisation); Erf becomes onnx2tf's polynomial Erf (the exporter folds
GELU's 0.5 into the next Conv, so onnx2tf's GELU fusion does not match and a plain Erf becomes FlexErf, which the
LiteRT interpreter cannot run; max |delta p| on fast: 4.8e-7); the input stays NCHW, so apps feed what they feed
ONNX Runtime. After converting, the .tflite is tried at batch 3 against three batch-1 calls: where they agree,
`run` resizes the input to the batch, else it calls once per image (recorded beside the model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cifarx.runtimes.adapters.converting import flips_as_gathers, rewritten_copy, run_converter

CONVERTER = "onnx2tf"
CONVERTER_PYTHON = "CIFARX_ONNX2TF_PYTHON"


def converter_python() -> str:
    python = os.environ.get(CONVERTER_PYTHON)
    if not python or not Path(python).is_file():
        raise RuntimeError(f"LiteRT's converter onnx2tf needs TensorFlow in an environment of its own: set "
                           f"{CONVERTER_PYTHON} to its python (docs/runtimes.md)")
    return python


def versions() -> dict:
    import subprocess
    from importlib.metadata import version

    found = {"runtime": version("ai-edge-litert"), "converter": None}
    python = os.environ.get(CONVERTER_PYTHON)
    if python and Path(python).is_file():
        asked = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('onnx2tf'))"],
                               capture_output=True, text=True, timeout=120)
        found["converter"] = asked.stdout.strip() or None
    return found


def convert(onnx_path: Path, out_dir: Path) -> list[Path]:
    import onnx

    python = converter_python()
    out_dir = Path(out_dir).resolve()
    model = onnx.load(str(onnx_path), load_external_data=False)
    input_name, output_names = model.graph.input[0].name, [output.name for output in model.graph.output]
    artifact = out_dir / f"{Path(onnx_path).stem}.tflite"
    with tempfile.TemporaryDirectory(prefix="cifarx-onnx2tf-") as folder:
        source = rewritten_copy(Path(onnx_path), Path(folder), flips_as_gathers)  # onnx2tf rewrites its input too
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
                       "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its onnxsim
        environment.pop("PYTHONPATH", None)
        command = [python, "-m", "onnx2tf", "-i", str(source), "-o", str(Path(folder) / "tf"),
                   "-ois", f"{input_name}:1,3,32,32", "-k", input_name, "-coion", "-rtpo", "Erf"]
        output = run_converter(command, "onnx2tf", cwd=Path(folder), env=environment)
        produced = Path(folder) / "tf" / f"{source.stem}_float32.tflite"
        if not produced.is_file():
            raise RuntimeError(f"onnx2tf wrote no .tflite: {_ansi_free(output)[-200:]}")
        shutil.move(produced, artifact)
    layout = out_dir / f"{artifact.name}.json"
    layout.write_text(json.dumps({"input": input_name, "outputs": output_names,
                                  "batch_resizable": _resizes_right(artifact, input_name, output_names)}))
    return [artifact, layout]


def _ansi_free(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _resizes_right(artifact: Path, input_name: str, output_names: list[str]) -> bool:
    """Whether the .tflite answers a batch of 3 (its input resized) as it answers those images one at a time."""
    import numpy as np

    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    one_by_one = _interpreter_run(artifact, input_name, output_names, None, resizable=False)
    resized = _interpreter_run(artifact, input_name, output_names, None, resizable=True)
    try:
        return all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(one_by_one(images), resized(images)))
    except Exception:  # a graph with baked-in shapes refuses the resize: one image per call then
        return False


def _interpreter_run(artifact: Path, input_name: str, output_names: list[str], threads: int | None, resizable: bool):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact), **({"num_threads": int(threads)} if threads else {}))
    signature = interpreter._get_full_signature_list()
    tensors = signature["serving_default"] if "serving_default" in signature else next(iter(signature.values()))
    input_index = tensors["inputs"][input_name]
    output_indices = [tensors["outputs"][name] for name in output_names]
    interpreter.allocate_tensors()
    current = {"batch": 1}

    def call(batch: np.ndarray) -> list[np.ndarray]:
        if len(batch) != current["batch"]:
            interpreter.resize_tensor_input(input_index, list(batch.shape))
            interpreter.allocate_tensors()
            current["batch"] = len(batch)
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        return [interpreter.get_tensor(index).copy() for index in output_indices]

    def run(batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = [call(batch)] if resizable else [call(batch[i : i + 1]) for i in range(len(batch))]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(output_names))]

    return run


def open_runtime(artifact: Path, threads: int | None):
    from importlib.metadata import version

    layout = json.loads(Path(f"{artifact}.json").read_text())
    run = _interpreter_run(Path(artifact), layout["input"], layout["outputs"], threads, layout["batch_resizable"])
    calls = "resized batches" if layout["batch_resizable"] else "one image per call"
    return run, f"CPU (LiteRT {version('ai-edge-litert')} XNNPACK, {threads or 'default'} threads, {calls})"
