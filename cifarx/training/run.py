"""The front door of training: one place that picks the mode a config asks for and runs it.

Modes: self-training (rounds of ordinary runs, `self_training.py`), the linear probe (a frozen backbone's pooled
features once, then the head alone, `linear_probe.py`) and everything else, the one loop (`loop.py`, which also
trains the last stages on cached prefix activations with `--freeze N --cached-features`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from cifarx.training import loop, self_training
from cifarx.training.config import TrainConfig
from cifarx.training.linear_probe import fit_linear_head, is_linear_probe
from cifarx.training.optimiser import schedule_warning
from cifarx.training.runfolder import Reporter, SilentReporter, check_new_run_folder


def train(config: TrainConfig | None = None, reporter: Reporter | None = None, resume: str | Path | None = None,
          resume_options: dict | None = None) -> dict:
    """Train (or resume) a run; writes RUN_DIR/{config.json,metrics.csv,curves.png,last.pt,best.pt,summary.json}.

    `resume_options`: settings that may change when a run continues (more epochs, the machine's); see
    `config.resumed_config`. Under torchrun every rank calls this: DistributedDataParallel, rank 0 reports and
    writes (docs/distributed.md).
    """
    rounds_config = self_training.read_rounds_config(resume) if resume is not None else config
    if rounds_config is not None and rounds_config.self_training:  # teacher and student runs, each through the loop
        rounds_config.validate()
        return self_training.train_rounds(rounds_config, reporter or SilentReporter(), resume=resume is not None)
    if resume is None and config is not None and is_linear_probe(config):
        config.validate()
        check_new_run_folder(Path(config.out))
        warning = schedule_warning(config)
        if warning:
            warnings.warn(warning)
        return fit_linear_head(config, reporter)
    return loop.train(config, reporter, resume, resume_options)
