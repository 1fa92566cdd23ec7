"""The transfer-learning frontier: EfficientNet-Lite0 and -Lite2 (offline ImageNet weights) on CIFAR-10, from
the linear probe to full fine-tuning, at a few image sizes: accuracy, training cost and inference cost in one table.

Rows (--rows), each at every --sizes (the 32x32 images are upsampled inside the model):
- linear: `--freeze all --cached-features`: pooled features once per image (cached), then the new head alone.
- last1, last2, last3: `--freeze N --cached-features`: the frozen prefix's activations once per image and its flip
  (cached in --cache-dtype), then the last N stages + head train through the one training loop on them; with
  --translate-activations also randomly translated (`crop` on cached activations), in OUT/<model>-<row>-<size>-crop/;
  with --cutout-activations PIXELS a square of them zeroed per sample (`cutout`), in OUT/...-cutout<PIXELS>/.
- full: `--freeze none`: the whole network through the training loop, on augmented images; with
  --progressive-sizes 96,112 the first parts of the run train at those sizes (`progressive_sizes`), in
  OUT/<model>-full-<size>-from96-112/.
- every row but linear: with --freeze-bn every BatchNorm layer keeps its ImageNet statistics and scale/shift
  (`cifarx train --freeze-bn`), in OUT/...-frozenbn/; with --freeze-depthwise every depthwise convolution keeps its
  ImageNet filters (`cifarx train --freeze-depthwise`), in OUT/...-frozendw/; with --ema-decay D the best checkpoint
  is the weights' moving average (`ema_decay`), in OUT/...-emaD/; with --hard-fraction F each step trains on the
  batch's hardest images out of batch/F scored ones (`cifarx train --hard-fraction`), in OUT/...-hardF/; adding
  --hard-selection remembered, each epoch trains on the F of images with the highest remembered loss, in
  OUT/...-rememberedF/.

Each row gives the best validation accuracy (5,000 images held out of train, seed 0; with --tta also the best
checkpoint's with test-time augmentation), the training wall time and threads, and the latency of the exported best
checkpoint on ONNX Runtime CPU at batch 1 and 256 (cifarx.deploy.export.export_onnx with its parity check, then
cifarx.measure.evaluate.evaluate_onnx on random pixels: latency does not depend on them). The CPU and its ISA flags are
recorded beside the rows.

Rows run cheapest first (every linear row, then last1 ...), each in OUT/<model>-<row>-<size>/. A folder holding a
finished run (summary.json) is not trained again, and one holding frontier.json (the row's whole result) is not
measured again either (--remeasure: export and time it anew, e.g. on a quiet machine); a folder whose run has other
settings is refused, not mixed in. OUT/frontier.json (rows, CPU, commands, the last command's settings) and
OUT/frontier.md (the table for docs/benchmarks.md) are rewritten after every row, so a stopped benchmark keeps what it
measured; rows of earlier commands into the same OUT stay in them (a row measured again replaces its own). Smoke test:

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/transfer.py --models lite0 --rows linear,full --sizes 64 \
        --train-size 256 --val-size 128 --linear-epochs 1 --full-epochs 1 --latency-repeats 2 --out /tmp/frontier-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

from cifarx.cli.main import RichReporter
from cifarx.training.config import TrainConfig, make_train_config
from cifarx.errors import CifarxError
from cifarx.measure.evaluate import evaluate_onnx
from cifarx.deploy.export import export_onnx
from cifarx.io import atomic_write_json, atomic_write_text
from cifarx.process import keep_freed_memory
from cifarx.models.transfer import WEIGHTS_PACKAGES
from cifarx.training.run import train

# lite0 / lite2 -> (model, offline weights package)
MODELS = {package.extra: (f"timm/{package.models[0]}", package.name) for package in WEIGHTS_PACKAGES}
ROWS = ("linear", "last1", "last2", "last3", "full")
# Settings of a reused run folder that may differ from this command's (the machine's, as for `cifarx train --resume`).
MACHINE_SETTINGS = ("out", "threads", "device", "workers", "eval_batch_size")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def prefix_cache_available() -> bool:
    """Whether this cifarx trains `--freeze N --cached-features` (the cached prefix, `cache_dtype`)."""
    return "cache_dtype" in {field.name for field in dataclasses.fields(TrainConfig)}


def progressive_sizes(row: str, img_size: int, args: argparse.Namespace) -> list[int]:
    """The full row's progressive resizing: the --progressive-sizes below its image size (none: no resizing)."""
    return [size for size in args.progressive_sizes if size < img_size] if row == "full" else []


