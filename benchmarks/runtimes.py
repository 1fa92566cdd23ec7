"""Where to ship: every exported model on every runtime, and why int8 is (or is not) faster, on this machine.

    python benchmarks/runtimes.py --data ~/cifar10-jpeg --threads 2

1. The CPU: model name and the int8-relevant ISA flags (avx512_vnni, avx_vnni, avx512bw, avx2) from /proc/cpuinfo.
2. `exported/fast.onnx` (and `exported/simple-cnn.onnx`) quantised by `cifarx quantize` with the types this CPU
   needs; fp32 against int8 on ONNX Runtime CPU: latency at each batch size, top-1 agreement on real images, and
   ONNX Runtime's profile per op type (nodes and share of node time).
3. The compare matrix (`cifarx compare`): every `exported/*.onnx` plus the int8 files on every runtime, same
   images and threads. Models with a held-out validation split are scored on `--images` images of it; models
   without one (fast: trained on all 50,000) are compared on real training images for agreement only.
4. The fastest runtime per model at each batch size, as a ratio to ONNX Runtime CPU in the same run, and the
   accuracy-latency chart (docs/runtimes-accuracy-latency.png: one point per model x runtime, Pareto front marked).
Writes benchmarks/results/runtimes.json and prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from cifarx.data import datasets as datamod
from cifarx.measure.compare import compare_runtimes, save_accuracy_latency_png
from cifarx.io import atomic_write_json
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.process import cpu_description
from cifarx.deploy.quantize import INT8_ISA, cpu_int8_isa, op_profile, quantize_onnx
from cifarx.runtimes.measuring import batched_outputs, compare_outputs, measure_latency
from cifarx.runtimes.table import RUNTIMES

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> dict:
    cpu = cpu_description()
    return {"cpu": cpu["cpu"], "isa_flags": cpu["isa_flags"], "int8_isa": INT8_ISA.get(cpu_int8_isa())}


def has_val_split(path: Path) -> bool:
    info = model_info(create_session(path))
    return bool((json.loads(info["metadata"].get("val_split", "null") or "null") or {}).get("val_size"))


def int8_report(fp32: Path, int8: Path, images: np.ndarray, batch_sizes: list[int], threads: int, repeats: int) -> dict:
    """fp32 against int8 on ONNX Runtime CPU, in one run: latency, agreement on `images`, per-op profile."""
    sessions = {name: create_session(path, threads=threads) for name, path in (("fp32", fp32), ("int8", int8))}
    infos = {name: model_info(session) for name, session in sessions.items()}
    outputs = {name: batched_outputs(lambda b, s=session, i=infos[name]: s.run(i["output_names"], {i["input_name"]: b}),
                                     images) for name, session in sessions.items()}
    latency = {name: measure_latency(session, infos[name], images, batch_sizes, "cpu", 3, repeats)
               for name, session in sessions.items()}
    return {
        "latency": latency,
        "speedup": {str(b): round(latency["int8"][str(b)]["images_per_s"] / latency["fp32"][str(b)]["images_per_s"], 3)
                    for b in batch_sizes},
        "agreement": compare_outputs(outputs["fp32"], outputs["int8"]),
        "op_profile": {name: op_profile(path, images, max(batch_sizes), threads) for name, path in (("fp32", fp32), ("int8", int8))},
        "quantization": json.loads(infos["int8"]["metadata"]["quantization"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder with train/<class>/ (real images)")
    parser.add_argument("--models", nargs="*", type=Path,  # smallest first: a time-boxed run measures the most models
                        default=sorted((ROOT / "exported").glob("*.onnx"), key=lambda path: path.stat().st_size))
    parser.add_argument("--int8", nargs="*", default=[], help="model stems to quantise with ONNX Runtime and add")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list (default: every row of the table)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per runtime and model, conversion included")
    parser.add_argument("--parts", type=Path, default=ROOT / "benchmarks/results/runtime-matrix",
                        help="one JSON per model, kept: a rerun measures only the models not there yet")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/runtimes.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs/runtimes-accuracy-latency.png")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = {"command": shlex.join(["python", "benchmarks/runtimes.py", *sys.argv[1:]]), **cpu_flags()}
    train = datamod.load_split(args.data, "train")
    sample = np.sort(np.random.default_rng(0).permutation(len(train))[: args.images])
    training_images = train.images[sample].numpy()
    common = {"batch_sizes": batch_sizes, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "timeout": args.timeout}
    args.parts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        int8_files, result["int8"] = [], {}
        for stem in args.int8:
            fp32 = next(path for path in args.models if path.stem == stem)
            int8 = Path(folder) / f"{stem}.int8.onnx"
            result["int8"][stem] = {"quantize": quantize_onnx(fp32, int8, data=args.data)}
            result["int8"][stem].update(int8_report(fp32, int8, training_images, batch_sizes, args.threads, args.repeats))
            int8_files.append(int8)
            print(f"int8 {stem}: speedup {result['int8'][stem]['speedup']}", flush=True)
        for path in [*args.models, *int8_files]:
            part = args.parts / f"{path.name}.json"
            if part.is_file():
                continue
            if has_val_split(path):
                measured = compare_runtimes([path], args.runtimes.split(","), data=args.data, split="val",
                                            image_count=args.images, **common)
            else:  # agreement on real (training) images: no accuracy for a model that saw them all
                measured = compare_runtimes([path], args.runtimes.split(","), images=training_images,
                                            image_count=None, **common)
            atomic_write_json(part, measured)
            print(f"{path.name}: " + ", ".join(f"{row['runtime']} {row['status'][:40]}" for row in measured["rows"]),
                  flush=True)
    parts = [json.loads(path.read_text()) for path in sorted(args.parts.glob("*.json"))]
    rows = [row for part in parts for row in part["rows"]]
    save_accuracy_latency_png({**parts[0], "rows": [row for row in rows if "accuracy" in row]}, args.chart)
    for row in rows:
        row["model"] = Path(row["model"]).name
    result.update(compare=rows, environment=parts[0]["environment"], fastest=fastest_per_model(rows, batch_sizes))
    atomic_write_json(args.out, result)
    print_markdown(result, batch_sizes)


def fastest_per_model(rows: list[dict], batch_sizes: list[int]) -> dict:
    """Per model (fp32 and int8 files apart) and batch size: the runtime with the most images/s among those that
    agree with ONNX Runtime CPU on at least 99.9% of the images, and its ratio to ONNX Runtime CPU."""
    fastest = {}
    for key in dict.fromkeys((row["model"], row["precision"]) for row in rows):
        ok = [row for row in rows if (row["model"], row["precision"]) == key and row["status"] == "ok"
              and row["agreement"]["top1_agreement"] >= 0.999]
        reference = next((row for row in ok if row["runtime"] == "onnxruntime"), None)
        if reference is None:
            continue
        for batch in map(str, batch_sizes):
            best = max(ok, key=lambda row: row["latency"][batch]["images_per_s"])
            fastest.setdefault(f"{key[0]} ({key[1]})", {})[batch] = {
                "runtime": best["runtime"], "images_per_s": best["latency"][batch]["images_per_s"],
                "vs_onnxruntime": round(best["latency"][batch]["images_per_s"]
                                        / reference["latency"][batch]["images_per_s"], 2)}
    return fastest


def print_markdown(result: dict, batch_sizes: list[int]) -> None:
    print(f"\nCPU: {result['cpu']}; ISA flags: {', '.join(result['isa_flags'])}; int8: {result['int8_isa']}\n")
    header = "| model | runtime | convert s | size MB | accuracy | top-1 agreement | max abs delta p | " + " | ".join(
        f"batch {b} p50 ms | batch {b} images/s" for b in batch_sizes) + " |"
    print(header)
    print("|" + "---|" * (7 + 2 * len(batch_sizes)))
    for row in result["compare"]:
        name = f"{row['model']} ({row['precision']})"
        runtime = f"{row['runtime']} {row.get('version') or ''}"
        converted = [f"{row['convert_seconds']:.1f}" if "convert_seconds" in row else "-",
                     f"{row['artifact_bytes'] / 1e6:.1f}" if "artifact_bytes" in row else "-"]
        if row["status"] != "ok":
            print(f"| {name} | {runtime} | " + " | ".join(converted) + f" | {row['status']} |" + " |" * (2 + 2 * len(batch_sizes)))
            continue
        cells = converted + [f"{row['accuracy']:.2%}" if "accuracy" in row else "(train images)",
                 f"{row['agreement']['top1_agreement']:.2%}", f"{row['agreement']['max_abs_probability_delta']:.1e}"]
        for b in batch_sizes:
            stats = row["latency"][str(b)]
            cells += [f"{stats['p50_ms']:.2f}", f"{stats['images_per_s']:.0f}"]
        print(f"| {name} | {runtime} | " + " | ".join(cells) + " |")
    print("\n| model | " + " | ".join(f"fastest at batch {b} (x ONNX Runtime)" for b in batch_sizes) + " |")
    print("|---|" + "---|" * len(batch_sizes))
    for model, by_batch in result["fastest"].items():
        print(f"| {model} | " + " | ".join(f"{by_batch[str(b)]['runtime']} {by_batch[str(b)]['vs_onnxruntime']:.2f}x"
                                           for b in batch_sizes) + " |")
    for stem, report in result["int8"].items():
        q = report["quantization"]
        print(f"\nint8 {stem}: activations {q['activations']}, reduce_range {q['reduce_range']} ({q['advice_for_this_cpu']['why']}); "
              f"speedup {report['speedup']}; agreement {report['agreement']['top1_agreement']:.2%}")
        print("\n| op type | computes in | fp32 nodes | fp32 time | int8 nodes | int8 time |\n|---|---|---|---|---|---|")
        profiles = report["op_profile"]
        keys = list(dict.fromkeys((op["op_type"], op["precision"]) for n in ("int8", "fp32") for op in profiles[n]["ops"]))
        for op_type, precision in keys:
            cells = []
            for n in ("fp32", "int8"):
                op = next((o for o in profiles[n]["ops"] if (o["op_type"], o["precision"]) == (op_type, precision)), None)
                cells += [str(op["nodes"]), f"{op['share']:.1%}"] if op else ["", ""]
            print(f"| {op_type} | {precision} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
