"""airbench's remaining levers, one at a time, on `--preset fast`: each lever is an option of the one
training loop, switched on alone over the preset (and all together), over one or more seeds, 45k/5k.

    baseline          the preset with every lever off
    muon              torch.optim.Muon for the conv filter banks (lr 0.24, momentum 0.6), SGD for the rest
    alternating-flip  each image flipped in every other epoch instead of on a coin per epoch
    whiten-bias       the whitening bias trained for the first --whiten-bias-epochs epochs, then frozen
    all               the three together
    batch-512         half airbench94's batch at half its lr: twice the steps for the same epochs; a CPU, unlike a
                      GPU, runs batch 512 about as fast as 1024 (614 against 596 images/s, benchmarks/train_speed.py)
    batch-512-20-epochs  the same for 20 epochs (warm-up kept at 23% of the run)
    cutout-21-epochs  regularisation for the 1,800 s budget, which holds ~22 epochs on 2 AVX-512 cores: 21 epochs
                      (warm-up 23%) with an 8x8 cutout per image, since 21 epochs without it reach 99% training
                      accuracy and gain only 0.1 point over 15 (benchmarks/flagship.py --epochs 21)
    wide-8-epochs     airbench95's widths 128/384/384 (603 MFLOPs an image against 236) for the epochs the 1,800 s
                      budget holds if time scales with FLOPs, warm-up 23%
    wide              the same widths for the preset's 15 epochs: 1,774 s with --precision bfloat16 on an AMX CPU,
                      whose bfloat16 step runs 3x its float32 one (docs/experiments/fast-flagship.md)

--precision bfloat16 runs the chosen levers with the training forward pass autocast to bfloat16 (`cifarx train
--precision`), in folders <lever>-bfloat16-seed<S>: on a CPU with AMX tiles fast's epochs take a half to a third
of the time.

Per run: best validation accuracy, with the preset's test-time augmentation, final accuracy, the loop's training
seconds and the run's wall time; the table adds mean +- std per lever over the seeds, and the CPU and its ISA flags
(an AVX2-only machine of this kind trains about twice as slowly as an AVX-512 one). Smoke test (minutes):

    nice -n 19 python benchmarks/fast_levers.py --epochs 1 --train-size 2048 --val-size 500 --seeds 0 \
        --levers baseline,muon --out /tmp/levers-smoke

A run folder OUT/<lever>-seed<S>/ that already holds a finished run (summary.json) is reused, not retrained, so
seeds or levers can be added later. Writes OUT/fast_levers.json (every summary, the settings, the CPU, this
command) and OUT/fast_levers.md (rows for docs/benchmarks.md) after every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

from cifarx.cli.main import RichReporter
from cifarx.training.config import PRECISIONS, load_preset, make_train_config
from cifarx.io import atomic_write_json, atomic_write_text
from cifarx.process import keep_freed_memory
from cifarx.training.run import train

# airbench94's batch and this preset's lr for it (its per-example lr on the mean loss); batch-512 halves both
AIRBENCH94_BATCH = {"batch_size": 1024, "lr": 1.5}


def lever_settings(args: argparse.Namespace) -> dict[str, dict]:
    """Each lever's settings: every lever off (baseline), one on, or airbench's three on, whatever the preset sets."""
    flips = [a for a in load_preset(args.preset)["augment"] if a not in ("flip", "alternating-flip")]
    off = {"muon": False, "augment": flips + ["flip"], "whiten_bias_epochs": None, **AIRBENCH94_BATCH}
    on = {"muon": True, "augment": flips + ["alternating-flip"], "whiten_bias_epochs": args.whiten_bias_epochs}
    levers = {"baseline": off}
    for lever, key in (("muon", "muon"), ("alternating-flip", "augment"), ("whiten-bias", "whiten_bias_epochs")):
        levers[lever] = {**off, key: on[key]}
    levers["all"] = {**off, **on}
    levers["batch-512"] = {**off, "batch_size": 512, "lr": AIRBENCH94_BATCH["lr"] / 2}
    levers["batch-512-20-epochs"] = {**levers["batch-512"], "epochs": 20, "warmup_epochs": 4.6}
    levers["cutout-21-epochs"] = {**off, "augment": off["augment"] + ["cutout"], "cutout_size": 8, "epochs": 21,
                                  "warmup_epochs": 4.83}
    levers["wide"] = {**off, "model_kwargs": {"widths": [128, 384, 384]}}
    levers["wide-8-epochs"] = {**levers["wide"], "epochs": 8, "warmup_epochs": 1.84}
    if args.precision != "float32":
        levers = {lever: {**settings, "precision": args.precision} for lever, settings in levers.items()}
    return levers


def precision_suffix(args: argparse.Namespace) -> str:
    return "" if args.precision == "float32" else f"-{args.precision}"


def run_lever(lever: str, settings: dict, seed: int, args: argparse.Namespace) -> dict:
    """Train the preset with one lever's settings (or reuse the finished run); its summary plus what it ran with."""
    budget = {"epochs": args.epochs, "train_size": args.train_size, "threads": args.threads}
    config = make_train_config(args.preset, settings=settings, data=args.data, val_size=args.val_size,
                               seed=seed, out=str(Path(args.out) / f"{lever}{precision_suffix(args)}-seed{seed}"),
                               **budget)
    record = {"lever": lever + precision_suffix(args), "seed": seed, "settings": settings, "epochs": config.epochs}
    finished = Path(config.out) / "summary.json"
    if finished.exists():  # a benchmark stopped half-way (or extended by seeds) does not train a finished run again
        print(f"== {lever} seed {seed}: reusing the finished run {config.out}")
        return {**record, "reused": True, **json.loads(finished.read_text())}
    print(f"== {lever} seed {seed}: {settings} -> {config.out}", flush=True)
    start = time.perf_counter()
    summary = train(config, reporter=RichReporter())
    return {**record, "wall_seconds": round(time.perf_counter() - start, 1), **summary}


