"""Runtimes other than ONNX Runtime: each installed one on a tiny export, every registered model's export loads on
every installed runtime, a crashing runtime is a failed row (not a dead cifarx), a missing one is one line."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cifarx.runtimes import table as runtimes
from tests.conftest import REDUCED_WIDTH, make_image_folder
from cifarx.io import file_sha256
from cifarx.cli.main import cli
from cifarx.measure.compare import compare_runtimes, pareto_front
from cifarx.measure.evaluate import evaluate_onnx
from cifarx.deploy.portable import reorder_gelu
from cifarx.models.registry import create_model, list_models

# run in a child: the float32 rows (the file as it is, converted if need be) and the int8 rows (the runtime's quantiser)
FOREIGN = [name for name, row in runtimes.RUNTIMES.items() if row.adapter is not None and row.precision == "float32"]
INSTALLED = [name for name in FOREIGN if runtimes.missing(name) is None]
INT8 = [name for name, row in runtimes.RUNTIMES.items() if row.precision == "int8"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def installed(name):
    return pytest.param(name, marks=pytest.mark.skipif(runtimes.missing(name) is not None,
                                                        reason=runtimes.missing(name) or ""))


@pytest.mark.parametrize("runtime", [installed(name) for name in FOREIGN])
def test_each_runtime_scores_a_tiny_export_like_onnx_runtime(trained_run, tmp_path, runtime):
    data = trained_run["data"]
    reference = evaluate_onnx(trained_run["onnx"], data=str(data), batch_sizes=[1, 4], repeats=2, warmup=1)
    result = run("eval", trained_run["onnx"], "--runtime", runtime, "--data", data, "--batch-sizes", "1,4",
                 "--repeats", 2, "--warmup", 1, "--threads", 1, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["runtime"] == runtime and report["runtime_version"] == runtimes.version(runtime)
    assert "CPU" in report["device"] and set(report["latency"]) == {"1", "4"}
    assert report["accuracy"] == reference["accuracy"] and report["per_class"] == reference["per_class"]
    assert report["agreement"]["images"] == reference["images"] and report["agreement"]["top1_agreement"] == 1.0
    assert report["agreement"]["max_abs_probability_delta"] < 1e-4
    assert f"latency on {runtime}" in result.output and "agreement with ONNX Runtime CPU" in result.output


@pytest.mark.parametrize("runtime", [installed(name) for name in INT8])
def test_each_int8_quantiser_writes_an_artifact_that_agrees_with_its_float_source(trained_run, tmp_path, runtime):
    """The runtime's own quantiser, calibrated on training images: the int8 artifact loads, keeps the float file's
    answers on the tiny model (top-1 agreement >= 90%, probabilities within 0.25) and its card says how it was made."""
    data = str(trained_run["data"])
    result = run("eval", trained_run["onnx"], "--runtime", runtime, "--data", data, "--split", "val", "--batch-sizes",
                 "1,4", "--repeats", 2, "--warmup", 1, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    agreement = json.loads((tmp_path / "e.json").read_text())["agreement"]
    assert agreement["top1_agreement"] >= 0.9 and agreement["max_abs_probability_delta"] < 0.25, agreement
    converted = run("convert", trained_run["onnx"], "--to", runtime, "--data", data, "--calibration-images", 24,
                    "--out", tmp_path / "out")
    assert converted.exit_code == 0, converted.output
    card = json.loads((tmp_path / "out" / f"{trained_run['onnx'].stem}.{runtime}" / "card.json").read_text())
    assert card["precision"] == "int8" and card["calibration"]["images"] == 24
    assert card["source_sha256"] == file_sha256(trained_run["onnx"])


@pytest.mark.parametrize("runtime", INT8)
def test_int8_calibration_refuses_missing_or_too_few_images_before_writing(trained_run, tmp_path, runtime):
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    for data, fragment in ((None, "give --data"), (empty, "no images"), (tmp_path / "absent", "not found")):
        args = ["convert", trained_run["onnx"], "--to", runtime, "--out", tmp_path / "out"]
        result = run(*args, *(["--data", data] if data else []))
        assert result.exit_code == 2 and fragment in result.stderr, result.output
    few = make_image_folder(tmp_path / "few", "train", classes=["airplane", "automobile"], per_class=4)
    result = run("convert", trained_run["onnx"], "--to", runtime, "--out", tmp_path / "out", "--data", few)
    assert result.exit_code == 2 and "validation split" in result.stderr, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_failed_quantisation_leaves_no_artifact(trained_run, tmp_path, monkeypatch):
    runtime = INT8[0]
    fake(monkeypatch, runtime, "RefusingConverter", converter="refuser")
    monkeypatch.setitem(runtimes.RUNTIMES, runtime, dataclasses.replace(runtimes.RUNTIMES[runtime], package="numpy"))
    result = run("convert", trained_run["onnx"], "--to", runtime, "--data", trained_run["data"], "--out", tmp_path / "out")
    assert result.exit_code == 1 and "failed" in result.output
    assert not any((tmp_path / "out").iterdir())


def fake(monkeypatch, runtime, adapter, converter=None):
    """Make the table's row for `runtime` run a fake adapter from runtime_fakes.py in its child process."""
    row = dataclasses.replace(runtimes.RUNTIMES[runtime], adapter=f"runtime_fakes:{adapter}", converter=converter)
    monkeypatch.setitem(runtimes.RUNTIMES, runtime, row)


