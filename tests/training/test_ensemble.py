"""The ensemble model: members trained on their own losses in one run, answering with their mean logits."""

import pytest
import torch
import torch.nn.functional as F

from cifarx.errors import CifarxError
from cifarx.training.objectives import make_objective
from cifarx.models.registry import create_model

TINY_FAST = {"widths": [8, 16, 16]}


def test_each_member_gets_the_gradient_it_would_get_training_alone():
    torch.manual_seed(0)
    model = create_model("ensemble", member="fast", size=2, member_kwargs=TINY_FAST).train()
    images, labels = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = make_objective("ensemble", label_smoothing=0.2)(model, images, labels)
    out["loss"].backward()
    for member in model.members:
        trainable = [p for p in member.parameters() if p.requires_grad]
        together = [p.grad.clone() for p in trainable]
        member.zero_grad()
        F.cross_entropy(member(images), labels, label_smoothing=0.2).backward()
        assert len(trainable) > 1
        for parameter, joint in zip(trainable, together):
            torch.testing.assert_close(joint, parameter.grad)
    assert out["logits"].shape == (6, 10)


def test_members_start_different_and_the_ensemble_answers_with_their_mean_logits():
    torch.manual_seed(0)
    model = create_model("ensemble", member="fast", size=3, member_kwargs=TINY_FAST).eval()
    first, second = (dict(m.named_parameters())["head.weight"] for m in model.members[:2])
    assert not torch.equal(first, second)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([member(images) for member in model.members]).mean(0)
        torch.testing.assert_close(model(images), expected)


def test_a_single_model_refuses_the_ensemble_objective_and_an_ensemble_needs_two_members():
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(CifarxError, match="--model ensemble"):
        make_objective("ensemble")(create_model("fast", **TINY_FAST), images, labels)
    with pytest.raises(CifarxError, match="size >= 2"):
        create_model("ensemble", size=1)


def test_a_config_pairs_the_ensemble_model_with_its_objective_before_anything_runs():
    from cifarx.training.config import make_train_config

    with pytest.raises(CifarxError, match="objective=ensemble"):
        make_train_config(preset="fast", model="ensemble")
    with pytest.raises(CifarxError, match="only to an ensemble"):
        make_train_config(preset="fast", objective="ensemble")


def test_an_ensemble_run_trains_and_exports_with_parity(image_folder, tmp_path):
    from cifarx.training.config import make_train_config
    from cifarx.deploy.export import export_onnx
    from cifarx.training.run import train

    config = make_train_config(preset="fast", data=str(image_folder), epochs=1, batch_size=32, val_size=32,
                               model="ensemble", model_kwargs={"member": "fast", "size": 2, "member_kwargs": TINY_FAST},
                               objective="ensemble", warmup_epochs=0, out=str(tmp_path / "run"))
    assert train(config)["epochs_run"] == 1
    report = export_onnx(tmp_path / "run", tmp_path / "ensemble.onnx", tta="flip-translate", parity_count=16)
    assert report["top1_agreement"] == 1.0