def loop_levers(row: str, args: argparse.Namespace) -> dict:
    """The fine-tuning levers of the rows that train through the loop (not the linear probe): {} when all are off."""
    if row == "linear":
        return {}
    return {key: value for key, value in (("freeze_bn", args.freeze_bn), ("freeze_depthwise", args.freeze_depthwise),
                                          ("ema_decay", args.ema_decay), ("hard_fraction", args.hard_fraction),
                                          ("hard_selection", args.hard_selection))
            if value and (key != "hard_fraction" or value < 1)
            and (key != "hard_selection" or (value == "remembered" and args.hard_fraction < 1))}


def row_config(model: str, row: str, img_size: int, args: argparse.Namespace) -> TrainConfig:
    """The training settings of one row (checked by make_train_config before anything runs)."""
    name, package = MODELS[model]
    translated = row.startswith("last") and args.translate_activations
    cutout = args.cutout_activations if row.startswith("last") else 0
    progressive = progressive_sizes(row, img_size, args)
    levers = loop_levers(row, args)
    backbone_args = {"pretrained": True} if args.pretrained else {"weights": package}
    backbone_args.update({key: True for key in ("freeze_bn", "freeze_depthwise") if levers.get(key)})
    ema = f"-ema{levers['ema_decay']}" if "ema_decay" in levers else ""
    hard = (f"-{'remembered' if 'hard_selection' in levers else 'hard'}{levers['hard_fraction']}"
            if "hard_fraction" in levers else "")
    folder = (f"{model}-{row}-{img_size}{'-crop' if translated else ''}{f'-cutout{cutout}' if cutout else ''}"
              f"{'-from' + '-'.join(map(str, progressive)) if progressive else ''}"
              f"{'-frozenbn' if levers.get('freeze_bn') else ''}{'-frozendw' if levers.get('freeze_depthwise') else ''}"
              f"{ema}{hard}")
    common = dict(model=name, data=args.data, val_size=args.val_size, train_size=args.train_size, seed=args.seed,
                  threads=args.threads, out=str(Path(args.out) / folder), eval_batch_size=100)
    if row == "linear":
        return make_train_config(
            **common, model_kwargs={"img_size": img_size, "freeze": "all", **backbone_args}, cached_features=True,
            epochs=args.linear_epochs, batch_size=256, optimizer="adamw", lr=args.linear_lr, weight_decay=1e-4,
            schedule="cosine",
        )
    loop = dict(batch_size=args.batch_size, optimizer="sgd", nesterov=True, lr=args.lr,
                backbone_lr_scale=args.backbone_lr_scale, weight_decay=5e-5, schedule="cosine", label_smoothing=0.1,
                tta=args.tta, ema_decay=levers.get("ema_decay", 0.0), hard_fraction=levers.get("hard_fraction", 1.0),
                hard_selection=levers.get("hard_selection", "scored"))
    if row == "full":
        return make_train_config(
            **common, **loop, model_kwargs={"img_size": img_size, "freeze": "none", **backbone_args},
            epochs=args.full_epochs, warmup_epochs=min(0.5, args.full_epochs / 4), augment=["crop", "flip"],
            progressive_sizes=progressive,
        )
    # The cache holds each image and its flip; crop translates the cached activations, cutout zeroes a square of
    # them (prefix_cache.py).
    augment = ["crop", "flip"] if translated else ["flip"]
    return make_train_config(
        **common, **loop, model_kwargs={"img_size": img_size, "freeze": int(row.removeprefix("last")), **backbone_args},
        cached_features=True, cache_dtype=args.cache_dtype, epochs=args.partial_epochs,
        warmup_epochs=min(0.5, args.partial_epochs / 4), augment=augment + ["cutout"] * bool(cutout),
        **({"cutout_size": cutout} if cutout else {}),
    )


