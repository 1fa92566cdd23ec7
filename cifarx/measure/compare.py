"""Models x runtimes in one matrix: where a file loads, how close it stays to ONNX Runtime, and how fast it runs.

Every runtime sees the same images and batches; ONNX Runtime CPU's outputs on those images are the reference.
A runtime that is not installed, refuses the file or crashes on it gives a row saying so, not an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarx.measure.evaluate import eval_images, measure_runtime, model_calibration, reference_outputs
from cifarx.errors import CifarxError
from cifarx.runtimes.measuring import environment, input_dtype, score
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.runtimes.table import missing, parse_runtimes, quantises


# what a runtime with a converter reports of its conversion (runtimes/child.py)
CONVERSION_FIELDS = ("converter", "converter_version", "convert_seconds", "artifact_bytes")


def precision(info: dict) -> str:
    """int8 for a file written by `cifarx quantize`, else its input type (float32 / float16)."""
    return "int8" if "quantization" in info["metadata"] else info["input_dtype"]


def compare_runtimes(model_paths: list[str | Path], runtimes: list[str], *, batch_sizes: list[int] = (1, 256),
                     data: str | None = None, split: str = "test", image_count: int | None = 1000,
                     data_root: str | None = None, threads: int | None = None, warmup: int = 5,
                     repeats: int = 30, images: np.ndarray | None = None, timeout: float | None = None) -> dict:
    """One row per (model, runtime): status, version, device, accuracy on `data`, agreement and latency; JSON-ready.

    `images` (uint8 [N,3,32,32]) replaces `data` for agreement and latency, without labels (no accuracy).
    `timeout`: seconds a runtime in a child process may take (conversion included) before it is a failed row."""
    runtimes = parse_runtimes(",".join(runtimes))
    sessions = [(Path(path), create_session(path, "cpu", threads=threads)) for path in model_paths]  # all files first
    rows = []
    for path, session in sessions:
        try:  # a file cifarx cannot feed (its metadata, its input type) is one model's failed rows, not the whole run's
            info = model_info(session)
            input_dtype(info)
        except CifarxError as error:
            rows.extend({"model": str(path), "precision": "?", "runtime": runtime, "status": f"failed: {error}"}
                        for runtime in runtimes)
            continue
        measured_on, labels = (images, None) if images is not None else eval_images(info, data, split, list(batch_sizes), data_root)
        if image_count and len(measured_on) > image_count:  # a fixed sample, the same for every runtime
            keep = np.sort(np.random.default_rng(0).permutation(len(measured_on))[:image_count])
            measured_on, labels = measured_on[keep], (labels[keep] if labels is not None else None)
        reference = reference_outputs(session, info, measured_on)
        calibrations = {runtime: model_calibration(runtime, info, data, data_root) for runtime in runtimes
                        if not missing(runtime)}
        for runtime in runtimes:
            row = {"model": str(path), "precision": "int8" if quantises(runtime) else precision(info), "runtime": runtime}
            not_installed = missing(runtime)
            if not_installed:
                rows.append({**row, "status": not_installed})
                continue
            measured = measure_runtime(runtime, path, session, info, measured_on, reference, list(batch_sizes), threads,
                                       warmup, repeats, timeout, calibrations[runtime])
            row.update(version=measured["version"], device=measured.get("device"),
                       **{key: measured[key] for key in CONVERSION_FIELDS if key in measured})
            if "failed" in measured:
                rows.append({**row, "status": f"failed: {measured['failed']}"})
                continue
            row["status"] = "ok"
            if labels is not None:
                row.update(split=split, images=len(measured_on),
                           accuracy=score(measured["logits"], labels, info["class_names"])["accuracy"])
            row.update(agreement=measured["agreement"], latency=measured["latency"])
            rows.append(row)
    return {"rows": rows, "batch_sizes": list(batch_sizes), "threads": threads, "environment": environment()}


def save_compare_png(result: dict, path: str | Path) -> None:
    """p50 latency and images/s against batch size, one line per (model, runtime), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifarx.io import atomic_savefig

    figure, (latency_axis, throughput_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    runtimes = list(dict.fromkeys(row["runtime"] for row in result["rows"]))
    models = list(dict.fromkeys((row["model"], row["precision"]) for row in result["rows"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        batches = sorted(row["latency"], key=int)
        style = {"color": colours[runtimes.index(row["runtime"]) % len(colours)],
                 "marker": markers[models.index((row["model"], row["precision"])) % len(markers)],
                 "label": f"{Path(row['model']).stem} ({row['precision']}) on {row['runtime']}"}
        latency_axis.plot([int(b) for b in batches], [row["latency"][b]["p50_ms"] for b in batches], **style)
        throughput_axis.plot([int(b) for b in batches], [row["latency"][b]["images_per_s"] for b in batches], **style)
    for axis, ylabel in ((latency_axis, "p50 latency per batch (ms)"), (throughput_axis, "images / s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(result["batch_sizes"])
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_yscale("log")
        axis.set(xlabel="batch size", ylabel=ylabel)
        axis.grid(True, which="both", alpha=0.3)
    throughput_axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    threads = result["threads"] or "default"
    figure.suptitle(f"{result['environment']['cpu']}, {threads} threads", fontsize=9)
    figure.tight_layout()
    atomic_savefig(figure, path)
    plt.close(figure)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats on both (faster and at least as accurate)."""
    front, best = [], -float("inf")
    for index in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def accuracy_latency_points(result: dict, batch: str) -> list[dict]:
    """One point per measured (model, runtime): p50 latency at `batch` and accuracy (top-1 agreement with ONNX
    Runtime CPU where no labelled data was given), with `pareto` marking the front."""
    points = [{"model": Path(row["model"]).stem, "precision": row["precision"], "runtime": row["runtime"],
               "latency_ms": row["latency"][batch]["p50_ms"],
               "accuracy": row["accuracy"] if "accuracy" in row else row["agreement"]["top1_agreement"]}
              for row in result["rows"] if row["status"] == "ok" and batch in row["latency"]]
    front = set(pareto_front([(point["latency_ms"], point["accuracy"]) for point in points]))
    return [{**point, "pareto": index in front} for index, point in enumerate(points)]


def save_accuracy_latency_png(result: dict, path: str | Path, batch: int | None = None) -> None:
    """The picture a person choosing a deployment looks at: accuracy against p50 latency, one point per model x
    runtime, the Pareto front joined; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifarx.io import atomic_savefig

    batch = str(batch if batch is not None else min(result["batch_sizes"]))
    points = accuracy_latency_points(result, batch)
    labelled = any("accuracy" in row for row in result["rows"] if row["status"] == "ok")
    figure, axis = plt.subplots(figsize=(8, 5))
    runtimes = list(dict.fromkeys(point["runtime"] for point in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for point in points:
        axis.scatter(point["latency_ms"], 100 * point["accuracy"], color=colours[runtimes.index(point["runtime"]) % len(colours)],
                     marker="*" if point["pareto"] else "o", s=90 if point["pareto"] else 40, zorder=3)
    for model in dict.fromkeys((point["model"], point["precision"]) for point in points):  # one label a model
        fastest = min((p for p in points if (p["model"], p["precision"]) == model), key=lambda p: p["latency_ms"])
        axis.annotate(f"{model[0]} {model[1]}", (fastest["latency_ms"], 100 * fastest["accuracy"]), fontsize=7,
                      xytext=(-4, 6), textcoords="offset points", ha="right")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
    axis.plot([p["latency_ms"] for p in front], [100 * p["accuracy"] for p in front], "k--", lw=0.8, label="Pareto front")
    for index, runtime in enumerate(runtimes):
        axis.scatter([], [], color=colours[index % len(colours)], label=runtime)
    axis.set_xscale("log")
    axis.set(xlabel=f"p50 latency at batch {batch} (ms, log)",
             ylabel="accuracy (%)" if labelled else "top-1 agreement with ONNX Runtime CPU (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    threads = result["threads"] or "default"
    axis.set_title(f"{result['environment']['cpu']}, {threads} threads", fontsize=9)
    figure.tight_layout()
    atomic_savefig(figure, path)
    plt.close(figure)
