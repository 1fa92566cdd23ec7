"""The one training loop: data -> batches -> objective -> optimiser/schedule/EMA -> validation -> checkpoints.

Determinism: every epoch draws its order, augmentation and dropout randomness from generators seeded by
(seed, epoch), so a run resumed at an epoch boundary, or mid-epoch from a Ctrl-C checkpoint (which stores the
RNG state), ends bit for bit where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import io
import math
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx import data as datamod
from cifarx import distributed, self_training
from cifarx.checkpoint import read_checkpoint, save_checkpoint
from cifarx.config import TrainConfig
from cifarx.errors import CifarxError, TrainingInterrupted
from cifarx.io import atomic_savefig, atomic_write_json, atomic_write_text
from cifarx.models.common import TestTimeAugmentation
from cifarx.objectives import make_objective
from cifarx.registry import create_model

PER_IMAGE_AUGMENTATIONS = {"rotate", "autoaugment", "erasing"}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True if it took.

    A training step's activations are blocks of tens to hundreds of MB. glibc serves each from a fresh mmap and
    unmaps it when freed, so every step faults all those pages in again: for `fast` at batch 1024 on the 2-core
    machine, 740,000 page faults and 1.5 s of kernel time per 5 s step. No mmap for large blocks and no heap
    trimming (what LD_PRELOAD=jemalloc does, without a system package) makes the heap settle at the step's peak.
    Process-wide, so called when a run starts, never at import; a no-op where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


class Reporter(Protocol):
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def advance(self, loss: float) -> None: ...
    def end_epoch(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def advance(self, loss: float) -> None: ...
    def end_epoch(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...


def _seed(seed: int, epoch: int, stream: int) -> int:
    """Independent seeds per (run seed, epoch, random stream)."""
    return (seed * 100_003 + epoch) * 8 + stream


# ---------------------------------------------------------------------------------------------- data


def split_train_val(config: TrainConfig) -> tuple[datamod.ImageSet, datamod.ImageSet]:
    """The training images and the stratified validation split carved from them."""
    full = datamod.load_split(config.data, "train", config.data_root)
    if config.val_size:
        train_index, val_index = datamod.stratified_split(full.labels, config.val_size, config.seed)
    else:
        train_index, val_index = torch.arange(len(full)), torch.arange(0)
    train_set, val_set = full.subset(train_index), full.subset(val_index)
    if config.train_size and config.train_size < len(train_set):
        _, keep = datamod.stratified_split(train_set.labels, config.train_size, config.seed + 1)
        train_set = train_set.subset(keep)
    if config.labelled is not None or config.labelled_per_class is not None:
        # From here on only the labelled subset carries labels; the rest of train is -1 (or left out).
        train_set = datamod.semi_supervised_subset(train_set, config.labelled, config.unlabelled, config.seed + 2,
                                                   config.labelled_per_class)
    if config.pseudo_labels:  # a self-training student: the teacher's selected predictions label those images
        train_set = self_training.apply_pseudo_labels(train_set, config.pseudo_labels)
    return train_set, val_set


def _torchvision_transform(config: TrainConfig):
    from torchvision.transforms import v2

    steps = []
    if "crop" in config.augment:
        steps.append(v2.RandomCrop(32, padding=config.crop_padding, padding_mode=config.translate_mode))
    if "flip" in config.augment:
        steps.append(v2.RandomHorizontalFlip())
    if "rotate" in config.augment:
        steps.append(v2.RandomRotation(config.rotate_degrees))
    if "autoaugment" in config.augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if "cutout" in config.augment or "erasing" in config.augment:
        area = config.cutout_size**2 / 1024
        steps.append(v2.RandomErasing(p=1.0 if "cutout" in config.augment else 0.5, scale=(area, area), ratio=(1, 1)))
    return v2.Compose(steps)


class _TransformedImages(torch.utils.data.Dataset):
    def __init__(self, image_set: datamod.ImageSet, transform):
        self.image_set, self.transform = image_set, transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        return self.transform(self.image_set.images[index]), self.image_set.labels[index]


def uses_dataloader(config: TrainConfig) -> bool:
    """Per-image torchvision policies (rotation, AutoAugment, erasing) need a DataLoader; the rest is batch-wise."""
    return bool(PER_IMAGE_AUGMENTATIONS & set(config.augment))


def training_batches(train_set: datamod.ImageSet, config: TrainConfig, epoch: int, device: torch.device,
                     images_on_device: torch.Tensor, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's (float images in [0,1], labels) batches, deterministic in (seed, epoch).

    Under torchrun every rank draws the same global batches (config.batch_size images) and keeps rows
    rank::world_size of each, so the ranks' shards are disjoint and together are what one process trains on.
    """
    order = torch.Generator().manual_seed(_seed(config.seed, epoch, 0))
    if uses_dataloader(config):
        # Each rank loads only its rows; per-image transforms use the rank's own random stream.
        shards = [index[rank::world_size].tolist()
                  for index in datamod.iterate_batches(len(train_set), config.batch_size, order, drop_last=True)]
        worker_seeds = torch.Generator().manual_seed(distributed.rank_seed(_seed(config.seed, epoch, 1), rank))
        loader = torch.utils.data.DataLoader(
            _TransformedImages(train_set, _torchvision_transform(config)), batch_sampler=shards,
            num_workers=config.workers, generator=worker_seeds, persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    augment = torch.Generator().manual_seed(_seed(config.seed, epoch, 1))
    labels_on_device = train_set.labels.to(device)
    batches = datamod.iterate_batches(len(train_set), config.batch_size, order, drop_last=True)
    if config.labelled_fraction and (train_set.labels == datamod.UNLABELLED).any():
        # Semi-supervised: the same number of steps, each batch with a fixed share of (oversampled) labelled images.
        labelled_per_batch = min(config.batch_size - 1, max(1, round(config.labelled_fraction * config.batch_size)))
        batches = datamod.mixed_batches(train_set.labels, config.batch_size, labelled_per_batch,
                                        len(train_set) // config.batch_size, order)
    for index in batches:
        images = datamod.to_float(images_on_device[index.to(device)])
        images = datamod.random_crop_flip_cutout(
            images, augment, pad=config.crop_padding if "crop" in config.augment else 0,
            flip="flip" in config.augment, cutout=config.cutout_size if "cutout" in config.augment else 0,
            translate_mode=config.translate_mode,
        )
        shard = slice(rank, None, world_size)  # augmented as one global batch: any world size sees the same images
        yield images[shard], labels_on_device[index.to(device)][shard]


# ---------------------------------------------------------------------------------------------- optimiser


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Two groups: normalisation-layer parameters (own lr scale and decay), and everything else."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    norm_params, other_params = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (norm_params if id(parameter) in norm_ids else other_params).append(parameter)
    norm_decay = config.weight_decay if config.norm_weight_decay is None else config.norm_weight_decay
    groups = [
        {"params": other_params, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": norm_params, "lr": config.lr * config.norm_lr_scale, "weight_decay": norm_decay},
    ]
    if config.backbone_lr_scale != 1.0:
        groups = _split_head_and_backbone(model, groups, config.backbone_lr_scale)
    if config.decoupled_weight_decay:
        # torch's SGD multiplies the decay term by lr; dividing it out makes the decay per step
        # weight_decay x schedule factor, whatever the peak lr (so lr and wd can be tuned apart).
        for group in groups:
            group["weight_decay"] = group["weight_decay"] / group["lr"]
    return [g for g in groups if g["params"]]


def _split_head_and_backbone(model: nn.Module, groups: list[dict], backbone_lr_scale: float) -> list[dict]:
    """Each group twice: the head's parameters (`model.get_classifier()`) at its lr, the rest at lr x scale."""
    if not hasattr(model, "get_classifier"):
        raise CifarxError("backbone_lr_scale needs a model with a separate head (a timm/<name> backbone)")
    head = {id(p) for p in model.get_classifier().parameters()}
    split = []
    for group in groups:
        split.append({**group, "params": [p for p in group["params"] if id(p) in head]})
        split.append({**group, "params": [p for p in group["params"] if id(p) not in head],
                      "lr": group["lr"] * backbone_lr_scale})
    return split


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.RMSprop(groups, lr=config.lr, momentum=config.momentum)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then the schedule's decay.

    One per-step formula for every shape (torch's epoch-wise schedulers chained by SequentialLR cannot
    express warm-up in steps followed by a multistep decay in epochs).
    """
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.initial_lr_fraction + (1 - config.initial_lr_fraction) * (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        return config.gamma ** sum(step >= m * steps_per_epoch for m in config.milestones)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    end = config.final_lr_fraction
    if config.schedule == "cosine":
        return end + (1 - end) * (1 + math.cos(math.pi * progress)) / 2
    return 1 - (1 - end) * progress  # linear, and onecycle (= linear warm-up then linear decay)


class Lookahead:
    """Every few steps: average <- lerp(average, weights, 1 - decay), then weights <- average.

    The averaged weights are copied back into the network (Lookahead, as airbench uses it), and the decay
    follows the training's progress; timm's Lookahead optimizer wrapper has a fixed rate, hence this class.
    The last step copies the average in (decay 1). BatchNorm statistics are averaged with the weights.
    """

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, tensor in model.state_dict().items():
            if name in self.average:
                self.average[name].lerp_(tensor, 1 - decay)
                tensor.copy_(self.average[name])


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, image_set: datamod.ImageSet, batch_size: int, device: torch.device,
             tta: str = "none", channels_last: bool = False) -> dict:
    """Mean cross-entropy and top-1 accuracy of `model` on `image_set` (optionally with TTA)."""
    if len(image_set) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    was_training = model.training
    model.eval()
    net = TestTimeAugmentation(model, tta) if tta != "none" else model
    loss_sum, correct = 0.0, 0
    for index in datamod.iterate_batches(len(image_set), batch_size, None, drop_last=False):
        images = datamod.to_float(image_set.images[index]).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = image_set.labels[index].to(device)
        logits = net(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train(was_training)
    return {"loss": loss_sum / len(image_set), "accuracy": correct / len(image_set)}


# ---------------------------------------------------------------------------------------------- run folder


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
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0, "seen": 0, "labelled": 0,
                                                   "data_seconds": 0.0})
    # global torch RNG at step_in_epoch (dropout, stochastic depth...); one row per rank under torchrun
    rng_state: torch.Tensor | None = None


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and the training-curve PNG, from the epoch history."""
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker=".", label=split)
        accuracy_axis.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker=".", label=split)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    atomic_savefig(figure, run_dir / "curves.png")
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- the loop


class _InterruptFlag:
    """SIGINT sets a flag checked between steps, so a checkpoint is never taken mid-update."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C handling stays with the caller
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarxError(f"--device {name} asked for, but PyTorch sees no CUDA device here; use --device cpu")
    return device


def train(config: TrainConfig | None = None, reporter: Reporter | None = None, resume: str | Path | None = None) -> dict:
    """Train (or resume) a run; writes RUN_DIR/{config.json,metrics.csv,curves.png,last.pt,best.pt,summary.json}.

    Under torchrun every rank calls this: DistributedDataParallel, rank 0 reports and writes (docs/distributed.md).
    """
    rounds_config = self_training.read_rounds_config(resume) if resume is not None else config
    if rounds_config is not None and rounds_config.self_training:  # teacher and student runs, each through _train
        rounds_config.validate()
        return self_training.train_rounds(rounds_config, reporter or SilentReporter(), resume=resume is not None)
    with distributed.Ranks.from_env() as ranks:
        return _train(config, reporter if ranks.is_main else None, resume, ranks)


def _train(config: TrainConfig | None, reporter: Reporter | None, resume: str | Path | None,
           ranks: distributed.Ranks) -> dict:
    reporter = reporter or SilentReporter()
    payload = None
    if resume is not None:
        last = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
        if not last.is_file():
            raise CifarxError(f"nothing to resume: no last.pt in {resume}")
        payload = read_checkpoint(last)
        if not payload.get("train_state"):
            raise CifarxError(f"{last} holds no training state to resume from")
        config = TrainConfig.from_dict(payload["config"])
        config.out = str(Path(resume) if Path(resume).is_dir() else Path(resume).parent)
    if config is None:
        raise CifarxError("train needs a config or a run to resume")
    config.validate()
    keep_freed_memory()
    if config.cached_features:  # frozen backbone: features once, then the head alone (see fit_linear_head)
        from cifarx.transfer import fit_linear_head

        return fit_linear_head(config, reporter)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = ranks.join(_resolve_device(config.device), config.batch_size, config.dist_timeout)
    run_dir = Path(config.out)

    train_set, val_set = ranks.main_first(split_train_val, config)
    if len(train_set) < config.batch_size:
        raise CifarxError(f"batch size {config.batch_size} is larger than the {len(train_set)} training images")
    if config.labelled_fraction and uses_dataloader(config):
        raise CifarxError("labelled_fraction needs batch-wise augmentation (crop, flip, cutout), not "
                          f"{sorted(PER_IMAGE_AUGMENTATIONS & set(config.augment))}")
    class_names = train_set.class_names
    if payload is not None and class_names != payload["class_names"]:
        raise CifarxError(f"cannot resume: the classes in {config.data} are now {class_names}, the run was started "
                          f"with {payload['class_names']}")
    torch.manual_seed(config.seed)
    # A model may resolve its arguments (transfer backbones: downloaded weights -> a plain label), so the
    # checkpoint stores `rebuild_kwargs`, and resuming rebuilds from them without downloading anything.
    model_kwargs = payload["model"]["kwargs"] if payload is not None else config.model_kwargs
    model = create_model(config.model, num_classes=len(class_names), **model_kwargs)
    model_kwargs = getattr(model, "rebuild_kwargs", model_kwargs)
    if payload is None and config.whiten_init and hasattr(model, "init_whitening"):
        model.init_whitening(datamod.to_float(train_set.images[:5000]))
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.sync_bn:  # under torchrun; checkpoints keep plain BatchNorm keys
        model = ranks.sync_batchnorm(model)
    optimizer = build_optimizer(model, config)
    steps_per_epoch = len(train_set) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, config)
    )
    ema = None
    if config.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup)
    lookahead = Lookahead(model) if config.lookahead_every else None
    objective = make_objective(config.objective, num_classes=len(class_names), label_smoothing=config.label_smoothing,
                               **config.objective_kwargs)
    objective_state = objective if isinstance(objective, nn.Module) else None  # e.g. fixmatch's moving averages
    if objective_state is not None:
        objective_state.to(device)
    state = RunState()
    if payload is not None:
        saved = payload["train_state"]
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(saved["ema"])
        if lookahead is not None:
            lookahead.average = saved["lookahead"]
        if objective_state is not None:
            objective_state.load_state_dict(saved["objective"])
        state = RunState(**saved["run"])
        state.partial = {**RunState().partial, **state.partial}  # counters added since the checkpoint was written
        if ranks.is_main:  # a kill between last.pt and metrics.csv left the file one epoch behind
            write_metrics(run_dir, state.history)
    elif ranks.is_main:
        atomic_write_json(run_dir / "config.json", config.to_dict())  # makes run_dir, or says why it cannot
    step_model, objective = ranks.data_parallel(model, objective)  # one process: both as they are
    step_model = torch.compile(step_model) if config.compile else step_model
    images_on_device = train_set.images.to(device)
    inference_model = ema.module if ema is not None else model

    def checkpoint(name: str, with_state: bool, metrics: dict) -> None:
        if not ranks.is_main:
            return
        train_state = None
        if with_state:
            train_state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None, "run": state.__dict__,
                "lookahead": lookahead.average if lookahead is not None else None,
                "objective": objective_state.state_dict() if objective_state is not None else None,
            }
        save_checkpoint(
            run_dir / name, model_name=config.model, model_kwargs=model_kwargs, class_names=class_names,
            state_dict=inference_model.state_dict(), config=config.to_dict(), metrics=metrics, train_state=train_state,
            export_metadata=getattr(model, "export_metadata", None),
        )

    with _InterruptFlag() as interrupt:
        while state.epoch < config.epochs:
            epoch = state.epoch
            model.train()
            reporter.start_epoch(epoch, config.epochs, steps_per_epoch)
            skip = state.step_in_epoch
            if skip == 0:
                torch.manual_seed(ranks.rank_seed(_seed(config.seed, epoch, 2)))
            epoch_start = time.perf_counter()
            data_start = time.perf_counter()
            batches = training_batches(train_set, config, epoch, device, images_on_device, ranks.rank, ranks.world_size)
            for step, (images, labels) in enumerate(batches):
                if step < skip:  # replaying a Ctrl-C checkpoint: advance the augmentation RNG, train nothing
                    if step == skip - 1:
                        torch.set_rng_state(ranks.own_rng_state(state.rng_state))
                    data_start = time.perf_counter()
                    continue
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                state.partial["data_seconds"] += time.perf_counter() - data_start
                out = objective(step_model, images, labels)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                scheduler.step()
                state.global_step += 1
                if ema is not None and state.global_step % config.ema_every == 0:
                    # timm's EMA warms up only when told the update count
                    ema.update(model, step=state.global_step // config.ema_every if config.ema_warmup else None)
                if lookahead is not None and (state.global_step % config.lookahead_every == 0
                                              or state.global_step == total_steps):
                    progress = state.global_step / total_steps
                    lookahead.update(model, 1.0 if progress == 1 else config.lookahead_decay * progress**config.lookahead_power)
                # Under torchrun every rank adds the global batch's sums; all stop at the step any was interrupted.
                step_sums, interrupted = ranks.sum_step({
                    "loss_sum": out["loss"].item() * len(labels),
                    "correct": (out["logits"].argmax(1) == labels).sum().item(),
                    "seen": len(labels), "labelled": (labels >= 0).sum().item(),
                }, interrupt.raised)
                for key, value in step_sums.items():
                    state.partial[key] += value
                reporter.advance(step_sums["loss_sum"] / step_sums["seen"])
                if interrupted:
                    state.step_in_epoch = step + 1
                    state.train_seconds += time.perf_counter() - epoch_start
                    state.rng_state = ranks.gather_rng_states()
                    checkpoint("last.pt", True, {})
                    ranks.barrier()  # last.pt is on disk before any rank exits (torchrun then stops the rest)
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1} step {step + 1}; checkpoint saved, "
                        f"continue with: cifarx train --resume {run_dir}"
                    )
                data_start = time.perf_counter()
            # Under torchrun rank 0 validates (its weights are the ones saved) and the others receive its figures.
            validation = ranks.run_on_main(evaluate, inference_model, val_set, config.eval_batch_size, device,
                                           channels_last=config.channels_last)
            state.train_seconds += time.perf_counter() - epoch_start
            partial = state.partial
            row = {
                "epoch": epoch + 1,
                "train_loss": partial["loss_sum"] / partial["seen"],
                "train_accuracy": partial["correct"] / max(1, partial["labelled"]),
                "val_loss": validation["loss"],
                "val_accuracy": validation["accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - epoch_start,
                "data_seconds": partial["data_seconds"],
                "train_seconds": state.train_seconds,
            }
            state.history.append(row)
            state.epoch, state.step_in_epoch, state.rng_state = epoch + 1, 0, None
            state.partial = RunState().partial
            improved = len(val_set) == 0 or validation["accuracy"] > state.best_val_accuracy
            if improved:
                state.best_val_accuracy = validation["accuracy"] if len(val_set) else float("nan")
                state.epochs_since_best = 0
                checkpoint("best.pt", False, {"val_accuracy": validation["accuracy"], "epoch": epoch + 1})
            else:
                state.epochs_since_best += 1
            stop_early = config.patience and state.epochs_since_best >= config.patience
            if stop_early:
                state.epoch = config.epochs
            checkpoint("last.pt", True, {"val_accuracy": validation["accuracy"], "epoch": epoch + 1})
            if ranks.is_main:
                write_metrics(run_dir, state.history)
            # a model's own per-epoch figures (vae-ssl: samples, latents)
            if ranks.is_main and hasattr(inference_model, "on_epoch_end"):
                inference_model.on_epoch_end(run_dir, val_set, epoch + 1)
            reporter.end_epoch(row)
            if stop_early:
                reporter.message(f"early stop: no better validation accuracy for {config.patience} epochs")
    return ranks.run_on_main(summarize, run_dir, config, state, len(train_set), val_set, device)


def summarize(run_dir: Path, config: TrainConfig, state: RunState, train_images: int, val_set: datamod.ImageSet,
              device: torch.device) -> dict:
    """summary.json: final and best validation figures (with TTA if configured) and the training time."""
    from cifarx.checkpoint import load_model

    last = state.history[-1]
    summary = {
        "model": config.model, "preset": config.preset, "epochs_run": len(state.history),
        "train_seconds": round(state.train_seconds, 1), "train_images": train_images,
        # None, not NaN, when there is no validation split (--val-size 0): JSON has no NaN
        "final_val_accuracy": last["val_accuracy"] if len(val_set) else None,
        "best_val_accuracy": state.best_val_accuracy if len(val_set) else None,
        "val_images": len(val_set), "seed": config.seed,
    }
    if config.tta != "none" and len(val_set):
        best_model, _ = load_model(run_dir / "best.pt")
        summary[f"best_val_accuracy_tta_{config.tta}"] = evaluate(
            best_model.to(device), val_set, config.eval_batch_size, device, tta=config.tta
        )["accuracy"]
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
