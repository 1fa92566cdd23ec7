"""Training under torchrun: two gloo ranks on CPU against one process, Ctrl-C and --resume, a rank that dies.

The comparison uses simple-cnn-plain (no BatchNorm, no dropout) and SGD: then two ranks compute the single-process
step up to the order of float sums (DDP averages the two half-batch gradients), so the stated tolerance is tight.
With BatchNorm each rank normalises its half-batch (--sync-bn fixes that on GPUs only: torch's SyncBatchNorm is CUDA).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cifarx.training import distributed
from cifarx.training.checkpoint import read_checkpoint
from cifarx.cli.main import cli
from cifarx.training.config import make_train_config
from cifarx.errors import CifarxError
from cifarx.training.batches import split_train_val, training_batches
from cifarx.training.run import train
from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(model="simple-cnn-plain", epochs=3, batch_size=16, val_size=16, optimizer="sgd", lr=0.02)


def options(**overrides) -> list[str]:
    """SETTINGS (and overrides) as command-line options."""
    return [part for key, value in {**SETTINGS, **overrides}.items() for part in (f"--{key.replace('_', '-')}", str(value))]


OPTIONS = options()
RUN_FILES = ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv", "summary.json"]
LOSS_TOLERANCE = 1e-4  # relative, per epoch (measured: ~1e-6)
WEIGHT_TOLERANCE = 1e-3  # absolute, final weights (measured: ~1e-4 after 15 steps)


def process_env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CIFARX_CACHE=str(cache))


def torchrun(*args, cache: Path, **popen) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 -m cifarx ARGS` (a free port each time)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cifarx", *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=process_env(cache), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its timing columns (the only ones a rerun may change)."""
    with open(run_dir / "metrics.csv") as file:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(file)]


