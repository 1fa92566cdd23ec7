"""The one training loop: data -> batches -> objective -> optimiser/schedule/EMA -> validation -> checkpoints.

What the loop calls lives beside it: `batches.py` (the split and each epoch's batches), `optimiser.py` (parameter
groups, lr schedule, Lookahead), `runfolder.py` (lock, metrics, summary, run state), `prefix_cache.py` (with
`--freeze N --cached-features`: batches of cached prefix activations and the model's view that takes them, in
place of image batches and the whole model). Read `train` top to bottom:
settings, data, model, optimiser, then epochs of steps, each epoch ending in validation and checkpoints.

Determinism: every epoch draws its order, augmentation and dropout randomness from generators seeded by
(seed, epoch), so a run resumed at an epoch boundary, or mid-epoch from a Ctrl-C checkpoint (which stores the
RNG state), ends bit for bit where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.data import datasets as datamod
from cifarx.data.split import images_digest
from cifarx.training import distributed
from cifarx.training import runfolder
from cifarx.training.batches import (check_batches, drawn_batch_size, hardest, picked_batches, remembered_pick,
                             remembers_losses, resolve_device, scores_each_step, split_train_val, steps_per_epoch,
                             stream_seed, training_batches)
from cifarx.training.checkpoint import load_initial_weights, load_weights, read_checkpoint, save_checkpoint
from cifarx.training.config import TrainConfig, resumed_config
from cifarx.errors import CifarxError, TrainingInterrupted
from cifarx.io import folder_locked
from cifarx.models.common import TestTimeAugmentation
from cifarx.training.objectives import make_objective
from cifarx.training.optimiser import Lookahead, build_optimizer, build_scheduler, schedule_warning, train_whitening_bias
from cifarx.training.linear_probe import is_linear_probe
from cifarx.training.prefix_cache import PrefixInputs
from cifarx.process import machine
from cifarx.models.registry import create_model
from cifarx.training.runfolder import Reporter, RunState, SilentReporter


def train(config: TrainConfig | None = None, reporter: Reporter | None = None, resume: str | Path | None = None,
          resume_options: dict | None = None) -> dict:
    """One run of the loop (`run.train` picks the mode and calls this); under torchrun on every rank."""
    with distributed.Ranks.from_env() as ranks:
        return _train(config, reporter if ranks.is_main else None, resume, resume_options or {}, ranks)


def _train(config: TrainConfig | None, reporter: Reporter | None, resume: str | Path | None, resume_options: dict,
           ranks: distributed.Ranks) -> dict:
    reporter = reporter or SilentReporter()
    # ------------------------------------------------------------------ settings: checked before anything is written
    payload = None
    if resume is not None:
        config, payload = _resumable(resume, resume_options)
    if config is None:
        raise CifarxError("train needs a config or a run to resume")
    config.validate()
    run_dir = Path(config.out)
    if payload is None:
        runfolder.check_new_run_folder(run_dir)
    warning = schedule_warning(config)
    if warning:
        warnings.warn(warning)
    if is_linear_probe(config):
        raise CifarxError(f"{run_dir} is a linear probe's run: its head is fitted in one go, not resumed; train afresh")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = ranks.join(resolve_device(config.device), config.batch_size, config.dist_timeout)
    forward_dtype = getattr(torch, config.precision)  # of the training step's forward pass

    # ------------------------------------------------------------------ data
    train_set, val_set = ranks.main_first(split_train_val, config)
    val_digest = images_digest(val_set) if len(val_set) else None
    check_batches(train_set, config)
    class_names = train_set.class_names
    if payload is not None and class_names != payload["class_names"]:
        raise CifarxError(f"cannot resume: the classes in {config.data} are now {class_names}, the run was started "
                          f"with {payload['class_names']}")
    if payload is not None and payload.get("val_digest") not in (None, val_digest):
        raise CifarxError(f"cannot resume: {config.data} no longer yields the validation images the run started with "
                          "(images added, removed or changed since); give it the data it started with")

    # ------------------------------------------------------------------ model, objective, optimiser
    model, model_kwargs = _build_model(config, payload, train_set, device, ranks)
    objective = make_objective(config.objective, num_classes=len(class_names), label_smoothing=config.label_smoothing,
                               **config.objective_kwargs)
    objective_state = objective if isinstance(objective, nn.Module) else None  # e.g. fixmatch's moving averages
    if objective_state is not None:
        objective_state.to(device)
    optimizer = build_optimizer(model, config)
    _check_whitening_bias(model, config, ranks)
    _check_progressive_sizes(model, config)
    epoch_steps = steps_per_epoch(len(train_set), config)
    total_steps = epoch_steps * config.epochs
    scheduler = build_scheduler(optimizer, epoch_steps, config)
    ema = None
    if config.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup)
    lookahead = Lookahead(model) if config.lookahead_every else None
    state = RunState() if payload is None else _restore(payload, model, optimizer, scheduler, ema, lookahead,
                                                          objective_state, config)
    state.train_images, state.val_images = len(train_set), len(val_set)
    if payload is None:
        reporter.message(runfolder.start_line(config.model, config.data, len(train_set), len(val_set), run_dir))
    else:
        where = f"step {state.step_in_epoch + 1} of {epoch_steps}" if state.step_in_epoch else "its start"
        reporter.message(f"resuming {run_dir} at epoch {state.epoch + 1} {where}, {state.train_seconds:.0f} s trained so far"
                         + (f" (its first {state.step_in_epoch} steps are replayed, not trained again)"
                            if state.step_in_epoch else ""))
    if remembers_losses(config):
        if ranks.world_size > 1:
            raise CifarxError("--hard-selection remembered keeps the losses in one process; drop --nproc or use scored")
        if state.remembered_losses is None:
            state.remembered_losses = torch.full((len(train_set),), math.inf)
    prefix = None
    if config.cached_features:  # the frozen prefix's activations once per image; the loop trains the rest on them
        if ranks.world_size > 1:
            raise CifarxError("--cached-features trains in one process; drop --nproc")
        # after _restore: a resumed model has its checkpoint's weights only from there on
        prefix = PrefixInputs.build(model, train_set, val_set, config, device, reporter)
        state.train_seconds += prefix.seconds  # computing (or loading) the cache is part of what the run cost
    step_model, objective = ranks.data_parallel(prefix.view(model) if prefix else model, objective)
    step_model = torch.compile(step_model) if config.compile else step_model
    images_on_device = train_set.images.to(device) if prefix is None else None
    inference_model = ema.module if ema is not None else model
    # what validation runs: the whole model on images, or its view from the cached prefix on their activations
    validation_model, validation_set = (prefix.view(inference_model), prefix.val_set) if prefix else (inference_model, val_set)

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
            export_metadata=getattr(model, "export_metadata", None), val_digest=val_digest,
        )

    # ------------------------------------------------------------------ the run folder: ours until the run ends
    claim = runfolder.claimed(run_dir, new_run=payload is None) if ranks.is_main else contextlib.nullcontext()
    with claim, _InterruptFlag() as interrupt:
        if ranks.is_main and payload is None:
            runfolder.write_config(run_dir, config.to_dict())
        elif ranks.is_main:  # a kill between last.pt and metrics.csv left the file one epoch behind
            runfolder.write_metrics(run_dir, state.history)
        while state.epoch < config.epochs:
            epoch = state.epoch
            model.train()
            train_whitening_bias(model, epoch, config)
            if config.progressive_sizes:
                model.training_resize_to = progressive_size(epoch, config, model.resize_to)
                if epoch == 0 or progressive_size(epoch - 1, config, model.resize_to) != model.training_resize_to:
                    reporter.message(f"progressive resizing: training at {model.training_resize_to} px from epoch {epoch + 1}")
            skip = state.step_in_epoch
            reporter.start_epoch(epoch, config.epochs, epoch_steps, done=skip)
            if skip == 0:
                torch.manual_seed(ranks.rank_seed(stream_seed(config.seed, epoch, 2)))
            epoch_start = time.perf_counter()
            data_start = time.perf_counter()
            index_batches = None
            if remembers_losses(config):
                if skip == 0:
                    state.picked = remembered_pick(state.remembered_losses, config, epoch)
                index_batches = picked_batches(state.picked, config)
            if prefix is not None:
                batches = prefix.training_batches(config, epoch, device, index_batches)
            else:
                batches = training_batches(train_set, config, epoch, device, images_on_device, ranks.rank,
                                           ranks.world_size, index_batches)
            for step, (images, labels) in enumerate(batches):
                if step < skip:  # replaying a Ctrl-C checkpoint: advance the augmentation RNG, train nothing
                    if step == skip - 1:
                        torch.set_rng_state(ranks.own_rng_state(state.rng_state))
                    data_start = time.perf_counter()
                    continue
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                state.partial["data_seconds"] += time.perf_counter() - data_start
                if scores_each_step(config):  # a rank keeps its share of the global batch_size
                    keep = round(len(labels) * config.batch_size / drawn_batch_size(config))
                    images, labels = hardest(step_model, images, labels, keep, forward_dtype)
                with torch.autocast(device.type, dtype=forward_dtype, enabled=forward_dtype != torch.float32):
                    out = objective(step_model, images, labels)
                if index_batches is not None:  # the forward pass's own loss, remembered for the next epochs' pick
                    state.remembered_losses[index_batches[step]] = F.cross_entropy(
                        out["logits"].detach().float(), labels, reduction="none").cpu()
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
                if not math.isfinite(step_sums["loss_sum"]):  # every rank sees the summed loss, so all stop together
                    raise CifarxError(f"the training loss is not finite ({step_sums['loss_sum']}) at epoch {epoch + 1} "
                                      f"step {step + 1}; the run stopped (lower --lr?); {run_dir} keeps the last good epoch")
                for key, value in step_sums.items():
                    state.partial[key] += value
                reporter.advance(step_sums["loss_sum"] / step_sums["seen"])
                if interrupted:
                    state.step_in_epoch = step + 1
                    state.train_seconds += time.perf_counter() - epoch_start
                    state.partial["seconds"] += time.perf_counter() - epoch_start
                    state.rng_state = ranks.gather_rng_states()
                    checkpoint("last.pt", True, {})
                    ranks.barrier()  # last.pt is on disk before any rank exits (torchrun then stops the rest)
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1} step {step + 1}; checkpoint saved, "
                        f"continue with: cifarx train --resume {run_dir}"
                    )
                data_start = time.perf_counter()
            # Under torchrun rank 0 validates (its weights are the ones saved) and the others receive its figures.
            validation = ranks.run_on_main(evaluate, validation_model, validation_set, config.eval_batch_size, device,
                                           channels_last=config.channels_last)
            state.train_seconds += time.perf_counter() - epoch_start
            row = runfolder.epoch_row(epoch + 1, state.partial, validation, optimizer.param_groups[0]["lr"],
                                      state.partial["seconds"] + time.perf_counter() - epoch_start, state.train_seconds)
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
                runfolder.write_metrics(run_dir, state.history)
            # a model's own per-epoch figures (vae-ssl: samples, latents)
            if ranks.is_main and hasattr(inference_model, "on_epoch_end"):
                inference_model.on_epoch_end(run_dir, val_set, epoch + 1)
            reporter.end_epoch(row)
            if stop_early:
                reporter.message(f"early stop: no better validation accuracy for {config.patience} epochs")
        extra = {"training_precision": str(forward_dtype).removeprefix("torch."),
                 **(prefix.summary() if prefix is not None else {})}
        return ranks.run_on_main(summarize, run_dir, config, state, val_set, device, extra)


def _build_model(config: TrainConfig, payload: dict | None, train_set: datamod.ImageSet, device: torch.device,
                 ranks: distributed.Ranks) -> tuple[nn.Module, dict]:
    """(the model on its device, the builder arguments its checkpoints record), seeded by the config."""
    torch.manual_seed(config.seed)
    # A model may resolve its arguments (transfer backbones: downloaded weights -> a plain label), so the
    # checkpoint stores `rebuild_kwargs`, and resuming rebuilds from them without downloading anything.
    model_kwargs = payload["model"]["kwargs"] if payload is not None else config.model_kwargs
    model = create_model(config.model, num_classes=len(train_set.class_names), **model_kwargs)
    model_kwargs = getattr(model, "rebuild_kwargs", model_kwargs)
    if payload is None and config.init_from:  # trained weights, whitening filters included
        load_initial_weights(model, config.init_from, config.model, model_kwargs, train_set.class_names)
    elif payload is None and config.whiten_init and hasattr(model, "init_whitening"):
        model.init_whitening(datamod.to_float(train_set.images[:5000]))
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.sync_bn:  # under torchrun; checkpoints keep plain BatchNorm keys
        model = ranks.sync_batchnorm(model)
    return model, model_kwargs


def _check_whitening_bias(model: nn.Module, config: TrainConfig, ranks: distributed.Ranks) -> None:
    """Refuse `whiten_bias_epochs` for a model without a whitening conv, and under torchrun (DDP's static graph
    expects the parameters of its first step in every step)."""
    if config.whiten_bias_epochs is None:
        return
    if not isinstance(getattr(model, "whiten", None), nn.Conv2d) or model.whiten.bias is None:
        raise CifarxError(f"whiten_bias_epochs needs a model with a whitening conv and its bias (fast); {config.model} has none")
    if ranks.is_distributed:
        raise CifarxError("whiten_bias_epochs freezes a parameter mid-run, which DistributedDataParallel does not allow; "
                          "leave it unset under --nproc")


def progressive_size(epoch: int, config: TrainConfig, img_size: int) -> int:
    """The side training images are upsampled to in `epoch` (from 0): the run's epochs in len(progressive_sizes) + 1
    equal parts, the last at the model's `img_size`."""
    part = epoch * (len(config.progressive_sizes) + 1) // config.epochs
    return [*config.progressive_sizes, img_size][part]


