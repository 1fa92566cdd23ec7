"""`fast`: the flagship from-scratch network, an airbench94-style ResNet-like stack trained in ~10 epochs.

Structure (published by Keller Jordan's airbench; written here from its description): a frozen 2x2
patch-whitening convolution initialised from training-image statistics, three groups of
[conv3x3, max-pool, BN, act, conv3x3, BN, act], a global max-pool and a bias-free linear head scaled down.
With `norm_before_pool` each group starts [conv3x3, BN, act, max-pool] instead (the int8 variant's order).
BatchNorm keeps its scale fixed at 1 (only the shift trains), and each conv starts as a partial identity
(Dirac init), an implicit residual that lets this plain stack train fast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cifarx.models.common import Normalize
from cifarx.models.registry import register_model

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # scale fixed at 1: with the fixed-scale head it only changes the lr
    return norm


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, activation: str, bn_momentum: float, norm_before_pool: bool = False):
        act = ACTIVATIONS[activation]
        # Pooling first is 4x cheaper to normalise in training; normalising first lets an exporter fold the BatchNorm
        # into the convolution (and a ReLU into the int8 kernel), which the int8 runtimes need.
        first = ([_conv(c_in, c_out), _norm(c_out, bn_momentum), act(), nn.MaxPool2d(2)] if norm_before_pool
                 else [_conv(c_in, c_out), nn.MaxPool2d(2), _norm(c_out, bn_momentum), act()])
        super().__init__(*first, _conv(c_out, c_out), _norm(c_out, bn_momentum), act())


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple = (64, 256, 256), whiten_kernel: int = 2,
                 activation: str = "gelu", bn_momentum: float = 0.4, logit_scale: float = 1 / 9,
                 norm_before_pool: bool = False):
        super().__init__()
        whiten_width = 2 * 3 * whiten_kernel**2
        self.normalize = Normalize()
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_whitening, then frozen
        nn.init.zeros_(self.whiten.bias)
        groups, c_in = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(c_in, width, activation, bn_momentum, norm_before_pool))
            c_in = width
        self.body = nn.Sequential(ACTIVATIONS[activation](), *groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten k x k patches: eigenvectors of their covariance over sqrt(eigenvalue)."""
        k = self.whiten.kernel_size[0]
        x = self.normalize(images.float())
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.whiten(self.normalize(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale


@register_model("fast")
def fast(num_classes: int = 10, **kwargs) -> nn.Module:
    """The flagship: ~1.97M parameters, widths 64/256/256, trained by the `fast` preset."""
    return FastNet(num_classes, **kwargs)
