"""Settings of each command as dataclasses; presets (TOML files in cifarx/training/presets/) load into them."""

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

from cifarx.errors import CifarxError, did_you_mean

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
               "fast-supervised": "ssl-fast-supervised",
               # few labels on a pretrained backbone (EfficientNet-Lite0's ImageNet features, cached activations)
               "lite0-self-training": "few-labels-lite0", "lite0-supervised": "few-labels-lite0-teacher"}


def setting(default: Any = dataclasses.MISSING, *, help: str, option: bool = False, choices: tuple = (),
            above: float | None = None, low: float | None = None, high: float | None = None,
            below: float | None = None, factory: Any = None):
    """A TrainConfig field declared once: its default, its help, the values it takes (`choices`; a range: `above` /
    `low` inclusive, `high` inclusive / `below` exclusive) and whether `cifarx train` has a named option for it
    (`option`). Validation, the CLI's options, `--set` and the docs all read this declaration."""
    metadata = {"help": help, "option": option, "choices": choices, "above": above, "low": low, "high": high,
                "below": below}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def range_error(name: str, value: float, spec: dict) -> str | None:
    """None if `value` is inside the range a setting declares, else the one line that says what it must be."""
    if spec["above"] is not None and not (value > spec["above"] and math.isfinite(value)):  # `not >` refuses NaN
        bound = "positive" if spec["above"] == 0 else f"> {spec['above']}"
        return f"--{name.replace('_', '-')} must be {bound}, got {value}"
    if not math.isfinite(value):  # the caller's finiteness check names it
        return None
    low = spec["low"]
    high, closed = (spec["high"], True) if spec["high"] is not None else (spec["below"], False)
    if low is not None and high is None and not value >= low:
        return f"--{name.replace('_', '-')} must be >= {low}, got {value}"
    if high is not None and not ((low is None or low <= value) and (value <= high if closed else value < high)):
        return f"--{name.replace('_', '-')} must be in [{low}, {high}{']' if closed else ')'}, got {value}"
    return None