def _check_progressive_sizes(model: nn.Module, config: TrainConfig) -> None:
    """Refuse progressive resizing where there is nothing to resize: models without the in-graph resize, cached
    activations (computed once at img_size), sizes above the img_size validation and export use."""
    if not config.progressive_sizes:
        return
    img_size = getattr(model, "resize_to", None)
    if img_size is None:
        raise CifarxError(f"--progressive-sizes needs a timm/<name> model (the resize inside it); {config.model} has none")
    if config.cached_features:
        raise CifarxError("--progressive-sizes cannot act on --cached-features (the cache is computed at --img-size once)")
    if max(config.progressive_sizes) > img_size:
        raise CifarxError(f"--progressive-sizes must stay at or below --img-size {img_size}, got {config.progressive_sizes}")


def _restore(payload: dict, model: nn.Module, optimizer, scheduler, ema, lookahead, objective_state,
             config: TrainConfig) -> RunState:
    """Load last.pt's tensors into the run's objects; returns its run state."""
    saved = payload["train_state"]
    load_weights(model, saved["model"], Path(config.out) / "last.pt", config.model)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(saved["ema"])
    if lookahead is not None:
        lookahead.average = saved["lookahead"]
    if objective_state is not None:
        objective_state.load_state_dict(saved["objective"])
    try:
        state = RunState(**saved["run"])
    except TypeError as error:  # a hand-edited or newer last.pt
        raise CifarxError(f"{Path(config.out) / 'last.pt'} holds a run state this cifarx cannot read ({error})") from None
    state.partial = {**RunState().partial, **state.partial}  # counters added since the checkpoint was written
    return state


