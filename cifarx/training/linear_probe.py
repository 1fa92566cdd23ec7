"""Linear probe: a frozen backbone's features computed once (batch-wise, cached on disk), then the head alone fitted.

Why a function beside the training loop rather than through it: with every backbone parameter frozen, the loop
would recompute identical backbone outputs every epoch (>99% of its time), and what the loop adds on top —
batch augmentation that changes each image every epoch, EMA, Ctrl-C resume — is exactly what fixed features
rule out or do not need. Fitting a linear layer on fixed features is a different, small problem (seconds per
epoch for 45k images). It uses the loop's modules (batches: the split; optimiser: groups and lr schedule; runfolder:
lock, metrics, summary),
and its result is an ordinary checkpoint of the whole model (frozen backbone + fitted head), so export, eval and
predict treat it like any other run. Differences from `cifarx train --freeze all`: no augmentation and no head
dropout (the features are of the plain images, in eval mode).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.data import datasets as datamod
from cifarx.data.split import images_digest
from cifarx.training import runfolder
from cifarx.training.batches import check_batches, resolve_device, split_train_val, stream_seed
from cifarx.training.checkpoint import save_checkpoint
from cifarx.training.config import TrainConfig
from cifarx.errors import CifarxError
from cifarx.training.optimiser import build_optimizer, build_scheduler
from cifarx.training.prefix_cache import load_or_compute
from cifarx.models.registry import create_model

FEATURE_CACHE_FORMAT = 1
FEATURE_BATCH_SIZE = 64  # images per backbone pass: bounds the memory of upsampled activations (224 px: ~1 GB)


def feature_cache_key(model: nn.Module, images: torch.Tensor) -> str:
    """Hash of what the features depend on: backbone name, input size, every non-head tensor, and the images."""
    head = {id(p) for p in model.get_classifier().parameters()}
    digest = hashlib.sha256(f"v{FEATURE_CACHE_FORMAT}|{model.export_metadata['backbone']}|{model.resize_to}".encode())
    tensors = [(n, t) for n, t in model.named_parameters() if id(t) not in head]
    tensors += [(n, t) for n, t in model.named_buffers() if not n.endswith("num_batches_tracked")]
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Pre-classifier features [N,D] (float32, CPU) of uint8 images [N,3,32,32], in batches, model in eval mode;
    `progress(done, total)` after each batch."""
    model.eval()
    batches = []
    for index in datamod.iterate_batches(len(images), FEATURE_BATCH_SIZE, None, drop_last=False):
        batch = datamod.to_float(images[index]).to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        batches.append(model.features(batch).float().cpu())
        if progress:
            progress(int(index[-1]) + 1, len(images))
    return torch.cat(batches)


def cached_features(model: nn.Module, images: torch.Tensor, device: torch.device, cache_dir: Path | None = None,
                    channels_last: bool = False, reporter=None) -> tuple[torch.Tensor, bool]:
    """(features, whether they came from the cache) for `images`; computed ones are written to the cache."""
    cache_dir = cache_dir or datamod.default_cache_dir() / "features"
    path = cache_dir / f"features-{feature_cache_key(model, images)}.pt"
    progress = functools.partial((reporter or runfolder.SilentReporter()).progress, f"features of {len(images)} images")
    return load_or_compute(path, lambda: compute_features(model, images, device, channels_last, progress))


def _accuracy_and_loss(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict:
    if len(labels) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    with torch.no_grad():
        logits = head(features)
    return {"loss": F.cross_entropy(logits, labels).item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}


def is_linear_probe(config: TrainConfig) -> bool:
    """A frozen backbone with cached features: pooled features once, then the head alone, outside the loop (with
    --freeze N the loop trains the last stages on cached prefix activations instead, `prefix_cache.py`)."""
    return config.cached_features and str(config.model_kwargs.get("freeze")) == "all"


def fit_linear_head(config: TrainConfig, reporter=None) -> dict:
    """Train only the head of a frozen `timm/<name>` model on cached backbone features; writes a normal run folder.

    Uses the config's optimizer, lr, weight decay, schedule, epochs, batch size, label smoothing and seed;
    augmentation settings are ignored (the features are of the plain images). `train_seconds` in the summary is
    the whole wall time, feature extraction (or loading the cache) included; `feature_seconds` is that part.
    """
    reporter = reporter or runfolder.SilentReporter()
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    train_set, val_set = split_train_val(config)
    if (train_set.labels < 0).any():
        raise CifarxError("cached features train a supervised head: unlabelled images are not supported")
    check_batches(train_set, config)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=len(train_set.class_names), **config.model_kwargs)
    if not getattr(model, "frozen_backbone", False):
        raise CifarxError("cached features need a frozen backbone: a timm/<name> model with --freeze all")
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    reporter.message(runfolder.start_line(config.model, config.data, len(train_set), len(val_set), run_dir))
    with runfolder.claimed(run_dir, new_run=True):
        runfolder.write_config(run_dir, config.to_dict())
        return _fit_head(config, reporter, model, train_set, val_set, device, start)


