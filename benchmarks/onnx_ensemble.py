"""What averaging shipped models would give: each ONNX file alone and their mean class probabilities, on the
validation split the files record (they must record the same one), and the pairwise disagreement.

    python benchmarks/onnx_ensemble.py exported/efficientnet-lite0.onnx exported/efficientnet-lite2.onnx \
        --data ~/cifar10-jpeg --threads 2 --out benchmarks/results/transfer-ensemble.json

A reading for a recipe that trains both members: it costs the sum of their training and inference. The mean of
the probabilities and the mean of the logits are both reported: members trained apart need not share a logit scale,
and the `ensemble` model (`cifarx combine`, which ships the members as one file) averages logits. --subsets also
scores every group of two or more of the files (each file runs once), to choose members before combining them.
--weighted asks whether weighting the members' logits would beat their plain mean without fitting the weights to the
images they are scored on: the weights are chosen on one half of the split and scored on the other, both ways round.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

from cifarx.data.split import load_eval_images
from cifarx.runtimes.measuring import predict_logits
from cifarx.runtimes.onnxfile import recorded_val_split
from cifarx.io import atomic_write_json
from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


WEIGHTED_MAX_FILES = 4
WEIGHT_GRID = np.round(np.arange(0.5, 2.01, 0.1), 2)  # each member's weight relative to the first file's 1


def cross_validated_weights(logits: list[np.ndarray], labels: np.ndarray, seed: int = 0) -> dict:
    """Accuracy of the weighted mean of the logits when each half of the images is scored with the weights that
    did best on the other half (so the figure is not fitted to the images it counts), and those weights."""
    halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
    grid = [(1.0, *rest) for rest in itertools.product(WEIGHT_GRID, repeat=len(logits) - 1)]

    def correct(weights, images) -> int:
        mixed = sum(weight * member[images] for weight, member in zip(weights, logits))
        return int((mixed.argmax(1) == labels[images]).sum())

    chosen = [max(grid, key=lambda weights: correct(weights, fit)) for fit in halves]
    right = sum(correct(weights, scored) for weights, scored in zip(chosen, halves[::-1]))
    return {"accuracy": right / len(labels), "weights_per_half": [[float(w) for w in weights] for weights in chosen]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--subsets", action="store_true", help="also score every group of two or more files")
    parser.add_argument("--weighted", action="store_true",
                        help="also score a weighted mean of the logits, weights chosen on the other half of the split")
    args = parser.parse_args()
    if len(args.models) < 2:
        sys.exit("give two or more ONNX files")
    if args.weighted and len(args.models) > WEIGHTED_MAX_FILES:
        sys.exit(f"--weighted searches a grid of weights per member: give at most {WEIGHTED_MAX_FILES} files")
    sessions = {path: create_session(path, threads=args.threads) for path in args.models}
    infos = {path: model_info(session) for path, session in sessions.items()}
    splits = {path: recorded_val_split(info) for path, info in infos.items()}
    if len({(s["val_size"], s["seed"]) for s in splits.values()}) != 1 or not splits[args.models[0]]["val_size"]:
        sys.exit(f"the files must record one and the same validation split, got {splits}")
    images = load_eval_images(args.data, "val", recorded_val_split(infos[args.models[0]]))
    logits, seconds = {}, {}
    for path in args.models:
        start = time.perf_counter()
        logits[path] = predict_logits(sessions[path], infos[path], images.images.numpy())
        seconds[path] = round(time.perf_counter() - start, 1)
    probabilities = {path: softmax(values) for path, values in logits.items()}
    labels = images.labels.numpy()
    predictions = {path: p.argmax(1) for path, p in probabilities.items()}

    def accuracy(members: tuple[Path, ...], scores: dict[Path, np.ndarray]) -> float:
        return float((np.mean([scores[path] for path in members], 0).argmax(1) == labels).mean())

    result = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        **cpu_flags(), "threads": args.threads, "val_images": len(labels), "val_split": splits[args.models[0]],
        "members": [{"file": str(path), "val_accuracy": float((predictions[path] == labels).mean()),
                     "seconds_for_the_split": seconds[path]} for path in args.models],
        "disagreement": {f"{a} / {b}": float((predictions[a] != predictions[b]).mean())
                         for a, b in itertools.combinations(args.models, 2)},
        "ensemble_val_accuracy": accuracy(tuple(args.models), probabilities),
        "ensemble_val_accuracy_mean_logits": accuracy(tuple(args.models), logits),
    }
    if args.subsets:
        groups = [members for size in range(2, len(args.models)) for members in itertools.combinations(args.models, size)]
        result["subsets"] = [{"files": [str(path) for path in members], "mean_logits": accuracy(members, logits),
                              "mean_probabilities": accuracy(members, probabilities)} for members in groups]
    if args.weighted:
        result["weighted_mean_logits_cross_validated"] = cross_validated_weights(
            [logits[path] for path in args.models], labels)
    if args.out:
        atomic_write_json(args.out, result)
    for member in result["members"]:
        print(f"{member['file']}: {member['val_accuracy']:.2%} ({member['seconds_for_the_split']} s)")
    print(f"mean probabilities: {result['ensemble_val_accuracy']:.2%}, mean logits: "
          f"{result['ensemble_val_accuracy_mean_logits']:.2%}; disagreement {result['disagreement']}")
    if args.weighted:
        weighted = result["weighted_mean_logits_cross_validated"]
        print(f"weighted mean logits, weights chosen on the other half: {weighted['accuracy']:.2%} "
              f"(weights {weighted['weights_per_half']})")
    for subset in result.get("subsets", []):
        print(f"{' + '.join(subset['files'])}: mean probabilities {subset['mean_probabilities']:.2%}, "
              f"mean logits {subset['mean_logits']:.2%}")


if __name__ == "__main__":
    main()
