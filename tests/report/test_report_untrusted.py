"""`cifarx report` on untrusted files: script in any value read, colliding and awkward file names, eval results that
name another file, a run folder of another checkpoint, a model the browser cannot run, malformed eval JSON, and a
build that fails partway."""

import errno
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

from cifarx.io import file_sha256
from tests.conftest import assert_one_line_error, make_image_folder, run

CLASSES = ["red", "green", "blue"]
PAYLOADS = ["<img src=x onerror=window.__pwned=1>", "</script><script>window.__pwned=1</script>", "<!--<script>"]
IMG, SCRIPT, COMMENT = PAYLOADS


def tiny_model(path: Path, *, seed: int = 0, input_type: str = "float", metadata: dict | None = None) -> Path:
    """An ONNX file the report takes as a cifarx export: each channel's mean times a per-file weight, as 3 logits."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    elem = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE, "uint8": onnx.TensorProto.UINT8}[input_type]
    scale = np.random.default_rng(seed).uniform(0.5, 2.0, size=(1, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["input"], ["pixels"], to=onnx.TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
             helper.make_node("Mul", ["pooled", "scale"], ["scaled"]),
             helper.make_node("Flatten", ["scaled"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", elem, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(scale, "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    entries = {"cifarx_format": "1", "class_names": json.dumps(CLASSES), "model_name": "tiny-test", **(metadata or {})}
    helper.set_model_props(model, entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def eval_result(measured: Path, **changes) -> dict:
    """A `cifarx eval --json` result of the file `measured` (recording its sha256), with `changes` applied."""
    result = {
        "model": str(measured), "model_sha256": file_sha256(measured), "provider": "CPUExecutionProvider",
        "runtime": "onnxruntime", "threads": 1, "split": "test", "images": 6, "accuracy": 0.5,
        "class_names": CLASSES, "per_class": {name: 0.5 for name in CLASSES},
        "confusion_matrix": [[1, 1, 0], [0, 1, 1], [1, 0, 1]],
        "latency": {str(b): {"p50_ms": 0.1 * b, "p90_ms": 0.2 * b, "p99_ms": 0.3 * b, "images_per_s": 1000.0 * b} for b in (1, 64)},
        "environment": {"cpu": "test cpu"},
    }
    result.update(changes)
    return result


def page_of(site: Path) -> tuple[str, dict, list[tuple[str, str, str]]]:
    """index.html, its inline page data, and (section id, model name, source file) of each model section."""
    page = (site / "index.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.DOTALL).group(1))
    sections = re.findall(r'<section class="model" id="([^"]*)"><h2>([^<]*)</h2><dl><dt>file</dt><dd>([^<]*)</dd>', page)
    return page, data, sections


def section(page: str, section_id: str) -> str:
    return next(part for part in page.split('<section class="model"') if part.startswith(f' id="{section_id}">'))


@pytest.mark.slow
def test_script_in_every_value_read_stays_text_and_the_demo_still_runs(tmp_path, browser):
    """File names, ONNX metadata, a model card, an eval JSON and a run folder name carrying script: the page runs
    none of it (in Chromium), and the demo classifies every sample with every model it can run (a float64 file is
    left out by the report, a file the browser fails to load is noted and skipped)."""
    from cifarx.report.browser import open_report

    models, run_dir = tmp_path / "models", tmp_path / f"{IMG} run"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes(b"the exported checkpoint")
    (run_dir / "metrics.csv").write_text("epoch,train_accuracy,val_accuracy\n1,0.5,0.4\n2,0.7,0.6\n")
    hostile = tiny_model(models / f"{IMG}.onnx", metadata={
        "class_names": json.dumps(PAYLOADS), "model_name": SCRIPT, "tta": IMG, "img_size": IMG, "opset": SCRIPT,
        "training": json.dumps({"preset": COMMENT}), "checkpoint_sha256": file_sha256(run_dir / "best.pt")})
    tiny_model(models / f"{COMMENT}.onnx", seed=1)
    tiny_model(models / "m #1?%.onnx", seed=2)
    tiny_model(models / "float64.onnx", seed=3, input_type="double")
    tiny_model(models / "broken.onnx", seed=4)
    card = {"sha256": file_sha256(hostile), "method": SCRIPT, "labelled": IMG, "command": f"cifarx train --out '{SCRIPT}'",
            "export_command": SCRIPT, "train_images": IMG, "epochs": SCRIPT, "train_seconds": COMMENT,
            "parity": {"images": IMG, "top1_agreement": 1.0, "max_abs_logit_delta": 0.0},
            "val_accuracy": {"mean": 0.5, "n": 2, "measure": SCRIPT, "runs": [{"run": str(run_dir)}]}}
    (models / f"{IMG}.json").write_text(json.dumps(card))
    eval_json = tmp_path / f"{COMMENT} eval.json"
    eval_json.write_text(json.dumps(eval_result(
        hostile, model=SCRIPT, runtime=SCRIPT, provider=IMG, split=COMMENT, class_names=PAYLOADS,
        per_class={name: 0.5 for name in PAYLOADS}, environment={"cpu": SCRIPT})))
    samples = tmp_path / "samples"
    make_image_folder(samples, "", classes=[IMG, COMMENT], per_class=1)
    shutil.copy(samples / IMG / "0000.png", samples / "line\u2028separator.png")

    site = tmp_path / "site"
    result = run("report", models, "-o", site, "--samples", samples, "--evals", eval_json)
    assert result.exit_code == 0, result.output
    page, data, _ = page_of(site)
    for raw in [*PAYLOADS, "\u2028"]:
        assert raw not in page, raw  # escaped in HTML text, attributes and the inline JSON alike
    assert 'class="curves"' in page and 'class="confusion"' in page  # the hostile values were shown, as text
    assert "invalid images" in page  # a text where the card's parity image count should be a number
    (site / "models" / "broken.onnx").write_bytes(b"\x08\x07 damaged after the build")  # the browser cannot load it

    seen = open_report(site, timeout_s=120, probe="""({
        pwned: typeof window.__pwned,
        injected: document.querySelectorAll("img, script:not([src]):not([type])").length,
        notRunnable: Array.from(document.querySelectorAll("#demo-notes li"), (li) => li.dataset.model)})""")
    assert seen["probe"] == {"pwned": "undefined", "injected": 0, "notRunnable": ["float64", "broken"]}
    names = sorted([IMG, COMMENT, "m #1?%"])
    assert sorted(m["name"] for m in data["models"]) == sorted([*names, "broken"])
    images = [f"{IMG}/0000.png", f"{COMMENT}/0000.png", "line\u2028separator.png"]
    assert sorted((r["model"], r["image"]) for r in seen["results"]) == sorted((n, i) for n in names for i in images)
    hostile_predictions = {r["predicted"] for r in seen["results"] if r["model"] == IMG}
    assert hostile_predictions <= set(PAYLOADS)  # its class names came through as text


def test_colliding_file_names_get_their_own_sections_copies_and_demo_urls(tmp_path, ort_web):
    """m.onnx from two folders, an m-2.onnx and an M.onnx: four names, four sections, four copies, each the right file."""
    sources = [tiny_model(tmp_path / "a" / "m.onnx"), tiny_model(tmp_path / "b" / "m.onnx", seed=1),
               tiny_model(tmp_path / "c" / "m-2.onnx", seed=2), tiny_model(tmp_path / "d" / "M.onnx", seed=3)]
    site = tmp_path / "site"
    result = run("report", *sources, "-o", site, "--ort-web", ort_web)
    assert result.exit_code == 0, result.output
    _, data, sections = page_of(site)
    ids, names, files = zip(*sections)
    assert len(set(ids)) == 4 and len({name.casefold() for name in names}) == 4
    assert sorted(files) == sorted(map(str, sources))
    assert len(list((site / "models").iterdir())) == 4
    source_of = dict(zip(names, files))
    for entry in data["models"]:  # the demo fetches the copy of the very file its name's section describes
        copy = site / urllib.parse.unquote(entry["url"])
        assert copy.read_bytes() == Path(source_of[entry["name"]]).read_bytes(), entry


def test_names_with_hash_question_mark_percent_and_spaces_resolve_to_their_files(tmp_path, ort_web):
    names = ["a #1", "b?", "50% c", "d e"]
    for seed, name in enumerate(names):
        tiny_model(tmp_path / "models" / f"{name}.onnx", seed=seed)
    site = tmp_path / "site"
    assert run("report", tmp_path / "models", "-o", site, "--ort-web", ort_web).exit_code == 0
    page, data, sections = page_of(site)
    assert sorted(m["name"] for m in data["models"]) == sorted(names)
    for entry in data["models"]:
        parts = urllib.parse.urlsplit(entry["url"])  # as the browser reads the URL: no query, no fragment
        assert not parts.query and not parts.fragment and " " not in entry["url"], entry
        copy = site / urllib.parse.unquote(parts.path)
        assert copy.read_bytes() == (tmp_path / "models" / f"{entry['name']}.onnx").read_bytes()
    for section_id, _, _ in sections:
        assert re.fullmatch(r"model-[A-Za-z0-9_-]+", section_id) and f'href="#{section_id}"' in page


def test_eval_results_attach_by_sha256_not_by_file_name(tmp_path, ort_web):
    """Two files named m.onnx: the eval result goes to the one whose content it measured; a result that measured
    none of the files is one warning line, and the page says so."""
    first, second = tiny_model(tmp_path / "a" / "m.onnx"), tiny_model(tmp_path / "b" / "m.onnx", seed=1)
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(eval_result(second, model="elsewhere/m.onnx", accuracy=0.25)))
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps(eval_result(first, model=str(first), model_sha256="0" * 64)))
    site = tmp_path / "site"
    result = run("report", first, second, "-o", site, "--evals", measured, "--evals", stranger, "--ort-web", ort_web)
    assert result.exit_code == 0, result.output
    page, _, sections = page_of(site)
    section_of = {file: section(page, section_id) for section_id, _, file in sections}
    assert "Accuracy 25.00%" in section_of[str(second)] and 'class="confusion"' in section_of[str(second)]
    assert 'class="confusion"' not in section_of[str(first)] and "Accuracy" not in section_of[str(first)]
    warning = [line for line in result.stderr.splitlines() if "stranger.json" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "ignored" in warning[0]
    assert "stranger.json: ignored" in page


def test_evals_take_several_files_a_folder_or_a_quoted_pattern(tmp_path, ort_web):
    """The README's `--evals 'eval-*.json'` (quoted: cifarx expands it), a folder, or --evals repeated; unquoted, the
    shell turns the second match into a model argument, which is refused in one line."""
    first, second = tiny_model(tmp_path / "models" / "one.onnx"), tiny_model(tmp_path / "models" / "two.onnx", seed=1)
    evals = tmp_path / "evals"
    evals.mkdir()
    for model in (first, second):
        (evals / f"eval-{model.stem}.json").write_text(json.dumps(eval_result(model)))
    for given in (["--evals", evals / "eval-*.json"], ["--evals", evals],
                  ["--evals", evals / "eval-one.json", "--evals", evals / "eval-two.json"]):
        site = tmp_path / "site"
        result = run("report", tmp_path / "models", "-o", site, *given, "--ort-web", ort_web)
        assert result.exit_code == 0, result.output
        assert (site / "index.html").read_text().count('class="confusion"') == 2, given
    assert_one_line_error(run("report", tmp_path / "models", "-o", tmp_path / "other", "--evals", evals / "eval-one.json",
                              evals / "eval-two.json", "--ort-web", ort_web), "eval-two.json is a .json file, not a model")
    assert not (tmp_path / "other").exists()


def test_curves_only_from_a_run_folder_holding_the_exported_checkpoint(exports, trained_run, tmp_path, ort_web):
    """The card names two run folders: the one whose checkpoint the file was exported from shows its curves, the
    other (another checkpoint) gets a note instead."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny.onnx", "tiny.json"):
        shutil.copy(exports / name, models / name)
    same, other = tmp_path / "same-run", tmp_path / "other-run"
    shutil.copytree(trained_run["run"], same)
    shutil.copytree(trained_run["run"], other)
    for checkpoint in other.glob("*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes() + b"retrained")
    card = json.loads((models / "tiny.json").read_text())
    card["val_accuracy"]["runs"] = [{"run": str(same)}, {"run": str(other)}]
    (models / "tiny.json").write_text(json.dumps(card))
    site = tmp_path / "site"
    assert run("report", models, "-o", site, "--ort-web", ort_web).exit_code == 0
    tiny = section((site / "index.html").read_text(), "model-tiny")
    assert tiny.count('class="curves"') == 1 and f"<small>{same}</small>" in tiny
    assert f"training curves of {other} not shown" in tiny


@pytest.mark.parametrize("input_type", ["double", "uint8"])
def test_a_model_whose_input_is_not_float32_is_marked_not_runnable_in_the_browser(tmp_path, ort_web, input_type):
    tiny_model(tmp_path / "models" / "ok.onnx")
    tiny_model(tmp_path / "models" / "odd.onnx", seed=1, input_type=input_type)
    site = tmp_path / "site"
    result = run("report", tmp_path / "models", "-o", site, "--ort-web", ort_web)
    assert result.exit_code == 0, result.output
    page, data, _ = page_of(site)
    assert [m["name"] for m in data["models"]] == ["ok"]  # the demo gets the runnable one only
    dtype = {"double": "float64", "uint8": "uint8"}[input_type]
    assert f"not runnable in the browser: {dtype} input" in section(page, "model-odd")
    assert f'<li data-model="odd">odd: not runnable in the browser ({dtype} input' in page
    assert sorted(p.name for p in (site / "models").iterdir()) == ["ok.onnx"]


MALFORMED = {
    "confusion matrix of another class count": ({"confusion_matrix": [[1, 0], [0, 1]]}, "'confusion_matrix' must be 3 x 3"),
    "batch size that is not a number": ({"latency": {"one": {"p50_ms": 1, "p90_ms": 1, "p99_ms": 1, "images_per_s": 1}}},
                                        "'latency' must be"),
    "latency figure that is text": ({"latency": {"1": {"p50_ms": "fast", "p90_ms": 1, "p99_ms": 1, "images_per_s": 1}}},
                                    "'latency' must be"),
    "image count that is markup": ({"images": IMG}, "'images' must be a whole number"),
    "per-class accuracy as a list": ({"per_class": [0.5, 0.5, 0.5]}, "'per_class' must be"),
    "accuracy that is NaN": ({"accuracy": float("nan")}, "'accuracy' must be a number in [0, 1]"),
    "class names that are not text": ({"class_names": [1, 2, 3]}, "'class_names' must be a list of names"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_eval_json_is_refused_in_one_line_and_nothing_is_written(tmp_path, ort_web, case):
    model = tiny_model(tmp_path / "models" / "m.onnx")
    changes, words = MALFORMED[case]
    (tmp_path / "eval.json").write_text(json.dumps(eval_result(model, **changes)))
    result = run("report", tmp_path / "models", "-o", tmp_path / "site", "--evals", tmp_path / "eval.json",
                 "--ort-web", ort_web)
    assert_one_line_error(result, "eval.json", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "models", "ort-web"]


def test_a_build_that_fails_partway_leaves_the_old_site_or_none_and_its_retry_succeeds(tmp_path, ort_web, monkeypatch):
    import cifarx.report.site as site_module

    tiny_model(tmp_path / "models" / "m.onnx")
    copy = site_module._copy

    def disk_full_at_the_models(source, target):
        if target.parent.name == "models":
            raise OSError(errno.ENOSPC, "No space left on device")
        copy(source, target)

    old, new = tmp_path / "old", tmp_path / "new"
    assert run("report", tmp_path / "models", "-o", old, "--ort-web", ort_web).exit_code == 0
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    monkeypatch.setattr(site_module, "_copy", disk_full_at_the_models)
    for site in (old, new):
        assert_one_line_error(run("report", tmp_path / "models", "-o", site, "--ort-web", ort_web), "No space left on device")
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # the old site, whole
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "old", "ort-web"]  # no half-built folder beside
    monkeypatch.undo()
    assert run("report", tmp_path / "models", "-o", new, "--ort-web", ort_web).exit_code == 0  # the retry is not refused
    assert (new / "index.html").is_file() and (new / "models" / "m.onnx").is_file()
