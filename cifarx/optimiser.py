"""How the weights move: optimiser parameter groups, the per-step learning-rate schedule, Lookahead."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cifarx.config import TrainConfig
from cifarx.errors import CifarxError


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
    """The configured optimiser over `parameter_groups`."""
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


def schedule_warning(config: TrainConfig) -> str | None:
    """Why the configured schedule will not do what its shape promises, or None (a warning, not an error)."""
    if config.schedule != "constant" and config.warmup_epochs >= config.epochs:
        return (f"the warm-up of {config.warmup_epochs:g} epochs lasts the whole {config.epochs}-epoch run: the "
                f"{config.schedule} schedule never decays the lr; give fewer --warmup-epochs or more --epochs")
    return None


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a torch scheduler stepped once per training step, over `config.epochs` epochs."""
    total_steps = steps_per_epoch * config.epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, config))


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
