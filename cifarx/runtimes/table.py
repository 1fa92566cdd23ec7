"""The runtimes and providers cifarx measures on: one vocabulary, and runtimes other than ONNX Runtime in a child.

ONNX Runtime (cifarx's own runtime, the reference) runs in the calling process on one of its providers. OpenVINO
and OpenCV DNN are what applications embed instead; each optional (a pip extra), each run in a child process, so
a runtime that crashes on a file (OpenCV 5.0 segfaulted on `fast.onnx`'s GELU) gives a failed row with its
signal instead of taking cifarx down. Torch-free, like `onnxfile`: numpy and the runtime only.
"""

from __future__ import annotations

import importlib.util
import signal
import time
from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError

# ONNX Runtime providers, by the name the CLI takes; the first is the CPU reference every runtime is compared with.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("cuda", "tensorrt")
REFERENCE = "onnxruntime"
# runtime -> (module it imports, cifarx extra that installs it); ONNX Runtime is a dependency of cifarx itself.
RUNTIMES = {REFERENCE: ("onnxruntime", None), "openvino": ("openvino", "openvino"), "opencv": ("cv2", "opencv")}
CHILD_TIMEOUT_S = 3600  # a runtime that hangs (rather than crashes) is reported after this long


def is_gpu(provider: str) -> bool:
    """Whether an ONNX Runtime provider name (`cpu`, `cuda`, `tensorrt`) runs on the GPU."""
    return provider in GPU_PROVIDERS


def torch_device(provider: str, device_id: int = 0) -> str:
    """The PyTorch device that runs where `provider` runs, for side-by-side timings."""
    return f"cuda:{device_id}" if is_gpu(provider) else "cpu"


