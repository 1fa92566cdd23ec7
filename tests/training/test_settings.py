"""Each training setting is declared once (TrainConfig's field metadata); the CLI, `--set`, validation and the
command a model card records all read that declaration, so they agree on the whole list."""

import dataclasses
import shlex
import typing

import click
import pytest

from cifarx.cli.main import cli
from cifarx.deploy.card import train_command
from cifarx.training.config import TrainConfig, make_train_config, option_settings

TRAIN = cli.commands["train"]
CLI_ONLY = {"preset", "method", "img_size", "freeze", "pretrained", "weights", "freeze_bn", "freeze_depthwise",
            "model_args", "settings", "resume", "nproc"}  # not TrainConfig fields: recipes, model arguments, launch


def test_every_declared_option_is_a_train_option_with_its_choices_and_help():
    options = {param.name: param for param in TRAIN.params}
    declared = {item.name: item for item in option_settings()}
    assert set(options) == set(declared) | CLI_ONLY
    for name, item in declared.items():
        option = options[name]
        assert option.help.startswith(item.metadata["help"])
        if item.metadata["choices"] and isinstance(option.type, click.Choice):
            assert tuple(option.type.choices) == tuple(item.metadata["choices"])
        assert option.default in (None, click.core.UNSET)  # unset: the preset's or the default's value stays


def test_every_field_has_one_declaration_and_set_accepts_it():
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig().to_dict()
    for item in dataclasses.fields(TrainConfig):
        assert item.name in hints
        config = make_train_config(settings={item.name: defaults[item.name]})  # --set NAME=its default
        assert getattr(config, item.name) == defaults[item.name]


@pytest.mark.parametrize("item", [item for item in dataclasses.fields(TrainConfig) if item.metadata.get("choices")],
                         ids=lambda item: item.name)
def test_a_value_outside_the_declared_choices_is_refused_in_one_line(item):
    from cifarx.errors import CifarxError

    value = ["no-such-choice"] if isinstance(TrainConfig().to_dict()[item.name], list) else "no-such-choice"
    with pytest.raises(CifarxError, match=f"unknown {item.name}") as error:
        make_train_config(settings={item.name: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("item", [item for item in dataclasses.fields(TrainConfig)
                                  if item.metadata.get("above") is not None or item.metadata.get("low") is not None],
                         ids=lambda item: item.name)
def test_a_value_below_the_declared_range_is_refused(item):
    from cifarx.errors import CifarxError

    bound = item.metadata["above"] if item.metadata["above"] is not None else item.metadata["low"]
    with pytest.raises(CifarxError, match=f"--{item.name.replace('_', '-')} must be"):
        make_train_config(settings={item.name: type(TrainConfig().to_dict()[item.name] or 0)(bound - 1)})


def test_the_card_command_rebuilds_the_same_config_through_the_cli(monkeypatch):
    """A card's command (`train_command`, rebuilt from the settings) parsed by the CLI gives the recorded settings."""
    import cifarx.training.run

    config = make_train_config("fast", epochs=3, lr=0.5, augment=["crop"], tta="flip", label_smoothing=0.1,
                               out="runs/x")
    command = train_command({**config.to_dict(), "command": None})
    seen = []
    monkeypatch.setattr(cifarx.training.run, "train", lambda config, reporter: seen.append(config) or {})
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    rebuilt = seen[0].to_dict()
    for name in ("epochs", "lr", "augment", "tta", "label_smoothing", "model", "model_kwargs"):
        assert rebuilt[name] == config.to_dict()[name], name


def test_generated_options_parse_lists_unions_and_flags(monkeypatch, image_folder, tmp_path):
    import cifarx.training.run
    from click.testing import CliRunner

    seen = []
    monkeypatch.setattr(cifarx.training.run, "train", lambda config, reporter: seen.append(config) or {})
    result = CliRunner().invoke(cli, ["train", "--model", "fast", "--data", str(image_folder), "--epochs", "3",
                                      "--augment", "crop,cutout", "--no-channels-last", "--labelled", "8",
                                      "--unlabelled", "all", "--set", "objective=fixmatch", "--tta", "flip",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert config.augment == ["crop", "cutout"] and config.channels_last is False
    assert config.unlabelled == "all" and config.labelled == 8 and config.tta == "flip" and config.epochs == 3
