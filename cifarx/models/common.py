"""Pieces shared by model families: normalisation inside the model, so exported graphs take plain pixels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel, stored as buffers so they travel with the weights and the ONNX graph."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def preprocessing_of(model: nn.Module) -> dict:
    """Mean/std (and resize) folded into a model, for the export metadata."""
    info: dict = {}
    for module in model.modules():
        if isinstance(module, Normalize):
            info["mean"] = [round(v, 6) for v in module.mean.flatten().tolist()]
            info["std"] = [round(v, 6) for v in module.std.flatten().tolist()]
            break
    sizes = sorted({module.resize_to for module in model.modules() if getattr(module, "resize_to", None)})
    if sizes:  # an ensemble's members may each resize to their own size
        info["resize_to"] = sizes[0] if len(sizes) == 1 else ",".join(map(str, sizes))
    return info


class TestTimeAugmentation(nn.Module):
    """Average the logits over flipped (and 1-pixel translated) views; used by eval and folded into exports.

    'flip': mean of x and its mirror. 'flip-translate': that, plus the mean of both shifted one pixel up-left
    and down-right (reflect padding), weighted half and half.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, model: nn.Module, mode: str = "flip"):
        super().__init__()
        if mode not in ("flip", "flip-translate"):
            raise ValueError(f"unknown TTA mode {mode!r}")
        self.model = model
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain_and_augmented(x)[1]

    def plain_and_augmented(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of x alone, TTA logits): the plain view is one of the TTA views, so both figures cost one pass."""
        views = torch.cat([x, x.flip(-1)])
        logits = self.model(views)
        batch = x.shape[0]
        centred = (logits[:batch] + logits[batch:]) / 2
        if self.mode == "flip":
            return logits[:batch], centred
        padded = torch.nn.functional.pad(views, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[-2:]
        shifted = torch.cat([padded[..., :height, :width], padded[..., 2:, 2:]])
        shifted_logits = self.model(shifted)
        return logits[:batch], (centred + shifted_logits.view(4, batch, -1).mean(0)) / 2
