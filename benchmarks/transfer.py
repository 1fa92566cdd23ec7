"""EfficientNet-Lite0 (ImageNet weights) on CIFAR-10: frozen features + linear head vs fine-tuning (issue 5).

Two modes, each at a few input sizes (the 32x32 images are upsampled inside the model):
- linear: backbone frozen, its features computed once and cached (cifarx.linear_probe.fit_linear_head), then the
  new head fitted; the wall time includes the feature extraction (cache misses only: delete the feature cache,
  $CIFARX_CACHE/features or ~/.cache/cifarx/features, for a cold measurement).
- finetune: the whole network (or its last N stages, --finetune-freeze N) trained through the one training loop,
  the backbone at --lr x --backbone-lr-scale.

Validation: the stratified 5,000-image split carved from the training images (seed 0). Full budget on a 2-core
CPU: the linear rows take minutes each (feature extraction), fine-tuning hours per epoch at 160-224 px. Smoke test:

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/transfer.py --train-size 256 --val-size 128 \
        --linear-sizes 64 --finetune-sizes 64 --linear-epochs 2 --finetune-epochs 1 --out /tmp/transfer-smoke

Writes OUT/transfer.json (every summary, the settings and this command) and OUT/transfer.md (rows for
docs/benchmarks.md); each run folder (config, metrics, curves, best.pt) is OUT/<mode>-<size>/.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from cifarx.cli import RichReporter
from cifarx.config import make_train_config
from cifarx.io import atomic_write_json, atomic_write_text
from cifarx.models.transfer import LITE0_PACKAGE
from cifarx.train import train

MODEL = "timm/efficientnet_lite0"


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def run(mode: str, img_size: int, args: argparse.Namespace) -> dict:
    """One training run; its summary plus the settings that define the row."""
    weights = {"pretrained": True} if args.pretrained else {"weights": args.weights}
    common = dict(model=MODEL, data=args.data, val_size=args.val_size, train_size=args.train_size, seed=args.seed,
                  threads=args.threads, out=str(Path(args.out) / f"{mode}-{img_size}"), eval_batch_size=100)
    if mode == "linear":
        config = make_train_config(
            **common, model_kwargs={"img_size": img_size, "freeze": "all", **weights}, cached_features=True,
            epochs=args.linear_epochs, batch_size=256, optimizer="adamw", lr=args.linear_lr, weight_decay=1e-4,
            schedule="cosine",
        )
    else:
        config = make_train_config(
            **common, model_kwargs={"img_size": img_size, "freeze": args.finetune_freeze, **weights},
            epochs=args.finetune_epochs, batch_size=args.finetune_batch_size, optimizer="sgd", nesterov=True,
            lr=args.finetune_lr, backbone_lr_scale=args.backbone_lr_scale, weight_decay=5e-5, schedule="cosine",
            warmup_epochs=min(0.5, args.finetune_epochs / 4), label_smoothing=0.1, augment=["crop", "flip"],
        )
    print(f"== {mode} at {img_size}px, {config.epochs} epochs -> {config.out}")
    start = time.perf_counter()
    summary = train(config, reporter=RichReporter())
    return {"mode": mode, "img_size": img_size, "freeze": config.model_kwargs["freeze"], "epochs": config.epochs,
            "lr": config.lr, "backbone_lr_scale": config.backbone_lr_scale,
            "wall_seconds": round(time.perf_counter() - start, 1), **summary}


def markdown_rows(results: list[dict]) -> str:
    lines = ["| mode | img size | trained | epochs | best val acc | final val acc | wall time | of which features |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        trained = "head" if r["freeze"] == "all" else "all" if r["freeze"] == "none" else f"last {r['freeze']} stages + head"
        features = f"{r['feature_seconds'] / 60:.1f} min" if "feature_seconds" in r else "-"
        lines.append(f"| {r['mode']} | {r['img_size']} | {trained} | {r['epochs_run']} | {r['best_val_accuracy']:.2%} | "
                     f"{r['final_val_accuracy']:.2%} | {r['wall_seconds'] / 60:.1f} min | {features} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path.home() / "cifar10-jpeg"), help="image folder with train/<class>/")
    parser.add_argument("--weights", default=LITE0_PACKAGE, help="the offline package (default) or a timm state dict")
    parser.add_argument("--pretrained", action="store_true", help="timm's hub weights instead of --weights")
    parser.add_argument("--linear-sizes", default="64,96,128,160,224", help="comma list; '' skips the linear rows")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--linear-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-sizes", default="160", help="comma list; '' skips fine-tuning")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-freeze", default="none", help="none, or the number of trailing stages to train")
    parser.add_argument("--finetune-lr", type=float, default=0.05, help="the head's peak lr")
    parser.add_argument("--backbone-lr-scale", type=float, default=0.2)
    parser.add_argument("--finetune-batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, help="train on only this many images (smoke tests)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/bench-transfer")
    args = parser.parse_args(argv)

    plan = [("linear", s) for s in _sizes(args.linear_sizes)] + [("finetune", s) for s in _sizes(args.finetune_sizes)]
    command = shlex.join(["python", "benchmarks/transfer.py", *(sys.argv[1:] if argv is None else argv)])
    results = []
    for mode, img_size in plan:
        results.append(run(mode, img_size, args))
        # Written after every run, so a long benchmark stopped half-way keeps what it measured.
        atomic_write_json(Path(args.out) / "transfer.json", {"command": command, "settings": vars(args), "results": results})
        atomic_write_text(Path(args.out) / "transfer.md", markdown_rows(results) + f"\nCommand: `{command}`\n")
    print(markdown_rows(results))


if __name__ == "__main__":
    main()
