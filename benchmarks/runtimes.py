"""Where to ship: every exported model on every runtime, and why int8 is (or is not) faster, on this machine.

    python benchmarks/runtimes.py --data ~/cifar10-jpeg --threads 2

1. The CPU: model name and the int8-relevant ISA flags (avx512_vnni, avx_vnni, avx512bw, avx2) from /proc/cpuinfo.
2. `exported/fast.onnx` (and `exported/simple-cnn.onnx`) quantised by `cifarx quantize` with the types this CPU
   needs; fp32 against int8 on ONNX Runtime CPU: latency at each batch size, top-1 agreement on real images, and
   ONNX Runtime's profile per op type (nodes and share of node time).
3. The compare matrix (`cifarx compare`): every `exported/*.onnx` plus the int8 files on every runtime, same
   images and threads. Models with a held-out validation split are scored on `--images` images of it; models
   without one (fast: trained on all 50,000) are compared on real training images for agreement only.
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

from cifarx import data as datamod
from cifarx.compare import compare_runtimes
from cifarx.evaluate import measure_latency
from cifarx.io import atomic_write_json
from cifarx.onnxfile import create_session, model_info
from cifarx.process import cpu_description
from cifarx.quantize import INT8_ISA, cpu_int8_isa, op_profile, quantize_onnx
from cifarx.runtimes import RUNTIMES, agreement, batched_outputs

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
        "agreement": agreement(outputs["fp32"], outputs["int8"]),
        "op_profile": {name: op_profile(path, images, max(batch_sizes), threads) for name, path in (("fp32", fp32), ("int8", int8))},
        "quantization": json.loads(infos["int8"]["metadata"]["quantization"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder with train/<class>/ (real images)")
    parser.add_argument("--models", nargs="*", type=Path, default=sorted((ROOT / "exported").glob("*.onnx")))
    parser.add_argument("--int8", nargs="*", default=["fast", "simple-cnn"], help="model stems to quantise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/runtimes.json")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = {"command": shlex.join(["python", "benchmarks/runtimes.py", *sys.argv[1:]]), **cpu_flags()}
    train = datamod.load_split(args.data, "train")
    sample = np.sort(np.random.default_rng(0).permutation(len(train))[: args.images])
    training_images = train.images[sample].numpy()

    with tempfile.TemporaryDirectory() as folder:
        int8_files, result["int8"] = [], {}
        for stem in args.int8:
            fp32 = next(path for path in args.models if path.stem == stem)
            int8 = Path(folder) / f"{stem}.int8.onnx"
            result["int8"][stem] = {"quantize": quantize_onnx(fp32, int8, data=args.data)}
            result["int8"][stem].update(int8_report(fp32, int8, training_images, batch_sizes, args.threads, args.repeats))
            int8_files.append(int8)
            print(f"int8 {stem}: speedup {result['int8'][stem]['speedup']}", flush=True)
        files = [*args.models, *int8_files]
        held_out = [path for path in files if has_val_split(path)]
        common = {"batch_sizes": batch_sizes, "threads": args.threads, "repeats": args.repeats, "warmup": 3}
        rows = compare_runtimes(held_out, list(RUNTIMES), data=args.data, split="val", image_count=args.images, **common)["rows"]
        others = [path for path in files if path not in held_out]
        if others:  # agreement on real (training) images: no accuracy for a model that saw them all
            rows += compare_runtimes(others, list(RUNTIMES), images=training_images, image_count=None, **common)["rows"]
    for row in rows:
        row["model"] = Path(row["model"]).name
    result["compare"] = rows
    atomic_write_json(args.out, result)
    print_markdown(result, batch_sizes)


def print_markdown(result: dict, batch_sizes: list[int]) -> None:
    print(f"\nCPU: {result['cpu']}; ISA flags: {', '.join(result['isa_flags'])}; int8: {result['int8_isa']}\n")
    header = "| model | runtime | accuracy | top-1 agreement | max abs delta p | " + " | ".join(
        f"batch {b} p50 ms | batch {b} images/s" for b in batch_sizes) + " |"
    print(header)
    print("|" + "---|" * (5 + 2 * len(batch_sizes)))
    for row in result["compare"]:
        name = f"{row['model']} ({row['precision']})"
        runtime = f"{row['runtime']} {row.get('version') or ''}"
        if row["status"] != "ok":
            print(f"| {name} | {runtime} | {row['status']} |" + " |" * (2 + 2 * len(batch_sizes)))
            continue
        cells = [f"{row['accuracy']:.2%}" if "accuracy" in row else "(train images)",
                 f"{row['agreement']['top1_agreement']:.2%}", f"{row['agreement']['max_abs_probability_delta']:.1e}"]
        for b in batch_sizes:
            stats = row["latency"][str(b)]
            cells += [f"{stats['p50_ms']:.2f}", f"{stats['images_per_s']:.0f}"]
        print(f"| {name} | {runtime} | " + " | ".join(cells) + " |")
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
