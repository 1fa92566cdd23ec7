"""Static int8 quantisation: QDQ with per-channel int8 weights, calibration outside the validation split, metadata
carried over, predictions kept close to fp32, and the side-by-side comparison."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from cifarx.data import datasets as datamod
from cifarx.runtimes.onnxfile import recorded_val_split
from cifarx.cli.main import cli
from cifarx.errors import CifarxError
from cifarx.measure.evaluate import evaluate_onnx
from cifarx.runtimes.measuring import predict_logits
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.data.split import calibration_images
from cifarx.deploy.quantize import compare_int8, quantize_onnx


@pytest.fixture(scope="module")
def int8_model(trained_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    report = quantize_onnx(trained_run["onnx"], output, data=str(trained_run["data"]), calibration_count=48)
    return output, report


def test_quantised_graph_is_qdq_with_per_channel_int8_weights(int8_model):
    output, report = int8_model
    graph = onnx.load(str(output)).graph
    op_types = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= op_types
    initializers = {t.name: t for t in graph.initializer}
    weight_dequantizers = [n for n in graph.node if n.op_type == "DequantizeLinear" and
                           initializers.get(n.input[0]) is not None and
                           initializers[n.input[0]].data_type == onnx.TensorProto.INT8 and
                           len(initializers[n.input[0]].dims) == 4]
    assert weight_dequantizers, "no int8 convolution weights"
    for node in weight_dequantizers:  # one scale per output channel
        scale = numpy_helper.to_array(initializers[node.input[1]])
        assert scale.size == initializers[node.input[0]].dims[0] > 1
    activation_quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert any(numpy_helper.to_array(initializers[n.input[2]]).dtype == np.uint8 for n in activation_quantizers)
    assert report["bytes"] < report["source_bytes"] / 2


def test_metadata_carries_over_with_the_quantisation_settings(trained_run, int8_model):
    output, _ = int8_model
    source = {p.key: p.value for p in onnx.load(str(trained_run["onnx"])).metadata_props}
    quantized = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert {k: quantized[k] for k in source} == source
    settings = json.loads(quantized["quantization"])
    assert settings == {**settings, "format": "QDQ", "activations": "uint8", "per_channel": True,
                        "calibration_method": "minmax", "calibration_images": 48}
    assert model_info(create_session(output))["class_names"] == json.loads(source["class_names"])


def test_quantised_predictions_stay_close_to_fp32(trained_run, int8_model):
    output, _ = int8_model
    images = datamod.load_split(str(trained_run["data"]), "test").images.numpy()
    logits = {}
    for name, path in (("fp32", trained_run["onnx"]), ("int8", output)):
        session = create_session(path)
        logits[name] = predict_logits(session, model_info(session), images)
    assert (logits["fp32"].argmax(1) == logits["int8"].argmax(1)).mean() >= 0.9
    assert np.abs(logits["fp32"] - logits["int8"]).max() < 0.25 * np.abs(logits["fp32"]).max()


def test_calibration_images_come_from_outside_the_validation_split(trained_run):
    info = model_info(create_session(trained_run["onnx"]))
    full = datamod.load_split(str(trained_run["data"]), "train")
    recorded = json.loads(info["metadata"]["val_split"])
    assert recorded["val_size"] == 16
    _, val_index = datamod.stratified_split(full.labels, 16, recorded["seed"])
    validation = {image.tobytes() for image in full.images[val_index].numpy()}
    everything = calibration_images(str(trained_run["data"]), recorded_val_split(info), count=10_000)
    assert len(everything) == len(full) - 16
    assert not validation & {image.tobytes() for image in everything}
    some = calibration_images(str(trained_run["data"]), recorded_val_split(info), count=20)
    assert len(some) == 20 and not validation & {image.tobytes() for image in some}


def test_comparison_puts_int8_and_fp32_side_by_side(trained_run, int8_model):
    output, _ = int8_model
    result = compare_int8(trained_run["onnx"], output, data=str(trained_run["data"]), batch_sizes=[1, 4], threads=1,
                          warmup=0, repeats=2)
    assert set(result["models"]) == {"fp32", "int8"} and result["split"] == "val" and result["images"] == 16
    assert all(set(measured["latency"]) == {"1", "4"} for measured in result["models"].values())
    assert set(result["speedup"]) == {"1", "4"} and all(s > 0 for s in result["speedup"].values())
    # The same validation images `cifarx eval --split val` scores: the fp32 figure is eval's.
    evaluated = evaluate_onnx(trained_run["onnx"], data=str(trained_run["data"]), split="val", batch_sizes=[1],
                              warmup=0, repeats=1)
    assert result["models"]["fp32"]["accuracy"] == evaluated["accuracy"]
    assert result["agreement"]["top1_agreement"] >= 0.9
    assert result["quantization"]["format"] == "QDQ"


def test_cli_options_reach_the_quantiser_and_json_is_written(trained_run, tmp_path):
    output, report_path = tmp_path / "m.int8.onnx", tmp_path / "q.json"
    result = CliRunner().invoke(cli, [
        "quantize", str(trained_run["onnx"]), "--data", str(trained_run["data"]), "-o", str(output),
        "--calibration-images", "24", "--calibration-method", "percentile", "--activation-type", "int8", "--per-tensor",
        "--batch-sizes", "1,2", "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    settings = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}["quantization"])
    for recorded in (report["quantization"], settings):
        assert recorded["calibration_method"] == "percentile" and recorded["activations"] == "int8"
        assert recorded["per_channel"] is False and recorded["calibration_images"] == 24
    assert set(report["comparison"]["speedup"]) == {"1", "2"}
    assert "int8 vs fp32" in result.output and "Collecting tensor data" not in result.output


@pytest.mark.parametrize("problem", ["fp16", "same-file", "suffix", "method"])
def test_quantiser_refuses_what_it_cannot_do(trained_run, tmp_path, problem):
    source, output, options = trained_run["onnx"], tmp_path / "out.onnx", {}
    if problem == "fp16":
        from onnxconverter_common import float16

        source = tmp_path / "half.onnx"
        onnx.save(float16.convert_float_to_float16(onnx.load(str(trained_run["onnx"]))), str(source))
    elif problem == "same-file":
        output = source
    elif problem == "suffix":
        output = tmp_path / "out.int8"
    else:
        options = {"calibration_method": "kl"}
    with pytest.raises(CifarxError):
        quantize_onnx(source, output, data=str(trained_run["data"]), calibration_count=8, **options)
    assert not (tmp_path / "out.onnx").exists()


def test_the_flagship_exported_with_tta_in_its_graph_quantises(trained_run, tmp_path):
    """ORT's symbolic shape inference crashed on this graph (the shipped exported/fast.onnx) in quant_pre_process."""
    from cifarx.training.config import make_train_config
    from cifarx.deploy.export import export_onnx
    from cifarx.training.run import train

    config = make_train_config(preset="fast", data=str(trained_run["data"]), epochs=1, batch_size=32, val_size=16,
                               model_kwargs={"widths": [8, 16, 16]}, out=str(tmp_path / "run"), tta="none")
    train(config)
    folded = tmp_path / "tta.onnx"
    export_onnx(tmp_path / "run", folded, tta="flip-translate", parity_count=16)
    output = tmp_path / "tta.int8.onnx"
    quantize_onnx(folded, output, data=str(trained_run["data"]), calibration_count=16)
    images = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    fp32, int8 = (create_session(path) for path in (folded, output))
    fp32_logits, int8_logits = (s.run(None, {model_info(s)["input_name"]: images})[0] for s in (fp32, int8))
    assert int8_logits.shape == fp32_logits.shape == (4, len(model_info(fp32)["class_names"]))


