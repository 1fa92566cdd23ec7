"""The validation split proves itself: data that no longer yields a model's validation images is refused in one line
by every command that re-carves the split, instead of scoring a model on images it trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import CLASSES, assert_one_line_error, make_image_folder, run
from cifarx.data import datasets as datamod
from cifarx.data.split import ValidationSplit, images_digest
from cifarx.errors import CifarxError
from cifarx.training.checkpoint import read_checkpoint


@pytest.fixture
def grown_data(trained_run, tmp_path) -> Path:
    """The trained run's data with ten images added: the same seed now carves other validation images."""
    data = tmp_path / "grown"
    shutil.copytree(trained_run["data"], data)
    make_image_folder(tmp_path / "extra", "train", classes=CLASSES[:1], per_class=10, seed=7)
    for image in (tmp_path / "extra" / "train" / CLASSES[0]).iterdir():
        shutil.copy(image, data / "train" / CLASSES[0] / f"new-{image.name}")
    return data


def test_training_records_the_digest_of_its_validation_images(trained_run):
    payload = read_checkpoint(trained_run["run"] / "best.pt")
    split = ValidationSplit.of_checkpoint(payload)
    full = datamod.load_split(str(trained_run["data"]), "train")
    assert payload["val_digest"] == images_digest(split.held_out(full, "data"))
    from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split
    assert recorded_val_split(model_info(create_session(trained_run["onnx"])))["digest"] == payload["val_digest"]


def test_a_copy_of_the_same_images_is_the_same_split(trained_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run["data"], copy)
    result = run("eval", trained_run["onnx"], "--data", copy, "--split", "val", "--batch-sizes", "1", "--repeats", 1,
                 "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["eval", "quantize", "export", "resume", "combine"])
def test_data_that_carves_other_validation_images_is_refused(command, trained_run, grown_data, tmp_path):
    onnx, data = trained_run["onnx"], grown_data
    if command == "eval":
        result = run("eval", onnx, "--data", data, "--split", "val", "--batch-sizes", "1", "--repeats", 1)
    elif command == "quantize":
        result = run("quantize", onnx, "--data", data, "-o", tmp_path / "int8.onnx", "--calibration-images", 8)
    elif command == "export":
        result = run("export", trained_run["run"], "-o", tmp_path / "again.onnx", "--data", data)
    elif command == "combine":
        other = run("train", "--model", "simple-cnn", "--data", trained_run["data"], "--val-size", 16, "--epochs", 1,
                    "--batch-size", 16, "--seed", 0, "--out", tmp_path / "other")
        assert other.exit_code == 0, other.output
        result = run("combine", trained_run["run"], tmp_path / "other", "--out", tmp_path / "pair", "--data", data)
    else:  # a run whose data folder grew after it started
        started = run("train", "--model", "simple-cnn", "--data", data, "--val-size", 16, "--epochs", 1,
                      "--batch-size", 16, "--out", tmp_path / "run")
        assert started.exit_code == 0, started.output
        extra = data / "train" / CLASSES[1]
        for image in list(extra.iterdir())[:10]:
            shutil.copy(image, extra / f"copy-{image.name}")
        result = run("train", "--resume", tmp_path / "run", "--epochs", 2)
    assert_one_line_error(result, "no longer yields the validation images")
    assert not (tmp_path / "int8.onnx").exists() and not (tmp_path / "again.onnx").exists()


def test_a_split_chosen_on_the_command_line_is_not_checked(trained_run, grown_data):
    result = run("eval", trained_run["onnx"], "--data", grown_data, "--split", "val", "--val-size", 16, "--seed", 5,
                 "--batch-sizes", "1", "--repeats", 1)
    assert result.exit_code == 0, result.output


def test_a_model_without_a_digest_is_still_scored(trained_run, grown_data):
    """Files exported before splits recorded a digest cannot be checked; they are scored as before."""
    split = ValidationSplit(16, 0)
    assert len(split.held_out(datamod.load_split(str(grown_data), "train"), "data")) == 16


def test_a_wrong_digest_in_the_metadata_is_refused(trained_run):
    from cifarx.runtimes.onnxfile import recorded_val_split

    with pytest.raises(CifarxError, match="16 hex digits"):
        recorded_val_split({"metadata": {"val_split": json.dumps({"val_size": 16, "seed": 0, "digest": "<b>"})}})
