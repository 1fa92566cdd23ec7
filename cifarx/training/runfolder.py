"""A run folder and what is written into it: the lock while a run writes, config.json, metrics.csv and curves.png,
summary.json, the run state saved in every last.pt, and what a reporter shows meanwhile.

A folder holding a run's checkpoints is never trained into afresh (that would overwrite them): only `--resume`
continues it. A folder being written is locked (`flock` on the folder itself, released by the kernel when the
process ends, even by kill -9), so a second writer is refused instead of mixing two runs' files.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from cifarx.errors import CifarxError
from cifarx.io import atomic_savefig, atomic_write_json, atomic_write_text

CHECKPOINTS = ("last.pt", "best.pt")


class Reporter(Protocol):
    # `done`: steps of the epoch already trained before a resume (replayed, not trained again)
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def advance(self, loss: float) -> None: ...
    def end_epoch(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...
    # A one-off pass before training (prefix activations, features): `done` of `total` images, ending at total.
    def progress(self, description: str, done: int, total: int) -> None: ...


class SilentReporter:
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def advance(self, loss: float) -> None: ...
    def end_epoch(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def progress(self, description: str, done: int, total: int) -> None: ...


@dataclass
class RunState:
    """What changes during a run (besides model/optimiser/EMA tensors); saved in every last.pt."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already trained (non-zero only in Ctrl-C checkpoints)
    global_step: int = 0
    train_seconds: float = 0.0
    best_val_accuracy: float = -1.0
    epochs_since_best: int = 0
    history: list[dict] = field(default_factory=list)
    # "labelled": images with a label among those seen (train accuracy's denominator; -1 = unlabelled image)
    # "seconds": the epoch's wall time before a Ctrl-C, so a resumed epoch's epoch_seconds covers both parts
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0, "seen": 0, "labelled": 0,
                                                   "data_seconds": 0.0, "seconds": 0.0})
    # global torch RNG at step_in_epoch (dropout, stochastic depth...); one row per rank under torchrun
    rng_state: "torch.Tensor | None" = None  # noqa: F821  (torch is not imported here: the CLI reads runs without it)
    train_images: int = 0  # so an unfinished run's card can say what it was trained on
    val_images: int = 0
    # --hard-selection remembered: each training image's loss at the last step that trained it (+inf = not yet), and
    # the images the epoch in progress picked from them (kept so a Ctrl-C resume replays the same batches)
    remembered_losses: "torch.Tensor | None" = None  # noqa: F821
    picked: "torch.Tensor | None" = None  # noqa: F821


def check_new_run_folder(run_dir: Path) -> None:
    """Refuse, in one line, a folder that holds a run's checkpoints: a new run there would overwrite them."""
    held = [name for name in CHECKPOINTS if (run_dir / name).exists()]
    if held == ["best.pt"] and not (run_dir / "summary.json").exists():
        return  # stopped before its first resumable checkpoint: nothing to resume, so a new run may replace it
    if held:
        raise CifarxError(f"{run_dir} already holds a run ({', '.join(held)}); continue it with --resume {run_dir}, "
                          "or give another --out")


def unused_run_folder(run_dir: Path) -> Path:
    """`run_dir` if it holds no run, else the first of RUN_DIR-2, RUN_DIR-3 ... that holds none."""
    candidate, number = run_dir, 1
    while any((candidate / name).exists() for name in CHECKPOINTS):
        number += 1
        candidate = run_dir.with_name(f"{run_dir.name}-{number}")
    return candidate


@contextlib.contextmanager
def claimed(run_dir: Path, new_run: bool) -> Iterator[None]:
    """Hold `run_dir` (made if absent) for this process while the block runs; a second writer gets one line.

    `new_run`: the folder must hold no run's checkpoints, checked again under the lock (another run may have
    written them since the caller's first check)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise CifarxError(f"cannot write to {run_dir}: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CifarxError(f"cannot lock run folder {run_dir}: {error.strerror or error}") from None
            raise CifarxError(f"run folder {run_dir} is in use by another cifarx train; wait for it to end, "
                              "or give another --out") from None
        if new_run:
            check_new_run_folder(run_dir)
        yield
    finally:
        os.close(handle)  # releases the lock


def write_config(run_dir: Path, config_dict: dict) -> None:
    atomic_write_json(run_dir / "config.json", config_dict)


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and the training-curve PNG, from the epoch history."""
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    import matplotlib.pyplot as plt  # the backend is chosen where the process starts (the CLI: Agg)

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker=".", label=split)
        accuracy_axis.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker=".", label=split)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks on a short run
    figure.tight_layout()  # the two panels' labels kept apart
    atomic_savefig(figure, run_dir / "curves.png")
    plt.close(figure)


def start_line(model: str, data: str, train_images: int, val_images: int, run_dir: Path) -> str:
    """What a new run says first, once its data has loaded (so never for a folder that turns out not to exist)."""
    return f"training {model} on {train_images} images of {data} ({val_images} held out for validation) -> {run_dir}"


