"""A static site comparing exported models: a sortable table, a section per model, and a live demo that runs the
.onnx files in the browser with onnxruntime-web (WebAssembly).

Everything the page needs is copied into the site (no CDN): the models, the onnxruntime-web files (from the pinned
npm install in `cifarx/report/web`, or `--ort-web DIR`), and the sample images as the model sees them (decoded and resized
by `predict.load_images`, stored as lossless PNG, so the browser feeds the same pixels as ONNX Runtime Python).

Every value read from a file (ONNX metadata, model cards, eval JSON, file names) is untrusted: eval JSONs are checked
field by field before anything is written, and the page is made by `tag`, which escapes every value it is given.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import html
import json
import math
import os
import re
import shlex
import shutil
import string
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError
from cifarx.io import current_umask, file_sha256
from cifarx.runtimes.onnxfile import check_model_file, create_session, model_info

WEB = Path(__file__).parent / "web"
DEFAULT_ORT_WEB = WEB / "node_modules" / "onnxruntime-web" / "dist"
# The WebAssembly-only build: the script defining `ort`, the glue module it imports, and the runtime itself.
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ASSETS = ("report.js", "report.css")
GENERATOR = '<meta name="generator" content="cifarx report">'  # in index.html: marks a folder a rebuild may overwrite
CHECKPOINTS = ("best.pt", "last.pt")  # where a run folder keeps the checkpoints an export is made from


def build_report(inputs: list[str | Path], site: str | Path, *, evals: list[str | Path] = (),
                 samples: str | Path | None = None, samples_per_class: int | None = None,
                 ort_web: str | Path | None = None) -> dict:
    """Write SITE/index.html and its assets; every input is checked (and every sample decoded) before a file is written.

    The site is built in a hidden sibling folder and moved into place when complete: a failure leaves the old site
    or none. Eval results attach to the model whose sha256 they record; the others are named in a warning."""
    site = Path(site)
    model_files = find_model_files(inputs)
    ort_dir = check_ort_web(ort_web)
    sample_files = find_samples(samples, samples_per_class) if samples is not None else []
    eval_results = [(path, result) for path in find_eval_files(evals) for result in load_evals(path)]
    check_site(site)
    from cifarx.runtimes.predict import load_images

    pixels = load_images([path for _, path in sample_files]) if sample_files else np.empty((0, 3, 32, 32))
    models = [describe_model(path) for path in model_files]
    _name_uniquely(models)
    notes = _attach_evals(models, eval_results)
    for note in notes:
        warnings.warn(note)
    runnable = [m for m in models if "error" not in m and not m["not_runnable"]]
    sample_entries = [{"image": _text(label), "url": f"samples/{index:04d}.png"} for index, (label, _) in enumerate(sample_files)]
    page_data = {"models": [{"name": m["name"], "url": m["url"]} for m in runnable], "samples": sample_entries}
    page = render_page(models, page_data, notes)  # rendered before the first write: a rendering bug leaves nothing

    with _new_folder(site) as folder:  # plain writes: the whole folder is moved into place once complete
        for name in ORT_WEB_FILES:
            _copy(ort_dir / name, folder / "ort" / name)
        for name in ASSETS:
            _copy(WEB / name, folder / name)
        for model in runnable:
            _copy(model["path"], folder / "models" / f"{model['name']}.onnx")
        for entry, image in zip(sample_entries, pixels):
            _write_png(image, folder / entry["url"])
        (folder / "index.html").write_text(page, encoding="utf-8")
    exports = sum("error" not in m for m in models)
    return {"site": str(site), "index": str(site / "index.html"), "models": len(models), "exports": exports,
            "samples": len(sample_entries), "notes": notes}


# ---------------------------------------------------------------------------------------------- inputs


def find_model_files(inputs: list[str | Path]) -> list[Path]:
    """The .onnx files of each folder (sorted) and each file given as it is; a folder without one is an error."""
    if not inputs:
        raise CifarxError("give at least one .onnx file or folder of them")
    files = []
    for item in map(Path, inputs):
        if item.suffix == ".json":  # `--evals eval-*.json` unquoted: the shell made the second match a model argument
            raise CifarxError(f"{item} is a .json file, not a model: give each eval JSON its own --evals, or a folder "
                              "of them, or a quoted pattern (--evals 'eval-*.json')")
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


def find_eval_files(evals: list[str | Path]) -> list[Path]:
    """Each --evals value: a JSON file, a folder of them, or a quoted pattern such as 'eval-*.json'."""
    files = []
    for item in map(str, evals):
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
            if not found:
                raise CifarxError(f"no .json files in --evals folder {path}")
        elif path.is_file():
            found = [path]
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not found:
                raise CifarxError(f"no file matches --evals {item}")
        else:
            raise CifarxError(f"eval JSON not found: {path}")
        files += found
    return list(dict.fromkeys(files))


def load_evals(path: str | Path) -> list[dict]:
    """`cifarx eval --json` results (one per file, or a list of them), each checked field by field."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise CifarxError(f"eval JSON not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CifarxError(f"cannot read eval JSON {path}: {type(error).__name__}") from None
    results = loaded if isinstance(loaded, list) else [loaded]
    for result in results:
        check_eval(result, path)
    return results