@pytest.mark.skipif(not INSTALLED, reason="no runtime besides ONNX Runtime is installed")
def test_a_runtime_that_crashes_gives_a_failed_row_and_a_clean_exit(trained_run, tmp_path, monkeypatch):
    runtime = INSTALLED[0]
    fake(monkeypatch, runtime, "Segfault")
    result = run("compare", trained_run["onnx"], "--runtimes", f"onnxruntime,{runtime}", "--batch-sizes", 2,
                 "--repeats", 2, "--warmup", 0, "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok", "failed: killed by signal 11 (SIGSEGV)"]
    assert rows[1]["version"] == runtimes.version(runtime)
    result = run("eval", trained_run["onnx"], "--runtime", runtime, "--batch-sizes", 2, "--repeats", 2)
    assert result.exit_code == 1 and "killed by signal 11 (SIGSEGV)" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not INSTALLED, reason="no runtime besides ONNX Runtime is installed")
def test_a_runtime_that_hangs_is_stopped_after_the_timeout(trained_run, tmp_path, monkeypatch):
    runtime = INSTALLED[0]
    fake(monkeypatch, runtime, "Hang")
    result = compare_runtimes([trained_run["onnx"]], ["onnxruntime", runtime], batch_sizes=[1], image_count=4,
                              warmup=0, repeats=1, timeout=5)
    assert [row["status"] for row in result["rows"]] == ["ok", "failed: no answer within 5 s (killed)"]


@pytest.mark.skipif(not INSTALLED, reason="no runtime besides ONNX Runtime is installed")
def test_a_converter_that_refuses_gives_its_own_reason_and_leaves_no_artifact(trained_run, tmp_path, monkeypatch):
    runtime = INSTALLED[0]
    fake(monkeypatch, runtime, "RefusingConverter", converter="fake-converter")
    result = compare_runtimes([trained_run["onnx"]], ["onnxruntime", runtime], batch_sizes=[1], image_count=4,
                              warmup=0, repeats=1)
    assert result["rows"][1]["status"] == "failed: unsupported operator: Erf"
    out = tmp_path / "shipped"
    converted = run("convert", trained_run["onnx"], "--to", runtime, "--out", out)
    assert converted.exit_code == 1 and "unsupported operator: Erf" in converted.output
    assert "Traceback" not in converted.output and not (out.exists() and any(out.iterdir()))


def test_a_runtime_that_is_not_installed_is_one_line_naming_its_extra(trained_run, monkeypatch, tmp_path):
    real_find_spec = runtimes.importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None if name == "cv2" else real_find_spec(name))
    result = run("eval", trained_run["onnx"], "--runtime", "opencv")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == "error: opencv is not installed: pip install 'cifarx[opencv]'"
    result = run("compare", trained_run["onnx"], "--runtimes", "onnxruntime,opencv", "--batch-sizes", 1, "--repeats", 1,
                 "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert rows[1] == {"model": str(trained_run["onnx"]), "precision": "float32", "runtime": "opencv",
                       "status": "opencv is not installed: pip install 'cifarx[opencv]'"}
    result = run("compare", trained_run["onnx"], "--runtimes", "onnxruntime,tflite-typo")
    assert result.exit_code == 2 and "unknown runtime tflite-typo" in result.stderr


