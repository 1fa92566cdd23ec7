"""`ensemble`: K copies of a registered model, trained side by side in one run, answering with their mean logits.

Why: `fast` on the JPEG copy is limited by overfitting (training accuracy 98-99% while validation stops near
90%), and a wider network buys little for its compute (docs/benchmarks.md, "Models and recipes"). Independently initialised
members make different mistakes, so their average is right more often than any one of them; that is what the
extra compute buys here. Each member learns from its own loss (objective `ensemble`), as it would alone: members
trained on the loss of their average co-adapt and lose most of that diversity. Members differ by their random
initialisation only; they see the same batches, which keeps one loop, one data stream and one checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cifarx.errors import CifarxError
from cifarx.models.registry import create_model, register_model


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Members with a patch-whitening first conv (`fast`) set it from the same training images."""
        for member in self.members:
            if hasattr(member, "init_whitening"):
                member.init_whitening(images)

    # Trained on the loss of its mean logits the members would co-adapt (module docstring): the config pairs this
    # model with objective `ensemble` (cifarx/config.py), and tests/test_models.py trains it with that objective.
    default_objective = "ensemble"

    def forward(self, x: torch.Tensor, members: bool = False) -> torch.Tensor:
        """The members' mean logits; with `members=True` each member's, stacked [K, B, classes], for training."""
        logits = torch.stack([member(x) for member in self.members])
        return logits if members else logits.mean(0)


@register_model("ensemble")
def ensemble(num_classes: int = 10, member: str = "fast", size: int = 2, member_kwargs: dict | None = None,
             members: list[dict] | None = None) -> nn.Module:
    """`size` independently initialised `member` models (each built with `member_kwargs`), mean logits; or, with
    `members` ([{"model": name, "kwargs": {...}}, ...], as `cifarx combine` writes), those models, which may differ."""
    if members is None:
        if not isinstance(size, int) or size < 2:
            raise CifarxError(f"an ensemble needs size >= 2 members, got {size!r}")
        members = [{"model": member, "kwargs": member_kwargs or {}}] * size
    if len(members) < 2:
        raise CifarxError(f"an ensemble needs 2 or more members, got {len(members)}")
    if any(spec.get("model") == "ensemble" for spec in members):
        raise CifarxError("an ensemble's member cannot itself be an ensemble")
    return Ensemble([create_model(spec["model"], num_classes=num_classes, **spec.get("kwargs", {})) for spec in members])
