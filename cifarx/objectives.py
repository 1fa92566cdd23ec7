"""Objectives: what a training step minimises. `objective(model, images, labels) -> {"loss", "logits", ...}`.

Families differ here (and in their builders and presets), never by a copy of the training loop.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.errors import CifarxError

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict]
_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str):
    def decorate(factory):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        _OBJECTIVES[name] = factory
        return factory

    return decorate


def make_objective(name: str, **kwargs) -> Objective:
    if name not in _OBJECTIVES:
        raise CifarxError(f"unknown objective {name!r}; choose from {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name](**kwargs)


@register_objective("supervised")
def supervised(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy on the model's logits, with optional label smoothing."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = model(images)
        return {"loss": F.cross_entropy(logits, labels, label_smoothing=label_smoothing), "logits": logits}

    return objective
