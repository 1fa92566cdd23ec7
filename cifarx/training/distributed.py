"""Training on several processes under torchrun: DistributedDataParallel, NCCL on GPUs, gloo on CPU.

Every rank runs the one loop of cifarx/train.py; `Ranks` holds what differs between them. The split that keeps a
distributed run equal to a single-process one: every rank draws the same *global* batch from (seed, epoch) and
trains on its rows `rank::world_size`; DDP averages the gradients, so batch size and learning rate mean what they
mean on one process. Rank 0 alone validates and writes files; the others receive its results. docs/distributed.md
tells what is exact and what is not.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from cifarx.errors import CifarxError, TrainingInterrupted

# 2^64 / golden ratio: odd, so ranks differ in the low 32 bits, the only ones the CPU generator (mt19937) uses.
RANK_SEED_STRIDE = 0x9E3779B97F4A7C15


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s seed for a random stream (dropout, per-image augmentation); rank 0 keeps `seed` itself."""
    return (seed + rank * RANK_SEED_STRIDE) % 2**64


def is_main_process() -> bool:
    """True unless torchrun started this process as a rank other than 0 (for printing once)."""
    return os.environ.get("RANK", "0") == "0"


class _ObjectiveStep(nn.Module):
    """Model and objective as one module: DDP synchronises gradients only of what runs inside its forward, and an
    objective may call model methods other than forward (the VAE's `features`, `negative_elbo`...)."""

    def __init__(self, model: nn.Module, objective: Callable):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        return self.objective(self.model, images, labels)


def _call_step(step: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    return step(images, labels)


def _is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another rank died or kept this one waiting past the timeout."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("gloo" in text or "nccl" in text)


def _reason(error: BaseException) -> str:
    """gloo's '[.../pair.cc:545] Read error ...: Connection reset by peer. This is typically...' -> the middle."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0]


class Ranks:
    """This process's place in a training job; rank 0 of 1 (every method a no-op) when torchrun did not start it."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cpu")
        self.timeout_seconds = 0.0
        self._owns_group = False

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise CifarxError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device, batch_size: int, timeout_seconds: float) -> torch.device:
        """Join the process group (NCCL for CUDA, gloo for CPU); returns this rank's device (cuda -> cuda:LOCAL_RANK)."""
        if not self.is_distributed:
            return device
        check_batch_split(batch_size, self.world_size)
        if not timeout_seconds > 0:
            raise CifarxError(f"dist_timeout must be a positive number of seconds, got {timeout_seconds}")
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise CifarxError(f"local rank {self.local_rank} needs GPU {self.local_rank}, but this machine has "
                                  f"{torch.cuda.device_count()}; lower --nproc-per-node")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device, self.timeout_seconds = device, timeout_seconds
        if not dist.is_initialized():  # a caller's own process group is used as it is, and left to the caller
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_seconds))
            self._owns_group = True
        return device

    def data_parallel(self, model: nn.Module, objective: Callable) -> tuple[nn.Module, Callable]:
        """(module to step, objective to call on it): DDP around model + objective, or both as they are."""
        if not self.is_distributed:
            return model, objective
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # static_graph: the parameters a step uses are the same every step, and some may be unused (vae-ssl's
        # decoder under the supervised objective); DDP learns which on the first step instead of failing.
        step = nn.parallel.DistributedDataParallel(_ObjectiveStep(model, objective), device_ids=device_ids,
                                                   static_graph=True)
        return step, _call_step

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """BatchNorm layers that normalise over the global batch (same parameters and state_dict keys)."""
        if not self.is_distributed:
            return model
        if self.device.type != "cuda":
            raise CifarxError("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); drop it for --device cpu")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def rank_seed(self, seed: int) -> int:
        """This rank's seed for a random stream: different images need different dropout masks."""
        return rank_seed(seed, self.rank)

    def sum_step(self, counts: dict[str, Any], interrupted: bool) -> tuple[dict[str, Any], bool]:
        """One step's metric sums over all ranks, and whether any rank was interrupted (so all stop at that step)."""
        if not self.is_distributed:
            return counts, interrupted
        values = torch.tensor([*counts.values(), float(interrupted)], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        totals = values.tolist()
        return {key: type(value)(total) for (key, value), total in zip(counts.items(), totals)}, totals[-1] > 0

    def run_on_main(self, function: Callable, *args, **kwargs):
        """`function(*args, **kwargs)` on rank 0 only; every rank returns its result (the others wait for it)."""
        if not self.is_distributed:
            return function(*args, **kwargs)
        result = [function(*args, **kwargs) if self.is_main else None]
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def main_first(self, function: Callable, *args):
        """`function(*args)` on rank 0, then on the others: a download or a decoded-image cache is made once."""
        if self.is_main:
            result = function(*args)
        self.barrier()
        if not self.is_main:
            result = function(*args)
        return result

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def gather_rng_states(self) -> torch.Tensor:
        """The CPU RNG state for a Ctrl-C checkpoint: this process's, or one row per rank in a distributed run."""
        state = torch.get_rng_state()
        if not self.is_distributed:
            return state
        rows = [torch.empty_like(state, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(rows, state.to(self.device))
        return torch.stack(rows).cpu()

    def own_rng_state(self, saved: torch.Tensor) -> torch.Tensor:
        """This rank's row of `gather_rng_states()`. A rank the checkpoint has no row for (it was written by fewer
        ranks) continues rank 0's stream until the epoch ends."""
        if saved.dim() == 1:
            return saved
        return (saved[self.rank] if self.rank < len(saved) else saved[0]).clone()  # a row view crashes set_rng_state

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.is_distributed and error is not None and _is_peer_failure(error):
            # No destroy_process_group here: with a peer gone it can block; the process is ending anyway.
            raise CifarxError(
                f"rank {self.rank} of {self.world_size} lost contact with the other ranks ({_reason(error)}): another "
                f"rank failed (its message is above) or kept this one waiting over dist_timeout={self.timeout_seconds:g}s"
            ) from None
        if self._owns_group and error is None:
            dist.destroy_process_group()
            self._owns_group = False


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global batch splits evenly over the ranks; checked by the launcher too, so a bad pair never starts torchrun."""
    if batch_size % world_size:
        raise CifarxError(f"--batch-size {batch_size} (the global batch) must be a multiple of the "
                          f"{world_size} ranks, so every rank trains on as many images")


def launch_training(nproc: int, command: str, run_dir: str | os.PathLike) -> None:
    """`cifarx train --nproc N ...`: run `python -m torch.distributed.run --standalone --nproc-per-node N -m cifarx
    train ...` with the same options but --nproc (an argument list, never a shell string), and wait for it."""
    if nproc < 1:
        raise CifarxError(f"--nproc must be >= 1, got {nproc}")
    arguments = shlex.split(command)  # the recorded command line: cifarx train ...
    options = iter(arguments[arguments.index("train") + 1:])
    rank_arguments = []
    for option in options:
        if option == "--nproc":
            next(options, None)
        elif not option.startswith("--nproc="):
            rank_arguments.append(option)
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={nproc}", "-m", "cifarx", "train", *rank_arguments])
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # torchrun and the ranks got the same Ctrl-C: let them checkpoint and stop
            interrupted = True
    if code == 0:
        return
    if interrupted and (Path(run_dir) / "last.pt").is_file():
        raise TrainingInterrupted(f"interrupted; continue with: cifarx train --nproc {nproc} --resume {run_dir}")
    raise CifarxError(f"distributed training failed (torchrun exit code {code}); the failing rank's message is above")