def epoch_row(epoch: int, partial: dict, validation: dict, lr: float, epoch_seconds: float, train_seconds: float) -> dict:
    """One line of metrics.csv: the epoch's training sums turned into means, validation figures, timings."""
    return {
        "epoch": epoch,
        "train_loss": partial["loss_sum"] / partial["seen"],
        "train_accuracy": partial["correct"] / max(1, partial["labelled"]),
        "val_loss": validation["loss"],
        "val_accuracy": validation["accuracy"],
        "lr": lr,
        "epoch_seconds": epoch_seconds,
        "data_seconds": partial["data_seconds"],
        "train_seconds": train_seconds,
    }


def write_summary(run_dir: Path, config_dict: dict, state: RunState, extra: dict | None = None) -> dict:
    """summary.json: final and best validation figures and the training time (plus `extra`); returns it."""
    has_val = state.val_images > 0
    summary = {
        "model": config_dict["model"], "preset": config_dict.get("preset"), "epochs_run": len(state.history),
        "train_seconds": round(state.train_seconds, 1), "train_images": state.train_images,
        # None, not NaN, when there is no validation split (--val-size 0): JSON has no NaN
        "final_val_accuracy": state.history[-1]["val_accuracy"] if has_val else None,
        "best_val_accuracy": state.best_val_accuracy if has_val else None,
        "val_images": state.val_images, "seed": config_dict.get("seed"),
        **(extra or {}),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def run_record(run_dir: Path) -> dict:
    """What a run folder says about its run: summary.json once finished; while it trains (or was stopped), the
    same fields from last.pt's run state, with `finished` False and `epochs` the number of epochs asked for."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return {**json.loads(summary_path.read_text()), "finished": True}
    if not (run_dir / "last.pt").is_file():
        raise CifarxError(f"no summary.json or last.pt in run folder {run_dir}: not a cifarx run")
    from cifarx.training.checkpoint import read_checkpoint

    payload = read_checkpoint(run_dir / "last.pt")
    state = RunState(**(payload.get("train_state") or {}).get("run", {}))
    history, has_val = state.history, state.val_images > 0
    return {
        "model": payload["model"]["name"], "preset": payload["config"].get("preset"), "epochs_run": len(history),
        "epochs": payload["config"].get("epochs"), "train_seconds": round(state.train_seconds, 1),
        "train_images": state.train_images or None,
        "final_val_accuracy": history[-1]["val_accuracy"] if history and has_val else None,
        "best_val_accuracy": state.best_val_accuracy if history and has_val else None,
        "val_images": state.val_images, "seed": payload["config"].get("seed"), "finished": False,
    }


DATA_OPTIONS = ("--data", "--data-root")  # where this machine keeps images: a placeholder on a card
RUN_OPTIONS = ("--out", "--resume", "--val-run", "--compare-torch")  # run folders: runs/NAME, as `cifarx train` makes


def portable_run_path(run: str | Path, cwd: Path | None = None) -> str:
    """A run folder as a card names it: relative to the current folder, else runs/NAME (never this machine's
    absolute path)."""
    path, cwd = Path(run), (cwd or Path.cwd()).resolve()
    if not path.is_absolute():
        return str(path)
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else f"runs/{path.name}"


def portable_command(command: str, cwd: Path | None = None) -> str:
    """A recorded command line that anyone can run: image folders become DIR, paths inside the current folder
    become relative, other absolute paths keep their name (run folders under runs/)."""
    import shlex

    cwd = (cwd or Path.cwd()).resolve()
    words = shlex.split(command)
    for i in range(1, len(words)):
        option, value = words[i - 1], words[i]
        if option in DATA_OPTIONS:
            words[i] = value if value == "cifar10" else "DIR"
        elif Path(value).is_absolute() and not value.startswith("-"):
            path = Path(value)
            if path.is_relative_to(cwd) or option in RUN_OPTIONS or (words[1] == "export" and i == 2) or (
                    words[1] == "combine" and not option.startswith("-")):  # combine's run folders
                words[i] = portable_run_path(path, cwd)
            else:
                words[i] = path.name
    return shlex.join(words)


def train_command(config: dict) -> str:
    """The command line recorded by `cifarx train`; for runs started otherwise, one rebuilt from the settings."""
    if config.get("command"):
        return portable_command(config["command"])
    import shlex

    from cifarx.training.config import TrainConfig

    defaults = TrainConfig().to_dict()
    words = ["cifarx", "train"] + (["--preset", config["preset"]] if config.get("preset") else [])
    for key, value in config.items():
        if key in ("data", "data_root", "out") and value is not None:
            words += [f"--{key.replace('_', '-')}", value]  # named, so portable_command can rewrite the path
        elif key not in ("preset", "command") and key in defaults and value != defaults[key]:
            words += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return portable_command(shlex.join(words))
