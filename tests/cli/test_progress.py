"""Progress that tells the truth: a resumed epoch counts its replayed steps, says where it resumes, times the whole
epoch, and output without a terminal keeps whole lines."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.conftest import InterruptAt, make_image_folder
from cifarx.errors import TrainingInterrupted
from cifarx.training.checkpoint import read_checkpoint
from cifarx.training.config import make_train_config
from cifarx.training.run import train


CIFARX = [sys.executable, "-c", "from cifarx.cli import main; main()"]


def plain_env(tmp_path) -> dict:
    """The environment of a pipe or a log file: no terminal, no COLUMNS."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "FORCE_COLOR", "TERM")}
    return {**env, "CIFARX_CACHE": str(tmp_path / "cache")}


class Recorder(InterruptAt):
    """Keeps what the loop reports; interrupts after `steps` steps when `steps` is given."""

    def __init__(self, steps=-1):
        super().__init__(steps)
        self.epochs, self.advances, self.messages = [], 0, []

    def start_epoch(self, epoch, epochs, steps, done=0):
        self.epochs.append((epoch, steps, done))

    def advance(self, loss):
        self.advances += 1
        super().advance(loss)

    def message(self, text):
        self.messages.append(text)


def test_a_resumed_epoch_counts_its_replayed_steps_and_says_where_it_resumes(tmp_path):
    data = make_image_folder(tmp_path / "data", "train", per_class=24)
    config = make_train_config(model="simple-cnn", data=str(data), epochs=2, batch_size=16, val_size=16,
                               out=str(tmp_path / "run"))  # 80 training images: 5 steps an epoch
    first = Recorder(steps=3)
    with pytest.raises(TrainingInterrupted):
        train(config, reporter=first)
    assert first.messages[0].startswith("training simple-cnn on 80 images") and first.epochs == [(0, 5, 0)]

    done = read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["run"]["step_in_epoch"]
    assert 0 < done < 5

    resumed = Recorder()
    train(resume=tmp_path / "run", reporter=resumed)
    assert resumed.epochs[0] == (0, 5, done)  # the bar starts at done/5, not 0/5, and ends at 5/5
    assert resumed.advances == (5 - done) + 5
    assert f"at epoch 1 step {done + 1} of 5" in resumed.messages[0] and "replayed" in resumed.messages[0]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    # the resumed epoch's time covers the part before the Ctrl-C too, as train_seconds does
    assert float(rows[0]["epoch_seconds"]) == pytest.approx(float(rows[0]["train_seconds"]), rel=0.05)


def test_without_a_terminal_tables_and_lines_are_not_cut(trained_run, tmp_path):
    result = subprocess.run([*CIFARX, "eval", str(trained_run["onnx"]), "--data", str(trained_run["data"]), "--split",
                             "val", "--batch-sizes", "1", "--repeats", "1"],
                            capture_output=True, text=True, env=plain_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and "onnxruntime" in result.stdout.lower(), result.stdout


def test_training_into_a_log_prints_plain_progress_lines_not_bars(tmp_path):
    data = make_image_folder(tmp_path / "data", "train", per_class=24)
    result = subprocess.run([*CIFARX, "train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--val-size",
                             "16", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=plain_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("epoch 2/2 ")]
    assert 1 <= len(progress) <= 4 and "left" in progress[-1], result.stdout
    assert "\r" not in result.stdout and "\x1b" not in result.stdout


def test_the_time_left_is_each_runs_own_when_one_process_trains_several(monkeypatch):
    """Self-training trains a teacher, then a student, in one process: the student's time left comes from its own
    steps, not from the teacher's run and the pass between them."""
    import importlib

    cli_main = importlib.import_module("cifarx.cli.main")
    now = [0.0]
    monkeypatch.setattr(cli_main.time, "perf_counter", lambda: now[0])
    reporter = cli_main.RichReporter(bars=False)
    reporter.start_epoch(0, 1, 2)  # the teacher: 2 steps, 1 s each
    for _ in range(2):
        now[0] += 1
        reporter.advance(1.0)
    now[0] = 1000.0  # the teacher's pass over the unlabelled images
    reporter.start_epoch(0, 10, 100)  # the student
    for _ in range(3):
        now[0] += 1
        reporter.advance(1.0)
    assert reporter._run_left() == f"run ~{cli_main._duration(997)} left"  # 1 s a step, 997 steps to go