def option_settings() -> list[dataclasses.Field]:
    """The settings `cifarx train` has a named option for, in declaration order."""
    return [item for item in fields(TrainConfig) if item.metadata.get("option")]


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint so the run can be rebuilt."""

    model: str = setting("simple-cnn", option=True, help="registered model name, or timm/<name>")
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # a new run from a trained checkpoint's weights (or a run folder's best.pt), e.g. the whole network fine-tuned
    # after its last stages trained on cached activations; resuming ignores it (last.pt holds the weights)
    init_from: str | None = setting(None, option=True, help="a new run starting from this checkpoint's weights (a run folder: its best.pt), same model and classes, with this run's own settings (timm's --initial-checkpoint)")
    objective: str = "supervised"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    # data
    data: str = setting("cifar10", option=True, help="'cifar10' (torchvision download) or an image folder with train/<class>/...")
    data_root: str | None = setting(None, option=True, help="download/cache folder for --data cifar10")
    val_size: int = setting(5000, option=True, low=0, help="validation images carved from train, stratified, for selection")
    # the seed that picks those images; None = `seed`. Runs of one recipe with other seeds (an ensemble's members)
    # set it to one value, so they hold out the same images and `cifarx combine` can measure them together
    split_seed: int | None = setting(None, option=True, help="the seed that picks the --val-size images (default: --seed); one value for runs of several seeds keeps one validation split, so `cifarx combine` can ensemble them")
    train_size: int | None = setting(None, option=True, low=0, help="train on only this many images (stratified); default all the rest")
    # semi-supervised (vae-ssl): a labelled subset of the training images, stratified and fixed by the seed, plus
    # unlabelled images from the rest whose labels become -1; None/0 = every training image labelled (the default)
    labelled: int | None = setting(None, option=True, help="semi-supervised: labelled training images (stratified, fixed by --seed)")
    labelled_per_class: int | None = setting(None, option=True, help="semi-supervised: exactly this many labelled images per class")
    unlabelled: int | str = setting(0, option=True, help="semi-supervised: images of the rest of train with their labels hidden (a number, or 'all')")
    labelled_fraction: float | None = None  # share of each batch given to labelled images (oversampled); None = natural mix
    # self-training (cifarx/self_training.py): rounds, keep_per_class, threshold, tta, teacher = {overrides};
    # empty = an ordinary run. pseudo_labels: a round's selection file, which gives its images their teacher's labels
    self_training: dict[str, Any] = field(default_factory=dict)
    pseudo_labels: str | None = None
    seed: int = setting(0, option=True, help="seeds the split, the model's initial weights and every epoch's order and augmentation")
    # schedule of the run
    epochs: int = setting(10, option=True, above=0, help="passes over the training images")
    batch_size: int = setting(128, option=True, above=0, help="images per training step (the global batch under --nproc)")
    eval_batch_size: int = setting(500, above=0, help="images per validation batch")
    patience: int = setting(0, option=True, low=0, help="early stopping after this many epochs without improvement (0 = off)")
    # online hard-example selection (selective backprop): each step draws batch_size / hard_fraction images, scores
    # them by their cross-entropy in eval mode without gradients, and trains on the batch_size hardest, so the
    # backward pass is spent where the loss is; an epoch is hard_fraction as many steps. 1 = off
    hard_fraction: float = setting(1.0, option=True, help="each step scores batch-size / F images by their loss (no gradients) and trains on the batch-size hardest: fewer backward passes an epoch (1 = off)")
    # how the hard images are found: "scored" (the pool above, a forward pass each step) or "remembered": each epoch
    # trains on the hard_fraction of images whose loss, remembered from the last step that trained them, is highest
    # (never trained = highest, ties random), so an epoch costs hard_fraction of a full one and scores nothing
    hard_selection: str = setting("scored", option=True, choices=HARD_SELECTIONS, help="with --hard-fraction: score a pool each step, or train each epoch on the F of images whose last training loss was highest (no scoring)")
    # optimiser
    optimizer: str = setting("adam", option=True, choices=OPTIMIZERS, help="the optimiser of every parameter (but the conv filter banks with muon)")
    lr: float = setting(1e-3, option=True, above=0, help="peak learning rate")
    momentum: float = setting(0.9, low=0, below=1, help="SGD/RMSprop momentum (Adam's beta1)")
    nesterov: bool = False
    weight_decay: float = setting(0.0, option=True, low=0, help="L2 penalty (decoupled for adamw)")
    decoupled_weight_decay: bool = False  # SGD: decay per step = weight_decay x schedule factor, independent of lr
    norm_lr_scale: float = setting(1.0, low=0, help="lr multiplier for normalisation weights and biases")
    norm_weight_decay: float | None = setting(None, low=0, help="weight decay of normalisation weights and biases; default: weight_decay")
    backbone_lr_scale: float = setting(1.0, option=True, above=0, help="timm/<name>: lr multiplier for the backbone (the head gets --lr)")
    # transfer: with --freeze all, pooled features once (cached), then the head alone (linear_probe.py); with
    # --freeze N, the frozen prefix's activations once per image and its flip, then the loop (prefix_cache.py)
    cached_features: bool = setting(False, option=True, help="with --freeze all: backbone features once (cached), then the head alone; with --freeze N (EfficientNet): the frozen stages' activations once per image and its flip (cached, --set cache_dtype=float16), then the last N stages + head train on them")
    cache_dtype: str = setting("float16", choices=CACHE_DTYPES, help="the cached prefix activations' storage dtype")
    # transfer, progressive resizing: the sizes the images are upsampled to in the run's first parts (equal shares of
    # its epochs), rising, before the model's own img_size in the last part; validation and export always use img_size
    progressive_sizes: list[int] = setting(factory=list, option=True, help="timm/<name>: comma list of rising sizes the training images are upsampled to in the run's first equal parts, before --img-size in the last (progressive resizing)")
    schedule: str = setting("constant", option=True, choices=SCHEDULES, help="the learning rate's shape over the run")
    warmup_epochs: float = setting(0.0, option=True, low=0, help="epochs of linear warm-up from lr x initial_lr_fraction")
    initial_lr_fraction: float = setting(0.0, low=0, high=1, help="warm-up starts at lr x this")
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr is multiplied by gamma
    gamma: float = setting(0.1, low=0, help="multistep: the lr factor at each milestone")
    final_lr_fraction: float = setting(0.0, low=0, high=1, help="cosine/linear/onecycle end at lr x this")
    label_smoothing: float = setting(0.0, option=True, low=0, below=1, help="cross-entropy label smoothing")
    ema_decay: float = setting(0.0, option=True, low=0, below=1, help="parameter EMA decay per step (0 = off)")
    ema_every: int = setting(1, low=1, help="update the EMA every this many steps (decay is per update)")
    ema_warmup: bool = False  # decay grows as 1 - (1 + updates)^(-2/3) up to ema_decay (timm), so short runs average recent weights
    lookahead_every: int = setting(0, low=0, help="every this many steps pull the weights to their running average; 0 = off")
    lookahead_decay: float = setting(0.95**5, low=0, below=1, help="the average's decay at the end of training...")
    lookahead_power: float = setting(3.0, low=0, help="...reached as decay x progress**power: weak early, strong as the lr anneals")
    # Muon (torch.optim.Muon) for the conv filter banks, `optimizer` for every other parameter; its lr follows the
    # same schedule. Its steps are orthogonalised (their size is the lr's, whatever the gradient's or batch's), and
    # each filter bank is kept at norm sqrt(out channels) instead of being decayed (airbench94_muon: lr 0.24, momentum
    # 0.6, Nesterov)
    muon: bool = False
    muon_lr: float = setting(0.24, above=0, help="Muon's learning rate (the size of its orthogonalised steps)")
    muon_momentum: float = setting(0.6, low=0, below=1, help="Muon's (Nesterov) momentum")
    # augmentation (training batches only)
    augment: list[str] = setting(factory=lambda: ["crop", "flip"], option=True, choices=AUGMENTATIONS, help="comma list of training augmentations ('' for none)")
    crop_padding: int = setting(4, low=0, high=31, help="crop: pixels the image may move each way")
    translate_mode: str = setting("reflect", choices=TRANSLATE_MODES, help="crop: how the border is filled")
    cutout_size: int = setting(16, low=0, high=32, help="cutout: side of the erased square")
    rotate_degrees: float = setting(15.0, low=0, high=180, help="rotate: largest angle either way")
    whiten_init: bool = True  # models with a patch-whitening first conv initialise it from training images
    whiten_bias_epochs: int | None = setting(None, low=0, help="the whitening conv's bias trains for this many epochs, then is frozen; default all")
    tta: str = setting("none", option=True, choices=TTA_MODES, help="test-time augmentation for the final validation")
    # machine
    device: str = setting("cpu", option=True, help="cpu, cuda or cuda:N")
    threads: int | None = setting(None, option=True, low=0, help="torch intra-op threads")
    channels_last: bool = setting(True, option=True, help="channels-last memory format for the model and batches")
    compile: bool = setting(False, option=True, help="torch.compile the model")
    # bfloat16: the training step's forward pass under torch.autocast (validation, TTA and export stay float32). Whether
    # it pays depends on CPU and network, so it is chosen, not guessed: `fast` steps 1.8-3x faster with AMX tiles, 1.6x
    # on one AVX512-BF16 CPU without them and slower on another; EfficientNet (depthwise convolutions) 0.46-0.72x
    # (docs/benchmarks.md)
    precision: str = setting("float32", option=True, choices=PRECISIONS, help="the training step's forward pass (bfloat16: torch.autocast; validation and export stay float32). bfloat16 trains fast 1.6-3x faster on some CPUs (AMX, some AVX512-BF16), slower on others, EfficientNet slower: benchmarks/train_speed.py measures both")
    workers: int = setting(2, low=0, help="DataLoader workers, only for per-image torchvision augmentations")
    # under torchrun (docs/distributed.md): BatchNorm statistics over the global batch instead of each rank's share,
    # and how long a rank waits for the others in a collective before the job stops with an error
    sync_bn: bool = setting(False, option=True, help="distributed: BatchNorm statistics over the global batch")
    dist_timeout: float = setting(600.0, low=0, help="seconds a rank waits for the others in a collective before the job stops")
    out: str = setting("runs/latest", option=True, help="run folder (config, metrics, curves, checkpoints)")
    command: str | None = None  # the command line that started the run, for model cards
    preset: str | None = None

    def validate(self) -> None:
        """Reject values that cannot make a run, with one clear line."""
        self._validate_numbers()
        for item in fields(self):
            value = getattr(self, item.name)
            allowed = item.metadata.get("choices")
            if allowed and isinstance(value, list):
                unknown = [entry for entry in value if entry not in allowed]
                if unknown:
                    raise CifarxError(f"unknown {item.name} {unknown}; choose from {', '.join(allowed)}")
            elif allowed and value not in allowed:
                raise CifarxError(f"unknown {item.name} {value!r}; choose from {', '.join(allowed)}")
        if not 0 < self.hard_fraction <= 1:
            raise CifarxError(f"--hard-fraction must be in (0, 1], got {self.hard_fraction}")
        if self.hard_fraction < 1 and self.objective not in HARD_EXAMPLE_OBJECTIVES:
            raise CifarxError(f"--hard-fraction ranks labelled images by cross-entropy: objective {self.objective} "
                              f"has other terms; use it with {' or '.join(HARD_EXAMPLE_OBJECTIVES)}")
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
        from cifarx.models.registry import list_models, unknown_model_error

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
            if item.metadata and isinstance(value, (int, float)) and not isinstance(value, bool):
                message = range_error(item.name, value, item.metadata)
                if message:
                    raise CifarxError(message)
            if _has_type(value, float) and float in _types_of(hints[item.name]) and not math.isfinite(value):
                raise CifarxError(f"--{item.name.replace('_', '-')} must be a finite number, got {value}")

    def _validate_semi_supervised(self) -> None:
        if self.unlabelled != "all" and (not isinstance(self.unlabelled, int) or self.unlabelled < 0):
            raise CifarxError(f"--unlabelled must be a whole number >= 0 or 'all', got {self.unlabelled!r}")
        if self.labelled_per_class is not None:
            self.labelled = None  # a per-class count replaces the total (e.g. a preset's 1,500), so config.json is plain
        if self.unlabelled and self.labelled is None and self.labelled_per_class is None:
            raise CifarxError("--unlabelled needs a labelled subset: give --labelled or --labelled-per-class")
        if self.self_training:
            self_training_settings(self)  # refuses unknown keys and values out of range before a run folder is made
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
    folder = resources.files("cifarx.training.presets")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's settings as a dict (TOML file `cifarx/training/presets/NAME.toml`). A preset that says `extends = "BASE"`
    is BASE's settings with its own on top (a variant states only what it changes; a table such as model_kwargs
    is replaced whole, not merged)."""
    path = resources.files("cifarx.training.presets") / f"{name}.toml"
    if not path.is_file():
        raise CifarxError(f"unknown preset {name!r}; {did_you_mean(name, list_presets())}available: "
                          f"{', '.join(list_presets())}")
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


