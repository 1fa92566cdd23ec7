"""Shared fixtures: small synthetic image folders (never real CIFAR images), an isolated cache, and the CLI helpers
every test of a user mistake uses."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarx.training.checkpoint import read_checkpoint
from cifarx.training.runfolder import SilentReporter

CLASSES = ["airplane", "automobile", "bird", "cat"]
# Registry-wide tests build the widest families at a reduced width: the same layers and graph, an eighth of the
# channels (exported at full width they cost most of those tests' time; the full-width test is marked slow).
REDUCED_WIDTH = {"vgg16-bn": {"width": 8}, "shake-shake-26-2x64d": {"width": 8}}


def run(*args):
    """`cifarx ARGS` through click's CliRunner (stdout and stderr apart)."""
    from click.testing import CliRunner

    from cifarx.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit code 2, exactly one `error: ...` line on stderr naming the problem, and no traceback anywhere."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class ProgressRecorder(SilentReporter):
    """A reporter that keeps the progress of one-off passes (prefix activations, features) as (what, done, total)."""

    def __init__(self):
        self.calls = []

    def progress(self, description, done, total):
        self.calls.append((description, done, total))


def make_image_folder(root: Path, split: str, classes=CLASSES, per_class: int = 24, seed: int = 0, size: int = 32) -> Path:
    """Images whose colour and stripe direction depend on the class, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            image[..., label % 3] += 120
            if label % 2:
                image[::4] = 255
            else:
                image[:, ::4] = 255
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CIFARX_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "data"
    make_image_folder(root, "train", per_class=24)
    make_image_folder(root, "test", per_class=6, seed=1)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One tiny trained simple-cnn run and its ONNX export, shared by the tests that only read them."""
    from cifarx.training.config import make_train_config
    from cifarx.deploy.export import export_onnx
    from cifarx.training.run import train

    root = tmp_path_factory.mktemp("shared")
    data = make_image_folder(root / "data", "train", per_class=24)
    make_image_folder(root / "data", "test", per_class=6, seed=1)
    config = make_train_config(model="simple-cnn", data=str(data), epochs=2, batch_size=16, val_size=16,
                               out=str(root / "run"), lr=3e-3)
    summary = train(config)
    onnx_path = root / "model.onnx"
    export_onnx(root / "run", onnx_path, parity_count=16)
    return {"data": data, "run": root / "run", "onnx": onnx_path, "summary": summary}


def final_weights(run_dir):
    return read_checkpoint(run_dir / "last.pt")["train_state"]["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class AtStep(SilentReporter):
    """A reporter that does `act()` once, after `steps` training steps."""

    def __init__(self, steps):
        self.remaining = steps

    def advance(self, loss):
        self.remaining -= 1
        if self.remaining == 0:
            self.act()


class InterruptAt(AtStep):
    """Sends SIGINT to this process after `steps` training steps, like a user's Ctrl-C."""

    def act(self):
        os.kill(os.getpid(), signal.SIGINT)
