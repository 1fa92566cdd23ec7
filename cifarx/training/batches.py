"""Which images train and which validate (the split itself is `data/split.py`), and each epoch's training batches."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.data import datasets as datamod
from cifarx.training import distributed
from cifarx.training.config import TrainConfig
from cifarx.data.split import ValidationSplit
from cifarx.errors import CifarxError

PER_IMAGE_AUGMENTATIONS = {"rotate", "autoaugment", "erasing"}


PSEUDO_LABELS_FORMAT = "cifarx-pseudo-labels"  # a self-training round's selection file


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """Independent seeds per (run seed, epoch, random stream)."""
    return (seed * 100_003 + epoch) * 8 + stream


def split_train_val(config: TrainConfig) -> tuple[datamod.ImageSet, datamod.ImageSet]:
    """The training images and the stratified validation split carved from them."""
    full = datamod.load_split(config.data, "train", config.data_root)
    if len(full.class_names) < 2:  # every prediction would be right: an accuracy of 100% that means nothing
        raise CifarxError(f"{config.data} has one class ({full.class_names[0]}): a classifier needs two or more "
                          "class folders under train/")
    train_index, val_index = ValidationSplit.of_run(config.to_dict()).indices(full, config.data)
    train_set, val_set = full.subset(train_index), full.subset(val_index)
    if config.train_size and config.train_size < len(train_set):
        _, keep = datamod.stratified_split(train_set.labels, config.train_size, config.seed + 1)
        train_set = train_set.subset(keep)
    if config.labelled is not None or config.labelled_per_class is not None:
        # From here on only the labelled subset carries labels; the rest of train is -1 (or left out).
        train_set = datamod.semi_supervised_subset(train_set, config.labelled, config.unlabelled, config.seed + 2,
                                                   config.labelled_per_class)
    if config.pseudo_labels:  # a self-training student: the teacher's selected predictions label those images
        train_set = apply_pseudo_labels(train_set, config.pseudo_labels)
    return train_set, val_set


def _torchvision_transform(config: TrainConfig):
    from torchvision.transforms import v2

    steps = []
    if "crop" in config.augment:
        steps.append(v2.RandomCrop(32, padding=config.crop_padding, padding_mode=config.translate_mode))
    if "flip" in config.augment:
        steps.append(v2.RandomHorizontalFlip())
    if "rotate" in config.augment:
        steps.append(v2.RandomRotation(config.rotate_degrees))
    if "autoaugment" in config.augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if "cutout" in config.augment or "erasing" in config.augment:
        area = config.cutout_size**2 / 1024
        steps.append(v2.RandomErasing(p=1.0 if "cutout" in config.augment else 0.5, scale=(area, area), ratio=(1, 1)))
    return v2.Compose(steps)


class _TransformedImages(torch.utils.data.Dataset):
    def __init__(self, image_set: datamod.ImageSet, transform):
        self.image_set, self.transform = image_set, transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        return self.transform(self.image_set.images[index]), self.image_set.labels[index]


def scores_each_step(config: TrainConfig) -> bool:
    """Whether each step scores a pool of images to train on its hardest (--hard-selection scored)."""
    return config.hard_fraction < 1 and config.hard_selection == "scored"


def remembers_losses(config: TrainConfig) -> bool:
    """Whether each epoch trains on the images with the highest remembered loss (--hard-selection remembered)."""
    return config.hard_fraction < 1 and config.hard_selection == "remembered"


def drawn_batch_size(config: TrainConfig) -> int:
    """The images a training step draws: batch_size, or with per-step scoring the pool it picks them from."""
    return round(config.batch_size / config.hard_fraction) if scores_each_step(config) else config.batch_size


def steps_per_epoch(train_images: int, config: TrainConfig) -> int:
    """Optimiser steps an epoch: whole drawn batches of the training images, or of the share picked by remembered loss."""
    drawn = round(config.hard_fraction * train_images) if remembers_losses(config) else train_images
    return drawn // drawn_batch_size(config)


def remembered_pick(losses: torch.Tensor, config: TrainConfig, epoch: int) -> torch.Tensor:
    """The images (indices, shuffled) an epoch trains on under --hard-selection remembered: the hard_fraction with
    the highest remembered loss, ties (never-trained images are +inf) broken at random, so the first epochs go
    round every image once before any is repeated.

    Selective backprop without its scoring pass (the "stale" variant of Jiang et al. 2019, with the loss of the
    training forward pass as the memory): the losses are up to a few epochs old, which is what buys the saving."""
    generator = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 6))
    shuffled = torch.randperm(len(losses), generator=generator)
    hardest_first = shuffled[losses[shuffled].argsort(descending=True, stable=True)]
    picked = hardest_first[: round(config.hard_fraction * len(losses))]
    return picked[torch.randperm(len(picked), generator=generator)]


def picked_batches(picked: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """An epoch's batches of training-image indices, batch_size each, in the (shuffled) order of `picked`."""
    whole = len(picked) - len(picked) % config.batch_size
    return list(picked[:whole].split(config.batch_size))


