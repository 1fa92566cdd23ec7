"""A static site comparing exported models: a sortable table, a section per model, and a live demo that runs the
.onnx files in the browser with onnxruntime-web (WebAssembly).

Everything the page needs is copied into the site (no CDN): the models, the onnxruntime-web files (from the pinned
npm install in `cifarx/report/web`, or `--ort-web DIR`), and the sample images as the model sees them (decoded and resized
by `predict.load_images`, stored as lossless PNG, so the browser feeds the same pixels as ONNX Runtime Python).
"""

from __future__ import annotations

import csv
import html
import json
import math
import shlex
import shutil
import string
from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError
from cifarx.io import atomic_path, atomic_write, atomic_write_text
from cifarx.runtimes.onnxfile import check_model_file, create_session, model_info

WEB = Path(__file__).parent / "web"
DEFAULT_ORT_WEB = WEB / "node_modules" / "onnxruntime-web" / "dist"
# The WebAssembly-only build: the script defining `ort`, the glue module it imports, and the runtime itself.
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ASSETS = ("report.js", "report.css")
LATENCY_BATCHES = ("1", "256")  # the table's latency columns: one image, and a throughput batch
GENERATOR = '<meta name="generator" content="cifarx report">'  # in index.html: marks a folder a rebuild may overwrite


def build_report(inputs: list[str | Path], site: str | Path, *, evals: list[str | Path] = (),
                 samples: str | Path | None = None, samples_per_class: int | None = None,
                 ort_web: str | Path | None = None) -> dict:
    """Write SITE/index.html and its assets; every input is checked (and every sample decoded) before a file is written."""
    site = Path(site)
    model_files = find_model_files(inputs)
    ort_dir = check_ort_web(ort_web)
    sample_files = find_samples(samples, samples_per_class) if samples is not None else []
    eval_results = [result for path in evals for result in load_evals(path)]
    check_site(site)
    from cifarx.runtimes.predict import load_images

    pixels = load_images([path for _, path in sample_files]) if sample_files else None
    models = [describe_model(path) for path in model_files]
    _name_uniquely(models)
    for model in models:
        model["evals"] = [r for r in eval_results if Path(r["model"]).name == Path(model["file"]).name]
    runnable = [m for m in models if "error" not in m and m["browser"]]

    for name in ORT_WEB_FILES:
        _copy(ort_dir / name, site / "ort" / name)
    for name in ASSETS:
        _copy(WEB / name, site / name)
    for model in runnable:
        _copy(Path(model["file"]), site / "models" / f"{model['name']}.onnx")
    sample_entries = []
    for index, ((label, path), image) in enumerate(zip(sample_files, pixels if pixels is not None else [])):
        url = f"samples/{index:04d}.png"
        _write_png(image, site / url)
        sample_entries.append({"image": label, "url": url})
    page_data = {
        "models": [{"name": m["name"], "url": f"models/{m['name']}.onnx"} for m in runnable],
        "samples": sample_entries,
    }
    atomic_write_text(site / "index.html", render_page(models, page_data))
    exports = sum("error" not in m for m in models)
    return {"site": str(site), "index": str(site / "index.html"), "models": len(models), "exports": exports,
            "samples": len(sample_entries)}


# ---------------------------------------------------------------------------------------------- inputs


def find_model_files(inputs: list[str | Path]) -> list[Path]:
    """The .onnx files of each folder (sorted) and each file given as it is; a folder without one is an error."""
    if not inputs:
        raise CifarxError("give at least one .onnx file or folder of them")
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix == ".onnx" and p.is_file())
            if not found:
                raise CifarxError(f"no .onnx files in {item}")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise CifarxError(f"model file or folder not found: {item}")
    return list(dict.fromkeys(files))


def check_ort_web(ort_web: str | Path | None) -> Path:
    """The folder holding onnxruntime-web's WebAssembly files, or one line saying how to get them."""
    folder = Path(ort_web) if ort_web is not None else DEFAULT_ORT_WEB
    missing = [name for name in ORT_WEB_FILES if not (folder / name).is_file()]
    if missing:
        how = "run `npm ci --prefix cifarx/report/web` in the cifarx checkout" if ort_web is None else "point --ort-web at onnxruntime-web's dist folder"
        raise CifarxError(f"onnxruntime-web files not found in {folder} (missing {', '.join(missing)}): {how}")
    return folder