def _resumable(resume: str | Path, options: dict) -> tuple[TrainConfig, dict]:
    """(config, last.pt payload) of the run to continue, with the `options` that may change; refused in one line."""
    resume = Path(resume)
    last = resume / "last.pt" if resume.is_dir() else resume
    if not last.is_file():
        if folder_locked(resume):
            raise CifarxError(f"{resume} is a run in progress (a cifarx train holds it) that has not written last.pt "
                              "yet: nothing to resume; let it train, or stop it with Ctrl-C and resume then")
        if (resume / "best.pt").is_file() and not (resume / "summary.json").is_file():
            raise CifarxError(f"nothing to resume: {resume} stopped before its first resumable checkpoint (best.pt, "
                              f"no last.pt); start it again with --out {resume}, which replaces it")
        raise CifarxError(f"nothing to resume: no last.pt in {resume}")
    payload = read_checkpoint(last)
    if not payload.get("train_state"):
        raise CifarxError(f"{last} holds no training state to resume from")
    config = resumed_config(payload["config"], options, epochs_done=payload["train_state"]["run"]["epoch"])
    config.out = str(last.parent)
    return config, payload


def summarize(run_dir: Path, config: TrainConfig, state: RunState, val_set: datamod.ImageSet,
              device: torch.device, extra: dict | None = None) -> dict:
    """summary.json: final and best validation figures (with TTA if configured), the training time, the machine it
    was measured on (a time means little without the CPU, its ISA and the threads) and `extra`."""
    from cifarx.training.checkpoint import load_model

    extra = {"machine": machine(), **(extra or {})}
    if config.tta != "none" and len(val_set):
        best_model, _ = load_model(run_dir / "best.pt")
        extra[f"best_val_accuracy_tta_{config.tta}"] = evaluate(
            best_model.to(device), val_set, config.eval_batch_size, device, tta=config.tta
        )["accuracy"]
    return runfolder.write_summary(run_dir, config.to_dict(), state, extra)


