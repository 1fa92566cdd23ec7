"""The CNN of the ENSTA report "TP3 Deep Learning with PyTorch": 3 x [conv, (BN), ReLU, conv, (BN), ReLU, pool, (dropout)]."""

import torch.nn as nn

from cifarx.models.common import Normalize
from cifarx.models.registry import register_model


def _stage(c_in: int, c_out: int, batch_norm: bool, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return layers


class SimpleCNN(nn.Sequential):
    """~308k parameters with BN; channels 32/64/128 and a 2048 -> classes linear head."""

    def __init__(self, num_classes: int = 10, batch_norm: bool = True, dropout: tuple = (0.2, 0.3, 0.4)):
        widths = (32, 64, 128)
        layers: list[nn.Module] = [Normalize()]
        c_in = 3
        for width, p in zip(widths, dropout):
            layers += _stage(c_in, width, batch_norm, p)
            c_in = width
        layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, num_classes)]
        super().__init__(*layers)


@register_model("simple-cnn")
def simple_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """The report's improved variant: BatchNorm after every conv and dropout 0.2/0.3/0.4."""
    return SimpleCNN(num_classes, batch_norm=True, **kwargs)


@register_model("simple-cnn-plain")
def simple_cnn_plain(num_classes: int = 10) -> nn.Module:
    """The report's first variant: no BatchNorm, no dropout."""
    return SimpleCNN(num_classes, batch_norm=False, dropout=(0.0, 0.0, 0.0))
