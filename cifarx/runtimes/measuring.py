"""The measurement core every command uses: pixels in, outputs compared, time measured, machine named.

One preprocessing step (uint8 pixels -> floats in [0,1]), one batched-inference loop for any runtime's `run`, one
comparison of two runtimes' outputs, one latency loop and its statistics, one accuracy score, one description of
the machine. Torch-free: numpy, and ONNX Runtime where a session is timed.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from cifarx.errors import CifarxError
from cifarx.runtimes.table import PROVIDERS, is_gpu


def to_model_input(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 [N,3,32,32] pixels as the exported graphs take them: floats in [0,1] (normalisation is inside)."""
    return images.astype(dtype) / dtype(255)


def input_dtype(info: dict):
    """The numpy type of a file's input (float16 files exist: `cifarx export --fp16`); any other than float32 or
    float16 is refused: images in [0,1] cast to float64 or uint8 would give a silently wrong answer."""
    if info["input_dtype"] not in ("float32", "float16"):
        raise CifarxError(f"the model's input is {info['input_dtype']}: cifarx feeds images as float32 in [0, 1] (float16 "
                          "for --fp16 exports); export it with cifarx export")
    return np.float16 if info["input_dtype"] == "float16" else np.float32


def float_batch(images: np.ndarray, batch_size: int, dtype=np.float32) -> np.ndarray:
    """`batch_size` of the uint8 images (cycled if there are fewer) as contiguous floats in [0,1]."""
    index = np.arange(batch_size) % len(images)
    return np.ascontiguousarray(to_model_input(images[index], dtype))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def session_runner(session, info: dict):
    """`run(batch) -> outputs in file order` for an ONNX Runtime session, the shape every runtime's adapter has."""
    return lambda batch: session.run(info["output_names"], {info["input_name"]: batch})


def batched_outputs(run, images: np.ndarray, dtype=np.float32, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) for uint8 [N,3,32,32] images; `run(batch)` returns the model's outputs in file order.

    Probabilities are the file's own second output when it has one (so a runtime's Softmax is checked too)."""
    logits, probabilities = [], []
    for start in range(0, len(images), batch_size):
        outputs = run(to_model_input(images[start : start + batch_size], dtype))
        logits.append(np.asarray(outputs[0], dtype=np.float32))
        probabilities.append(np.asarray(outputs[1], dtype=np.float32) if len(outputs) > 1 else softmax(logits[-1]))
    return np.concatenate(logits), np.concatenate(probabilities)


def predict_logits(session, info: dict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """ONNX Runtime's logits for uint8 [N,3,32,32] images, batch by batch."""
    run = lambda batch: session.run(info["output_names"][:1], {info["input_name"]: batch})  # noqa: E731
    return batched_outputs(run, images, input_dtype(info), batch_size)[0]


def compare_outputs(reference: np.ndarray | tuple[np.ndarray, np.ndarray],
                    candidate: np.ndarray | tuple[np.ndarray, np.ndarray]) -> dict:
    """How far a candidate's outputs are from a reference's on the same images: top-1 agreement, max |delta p|,
    max |delta logit| and the reference's largest |logit| (the scale a logit tolerance is relative to).

    Each side is logits, or (logits, probabilities) when a runtime's own softmax output is to be checked."""
    reference_logits, reference_p = reference if isinstance(reference, tuple) else (reference, softmax(reference))
    candidate_logits, candidate_p = candidate if isinstance(candidate, tuple) else (candidate, softmax(candidate))
    reference_logits = np.asarray(reference_logits, dtype=np.float32)
    candidate_logits = np.asarray(candidate_logits, dtype=np.float32)
    return {"images": len(reference_logits),
            "top1_agreement": float((reference_logits.argmax(1) == candidate_logits.argmax(1)).mean()),
            "max_abs_probability_delta": float(np.abs(np.asarray(reference_p) - np.asarray(candidate_p)).max()),
            "max_abs_logit_delta": float(np.abs(reference_logits - candidate_logits).max()),
            "max_abs_logit": float(np.abs(reference_logits).max())}


def score(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    predicted = logits.argmax(1)
    classes = len(class_names)
    confusion = np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    support = confusion.sum(1)
    per_class = {name: float(confusion[i, i] / support[i]) for i, name in enumerate(class_names) if support[i]}
    return {"accuracy": float((predicted == labels).mean()), "per_class": per_class, "confusion_matrix": confusion.tolist()}


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


def run_latency(run, images: np.ndarray, batch_sizes: list[int], warmup: int, repeats: int, dtype=np.float32) -> dict:
    """Per batch size: latency statistics of `run(batch)` (any runtime's) on the same cycled images."""
    latency = {}
    for batch_size in batch_sizes:
        batch = float_batch(images, batch_size, dtype)
        latency[str(batch_size)] = latency_stats(timed_runs(lambda: run(batch), warmup, repeats), batch_size)
    return latency


def measure_latency(session, info: dict, images: np.ndarray, batch_sizes: list[int], provider: str,
                    warmup: int = 5, repeats: int = 30, device_id: int = 0) -> dict:
    """ONNX Runtime per batch size: p50/p90/p99 ms and images/s; on a GPU inputs and outputs are bound to the
    device (IO binding), so the figures are the model's, not host copies'."""
    if not is_gpu(provider):
        return run_latency(session_runner(session, info), images, batch_sizes, warmup, repeats, input_dtype(info))
    import onnxruntime as ort

    results = {}
    for batch_size in batch_sizes:
        batch = float_batch(images, batch_size, input_dtype(info))
        binding = session.io_binding()
        binding.bind_ortvalue_input(info["input_name"], ort.OrtValue.ortvalue_from_numpy(batch, "cuda", device_id))
        for name in info["output_names"]:
            binding.bind_output(name, "cuda", device_id)

        def run():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        results[str(batch_size)] = latency_stats(timed_runs(run, warmup, repeats), batch_size)
    return results


def environment(session=None, device_id: int = 0) -> dict:
    """Where the numbers were measured: CPU, cores, ONNX Runtime version, available and active providers (and GPU)."""
    import onnxruntime as ort

    from cifarx.process import cpu_description

    cpu = cpu_description()
    env = {"cpu": cpu["cpu"], "isa_flags": cpu["isa_flags"], "cores": cpu["cores"], "onnxruntime": ort.__version__,
           "providers_available": ort.get_available_providers(), "python": platform.python_version()}
    if session is not None:
        env["providers_active"] = session.get_providers()
        if env["providers_active"][0] != PROVIDERS["cpu"]:
            env["gpu"] = gpu_environment(device_id)
    return env
def gpu_environment(device_id: int = 0) -> dict:
    """GPU name, driver, CUDA and cuDNN versions, from whichever of nvidia-smi, PyTorch and the ORT build is present."""
    import shutil
    import subprocess

    from onnxruntime.capi import build_and_package_info

    gpu: dict = {"device_id": device_id, "onnxruntime_cuda": getattr(build_and_package_info, "cuda_version", None),
                 "onnxruntime_cudnn": getattr(build_and_package_info, "cudnn_version", None)}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            line = subprocess.run([smi, f"--id={device_id}", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
            gpu["name"], gpu["driver"] = (part.strip() for part in line.rsplit(",", 1))
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):  # a broken driver must not stop a benchmark
            pass
    try:
        import torch
    except ImportError:
        return gpu
    if torch.cuda.is_available():
        gpu.setdefault("name", torch.cuda.get_device_name(device_id))
        gpu["torch_cuda"] = torch.version.cuda
        gpu["torch_cudnn"] = torch.backends.cudnn.version()
    return gpu