def test_compare_measures_every_model_on_every_runtime_with_the_same_images(trained_run, tmp_path):
    int8 = tmp_path / "int8.onnx"
    from cifarx.deploy.quantize import quantize_onnx

    quantize_onnx(trained_run["onnx"], int8, data=str(trained_run["data"]), calibration_count=16)
    result = compare_runtimes([trained_run["onnx"], int8], ["onnxruntime", *INSTALLED], batch_sizes=[1, 3],
                              data=str(trained_run["data"]), image_count=10, warmup=0, repeats=2)
    rows = result["rows"]
    assert [(row["precision"], row["runtime"]) for row in rows] == [
        (precision, runtime) for precision in ("float32", "int8") for runtime in ("onnxruntime", *INSTALLED)]
    # int8 QDQ files are ONNX Runtime's format: OpenCV 5.0 refuses them (an assertion in its int8 pooling layer) and
    # a converter may too; those rows fail with the runtime's or converter's message. fp32 runs everywhere.
    ok = [row for row in rows if row["precision"] == "float32" or row["runtime"] in ("onnxruntime", "openvino")]
    assert all(row["status"] == "ok" and row["images"] == 10 and set(row["latency"]) == {"1", "3"} for row in ok)
    assert all(row["agreement"]["top1_agreement"] == 1.0 for row in rows if row["precision"] == "float32")
    assert all(row["status"].startswith(("ok", "failed: ")) for row in rows)
    png = tmp_path / "compare.png"
    from cifarx.measure.compare import accuracy_latency_points, save_accuracy_latency_png, save_compare_png

    save_compare_png(result, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    chart = tmp_path / "chart.png"
    save_accuracy_latency_png(result, chart)
    assert chart.read_bytes()[:4] == b"\x89PNG"
    points = accuracy_latency_points(result, "1")
    assert len(points) == sum(row["status"] == "ok" for row in rows) and any(point["pareto"] for point in points)


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.85), (3.0, 0.95), (0.5, 0.50), (1.0, 0.80)]
    assert sorted(pareto_front(points)) == [0, 1, 4]  # (1.5, 0.85) is slower and worse than (1.0, 0.90)


# ---------------------------------------------------------------------------------------------- exports load everywhere


def _gelu_graph(order: str) -> onnx.ModelProto:
    """Conv then GELU as torch's exporter writes it (`exported`) or as `reorder_gelu` leaves it."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    constants = [numpy_helper.from_array(np.array(value, np.float32), name)
                 for name, value in (("root2", 2**0.5), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Div", ["c", "root2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["m"]),
             helper.make_node("Mul", ["c", "m"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [weights, *constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if order == "reordered":
        assert reorder_gelu(model) == 1
    return model


def test_reordered_gelu_gives_the_same_bits_in_every_runtime_order():
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32) * 4}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    outputs = {}
    for order in ("exported", "reordered"):
        model = _gelu_graph(order)
        outputs[order] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x)[0]
        muls = [list(node.input) for node in model.graph.node if node.op_type == "Mul"]
        assert muls == ([["half", "a"], ["c", "m"]] if order == "exported" else [["c", "a"], ["m", "half"]])
    assert np.array_equal(outputs["exported"], outputs["reordered"])
    assert reorder_gelu(_gelu_graph("reordered")) == 0  # nothing left to rewrite


# Runtime x family pairs whose outputs are known to differ from ONNX Runtime's (docs/runtimes.md): MNN 3.6.1 moves
# shake-shake's probabilities by about 0.05 (no shipped file is a shake-shake; the op is not isolated yet).
KNOWN_WRONG = {("shake-shake-26-2x64d", "mnn")}


def _export_registered(name, tmp_path, image_folder, tta):
    from cifarx.training.checkpoint import save_checkpoint
    from cifarx.deploy.export import export_onnx

    torch.manual_seed(0)
    kwargs = REDUCED_WIDTH.get(name, {})
    model = create_model(name, num_classes=4, **kwargs).eval()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model_name=name, model_kwargs=kwargs, class_names=["airplane", "automobile", "bird", "cat"],
                    state_dict=model.state_dict(), config={"data": str(image_folder), "val_size": 8, "seed": 0},
                    metrics={"val_accuracy": 0.5})
    path = tmp_path / f"{name}-{tta}.onnx"
    export_onnx(checkpoint, path, tta=tta, parity_count=4)
    return path


@pytest.mark.skipif(not INSTALLED, reason="no runtime besides ONNX Runtime is installed")
@pytest.mark.parametrize("tta", ["none", "flip-translate"])
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_to_a_file_every_runtime_takes(name, tta, tmp_path, image_folder):
    path = _export_registered(name, tmp_path, image_folder, tta)
    rows = compare_runtimes([path], ["onnxruntime", *INSTALLED], batch_sizes=[2], image_count=32, warmup=0, repeats=1)["rows"]
    for row in rows:
        assert row["status"] == "ok", row
        if (name, row["runtime"]) in KNOWN_WRONG:  # named in docs/runtimes.md; kept measured, not hidden
            continue
        assert row["agreement"]["top1_agreement"] >= 0.998 and row["agreement"]["max_abs_probability_delta"] < 1e-3, row