def hardest(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, keep: int,
            forward_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` images of the batch with the highest cross-entropy (selective backprop, Jiang et al. 2019), scored
    in eval mode without gradients: BatchNorm's running statistics see only the images that train, and scoring costs
    a forward pass, not the backward one it saves."""
    model.eval()
    autocast = torch.autocast(images.device.type, dtype=forward_dtype, enabled=forward_dtype != torch.float32)
    with torch.no_grad(), autocast:
        losses = F.cross_entropy(model(images).float(), labels, reduction="none")
    model.train()
    chosen = losses.topk(keep, sorted=False).indices
    return images[chosen], labels[chosen]


def uses_dataloader(config: TrainConfig) -> bool:
    """Per-image torchvision policies (rotation, AutoAugment, erasing) need a DataLoader; the rest is batch-wise."""
    return bool(PER_IMAGE_AUGMENTATIONS & set(config.augment))


def training_batches(train_set: datamod.ImageSet, config: TrainConfig, epoch: int, device: torch.device,
                     images_on_device: torch.Tensor, rank: int = 0, world_size: int = 1,
                     index_batches: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's (float images in [0,1], labels) batches, deterministic in (seed, epoch); `index_batches` replaces
    the shuffled order with given batches of training-image indices (remembered-loss selection).

    Under torchrun every rank draws the same global batches (drawn_batch_size images) and keeps rows
    rank::world_size of each, so the ranks' shards are disjoint and together are what one process trains on.
    """
    order = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 0))
    batches = index_batches
    if batches is None:
        batches = datamod.iterate_batches(len(train_set), drawn_batch_size(config), order, drop_last=True)
    if uses_dataloader(config):
        # Each rank loads only its rows; per-image transforms use the rank's own random stream.
        shards = [index[rank::world_size].tolist() for index in batches]
        worker_seeds = torch.Generator().manual_seed(distributed.rank_seed(stream_seed(config.seed, epoch, 1), rank))
        loader = torch.utils.data.DataLoader(
            _TransformedImages(train_set, _torchvision_transform(config)), batch_sampler=shards,
            num_workers=config.workers, generator=worker_seeds, persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    augment = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 1))
    flips = alternating_flips(len(train_set), config.seed, epoch) if "alternating-flip" in config.augment else None
    labels_on_device = train_set.labels.to(device)
    if config.labelled_fraction and (train_set.labels == datamod.UNLABELLED).any():
        # Semi-supervised: the same number of steps, each batch with a fixed share of (oversampled) labelled images.
        drawn = drawn_batch_size(config)
        labelled_per_batch = min(drawn - 1, max(1, round(config.labelled_fraction * drawn)))
        batches = datamod.mixed_batches(train_set.labels, drawn, labelled_per_batch, len(train_set) // drawn, order)
    for index in batches:
        images = datamod.to_float(images_on_device[index.to(device)])
        images = datamod.random_crop_flip_cutout(
            images, augment, pad=config.crop_padding if "crop" in config.augment else 0,
            flip=flips[index] if flips is not None else "flip" in config.augment, cutout=config.cutout_size if "cutout" in config.augment else 0,
            translate_mode=config.translate_mode,
        )
        shard = slice(rank, None, world_size)  # augmented as one global batch: any world size sees the same images
        yield images[shard], labels_on_device[index.to(device)][shard]


def alternating_flips(count: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of the `count` training images are flipped in `epoch` under alternating-flip: a coin per image, tossed
    once for the run (from its seed), then every image's side swapped each epoch.

    airbench's trick: every two epochs show each image both ways, where a coin per epoch shows half of the images
    one way twice (airbench95's notes: 15 epochs with it match 17 without).
    """
    first = torch.rand(count, generator=torch.Generator().manual_seed(stream_seed(seed, 0, 3))) < 0.5
    return first ^ bool(epoch % 2)


def check_batches(train_set: datamod.ImageSet, config: TrainConfig) -> None:
    """Refuse, before anything is written, batch settings this training set cannot serve."""
    if len(train_set) < drawn_batch_size(config) or not steps_per_epoch(len(train_set), config):
        pool = f" (a pool of {drawn_batch_size(config)} for --hard-fraction)" if scores_each_step(config) else ""
        share = f" ({config.hard_fraction:g} of them an epoch)" if remembers_losses(config) else ""
        raise CifarxError(f"batch size {config.batch_size}{pool} is larger than the {len(train_set)} training images{share}")
    if "alternating-flip" in config.augment and uses_dataloader(config):
        raise CifarxError("alternating-flip needs batch-wise augmentation (crop, cutout), not "
                          f"{sorted(PER_IMAGE_AUGMENTATIONS & set(config.augment))}")
    if config.labelled_fraction and uses_dataloader(config):
        raise CifarxError("labelled_fraction needs batch-wise augmentation (crop, flip, cutout), not "
                          f"{sorted(PER_IMAGE_AUGMENTATIONS & set(config.augment))}")


def resolve_device(name: str) -> torch.device:
    """The torch device the batches go to; CUDA asked for where there is none is refused in one line."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarxError(f"--device {name} asked for, but PyTorch sees no CUDA device here; use --device cpu")
    return device


def apply_pseudo_labels(train_set: datamod.ImageSet, path: str | Path) -> datamod.ImageSet:
    """The labelled images plus the unlabelled ones the file selects, carrying their pseudo-labels."""
    saved = torch.load(path, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != PSEUDO_LABELS_FORMAT:
        raise CifarxError(f"{path} is not a cifarx pseudo-label file")
    if saved["train_images"] != len(train_set):
        raise CifarxError(f"{path} was made for {saved['train_images']} training images, this run has "
                          f"{len(train_set)}: the data, seed or --labelled/--unlabelled changed")
    labels = train_set.labels.clone()
    labels[saved["rows"]] = saved["labels"]
    # the images keep their order: a student whose teacher kept every image trains on the very tensor the teacher
    # pass cached (--cached-features computes the prefix once for both)
    kept = (labels != datamod.UNLABELLED).nonzero().squeeze(1)
    return datamod.ImageSet(train_set.images[kept], labels[kept], train_set.class_names)
