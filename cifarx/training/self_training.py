"""Self-training rounds: a teacher labels the unlabelled images, a student learns from labels + pseudo-labels.

Round 0 trains the teacher on the labelled images alone. Each later round: the previous round's best weights
predict every unlabelled image (averaged over flip + translate views), a confident and class-balanced share
of them is kept with its predicted class, and a fresh student trains on labels + pseudo-labels through the one
training loop (`loop.train`, with `config.pseudo_labels` naming the round's selection). The student becomes
the next teacher. Every round is an ordinary run folder `RUN/round-K`; the last student's checkpoints are
copied to `RUN/` so export, eval and predict treat a self-training run like any other.

Only images reach the teacher: the unlabelled images' labels are -1 from the data layer on
(`data.semi_supervised_subset`), so nothing here could read them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from cifarx.data import datasets as datamod
from cifarx.training import runfolder
from cifarx.training.checkpoint import load_model
from cifarx.training.batches import PSEUDO_LABELS_FORMAT, split_train_val
from cifarx.training.config import TrainConfig, make_train_config, self_training_settings
from cifarx.errors import CifarxError
from cifarx.io import atomic_torch_save, atomic_write, atomic_write_json
from cifarx.models.common import TestTimeAugmentation
from cifarx.training.loop import train
from cifarx.training.prefix_cache import prefix_probabilities

# what the teacher takes from the self-training run rather than from its preset: the data, the labelled subset,
# the validation split and the machine, so teacher, students and the baseline see the same images
TEACHER_INHERITS = ("data", "data_root", "val_size", "train_size", "labelled", "labelled_per_class", "seed", "device",
                    "threads", "channels_last", "compile", "command")


@torch.no_grad()
def teacher_probabilities(model: torch.nn.Module, images: torch.Tensor, tta: str, batch_size: int,
                          device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """[N, classes] softmax of `model` on uint8 `images`, averaged over the TTA views; batch-wise."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format  # as the loop trains
    model.eval().to(device, memory_format=memory_format)
    net = TestTimeAugmentation(model, tta) if tta != "none" else model
    chunks = [net(datamod.to_float(images[index].to(device)).contiguous(memory_format=memory_format)).softmax(1).cpu()
              for index in datamod.iterate_batches(len(images), batch_size, None, drop_last=False)]
    return torch.cat(chunks)


def select_pseudo_labels(probabilities: torch.Tensor, keep_per_class: float | str, threshold: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, classes) of the pseudo-labels kept: per predicted class, its most confident predictions.

    Each class keeps at most keep_per_class x N / classes rows, so a class the teacher over-predicts cannot
    crowd out the others ("all": no cap), and only rows at or above `threshold`. Ties in confidence are broken by
    a random order drawn from `seed`, so the selection is deterministic for a seed.
    """
    count, classes = probabilities.shape
    confidence, predicted = probabilities.max(1)
    quota = count if keep_per_class == "all" else int(keep_per_class * count / classes)
    shuffle = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    # one sort for all classes: by class, then by confidence (descending), ties in the shuffled order
    order = shuffle[torch.argsort(-confidence[shuffle], stable=True)]
    order = order[torch.argsort(predicted[order], stable=True)]
    sizes = torch.bincount(predicted, minlength=classes)
    rank_in_class = torch.arange(count) - (torch.cumsum(sizes, 0) - sizes)[predicted[order]]
    kept = order[(rank_in_class < quota) & (confidence[order] >= threshold)].sort().values
    return kept, predicted[kept]


def read_rounds_config(run: str | Path) -> TrainConfig | None:
    """The config of the self-training run in folder `run`, or None when `run` is not one."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return None
    config = TrainConfig.from_dict(json.loads(path.read_text()))
    config.out = str(run)
    return config if config.self_training else None


def train_rounds(config: TrainConfig, reporter, resume: bool = False) -> dict:
    """Run (or finish) every round of a self-training run; returns the last student's summary + the rounds'."""
    settings = self_training_settings(config)
    run_dir = Path(config.out)
    with runfolder.claimed(run_dir, new_run=not resume):  # the rounds' own folders are claimed by each run
        if not resume:
            runfolder.write_config(run_dir, config.to_dict())
        summary = _run_rounds(config, settings, run_dir, reporter)
    return summary


