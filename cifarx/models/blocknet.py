"""The Block backbone of the QMUL coursework report "CIFAR-10 Classification".

Each Block looks at its input twice, in parallel: a spatial average pool and a Linear layer predict K mixing
weights per image, and K 3x3 convolutions each propose an output; the block's output is the activated weights'
mixture of the K proposals, plus a residual (a 1x1 conv + BN when the channel count changes), then BN + ReLU.
Blocks are separated by 2x2 max-pools; the classifier is average pool, flatten, dropout, linear.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from cifarx.errors import CifarxError
from cifarx.models.common import Normalize
from cifarx.models.registry import register_model

WEIGHT_ACTIVATIONS = {"softmax": lambda: nn.Softmax(dim=1), "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class Block(nn.Module):
    """sum_k a_k(x) * conv_k(x) + residual(x), then BN + ReLU; a = activation(Linear(avgpool(x))).

    The K convolutions are linear, so sum_k a_k (W_k * x + b_k) = [W_1 .. W_K] * [a_1 x; ..; a_K x] + sum_k a_k b_k:
    one convolution over the K weight-scaled copies of the input. Same function, parameters and conv FLOPs as K
    separate convs, but the per-image scaling touches the (narrower) input instead of K full outputs: about a
    third faster a training step on CPU than one K*C_out conv followed by a weighted sum.
    """

    def __init__(self, c_in: int, c_out: int, num_convs: int, weight_activation: str = "softmax"):
        super().__init__()
        self.num_convs, self.c_out = num_convs, c_out
        self.mixing = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_convs),
                                    WEIGHT_ACTIVATIONS[weight_activation]())
        self.convs = nn.Conv2d(num_convs * c_in, c_out, 3, padding=1, bias=False)  # input channels k*c_in.. belong to conv k
        self.conv_biases = nn.Parameter(torch.zeros(num_convs * c_out))  # b_1 .. b_K, flat
        self.residual = (nn.Identity() if c_in == c_out
                         else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))
        self.post = nn.Sequential(nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        for weight_of_one_conv in self.convs.weight.split(c_in, dim=1):
            nn.init.kaiming_normal_(weight_of_one_conv, nonlinearity="relu")  # fan-in of one 3x3 conv, not of K
        if c_in != c_out:
            nn.init.kaiming_normal_(self.residual[0].weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.mixing(x)  # [B, K]
        scaled_inputs = (x.unsqueeze(1) * weights[:, :, None, None, None]).flatten(1, 2)  # [B, K*C_in, H, W]
        biases = weights @ self.conv_biases.view(self.num_convs, self.c_out)  # [B, C_out]
        mixed = self.convs(scaled_inputs) + biases[:, :, None, None]
        return self.post(mixed + self.residual(x))


class BlockNet(nn.Sequential):
    """Normalize, Blocks with max-pools between them, then avg-pool / flatten / dropout / linear."""

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (128, 128, 128, 128), num_convs: int = 4,
                 dropout: float = 0.5, weight_activation: str = "softmax"):
        layers: list[nn.Module] = [Normalize()]
        c_in = 3
        for index, c_out in enumerate(channels):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers.append(Block(c_in, c_out, num_convs, weight_activation))
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the mixing layers and the classifier
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)


@register_model("blocknet")
def blocknet(num_classes: int = 10, blocks: int = 4, channels: int | Sequence[int] = 128, num_convs: int = 4,
             dropout: float = 0.5, weight_activation: str = "softmax") -> nn.Module:
    """The report's best backbone by default: 4 blocks of 128 channels, K=4 convolutions per block, dropout 0.5.

    `channels` is one width for every block, or a list with one width per block (then `blocks` is its length).
    """
    widths = [channels] * blocks if isinstance(channels, int) else list(channels)
    if not widths or weight_activation not in WEIGHT_ACTIVATIONS:
        raise CifarxError(f"blocknet needs >= 1 block and weight_activation in {sorted(WEIGHT_ACTIVATIONS)}")
    return BlockNet(num_classes, widths, num_convs, dropout, weight_activation)
