"""Time-to-accuracy curves of finished runs: validation accuracy after each epoch against the training
seconds spent so far (metrics.csv's cumulative `train_seconds`: training plus each epoch's validation), one curve
per recipe, each seed a thin line and the mean over seeds a thick one; the best checkpoint's accuracy with the
recipe's test-time augmentation is the marker at the end. Reference figures measured elsewhere (e.g. the airbench94
script's own runs on this machine, from the data README) are drawn as points with their own label.

    python benchmarks/time_to_accuracy.py \
        --curve "fast (15 epochs)=runs/bench-fast-levers/baseline-seed0,runs/bench-fast-levers/baseline-seed1" \
        --curve "fast + levers=runs/bench-fast-levers/all-seed0,runs/bench-fast-levers/all-seed1" \
        --point "airbench94 script, 50k, test split=2040:0.904" --out docs/results/time-to-accuracy

Writes OUT.png, OUT.json (the curves, the CPU and its ISA flags, this command) and prints markdown rows: per recipe,
the seconds until validation first reached each of --thresholds (mean over its runs), and the final figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

from flagship import time_to  # benchmarks/flagship.py, beside this script
from runtimes import cpu_flags

from cifarx.io import atomic_savefig, atomic_write_json


def read_run(run: Path) -> dict:
    """A finished run's epochs (cumulative seconds, validation accuracy) and its best accuracy with TTA."""
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((run / "summary.json").read_text())
    tta = next((v for k, v in summary.items() if k.startswith("best_val_accuracy_tta_")), None)
    return {"run": str(run), "rows": rows, "seconds": [float(r["train_seconds"]) for r in rows],
            "accuracy": [float(r["val_accuracy"]) for r in rows], "best": summary["best_val_accuracy"], "tta": tta}


def mean_curve(runs: list[dict]) -> tuple[list[float], list[float]]:
    """Epoch-wise means over seeds (the runs share their epoch count; a shorter run cuts the curve)."""
    epochs = min(len(r["seconds"]) for r in runs)
    return ([statistics.mean(r["seconds"][e] for r in runs) for e in range(epochs)],
            [statistics.mean(r["accuracy"][e] for r in runs) for e in range(epochs)])


def mean_time_to(threshold: float, runs: list[dict]) -> float | None:
    """Mean over the runs of the training seconds until validation first reached `threshold`; None unless all did."""
    times = [time_to(threshold, run["rows"]) for run in runs]
    return None if None in times else statistics.mean(times)


def parse_named(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.rpartition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{option} takes NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--curve", action="append", required=True, help="NAME=RUN[,RUN...]: one recipe, its seeds' run folders")
    parser.add_argument("--point", action="append", default=[], help="NAME=SECONDS:ACCURACY[,SECONDS:ACCURACY...]")
    parser.add_argument("--thresholds", default="0.90,0.91,0.92")
    parser.add_argument("--ylim", default="0.80,0.94", help="the accuracy axis: LOW,HIGH")
    parser.add_argument("--out", default="docs/results/time-to-accuracy", help="path without suffix: OUT.png, OUT.json")
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    curves = {}
    for text in args.curve:
        name, runs = parse_named(text, "--curve")
        curves[name] = [read_run(Path(run)) for run in runs.split(",")]
    points = {}
    for text in args.point:
        name, pairs = parse_named(text, "--point")
        points[name] = [tuple(float(v) for v in pair.split(":")) for pair in pairs.split(",")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    lines = ["| recipe | seeds | " + " | ".join(f"seconds to {t:.0%} (mean)" for t in thresholds)
             + " | final val acc (mean) | with TTA (mean +- std) | train time (mean) |",
             "|---|---:|" + "---:|" * len(thresholds) + "---:|---:|---:|"]
    for index, (name, runs) in enumerate(curves.items()):
        colour = f"C{index}"
        for run in runs:
            axis.plot([s / 60 for s in run["seconds"]], run["accuracy"], color=colour, alpha=0.3, linewidth=0.8)
        seconds, accuracy = mean_curve(runs)
        axis.plot([s / 60 for s in seconds], accuracy, color=colour, linewidth=2, marker=".", label=name)
        ttas = [r["tta"] for r in runs if r["tta"] is not None]
        if ttas:
            axis.plot(seconds[-1] / 60, statistics.mean(ttas), color=colour, marker="*", markersize=12)
        reached = [mean_time_to(t, runs) for t in thresholds]
        tta_text = "-" if not ttas else (f"{statistics.mean(ttas):.2%}" + (f" +- {statistics.stdev(ttas):.2%}" if len(ttas) > 1 else ""))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join("not reached" if s is None else f"{s:.0f} s" for s in reached)
                     + f" | {accuracy[-1]:.2%} | {tta_text} | {seconds[-1]:.0f} s |")
    for index, (name, pairs) in enumerate(points.items(), start=len(curves)):
        axis.scatter([s / 60 for s, _ in pairs], [a for _, a in pairs], color=f"C{index}", marker="D", label=name, zorder=3)
    cpu = cpu_flags()
    axis.set(xlabel="training minutes (incl. per-epoch validation)", ylabel="validation top-1",
             title=f"time to accuracy; stars: best checkpoint with TTA\n{cpu['cpu']} ({', '.join(cpu['isa_flags'])})")
    axis.set_ylim(*(float(v) for v in args.ylim.split(",")))
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    out = Path(args.out)
    atomic_savefig(figure, out.with_suffix(".png"))
    command = shlex.join(["python", "benchmarks/time_to_accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    atomic_write_json(out.with_suffix(".json"), {"command": command, **cpu,
                                                 "curves": {name: [{k: v for k, v in run.items() if k != "rows"} for run in runs]
                                                            for name, runs in curves.items()},
                                                 "points": {k: [list(p) for p in v] for k, v in points.items()}})
    print("\n".join(lines) + f"\n\nCPU: {cpu['cpu']}; ISA flags: {', '.join(cpu['isa_flags'])}.\nCommand: `{command}`")


if __name__ == "__main__":
    main()
