"""Partial fine-tuning that costs only what it trains: the frozen prefix's activations computed once per image.

With `--freeze N --cached-features` (a timm EfficientNet, N trailing stages trained), the frozen layers (normalise,
resize, stem, the frozen stages) are in eval mode whatever the step, so their output for an image never changes:
it is computed ONCE per image, batch-wise, for the plain image and its horizontal flip (train) or the plain image
(validation), kept in a compact dtype (`cache_dtype`, float16 by default) in memory and cached on disk beside the
linear probe's features. The one training loop (train.py) then trains the trailing stages and the head on them:

- `PrefixInputs.view(model)` is the model seen from the activations: its forward is the model's
  `forward_from_prefix`, with the model's own parameters (not a copy), so the optimiser, EMA, schedule and
  checkpoints see the ordinary whole model and a checkpoint exports like any other.
- `PrefixInputs.training_batches` replaces the image batches: each epoch, seeded by (seed, epoch) like the image
  batches, a shuffled order and, per sample, the plain or the flipped copy. With `crop` in the augmentations the
  activations are translated too, by up to `crop_padding` pixels of the 32-pixel image expressed in cells of the
  activation map (at least one): an approximation of translating the image (the frozen prefix is translation
  equivariant only up to its strides and borders), but it costs nothing to compute, where computing translated
  copies would multiply the cache. With `cutout`, a square of `cutout_size` pixels of the 32-pixel image, in cells
  (at least one), is zeroed in each sample's activations (the prefix ends in a linear projection + BatchNorm, so zero
  is not "nothing seen", only a value the activations take: a regulariser like dropout, measured, not an occlusion).
  Per-image policies (rotate, autoaugment, erasing) and alternating flips cannot act on cached activations: refused.

Why flips are computed rather than flipping activations: 'same' padding and stride-2 convolutions on even sizes
are not mirror-symmetric, so the flip of an image's activation is not the activation of its flip.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from cifarx.data import datasets as datamod
from cifarx.training.batches import drawn_batch_size, stream_seed
from cifarx.errors import CifarxError
from cifarx.io import atomic_write

CACHE_FORMAT = 1
PREFIX_BATCH_SIZE = 64  # images per prefix pass: bounds the memory of upsampled activations (224 px: ~1 GB)
# The cache may take this share of MemAvailable: the trailing stages' activations and gradients, the images and
# every other process of the machine need the rest.
MEMORY_SHARE = 0.7
# What acts on cached activations (flip: the cached flipped copy; crop, cutout: in cells of the activation map).
CACHED_AUGMENTATIONS = ("crop", "flip", "cutout")


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (/proc/meminfo MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_or_compute(path: Path, compute: Callable[[], torch.Tensor], nbytes: int | None = None) -> tuple[torch.Tensor, bool]:
    """(tensor, whether it came from the cache file `path`); a computed one is written there when the disk has room.

    Large caches are memory-mapped on load, so reading one back costs page cache, not a second copy in memory.
    """
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except Exception:  # a damaged cache is recomputed, never trusted
            warnings.warn(f"ignoring unreadable feature cache {path}")
    tensor = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = nbytes or tensor.numel() * tensor.element_size()
        if shutil.disk_usage(path.parent).free < 1.2 * needed + (1 << 30):
            warnings.warn(f"not caching {needed / 2**30:.2f} GiB of features in {path.parent}: too little free disk")
        else:
            # torch.save straight to the temporary file: a multi-GB cache is not serialised in memory first
            atomic_write(path, lambda temporary: torch.save(tensor, temporary))
    except (CifarxError, OSError, RuntimeError) as error:  # a read-only or full cache only costs time (torch's zip
        # writer reports a full disk as a RuntimeError)
        warnings.warn(f"could not write feature cache: {error}")
    return tensor, False


def prefix_cache_key(model: nn.Module, images: torch.Tensor, dtype: torch.dtype, copies: int) -> str:
    """Hash of what the prefix activations depend on: backbone, size, freeze point, dtype, copies, the prefix's
    tensors (normalisation included) and the images; the trained stages do not enter it, so resuming reuses it."""
    depth = model.prefix_depth
    digest = hashlib.sha256(f"prefix v{CACHE_FORMAT}|{model.export_metadata['backbone']}|{model.resize_to}|"
                            f"{depth}|{dtype}|{copies}".encode())
    layers = [model.normalize, *model.feature_layers()[:depth]]
    for index, layer in enumerate(layers):
        for name, tensor in layer.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                digest.update(f"{index}.{name}".encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def prefix_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of one image's prefix activations."""
    was_training = model.training
    model.eval()
    shape = tuple(model.forward_prefix(torch.zeros(1, 3, 32, 32, device=model.normalize.mean.device)).shape[1:])
    model.train(was_training)
    return shape


