"""What unlabelled images add: M1, M2 and the supervised-only baseline with the same labelled images (issue 6).

Each method trains with its preset (cifarx/presets/vae-ssl-*.toml) through the one training loop; the table gives the
best and final validation accuracy on the 5,000-image validation split and the training wall time. Full budget on a
2-core CPU: hours (M2 decodes every unlabelled image once per class). Smoke test:

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/vae_ssl.py --epochs 1 --labelled 100 --unlabelled 200 \
        --val-size 500 --out /tmp/vae-ssl-smoke

Writes OUT/vae_ssl.json (every summary, the settings and this command) and OUT/vae_ssl.md (rows for
docs/benchmarks.md); each run folder (metrics, curves, figures/, best.pt) is OUT/<method>/.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from cifarx.cli import RichReporter
from cifarx.config import SSL_METHODS, make_train_config
from cifarx.io import atomic_write_json, atomic_write_text
from cifarx.train import train


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Train one method from its preset, with the budget overrides of the command line; its summary plus settings."""
    overrides = dict(data=args.data, val_size=args.val_size, seed=args.seed, threads=args.threads,
                     out=str(Path(args.out) / method), epochs=args.epochs, labelled=args.labelled)
    if not method.endswith("supervised"):  # the baselines never see unlabelled images
        overrides["unlabelled"] = args.unlabelled
    config = make_train_config(f"vae-ssl-{method}", **overrides)
    print(f"== {method}: {config.labelled} labelled, {config.unlabelled} unlabelled, {config.epochs} epochs -> {config.out}")
    start = time.perf_counter()
    summary = train(config, reporter=RichReporter())
    return {"method": method, "labelled": config.labelled, "unlabelled": config.unlabelled, "epochs": config.epochs,
            "objective": config.objective, "objective_kwargs": config.objective_kwargs, "batch_size": config.batch_size,
            "labelled_fraction": config.labelled_fraction, "wall_seconds": round(time.perf_counter() - start, 1),
            **summary}


def markdown_rows(results: list[dict]) -> str:
    lines = ["| method | labelled | unlabelled | epochs | best val acc | final val acc | train time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['labelled']:,} | {r['unlabelled']} | {r['epochs_run']} | "
                     f"{r['best_val_accuracy']:.2%} | {r['final_val_accuracy']:.2%} | {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path.home() / "cifar10-jpeg"), help="image folder with train/<class>/")
    parser.add_argument("--methods", default=",".join(SSL_METHODS), help="comma list of " + ", ".join(SSL_METHODS))
    parser.add_argument("--labelled", type=int, default=1500)
    parser.add_argument("--unlabelled", default="10000", help="a number or 'all'")
    parser.add_argument("--epochs", type=int, help="override every preset's epochs (e.g. 1 for a smoke test)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/bench-vae-ssl")
    args = parser.parse_args(argv)
    args.unlabelled = args.unlabelled if args.unlabelled == "all" else int(args.unlabelled)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(SSL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(SSL_METHODS)}")

    results = []
    for method in methods:
        results.append(run_method(method, args))
        # Written after every method, so a long benchmark stopped half-way keeps what it measured.
        command = shlex.join(["python", "benchmarks/vae_ssl.py", *(sys.argv[1:] if argv is None else argv)])
        atomic_write_json(Path(args.out) / "vae_ssl.json", {"command": command, "settings": vars(args), "results": results})
        atomic_write_text(Path(args.out) / "vae_ssl.md", markdown_rows(results) + f"\nCommand: `{command}`\n")
    print(markdown_rows(results))


if __name__ == "__main__":
    main()