def final_weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "last.pt")["train_state"]["model"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the job ended (code {process.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout:.0f}s"
        time.sleep(0.005)


def rank_pids(job: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
    environments = {int(pid): Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children}
    return {int(item[5:]): pid for pid, env in environments.items() for item in env if item.startswith(b"RANK=")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict:
    """The same run on one process (in this one) and on two gloo ranks under torchrun."""
    root = tmp_path_factory.mktemp("distributed")
    cache = root / "cache"
    data = make_image_folder(root / "data", "train", per_class=24)  # 80 training images: 5 global batches an epoch
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARX_CACHE", str(cache))
        train(make_train_config(data=str(data), out=str(root / "one"), **SETTINGS))
    job = torchrun("train", "--data", data, "--out", root / "runs" / "two", *OPTIONS, cache=cache)
    stdout, stderr = job.communicate(timeout=600)
    return {"root": root, "data": data, "cache": cache, "one": root / "one", "two": root / "runs" / "two",
            "code": job.returncode, "stdout": stdout, "stderr": stderr}


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_on_the_same_global_batch(reference_runs):
    assert reference_runs["code"] == 0, reference_runs["stderr"][-3000:]
    two = reference_runs["two"]
    assert os.listdir(two.parent) == ["two"] and sorted(os.listdir(two)) == RUN_FILES  # rank 0 alone wrote, once
    assert reference_runs["stdout"].count("training simple-cnn-plain") == 1  # rank 0 alone printed
    assert reference_runs["stdout"].count('"epochs_run": 3') == 1
    one_rows, two_rows = metric_rows(reference_runs["one"]), metric_rows(two)
    assert len(one_rows) == len(two_rows) == 3
    for one, other in zip(one_rows, two_rows):
        for key in ("train_loss", "val_loss"):
            assert float(other[key]) == pytest.approx(float(one[key]), rel=LOSS_TOLERANCE), (key, one, other)
        for key in ("train_accuracy", "val_accuracy"):  # a borderline image may flip: one of 16 val images at most
            assert abs(float(other[key]) - float(one[key])) <= 1 / 16 + 1e-9, (key, one, other)
    ours, theirs = final_weights(two), final_weights(reference_runs["one"])
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_and_nproc_resume_ends_bit_for_bit_like_the_uninterrupted_job(
        reference_runs, tmp_path):
    cut = tmp_path / "cut"
    job = torchrun("train", "--data", reference_runs["data"], "--out", cut, *OPTIONS, cache=reference_runs["cache"])
    wait_for(cut / "metrics.csv", job)  # epoch 1 is done; 10 steps to go
    # SIGINT to rank 1 alone: rank 0 must stop at the same step and write last.pt. (A terminal's Ctrl-C reaches every
    # process, and torchrun forwards it too, but then gives the ranks 30 s, which a loaded test machine can exceed.)
    os.kill(rank_pids(job)[1], signal.SIGINT)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0 and "interrupted at epoch" in stderr, stderr[-3000:]
    assert not (cut / "summary.json").exists()
    state = read_checkpoint(cut / "last.pt")["train_state"]["run"]
    assert state["step_in_epoch"] > 0 and state["rng_state"].shape[0] == 2  # mid-epoch, one RNG row per rank

    resumed = subprocess.run([sys.executable, "-m", "cifarx", "train", "--nproc", "2", "--resume", str(cut)], cwd=REPO,
                             env=process_env(reference_runs["cache"]), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metric_rows(cut) == metric_rows(reference_runs["two"])
    ours, theirs = final_weights(cut), final_weights(reference_runs["two"])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_with_one_clear_line_instead_of_a_hang(reference_runs, tmp_path):
    # Ranks started by hand (no torchrun agent to stop the survivor): the survivor must notice on its own.
    out, port = tmp_path / "run", free_port()
    ranks = [
        subprocess.Popen([sys.executable, "-m", "cifarx", "train", "--data", str(reference_runs["data"]), "--out", str(out),
                          *options(epochs=100)], cwd=REPO, text=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=dict(process_env(reference_runs["cache"]), RANK=str(rank),
                                                          WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                                          MASTER_PORT=str(port)))
        for rank in range(2)
    ]
    try:
        wait_for(out / "metrics.csv", ranks[0])
        ranks[1].kill()
        _, stderr = ranks[0].communicate(timeout=120)  # far below dist_timeout (600 s): noticed, not timed out
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: rank 0 of 2 lost contact with the other ranks")


# ---------------------------------------------------------------------------------------------- in this process


@pytest.mark.parametrize("augment", [["crop", "flip", "cutout"], ["rotate"]])  # batch-wise; per image (DataLoader)
def test_ranks_train_on_disjoint_rows_of_the_same_global_batch(image_folder, tmp_path, augment):
    config = make_train_config(data=str(image_folder), out=str(tmp_path), batch_size=16, augment=augment,
                               rotate_degrees=0.0, workers=0, val_size=0)
    train_set = split_train_val(config)[0]
    device = torch.device("cpu")

    def epoch(rank: int, world_size: int) -> list:
        torch.manual_seed(0)
        return list(training_batches(train_set, config, 1, device, train_set.images, rank, world_size))

    whole, first, second = epoch(0, 1), epoch(0, 2), epoch(1, 2)
    assert len(whole) == len(first) == len(second) == len(train_set) // 16
    for (images, labels), (images0, labels0), (images1, labels1) in zip(whole, first, second):
        assert len(labels0) == len(labels1) == 8
        assert torch.equal(images[0::2], images0) and torch.equal(images[1::2], images1)
        assert torch.equal(labels[0::2], labels0) and torch.equal(labels[1::2], labels1)


def test_distributed_mistakes_and_lost_peers_are_one_line_errors():
    ranks = distributed.Ranks(rank=1, world_size=2)
    with pytest.raises(CifarxError, match="must be a multiple of the 2 ranks"):
        ranks.join(torch.device("cpu"), batch_size=15, timeout_seconds=600)
    with pytest.raises(CifarxError, match="--sync-bn needs GPUs"):
        ranks.sync_batchnorm(torch.nn.BatchNorm2d(3))
    gloo_timeout = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"
    with pytest.raises(CifarxError, match=r"^rank 1 of 2 lost contact .*\(Timed out waiting 5000ms for recv\)"):
        with ranks:
            raise RuntimeError(gloo_timeout)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug in cifarx: it keeps its traceback
        with ranks:
            raise ZeroDivisionError


def test_join_passes_the_timeout_to_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    distributed.Ranks(rank=0, world_size=2).join(torch.device("cpu"), batch_size=16, timeout_seconds=42)
    assert [(backend, timeout.total_seconds()) for backend, timeout in calls] == [("gloo", 42)]


def test_nproc_runs_torchrun_with_the_same_options_as_an_argument_list(monkeypatch, image_folder, tmp_path):
    launched = []

    class FinishedJob:
        def __init__(self, command, **kwargs):
            launched.append((command, kwargs))

        def wait(self):
            return 0

    monkeypatch.setattr(distributed.subprocess, "Popen", FinishedJob)
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder), "--nproc", "2", "--epochs", "1",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    [(command, kwargs)] = launched
    assert kwargs == {}  # no shell, no string: an argument list
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                       "cifarx", "train", "--data", str(image_folder), "--epochs", "1", "--out", str(tmp_path / "run")]
    assert not (tmp_path / "run").exists()  # the launcher trains nothing itself


@pytest.mark.parametrize("arguments, code", [(["--help"], 0), (["train", "--epochs", "0"], 2)])
def test_a_rank_ends_without_interpreter_finalization_keeping_its_output_and_exit_code(arguments, code):
    # gloo's worker threads may still free the last collective's tensors when a rank exits; during finalization
    # that aborts the process (cifarx.process.end_process). An atexit handler shows whether finalization ran.
    script = ("import atexit, sys; atexit.register(print, 'finalized'); from cifarx.cli.main import main; "
              f"sys.argv = ['cifarx', *{arguments!r}]; main()")
    for world_size, finalized in (("2", False), ("1", True)):
        ended = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, WORLD_SIZE=world_size, RANK="1"))
        assert ended.returncode == code, ended.stderr
        assert ("finalized" in ended.stdout) == finalized
        assert ("Usage:" in ended.stdout) if code == 0 else ended.stderr.startswith("error: ")