@torch.no_grad()
def compute_prefix(model: nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype, flip: bool,
                   channels_last: bool = False, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Prefix activations of uint8 images [N,3,32,32], in batches, model in eval mode: [N,2,C,H,W] (plain, flipped)
    when `flip`, else [N,C,H,W]; in `dtype` on the CPU, written into one preallocated tensor (no second copy).
    `progress(done, total)` is called after each batch (the pass takes minutes on a CPU)."""
    was_training = model.training
    model.eval()
    copies = 2 if flip else 1
    out = torch.empty((len(images), copies, *prefix_shape(model)), dtype=dtype)
    for index in datamod.iterate_batches(len(images), PREFIX_BATCH_SIZE, None, drop_last=False):
        batch = datamod.to_float(images[index]).to(device)
        versions = (batch, batch.flip(3)) if flip else (batch,)
        for copy, version in enumerate(versions):
            if channels_last:
                version = version.contiguous(memory_format=torch.channels_last)
            out[index, copy] = model.forward_prefix(version).to("cpu", dtype)
        if progress:
            progress(int(index[-1]) + 1, len(images))
    model.train(was_training)
    return out if flip else out[:, 0]


def cached_prefix(model: nn.Module, images: torch.Tensor, flip: bool, config, device: torch.device, reporter,
                  nbytes: int | None = None) -> tuple[torch.Tensor, bool]:
    """(prefix activations of `images`, loaded from the disk cache?): computed once, then read back by any run or
    teacher pass with the same prefix, dtype, copies and images."""
    dtype = getattr(torch, config.cache_dtype)
    path = datamod.default_cache_dir() / "features" / f"prefix-{prefix_cache_key(model, images, dtype, 2 if flip else 1)}.pt"
    progress = functools.partial(reporter.progress, f"prefix activations of {len(images)} images")
    return load_or_compute(path, lambda: compute_prefix(model, images, device, dtype, flip, config.channels_last,
                                                        progress), nbytes)


@torch.no_grad()
def prefix_probabilities(model: nn.Module, images: torch.Tensor, rows: torch.Tensor, config, device: torch.device,
                         reporter, flip: bool) -> torch.Tensor:
    """[len(rows), classes] softmax of `model` (a self-training teacher) on the cached prefix activations of
    images[rows], averaged over the plain and flipped copies when `flip`. The cache is that of all `images` with the
    copies the run's augmentation makes, so the student (trained on the same images) loads what this computes."""
    copies = 2 if "flip" in config.augment else 1
    activations, _ = cached_prefix(model, images, copies == 2, config, device, reporter)
    if copies == 1:
        activations = activations.unsqueeze(1)
    views = range(activations.shape[1] if flip else 1)
    model.eval()
    chunks = []
    for index in datamod.iterate_batches(len(rows), config.eval_batch_size, None, drop_last=False):
        batch = activations[rows[index]]
        chunks.append(torch.stack([model.forward_from_prefix(batch[:, view].to(device).float()).softmax(1)
                                   for view in views]).mean(0).cpu())
    return torch.cat(chunks)


class FromPrefix(nn.Module):
    """`model` seen from its cached prefix activations: forward is `model.forward_from_prefix` on the model's own
    parameters (a view, not a copy), so training it trains `model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_prefix(activations.float())


class PrefixInputs:
    """The cached prefix activations of a run's training images (plain + flipped) and validation images (plain)."""

    def __init__(self, train: torch.Tensor, train_labels: torch.Tensor, val: datamod.ImageSet, seconds: float,
                 from_cache: bool, per_image_bytes: int = 0, translate_cells: int = 0, cutout_cells: int = 0):
        self.train, self.train_labels = train, train_labels  # [N,copies,C,H,W] in the cache dtype
        self.val_set = val  # ImageSet whose `images` are [M,C,H,W] activations: train.evaluate takes it as it is
        self.seconds, self.from_cache, self.per_image_bytes = seconds, from_cache, per_image_bytes
        self.translate_cells = translate_cells  # random translation of the training activations, 0 = none
        self.cutout_cells = cutout_cells  # side of the square zeroed in each training sample's activations, 0 = none

    def summary(self) -> dict:
        """What the run's summary.json records of the cache (its seconds are part of `train_seconds`)."""
        return {"prefix_seconds": round(self.seconds, 1), "prefix_from_cache": self.from_cache,
                "prefix_translate_cells": self.translate_cells, "prefix_cutout_cells": self.cutout_cells,
                "prefix_bytes_per_image": self.per_image_bytes, "prefix_shape": list(self.train.shape[2:]),
                "cache_dtype": str(self.train.dtype).removeprefix("torch.")}

    @classmethod
    def build(cls, model: nn.Module, train_set: datamod.ImageSet, val_set: datamod.ImageSet, config, device: torch.device,
              reporter, memory: int | None = None) -> "PrefixInputs":
        """Check the cache fits (one line if not), then compute or load it; `memory` defaults to MemAvailable."""
        start = time.perf_counter()
        if not hasattr(model, "forward_prefix"):
            raise CifarxError("--cached-features is for timm/<name> models with --freeze")
        if model.prefix_depth == 0:
            raise CifarxError("--cached-features needs a frozen backbone prefix: --freeze all, or --freeze N with N "
                              "smaller than the backbone's stages")
        if (train_set.labels < 0).any():
            raise CifarxError("cached prefix activations train supervised stages: unlabelled images are not supported")
        if config.objective != "supervised":
            raise CifarxError(f"--cached-features trains with the supervised objective, not {config.objective}")
        uncacheable = [name for name in config.augment if name not in CACHED_AUGMENTATIONS]
        if uncacheable:
            raise CifarxError(f"--cached-features augments the cached activations with {', '.join(CACHED_AUGMENTATIONS)} "
                              f"only, not {', '.join(uncacheable)}: drop it from --augment")
        dtype = getattr(torch, config.cache_dtype)  # one of config.CACHE_DTYPES, checked by validate()
        copies = 2 if "flip" in config.augment else 1
        shape = prefix_shape(model)
        per_image = copies * dtype.itemsize * int(torch.tensor(shape).prod())
        train_bytes = per_image * len(train_set)
        total = train_bytes + per_image // copies * len(val_set)
        memory = available_memory() if memory is None else memory
        cost = (f"{'x'.join(map(str, shape))} {config.cache_dtype} x {copies} ({'plain + flip' if copies == 2 else 'plain'})"
                f" = {per_image / 1024:.1f} KiB per image, {total / 2**30:.2f} GiB for {len(train_set)} + {len(val_set)} images")
        if memory is not None and total > MEMORY_SHARE * memory:
            raise CifarxError(f"the cached prefix would not fit in memory: {cost}, over {MEMORY_SHARE:.0%} of the "
                              f"{memory / 2**30:.2f} GiB available; train more stages (--freeze), a smaller "
                              "--img-size or a smaller cache_dtype")
        reporter.message(f"cached prefix at {model.resize_to}px: {cost}")
        translate_cells, cutout_cells = translation_cells(config, shape[-1]), cutout_square(config, shape[-1])
        if translate_cells:
            reporter.message(f"crop: the training activations are translated by up to {translate_cells} cell"
                             f"{'s' * (translate_cells > 1)} of {shape[-1]} ({config.translate_mode} padding)")
        if cutout_cells:
            reporter.message(f"cutout: a {cutout_cells}x{cutout_cells} square of the {shape[-1]}x{shape[-1]} "
                             "training activations zeroed per sample")
        train, train_cached = cached_prefix(model, train_set.images, copies == 2, config, device, reporter, train_bytes)
        val, val_cached = cached_prefix(model, val_set.images, False, config, device, reporter, total - train_bytes)
        seconds = time.perf_counter() - start
        reporter.message(f"prefix activations {'loaded from the cache' if train_cached and val_cached else 'computed'}"
                         f" in {seconds:.1f}s")
        if copies == 1:
            train = train.unsqueeze(1)
        return cls(train, train_set.labels, datamod.ImageSet(val, val_set.labels, val_set.class_names), seconds,
                   train_cached and val_cached, per_image, translate_cells, cutout_cells)

    @staticmethod
    def view(model: nn.Module) -> FromPrefix:
        """The step model (or the EMA's validation model) that takes activations instead of images."""
        return FromPrefix(model)

    def training_batches(self, config, epoch: int, device: torch.device,
                         index_batches: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's (activations, labels) batches, deterministic in (seed, epoch): a shuffled order (the image
        batches' stream; or `index_batches` as given), per sample its plain or flipped copy (the augmentation
        stream), with `crop` a translation and with `cutout` a zeroed square (a stream each, so a run without one
        draws the same batches as before)."""
        order = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 0))
        flips = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 1))
        shifts = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 4))
        holes = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 5))
        copy = torch.randint(self.train.shape[1], (len(self.train),), generator=flips)
        if index_batches is None:
            index_batches = datamod.iterate_batches(len(self.train), drawn_batch_size(config), order, drop_last=True)
        for index in index_batches:
            activations = self.train[index, copy[index]].to(device).float()
            if self.translate_cells:
                activations = datamod.random_crop_flip_cutout(activations, shifts, pad=self.translate_cells, flip=False,
                                                              translate_mode=config.translate_mode)
            if self.cutout_cells:
                activations = datamod.random_crop_flip_cutout(activations, holes, pad=0, flip=False,
                                                              cutout=self.cutout_cells)
            yield activations, self.train_labels[index].to(device)


def translation_cells(config, side: int) -> int:
    """How far `crop` translates activations of `side` x `side` cells: `crop_padding` pixels of the 32-pixel image
    in cells, at least one (a run that asks for crop gets some translation) and less than the side (reflect padding
    needs it); 0 without crop."""
    if "crop" not in config.augment or not config.crop_padding:
        return 0
    return min(side - 1, max(1, round(config.crop_padding * side / 32)))


def cutout_square(config, side: int) -> int:
    """The side, in cells of a `side` x `side` activation map, of the square `cutout` zeroes: `cutout_size` pixels of
    the 32-pixel image, at least one cell; 0 without cutout."""
    if "cutout" not in config.augment or not config.cutout_size:
        return 0
    return min(side, max(1, round(config.cutout_size * side / 32)))