@pytest.mark.parametrize("keep_ends", [True, False])
def test_the_first_and_last_layers_stay_float_unless_asked(trained_run, tmp_path, keep_ends):
    output = tmp_path / "model.int8.onnx"
    quantize_onnx(trained_run["onnx"], output, data=str(trained_run["data"]), calibration_count=16,
                  keep_ends_fp32=keep_ends)
    graph = onnx.load(str(output)).graph
    weighted = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    producers = {out: node.op_type for node in graph.node for out in node.output}
    quantized = [producers.get(node.input[1]) == "DequantizeLinear" for node in weighted]
    assert quantized[1:-1] and all(quantized[1:-1])
    assert (quantized[0], quantized[-1]) == ((False, False) if keep_ends else (True, True))


CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("flags, isa, types", [
    ("avx2 avx512f avx512bw avx512_vnni", "avx512_vnni", ("uint8", False)),
    ("avx2 avx_vnni", "avx_vnni", ("uint8", False)),
    ("avx2 avx512f avx512bw", "avx512bw", ("uint8", True)),   # VPMADDUBSW saturates: 7-bit weights
    ("avx2", "avx2", ("uint8", True)),
    ("neon asimd", None, ("int8", False)),                    # no x86 int8: ONNX Runtime's default S8S8
])
def test_int8_types_follow_the_cpus_int8_instructions(flags, isa, types):
    from cifarx.deploy.quantize import cpu_int8_isa, int8_types_for

    assert cpu_int8_isa(CPUINFO.format(flags=flags)) == isa
    assert int8_types_for(isa)[:2] == types


def test_quantize_says_which_types_it_picked_and_profiles_ops_per_type(trained_run, tmp_path, monkeypatch):
    import cifarx.deploy.quantize as quantize

    monkeypatch.setattr(quantize, "cpu_int8_isa", lambda: "avx2")  # a non-VNNI CPU: reduce_range is chosen for it
    output, report_path = tmp_path / "m.int8.onnx", tmp_path / "q.json"
    result = CliRunner().invoke(cli, [
        "quantize", str(trained_run["onnx"]), "--data", str(trained_run["data"]), "-o", str(output),
        "--calibration-images", "24", "--batch-sizes", "1,4", "--repeats", "2", "--warmup", "0", "--threads", "1",
        "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    settings = report["quantization"]
    assert settings["activations"] == "uint8" and settings["reduce_range"] is True and settings["cpu_int8_isa"] == "AVX2"
    assert settings["chosen_by"] == {"activations": "cpu", "reduce_range": "cpu"}
    assert "int8 instructions of this CPU: AVX2" in " ".join(result.output.split())
    profiles = report["comparison"]["op_profile"]
    int8_ops = {(op["op_type"], op["precision"]): op for op in profiles["int8"]["ops"]}
    fp32_ops = {(op["op_type"], op["precision"]): op for op in profiles["fp32"]["ops"]}
    # simple-cnn: the inner convolutions run as QLinearConv in int8, the first stays a float Conv (ends kept fp32)
    assert int8_ops[("QLinearConv", "int8")]["nodes"] >= 1 and ("Conv", "float") in int8_ops
    assert all(precision == "float" for _, precision in fp32_ops)
    assert sum(op["share"] for op in profiles["int8"]["ops"]) == pytest.approx(1, abs=1e-3)
    assert profiles["int8"]["int8_share"] == pytest.approx(
        sum(op["share"] for op in profiles["int8"]["ops"] if op["precision"] == "int8"), abs=1e-3)
    assert "QLinearConv" in result.output
