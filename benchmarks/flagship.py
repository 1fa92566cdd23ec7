"""The flagship recipe's figures: train `--preset fast` for several seeds on 45k/5k, then summarise.

Per run: validation accuracy after each epoch (metrics.csv), the final validation accuracy with the preset's
test-time augmentation (summary.json), the wall time of training. Summary: mean +- std over seeds, and the
time at which each run's validation accuracy (no TTA) first reached 91% and 92%.

    python benchmarks/flagship.py --data ~/cifar10-jpeg --seeds 0 1 2 --out runs/flagship
    python benchmarks/flagship.py --summarize-only --out runs/flagship     # re-read finished runs
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path


def time_to(threshold: float, rows: list[dict]) -> float | None:
    for row in rows:
        if float(row["val_accuracy"]) >= threshold:
            return float(row["train_seconds"])
    return None


def summarize(out: Path) -> dict:
    runs = []
    for folder in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((folder / "summary.json").read_text())
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        tta_key = next((k for k in summary if k.startswith("best_val_accuracy_tta")), None)
        runs.append({
            "run": folder.name, "seed": summary["seed"], "epochs": summary["epochs_run"],
            "train_seconds": summary["train_seconds"], "final_val_accuracy": summary["final_val_accuracy"],
            "val_accuracy_tta": summary.get(tta_key) if tta_key else None,
            "seconds_to_91": time_to(0.91, rows), "seconds_to_92": time_to(0.92, rows),
            "epoch_seconds": [float(r["epoch_seconds"]) for r in rows],
            "data_fraction": sum(float(r["data_seconds"]) for r in rows) / sum(float(r["epoch_seconds"]) for r in rows),
        })

    def mean_std(key):
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    return {"runs": runs, **{k: mean_std(k) for k in ("final_val_accuracy", "val_accuracy_tta", "train_seconds")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--out", default="runs/flagship")
    parser.add_argument("--summarize-only", action="store_true")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    if not args.summarize_only:
        for seed in args.seeds:
            command = [sys.executable, "-m", "cifarx", "train", "--preset", args.preset, "--data", args.data,
                       "--seed", str(seed), "--out", str(out / f"seed{seed}"), *extra]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
    print(json.dumps(summarize(out), indent=2))


if __name__ == "__main__":
    main()
