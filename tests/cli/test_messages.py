"""Messages a new user meets: a run in progress named as such, the folder to give, the nearest name to a typo."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error, make_image_folder, run
from cifarx.training import runfolder


def test_a_run_in_progress_without_a_checkpoint_is_named_as_such(tmp_path):
    run_dir = tmp_path / "run"
    with runfolder.claimed(run_dir, new_run=True):  # what a cifarx train in its first epoch holds
        assert_one_line_error(run("export", run_dir, "-o", tmp_path / "m.onnx"), "run in progress", "epoch 1")
        assert_one_line_error(run("train", "--resume", run_dir), "run in progress", "Ctrl-C")


def test_exporting_a_run_in_progress_says_which_epoch_the_checkpoint_holds(trained_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run["run"], run_dir)
    (run_dir / "summary.json").unlink()  # as while it trains
    with runfolder.claimed(run_dir, new_run=False):
        result = run("export", run_dir, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "in progress" in result.stderr and "the weights after epoch" in result.stderr and "?" not in result.stderr


def test_eval_on_a_folder_with_only_train_points_to_split_val(trained_run, tmp_path):
    data = make_image_folder(tmp_path / "data", "train", per_class=4)
    assert_one_line_error(run("eval", trained_run["onnx"], "--data", data), "--split val")
    assert_one_line_error(run("eval", trained_run["onnx"], "--data", data / "train", "--split", "val"),
                          f"give its parent, --data {data}")


def test_a_mistyped_model_or_preset_gets_the_nearest_name(tmp_path):
    assert_one_line_error(run("train", "--model", "simple_cnn", "--out", tmp_path / "r"), "did you mean simple-cnn?")
    assert_one_line_error(run("train", "--preset", "fats", "--out", tmp_path / "r"), "did you mean fast?")


def test_models_says_how_to_list_timm_backbones():
    result = run("models")
    assert result.exit_code == 0 and "cifarx models --timm" in result.output


@pytest.mark.parametrize("input_type", ["double", "uint8"])
def test_a_model_whose_input_is_not_float_is_refused_in_one_line_or_a_failed_row(input_type, tmp_path):
    from tests.report.test_report_untrusted import tiny_model

    model = tiny_model(tmp_path / "m.onnx", input_type=input_type)
    data = make_image_folder(tmp_path / "data", "test", classes=["red", "green", "blue"], per_class=2)
    image = next((data / "test" / "red").iterdir())
    dtype = {"double": "float64", "uint8": "uint8"}[input_type]
    assert_one_line_error(run("predict", model, image), f"input is {dtype}")
    assert_one_line_error(run("eval", model, "--data", data, "--batch-sizes", 1, "--repeats", 1), f"input is {dtype}")
    compared = run("compare", model, "--data", data, "--batch-sizes", 1, "--repeats", 1, "--json", tmp_path / "c.json")
    assert "Traceback" not in compared.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert rows and all(row["status"].startswith("failed") and f"input is {dtype}" in row["status"] for row in rows)