def find_samples(folder: str | Path, per_class: int | None = None) -> list[tuple[str, Path]]:
    """(name relative to the folder, path) of its images, and of its class subfolders' (the first N of each, by name)."""
    from cifarx.data.datasets import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise CifarxError(f"samples folder not found: {folder}")
    if per_class is not None and per_class < 1:
        raise CifarxError(f"--samples-per-class must be at least 1, got {per_class}")

    def images(where: Path) -> list[Path]:
        found = sorted(p for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return found[:per_class] if per_class else found

    files = images(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files += images(sub)
    if not files:
        raise CifarxError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in samples folder {folder} or its subfolders")
    return [(path.relative_to(folder).as_posix(), path) for path in files]


def load_evals(path: str | Path) -> list[dict]:
    """`cifarx eval --json` results: one per file, or a list of them."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise CifarxError(f"eval JSON not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CifarxError(f"cannot read eval JSON {path}: {type(error).__name__}") from None
    results = loaded if isinstance(loaded, list) else [loaded]
    for result in results:
        if not (isinstance(result, dict) and isinstance(result.get("model"), str) and isinstance(result.get("latency"), dict)):
            raise CifarxError(f"{path} is not a `cifarx eval --json` result (needs 'model' and 'latency')")
    return results


def check_site(site: Path) -> None:
    """SITE is absent, empty, or an earlier report (never someone's other folder), and can be written."""
    from cifarx.io import check_writable

    if site.exists() and not site.is_dir():
        raise CifarxError(f"-o {site} is a file; give a folder for the site")
    if site.is_dir() and any(site.iterdir()) and not _is_report(site / "index.html"):
        raise CifarxError(f"-o {site} is a folder with other files in it (not an earlier report); give a new or empty folder")
    check_writable(site / "index.html")


def _is_report(index: Path) -> bool:
    try:
        return GENERATOR in index.read_text(errors="replace")[:1000]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- models


def describe_model(path: Path) -> dict:
    """What the table shows of one file; a file that is not a cifarx export gets an `error` instead, never a crash."""
    row = {"file": str(path), "name": path.stem, "bytes": path.stat().st_size}
    try:
        check_model_file(path)
        session = create_session(path, "cpu")
        info = model_info(session)
    except CifarxError as error:
        row["error"] = f"not a cifarx export: {error}"
        return row
    meta = info["metadata"]
    if "cifarx_format" not in meta:
        row["error"] = "not a cifarx export: no cifarx_format in its metadata"
        return row
    card = _card_for(path)
    row.update(
        model=meta.get("model_name", "?"), class_names=info["class_names"], metadata=meta, card=card,
        params=_parameter_count(path), input_dtype=info["input_dtype"],
        # onnxruntime-web's WebAssembly build has no float16 path for these graphs; say so instead of failing in the page
        browser=info["input_dtype"] == "float32",
    )
    row["what"] = _what_it_is(meta, card)
    row["accuracy"] = _validation_accuracy(meta, card)
    row["runs"] = _run_folders(card)
    return row


def _card_for(path: Path) -> dict | None:
    """The model card JSON beside the file, when it describes this very file (same sha256)."""
    from cifarx.io import file_sha256

    card_path = path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("sha256") != file_sha256(path):
        return None
    return card


def _parameter_count(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    return int(sum(math.prod(tensor.dims) for tensor in proto.graph.initializer))


def _what_it_is(meta: dict, card: dict | None) -> str:
    parts = [meta.get("model_name", "?")]
    training = _json(meta.get("training")) or {}
    if isinstance(training, dict) and training.get("preset"):
        parts.append(f"preset {training['preset']}")
    if card and card.get("method"):
        parts.append(f"{card['method']}, {card.get('labelled')} labels")
    if meta.get("img_size"):
        parts.append(f"resized to {meta['img_size']} in the graph")
    if meta.get("tta", "none") != "none":
        parts.append(f"{meta['tta']} TTA in the graph")
    return ", ".join(parts)


def _validation_accuracy(meta: dict, card: dict | None) -> dict | None:
    """The model's validation accuracy and where it comes from: the card (several seeds), else the ONNX metadata."""
    figures = (card or {}).get("val_accuracy")
    if isinstance(figures, dict) and _finite(figures.get("mean")):
        runs = f", mean of {figures['n']} runs" if figures.get("n", 1) > 1 else ""
        return {"value": figures["mean"], "source": f"model card ({figures.get('measure', '?').replace('_', ' ')}{runs})"}
    value = _json(meta.get("val_accuracy"))
    if _finite(value):
        return {"value": value, "source": "ONNX metadata (best validation epoch)"}
    return None


def _run_folders(card: dict | None) -> list[Path]:
    """Run folders the card names (its validation runs, then the training command's --out) that exist here."""
    if not card:
        return []
    names = [r.get("run") for r in (card.get("val_accuracy") or {}).get("runs", []) if isinstance(r, dict)]
    try:
        words = shlex.split(card.get("command") or "")
    except ValueError:
        words = []
    names += [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
    return [Path(n) for n in dict.fromkeys(names) if n and (Path(n) / "metrics.csv").is_file()]


def _name_uniquely(models: list[dict]) -> None:
    """Models are named by file stem in the page; two files with one stem (from two folders) get -2, -3..."""
    seen: dict[str, int] = {}
    for model in models:
        count = seen[model["name"]] = seen.get(model["name"], 0) + 1
        if count > 1:
            model["name"] = f"{model['name']}-{count}"


def _json(text):
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- writing


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))


def _write_png(image: np.ndarray, target: Path) -> None:
    """A float [3,H,W] image in [0,1] from `load_images` back to the exact uint8 PNG pixels it was decoded from."""
    from PIL import Image

    pixels = np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8)
    with atomic_path(target) as temporary:
        Image.fromarray(pixels, "RGB").save(temporary, format="PNG")


def render_page(models: list[dict], page_data: dict) -> str:
    """index.html: the overview table, the demo, and a section per model."""
    template = string.Template((WEB / "index.html").read_text())
    data = json.dumps(page_data).replace("</", "<\\/")  # inside <script>, text must not close the element
    return template.substitute(
        table=_overview_table(models), sections="\n".join(_model_section(m) for m in models if "error" not in m),
        data=data, count=len(models),
    )


def _runtimes(models: list[dict]) -> list[str]:
    return list(dict.fromkeys(label for m in models for r in m.get("evals", []) for label, _ in _latencies(r)))


def _latencies(result: dict) -> list[tuple[str, dict]]:
    """(runtime label, {batch: stats}) of one eval result: ONNX Runtime on its provider (or the `--runtime` it ran
    on; none if that runtime failed), and PyTorch eager if timed."""
    from cifarx.runtimes.table import REFERENCE

    runtime = result.get("runtime", REFERENCE)
    provider = str(result.get("provider", "?")).removesuffix("ExecutionProvider").lower()
    threads = f", {result['threads']} threads" if result.get("threads") else ""
    if "latency" not in result:
        return []
    pairs = [(f"{runtime} {provider}{threads}" if runtime == REFERENCE else f"{runtime}{threads}", result["latency"])]
    if isinstance(result.get("torch_latency"), dict):
        pairs.append((f"torch eager{threads}", result["torch_latency"]))
    return pairs


def _cell(text: str, sort_value=None, cls: str = "") -> str:
    sort = "" if sort_value is None else f' data-sort="{html.escape(str(sort_value))}"'
    return f'<td{sort}{f" class={cls!r}" if cls else ""}>{text}</td>'


def _overview_table(models: list[dict]) -> str:
    runtimes = _runtimes(models)
    head = ["model", "what it is", "validation accuracy", "size", "parameters"]
    for runtime in runtimes:
        head += [f"{runtime}: p50 ms, batch 1", f"{runtime}: images/s, batch 256"]
    head += ["parity with PyTorch", "made by"]
    rows = []
    for m in models:
        name = html.escape(m["name"])
        if "error" in m:
            cells = [_cell(name, m["name"]), f'<td colspan="{len(head) - 1}" class="not-export">{html.escape(m["error"])}</td>']
            rows.append(f'<tr class="not-export-row" data-row-model="{name}">{"".join(cells)}</tr>')
            continue
        accuracy = m["accuracy"]
        cells = [
            _cell(f'<a href="#model-{name}">{name}</a>', m["name"]),
            _cell(html.escape(m["what"])),
            _cell(f'{accuracy["value"]:.2%} <small>{html.escape(accuracy["source"])}</small>', accuracy["value"])
            if accuracy else _cell("not measured", -1),
            _cell(f'{m["bytes"] / 1e6:.2f} MB', m["bytes"], "num"),
            _cell(f'{m["params"]:,}' if m["params"] is not None else "?", m["params"] or -1, "num"),
        ]
        for runtime in runtimes:
            by_batch = next((lat for r in m["evals"] for label, lat in _latencies(r) if label == runtime), {})
            p50 = (by_batch.get(LATENCY_BATCHES[0]) or {}).get("p50_ms")
            throughput = (by_batch.get(LATENCY_BATCHES[1]) or {}).get("images_per_s")
            cells.append(_cell(f"{p50:.3f}" if _finite(p50) else "—", p50 if _finite(p50) else "", "num"))
            cells.append(_cell(f"{throughput:,.0f}" if _finite(throughput) else "—", throughput if _finite(throughput) else "", "num"))
        parity = (m["card"] or {}).get("parity") or next((r["parity"] for r in m["evals"] if isinstance(r.get("parity"), dict)), None)
        if parity and _finite(parity.get("top1_agreement")) and _finite(parity.get("max_abs_logit_delta")):
            cells.append(_cell(f'{parity["top1_agreement"]:.2%} top-1, max |Δlogit| {parity["max_abs_logit_delta"]:.1e} '
                               f'<small>({parity.get("images", "?")} images)</small>', parity["top1_agreement"]))
        else:
            cells.append(_cell("—", ""))
        command = (m["card"] or {}).get("command")
        cells.append(_cell(f"<code>{html.escape(command)}</code>" if command else "—"))
        rows.append(f'<tr data-row-model="{name}">{"".join(cells)}</tr>')
    header = "".join(f'<th data-column="{i}" tabindex="0">{html.escape(h)}</th>' for i, h in enumerate(head))
    return f'<table id="models" class="sortable"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _model_section(m: dict) -> str:
    name = html.escape(m["name"])
    meta = m["metadata"]
    facts = [("file", m["file"]), ("model", m["what"]), ("classes", ", ".join(m["class_names"])),
             ("input", f'{m["input_dtype"]} [N,3,32,32] RGB in [0,1]'), ("opset", meta.get("opset", "?"))]
    if m["card"]:
        facts += [("trained on", f'{m["card"].get("train_images")} images, {m["card"].get("epochs")} epochs, '
                                 f'{m["card"].get("train_seconds")} s'),
                  ("export command", m["card"].get("export_command") or "—")]
    if not m["browser"]:
        facts.append(("browser demo", f'not run: {m["input_dtype"]} input (export without --fp16 for the web)'))
    parts = [f'<section class="model" id="model-{name}"><h2>{name}</h2><dl>']
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts]
    parts.append("</dl>")
    scored = [r for r in m["evals"] if isinstance(r.get("per_class"), dict) and isinstance(r.get("confusion_matrix"), list)]
    for result in scored[:1]:
        where = f'{result.get("split", "?")} split, {result.get("images", "?")} images'
        accuracy = f'{result["accuracy"]:.2%} ' if _finite(result.get("accuracy")) else ""
        parts.append(f'<h3>Accuracy {accuracy}({html.escape(where)})</h3><div class="plots">')
        parts.append(per_class_svg(result["per_class"]))
        parts.append(confusion_svg(result["confusion_matrix"], result.get("class_names") or m["class_names"]))
        parts.append("</div>")
    for result in m["evals"]:
        parts.append(_latency_table(result))
    for run in m["runs"]:
        parts.append(f"<h3>Training curves <small>{html.escape(str(run))}</small></h3>{curves_svg(run / 'metrics.csv')}")
    if not scored and not m["runs"]:
        parts.append('<p class="missing">No eval JSON (<code>cifarx eval --json</code>, passed with --evals) or run '
                     "folder at hand: no per-class accuracy, confusion matrix or curves.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _latency_table(result: dict) -> str:
    rows = []
    for label, by_batch in _latencies(result):
        for batch, stats in sorted(by_batch.items(), key=lambda item: int(item[0])):
            values = [stats.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "images_per_s")]
            cells = "".join(f'<td class="num">{v:,.3f}</td>' if _finite(v) else "<td>—</td>" for v in values)
            rows.append(f"<tr><td>{html.escape(label)}</td><td class='num'>{html.escape(str(batch))}</td>{cells}</tr>")
    cpu = html.escape(str((result.get("environment") or {}).get("cpu", "?")))
    return (f'<table class="latency"><caption>latency on {cpu}</caption><thead><tr><th>runtime</th><th>batch</th>'
            f'<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>images/s</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


# ---------------------------------------------------------------------------------------------- plots (inline SVG)


def per_class_svg(per_class: dict) -> str:
    """Horizontal bars, one per class, 0 to 100%."""
    names = [n for n, v in per_class.items() if _finite(v)]
    bar, left, width = 18, 90, 260
    rows = []
    for i, name in enumerate(names):
        value = per_class[name]
        y = i * bar
        rows.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(name)}</text>'
                    f'<rect x="{left}" y="{y + 3}" width="{width * value:.1f}" height="{bar - 6}" fill="#4878a8"/>'
                    f'<text x="{left + width * value + 4:.1f}" y="{y + 13}">{value:.1%}</text>')
    height = bar * len(names)
    return (f'<svg class="per-class" role="img" aria-label="per-class accuracy" width="{left + width + 50}" '
            f'height="{height}" viewBox="0 0 {left + width + 50} {height}" font-size="11">{"".join(rows)}</svg>')