def with_tta(summary: dict) -> float | None:
    """The best checkpoint's validation accuracy with the preset's test-time augmentation, if it has one."""
    return next((v for k, v in summary.items() if k.startswith("best_val_accuracy_tta_")), None)


def markdown_rows(results: list[dict], cpu: dict, command: str) -> str:
    lines = ["| lever | seed | epochs | best val acc | with TTA | final val acc | train time | wall time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tta = with_tta(r)
        wall = "reused" if r.get("reused") else f"{r['wall_seconds']:.0f} s"
        lines.append(f"| {r['lever']} | {r['seed']} | {r['epochs_run']} | {r['best_val_accuracy']:.2%} | "
                     f"{'-' if tta is None else f'{tta:.2%}'} | {r['final_val_accuracy']:.2%} | "
                     f"{r['train_seconds']:.0f} s | {wall} |")
    for lever in dict.fromkeys(r["lever"] for r in results):  # mean +- std where a lever ran on several seeds
        rows = [r for r in results if r["lever"] == lever]
        if len(rows) > 1:
            accuracy = [with_tta(r) or r["best_val_accuracy"] for r in rows]
            seconds = [r["train_seconds"] for r in rows]
            lines.append(f"| **{lever}**: mean +- std of {len(rows)} seeds | | | | "
                         f"{statistics.mean(accuracy):.2%} +- {statistics.stdev(accuracy):.2%} | | "
                         f"{statistics.mean(seconds):.0f} +- {statistics.stdev(seconds):.0f} s | |")
    flags = ", ".join(cpu["isa_flags"]) or "no AVX2/AVX-512"
    return "\n".join(lines) + f"\n\nCPU: {cpu['cpu']}; ISA flags: {flags}.\nCommand: `{command}`\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path.home() / "cifar10-jpeg"), help="image folder with train/<class>/")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--levers", default="baseline,muon,alternating-flip,whiten-bias,all,batch-512,batch-512-20-epochs",
                        help="comma list of: " + ", ".join(lever_settings(argparse.Namespace(
                            preset="fast", whiten_bias_epochs=3, precision="float32"))))
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="the training forward pass of every chosen lever (cifarx train --precision)")
    parser.add_argument("--seeds", default="0,1", help="comma list of seeds; each lever runs once per seed")
    parser.add_argument("--whiten-bias-epochs", type=int, default=3, help="airbench94: 3 (of its 9.9 epochs)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (e.g. 1 for a smoke test)")
    parser.add_argument("--train-size", type=int, help="train on this many images (smoke tests); default all 45k")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/bench-fast-levers")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `cifarx train` does: at batch 1024 without it, fast's epochs took 1.4x as long
    levers = lever_settings(args)
    chosen = [name.strip() for name in args.levers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(levers))
    if unknown:
        parser.error(f"unknown levers {unknown}; choose from {', '.join(levers)}")

    cpu = cpu_flags()
    command = shlex.join(["python", "benchmarks/fast_levers.py", *(sys.argv[1:] if argv is None else argv)])
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for lever in chosen:
            results.append(run_lever(lever, levers[lever], seed, args))
            # Written after every run, so a long benchmark stopped half-way keeps what it measured.
            atomic_write_json(Path(args.out) / "fast_levers.json",
                              {"command": command, "settings": vars(args), **cpu, "results": results})
            atomic_write_text(Path(args.out) / "fast_levers.md", markdown_rows(results, cpu, command))
    print(markdown_rows(results, cpu, command))


if __name__ == "__main__":
    main()
