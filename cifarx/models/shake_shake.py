"""Shake-Shake regularisation (Gastaldi 2017), the 26 2x64d network of the TP3 report's comparison.

Every residual block has two branches; in training the block outputs alpha * b1 + (1 - alpha) * b2 with alpha
drawn per image, and the backward pass mixes the gradients with an independent beta ("Shake-Shake-Image").
At evaluation both coefficients are their expectation 0.5, so the exported graph is a plain average.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.models.common import Normalize
from cifarx.models.registry import register_model


class ShakeShake(torch.autograd.Function):
    """alpha * x1 + (1 - alpha) * x2 forward; the gradient reaching x1 is beta * grad, x2 gets (1 - beta) * grad."""

    @staticmethod
    def forward(ctx, x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return alpha * x1 + (1 - alpha) * x2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


def shake_shake(x1: torch.Tensor, x2: torch.Tensor, training: bool) -> torch.Tensor:
    """Training: per-image random alpha forward and beta backward; evaluation: the mean of the branches."""
    if not training:
        return (x1 + x2) * 0.5
    shape = (x1.shape[0], 1, 1, 1)
    alpha = torch.rand(shape, device=x1.device, dtype=x1.dtype)
    beta = torch.rand(shape, device=x1.device, dtype=x1.dtype)
    return ShakeShake.apply(x1, x2, alpha, beta)


def _branch(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
    )


class ShiftedProjection(nn.Module):
    """The paper's shortcut when the shape changes: two strided 1x1 convs, one on the input shifted by a pixel
    (so together they see every pixel of a 2x2 neighbourhood), concatenated, then BN."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv_even = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.conv_odd = nn.Conv2d(c_in, c_out - c_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        even = self.conv_even(x[:, :, :: self.stride, :: self.stride])
        odd = self.conv_odd(shifted[:, :, :: self.stride, :: self.stride])
        return self.bn(torch.cat([even, odd], dim=1))


class ShakeBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.branch1, self.branch2 = _branch(c_in, c_out, stride), _branch(c_in, c_out, stride)
        self.shortcut = nn.Identity() if c_in == c_out and stride == 1 else ShiftedProjection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + shake_shake(self.branch1(x), self.branch2(x), self.training)


class ShakeShakeNet(nn.Sequential):
    """Normalize, conv3x3(16)+BN, 3 stages of `blocks_per_stage` blocks (widths w, 2w, 4w), ReLU, avg-pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 64, blocks_per_stage: int = 4):
        layers: list[nn.Module] = [Normalize(), nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)]
        c_in = 16
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                layers.append(ShakeBlock(c_in, c_out, stride=2 if stage and index == 0 else 1))
                c_in = c_out
        layers += [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)


@register_model("shake-shake-26-2x64d")
def shake_shake_26_2x64d(num_classes: int = 10, width: int = 64) -> nn.Module:
    """Shake-Shake-Image 26 2x64d (~11.7M parameters); `width` is the first stage's branch width (64 = "64d")."""
    return ShakeShakeNet(num_classes, width, blocks_per_stage=4)
