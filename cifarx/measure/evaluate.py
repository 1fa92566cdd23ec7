"""Accuracy and latency of an exported ONNX file on ONNX Runtime's providers, measured honestly.

Accuracy: labels are matched to model outputs by class *name*. Latency: warm-up runs, then timed runs per batch
size (p50/p90/p99 and images/s); on CUDA inputs and outputs are bound to the device (IO binding), so the
figures are the model's, not host copies'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarx.data import datasets as datamod
from cifarx.data.split import calibration_images, load_eval_images
from cifarx.errors import CifarxError
from cifarx.io import file_sha256
from cifarx.runtimes.child import run_in_child
from cifarx.runtimes.measuring import (batched_outputs, compare_outputs, environment, float_batch, input_dtype,
                                       latency_stats, measure_latency, predict_logits, score, session_runner,
                                       timed_runs, to_model_input)
from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split
from cifarx.runtimes.table import CALIBRATION_IMAGES, REFERENCE, RUNTIMES, quantises, require, torch_device


def measure_torch_latency(model, images: np.ndarray, batch_sizes: list[int], warmup: int = 5, repeats: int = 30,
                          device: str = "cpu") -> dict:
    """PyTorch eager on the same batches as `measure_latency`, same statistics (thread count is the caller's)."""
    import torch

    results = {}
    model = model.to(device)
    with torch.inference_mode():
        for batch_size in batch_sizes:
            batch = torch.from_numpy(float_batch(images, batch_size)).to(device)
            if device.startswith("cuda"):
                def run():
                    model(batch)
                    torch.cuda.synchronize(device)
            else:
                def run():
                    model(batch)

            results[str(batch_size)] = latency_stats(timed_runs(run, warmup, repeats), batch_size)
    return results


def torch_logits(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """PyTorch logits for uint8 [N,3,32,32] images, fed exactly as `predict_logits` feeds ONNX Runtime."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(to_model_input(images[start : start + batch_size]))
            outputs.append(model(batch.to(device)).float().cpu().numpy())
    return np.concatenate(outputs)


def load_torch_reference(run: str | Path, info: dict):
    """The PyTorch model an ONNX file was exported from, refusing a checkpoint whose hash is not the recorded one."""
    from cifarx.io import file_sha256
    from cifarx.training.checkpoint import load_model, resolve_checkpoint
    from cifarx.models.common import TestTimeAugmentation

    checkpoint = resolve_checkpoint(run)
    recorded = info["metadata"].get("checkpoint_sha256")
    if recorded and file_sha256(checkpoint) != recorded:
        raise CifarxError(f"{checkpoint} is not the checkpoint this ONNX file was exported from (sha256 differs from "
                          "its metadata); pass the exported checkpoint file to --compare-torch")
    model, _ = load_model(checkpoint)
    tta = info["metadata"].get("tta", "none")
    return TestTimeAugmentation(model, tta).eval() if tta != "none" else model


def check_batch_sizes_fit(batch_sizes: list[int]) -> None:
    """Refuse, before any work, a batch whose float32 input alone would take half of this machine's memory."""
    import os

    largest = max(batch_sizes)
    needed = largest * 3 * 32 * 32 * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory / 2:
        raise CifarxError(f"--batch-sizes {largest}: its input alone takes {needed / 1e9:.1f} GB, more than half of this "
                          f"machine's {memory / 1e9:.1f} GB of memory")


def evaluate_onnx(model_path: str | Path, *, data: str | None, split: str = "test", provider: str = "cpu",
                  batch_sizes: list[int] = (1, 64), threads: int | list[int] | None = None, graph_optimization: str = "all",
                  warmup: int = 5, repeats: int = 30, device_id: int = 0, data_root: str | None = None,
                  val_size: int | None = None, seed: int | None = None, cudnn_conv_algo_search: str | None = None,
                  compare_torch: str | Path | None = None, parity_images: int = 1024, runtime: str = REFERENCE) -> dict:
    """Accuracy (when `data` is given) and latency of an ONNX file on one provider; a JSON-ready dict.

    Another `runtime` than ONNX Runtime goes to `evaluate_on_runtime` (its CPU device, one thread count).

    `threads` may list several intra-op thread counts: `latency` is measured at the first, `latency_by_threads` at
    each. `compare_torch` (the run folder or checkpoint that was exported) adds PyTorch eager on the same batches
    with the same thread counts (`torch_latency`) and the agreement of its logits with ONNX Runtime's (`parity`).
    """
    check_batch_sizes_fit(batch_sizes)
    thread_counts = list(dict.fromkeys([threads] if threads is None or isinstance(threads, int) else threads))
    if runtime != REFERENCE:
        require(runtime)
        if provider != "cpu" or compare_torch is not None or len(thread_counts) > 1 or graph_optimization != "all":
            raise CifarxError(f"--provider, --compare-torch, --graph-optimization and a --threads list are ONNX Runtime's; "
                              f"{runtime} runs on its CPU device at one thread count")
        return evaluate_on_runtime(model_path, runtime, data=data, split=split, batch_sizes=batch_sizes,
                                   threads=thread_counts[0], warmup=warmup, repeats=repeats, data_root=data_root,
                                   val_size=val_size, seed=seed)
    if compare_torch is not None and thread_counts == [None]:
        import torch

        # ORT's default (physical cores) and torch's need not agree: pin both to torch's, so neither gets more cores.
        thread_counts = [torch.get_num_threads()]

    def open_session(count):
        return create_session(model_path, provider, threads=count, graph_optimization=graph_optimization,
                              device_id=device_id, cudnn_conv_algo_search=cudnn_conv_algo_search)

    session = open_session(thread_counts[0])
    info = model_info(session)
    # the file's digest: what `cifarx report` attaches this result by (a file name says nothing about its content)
    result: dict = {"model": str(model_path), "model_sha256": file_sha256(model_path), "provider": session.get_providers()[0], "class_names": info["class_names"]}
    logits = None
    images, labels = eval_images(info, data, split, list(batch_sizes), data_root, val_size, seed)
    if labels is not None:
        logits = predict_logits(session, info, images)
        broken = int((~np.isfinite(logits).all(axis=1)).sum())
        if broken:  # argmax of NaN logits is class 0: that would be scored as 1/classes accuracy
            raise CifarxError(f"{model_path} gave non-finite outputs (NaN or inf) for {broken} of {len(images)} images")
        result.update({"split": split, "images": len(images)})
        result.update(score(logits, labels, info["class_names"]))
    latency_by_threads = {}
    for count in thread_counts:
        timed = session if count == thread_counts[0] else open_session(count)
        latency_by_threads[str(count)] = measure_latency(timed, info, images, list(batch_sizes), provider, warmup, repeats, device_id)
    result["latency"] = latency_by_threads[str(thread_counts[0])]
    if len(thread_counts) > 1:
        result["latency_by_threads"] = latency_by_threads
    if compare_torch is not None:
        parity_set = images[:parity_images]
        onnx_logits = logits[:parity_images] if logits is not None else predict_logits(session, info, parity_set)
        result.update(compare_with_torch(compare_torch, info, parity_set, onnx_logits, images, list(batch_sizes),
                                         thread_counts, provider, warmup, repeats, device_id))
    result["environment"] = environment(session, device_id)
    result.update(runtime=REFERENCE, runtime_version=result["environment"]["onnxruntime"],
                  device=f"{result['provider']} ({result['environment'].get('gpu', {}).get('name') or result['environment']['cpu']})")
    result["graph_optimization"] = graph_optimization
    result["threads"] = thread_counts[0]
    return result


def eval_images(info: dict, data: str | None, split: str, batch_sizes: list[int], data_root: str | None = None,
                val_size: int | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images and labels (as the model's class indices) to measure on; random pixels and no labels without data."""
    if data is None:
        count = max(64, *batch_sizes)  # enough random images that agreement between runtimes means something
        return np.random.default_rng(0).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8), None
    image_set = load_eval_images(data, split, recorded_val_split(info), data_root, val_size, seed)
    to_model = datamod.class_index(info["class_names"], image_set.class_names).numpy()
    return image_set.images.numpy(), to_model[image_set.labels.numpy()]


def model_calibration(runtime: str, info: dict, data: str | None, data_root: str | None = None,
                      count: int = CALIBRATION_IMAGES) -> np.ndarray | None:
    """The calibration images an int8 row's quantiser needs for this model (None for other rows): `count` training
    images of `data` outside the model's validation split."""
    if not quantises(runtime):
        return None
    if data is None:
        raise CifarxError(f"{runtime} quantises the model on training images: give --data")
    return calibration_images(data, recorded_val_split(info), count, data_root)


def reference_outputs(session, info: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of ONNX Runtime on `images`: the reference every other runtime is compared with."""
    return batched_outputs(session_runner(session, info), images, input_dtype(info))


def measure_runtime(runtime: str, model_path: str | Path, session, info: dict, images: np.ndarray,
                    reference: tuple[np.ndarray, np.ndarray], batch_sizes: list[int], threads: int | None = None,
                    warmup: int = 5, repeats: int = 30, timeout: float | None = None,
                    calibration: np.ndarray | None = None) -> dict:
    """One runtime (a row of the table) on one file: version, device, agreement with `reference` (ORT CPU's outputs)
    and latency; `logits` is included for scoring (not JSON-ready). An int8 row quantises on `calibration`.

    ONNX Runtime rows run here (the CPU row on `session`, the reference; a GPU provider that cannot be created is a
    failed row); the others convert and run in a child process, whose crash gives `{"failed": "killed by signal 11
    (SIGSEGV)", ...}`."""
    import tempfile

    row = RUNTIMES[runtime]
    if row.adapter is None:
        if row.provider != "cpu":
            try:
                session = create_session(model_path, row.provider, threads=threads)
            except CifarxError as error:
                return {"runtime": runtime, "version": environment()["onnxruntime"], "failed": str(error)}
        env = environment(session)
        outputs = reference if row.provider == "cpu" else reference_outputs(session, info, images)
        measured = {"runtime": runtime, "version": env["onnxruntime"], "threads": threads,
                    "device": f"{session.get_providers()[0]} ({env.get('gpu', {}).get('name') or env['cpu']})",
                    "logits": outputs[0], "probabilities": outputs[1],
                    "latency": measure_latency(session, info, images, batch_sizes, row.provider, warmup, repeats)}
    else:
        extra = {} if timeout is None else {"timeout": timeout}
        with tempfile.TemporaryDirectory(prefix="cifarx-convert-") as out_dir:
            measured = run_in_child(runtime, model_path, images, batch_sizes, out_dir=out_dir, threads=threads,
                                    warmup=warmup, repeats=repeats, dtype=input_dtype(info), calibration=calibration,
                                    **extra)
        if "failed" in measured:
            return measured
    measured["agreement"] = compare_outputs(reference, (measured["logits"], measured.pop("probabilities")))
    return measured


def evaluate_on_runtime(model_path: str | Path, runtime: str, *, data: str | None, split: str = "test",
                        batch_sizes: list[int] = (1, 64), threads: int | None = None, warmup: int = 5, repeats: int = 30,
                        data_root: str | None = None, val_size: int | None = None, seed: int | None = None) -> dict:
    """`evaluate_onnx` on another runtime of the table, with agreement with ONNX Runtime CPU; a failed (crashed,
    refused) runtime gives a result with `failed` and no figures."""
    session = create_session(model_path, "cpu", threads=threads)
    info = model_info(session)
    images, labels = eval_images(info, data, split, list(batch_sizes), data_root, val_size, seed)
    measured = measure_runtime(runtime, model_path, session, info, images, reference_outputs(session, info, images),
                               list(batch_sizes), threads, warmup, repeats,
                               calibration=model_calibration(runtime, info, data, data_root))
    result = {"model": str(model_path), "model_sha256": file_sha256(model_path), "runtime": runtime, "runtime_version": measured["version"],
              "device": measured.get("device"), "class_names": info["class_names"], "threads": threads}
    if "failed" in measured:
        result["failed"] = measured["failed"]
    else:
        if labels is not None:
            result.update({"split": split, "images": len(images)})
            result.update(score(measured["logits"], labels, info["class_names"]))
        result.update(latency=measured["latency"], agreement=measured["agreement"])
    result["environment"] = environment(session)
    return result


def compare_with_torch(run: str | Path, info: dict, parity_set: np.ndarray, onnx_logits: np.ndarray, images: np.ndarray,
                       batch_sizes: list[int], thread_counts: list[int], provider: str, warmup: int, repeats: int,
                       device_id: int = 0) -> dict:
    """PyTorch eager timings at each thread count and its logits against ONNX Runtime's, for `evaluate_onnx`."""
    import torch

    model = load_torch_reference(run, info)
    device = torch_device(provider, device_id)
    if device != "cpu" and not torch.cuda.is_available():
        raise CifarxError(f"--compare-torch on {provider} needs PyTorch with CUDA; this PyTorch has no usable GPU")
    previous = torch.get_num_threads()
    by_threads = {}
    try:
        for count in thread_counts:
            torch.set_num_threads(count)
            by_threads[str(count)] = measure_torch_latency(model, images, batch_sizes, warmup, repeats, device)
        torch.set_num_threads(thread_counts[0])
        reference = torch_logits(model, parity_set, device=device)
    finally:
        torch.set_num_threads(previous)
    comparison = {
        "torch_latency": by_threads[str(thread_counts[0])],
        "parity": compare_outputs(reference, onnx_logits),
        "torch": {"version": torch.__version__, "device": device, "threads": thread_counts[0],
                  "same_threads_as_onnxruntime": True, "mode": "eager, inference_mode, float32"},
    }
    if len(thread_counts) > 1:
        comparison["torch_latency_by_threads"] = by_threads
    return comparison


def save_latency_png(result: dict, path: str | Path) -> None:
    """p50 latency and images/s against batch size, per runtime and thread count, written atomically."""
    import matplotlib
    import matplotlib.pyplot as plt  # the backend is chosen where the process starts (cifarx.process: Agg)

    from cifarx.io import atomic_savefig

    series = []
    name = (f"ONNX Runtime {result['provider'].removesuffix('ExecutionProvider')}" if "provider" in result
            else f"{result['runtime']} {result['runtime_version']}")
    for runtime, key, label in (("onnx", "latency", name),
                                ("torch", "torch_latency", "PyTorch eager")):
        if key in result:
            by_threads = result.get(f"{key}_by_threads") or {str(result.get("threads")): result[key]}
            series += [(f"{label}, {threads} threads" if threads != "None" else label, runtime, sweep)
                       for threads, sweep in by_threads.items()]
    figure, (latency_axis, throughput_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, runtime, sweep in series:
        batches = sorted(sweep, key=int)
        style = "-o" if runtime == "onnx" else "--s"
        latency_axis.plot([int(b) for b in batches], [sweep[b]["p50_ms"] for b in batches], style, label=label)
        throughput_axis.plot([int(b) for b in batches], [sweep[b]["images_per_s"] for b in batches], style, label=label)
    for axis, ylabel in ((latency_axis, "p50 latency per batch (ms)"), (throughput_axis, "images / s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({int(b) for _, _, sweep in series for b in sweep}))
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_yscale("log")
        axis.set(xlabel="batch size", ylabel=ylabel)
        axis.grid(True, which="both", alpha=0.3)
    throughput_axis.legend(fontsize=8)
    where = result["environment"].get("gpu", {}).get("name") or result["environment"]["cpu"]
    figure.suptitle(f"{Path(result['model']).name} on {where}", fontsize=9)
    atomic_savefig(figure, path)
    plt.close(figure)


def save_confusion_png(result: dict, path: str | Path) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted), written atomically."""
    import matplotlib.pyplot as plt  # the backend is chosen where the process starts (cifarx.process: Agg)

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