def _is_text(value) -> bool:
    return isinstance(value, str)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_fraction(value) -> bool:
    return _finite(value) and 0 <= value <= 1


def _is_latency(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        re.fullmatch(r"[1-9][0-9]{0,6}", batch) and isinstance(stats, dict)
        and all(_finite(stats.get(key)) for key in ("p50_ms", "p90_ms", "p99_ms", "images_per_s"))
        for batch, stats in value.items())


LATENCY = (_is_latency, "{batch size: {p50_ms, p90_ms, p99_ms, images_per_s}} of finite numbers")
# What the report reads of an eval result, the check each value passes, and how a refusal names it.
EVAL_FIELDS = {
    "model": (_is_text, "a path"),
    "model_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a hex sha256"),
    "latency": LATENCY,
    "torch_latency": LATENCY,
    "runtime": (_is_text, "text"),
    "provider": (_is_text, "text"),
    "split": (_is_text, "text"),
    "threads": (lambda v: v is None or _is_count(v), "a whole number"),
    "images": (_is_count, "a whole number"),
    "accuracy": (_is_fraction, "a number in [0, 1]"),
    "class_names": (lambda v: isinstance(v, list) and all(map(_is_text, v)), "a list of names"),
    "per_class": (lambda v: isinstance(v, dict) and all(map(_is_fraction, v.values())), "{class: number in [0, 1]}"),
    "confusion_matrix": (lambda v: isinstance(v, list) and all(isinstance(r, list) and all(map(_is_count, r)) for r in v),
                         "a list of rows of counts"),
    "parity": (lambda v: isinstance(v, dict) and _is_count(v.get("images")) and _is_fraction(v.get("top1_agreement"))
               and _finite(v.get("max_abs_logit_delta")), "{images, top1_agreement, max_abs_logit_delta}"),
    "environment": (lambda v: isinstance(v, dict) and _is_text(v.get("cpu", "")), "an object whose cpu is text"),
}


def check_eval(result, path: Path) -> None:
    """Refuse, in one line, an eval result the report could not show as it is (types, batch sizes, class count)."""
    if not (isinstance(result, dict) and "model" in result and "latency" in result):
        raise CifarxError(f"{path} is not a `cifarx eval --json` result (needs 'model' and 'latency')")
    for key, (valid, what) in EVAL_FIELDS.items():
        if key in result and not valid(result[key]):
            raise CifarxError(f"{path}: '{key}' must be {what}")
    if "confusion_matrix" in result:
        classes = len(result.get("class_names") or [])
        if not classes or len(result["confusion_matrix"]) != classes or any(len(r) != classes for r in result["confusion_matrix"]):
            raise CifarxError(f"{path}: 'confusion_matrix' must be {classes} x {classes}, one row and column per class name")


def check_site(site: Path) -> None:
    """SITE is absent, empty, or an earlier report (never someone's other folder), and can be written."""
    from cifarx.io import check_writable

    if site.exists() and not site.is_dir():
        raise CifarxError(f"-o {site} is a file; give a folder for the site")
    if site.is_dir() and any(site.iterdir()) and not _is_report(site / "index.html"):
        raise CifarxError(f"-o {site} is a folder with other files in it (not an earlier report); give a new or empty folder")
    check_writable(site / "index.html")
    check_writable(site.absolute().with_name(f".{site.name}.tmp"))  # the site is built beside it, then moved in