def check_reusable(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a run folder whose run was trained with other settings than this row's (one line naming them)."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(json.dumps(config.to_dict()))
    differ = sorted(key for key in set(saved) | set(wanted)
                    if key not in MACHINE_SETTINGS and saved.get(key) != wanted.get(key))
    if differ:
        shown = ", ".join(f"{key} {saved.get(key)!r} there, {wanted.get(key)!r} here" for key in differ[:3])
        raise CifarxError(f"{run_dir} holds a run with other settings ({shown}): delete it or use another --out")


def trained(config: TrainConfig) -> tuple[dict, bool]:
    """(summary, reused): the run of `config`, trained now unless its folder holds the finished run already."""
    run_dir = Path(config.out)
    check_reusable(run_dir, config)
    finished = run_dir / "summary.json"
    if finished.is_file():
        print(f"== reusing the finished run {run_dir}")
        return json.loads(finished.read_text()), True
    print(f"== training {run_dir}: {config.model} {config.model_kwargs}, {config.epochs} epochs")
    start = time.perf_counter()
    summary = train(config, reporter=RichReporter())
    return {**summary, "wall_seconds": round(time.perf_counter() - start, 1)}, False


def measured(config: TrainConfig, summary: dict, args: argparse.Namespace) -> dict:
    """Export the best checkpoint (parity checked) and time it on ONNX Runtime CPU; with --tta, its TTA accuracy if
    the run did not give it (the linear probe's head is fitted on plain images: its TTA is measured on the export)."""
    run_dir = Path(config.out)
    exported = run_dir / "best.onnx"
    parity = export_onnx(run_dir, exported, data=args.data)
    timing = evaluate_onnx(exported, data=None, batch_sizes=[1, 256], threads=args.threads,
                           warmup=2, repeats=args.latency_repeats)
    result = {"onnx_bytes": parity["bytes"], "parity_max_abs_logit_delta": parity["max_abs_logit_delta"],
              "latency_threads": timing["threads"], "latency": timing["latency"]}
    tta_key = f"best_val_accuracy_tta_{args.tta}"
    if args.tta != "none" and tta_key not in summary:
        with_tta = run_dir / f"best-tta-{args.tta}.onnx"
        export_onnx(run_dir, with_tta, tta=args.tta, data=args.data)
        scored = evaluate_onnx(with_tta, data=args.data, split="val", batch_sizes=[256], threads=args.threads,
                               warmup=0, repeats=1)
        result[tta_key] = scored["accuracy"]
    return result


def run_row(model: str, row: str, img_size: int, args: argparse.Namespace) -> dict:
    """One row of the table: trained (or reused), exported and timed (or reused); skipped or failed in one line."""
    key = {"model": model, "row": row, "img_size": img_size,
           "translated": row.startswith("last") and args.translate_activations,
           "cutout": args.cutout_activations if row.startswith("last") else 0,
           "progressive_sizes": progressive_sizes(row, img_size, args), **loop_levers(row, args)}
    if row.startswith("last") and not prefix_cache_available():
        reason = ("needs `--freeze N --cached-features` (the cached prefix), "
                  "which this cifarx does not have yet")
        print(f"== {model} {row} {img_size}px skipped: {reason}")
        return {**key, "skipped": reason}
    try:
        config = row_config(model, row, img_size, args)
        row_file = Path(config.out) / "frontier.json"
        if row_file.is_file() and not args.remeasure:
            check_reusable(Path(config.out), config)
            print(f"== reusing the measured row {row_file}")
            return {**json.loads(row_file.read_text()), "reused": True}
        summary, reused = trained(config)
        result = {**summary, **key, "timm_model": config.model, "freeze": config.model_kwargs["freeze"],
                  "epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size,
                  "cache_dtype": args.cache_dtype if row.startswith("last") else None, "train_threads": args.threads,
                  "training_reused": reused}
        result.update(measured(config, summary, args))
    except CifarxError as error:  # one row's failure (a refused setting, a cache that does not fit) ends only that row
        print(f"== {model} {row} {img_size}px failed: {error}")
        return {**key, "failed": str(error)}
    atomic_write_json(Path(config.out) / "frontier.json", result)
    return result


def trained_what(result: dict) -> str:
    if result["row"] == "linear":
        return "head (linear probe)"
    if result["row"] == "full":
        progressive = result.get("progressive_sizes")
        what = f"all, progressive resizing from {', '.join(map(str, progressive))} px" if progressive else "all"
        return what + levers_what(result)
    stages = result["row"].removeprefix("last")
    translated = f", activations translated by {result['prefix_translate_cells']}" if result.get("translated") else ""
    cutout = (f", {result['prefix_cutout_cells']}x{result['prefix_cutout_cells']} cutout" if result.get("cutout")
              else "")
    return f"last {stages} stage{'s' * (stages != '1')} + head{translated}{cutout}{levers_what(result)}"


def levers_what(result: dict) -> str:
    return ((", BatchNorm frozen" if result.get("freeze_bn") else "")
            + (", depthwise filters frozen" if result.get("freeze_depthwise") else "")
            + (f", EMA {result['ema_decay']}" if result.get("ema_decay") else "")
            + (f", hardest {result['hard_fraction']:.0%} of each scored pool trained"
               if result.get("hard_fraction", 1) < 1 and "hard_selection" not in result else "")
            + (f", each epoch the {result['hard_fraction']:.0%} with the highest remembered loss"
               if "hard_selection" in result else ""))


def row_key(result: dict) -> tuple:
    """Where a row sorts in the table: by row (cheapest first), model, image size."""
    return (ROWS.index(result["row"]), result["model"], result["img_size"], result.get("translated", False),
            result.get("cutout", 0), tuple(result.get("progressive_sizes", ())), result.get("freeze_bn", False),
            result.get("freeze_depthwise", False), result.get("ema_decay", 0.0), result.get("hard_fraction", 1.0),
            result.get("hard_selection", "scored"))


def markdown(results: list[dict], cpu: dict, commands: list[str]) -> str:
    lines = ["| model | trained | img size | epochs | best val acc | with TTA | train time | threads | "
             "ORT batch 1 | ORT batch 256 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r or "failed" in r:
            lines.append(f"| {r['model']} | {r['row']} | {r['img_size']} | {'skipped' if 'skipped' in r else 'failed'}: "
                         f"{r.get('skipped') or r.get('failed')} | | | | | | |")
            continue
        tta = next((v for k, v in r.items() if k.startswith("best_val_accuracy_tta_")), None)
        one, batch = r["latency"]["1"], r["latency"]["256"]
        lines.append(f"| {r['model']} | {trained_what(r)} | {r['img_size']} | {r['epochs_run']} | "
                     f"{r['best_val_accuracy']:.2%} | {'-' if tta is None else f'{tta:.2%}'} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['train_threads']} | {one['p50_ms']:.1f} ms | "
                     f"{batch['p50_ms'] / 1000:.2f} s ({batch['images_per_s']:.0f} img/s) |")
    return "\n".join([
        *lines, "",
        f"CPU: {cpu['cpu']}; ISA flags: {', '.join(cpu['isa_flags']) or 'no AVX2/AVX-512'}. ONNX Runtime latency: "
        "median of the timed runs on the exported best checkpoint (resize inside the graph, input [N,3,32,32]).",
        "Commands: " + "; ".join(f"`{command}`" for command in commands), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path.home() / "cifar10-jpeg"), help="image folder with train/<class>/")
    parser.add_argument("--models", default="lite0,lite2", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--sizes", default="160,224", help="comma list of image sizes (px)")
    parser.add_argument("--pretrained", action="store_true", help="timm's hub weights instead of the offline packages")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--linear-lr", type=float, default=2e-3)
    parser.add_argument("--partial-epochs", type=int, default=10, help="epochs of the last1/last2/last3 rows")
    parser.add_argument("--full-epochs", type=int, default=3)
    parser.add_argument("--progressive-sizes", default="", metavar="SIZES",
                        help="full: progressive resizing, e.g. 96,112 (those below each --sizes), rows of their own")
    parser.add_argument("--lr", type=float, default=0.05, help="the head's peak lr in the partial and full rows")
    parser.add_argument("--backbone-lr-scale", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=64, help="of the partial and full rows (linear: 256)")
    parser.add_argument("--cache-dtype", default="float16", help="the cached prefix activations' dtype (last1-3)")
    parser.add_argument("--translate-activations", action="store_true",
                        help="last1-3: translate the cached activations too (crop), rows of their own")
    parser.add_argument("--cutout-activations", type=int, default=0, metavar="PIXELS",
                        help="last1-3: zero a square of this many pixels of the 32-px image (in cells) in the cached "
                             "activations (cutout), rows of their own; 0 = off")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="partial and full rows: BatchNorm keeps its ImageNet statistics and scale/shift")
    parser.add_argument("--freeze-depthwise", action="store_true",
                        help="partial and full rows: the depthwise convolutions keep their ImageNet filters")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="partial and full rows: checkpoints hold the weights' moving average (0 = off)")
    parser.add_argument("--hard-fraction", type=float, default=1.0,
                        help="partial and full rows: train each step on the hardest F of batch/F scored images (1 = off)")
    parser.add_argument("--hard-selection", default="scored", choices=["scored", "remembered"],
                        help="with --hard-fraction: score a pool each step, or pick each epoch's F by remembered loss")
    parser.add_argument("--tta", default="flip", choices=["none", "flip", "flip-translate"])
    parser.add_argument("--train-size", type=int, help="train on only this many images (smoke tests)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed runs per batch size")
    parser.add_argument("--remeasure", action="store_true", help="export and time rows measured before again")
    parser.add_argument("--out", default="runs/bench-frontier")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `cifarx train` does: at batch 1024 without it, fast's epochs took 1.4x as long
    models, rows = _comma_list(args.models), _comma_list(args.rows)
    for given, known, what in ((models, MODELS, "models"), (rows, ROWS, "rows")):
        if not given or set(given) - set(known):
            parser.error(f"--{what} must list some of {', '.join(known)}, got {','.join(given)!r}")
    try:
        sizes = [int(size) for size in _comma_list(args.sizes)]
        args.progressive_sizes = [int(size) for size in _comma_list(args.progressive_sizes)]
    except ValueError:
        parser.error(f"--sizes and --progressive-sizes must be comma lists of integers, got {args.sizes!r}, "
                     f"{args.progressive_sizes!r}")
    if not sizes or min(sizes) < 8 or args.latency_repeats < 1 or (args.threads or 0) < 1:
        parser.error("--sizes must list sizes >= 8, --latency-repeats and --threads must be >= 1")

    command = shlex.join(["python", "benchmarks/transfer.py", *(sys.argv[1:] if argv is None else argv)])
    cpu = cpu_flags()
    table = Path(args.out) / "frontier.json"
    # Rows measured by earlier commands into the same OUT stay in the table (a row measured again replaces its own),
    # so the table can be built by several commands, e.g. cheap rows at more sizes than full fine-tuning.
    earlier = json.loads(table.read_text()) if table.is_file() else {"commands": [], "results": []}
    commands = [c for c in earlier["commands"] if c != command] + [command]
    results = {row_key(r): r for r in earlier["results"]}
    for row in sorted(rows, key=ROWS.index):  # cheapest rows first: a stopped benchmark has the cheap frontier
        for model in models:
            for img_size in sizes:
                result = run_row(model, row, img_size, args)
                results[row_key(result)] = result
                ordered = [results[key] for key in sorted(results)]
                # Written after every row, so a long benchmark stopped half-way keeps what it measured.
                atomic_write_json(table, {"commands": commands, "settings": vars(args), **cpu, "results": ordered})
                atomic_write_text(Path(args.out) / "frontier.md", markdown(ordered, cpu, commands))
    print(markdown([results[key] for key in sorted(results)], cpu, commands))

if __name__ == "__main__":
    main()
