"""Settings of each command as dataclasses; presets (TOML files in cifarx/presets/) load into them."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from cifarx.errors import CifarxError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "multistep", "cosine", "linear", "onecycle")
# alternating-flip: each image flipped in every other epoch (airbench), instead of flip's coin per image and epoch
AUGMENTATIONS = ("crop", "flip", "alternating-flip", "cutout", "rotate", "autoaugment", "erasing")
TTA_MODES = ("none", "flip", "flip-translate")
CACHE_DTYPES = ("float16", "bfloat16", "float32")  # cached prefix activations (prefix_cache.py)
PRECISIONS = ("float32", "bfloat16")  # the training step's forward pass
HARD_SELECTIONS = ("scored", "remembered")  # how --hard-fraction finds the hard images (batches.py)
HARD_EXAMPLE_OBJECTIVES = ("supervised", "ensemble")  # whose loss is the cross-entropy of the logits of labelled images
TRANSLATE_MODES = ("reflect", "constant")  # the padding modes both torch.nn.functional.pad and torchvision's RandomCrop know
# semi-supervised recipes: `--method X` is the preset SSL_METHODS[X]. vae-ssl: "deep-" ones have the TP3 CNN as
# q(y|x); the fast network's: self-training rounds and their supervised-only baseline
SSL_METHODS = {**{name: f"vae-ssl-{name}" for name in ("m1", "m2", "m2-fixmatch", "supervised", "deep-m2-fixmatch",
                                                       "deep-fixmatch", "deep-supervised")},
               "self-training": "ssl-fast-self-training", "fixmatch": "ssl-fast-fixmatch",
               "fast-supervised": "ssl-fast-supervised"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint so the run can be rebuilt."""

    model: str = "simple-cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # a new run from a trained checkpoint's weights (or a run folder's best.pt), e.g. the whole network fine-tuned
    # after its last stages trained on cached activations; resuming ignores it (last.pt holds the weights)
    init_from: str | None = None
    objective: str = "supervised"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "cifar10"
    data_root: str | None = None
    val_size: int = 5000  # images held out of train, stratified, for selection
    # the seed that picks those images; None = `seed`. Runs of one recipe with other seeds (an ensemble's members)
    # set it to one value, so they hold out the same images and `cifarx combine` can measure them together
    split_seed: int | None = None
    train_size: int | None = None  # use only this many training images (stratified); None = all the rest
    # semi-supervised (vae-ssl): a labelled subset of the training images, stratified and fixed by the seed, plus
    # unlabelled images from the rest whose labels become -1; None/0 = every training image labelled (the default)
    labelled: int | None = None
    labelled_per_class: int | None = None  # exactly this many per class; replaces `labelled` when given
    unlabelled: int | str = 0  # or 'all': every training image outside the labelled subset
    labelled_fraction: float | None = None  # share of each batch given to labelled images (oversampled); None = natural mix
    # self-training (cifarx/self_training.py): rounds, keep_per_class, threshold, tta, teacher = {overrides};
    # empty = an ordinary run. pseudo_labels: a round's selection file, which gives its images their teacher's labels
    self_training: dict[str, Any] = field(default_factory=dict)
    pseudo_labels: str | None = None
    seed: int = 0
    # schedule of the run
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 500
    patience: int = 0  # early stopping: epochs without a better val accuracy; 0 = off
    # online hard-example selection (selective backprop): each step draws batch_size / hard_fraction images, scores
    # them by their cross-entropy in eval mode without gradients, and trains on the batch_size hardest, so the
    # backward pass is spent where the loss is; an epoch is hard_fraction as many steps. 1 = off
    hard_fraction: float = 1.0
    # how the hard images are found: "scored" (the pool above, a forward pass each step) or "remembered": each epoch
    # trains on the hard_fraction of images whose loss, remembered from the last step that trained them, is highest
    # (never trained = highest, ties random), so an epoch costs hard_fraction of a full one and scores nothing
    hard_selection: str = "scored"
    # optimiser
    optimizer: str = "adam"
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False  # SGD: decay per step = weight_decay x schedule factor, independent of lr
    norm_lr_scale: float = 1.0  # lr multiplier for normalisation weights and biases
    norm_weight_decay: float | None = None  # None: same as weight_decay
    backbone_lr_scale: float = 1.0  # transfer (timm/<name>): lr multiplier for everything but the new head
    # transfer: with --freeze all, pooled features once (cached), then the head alone (linear_probe.py); with
    # --freeze N, the frozen prefix's activations once per image and its flip, then the loop (prefix_cache.py)
    cached_features: bool = False
    cache_dtype: str = "float16"  # the prefix activations' storage dtype: float16, bfloat16 or float32
    # transfer, progressive resizing: the sizes the images are upsampled to in the run's first parts (equal shares of
    # its epochs), rising, before the model's own img_size in the last part; validation and export always use img_size
    progressive_sizes: list[int] = field(default_factory=list)
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    initial_lr_fraction: float = 0.0  # warm-up starts at lr x this
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr is multiplied by gamma
    gamma: float = 0.1
    final_lr_fraction: float = 0.0  # cosine/linear/onecycle end at lr x this
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # parameter EMA per step; 0 = off
    ema_every: int = 1  # update the EMA every this many steps (decay is per update)
    ema_warmup: bool = False  # decay grows as 1 - (1 + updates)^(-2/3) up to ema_decay (timm), so short runs average recent weights
    lookahead_every: int = 0  # every this many steps pull the weights to their running average; 0 = off
    lookahead_decay: float = 0.95**5  # the average's decay at the end of training...
    lookahead_power: float = 3.0  # ...reached as decay x progress**power: weak early, strong as the lr anneals
    # Muon (torch.optim.Muon) for the conv filter banks, `optimizer` for every other parameter; its lr follows the
    # same schedule. Its steps are orthogonalised (their size is the lr's, whatever the gradient's or batch's), and
    # each filter bank is kept at norm sqrt(out channels) instead of being decayed (airbench94_muon: lr 0.24, momentum
    # 0.6, Nesterov)
    muon: bool = False
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    # augmentation (training batches only)
    augment: list[str] = field(default_factory=lambda: ["crop", "flip"])
    crop_padding: int = 4
    translate_mode: str = "reflect"
    cutout_size: int = 16
    rotate_degrees: float = 15.0
    whiten_init: bool = True  # models with a patch-whitening first conv initialise it from training images
    whiten_bias_epochs: int | None = None  # the whitening conv's bias trains for this many epochs, then is frozen; None = all
    tta: str = "none"  # test-time augmentation for the final validation
    # machine
    device: str = "cpu"
    threads: int | None = None
    channels_last: bool = True
    compile: bool = False
    # bfloat16: the training step's forward pass under torch.autocast (validation, TTA and export stay float32). Whether
    # it pays depends on CPU and network, so it is chosen, not guessed: `fast` steps 1.8-3x faster with AMX tiles, 1.6x
    # on one AVX512-BF16 CPU without them and slower on another; EfficientNet (depthwise convolutions) 0.46-0.72x
    # (docs/benchmarks.md)
    precision: str = "float32"
    workers: int = 2  # DataLoader workers, only for per-image torchvision augmentations
    # under torchrun (docs/distributed.md): BatchNorm statistics over the global batch instead of each rank's share,
    # and how long a rank waits for the others in a collective before the job stops with an error
    sync_bn: bool = False
    dist_timeout: float = 600.0  # seconds
    out: str = "runs/latest"
    command: str | None = None  # the command line that started the run, for model cards
    preset: str | None = None

    def validate(self) -> None:
        """Reject values that cannot make a run, with one clear line."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "eval_batch_size": self.eval_batch_size,
                    "backbone_lr_scale": self.backbone_lr_scale, "muon_lr": self.muon_lr}
        for name, value in positive.items():
            if value is None or not value > 0 or not math.isfinite(value):  # `not >` also refuses NaN
                raise CifarxError(f"--{name.replace('_', '-')} must be positive, got {value}")
        self._validate_numbers()
        at_least = {"train_size": (self.train_size or 0, 0), "threads": (self.threads or 0, 0), "workers": (self.workers, 0),
                    "warmup_epochs": (self.warmup_epochs, 0), "crop_padding": (self.crop_padding, 0),
                    "cutout_size": (self.cutout_size, 0), "ema_every": (self.ema_every, 1),
                    "whiten_bias_epochs": (self.whiten_bias_epochs or 0, 0)}
        for name, (value, minimum) in at_least.items():
            if not value >= minimum:
                raise CifarxError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
        if self.val_size < 0:
            raise CifarxError(f"--val-size must be >= 0, got {self.val_size}")
        if not 0 < self.hard_fraction <= 1:
            raise CifarxError(f"--hard-fraction must be in (0, 1], got {self.hard_fraction}")
        if self.hard_fraction < 1 and self.objective not in HARD_EXAMPLE_OBJECTIVES:
            raise CifarxError(f"--hard-fraction ranks labelled images by cross-entropy: objective {self.objective} "
                              f"has other terms; use it with {' or '.join(HARD_EXAMPLE_OBJECTIVES)}")
        if self.weight_decay < 0 or self.patience < 0 or not 0 <= self.label_smoothing < 1 or not 0 <= self.ema_decay < 1:
            raise CifarxError("weight decay and patience must be >= 0; label smoothing and EMA decay in [0, 1)")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "tta": TTA_MODES, "translate_mode": TRANSLATE_MODES,
                   "cache_dtype": CACHE_DTYPES, "precision": PRECISIONS, "hard_selection": HARD_SELECTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CifarxError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise CifarxError(f"unknown augmentation {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if self.progressive_sizes:
            sizes = self.progressive_sizes
            if any(size < 8 for size in sizes) or sizes != sorted(sizes) or self.epochs <= len(sizes):
                raise CifarxError(f"--progressive-sizes must rise, each >= 8, with fewer sizes than --epochs "
                                  f"(the last part trains at --img-size); got {sizes} for {self.epochs} epochs")
        if self.hard_fraction < 1 and self.cached_features and str(self.model_kwargs.get("freeze")) == "all":
            raise CifarxError("--hard-fraction picks the images of the training loop's steps; the linear probe (--freeze "
                              "all --cached-features) fits its head without that loop: drop one")
        if self.init_from and self.cached_features and str(self.model_kwargs.get("freeze")) == "all":
            raise CifarxError("--init-from starts the training loop from a checkpoint; the linear probe (--freeze all "
                              "--cached-features) fits a new head without that loop: drop one")
        if {"flip", "alternating-flip"} <= set(self.augment):
            raise CifarxError("give flip (a coin per image and epoch) or alternating-flip (every other epoch), not both")
        from cifarx.registry import list_models, unknown_model_error

        if not self.model.startswith("timm/") and self.model not in list_models():
            raise unknown_model_error(self.model)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise CifarxError(f"unknown device {self.device!r}; use cpu or cuda[:N]")
        self._validate_semi_supervised()

    def _validate_numbers(self) -> None:
        """Every float setting finite (Python's comparisons let NaN through silently), and each in its range."""
        hints = typing.get_type_hints(type(self))
        for item in fields(self):
            value = getattr(self, item.name)
            if _has_type(value, float) and float in _types_of(hints[item.name]) and not math.isfinite(value):
                raise CifarxError(f"--{item.name.replace('_', '-')} must be a finite number, got {value}")
        # (lowest, highest, whether the highest itself is allowed); the side is 32 pixels
        ranges = {"momentum": (0, 1, False), "muon_momentum": (0, 1, False), "norm_lr_scale": (0, math.inf, True), "gamma": (0, math.inf, True),
                  "initial_lr_fraction": (0, 1, True), "final_lr_fraction": (0, 1, True),
                  "lookahead_decay": (0, 1, False), "lookahead_power": (0, math.inf, True),
                  "rotate_degrees": (0, 180, True), "dist_timeout": (0, math.inf, True),
                  "norm_weight_decay": (0, math.inf, True), "warmup_epochs": (0, math.inf, True),
                  "crop_padding": (0, 31, True), "cutout_size": (0, 32, True), "lookahead_every": (0, math.inf, True)}
        for name, (lowest, highest, closed) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not (lowest <= value <= highest if closed else lowest <= value < highest):
                interval = f"[{lowest}, {highest}{']' if closed else ')'}" if highest != math.inf else f">= {lowest}"
                raise CifarxError(f"--{name.replace('_', '-')} must be {'in ' if highest != math.inf else ''}{interval}, "
                                  f"got {value}")

    def _validate_semi_supervised(self) -> None:
        if self.unlabelled != "all" and (not isinstance(self.unlabelled, int) or self.unlabelled < 0):
            raise CifarxError(f"--unlabelled must be a whole number >= 0 or 'all', got {self.unlabelled!r}")
        if self.labelled_per_class is not None:
            self.labelled = None  # a per-class count replaces the total (e.g. a preset's 1,500), so config.json is plain
        if self.unlabelled and self.labelled is None and self.labelled_per_class is None:
            raise CifarxError("--unlabelled needs a labelled subset: give --labelled or --labelled-per-class")
        if self.self_training:
            from cifarx.self_training import settings_of

            settings_of(self)  # refuses unknown keys and values out of range before a run folder is made
            if not self.unlabelled:
                raise CifarxError("self-training needs unlabelled images: give --unlabelled N or all")
        elif self.unlabelled and self.objective == "supervised" and not self.pseudo_labels:
            raise CifarxError("the supervised objective cannot learn from unlabelled images; use --method m1 or m2, "
                              "or --unlabelled 0")
        if (self.model == "ensemble") != (self.objective == "ensemble"):
            raise CifarxError("an ensemble trains each member on its own loss: give --model ensemble with "
                              "--set objective=ensemble (or --preset fast-ensemble), and that objective only to an ensemble")
        if self.hard_selection == "remembered" and self.hard_fraction < 1 and self.labelled_fraction:
            raise CifarxError("--hard-selection remembered picks an epoch's images by their loss; labelled_fraction "
                              "fixes each batch's labelled share instead: drop one")
        if self.labelled_fraction is not None and not 0 < self.labelled_fraction < 1:
            raise CifarxError(f"labelled_fraction must be in (0, 1), got {self.labelled_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CifarxError(f"unknown setting(s) {unknown}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():  # a --set or preset value of the wrong type stops here, not mid-run
            if not _has_type(value, hints[name]):
                raise CifarxError(f"setting {name} must be {getattr(hints[name], '__name__', hints[name])}, got {value!r}")
        return cls(**values)


def _types_of(hint: Any) -> tuple:
    """The plain types an annotation allows: float | None -> (float, NoneType)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return typing.get_args(hint)
    return (hint,)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits a TrainConfig annotation (ints pass as floats; bools pass as neither)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, typing.get_args(hint)[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def list_presets() -> list[str]:
    """Names of the preset recipe files shipped inside the package."""
    folder = resources.files("cifarx.presets")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's settings as a dict (TOML file `cifarx/presets/NAME.toml`). A preset that says `extends = "BASE"`
    is BASE's settings with its own on top (a variant states only what it changes; a table such as model_kwargs
    is replaced whole, not merged)."""
    path = resources.files("cifarx.presets") / f"{name}.toml"
    if not path.is_file():
        raise CifarxError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    if name in _seen:
        raise CifarxError(f"preset {name!r} extends itself through {' -> '.join(_seen)}")
    values = tomllib.loads(path.read_text())
    values.pop("description", None)
    base = values.pop("extends", None)
    if base is not None:
        values = {**load_preset(base, (*_seen, name)), **values}
    values["preset"] = name
    return values


def make_train_config(preset: str | None = None, settings: dict[str, Any] | None = None,
                      model_args: dict[str, Any] | None = None, **options: Any) -> TrainConfig:
    """A checked config from, in rising precedence: the defaults, the preset, `settings` (`--set KEY=VALUE`), and
    the `options` that are not None (named command-line options). `model_args` (`--model-arg`, `--img-size`...)
    are merged into the model_kwargs so far, not put in their place."""
    values: dict[str, Any] = load_preset(preset) if preset else {}
    values.update(settings or {})
    values.update({k: v for k, v in options.items() if v is not None})
    if model_args:
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **model_args}
    config = TrainConfig.from_dict(values)
    config.validate()
    return config


def recipe_preset(preset: str | None, method: str | None, model: str | None) -> str | None:
    """The preset a command line asks for: `--method X` is the SSL_METHODS[X] recipe, and `--model vae-ssl` alone
    is vae-ssl-m2 (with the seed's budget of 1,500 labelled + 10,000 unlabelled images unless overridden)."""
    if method and preset:
        raise CifarxError(f"give --method or --preset, not both (--method {method} is --preset {SSL_METHODS[method]})")
    if method or (model == "vae-ssl" and not preset):
        return SSL_METHODS[method or "m2"]
    return preset


# Settings a resumed run may change: how long it trains (its epochs so far stay as they were) and the machine's.
RESUMABLE = ("epochs", "patience", "device", "threads", "workers", "eval_batch_size")


def resumed_config(saved: dict[str, Any], options: dict[str, Any], epochs_done: int) -> TrainConfig:
    """A saved run's config with the `options` (not None) that may change on resume; any other is refused."""
    given = {k: v for k, v in options.items() if v is not None}
    refused = sorted(set(given) - set(RESUMABLE))
    if refused:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in refused)
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in RESUMABLE)
        raise CifarxError(f"--resume continues a run with its own settings: {names} cannot change (only {allowed} can)")
    if given.get("epochs") is not None and given["epochs"] < epochs_done:
        raise CifarxError(f"the run has trained {epochs_done} epochs already; --epochs must be at least that")
    return TrainConfig.from_dict({**saved, **given})