def confusion_svg(matrix: list[list[int]], class_names: list[str]) -> str:
    """Counts, rows true class, columns predicted, shaded by the share of the row."""
    size, left, top = 30, 90, 80
    count = len(matrix)
    cells = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells.append(f'<text x="{left - 6}" y="{top + i * size + 19}" text-anchor="end">{html.escape(class_names[i])}</text>')
        for j, value in enumerate(row):
            share = value / total
            colour = f"rgb({int(255 - 183 * share)},{int(255 - 135 * share)},{int(255 - 87 * share)})"
            text = "#fff" if share > 0.5 else "#000"
            cells.append(f'<rect x="{left + j * size}" y="{top + i * size}" width="{size}" height="{size}" fill="{colour}"/>'
                         f'<text x="{left + j * size + size / 2}" y="{top + i * size + 19}" fill="{text}" '
                         f'text-anchor="middle">{int(value)}</text>')
    for j, name in enumerate(class_names[:count]):
        x = left + j * size + size / 2
        cells.append(f'<text transform="translate({x + 4},{top - 6}) rotate(-60)">{html.escape(name)}</text>')
    width, height = left + count * size + 10, top + count * size + 20
    cells.append(f'<text x="{left + count * size / 2}" y="{height - 4}" text-anchor="middle">predicted →</text>')
    return (f'<svg class="confusion" role="img" aria-label="confusion matrix" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="10">{"".join(cells)}</svg>')


