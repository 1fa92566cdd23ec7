"""Presets: every recipe file loads into a valid config, options override it, and `cifarx train --preset` runs."""

import json

import pytest
from click.testing import CliRunner

from cifarx.cli.main import cli
from cifarx.training.config import list_presets, load_preset, make_train_config
from cifarx.errors import CifarxError

REPORT_PRESETS = ["tp3-simple-cnn", "tp3-simple-cnn-plain", "tp3-simple-cnn-fast", "qmul-blocknet-small",
                  "qmul-blocknet", "blocknet-fast", "cityu-vgg16", "shake-shake-26-2x64d"]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_a_valid_described_recipe(name):
    from importlib import resources

    import tomllib

    text = (resources.files("cifarx.training.presets") / f"{name}.toml").read_text()
    assert tomllib.loads(text).get("description", "").strip(), "each preset says what it reproduces"
    config = make_train_config(name)  # validates: known keys, optimiser, schedule, augmentations, model
    assert config.preset == name


def test_a_preset_extends_its_base_with_only_what_it_changes(tmp_path, monkeypatch):
    fast, variant = load_preset("fast"), load_preset("fast-ensemble")
    assert variant == {**fast, "model": "ensemble", "model_kwargs": {"member": "fast", "size": 2},
                       "objective": "ensemble", "preset": "fast-ensemble"}
    (tmp_path / "a.toml").write_text('extends = "b"\nepochs = 1\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n')
    monkeypatch.setattr("cifarx.training.config.resources.files", lambda package: tmp_path)
    with pytest.raises(CifarxError, match="extends itself through a -> b"):
        load_preset("a")


def test_report_presets_are_shipped():
    assert set(REPORT_PRESETS) <= set(list_presets())


def test_report_recipes_keep_the_reported_settings():
    tp3 = make_train_config("tp3-simple-cnn")
    assert (tp3.optimizer, tp3.lr, tp3.schedule, tp3.milestones, tp3.gamma, tp3.epochs, tp3.batch_size) == \
        ("adam", 1e-3, "multistep", [75, 100], 0.5, 125, 32)
    assert tp3.augment == ["crop", "flip", "rotate", "autoaugment", "cutout"] and tp3.patience > 0
    qmul = make_train_config("qmul-blocknet")
    assert (qmul.optimizer, qmul.lr, qmul.batch_size, qmul.epochs) == ("rmsprop", 1e-3, 128, 40)
    assert qmul.model_kwargs["blocks"] == 4 and qmul.model_kwargs["channels"] == 128 and qmul.model_kwargs["dropout"] > 0
    small = make_train_config("qmul-blocknet-small")
    assert (small.lr, small.batch_size, small.epochs, small.model_kwargs["channels"]) == (0.01, 64, 30, 64)
    shake = make_train_config("shake-shake-26-2x64d")
    assert (shake.epochs, shake.schedule, shake.nesterov) == (1800, "cosine", True)


def test_options_override_the_preset():
    config = make_train_config("qmul-blocknet", epochs=2, lr=None)
    assert config.epochs == 2 and config.lr == load_preset("qmul-blocknet")["lr"]  # None means "not given"


def test_cli_option_overrides_the_preset(image_folder, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "qmul-blocknet-small", "--epochs", "2", "--data", str(image_folder),
                                      "--batch-size", "16", "--val-size", "16", "--train-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["preset"] == "qmul-blocknet-small"
    assert config["optimizer"] == "rmsprop" and config["model_kwargs"]["channels"] == 64  # the rest from the preset
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


@pytest.mark.parametrize("name", REPORT_PRESETS)
def test_cifarx_train_preset_runs_end_to_end(name, image_folder, tmp_path):
    """One tiny epoch of each recipe: its model, optimiser, schedule and augmentations (incl. the DataLoader path)."""
    out = tmp_path / "run"
    args = ["train", "--preset", name, "--data", str(image_folder), "--epochs", "1", "--batch-size", "8",
            "--train-size", "16", "--val-size", "8", "--out", str(out), "--set", "workers=0"]
    if name.startswith("shake-shake"):
        args += ["--model-arg", "width=8"]  # the recipe, not the 11.7M-parameter width, is under test here
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == name and summary["epochs_run"] == 1
    assert (out / "best.pt").is_file()
