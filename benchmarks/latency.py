"""Latency of a shipped ONNX file, in one run on one machine: ONNX Runtime CPU against PyTorch eager, int8
against fp32, and how close fp32 gets to this machine's matrix-multiply peak.

    python benchmarks/latency.py                                   # exported/fast.onnx and the run it came from
    python benchmarks/latency.py --onnx exported/simple-cnn.onnx --run runs/simple-cnn --data ~/cifar10-jpeg

Measures, with the same intra-op thread count for both runtimes (default: torch's, i.e. all cores):
1. p50 latency and images/s of ONNX Runtime (CPU provider) and PyTorch eager at each batch size, same inputs,
   plus the top-1 agreement and largest |delta logit| between them (`cifarx eval --compare-torch`);
2. the file quantised to int8 (`cifarx quantize`: QDQ, per-channel, U8S8 by default) against fp32: accuracy
   on the model's validation split and throughput;
3. the fp32 peak of a large torch.matmul (GFLOP/s), the model's FLOPs per image (torch.utils.flop_counter,
   a multiply-add = 2 FLOPs) and hence its achieved GFLOP/s at the largest batch as a fraction of that peak.
Writes a JSON (default benchmarks/results/latency-<model>.json) and prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifarx.errors import CifarxError
from cifarx.measure.evaluate import evaluate_onnx, load_torch_reference
from cifarx.io import atomic_write_json
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.deploy.quantize import compare_int8, quantize_onnx

TARGETS = {"onnx_vs_torch_batch1": 2.0, "onnx_vs_torch_large_batch": 1.3, "int8_vs_fp32_large_batch": 2.5,
           "int8_accuracy_drop_points": 0.5}  # the project's latency and int8 targets


def matmul_peak_gflops(threads: int, size: int = 4096, repeats: int = 5) -> dict:
    """The best fp32 GFLOP/s of an n x n torch.matmul (MKL/oneDNN) with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.matmul(a, b)  # warm-up: thread pool start, page faults
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"gflops": round(2 * size**3 / best / 1e9, 1), "size": size, "threads": threads, "best_seconds": round(best, 4)}