def curves_svg(metrics_csv: Path) -> str:
    """Train and validation accuracy per epoch from a run's metrics.csv, as a line plot."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series = {}
    for column, colour in (("train_accuracy", "#c0504d"), ("val_accuracy", "#4878a8")):
        points = [(float(r["epoch"]), float(r[column])) for r in rows if _finite(_float(r.get(column))) and _float(r.get("epoch")) is not None]
        if points:
            series[column] = (points, colour)
    if not series:
        return '<p class="missing">metrics.csv has no accuracy columns</p>'
    width, height, pad = 360, 200, 36
    epochs = [x for points, _ in series.values() for x, _ in points]
    low, high = min(epochs), max(epochs)
    span = (high - low) or 1

    def xy(x, y):
        return f"{pad + (x - low) / span * (width - 2 * pad):.1f},{height - pad - y * (height - 2 * pad):.1f}"

    lines = [f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">100%</text>',
             f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">0%</text>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">epoch {low:g}–{high:g}</text>']
    for index, (column, (points, colour)) in enumerate(series.items()):
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(xy(x, y) for x, y in points)}"/>')
        lines.append(f'<text x="{width - pad}" y="{pad + 14 * index}" fill="{colour}" text-anchor="end">'
                     f'{column.replace("_", " ")} {points[-1][1]:.1%}</text>')
    return (f'<svg class="curves" role="img" aria-label="training curves" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="11">{"".join(lines)}</svg>')


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
