"""The tables of docs/models.md: parameters and FLOPs of every registered model and preset, the seed reports'
accuracy, and cifarx's measured validation accuracy read from the run folders of benchmarks/train_presets.sh.

FLOPs are torch.utils.flop_counter.FlopCounterMode's count for one 32x32 image in eval mode: matrix products
and convolutions, a multiply-add counted as 2 FLOPs (element-wise ops, pooling and BN are not counted).
A preset's accuracy appears once `RUNS/<preset>/summary.json` exists; until then its row gives the command.

    python benchmarks/model_table.py                 # rewrites the tables between the markers in docs/models.md
    python benchmarks/model_table.py --print         # prints them instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifarx.training.config import list_presets, make_train_config
from cifarx.io import atomic_write_text
from cifarx.models.registry import create_model, list_models

DATA = "~/cifar10-jpeg"
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"

# What each seed report says about a preset's recipe: (report, reported test accuracy or None, note).
REPORTED = {
    "tp3-simple-cnn": ("ENSTA TP3", 77.05, ""),
    "tp3-simple-cnn-plain": ("ENSTA TP3", None, "the report's baseline before BN, dropout, augmentation"),
    "tp3-simple-cnn-fast": ("ours", None, "CPU-budget recipe for the TP3 model; target 77.05%"),
    "qmul-blocknet-small": ("QMUL", 52.45, ""),
    "qmul-blocknet": ("QMUL", 80.79, ""),
    "blocknet-fast": ("ours", None, "CPU-budget recipe for the QMUL Block backbone, widths 64-512, K=2; target 80.79%"),
    "cityu-vgg16": ("CityU", None, "VGG-family ceiling 92-94%"),
    "vgg16-bn-fast": ("ours", None, "the CityU model on the fast engine; target 92%"),
    "shake-shake-26-2x64d": ("Gastaldi, cited by TP3", 96.03, "1,800 epochs"),
}
# The model of each seed report and the recipe that defines it.
MODEL_PRESET = {"simple-cnn": "tp3-simple-cnn", "simple-cnn-plain": "tp3-simple-cnn-plain", "blocknet": "qmul-blocknet",
                "vgg16-bn": "cityu-vgg16", "shake-shake-26-2x64d": "shake-shake-26-2x64d"}


def size_of(name: str, kwargs: dict) -> tuple[int, int]:
    """(parameters, FLOPs for one image) of a model built with `kwargs`."""
    model = create_model(name, **kwargs).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def command(preset: str) -> str:
    return f"cifarx train --preset {preset} --data {DATA} --out runs/{preset}"


def measured(runs: Path, preset: str) -> dict | None:
    """The run of `preset` in RUNS, if benchmarks/train_presets.sh (or the command above) made one."""
    summary = runs / preset / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def describe_run(summary: dict) -> str:
    epochs, hours = summary["epochs_run"], summary["train_seconds"] / 3600
    return (f"{summary['best_val_accuracy']:.2%} ({epochs} epoch{'s' * (epochs != 1)} of "
            f"{summary['train_images']:,} images, {hours:.1f} h; {summary['val_images']:,} val images)")


def reported_text(preset: str) -> str:
    report, accuracy, note = REPORTED.get(preset, ("—", None, ""))
    text = report if accuracy is None else f"{report}: {accuracy:.2f}% test"
    return f"{text} ({note})" if note else text


def tables(runs: Path) -> str:
    model_rows = ["| model | parameters | FLOPs / image | seed report | cifarx validation accuracy (budget) |",
                  "|---|---:|---:|---|---|"]
    for name in list_models():
        parameters, flops = size_of(name, {})
        preset = MODEL_PRESET.get(name)
        # Only recipes that train this row's network (the default arguments), not a resized variant of it.
        presets_of_model = [p for p in list_presets() if make_train_config(p).model == name
                            and size_of(name, make_train_config(p).model_kwargs) == (parameters, flops)]
        results = [(p, measured(runs, p)) for p in presets_of_model]
        results = [(p, s) for p, s in results if s]
        if results:
            best_preset, best = max(results, key=lambda item: item[1]["best_val_accuracy"])
            accuracy = f"{describe_run(best)}, preset `{best_preset}`"
        elif presets_of_model:
            accuracy = f"not yet measured: `{command(preset or presets_of_model[0])}`"
        else:
            accuracy = "not yet measured (no preset)"
        report = reported_text(preset) if preset else "—"
        model_rows.append(f"| `{name}` | {parameters / 1e6:.2f} M | {flops / 1e6:,.0f} M | {report} | {accuracy} |")

    preset_rows = ["| preset | model (arguments) | parameters | FLOPs / image | epochs | seed report | "
                   "cifarx validation accuracy (budget) |", "|---|---|---:|---:|---:|---|---|"]
    for preset in list_presets():
        config = make_train_config(preset)
        parameters, flops = size_of(config.model, config.model_kwargs)
        arguments = ", ".join(f"{k}={v}" for k, v in config.model_kwargs.items())
        summary = measured(runs, preset)
        accuracy = describe_run(summary) if summary else f"not yet measured: `{command(preset)}`"
        preset_rows.append(f"| `{preset}` | `{config.model}`{f' ({arguments})' if arguments else ''} | "
                           f"{parameters / 1e6:.2f} M | {flops / 1e6:,.0f} M | {config.epochs} | "
                           f"{reported_text(preset)} | {accuracy} |")
    return "\n".join(["### Models", "", *model_rows, "", "### Presets", "", *preset_rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder holding one run folder per preset")
    parser.add_argument("--doc", type=Path, default=Path("docs/models.md"))
    parser.add_argument("--print", action="store_true", help="print the tables, do not touch the doc")
    args = parser.parse_args()
    text = tables(args.runs)
    if args.print:
        print(text)
        return
    doc = args.doc.read_text()
    head, _, rest = doc.partition(START)
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit(f"{args.doc} has no {START} ... {END} markers")
    atomic_write_text(args.doc, f"{head}{START}\n{text}\n{END}{tail}")
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
