"""`cifarx report`: the site's table and sections, bad input as one line, and the live demo in a real Chromium."""

import os
import shutil
from pathlib import Path

import pytest

from cifarx.report.site import ORT_WEB_FILES
from tests.conftest import assert_one_line_error, make_image_folder, run


def test_report_table_sections_and_non_exports(exports, trained_run, ort_web, tmp_path, monkeypatch):
    monkeypatch.chdir(trained_run["run"].parent)  # where the card was written: its run folder is named from there
    models = tmp_path / "models"
    shutil.copytree(exports, models)
    (models / "garbage.onnx").write_bytes(b"not a protobuf at all")
    eval_json = tmp_path / "eval.json"
    assert run("eval", models / "tiny.onnx", "--data", trained_run["data"], "--repeats", 2, "--warmup", 0,
               "--json", eval_json).exit_code == 0  # at eval's default batch sizes, 1 and 64, as README's user runs it
    site = tmp_path / "site"
    result = run("report", models, "-o", site, "--evals", eval_json, "--ort-web", ort_web)
    assert result.exit_code == 0, result.output
    page = (site / "index.html").read_text()
    assert page.count(" data-row-model=") == 3  # one row per file, the broken one included
    assert '<tr class="not-export-row" data-row-model="garbage">' in page and "not a cifarx export" in page
    assert sorted(p.name for p in (site / "models").iterdir()) == ["tiny-flip.onnx", "tiny.onnx"]  # only exports ship
    assert all((site / "ort" / name).is_file() for name in ORT_WEB_FILES)
    tiny = next(part for part in page.split('<section class="model"') if part.startswith(' id="model-tiny">'))
    assert 'class="per-class"' in tiny and 'class="confusion"' in tiny  # from the eval JSON
    assert 'class="curves"' in tiny  # the card names the run folder, whose metrics.csv is at hand
    assert "onnxruntime cpu: images/s, largest batch" in page and "<small>batch 64</small>" in page  # what was measured
    assert "<small>batch 1</small>" in page and "flip TTA in the graph" in page
    assert "model card (best val accuracy)" in page and "ONNX metadata (best validation epoch)" in page  # sources named


def test_report_marks_an_onnx_file_without_cifarx_metadata(tmp_path, ort_web):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"])], "plain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3072])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "plain.onnx")
    result = run("report", tmp_path / "plain.onnx", "-o", tmp_path / "site", "--ort-web", ort_web)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "site" / "index.html").read_text()
    assert "not a cifarx export: model metadata has no class_names" in page
    assert not (tmp_path / "site" / "models").exists()


def test_report_bad_input_is_one_line(exports, tmp_path, ort_web):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("report", empty, "-o", tmp_path / "site", "--ort-web", ort_web), "no .onnx files in")
    no_images = tmp_path / "no-images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "notes.txt").write_text("hello")
    assert_one_line_error(run("report", exports, "-o", tmp_path / "site", "--samples", no_images, "--ort-web", ort_web),
                      "no images", str(no_images))
    assert_one_line_error(run("report", exports, "-o", tmp_path / "site", "--ort-web", tmp_path / "nowhere"),
                      "onnxruntime-web files not found", "--ort-web")
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text("<h1>someone's page</h1>")
    assert_one_line_error(run("report", exports, "-o", other, "--ort-web", ort_web), "other files in it")
    assert not (tmp_path / "site").exists()  # checked before anything was written


@pytest.mark.slow
def test_browser_predictions_equal_onnxruntime_python(exports, browser, tmp_path):
    """The two tiny exports in headless Chromium: every sample's prediction equals ONNX Runtime Python's."""
    from cifarx.report.browser import open_report
    from cifarx.runtimes.predict import predict

    samples = tmp_path / "samples"
    make_image_folder(samples, "", per_class=2, seed=3)
    make_image_folder(tmp_path / "big", "", classes=["cat"], per_class=1, seed=4, size=48)
    shutil.copy(tmp_path / "big" / "cat" / "0000.png", samples / "large-cat.png")  # resized by Pillow, as predict does
    site = tmp_path / "site"
    result = run("report", exports, "-o", site, "--samples", samples)
    assert result.exit_code == 0, result.output
    artifacts = Path(os.environ.get("CIFARX_TEST_ARTIFACTS", tmp_path))
    screenshot = artifacts / "report-overview.png"
    seen = open_report(site, screenshot=screenshot, timeout_s=120)
    print(f"browser test screenshot: {screenshot}")

    images = sorted(p for p in samples.rglob("*.png"))
    assert seen["table_rows"] == ["tiny-flip", "tiny"]
    assert len(seen["results"]) == 2 * len(images) == 18
    for name in ("tiny", "tiny-flip"):
        python = {Path(r["image"]).relative_to(samples).as_posix(): r["top"][0]
                  for r in predict(exports / f"{name}.onnx", images, top_k=1)}
        browser = {r["image"]: r for r in seen["results"] if r["model"] == name}
        assert browser.keys() == python.keys()
        for image, (predicted, probability) in python.items():
            assert browser[image]["predicted"] == predicted, (name, image)
            assert browser[image]["probability"] == pytest.approx(probability, abs=1e-4)
    assert screenshot.is_file() and screenshot.stat().st_size > 1000
