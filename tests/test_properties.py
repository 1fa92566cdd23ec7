"""Property tests: whatever bytes arrive as an image, a model or a checkpoint, cifarx answers with a clean
CifarxError or a correct result; every valid image is preprocessed the same way for training and for predict.

Examples are derandomised (the same ones every run) and few, so the suite stays fast and stable; the broken
inputs are both raw bytes and real files with bytes changed or cut off, which reach deeper into the decoders.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarx.checkpoint import read_checkpoint
from cifarx.data import decode_image, load_split
from cifarx.errors import CifarxError
from cifarx.predict import load_images, predict
from tests.conftest import make_image_folder

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def encoded(array: np.ndarray, mode: str, image_format: str) -> bytes:
    image = Image.fromarray(array, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


GRADIENT = np.linspace(0, 255, 20 * 24 * 3).reshape(20, 24, 3).astype(np.uint8)
IMAGE_SEEDS = [encoded(GRADIENT, mode, fmt) for fmt, mode in
               [("PNG", "RGB"), ("PNG", "P"), ("JPEG", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("TIFF", "RGBA")]]


@st.composite
def damaged(draw, originals: list[bytes]) -> bytes:
    """One of `originals` with a few bytes overwritten and maybe cut short."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


@st.composite
def valid_images(draw) -> bytes:
    """A real image file: any size from 1x1 to 80x80, colour mode L/RGB/RGBA/P, PNG or JPEG, random pixels."""
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P"]))
    image_format = draw(st.sampled_from(["PNG", "JPEG"] if mode in ("L", "RGB") else ["PNG"]))  # JPEG stores no alpha/palette
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encoded(pixels, mode, image_format)


def write(folder: str, name: str, content: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(content)
    return path


def assert_probabilities(results: list[dict], classes: int) -> None:
    for result in results:
        probabilities = np.array([p for _, p in result["top"]])
        assert len(probabilities) == classes and np.all((probabilities >= 0) & (probabilities <= 1))
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.all(np.diff(probabilities) <= 0)  # ranked


# ---------------------------------------------------------------------------------------------- broken input


@FAST
@given(content=st.one_of(st.binary(max_size=2048), damaged(IMAGE_SEEDS)))
def test_any_bytes_as_an_image_give_a_clean_error_or_a_valid_batch(trained_run, content):
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "image.png", content)
        try:
            batch = load_images([path])
        except CifarxError as error:
            event("refused")
            assert "image.png" in str(error) and "\n" not in str(error)
            return
        event("decoded")
        assert batch.shape == (1, 3, 32, 32) and batch.dtype == np.float32
        assert np.isfinite(batch).all() and batch.min() >= 0 and batch.max() <= 1
        assert_probabilities(predict(trained_run["onnx"], [path], top_k=4), 4)


@FAST
@given(content=st.one_of(st.binary(max_size=2048), damaged(IMAGE_SEEDS)))
def test_any_bytes_in_a_data_folder_are_decoded_or_skipped_with_a_warning(content):
    with tempfile.TemporaryDirectory() as folder:
        make_image_folder(Path(folder), "train", classes=["cat", "dog"], per_class=1, size=8)
        write(folder, "train/cat/odd.png", content)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image_set = load_split(folder, "train", Path(folder) / "cache")
        skipped = [w for w in caught if "odd.png" in str(w.message)]
        event("skipped" if skipped else "decoded")
        assert (len(image_set), len(skipped)) in ((3, 0), (2, 1))
        assert image_set.images.shape[1:] == (3, 32, 32) and image_set.images.dtype == torch.uint8


@pytest.fixture(scope="module")
def model_bytes(trained_run) -> bytes:
    return trained_run["onnx"].read_bytes()


@FAST
@given(data=st.data())
def test_any_bytes_as_a_model_give_a_clean_error_or_valid_probabilities(trained_run, model_bytes, data, capfd):
    content = data.draw(st.one_of(st.binary(max_size=4096), damaged([model_bytes])))
    image = trained_run["data"] / "test" / "cat" / "0000.png"
    capfd.readouterr()
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "model.onnx", content)
        try:
            results = predict(path, [image], top_k=10)
        except CifarxError as error:
            event("refused")
            assert "\n" not in str(error)
        else:  # a changed weight still makes a model: its answers must still be probabilities
            event("predicted")
            assert_probabilities(results, len(results[0]["top"]))
    assert capfd.readouterr() == ("", "")  # ONNX Runtime printed nothing of its own


@pytest.fixture(scope="module")
def checkpoint_bytes(trained_run) -> bytes:
    return (trained_run["run"] / "best.pt").read_bytes()


@FAST
@given(data=st.data())
def test_any_bytes_as_a_checkpoint_give_a_clean_error_or_the_exact_weights(trained_run, checkpoint_bytes, data):
    content = data.draw(st.one_of(st.binary(max_size=4096), damaged([checkpoint_bytes])))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "best.pt", content)
        try:
            payload = read_checkpoint(path)
        except CifarxError as error:
            event("refused")
            assert "\n" not in str(error)
            return
    event("loaded")
    original = read_checkpoint(trained_run["run"] / "best.pt")["state_dict"]
    assert all(torch.equal(payload["state_dict"][k], original[k]) for k in original)  # never silently different


# ---------------------------------------------------------------------------------------------- valid input


@FAST
@given(images=st.lists(valid_images(), min_size=1, max_size=4))
def test_valid_images_preprocess_alike_for_training_and_predict_and_give_probabilities(trained_run, images):
    with tempfile.TemporaryDirectory() as folder:
        paths = [write(folder, f"{i}.img", content) for i, content in enumerate(images)]
        batch = load_images(paths)
        assert batch.shape == (len(paths), 3, 32, 32) and batch.dtype == np.float32
        assert batch.min() >= 0 and batch.max() <= 1
        for row, path in zip(batch, paths):
            decoded = decode_image(path)  # the training path: uint8 [3,32,32]
            assert decoded.shape == (3, 32, 32) and decoded.dtype == torch.uint8
            assert np.array_equal(np.rint(row * 255).astype(np.uint8), decoded.numpy())
        assert_probabilities(predict(trained_run["onnx"], paths, top_k=4), 4)
