"""What unlabelled images add: each semi-supervised method beside the supervised-only baseline of its network, with
the same labelled images, over one or more seeds.

Each method trains with its preset (`cifarx train --method M`, cifarx.training.config.SSL_METHODS) through the one training
loop; the table gives the best and final validation accuracy on the 5,000-image validation split (and with the
preset's test-time augmentation), the training wall time, and mean +- std over the seeds. Smoke test:

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/semi_supervised.py --methods m1,fast-supervised --epochs 1 \
        --labelled 100 --unlabelled 200 --val-size 500 --out /tmp/ssl-smoke

A run folder OUT/<method>-seed<S>/ that already holds a finished run (summary.json) is reused, not retrained.
Writes OUT/semi_supervised.json (every summary, the settings and this command) and OUT/semi_supervised.md (rows for
docs/benchmarks.md); each run folder is OUT/<method>-seed<S>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from cifarx.cli.main import RichReporter
from cifarx.training.config import SSL_METHODS, make_train_config
from cifarx.io import atomic_write_json, atomic_write_text
from cifarx.process import keep_freed_memory
from cifarx.training.run import train


def run_method(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one method from its preset, with the budget overrides of the command line; its summary plus settings."""
    overrides = dict(data=args.data, val_size=args.val_size, seed=seed, threads=args.threads,
                     out=str(Path(args.out) / f"{method}-seed{seed}"), epochs=args.epochs, labelled=args.labelled)
    if not method.endswith("supervised"):  # the baselines never see unlabelled images
        overrides["unlabelled"] = args.unlabelled
    config = make_train_config(SSL_METHODS[method], **overrides)
    finished = Path(config.out) / "summary.json"
    if finished.exists():  # a benchmark stopped half-way (or extended by seeds) does not train a finished run again
        print(f"== {method}: reusing the finished run {config.out}")
        summary = json.loads(finished.read_text())
        return {"method": method, "seed": seed, "labelled": config.labelled, "unlabelled": config.unlabelled,
                "epochs": config.epochs, "reused": True, **summary}
    print(f"== {method}: {config.labelled} labelled, {config.unlabelled} unlabelled, {config.epochs} epochs -> {config.out}")
    start = time.perf_counter()
    summary = train(config, reporter=RichReporter())
    return {"method": method, "seed": seed, "labelled": config.labelled, "unlabelled": config.unlabelled, "epochs": config.epochs,
            "objective": config.objective, "objective_kwargs": config.objective_kwargs, "batch_size": config.batch_size,
            "labelled_fraction": config.labelled_fraction, "wall_seconds": round(time.perf_counter() - start, 1),
            **summary}


def best_with_tta(summary: dict) -> float | None:
    """The best checkpoint's validation accuracy with the preset's test-time augmentation, if it has one."""
    return next((v for k, v in summary.items() if k.startswith("best_val_accuracy_tta_")), None)


def markdown_rows(results: list[dict]) -> str:
    lines = ["| method | seed | labelled | unlabelled | epochs | best val acc | with TTA | final val acc | train time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tta = best_with_tta(r)
        lines.append(f"| {r['method']} | {r['seed']} | {r['labelled']:,} | {r['unlabelled']} | {r['epochs_run']} | "
                     f"{r['best_val_accuracy']:.2%} | {'-' if tta is None else f'{tta:.2%}'} | "
                     f"{r['final_val_accuracy']:.2%} | {r['train_seconds'] / 60:.1f} min |")
    for method in dict.fromkeys(r["method"] for r in results):  # mean +- std where a method ran on several seeds
        figures = [best_with_tta(r) or r["best_val_accuracy"] for r in results if r["method"] == method]
        if len(figures) > 1:
            lines.append(f"| {method}: mean +- std of {len(figures)} seeds | | | | | | "
                         f"{statistics.mean(figures):.2%} +- {statistics.stdev(figures):.2%} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path.home() / "cifar10-jpeg"), help="image folder with train/<class>/")
    parser.add_argument("--methods", default=",".join(SSL_METHODS), help="comma list of " + ", ".join(SSL_METHODS))
    parser.add_argument("--labelled", type=int, default=1500)
    parser.add_argument("--unlabelled", help="a number or 'all' (default: each preset's)")
    parser.add_argument("--epochs", type=int, help="override every preset's epochs (e.g. 1 for a smoke test)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seeds", default="0", help="comma list of seeds; each method runs once per seed")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/bench-semi-supervised")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `cifarx train` does: at batch 1024 without it, fast's epochs took 1.4x as long
    if args.unlabelled not in (None, "all"):
        args.unlabelled = int(args.unlabelled)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(SSL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(SSL_METHODS)}")

    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in methods:
            results.append(run_method(method, seed, args))
            # Written after every run, so a long benchmark stopped half-way keeps what it measured.
            command = shlex.join(["python", "benchmarks/semi_supervised.py", *(sys.argv[1:] if argv is None else argv)])
            atomic_write_json(Path(args.out) / "semi_supervised.json",
                              {"command": command, "settings": vars(args), "results": results})
            atomic_write_text(Path(args.out) / "semi_supervised.md", markdown_rows(results) + f"\nCommand: `{command}`\n")
    print(markdown_rows(results))


if __name__ == "__main__":
    main()
