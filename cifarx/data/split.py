"""The validation split: the one definition of a run's held-out images, and the one policy for its edge cases.

Training carves it out; export's parity images, `eval --split val`, quantize's calibration (which avoids it) and
`combine` all rebuild it from what the run or the model file recorded. Policy: size 0 holds nothing out; a size
that leaves no training image (the data is smaller than the split, e.g. other --data than the run's) is refused.

A split proves itself: training records a digest of its validation images (pixels and labels), and every later
re-carving with that digest refuses, in one line, data that no longer yields the same images (a folder with images
added or removed, or another folder), since its "validation" images would then include training images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from cifarx.data import datasets as datamod
from cifarx.errors import CifarxError


@dataclass(frozen=True)
class ValidationSplit:
    """`size` images of a training split held out, stratified by class and fixed by `seed`."""

    size: int
    seed: int
    # what the held-out images were when the split was made (images_digest); None = not recorded, not checked
    digest: str | None = field(default=None, compare=False)

    @classmethod
    def of_run(cls, config: dict, digest: str | None = None) -> "ValidationSplit":
        """The split of a run's recorded settings: its `val_size`, and `split_seed` or else the run's `seed`."""
        split_seed = config.get("split_seed")
        return cls(config.get("val_size") or 0, config.get("seed", 0) if split_seed is None else split_seed, digest)

    @classmethod
    def of_checkpoint(cls, payload: dict) -> "ValidationSplit":
        """The split of a checkpoint's run, with the digest of the images training held out (if it recorded one)."""
        return cls.of_run(payload["config"], payload.get("val_digest"))

    @classmethod
    def of_model(cls, recorded: dict) -> "ValidationSplit | None":
        """The split a model file records (`{"val_size", "seed", "digest"}` from its metadata), or None."""
        if recorded.get("val_size") is None:
            return None
        return cls(recorded["val_size"], recorded.get("seed") or 0, recorded.get("digest"))

    def indices(self, full: datamod.ImageSet, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(training indices, validation indices) of `full`, a train split; `source` names the data. Refuses data
        whose validation images differ from those the split recorded."""
        labels = full.labels
        if not self.size:
            return torch.arange(len(labels)), torch.arange(0)
        if not 0 < self.size < len(labels):
            raise CifarxError(f"{source} has {len(labels)} training images: too few for a validation split of {self.size}")
        kept, held = datamod.stratified_split(labels, self.size, self.seed)
        if self.digest is not None and images_digest(full.subset(held)) != self.digest:
            raise CifarxError(
                f"{source} no longer yields the validation images recorded for this model ({len(labels)} training "
                f"images now; the {self.size} held out differ from those recorded): images were added, removed or "
                "changed, or this is another folder; give the data it was trained on")
        return kept, held

    def held_out(self, full: datamod.ImageSet, source: str) -> datamod.ImageSet:
        """The validation images of `full` (the data's train split)."""
        return full.subset(self.indices(full, source)[1])

    def training(self, full: datamod.ImageSet, source: str) -> datamod.ImageSet:
        """The images of `full` outside the validation split."""
        return full.subset(self.indices(full, source)[0])


def images_digest(image_set: datamod.ImageSet) -> str:
    """What identifies a set of images: a sha256 of their class names, labels and pixels, in order (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(image_set.class_names).encode())
    digest.update(image_set.labels.numpy().tobytes())
    digest.update(image_set.images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_eval_images(data: str, split: str, recorded: dict, data_root: str | None = None,
                     val_size: int | None = None, seed: int | None = None) -> datamod.ImageSet:
    """The images to score: the data's test split, or the model's own validation split (`recorded` is what its
    file says, `{"val_size", "seed", "digest"}`) re-carved from train and checked against its digest;
    `val_size` / `seed` replace what it records (another split by choice: nothing to check)."""
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
    digest = recorded.get("digest") if val_size is None and seed is None else None
    val_size = val_size if val_size is not None else recorded["val_size"]
    if val_size <= 0:
        raise CifarxError(f"--split val needs --val-size of at least 1, got {val_size}; or use --split test")
    seed = seed if seed is not None else recorded["seed"] or 0
    return ValidationSplit(val_size, seed, digest).held_out(datamod.load_split(data, "train", data_root), data)


def calibration_images(data: str, recorded: dict, count: int, data_root: str | None = None, seed: int = 0):
    """`count` training images (uint8 numpy [N,3,32,32]), stratified by class, outside the validation split a model
    file records (`recorded`, as `load_eval_images` takes it): what every int8 quantiser calibrates on."""
    if count < 1:
        raise CifarxError(f"calibration needs at least one image, got {count}")
    full = datamod.load_split(data, "train", data_root)
    split = ValidationSplit.of_model(recorded) or ValidationSplit(0, 0)
    kept = split.indices(full, data)[0]
    if count < len(kept):
        _, chosen = datamod.stratified_split(full.labels[kept], count, seed)
        kept = kept[chosen]
    return full.images[kept].numpy()