@torch.no_grad()
def evaluate(model: nn.Module, image_set: datamod.ImageSet, batch_size: int, device: torch.device,
             tta: str = "none", channels_last: bool = False) -> dict:
    """Mean cross-entropy and top-1 accuracy of `model` on `image_set` (optionally with TTA; then also
    `plain_accuracy`, the accuracy without it, from the same forward passes).

    `image_set.images` are uint8 images, or float cached prefix activations for a `PrefixInputs.view` model."""
    if len(image_set) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "plain_accuracy": float("nan")}
    was_training = model.training
    model.eval()
    augmented = TestTimeAugmentation(model, tta) if tta != "none" else None
    loss_sum, correct, plain_correct = 0.0, 0, 0
    for index in datamod.iterate_batches(len(image_set), batch_size, None, drop_last=False):
        images = image_set.images[index]
        images = (datamod.to_float(images) if images.dtype == torch.uint8 else images.float()).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = image_set.labels[index].to(device)
        plain, logits = augmented.plain_and_augmented(images) if augmented else (model(images),) * 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        plain_correct += (plain.argmax(1) == labels).sum().item()
    model.train(was_training)
    return {"loss": loss_sum / len(image_set), "accuracy": correct / len(image_set),
            "plain_accuracy": plain_correct / len(image_set)}


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
