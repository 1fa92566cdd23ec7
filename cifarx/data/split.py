"""The validation split: the one definition of a run's held-out images, and the one policy for its edge cases.

Training carves it out; export's parity images, `eval --split val`, quantize's calibration (which avoids it) and
`combine` all rebuild it from what the run or the model file recorded. Policy: size 0 holds nothing out; a size
that leaves no training image (the data is smaller than the split, e.g. other --data than the run's) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifarx.data import datasets as datamod
from cifarx.errors import CifarxError


@dataclass(frozen=True)
class ValidationSplit:
    """`size` images of a training split held out, stratified by class and fixed by `seed`."""

    size: int
    seed: int

    @classmethod
    def of_run(cls, config: dict) -> "ValidationSplit":
        """The split of a run's recorded settings: its `val_size`, and `split_seed` or else the run's `seed`."""
        split_seed = config.get("split_seed")
        return cls(config.get("val_size") or 0, config.get("seed", 0) if split_seed is None else split_seed)

    @classmethod
    def of_model(cls, recorded: dict) -> "ValidationSplit | None":
        """The split a model file records (`{"val_size", "seed"}` from its metadata), or None when it records none."""
        if recorded.get("val_size") is None:
            return None
        return cls(recorded["val_size"], recorded.get("seed") or 0)

    def indices(self, labels: torch.Tensor, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(training indices, validation indices) of a train split of these `labels`; `source` names the data."""
        if not self.size:
            return torch.arange(len(labels)), torch.arange(0)
        if not 0 < self.size < len(labels):
            raise CifarxError(f"{source} has {len(labels)} training images: too few for a validation split of {self.size}")
        return datamod.stratified_split(labels, self.size, self.seed)

    def held_out(self, full: datamod.ImageSet, source: str) -> datamod.ImageSet:
        """The validation images of `full` (the data's train split)."""
        return full.subset(self.indices(full.labels, source)[1])

    def training(self, full: datamod.ImageSet, source: str) -> datamod.ImageSet:
        """The images of `full` outside the validation split."""
        return full.subset(self.indices(full.labels, source)[0])


def load_eval_images(data: str, split: str, recorded: dict, data_root: str | None = None,
                     val_size: int | None = None, seed: int | None = None) -> datamod.ImageSet:
    """The images to score: the data's test split, or the model's own validation split (`recorded` is what its
    file says, `{"val_size", "seed"}`) re-carved from train; `val_size` / `seed` replace what it records."""
    if split == "test":
        return datamod.load_split(data, "test", data_root)
    if split != "val":
        raise CifarxError(f"unknown split {split!r}; use test or val")
    if val_size is None and recorded["val_size"] is None:
        raise CifarxError("the model records no validation split (not a cifarx export?); give --val-size and --seed, "
                          "or use --split test")
    if val_size is None and recorded["val_size"] == 0:
        # Its "validation" images would be images it trained on: a score on them says nothing about new images.
        raise CifarxError("the model has no validation split: it was trained on every training image (val_size 0); "
                          "score it with --split test (DATA/test/<class>/...)")
    val_size = val_size if val_size is not None else recorded["val_size"]
    if val_size <= 0:
        raise CifarxError(f"--split val needs --val-size of at least 1, got {val_size}; or use --split test")
    seed = seed if seed is not None else recorded["seed"] or 0
    return ValidationSplit(val_size, seed).held_out(datamod.load_split(data, "train", data_root), data)
