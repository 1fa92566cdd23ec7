"""Data: sources (torchvision CIFAR-10, image folders), a decode-once uint8 cache, splits, batch-wise augmentation.

Images live as one uint8 tensor [N,3,H,W]; every model-facing batch is float32 in [0,1]. Augmentation of the
fast path works on whole batches of tensors (no per-image Python); policies that only exist per image in
torchvision (AutoAugment, rotation) go through a DataLoader with torchvision's own transforms.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from cifarx.data import images as imagemod
from cifarx.errors import CifarxError
from cifarx.data.images import IMAGE_SUFFIXES
from cifarx.io import atomic_torch_save, check_zip_checksums

IMAGE_SIZE = 32
CACHE_FORMAT = 1


@dataclass
class ImageSet:
    """Decoded images of one split: uint8 [N,3,32,32], int64 labels [N], and the class names in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.class_names)


def default_cache_dir() -> Path:
    """Where decoded images and downloads go: $CIFARX_CACHE, else the XDG cache folder."""
    if os.environ.get("CIFARX_CACHE"):
        return Path(os.environ["CIFARX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarx"


def load_split(data: str, split: str, data_root: str | os.PathLike | None = None) -> ImageSet:
    """Load `split` ('train' or 'test') of `data`: 'cifar10' (torchvision download) or an image-folder path."""
    if split not in ("train", "test"):
        raise CifarxError(f"unknown split {split!r}; use 'train' or 'test'")
    if data == "cifar10":
        return _load_torchvision_cifar10(split, Path(data_root) if data_root else default_cache_dir() / "cifar10")
    root = Path(data)
    if not root.is_dir():
        raise CifarxError(f"data folder not found: {data} (give an image folder with train/ and/or test/, or 'cifar10')")
    folder = root / split
    if not folder.is_dir():
        hint = ""
        if split == "test" and (root / "train").is_dir():
            hint = "; it has train/ only: score the model's validation split (held out of train/) with --split val"
        elif any(child.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in child.iterdir()) for child in root.iterdir()):
            hint = f"; {data} looks like a split folder itself (class folders of images): give its parent, --data {root.parent}"
        raise CifarxError(f"no {split}/ folder in {data}: expected {data}/{split}/<class>/<image files>{hint}")
    return _load_image_folder(folder, Path(data_root) if data_root else default_cache_dir())


def _load_torchvision_cifar10(split: str, root: Path) -> ImageSet:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=(split == "train"), download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise CifarxError(
            f"could not download CIFAR-10 into {root} ({type(error).__name__}: {error}); "
            "offline? point --data at an image folder instead (--data DIR with DIR/train/<class>/...)"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def _list_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    class_names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise CifarxError(f"no class folders in {folder}: expected {folder}/<class>/<image files>")
    for name in class_names:  # class names go into checkpoints, JSON and ONNX metadata, which hold text only
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise CifarxError(f"class folder name is not valid UTF-8: {shown} in {folder}; rename it") from None
    files: list[tuple[Path, int]] = []
    others: list[Path] = []
    for label, name in enumerate(class_names):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append((path, label))
            elif not path.name.startswith("."):
                others.append(path)
    if not files:
        raise CifarxError(f"no images ({', '.join(sorted(s[1:].upper() for s in IMAGE_SUFFIXES))}) under {folder}")
    if others:
        warnings.warn(f"skipping {len(others)} file(s) under {folder} that are not images by their suffix "
                      f"(e.g. {others[0].relative_to(folder)})")
    return class_names, files


def _cache_key(folder: Path, files: list[tuple[Path, int]]) -> str:
    """Hash of every file's relative path, size and mtime: any change to the folder makes a new key."""
    digest = hashlib.sha256(f"v{CACHE_FORMAT}:{IMAGE_SIZE}".encode())
    for path, label in files:
        stat = path.stat()
        # fsencode: a file name need not be UTF-8 (a Latin-1 name is bytes Python holds as surrogates)
        digest.update(os.fsencode(path.relative_to(folder)) + f"|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_image(path: Path, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One image file -> uint8 [3,size,size] RGB, decoded as predict decodes it (`cifarx.data.images.decode_image`)."""
    return torch.from_numpy(imagemod.decode_image(path, size))


def _load_image_folder(folder: Path, cache_dir: Path) -> ImageSet:
    class_names, files = _list_image_folder(folder)
    cache_path = cache_dir / f"images-{_cache_key(folder, files)}.pt"
    if cache_path.exists():
        try:
            check_zip_checksums(cache_path)  # a flipped bit would otherwise load as a changed pixel, silently
            cached = torch.load(cache_path, weights_only=True)
            return ImageSet(cached["images"], cached["labels"], list(cached["class_names"]))
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            reason = str(error) if isinstance(error, CifarxError) else type(error).__name__
            warnings.warn(f"ignoring unreadable image cache {cache_path} ({reason}); decoding the images again")
    images = torch.empty(len(files), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    labels = torch.empty(len(files), dtype=torch.int64)
    kept = 0
    for path, label in files:
        try:
            images[kept] = decode_image(path)
        except Exception as error:  # corrupt, truncated or bomb-sized: skip it, name it
            warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}")
            continue
        labels[kept] = label
        kept += 1
    if kept == 0:
        raise CifarxError(f"none of the {len(files)} image files under {folder} could be decoded")
    image_set = ImageSet(images[:kept].clone(), labels[:kept].clone(), class_names)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {"images": image_set.images, "labels": image_set.labels, "class_names": class_names}, cache_path
        )
    except (OSError, CifarxError) as error:  # a read-only or full cache only costs speed (atomic writes raise CifarxError)
        warnings.warn(f"could not write image cache {cache_path}: {error}")
    return image_set


def stratified_split(labels: torch.Tensor, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified split: (kept indices, `holdout` indices), classes in proportion to their counts."""
    if holdout < 0 or holdout >= len(labels):
        raise CifarxError(f"--val-size must be in [0, {len(labels) - 1}] for {len(labels)} images, got {holdout}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = torch.floor(counts.double() * holdout / len(labels)).long()
    # Hand the remaining slots to the classes with the largest fractional shares, so the total is exact.
    remainder = counts.double() * holdout / len(labels) - quota
    quota[torch.argsort(remainder, descending=True, stable=True)[: holdout - int(quota.sum())]] += 1
    # Rank of each shuffled index within its class: ranks below the class quota go to the holdout.
    shuffled = labels[order]
    position = torch.empty_like(order)
    sort = torch.argsort(shuffled, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position[sort] = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
    class_quota = torch.zeros(int(classes.max()) + 1, dtype=torch.long)
    class_quota[classes] = quota
    is_holdout = position < class_quota[shuffled]
    return order[~is_holdout].sort().values, order[is_holdout].sort().values


UNLABELLED = -1  # the label of an image whose label the training code must not see


def semi_supervised_subset(image_set: ImageSet, labelled: int | None, unlabelled: int | str, seed: int,
                           labelled_per_class: int | None = None) -> ImageSet:
    """A labelled subset (stratified, fixed by `seed`) followed by `unlabelled` other images labelled UNLABELLED.

    `labelled_per_class` takes exactly that many of each class instead of `labelled` in proportion. The unlabelled
    images are a random draw from the rest that never looks at their labels; `unlabelled='all'` takes all of it.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(image_set.labels)
    if labelled_per_class is not None:
        if labelled_per_class <= 0 or labelled_per_class > int(counts.min()):
            raise CifarxError(f"--labelled-per-class must be in [1, {int(counts.min())}] (the smallest class), "
                              f"got {labelled_per_class}")
        # Random order within each class: sort by label + a random fraction, then keep the first N of every class.
        order = torch.argsort(image_set.labels.double() + torch.rand(len(image_set), generator=generator, dtype=torch.float64))
        rank = torch.arange(len(image_set)) - (torch.cumsum(counts, 0) - counts)[image_set.labels[order]]
        labelled_index = order[rank < labelled_per_class].sort().values
    else:
        if labelled is None or not 0 < labelled < len(image_set):
            raise CifarxError(f"--labelled must be in [1, {len(image_set) - 1}] for {len(image_set)} training images, "
                              f"got {labelled}")
        _, labelled_index = stratified_split(image_set.labels, labelled, seed)
    rest = torch.ones(len(image_set), dtype=torch.bool)
    rest[labelled_index] = False
    rest_index = rest.nonzero().squeeze(1)
    count = len(rest_index) if unlabelled == "all" else int(unlabelled)
    if not 0 <= count <= len(rest_index):
        raise CifarxError(f"--unlabelled must be in [0, {len(rest_index)}] (or 'all'): {len(rest_index)} training "
                          f"images are left beside the labelled ones, got {unlabelled}")
    unlabelled_index = rest_index[torch.randperm(len(rest_index), generator=generator)[:count]].sort().values
    subset = image_set.subset(torch.cat([labelled_index, unlabelled_index]))
    subset.labels[len(labelled_index):] = UNLABELLED
    return subset


def mixed_batches(labels: torch.Tensor, batch_size: int, labelled_per_batch: int, steps: int,
                  generator: torch.Generator) -> torch.Tensor:
    """[steps, batch_size] indices, each row holding exactly `labelled_per_batch` labelled images (label >= 0).

    Each pool is drawn as back-to-back random permutations, so the small labelled pool is oversampled evenly
    (every labelled image about equally often) and the unlabelled one is covered before any image repeats.
    """

    def draw(pool: torch.Tensor, count: int) -> torch.Tensor:
        rounds = -(-count // len(pool))
        return pool[torch.rand(rounds, len(pool), generator=generator).argsort(1).flatten()[:count]]

    labelled_pool = (labels >= 0).nonzero().squeeze(1)
    unlabelled_pool = (labels < 0).nonzero().squeeze(1)
    if not 0 < labelled_per_batch < batch_size or not len(labelled_pool) or not len(unlabelled_pool):
        raise CifarxError("a mixed batch needs labelled and unlabelled images and 1 <= labelled per batch < batch size")
    return torch.cat([
        draw(labelled_pool, steps * labelled_per_batch).view(steps, labelled_per_batch),
        draw(unlabelled_pool, steps * (batch_size - labelled_per_batch)).view(steps, -1),
    ], 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 in [0,1]."""
    return images.float().div_(255)


def random_crop_flip_cutout(
    images: torch.Tensor,
    generator: torch.Generator | None,
    pad: int = 4,
    flip: bool | torch.Tensor = True,
    cutout: int = 0,
    translate_mode: str = "reflect",
) -> torch.Tensor:
    """Batch-wise augmentation of float [B,C,H,W] (images, or cached activations): random pad-and-crop (translate),
    horizontal flip, cutout.

    `flip`: True flips each image on a coin toss; a bool tensor [B] flips exactly the images it marks.
    """
    batch, channels, height, width = images.shape
    device = images.device  # random draws stay on the CPU generator (the same numbers on any device)
    if pad:
        padded = torch.nn.functional.pad(images, (pad,) * 4, mode=translate_mode)
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = (dy[:, None] + torch.arange(height))[:, None, :, None].to(device)
        cols = (dx[:, None] + torch.arange(width))[:, None, None, :].to(device)
        images = padded[torch.arange(batch, device=device)[:, None, None, None],
                        torch.arange(channels, device=device)[None, :, None, None], rows, cols]
    if isinstance(flip, torch.Tensor) or flip:
        flipped = (flip if isinstance(flip, torch.Tensor) else torch.rand(batch, generator=generator) < 0.5).to(device)
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if cutout:
        # A cutout x cutout square of zeros centred at a random pixel, clipped at the borders.
        top = torch.randint(0, height, (batch,), generator=generator)[:, None, None] - cutout // 2
        left = torch.randint(0, width, (batch,), generator=generator)[:, None, None] - cutout // 2
        y = torch.arange(height)[None, :, None]
        x = torch.arange(width)[None, None, :]
        hole = (y >= top) & (y < top + cutout) & (x >= left) & (x < left + cutout)
        images = images.masked_fill(hole[:, None].to(device), 0.0)
    return images


def random_colour_affine(images: torch.Tensor, generator: torch.Generator | None, strength: float) -> torch.Tensor:
    """Batch-wise photometric and geometric distortion of float [B,3,H,W] in [0, 1], each image its own draw:
    brightness, contrast and saturation factors in [1 - strength, 1 + strength], then a rotation of up to
    strength x 30 degrees and a shear of up to strength x 0.3 (reflected borders).

    For FixMatch's strong view. Written here because torchvision's ColorJitter, RandomAffine and RandAugment draw
    one set of parameters per call: per-image draws would need a Python loop over the batch.
    """
    batch, device = len(images), images.device

    def uniform(scale: float) -> torch.Tensor:  # [B, 1, 1, 1] in [-scale, scale], drawn on the CPU generator
        return (scale * (2 * torch.rand(batch, generator=generator) - 1)).to(device)[:, None, None, None]

    images = (images * (1 + uniform(strength))).clamp(0, 1)
    grey = images.mean((1, 2, 3), keepdim=True)
    images = (grey + (images - grey) * (1 + uniform(strength))).clamp(0, 1)
    luma = (images * torch.tensor([0.299, 0.587, 0.114], device=device)[None, :, None, None]).sum(1, keepdim=True)
    images = (luma + (images - luma) * (1 + uniform(strength))).clamp(0, 1)
    angle = uniform(strength * math.pi / 6).flatten()
    shear = uniform(strength * 0.3).flatten()
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, shear - sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool) -> Iterator[torch.Tensor]:
    """Index batches over range(n): shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def class_index(model_classes: Sequence[str], data_classes: Sequence[str]) -> torch.Tensor:
    """Map data labels to model output positions by class *name*; a data class the model lacks is an error."""
    missing = [name for name in data_classes if name not in model_classes]
    if missing:
        raise CifarxError(
            f"class mismatch: the data has {missing} which the model does not know (model classes: {list(model_classes)})"
        )
    return torch.tensor([list(model_classes).index(name) for name in data_classes], dtype=torch.int64)
