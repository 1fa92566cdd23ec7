"""Accuracy and latency of an exported ONNX file on ONNX Runtime's providers, measured honestly.

Accuracy: labels are matched to model outputs by class *name*. Latency: warm-up runs, then timed runs per batch
size (p50/p90/p99 and images/s); on CUDA inputs and outputs are bound to the device (IO binding), so the
figures are the model's, not host copies'.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from cifarx import data as datamod
from cifarx.errors import CifarxError
from cifarx.onnxfile import create_session, model_info


def load_eval_images(data: str, split: str, info: dict, data_root: str | None = None,
                     val_size: int | None = None, seed: int | None = None) -> datamod.ImageSet:
    """The images to score: the data's test split, or the model's own validation split re-carved from train."""
    if split == "test":
        return datamod.load_split(data, "test", data_root)
    if split != "val":
        raise CifarxError(f"unknown split {split!r}; use test or val")
    recorded = _json_meta(info, "val_split") or {}
    val_size = val_size if val_size is not None else recorded.get("val_size") or 5000
    seed = seed if seed is not None else recorded.get("seed") or 0
    full = datamod.load_split(data, "train", data_root)
    _, index = datamod.stratified_split(full.labels, val_size, seed)
    return full.subset(index)


def _json_meta(info: dict, key: str):
    import json

    try:
        return json.loads(info["metadata"].get(key, "null"))
    except ValueError:
        return None


def predict_logits(session, info: dict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 [N,3,32,32] images, batch by batch."""
    dtype = np.float16 if info["input_dtype"] == "float16" else np.float32
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(dtype) / dtype(255)
        outputs.append(session.run([info["output_names"][0]], {info["input_name"]: batch})[0].astype(np.float32))
    return np.concatenate(outputs)


def score(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    predicted = logits.argmax(1)
    classes = len(class_names)
    confusion = np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    support = confusion.sum(1)
    per_class = {name: float(confusion[i, i] / support[i]) for i, name in enumerate(class_names) if support[i]}
    return {"accuracy": float((predicted == labels).mean()), "per_class": per_class, "confusion_matrix": confusion.tolist()}


def measure_latency(session, info: dict, images: np.ndarray, batch_sizes: list[int], provider: str,
                    warmup: int = 5, repeats: int = 30, device_id: int = 0) -> dict:
    """Per batch size: p50/p90/p99 latency in ms and images/s over `repeats` timed runs after `warmup` runs."""
    import onnxruntime as ort

    dtype = np.float16 if info["input_dtype"] == "float16" else np.float32
    results = {}
    for batch_size in batch_sizes:
        index = np.arange(batch_size) % len(images)
        batch = np.ascontiguousarray(images[index].astype(dtype) / dtype(255))
        if provider in ("cuda", "tensorrt"):
            binding = session.io_binding()
            binding.bind_ortvalue_input(info["input_name"], ort.OrtValue.ortvalue_from_numpy(batch, "cuda", device_id))
            for name in info["output_names"]:
                binding.bind_output(name, "cuda", device_id)

            def run():
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
        else:
            feed = {info["input_name"]: batch}

            def run():
                session.run(info["output_names"], feed)

        for _ in range(warmup):
            run()
        times = np.empty(repeats)
        for i in range(repeats):
            start = time.perf_counter()
            run()
            times[i] = time.perf_counter() - start
        results[str(batch_size)] = latency_stats(times, batch_size)
    return results


def latency_stats(seconds: np.ndarray, batch_size: int) -> dict:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1000
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
            "images_per_s": round(batch_size / float(np.median(seconds)), 1), "runs": len(seconds)}


def environment(session=None) -> dict:
    """Where the numbers were measured: CPU, cores, ONNX Runtime version, available and active providers."""
    import os

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
           "providers_available": ort.get_available_providers(), "python": platform.python_version()}
    if session is not None:
        env["providers_active"] = session.get_providers()
    return env


def evaluate_onnx(model_path: str | Path, *, data: str | None, split: str = "test", provider: str = "cpu",
                  batch_sizes: list[int] = (1, 64), threads: int | None = None, graph_optimization: str = "all",
                  warmup: int = 5, repeats: int = 30, device_id: int = 0, data_root: str | None = None,
                  val_size: int | None = None, seed: int | None = None, cudnn_conv_algo_search: str | None = None) -> dict:
    """Accuracy (when `data` is given) and latency of an ONNX file on one provider; a JSON-ready dict."""
    session = create_session(model_path, provider, threads=threads, graph_optimization=graph_optimization,
                             device_id=device_id, cudnn_conv_algo_search=cudnn_conv_algo_search)
    info = model_info(session)
    result: dict = {"model": str(model_path), "provider": session.get_providers()[0], "class_names": info["class_names"]}
    if data is not None:
        image_set = load_eval_images(data, split, info, data_root, val_size, seed)
        to_model = datamod.class_index(info["class_names"], image_set.class_names).numpy()
        images = image_set.images.numpy()
        logits = predict_logits(session, info, images)
        result.update({"split": split, "images": len(images)})
        result.update(score(logits, to_model[image_set.labels.numpy()], info["class_names"]))
    else:
        images = np.random.default_rng(0).integers(0, 256, size=(max(batch_sizes), 3, 32, 32), dtype=np.uint8)
    result["latency"] = measure_latency(session, info, images, list(batch_sizes), provider, warmup, repeats, device_id)
    result["environment"] = environment(session)
    result["graph_optimization"] = graph_optimization
    result["threads"] = threads
    return result


def save_confusion_png(result: dict, path: str | Path) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifarx.io import atomic_savefig

    matrix = np.array(result["confusion_matrix"])
    names = result["class_names"]
    figure, axis = plt.subplots(figsize=(7, 6))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", fontsize=7,
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set(xlabel="predicted", ylabel="true", title=f"{Path(result['model']).name}: top-1 {result['accuracy']:.2%}")
    atomic_savefig(figure, path)
    plt.close(figure)