def parse_runtimes(text: str) -> list[str]:
    """A comma list of runtime names, checked against the vocabulary (installed or not)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise CifarxError(f"unknown runtime {', '.join(unknown) or repr(text)}; choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def missing(runtime: str) -> str | None:
    """None if `runtime` is installed, else the one line that says how to install it."""
    module, extra = RUNTIMES[runtime]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{runtime} is not installed: pip install 'cifarx[{extra}]'" if extra else f"{runtime} is not installed"


def require(runtime: str) -> None:
    """Refuse, in one line naming the extra to install, a runtime that is unknown or not installed."""
    parse_runtimes(runtime)
    message = missing(runtime)
    if message:
        raise CifarxError(message)


# ---------------------------------------------------------------------------------------------- measuring


def float_batch(images: np.ndarray, batch_size: int, dtype=np.float32) -> np.ndarray:
    """`batch_size` of the uint8 images (cycled if there are fewer) as contiguous floats in [0,1]."""
    index = np.arange(batch_size) % len(images)
    return np.ascontiguousarray(images[index].astype(dtype) / dtype(255))


def timed_runs(run, warmup: int, repeats: int) -> np.ndarray:
    """Seconds taken by each of `repeats` calls of `run()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run()
        times[i] = time.perf_counter() - start
    return times


def latency_stats(seconds: np.ndarray, batch_size: int) -> dict:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1000
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
            "images_per_s": round(batch_size / float(np.median(seconds)), 1), "runs": len(seconds)}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def batched_outputs(run, images: np.ndarray, dtype=np.float32, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) for uint8 [N,3,32,32] images; `run(batch)` returns the model's outputs in file order.

    Probabilities are the file's own second output when it has one (so a runtime's Softmax is checked too)."""
    logits, probabilities = [], []
    for start in range(0, len(images), batch_size):
        outputs = run(images[start : start + batch_size].astype(dtype) / dtype(255))
        logits.append(np.asarray(outputs[0], dtype=np.float32))
        probabilities.append(np.asarray(outputs[1], dtype=np.float32) if len(outputs) > 1 else softmax(logits[-1]))
    return np.concatenate(logits), np.concatenate(probabilities)


def agreement(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far a runtime's (logits, probabilities) are from the ONNX Runtime CPU reference on the same images."""
    return {"images": len(reference[0]),
            "top1_agreement": float((reference[0].argmax(1) == candidate[0].argmax(1)).mean()),
            "max_abs_probability_delta": float(np.abs(reference[1] - candidate[1]).max()),
            "max_abs_logit_delta": float(np.abs(reference[0] - candidate[0]).max())}


def _open_openvino(path: Path, threads: int | None):
    import openvino as ov

    core = ov.Core()
    # f32 asked for explicitly: on CPUs with bf16/AMX units OpenVINO would otherwise pick a lower precision itself.
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(batch):
        result = request.infer({0: batch})
        return [result[output] for output in outputs]

    devices = ", ".join(compiled.get_property("EXECUTION_DEVICES"))
    device = (f"{devices} ({core.get_property('CPU', 'FULL_DEVICE_NAME')}), precision "
              f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}, "
              f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads")
    return run, device


def _open_opencv(path: Path, threads: int | None):
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if threads:
        cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(str(path))  # engine auto: the new graph engine, the classic one as its fallback
    names = list(net.getUnconnectedOutLayersNames())  # the new engine refuses a forward() that asks for fewer outputs

    def run(batch):
        net.setInput(batch)
        return net.forward(names)

    return run, f"CPU (OpenCV DNN, {cv2.getNumThreads()} threads)"


OPENERS = {"openvino": _open_openvino, "opencv": _open_opencv}


def _measure_here(opener, runtime: str, path: str, images: np.ndarray, batch_sizes: list[int], threads: int | None,
                  warmup: int, repeats: int, dtype: str) -> dict:
    """Outputs on `images` and latency per batch size on one foreign runtime (`opener` loads the file), here."""
    run, device = opener(Path(path), threads)
    dtype = np.dtype(dtype).type
    logits, probabilities = batched_outputs(run, images, dtype)
    latency = {}
    for batch_size in batch_sizes:
        batch = float_batch(images, batch_size, dtype)
        latency[str(batch_size)] = latency_stats(timed_runs(lambda: run(batch), warmup, repeats), batch_size)
    return {"runtime": runtime, "version": version(runtime), "device": device, "threads": threads,
            "logits": logits, "probabilities": probabilities, "latency": latency}


def _pack(arrays: dict[str, np.ndarray], fields: dict) -> bytes:
    """Arrays plus a JSON dict as one .npz, the child channel's format both ways (numbers only, never pickles)."""
    import io
    import json

    buffer = io.BytesIO()
    np.savez(buffer, fields=np.array(json.dumps(fields)), **arrays)
    return buffer.getvalue()


def _unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    import io
    import json

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files if name != "fields"}, json.loads(str(archive["fields"]))


def serve_child() -> None:
    """The child's side of `measure_in_child`: the request (.npz) on stdin, the result (.npz) on stdout."""
    import importlib
    import os
    import sys

    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the runtime prints goes to stderr, never into the answer
    arrays, request = _unpack(sys.stdin.buffer.read())
    module, name = request.pop("opener").split(":")
    try:
        measured = _measure_here(getattr(importlib.import_module(module), name), images=arrays["images"], **request)
        result = ({"logits": measured.pop("logits"), "probabilities": measured.pop("probabilities")}, measured)
    except Exception as error:  # the runtime's own error, as one line for the row
        text = str(error).strip()
        result = ({}, {"failed": text.splitlines()[-1] if text else type(error).__name__})
    answer.write(_pack(*result))
    answer.close()


def describe_exit(code: int | None, timeout: float = CHILD_TIMEOUT_S) -> str:
    """`killed by signal 11 (SIGSEGV)` for a negative exit code, `exited with code N` otherwise."""
    if code is None:
        return f"no answer within {timeout:g} s (killed)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


def measure_in_child(runtime: str, path: str | Path, images: np.ndarray, batch_sizes: list[int], *,
                     threads: int | None = None, warmup: int = 5, repeats: int = 30, dtype=np.float32,
                     timeout: float = CHILD_TIMEOUT_S) -> dict:
    """`_measure_here` in a fresh child process; a crash, a hang or a runtime error gives `{"failed": why}`."""
    import os
    import subprocess
    import sys

    require(runtime)
    if runtime not in OPENERS:
        raise CifarxError(f"{runtime} runs in the calling process, not in a child")
    # A fresh interpreter, not multiprocessing: nothing of the parent's threads or sessions is copied, and the
    # caller's main script is not re-imported (multiprocessing's spawn would run an unguarded script again).
    search_path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)  # the same cifarx, and the opener's module
    opener = OPENERS[runtime]
    request = {"opener": f"{opener.__module__}:{opener.__qualname__}", "runtime": runtime, "path": str(path),
               "batch_sizes": list(batch_sizes), "threads": threads, "warmup": warmup, "repeats": repeats,
               "dtype": np.dtype(dtype).name}
    child = subprocess.Popen([sys.executable, "-c", "from cifarx.runtimes import serve_child; serve_child()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": search_path})
    try:
        answer, _ = child.communicate(_pack({"images": images}, request), timeout=timeout)
        code = child.returncode
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        answer, code = b"", None
    if code != 0:
        result = {"failed": describe_exit(code, timeout)}
    else:
        try:
            arrays, result = _unpack(answer)
        except (OSError, ValueError, KeyError):
            arrays, result = {}, {"failed": "gave an unreadable answer"}
        result.update(arrays)
    if "failed" in result:
        result.update({"runtime": runtime, "version": version(runtime)})
    return result


def version(runtime: str) -> str | None:
    """The installed version of a runtime's package (without importing it), or None."""
    from importlib.metadata import packages_distributions
    from importlib.metadata import version as package_version

    packages = packages_distributions().get(RUNTIMES[runtime][0], [])
    return package_version(packages[0]) if packages else None
