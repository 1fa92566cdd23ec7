"""`cifarx combine`: runs trained apart, with their own models and recipes, become one ensemble checkpoint."""

import json

import pytest
import torch

from tests.conftest import assert_one_line_error, run


def _train(image_folder, out, *args):
    result = run("train", "--data", image_folder, "--epochs", 1, "--batch-size", 16, "--val-size", 16, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def two_runs(image_folder, tmp_path):
    """A small CNN and a timm network upsampling to 40 px: different models, sizes and recipes, one split."""
    return [_train(image_folder, tmp_path / "cnn", "--model", "simple-cnn", "--tta", "flip"),
            _train(image_folder, tmp_path / "timm", "--model", "timm/test_efficientnet", "--img-size", 40,
                   "--no-pretrained", "--lr", 0.01)]


def test_combined_runs_answer_with_their_mean_logits_and_ship_as_one_file_with_a_card(two_runs, image_folder, tmp_path):
    from cifarx.training.checkpoint import load_model

    out = tmp_path / "both"
    result = run("combine", *two_runs, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    members = [json.loads((r / "summary.json").read_text()) for r in two_runs]
    assert summary["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in members), abs=0.2)
    assert summary["val_images"] == 16 and 0 <= summary["best_val_accuracy_tta_flip"] <= 1
    assert [m["run"] for m in summary["members"]] == [f"runs/{r.name}" for r in two_runs]  # never an absolute path
    assert summary["machine"] == members[0]["machine"] and summary["machine"]["cores"] >= 1  # both trained here

    ensemble, payload = load_model(out)
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([load_model(r)[0](images) for r in two_runs]).mean(0)
        torch.testing.assert_close(ensemble(images), expected)
    assert payload["model"]["kwargs"]["members"][1]["kwargs"]["img_size"] == 40
    from cifarx.data import datasets as datamod
    from cifarx.data.split import ValidationSplit

    full = datamod.load_split(str(image_folder), "train")  # the members' split: 16 images held out with seed 0
    val = ValidationSplit(16, 0).held_out(full, str(image_folder))
    with torch.no_grad():
        views = datamod.to_float(val.images)
        logits = (ensemble(views) + ensemble(views.flip(3))) / 2
    assert summary["best_val_accuracy_tta_flip"] == pytest.approx((logits.argmax(1) == val.labels).float().mean().item())

    result = run("export", out, "-o", tmp_path / "both.onnx", "--tta", "flip", "--card")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "both.json").read_text())
    assert card["command"].startswith("cifarx combine runs/cnn runs/timm --out runs/both")
    assert str(tmp_path) not in card["command"] and card["parity"]["top1_agreement"] == 1.0
    assert card["img_size"] == [None, 40] and len(card["members"]) == 2
    assert card["val_accuracy"]["mean"] == summary["best_val_accuracy_tta_flip"]
    markdown = (tmp_path / "both.md").read_text()
    assert "Members" in markdown and markdown.count("cifarx train") == 2
    assert "| img size | —, 40 |" in markdown and "| preset / seed | — / 0 |" in markdown and "None" not in markdown
    import onnx

    metadata = {prop.key: prop.value for prop in onnx.load(str(tmp_path / "both.onnx")).metadata_props}
    assert metadata["resize_to"] == "40" and json.loads(metadata["members"])[1]["img_size"] == 40


def test_combine_refuses_runs_validated_on_other_images_a_single_run_and_a_used_folder(two_runs, image_folder, tmp_path):
    other_split = _train(image_folder, tmp_path / "seed1", "--model", "simple-cnn", "--seed", 1)
    assert_one_line_error(run("combine", two_runs[0], other_split, "--out", tmp_path / "x"), "seed", "validated")
    assert_one_line_error(run("combine", two_runs[0], "--out", tmp_path / "x"), "two or more runs")
    assert_one_line_error(run("combine", *two_runs, "--out", two_runs[0]), "already holds a run")
    assert not (tmp_path / "x").exists()


def test_runs_of_other_seeds_hold_out_one_split_with_split_seed_so_they_combine(two_runs, image_folder, tmp_path):
    import onnx

    from cifarx.training.batches import split_train_val
    from cifarx.training.checkpoint import load_model
    from cifarx.training.config import make_train_config

    def held_out(**settings):
        return split_train_val(make_train_config(data=str(image_folder), val_size=16, **settings))[1].images

    assert torch.equal(held_out(seed=1, split_seed=0), held_out(seed=0))
    assert not torch.equal(held_out(seed=1), held_out(seed=0))  # without it, the seed picks the split as before

    seed1 = _train(image_folder, tmp_path / "seed1", "--model", "simple-cnn", "--tta", "flip", "--seed", 1,
                   "--split-seed", 0)
    weights = [load_model(r)[0].state_dict() for r in (two_runs[0], seed1)]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # trained apart
    result = run("combine", two_runs[0], seed1, "--out", tmp_path / "seeds")
    assert result.exit_code == 0, result.output
    assert run("export", seed1, "-o", tmp_path / "seed1.onnx").exit_code == 0
    metadata = {prop.key: prop.value for prop in onnx.load(str(tmp_path / "seed1.onnx")).metadata_props}
    assert json.loads(metadata["val_split"])["seed"] == 0  # what `cifarx eval --split val` holds out again
