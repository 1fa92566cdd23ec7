"""How right a self-training run's pseudo-labels were: per round, the teacher's accuracy on every unlabelled image and
the precision of the selection, against the labels the training code never saw (read here only, to measure).

    python benchmarks/pseudo_label_quality.py runs/st [--data DIR]

Rebuilds the run's training set with the unlabelled images' true labels (the same split and draw as
`batches.split_train_val`, with image indices in place of pixels), then scores each `round-K/pseudo_labels.pt`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from cifarx.data import datasets as datamod
from cifarx.data.split import ValidationSplit
from cifarx.training.config import TrainConfig


def hidden_labels(config: TrainConfig) -> torch.Tensor:
    """The true label of each row of the run's (semi-supervised) training set, unlabelled rows included."""
    full = datamod.load_split(config.data, "train", config.data_root)
    train_index, _ = ValidationSplit.of_run(config.to_dict()).indices(full, config.data)
    train = full.subset(train_index)
    if config.train_size and config.train_size < len(train):
        _, keep = datamod.stratified_split(train.labels, config.train_size, config.seed + 1)
        train = train.subset(keep)
    rows = datamod.ImageSet(images=torch.arange(len(train)).view(-1, 1, 1, 1), labels=train.labels.clone(),
                            class_names=train.class_names)  # indices in place of pixels: the draw reads labels only
    drawn = datamod.semi_supervised_subset(rows, config.labelled, config.unlabelled, config.seed + 2,
                                           config.labelled_per_class)
    return train.labels[drawn.images.flatten()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a self-training run folder")
    parser.add_argument("--data", help="the image folder, if not where the run found it")
    args = parser.parse_args()
    config = TrainConfig.from_dict(json.loads((Path(args.run) / "config.json").read_text()))
    config = dataclasses.replace(config, data=args.data or config.data)
    truth = hidden_labels(config)
    print("| round | teacher accuracy on the unlabelled images | pseudo-labels kept | their precision |")
    print("|---:|---:|---:|---:|")
    for path in sorted(Path(args.run).glob("round-*/pseudo_labels.pt")):
        saved = torch.load(path, weights_only=True)
        teacher = (saved["probabilities"].float().argmax(1) == truth[saved["unlabelled_rows"]]).float().mean()
        precision = (saved["labels"] == truth[saved["rows"]]).float().mean()
        print(f"| {path.parent.name.removeprefix('round-')} | {teacher:.2%} | {len(saved['rows']):,} | {precision:.2%} |")


if __name__ == "__main__":
    main()
