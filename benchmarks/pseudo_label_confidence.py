"""How trustworthy a semi-supervised run's pseudo-labels are: the share of validation images whose
predicted class is at least THRESHOLD sure, and the accuracy of those confident predictions.

FixMatch trains on exactly those predictions, so a low share or a low accuracy says why the consistency term adds
little. Reads the runs' best.pt and their own validation split; `--raw-weights` reads last.pt's trained weights
instead of its EMA (what a run with an EMA would have scored without it, from the same run):

    python benchmarks/pseudo_label_confidence.py runs/bench-vae-m2/m2 runs/bench-vae-m2-fixmatch/m2-fixmatch
    python benchmarks/pseudo_label_confidence.py --raw-weights runs/vae-deep-supervised runs/vae-deep-m2-fixmatch
"""

from __future__ import annotations

import argparse

import torch

from cifarx.training.checkpoint import load_model
from cifarx.training.config import TrainConfig
from cifarx.data.datasets import to_float
from cifarx.training.batches import split_train_val


def confidence_report(run: str, threshold: float, raw_weights: bool = False) -> dict:
    model, payload = load_model(f"{run}/{'last' if raw_weights else 'best'}.pt")
    if raw_weights:
        model.load_state_dict(payload["train_state"]["model"])
    _, val_set = split_train_val(TrainConfig.from_dict(payload["config"]))
    with torch.inference_mode():
        probabilities = torch.cat([model.eval()(to_float(batch)).softmax(1) for batch in val_set.images.split(500)])
    confidence, predicted = probabilities.max(1)
    sure = confidence >= threshold
    correct = predicted == val_set.labels
    return {"run": run, "val_images": len(val_set), "accuracy": correct.float().mean().item(),
            "confident_share": sure.float().mean().item(), "confident_accuracy": correct[sure].float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (with best.pt)")
    parser.add_argument("--threshold", type=float, default=0.95, help="FixMatch's confidence threshold")
    parser.add_argument("--raw-weights", action="store_true", help="last.pt's trained weights, not the EMA of best.pt")
    args = parser.parse_args()
    for run in args.runs:
        r = confidence_report(run, args.threshold, args.raw_weights)
        print(f"{r['run']}{' (raw weights)' * args.raw_weights}: {r['confident_share']:.1%} of {r['val_images']} "
              f"validation images >= {args.threshold:.0%} sure, {r['confident_accuracy']:.1%} of those right "
              f"(all: {r['accuracy']:.2%})")


if __name__ == "__main__":
    main()
