"""VGG16 with BatchNorm for 32x32 inputs, as in the CityU report "Image Classification on the CIFAR10 Dataset".

The 13 convolutions of VGG16 (configuration D), each followed by BN and ReLU, five 2x2 max-pools bringing
32x32 down to 1x1x512, then a dense head; the report's L2 kernel regularisation lives in its preset
(weight decay on conv/linear weights), not in the model.
"""

from __future__ import annotations

import torch.nn as nn

from cifarx.models.common import Normalize
from cifarx.models.registry import register_model

VGG16_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool")


class VGG(nn.Sequential):
    """Normalize, conv-BN-ReLU stages with max-pools, flatten, dropout, a dense layer to the classes."""

    def __init__(self, num_classes: int = 10, layout=VGG16_LAYOUT, dropout: float = 0.5):
        layers: list[nn.Module] = [Normalize()]
        c_in = 3
        for item in layout:
            if item == "pool":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c_in, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            c_in = item
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@register_model("vgg16-bn")
def vgg16_bn(num_classes: int = 10, dropout: float = 0.5, width: int = 64) -> nn.Module:
    """VGG16-BN for CIFAR (~14.7M parameters): 13 conv-BN-ReLU layers and a 512 -> classes dense head; `width` is
    the first stage's channels (64 as published; the others scale with it)."""
    layout = tuple(item if item == "pool" else item * width // 64 for item in VGG16_LAYOUT)
    return VGG(num_classes, layout, dropout)