def _fit_head(config: TrainConfig, reporter, model: nn.Module, train_set: datamod.ImageSet,
              val_set: datamod.ImageSet, device: torch.device, start: float) -> dict:
    run_dir = Path(config.out)
    feature_start = time.perf_counter()
    reporter.message(f"features of {len(train_set) + len(val_set)} images at {model.resize_to}px "
                     "(cached by backbone, weights, size and images)")
    train_features, train_cached = cached_features(model, train_set.images, device, channels_last=config.channels_last,
                                                   reporter=reporter)
    val_features, val_cached = cached_features(model, val_set.images, device, channels_last=config.channels_last,
                                               reporter=reporter)
    feature_seconds = time.perf_counter() - feature_start

    head = model.get_classifier()
    head.train()
    train_features, val_features = train_features.to(device), val_features.to(device)
    train_labels, val_labels = train_set.labels.to(device), val_set.labels.to(device)
    optimizer = build_optimizer(head, dataclasses.replace(config, backbone_lr_scale=1.0))
    steps_per_epoch = len(train_set) // config.batch_size
    scheduler = build_scheduler(optimizer, steps_per_epoch, config)
    state = runfolder.RunState(train_images=len(train_set), val_images=len(val_set))
    best_head = copy.deepcopy(head.state_dict())
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        reporter.start_epoch(epoch, config.epochs, steps_per_epoch)
        order = torch.Generator().manual_seed(stream_seed(config.seed, epoch, 0))
        loss_sum, correct = 0.0, 0
        for index in datamod.iterate_batches(len(train_set), config.batch_size, order, drop_last=True):
            index = index.to(device)
            logits = head(train_features[index])
            loss = F.cross_entropy(logits, train_labels[index], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.global_step += 1
            loss_sum += loss.item() * len(index)
            correct += (logits.argmax(1) == train_labels[index]).sum().item()
            reporter.advance(loss.item())
        validation = _accuracy_and_loss(head, val_features, val_labels)
        seen = steps_per_epoch * config.batch_size
        sums = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "labelled": seen, "data_seconds": 0.0}
        row = runfolder.epoch_row(epoch + 1, sums, validation, optimizer.param_groups[0]["lr"],
                                  time.perf_counter() - epoch_start, time.perf_counter() - start)
        state.history.append(row)
        state.epoch = epoch + 1
        if len(val_set) == 0 or validation["accuracy"] > state.best_val_accuracy:
            state.best_val_accuracy = validation["accuracy"] if len(val_set) else float("nan")
            best_head = copy.deepcopy(head.state_dict())
            best_epoch = epoch + 1
        reporter.end_epoch(row)

    def checkpoint(name: str, metrics: dict) -> None:
        save_checkpoint(run_dir / name, model_name=config.model, model_kwargs=model.rebuild_kwargs,
                        class_names=train_set.class_names, state_dict=model.state_dict(), config=config.to_dict(),
                        metrics=metrics, export_metadata=model.export_metadata,
                        val_digest=images_digest(val_set) if len(val_set) else None)

    checkpoint("last.pt", {"val_accuracy": state.history[-1]["val_accuracy"], "epoch": config.epochs})
    head.load_state_dict(best_head)
    checkpoint("best.pt", {"val_accuracy": state.best_val_accuracy, "epoch": best_epoch})
    runfolder.write_metrics(run_dir, state.history)
    state.train_seconds = time.perf_counter() - start
    return runfolder.write_summary(run_dir, config.to_dict(), state, {
        "feature_seconds": round(feature_seconds, 1), "features_from_cache": train_cached and val_cached,
        "img_size": model.resize_to, "weights": model.export_metadata["weights"]})
