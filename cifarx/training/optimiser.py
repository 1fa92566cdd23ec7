"""How the weights move: optimiser parameter groups (Muon for conv filters), the per-step lr schedule, Lookahead,
which parameters train in which epoch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cifarx.training.config import TrainConfig
from cifarx.errors import CifarxError


def parameter_groups(model: nn.Module, config: TrainConfig, leave_out: list[torch.Tensor] = ()) -> list[dict]:
    """Two groups: normalisation-layer parameters (own lr scale and decay), and everything else but `leave_out`."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    left_out = {id(p) for p in leave_out}
    norm_params, other_params = [], []
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in left_out:
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
    """The configured optimiser over `parameter_groups`; with `muon`, Muon for the trainable conv filter banks."""
    if not config.muon:
        return _optimizer(parameter_groups(model, config), config)
    filters = conv_filters(model)
    if not filters:
        raise CifarxError(f"muon steps convolution filters, and {config.model} has none to train")
    others = _optimizer(parameter_groups(model, config, leave_out=filters), config)
    return MuonForFilters(filters, others, lr=config.muon_lr, momentum=config.muon_momentum)


def conv_filters(model: nn.Module) -> list[torch.Tensor]:
    """The trainable convolution filter banks (4-D weights): what Muon steps (a frozen whitening conv is not one)."""
    return [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]


def _optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
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


class MuonForFilters(torch.optim.Optimizer):
    """`torch.optim.Muon` for the conv filter banks and `others` (the configured optimiser) for the rest, as one
    optimiser to the loop: one step, zero_grad and state_dict, and the lr schedule scales the groups of both (they
    share the group dicts), so Muon's lr follows the same warm-up and decay as the others'.

    Muon's update is orthogonalised: its size is set by the lr, not by the gradient's scale. As in airbench94_muon,
    each filter bank is rescaled to norm sqrt(out channels) before its step (a BatchNorm follows every conv, so the
    scale means nothing to the forward pass, and a fixed one keeps each step a fixed share of the weights); that
    normalisation replaces weight decay for the filters.
    """

    def __init__(self, filters: list[torch.Tensor], others: torch.optim.Optimizer, lr: float, momentum: float):
        self.filters, self.others = filters, others
        # torch's Muon takes 2-D parameters only; a filter bank [out, in, k, k] is the matrix [out, in*k*k], as
        # airbench94_muon reshapes it. A view cannot stand in for the weight (a channels_last weight has no such view),
        # so Muon owns flat copies: each step copies the filters and their gradients in and the results back out,
        # whatever the weights' memory format, and sees weights that Lookahead or a resume changed. The copies move
        # 2M numbers a step for `fast`: nothing beside the step's convolutions.
        self.matrices = [p.detach().reshape(len(p), -1).clone() for p in filters]
        self.muon = torch.optim.Muon(self.matrices, lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
        super().__init__(self._groups(), defaults={})

    def _groups(self) -> list[dict]:
        return self.others.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        stepped = [(p, m) for p, m in zip(self.filters, self.matrices) if p.grad is not None]
        for filters, matrix in stepped:
            matrix.copy_(filters.reshape(matrix.shape))
            matrix.mul_(len(matrix) ** 0.5 / matrix.norm())
            matrix.grad = filters.grad.reshape(matrix.shape)
        self.muon.step()
        for filters, matrix in stepped:
            filters.copy_(matrix.view(filters.shape))
            matrix.grad = None
        self.others.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.others.zero_grad(set_to_none)
        for filters in self.filters:
            if set_to_none or filters.grad is None:
                filters.grad = None
            else:
                filters.grad.zero_()

    def state_dict(self) -> dict:
        return {"others": self.others.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.others.load_state_dict(state_dict["others"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = self._groups()  # loading gives both optimisers new group dicts: share those


def train_whitening_bias(model: nn.Module, epoch: int, config: TrainConfig) -> None:
    """The whitening conv's bias trains in the first `whiten_bias_epochs` epochs, then stays as it is (airbench).

    Frozen by `requires_grad`, like the whitening filters and the BatchNorm scales: the optimiser skips a parameter
    without a gradient (no momentum, no decay), and with the whole first layer frozen backward stops before it.
    """
    if config.whiten_bias_epochs is not None:
        model.whiten.bias.requires_grad_(epoch < config.whiten_bias_epochs)


class Lookahead:
    """Every few steps: average <- lerp(average, weights, 1 - decay), then weights <- average.

    The averaged weights are copied back into the network (Lookahead, as airbench uses it), and the decay
    follows the training's progress; timm's Lookahead optimizer wrapper has a fixed rate, hence this class.
    The last step copies the average in (decay 1). BatchNorm statistics are averaged with the weights. A frozen
    parameter (`requires_grad` off, e.g. the whitening bias after its epochs) is left where it was frozen.
    """

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        for name, tensor in model.state_dict().items():
            if name in self.average and name not in frozen:
                self.average[name].lerp_(tensor, 1 - decay)
                tensor.copy_(self.average[name])