def _write_pseudo_labels(teacher_path: Path, config: TrainConfig, settings: dict, path: Path, reporter) -> None:
    """The teacher's predictions on the unlabelled training images and the selection, saved in the run folder."""
    start = time.perf_counter()
    train_set, _ = split_train_val(config)
    unlabelled = (train_set.labels == datamod.UNLABELLED).nonzero().squeeze(1)
    if not len(unlabelled):
        raise CifarxError("self-training needs unlabelled images: give --unlabelled N or all")
    teacher, _ = load_model(teacher_path)
    device = torch.device(config.device)
    if config.cached_features:  # the trailing stages on the cached prefix, the cache the students train on
        if settings["tta"] == "flip-translate":
            raise CifarxError("with --cached-features the teacher averages the cached plain and flipped copies: "
                              "self_training.tta flip (or none), not flip-translate")
        teacher.to(device)
        probabilities = prefix_probabilities(teacher, train_set.images, unlabelled, config, device, reporter,
                                             flip=settings["tta"] == "flip")
    else:
        probabilities = teacher_probabilities(teacher, train_set.images[unlabelled], settings["tta"],
                                              config.eval_batch_size, device, config.channels_last)
    kept, labels = select_pseudo_labels(probabilities, settings["keep_per_class"], settings["threshold"], config.seed)
    atomic_torch_save({
        "format": PSEUDO_LABELS_FORMAT, "version": 1, "teacher": str(teacher_path), "train_images": len(train_set),
        "rows": unlabelled[kept], "labels": labels, "probabilities": probabilities.half(),
        "unlabelled_rows": unlabelled,
        "seconds": time.perf_counter() - start,  # the teacher's pass (and a cached run's prefix): part of the run's cost
    }, path)


def _run_rounds(config: TrainConfig, settings: dict, run_dir: Path, reporter) -> dict:
    """Every round in turn, skipping finished ones and resuming an interrupted one; the run's summary."""
    base = dataclasses.replace(config, self_training={})
    rounds = []
    for round_index in range(settings["rounds"] + 1):
        round_dir = run_dir / f"round-{round_index}"
        if round_index == 0:
            teacher = dict(settings["teacher"])
            round_config = make_train_config(teacher.pop("preset", None),
                                             **{**teacher, **{name: getattr(base, name) for name in TEACHER_INHERITS}})
        else:
            pseudo_labels = round_dir / "pseudo_labels.pt"
            if not pseudo_labels.is_file():  # on --resume the teacher's predictions are reloaded, not recomputed
                round_dir.mkdir(parents=True, exist_ok=True)
                _write_pseudo_labels(run_dir / f"round-{round_index - 1}" / "best.pt", base, settings, pseudo_labels,
                                     reporter)
            round_config = dataclasses.replace(base, pseudo_labels=str(pseudo_labels))
        round_config = dataclasses.replace(round_config, out=str(round_dir))
        reporter.message(f"self-training round {round_index} of {settings['rounds']} "
                         f"({'teacher on the labels alone' if round_index == 0 else 'student'}) -> {round_dir}")
        if (round_dir / "summary.json").is_file():
            summary = json.loads((round_dir / "summary.json").read_text())
        elif (round_dir / "last.pt").is_file():
            summary = train(reporter=reporter, resume=round_dir)
        else:
            summary = train(round_config, reporter=reporter)
        rounds.append({"round": round_index, **summary})
    for name in ("best.pt", "last.pt"):  # the last student is the run's model
        atomic_write(run_dir / name, lambda temporary, name=name: shutil.copyfile(round_dir / name, temporary))
    teacher_passes = [float(torch.load(run_dir / f"round-{r['round']}" / "pseudo_labels.pt", weights_only=True)
                            .get("seconds", 0.0)) for r in rounds[1:]]
    summary = {**rounds[-1], "method": "self-training", "teacher_pass_seconds": round(sum(teacher_passes), 1),
               "train_seconds": round(sum(r["train_seconds"] for r in rounds) + sum(teacher_passes), 1),
               "rounds": rounds}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
