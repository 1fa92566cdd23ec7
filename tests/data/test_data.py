from unittest import mock

import pytest
import torch

from cifarx.data import datasets as data
from cifarx.errors import CifarxError
from tests.conftest import make_image_folder


def test_image_folder_classes_come_from_folder_names(image_folder):
    image_set = data.load_split(str(image_folder), "train")
    assert image_set.class_names == ["airplane", "automobile", "bird", "cat"]
    assert image_set.images.shape == (96, 3, 32, 32) and image_set.images.dtype == torch.uint8
    assert torch.bincount(image_set.labels).tolist() == [24] * 4


def test_test_split_needs_no_train_folder(tmp_path):
    make_image_folder(tmp_path, "test", per_class=3)
    assert len(data.load_split(str(tmp_path), "test")) == 12
    with pytest.raises(CifarxError, match="no train/ folder"):
        data.load_split(str(tmp_path), "train")


def test_decoded_cache_is_reused_and_invalidated(image_folder, tmp_path):
    cache = tmp_path / "c"
    first = data.load_split(str(image_folder), "train", cache)
    assert len(list(cache.glob("images-*.pt"))) == 1
    with mock.patch.object(data, "decode_image", side_effect=AssertionError("decoded again")):
        second = data.load_split(str(image_folder), "train", cache)
    assert torch.equal(first.images, second.images)
    (image_folder / "train" / "cat" / "0000.png").unlink()  # the folder changed: a new key, a fresh decode
    third = data.load_split(str(image_folder), "train", cache)
    assert len(third) == 95 and len(list(cache.glob("images-*.pt"))) == 2


def test_unreadable_image_is_skipped_with_a_warning_naming_it(image_folder):
    bad = image_folder / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="broken.png"):
        image_set = data.load_split(str(image_folder), "train")
    assert len(image_set) == 96


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(CifarxError, match="data folder not found"):
        data.load_split(str(tmp_path / "nope"), "train")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(CifarxError, match="no images"):
        data.load_split(str(tmp_path), "train")


def test_cifar10_offline_is_one_clear_error(tmp_path):
    with mock.patch("torchvision.datasets.CIFAR10", side_effect=OSError("[Errno -3] name resolution failed")):
        with pytest.raises(CifarxError, match="offline.*--data DIR"):
            data.load_split("cifar10", "train", tmp_path)


def test_stratified_split_is_deterministic_exact_and_proportional():
    labels = torch.arange(10).repeat_interleave(100)
    kept, held = data.stratified_split(labels, 250, seed=3)
    kept2, held2 = data.stratified_split(labels, 250, seed=3)
    assert torch.equal(held, held2) and torch.equal(kept, kept2)
    assert len(held) == 250 and len(kept) == 750
    assert set(held.tolist()).isdisjoint(kept.tolist())
    counts = torch.bincount(labels[held], minlength=10)
    assert counts.min() >= 25 - 1 and counts.max() <= 25 + 1
    _, other = data.stratified_split(labels, 250, seed=4)
    assert not torch.equal(held, other)


def test_batch_augmentation_translates_flips_and_cuts_out():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 32, 32)
    moved = data.random_crop_flip_cutout(images, generator, pad=4, flip=False, cutout=0)
    assert moved.shape == images.shape and not torch.equal(moved, images)
    flipped = data.random_crop_flip_cutout(images, generator, pad=0, flip=True, cutout=0)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cut = data.random_crop_flip_cutout(torch.ones(64, 3, 32, 32), generator, pad=0, flip=False, cutout=8)
    zeros = (cut == 0).all(1).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0  # a full 8x8 square, or a clipped one at a border


def test_batch_augmentation_keeps_the_images_on_their_device():
    """Random draws come from a CPU generator; the masks and indices must follow the images (CUDA in training;
    the meta device stands in for it here)."""
    images = torch.zeros(4, 3, 32, 32, device="meta")
    augmented = data.random_crop_flip_cutout(images, torch.Generator().manual_seed(0), pad=4, flip=True, cutout=8)
    assert augmented.device == images.device and augmented.shape == images.shape


def test_colour_affine_distortion_draws_per_image_and_is_off_at_strength_zero():
    images = torch.rand(1, 3, 32, 32).expand(16, -1, -1, -1)  # one image, sixteen times
    distorted = data.random_colour_affine(images, torch.Generator().manual_seed(0), strength=0.5)
    assert distorted.shape == images.shape and 0 <= distorted.min() and distorted.max() <= 1
    assert len({tuple(row.flatten()[:64].tolist()) for row in distorted}) == 16  # every copy its own distortion
    again = data.random_colour_affine(images, torch.Generator().manual_seed(0), strength=0.5)
    assert torch.equal(distorted, again)  # fixed by the generator
    torch.testing.assert_close(data.random_colour_affine(images, None, strength=0.0), images)
    on_meta = data.random_colour_affine(torch.zeros(4, 3, 32, 32, device="meta"), None, strength=0.5)
    assert on_meta.device.type == "meta"


def test_class_index_matches_by_name():
    index = data.class_index(["cat", "dog", "bird"], ["bird", "cat"])
    assert index.tolist() == [2, 0]
    with pytest.raises(CifarxError, match="class mismatch"):
        data.class_index(["cat"], ["cat", "horse"])