def flops_per_image(model) -> int:
    """Forward FLOPs for one 32x32 image, as torch's FlopCounterMode counts them (conv, matmul: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 3, 32, 32))
    return int(counter.get_total_flops())


def default_run(onnx_path: Path) -> str | None:
    """The run folder named in the model card beside the file (FILE.json), if there is one."""
    card = onnx_path.with_suffix(".json")
    if not card.is_file():
        return None
    runs = (json.loads(card.read_text()).get("val_accuracy") or {}).get("runs") or []
    return runs[0].get("run") if runs else None


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def markdown(result: dict) -> str:
    small, large = result["batch_sizes"][0], result["batch_sizes"][-1]
    onnx_latency, torch_latency = result["runtimes"]["latency"], result["runtimes"]["torch_latency"]
    int8 = result["int8"]
    fp32_stats, int8_stats = int8["models"]["fp32"]["latency"], int8["models"]["int8"]["latency"]
    compute = result["compute"]
    lines = [
        f"`{result['command']}`",
        "",
        f"Machine: {result['environment']['cpu']}, {result['environment']['cores']} cores; ONNX Runtime "
        f"{result['environment']['onnxruntime']}, torch {torch.__version__}; {result['threads']} intra-op threads for both; "
        f"load average {result['load_average_at_start']} at start.",
        "",
        "| measured | ONNX Runtime CPU (fp32) | PyTorch eager (fp32) | ONNX Runtime / PyTorch | target |",
        "|---|---|---|---|---|",
        f"| batch {small} p50 latency | {onnx_latency[str(small)]['p50_ms']:.3f} ms | {torch_latency[str(small)]['p50_ms']:.3f} ms "
        f"| **{result['speedups']['onnx_vs_torch_batch1']:.2f}x** faster | >= 2x |",
        f"| batch {large} throughput | {onnx_latency[str(large)]['images_per_s']:.0f} images/s | "
        f"{torch_latency[str(large)]['images_per_s']:.0f} images/s | **{result['speedups']['onnx_vs_torch_large_batch']:.2f}x** | >= 1.3x |",
        f"| parity on {result['runtimes']['parity']['images']} inputs | top-1 agreement "
        f"{result['runtimes']['parity']['top1_agreement']:.2%} | max abs logit delta "
        f"{result['runtimes']['parity']['max_abs_logit_delta']:.1e} | | |",
        "",
        f"| {int8['split']} split ({int8['images']} images) | fp32 | int8 ({int8['quantization']['activations']} activations, "
        f"{'per-channel' if int8['quantization']['per_channel'] else 'per-tensor'}, {int8['quantization']['calibration_method']}) "
        "| int8 / fp32 | target |",
        "|---|---|---|---|---|",
        f"| top-1 accuracy | {int8['models']['fp32']['accuracy']:.2%} | {int8['models']['int8']['accuracy']:.2%} | "
        f"**{0.0 - int8['accuracy_drop_points']:+.2f} points** | >= -0.5 points |",
        f"| batch {small} p50 latency | {fp32_stats[str(small)]['p50_ms']:.3f} ms | {int8_stats[str(small)]['p50_ms']:.3f} ms | "
        f"{int8['speedup'][str(small)]:.2f}x | |",
        f"| batch {large} throughput | {fp32_stats[str(large)]['images_per_s']:.0f} images/s | "
        f"{int8_stats[str(large)]['images_per_s']:.0f} images/s | **{int8['speedup'][str(large)]:.2f}x** | >= 2.5x |",
        f"| file size | {int8['models']['fp32']['bytes'] / 1e6:.2f} MB | {int8['models']['int8']['bytes'] / 1e6:.2f} MB | | |",
        "",
        "| compute | figure |",
        "|---|---|",
        f"| forward FLOPs per image (incl. any TTA in the graph) | {compute['flops_per_image'] / 1e9:.3f} GFLOP |",
        f"| fp32 matmul peak, {compute['matmul_peak']['size']}^2 torch.matmul, {compute['matmul_peak']['threads']} threads "
        f"| {compute['matmul_peak']['gflops']:.0f} GFLOP/s |",
        f"| ONNX Runtime fp32 at batch {large} | {compute['onnx_fp32_gflops']:.1f} GFLOP/s = "
        f"**{compute['onnx_fp32_fraction_of_peak']:.0%} of peak** |",
        f"| PyTorch eager fp32 at batch {large} | {compute['torch_fp32_gflops']:.1f} GFLOP/s = "
        f"{compute['torch_fp32_fraction_of_peak']:.0%} of peak |",
        f"| ONNX Runtime int8 at batch {large} (fp32-equivalent) | {compute['onnx_int8_equivalent_gflops']:.1f} GFLOP/s = "
        f"{compute['onnx_int8_equivalent_fraction_of_fp32_peak']:.0%} of fp32 peak |",
        "",
        "Targets met: " + ", ".join(f"{name} {'yes' if met else 'NO'}" for name, met in result["targets_met"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default="exported/fast.onnx", help="fp32 cifarx export")
    parser.add_argument("--run", help="run folder or checkpoint it was exported from (default: from its model card)")
    parser.add_argument("--data", help="image folder for calibration and accuracy (default: the one recorded in the model)")
    parser.add_argument("--data-root")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--threads", type=int, help="intra-op threads for every runtime (default: torch's default)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"])
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    parser.add_argument("--quantize-ends", action="store_true", help="quantise the first conv and the classifier too")
    parser.add_argument("--int8-output", help="keep the int8 file here (default: a temporary file)")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--out", help="JSON file (default benchmarks/results/latency-<model file stem>.json)")
    args = parser.parse_args(argv)

    onnx_path = Path(args.onnx)
    batch_sizes = sorted(int(b) for b in args.batch_sizes.split(","))
    threads = args.threads or torch.get_num_threads()
    run = args.run or default_run(onnx_path)
    if run is None:
        raise CifarxError(f"no model card beside {onnx_path} names its run; pass --run RUN_DIR")
    info = model_info(create_session(onnx_path))
    data = args.data or (json.loads(info["metadata"].get("val_split", "null")) or {}).get("data")
    if data is None:
        raise CifarxError(f"{onnx_path} records no training data; pass --data DIR")
    command = shlex.join(["python", "benchmarks/latency.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()[0]
    if load > 0.5:  # another job on the cores skews every ratio below, and not by the same factor
        print(f"warning: load average {load:.1f} before starting; figures are only comparable on a quiet machine",
              file=sys.stderr)

    print(f"1/3 ONNX Runtime vs PyTorch eager, batches {batch_sizes}, {threads} threads", file=sys.stderr)
    runtimes = evaluate_onnx(onnx_path, data=None, batch_sizes=batch_sizes, threads=threads, warmup=args.warmup,
                             repeats=args.repeats, compare_torch=run)
    print(f"2/3 int8 ({args.activation_type} activations) vs fp32 on {data}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        int8_path = Path(args.int8_output or Path(folder) / f"{onnx_path.stem}.int8.onnx")
        quantize_onnx(onnx_path, int8_path, data=data, data_root=args.data_root,
                      calibration_count=args.calibration_images, calibration_method=args.calibration_method,
                      activation_type=args.activation_type, per_channel=not args.per_tensor,
                      keep_ends_fp32=not args.quantize_ends)
        int8 = compare_int8(onnx_path, int8_path, data=data, split="val", batch_sizes=batch_sizes, threads=threads,
                            warmup=args.warmup, repeats=args.repeats, data_root=args.data_root)
    print("3/3 matmul peak and FLOPs per image", file=sys.stderr)
    peak = matmul_peak_gflops(threads, args.matmul_size)
    flops = flops_per_image(load_torch_reference(run, info))
    large = str(batch_sizes[-1])

    def achieved(images_per_s: float) -> float:
        return round(flops * images_per_s / 1e9, 2)

    compute = {
        "flops_per_image": flops, "matmul_peak": peak,
        "onnx_fp32_gflops": achieved(runtimes["latency"][large]["images_per_s"]),
        "torch_fp32_gflops": achieved(runtimes["torch_latency"][large]["images_per_s"]),
        "onnx_int8_equivalent_gflops": achieved(int8["models"]["int8"]["latency"][large]["images_per_s"]),
    }
    for key in ("onnx_fp32", "torch_fp32"):
        compute[f"{key}_fraction_of_peak"] = ratio(compute[f"{key}_gflops"], peak["gflops"])
    compute["onnx_int8_equivalent_fraction_of_fp32_peak"] = ratio(compute["onnx_int8_equivalent_gflops"], peak["gflops"])
    speedups = {
        "onnx_vs_torch_batch1": ratio(runtimes["torch_latency"][str(batch_sizes[0])]["p50_ms"],
                                      runtimes["latency"][str(batch_sizes[0])]["p50_ms"]),
        "onnx_vs_torch_large_batch": ratio(runtimes["latency"][large]["images_per_s"],
                                           runtimes["torch_latency"][large]["images_per_s"]),
        "int8_vs_fp32_large_batch": int8["speedup"][large],
    }
    result = {
        "command": command, "model": str(onnx_path), "run": str(run), "data": data, "threads": threads,
        "load_average_at_start": round(load, 2),
        "batch_sizes": batch_sizes, "environment": runtimes["environment"], "runtimes": runtimes, "int8": int8,
        "compute": compute, "speedups": speedups,
        "targets_met": {**{name: speedups[name] >= TARGETS[name] for name in speedups},
                        "int8_accuracy_drop_points": int8["accuracy_drop_points"] <= TARGETS["int8_accuracy_drop_points"]},
    }
    out = Path(args.out or f"benchmarks/results/latency-{onnx_path.stem}.json")
    atomic_write_json(out, result)
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    try:
        main()
    except CifarxError as error:
        sys.exit(f"error: {error}")