def _is_report(index: Path) -> bool:
    try:
        return GENERATOR in index.read_text(errors="replace")[:1000]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- models


def describe_model(path: Path) -> dict:
    """What the table shows of one file; a file that is not a cifarx export gets an `error` instead, never a crash."""
    row = {"path": path, "file": _text(path), "name": _text(path.stem), "bytes": path.stat().st_size,
           "sha256": file_sha256(path), "evals": []}
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
    card = _card_for(path, row["sha256"])
    input_type = info["input_dtype"]
    row.update(model=meta.get("model_name", "?"), class_names=info["class_names"], metadata=meta, card=card,
               params=_parameter_count(path), input_type=input_type, not_runnable=_not_runnable(input_type))
    row["what"] = _what_it_is(meta, card)
    row["accuracy"] = _validation_accuracy(meta, card)
    row["runs"], row["run_notes"] = _run_folders(card, meta.get("checkpoint_sha256"))
    return row


def _not_runnable(input_type: str) -> str | None:
    """Why the browser demo cannot run a file (one line), or None: one such file must not stop the others."""
    if input_type == "float16":  # onnxruntime-web's WebAssembly build has no float16 path for these graphs
        return "float16 input: export without --fp16 for the web"
    if input_type != "float32":
        return f"{input_type} input: the demo feeds float32 pixels"
    return None


