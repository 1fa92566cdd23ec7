"""Property tests: whatever bytes arrive as an image, a model or a checkpoint, cifarx answers with a clean
CifarxError or a correct result; every valid image is preprocessed the same way for training and for predict.

Examples are derandomised (the same ones every run) and few, so the suite stays fast and stable; the broken
inputs are both raw bytes and real files with bytes changed or cut off, which reach deeper into the decoders.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarx.training.checkpoint import read_checkpoint
from cifarx.data.datasets import decode_image, load_split
from cifarx.errors import CifarxError
from cifarx.runtimes.predict import load_images, predict
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


# ---------------------------------------------------------------------------------------------- option values


NUMERIC_SETTINGS = ["lr", "momentum", "weight_decay", "norm_lr_scale", "norm_weight_decay", "backbone_lr_scale",
                    "warmup_epochs", "initial_lr_fraction", "gamma", "final_lr_fraction", "label_smoothing", "ema_decay",
                    "lookahead_decay", "lookahead_power", "rotate_degrees", "labelled_fraction", "dist_timeout",
                    "crop_padding", "cutout_size", "epochs", "batch_size", "val_size", "ema_every", "lookahead_every"]
ANY_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                       st.sampled_from([float("nan"), float("inf"), -float("inf"), -1, 0, 1, 31, 32, 100]))


@FAST
@given(name=st.sampled_from(NUMERIC_SETTINGS), value=ANY_NUMBER,
       translate_mode=st.sampled_from(["reflect", "constant", "replicate", "bogus"]))
def test_any_number_as_a_setting_is_refused_in_one_line_or_finite_and_usable(name, value, translate_mode):
    from cifarx.training.config import make_train_config
    from cifarx.data.datasets import random_crop_flip_cutout

    try:
        config = make_train_config(**{name: value, "translate_mode": translate_mode})
    except CifarxError as error:
        event("refused")
        assert "\n" not in str(error)
        return
    event("accepted")
    for item in config.__dataclass_fields__:  # every number the run will use is finite
        setting = getattr(config, item)
        if isinstance(setting, float):
            assert np.isfinite(setting), (item, setting)
    # the accepted augmentation settings run on a batch of 32x32 images
    images = random_crop_flip_cutout(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0), pad=config.crop_padding,
                                     cutout=config.cutout_size, translate_mode=config.translate_mode)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------- ONNX metadata


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**7, 10**7) | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
METADATA_VALUES = {
    "class_names": st.one_of(JSON_VALUES.map(lambda v: json.dumps(v)), st.text(max_size=20),
                             st.lists(st.text(max_size=8), min_size=4, max_size=4).map(lambda v: json.dumps(v))),
    "input_size": st.one_of(st.text(max_size=8), st.integers(-10, 10**6).map(str), st.just("32")),
    "val_split": st.one_of(JSON_VALUES.map(lambda v: json.dumps(v)), st.text(max_size=20),
                           st.fixed_dictionaries({"val_size": JSON_VALUES, "seed": JSON_VALUES}).map(lambda v: json.dumps(v)),
                           st.fixed_dictionaries({"val_size": st.integers(-5, 200), "seed": st.integers(-5, 5)})
                           .map(lambda v: json.dumps(v))),
}


@pytest.fixture(scope="module")
def exported_proto(trained_run):
    import onnx

    return onnx.load(str(trained_run["onnx"]))


@FAST
@given(data=st.data())
def test_any_metadata_value_gives_a_clean_error_or_a_valid_answer(trained_run, exported_proto, data):
    import onnx

    from cifarx.data.split import load_eval_images
    from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split

    key = data.draw(st.sampled_from(sorted(METADATA_VALUES)))
    value = data.draw(METADATA_VALUES[key])
    model = onnx.ModelProto()
    model.CopyFrom(exported_proto)
    (prop,) = [p for p in model.metadata_props if p.key == key]
    prop.value = value
    image = trained_run["data"] / "test" / "cat" / "0000.png"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path))
        try:
            results = predict(path, [image], top_k=10)
            val_set = load_eval_images(str(trained_run["data"]), "val", recorded_val_split(model_info(create_session(path))))
        except CifarxError as error:
            event(f"{key} refused")
            assert "\n" not in str(error)
            return
    event(f"{key} accepted")
    assert_probabilities(results, 4)
    assert all(isinstance(name, str) for name, _ in results[0]["top"])
    assert len(val_set) > 0 and val_set.images.shape[1:] == (3, 32, 32)