# settings of `config.self_training`, with their defaults
SELF_TRAINING_DEFAULTS = {
    "rounds": 2,  # student rounds after the teacher (round 0)
    "keep_per_class": 0.8,  # share of (unlabelled images / classes) kept per class, the most confident first
    "threshold": 0.0,  # and only predictions at least this confident (TTA-averaged softmax)
    "tta": "flip-translate",  # views the teacher averages over
    # round 0's recipe: a preset (that of the supervised-only baseline), or {"preset": NAME, SETTING: VALUE...}
    "teacher": "ssl-fast-supervised",
}


def self_training_settings(config: TrainConfig) -> dict:
    """`config.self_training` completed with the defaults; unknown keys or values out of range are refused."""
    unknown = sorted(set(config.self_training) - set(SELF_TRAINING_DEFAULTS))
    if unknown:
        raise CifarxError(f"unknown self_training setting(s) {unknown}; known: {', '.join(SELF_TRAINING_DEFAULTS)}")
    settings = {**SELF_TRAINING_DEFAULTS, **config.self_training}
    if not isinstance(settings["rounds"], int) or settings["rounds"] < 1:
        raise CifarxError(f"self_training.rounds must be a whole number >= 1, got {settings['rounds']!r}")
    keep = settings["keep_per_class"]
    if keep != "all" and not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise CifarxError(f"self_training.keep_per_class must be in (0, 1] or 'all', got {keep!r}")
    if not 0 <= settings["threshold"] < 1:
        raise CifarxError(f"self_training.threshold must be in [0, 1), got {settings['threshold']!r}")
    teacher = settings["teacher"] if isinstance(settings["teacher"], dict) else {"preset": settings["teacher"]}
    if teacher.get("preset") is not None and teacher["preset"] not in list_presets():
        raise CifarxError(f"self_training.teacher must name a preset, got {teacher['preset']!r}; see `cifarx models`")
    settings["teacher"] = teacher
    if settings["tta"] not in TTA_MODES:
        raise CifarxError(f"self_training.tta must be none, flip or flip-translate, got {settings['tta']!r}")
    return settings