def _card_for(path: Path, sha256: str) -> dict | None:
    """The model card JSON beside the file, when it describes this very file (same sha256)."""
    try:
        card = json.loads(path.with_suffix(".json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("sha256") == sha256 else None


def _parameter_count(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    return int(sum(math.prod(tensor.dims) for tensor in proto.graph.initializer))


def _what_it_is(meta: dict, card: dict | None) -> str:
    parts = [meta.get("model_name", "?")]
    preset = _field(_json(meta.get("training")), "preset", str)
    if preset:
        parts.append(f"preset {preset}")
    method = _field(card, "method", str)
    if method:
        labelled = card.get("labelled")  # an ensemble's card lists each member's
        counts = [_number(n, ",d") for n in labelled] if isinstance(labelled, list) else [_number(labelled, ",d")]
        parts.append(f"{method}, {'/'.join(counts)} labels")
    if meta.get("img_size"):
        parts.append(f"resized to {_number(_json(meta['img_size']), 'd')} in the graph")
    if meta.get("tta", "none") != "none":
        parts.append(f"{meta['tta']} TTA in the graph")
    return ", ".join(parts)


def _validation_accuracy(meta: dict, card: dict | None) -> dict | None:
    """The model's validation accuracy and where it comes from: the card (several seeds), else the ONNX metadata."""
    figures = _field(card, "val_accuracy", dict)
    if _is_fraction(_field(figures, "mean", float, int)):
        count = _field(figures, "n", int)
        runs = f", mean of {count} runs" if count and count > 1 else ""
        measure = (_field(figures, "measure", str) or "?").replace("_", " ")
        return {"value": figures["mean"], "source": f"model card ({measure}{runs})"}
    value = _json(meta.get("val_accuracy"))
    if _is_fraction(value):
        return {"value": value, "source": "ONNX metadata (best validation epoch)"}
    return None


def _run_folders(card: dict | None, checkpoint_sha256: str | None) -> tuple[list[Path], list[str]]:
    """Run folders the card names (its validation runs, then the training command's --out) that exist here and hold
    the checkpoint this file was exported from (its sha256 is in the file's metadata); a note for each other one."""
    names = [_field(run, "run", str) for run in _field(_field(card, "val_accuracy", dict), "runs", list) or []]
    try:
        words = shlex.split(_field(card, "command", str) or "")
    except ValueError:
        words = []
    names += [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
    runs, notes = [], []
    for run in (Path(n) for n in dict.fromkeys(names) if n):
        if not (run / "metrics.csv").is_file():
            continue
        if not checkpoint_sha256:
            notes.append(f"training curves of {_text(run)} not shown: the file records no checkpoint sha256 to match")
        elif any((run / name).is_file() and file_sha256(run / name) == checkpoint_sha256 for name in CHECKPOINTS):
            runs.append(run)
        else:
            notes.append(f"training curves of {_text(run)} not shown: its checkpoint is not the one this file was exported from")
    return runs, notes


def _name_uniquely(models: list[dict]) -> None:
    """Give each model a name unique in the site (file stem; a repeated stem gets -2, -3... never another file's
    stem, and never one that differs only in case), a safe section id, and the URL of its copy in the site."""
    names = _unique([m["name"] for m in models])
    ids = _unique([re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model" for name in names])
    for model, name, section in zip(models, names, ids):
        model.update(name=name, id=f"model-{section}", url="models/" + urllib.parse.quote(f"{name}.onnx", safe=""))


def _unique(names: list[str]) -> list[str]:
    reserved = {name.casefold() for name in names}
    taken, unique = set(), []
    for name in names:
        candidate, count = name, 1
        while candidate.casefold() in taken or (candidate != name and candidate.casefold() in reserved):
            count += 1
            candidate = f"{name}-{count}"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _attach_evals(models: list[dict], results: list[tuple[Path, dict]]) -> list[str]:
    """Each eval result goes to the models with the sha256 it records; one line for each that matches none."""
    by_sha = {}
    for model in models:
        if "error" not in model:
            by_sha.setdefault(model["sha256"], []).append(model)
    notes = []
    for path, result in results:
        sha256 = result.get("model_sha256") or _recorded_file_sha256(result["model"])
        for model in by_sha.get(sha256, []):
            model["evals"].append(result)
        if sha256 not in by_sha:
            notes.append(f"{_text(path)}: ignored, it measured none of the report's files (matched by sha256)")
    return notes


def _recorded_file_sha256(model: str) -> str | None:
    """For eval results that record no model_sha256: the content of the file at the path they name, if still there."""
    path = Path(model)
    return file_sha256(path) if path.is_file() else None


def _field(source, key: str, *kinds):
    """source[key] when source is a dict and the value is of one of `kinds` (a bool is not a number), else None."""
    value = source.get(key) if isinstance(source, dict) else None
    if isinstance(value, bool) and bool not in kinds:
        return None
    return value if isinstance(value, kinds) else None


def _json(text):
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value, spec: str, missing: str = "?") -> str:
    """A number from a file, formatted; a value that is not one is shown as 'invalid', never passed through."""
    if value is None:
        return missing
    if not _finite(value) or (spec.endswith("d") and not isinstance(value, int)):
        return "invalid"
    return format(value, spec)


def _text(value) -> str:
    """A path or name as text that can be written as UTF-8 (undecodable bytes in a file name become U+FFFD)."""
    return os.fsencode(str(value)).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _new_folder(site: Path) -> Iterator[Path]:
    """A hidden sibling of SITE to build in; when the block ends it replaces SITE, and on any failure it is removed,
    so a failed build leaves the old site or none (never half of one that a retry would refuse)."""
    site = site.absolute()
    try:
        site.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{site.name}.", suffix=".tmp", dir=site.parent))
    except OSError as error:
        raise CifarxError(f"cannot write to {site.parent}: {error.strerror or error}") from None
    try:
        yield building
        os.chmod(building, 0o777 & ~current_umask())  # mkdtemp makes it 0700: a web server must read it
        if site.exists():  # an earlier report (check_site): set aside, replaced, then deleted
            old = Path(tempfile.mkdtemp(prefix=f".{site.name}.old.", dir=site.parent))
            os.replace(site, old)
            try:
                os.replace(building, site)
            except OSError:
                os.replace(old, site)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(building, site)
    except OSError as error:
        raise CifarxError(f"could not write the site {site}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _write_png(image: np.ndarray, target: Path) -> None:
    """A float [3,H,W] image in [0,1] from `load_images` back to the exact uint8 PNG pixels it was decoded from."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(target, format="PNG")


class Html(str):
    """Markup made by `tag` (or `join`): inserted as it is, where every other value is escaped."""


def escape(value) -> Html:
    """Text (or anything, as its str) escaped for HTML text and quoted attributes; Html is already markup."""
    return value if isinstance(value, Html) else Html(html.escape(_text(value), quote=True))


def join(*parts) -> Html:
    return Html("".join(escape(part) for part in parts if part is not None))


def tag(name: str, *children, **attributes) -> Html:
    """<name attributes>children</name>: the one way the page is made. Attribute names are ours (class_ -> class,
    data_sort -> data-sort); every attribute value and every child that is not Html is escaped."""
    attrs = "".join(f' {key.rstrip("_").replace("_", "-")}="{escape(value)}"'
                    for key, value in attributes.items() if value is not None)
    return Html(f"<{name}{attrs}>{join(*children)}</{name}>")


def script_json(data) -> Html:
    """JSON to put inside <script>: no value can end the element or open a comment (<, >, & escaped) or end a
    JavaScript line (U+2028, U+2029)."""
    text = json.dumps(data)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return Html(text)


def render_page(models: list[dict], page_data: dict, notes: list[str] = ()) -> str:
    """index.html: the overview table, the demo, and a section per model."""
    template = string.Template((WEB / "index.html").read_text())
    skipped = [tag("li", f"{m['name']}: not runnable in the browser ({m['not_runnable']})", data_model=m["name"])
               for m in models if m.get("not_runnable")]
    return template.substitute(
        table=_overview_table(models), notes=tag("ul", *[tag("li", note) for note in notes], class_="notes"),
        demo_notes=tag("ul", *skipped, id="demo-notes", class_="notes"),
        sections=join(*[_model_section(m) for m in models if "error" not in m]),
        data=script_json(page_data), count=len(models),
    )


def _runtimes(models: list[dict]) -> list[str]:
    return list(dict.fromkeys(label for m in models for r in m["evals"] for label, _ in _latencies(r)))


def _latencies(result: dict) -> list[tuple[str, dict]]:
    """(runtime label, {batch: stats}) of one eval result: ONNX Runtime on its provider (or the `--runtime` it ran
    on), and PyTorch eager if timed."""
    from cifarx.runtimes.table import REFERENCE

    runtime = result.get("runtime", REFERENCE)
    provider = result.get("provider", "?").removesuffix("ExecutionProvider").lower()
    threads = f", {result['threads']} threads" if result.get("threads") else ""
    pairs = [(f"{runtime} {provider}{threads}" if runtime == REFERENCE else f"{runtime}{threads}", result["latency"])]
    if "torch_latency" in result:
        pairs.append((f"torch eager{threads}", result["torch_latency"]))
    return pairs


def _cell(*children, sort=None, cls: str | None = None) -> Html:
    return tag("td", *children, data_sort=sort, class_=cls)


def _overview_table(models: list[dict]) -> Html:
    runtimes = _runtimes(models)
    head = ["model", "what it is", "validation accuracy", "size", "parameters"]
    for runtime in runtimes:  # eval measures the batch sizes it is asked for: show the smallest and the largest
        head += [f"{runtime}: p50 ms, smallest batch", f"{runtime}: images/s, largest batch"]
    head += ["parity with PyTorch", "made by"]
    rows = []
    for m in models:
        if "error" in m:
            cells = [_cell(m["name"], sort=m["name"]), tag("td", m["error"], colspan=len(head) - 1, class_="not-export")]
            rows.append(tag("tr", *cells, class_="not-export-row", data_row_model=m["name"]))
            continue
        accuracy = m["accuracy"]
        cells = [
            _cell(tag("a", m["name"], href=f"#{m['id']}"), sort=m["name"]),
            _cell(m["what"]),
            _cell(f'{accuracy["value"]:.2%} ', tag("small", accuracy["source"]), sort=accuracy["value"])
            if accuracy else _cell("not measured", sort=-1),
            _cell(f'{m["bytes"] / 1e6:.2f} MB', sort=m["bytes"], cls="num"),
            _cell(f'{m["params"]:,}' if m["params"] is not None else "?", sort=m["params"] or -1, cls="num"),
        ]
        for runtime in runtimes:
            by_batch = next((lat for r in m["evals"] for label, lat in _latencies(r) if label == runtime), None)
            if by_batch is None:
                cells += [_cell("—", sort=""), _cell("—", sort="")]
                continue
            smallest, largest = min(by_batch, key=int), max(by_batch, key=int)
            p50, throughput = by_batch[smallest]["p50_ms"], by_batch[largest]["images_per_s"]
            cells.append(_cell(f"{p50:.3f} ", tag("small", f"batch {smallest}"), sort=p50, cls="num"))
            cells.append(_cell(f"{throughput:,.0f} ", tag("small", f"batch {largest}"), sort=throughput, cls="num"))
        cells.append(_parity_cell(m))
        command = _field(m["card"], "command", str)
        cells.append(_cell(tag("code", command) if command else "—"))
        rows.append(tag("tr", *cells, data_row_model=m["name"]))
    header = [tag("th", h, data_column=i, tabindex=0) for i, h in enumerate(head)]
    return tag("table", tag("thead", tag("tr", *header)), tag("tbody", *rows), id="models", class_="sortable")


def _parity_cell(m: dict) -> Html:
    """Parity with PyTorch from the card, else from an eval result (checked when loaded)."""
    parity = _field(m["card"], "parity", dict) or next((r["parity"] for r in m["evals"] if "parity" in r), None)
    if not (parity and _is_fraction(parity.get("top1_agreement")) and _finite(parity.get("max_abs_logit_delta"))):
        return _cell("—", sort="")
    return _cell(f'{parity["top1_agreement"]:.2%} top-1, max |Δlogit| {parity["max_abs_logit_delta"]:.1e} ',
                 tag("small", f'({_number(parity.get("images"), ",d")} images)'), sort=parity["top1_agreement"])


def _model_section(m: dict) -> Html:
    card = m["card"]
    facts = [("file", m["file"]), ("model", m["what"]), ("classes", ", ".join(m["class_names"])),
             ("input", f'{m["input_type"]} [N,3,32,32] RGB in [0,1]'),
             ("opset", _number(_json(m["metadata"].get("opset")), "d"))]
    if card:
        images, epochs = _number(card.get("train_images"), ",d"), _number(card.get("epochs"), "d")
        facts += [("trained on", f'{images} images, {epochs} epochs, {_number(card.get("train_seconds"), "g")} s'),
                  ("export command", _field(card, "export_command", str) or "—")]
    if m["not_runnable"]:
        facts.append(("browser demo", f"not runnable in the browser: {m['not_runnable']}"))
    parts = [tag("h2", m["name"]), tag("dl", *[join(tag("dt", k), tag("dd", v)) for k, v in facts])]
    scored = [r for r in m["evals"] if "per_class" in r and "confusion_matrix" in r]
    for result in scored[:1]:
        accuracy = f'{result["accuracy"]:.2%} ' if "accuracy" in result else ""
        where = f'({result.get("split", "?")} split, {_number(result.get("images"), ",d")} images)'
        parts.append(tag("h3", f"Accuracy {accuracy}{where}"))
        parts.append(tag("div", per_class_svg(result["per_class"]),
                         confusion_svg(result["confusion_matrix"], result["class_names"]), class_="plots"))
    parts += [_latency_table(result) for result in m["evals"]]
    for run in m["runs"]:
        parts += [tag("h3", "Training curves ", tag("small", run)), curves_svg(run / "metrics.csv")]
    parts += [tag("p", note, class_="missing") for note in m["run_notes"]]
    if not scored and not m["runs"]:
        parts.append(tag("p", "No eval JSON (", tag("code", "cifarx eval --json"),
                         ", passed with --evals) or run folder at hand: no per-class accuracy, confusion matrix or curves.",
                         class_="missing"))
    return tag("section", *parts, class_="model", id=m["id"])


def _latency_table(result: dict) -> Html:
    rows = []
    for label, by_batch in _latencies(result):
        for batch, stats in sorted(by_batch.items(), key=lambda item: int(item[0])):
            values = [_cell(f"{stats[k]:,.3f}", cls="num") for k in ("p50_ms", "p90_ms", "p99_ms", "images_per_s")]
            rows.append(tag("tr", _cell(label), _cell(batch, cls="num"), *values))
    cpu = _field(result.get("environment"), "cpu", str) or "?"
    head = [tag("th", h) for h in ("runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s")]
    return tag("table", tag("caption", f"latency on {cpu}"), tag("thead", tag("tr", *head)), tag("tbody", *rows),
               class_="latency")


# ---------------------------------------------------------------------------------------------- plots (inline SVG)


def _svg(kind: str, label: str, width: float, height: float, font_size: int, *children) -> Html:
    return tag("svg", *children, class_=kind, role="img", aria_label=label, width=width, height=height,
               viewBox=f"0 0 {width} {height}", font_size=font_size)


def per_class_svg(per_class: dict) -> Html:
    """Horizontal bars, one per class, 0 to 100% (values checked to be in [0, 1] when the eval JSON was loaded)."""
    bar, left, width = 18, 90, 260
    rows = []
    for i, (name, value) in enumerate(per_class.items()):
        y = i * bar
        rows += [tag("text", name, x=left - 6, y=y + 13, text_anchor="end"),
                 tag("rect", x=left, y=y + 3, width=f"{width * value:.1f}", height=bar - 6, fill="#4878a8"),
                 tag("text", f"{value:.1%}", x=f"{left + width * value + 4:.1f}", y=y + 13)]
    return _svg("per-class", "per-class accuracy", left + width + 50, bar * len(per_class), 11, *rows)


def confusion_svg(matrix: list[list[int]], class_names: list[str]) -> Html:
    """Counts, rows true class, columns predicted, shaded by the share of the row (a square matrix of counts, one row
    per class name: checked when the eval JSON was loaded)."""
    size, left, top = 30, 90, 80
    count = len(matrix)
    cells = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells.append(tag("text", class_names[i], x=left - 6, y=top + i * size + 19, text_anchor="end"))
        for j, value in enumerate(row):
            share = value / total
            colour = f"rgb({int(255 - 183 * share)},{int(255 - 135 * share)},{int(255 - 87 * share)})"
            cells += [tag("rect", x=left + j * size, y=top + i * size, width=size, height=size, fill=colour),
                      tag("text", value, x=left + j * size + size / 2, y=top + i * size + 19,
                          fill="#fff" if share > 0.5 else "#000", text_anchor="middle")]
    for j, name in enumerate(class_names[:count]):
        cells.append(tag("text", name, transform=f"translate({left + j * size + size / 2 + 4},{top - 6}) rotate(-60)"))
    width, height = left + count * size + 10, top + count * size + 20
    cells.append(tag("text", "predicted →", x=left + count * size / 2, y=height - 4, text_anchor="middle"))
    return _svg("confusion", "confusion matrix", width, height, 10, *cells)


def curves_svg(metrics_csv: Path) -> Html:
    """Train and validation accuracy per epoch from a run's metrics.csv, as a line plot."""
    try:
        with open(metrics_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return tag("p", f"metrics.csv unreadable ({type(error).__name__})", class_="missing")
    series = {}
    for column, colour in (("train_accuracy", "#c0504d"), ("val_accuracy", "#4878a8")):
        points = [(_float(r.get("epoch")), _float(r.get(column))) for r in rows]
        points = [(x, min(max(y, 0.0), 1.0)) for x, y in points if _finite(x) and _finite(y)]
        if points:
            series[column] = (points, colour)
    if not series:
        return tag("p", "metrics.csv has no accuracy columns", class_="missing")
    width, height, pad = 360, 200, 36
    epochs = [x for points, _ in series.values() for x, _ in points]
    low, high = min(epochs), max(epochs)
    span = (high - low) or 1

    def xy(x, y):
        return f"{pad + (x - low) / span * (width - 2 * pad):.1f},{height - pad - y * (height - 2 * pad):.1f}"

    lines = [tag("line", x1=pad, y1=height - pad, x2=width - pad, y2=height - pad, stroke="#888"),
             tag("line", x1=pad, y1=pad, x2=pad, y2=height - pad, stroke="#888"),
             tag("text", "100%", x=pad - 4, y=pad + 4, text_anchor="end"),
             tag("text", "0%", x=pad - 4, y=height - pad, text_anchor="end"),
             tag("text", f"epoch {low:g}–{high:g}", x=width / 2, y=height - 8, text_anchor="middle")]
    for index, (column, (points, colour)) in enumerate(series.items()):
        lines.append(tag("polyline", fill="none", stroke=colour, stroke_width=2, points=" ".join(xy(x, y) for x, y in points)))
        lines.append(tag("text", f'{column.replace("_", " ")} {points[-1][1]:.1%}', x=width - pad, y=pad + 14 * index,
                         fill=colour, text_anchor="end"))
    return _svg("curves", "training curves", width, height, 11, *lines)


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
