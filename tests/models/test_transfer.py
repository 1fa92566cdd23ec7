"""Transfer learning from timm backbones: tiny timm models, synthetic images, and the offline EfficientNet-Lite0/-Lite2
weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tests.conftest import ProgressRecorder
from cifarx.training.checkpoint import load_model, read_checkpoint, save_checkpoint
from cifarx.training.config import make_train_config
from cifarx.errors import CifarxError
from cifarx.models import transfer
from cifarx.models.transfer import WEIGHTS_PACKAGES, create_timm_classifier, stages_of
from cifarx.models.registry import create_model

TINY = "test_efficientnet"  # timm's own test network: ~0.3M parameters, 6 stages (stem + 5 block stages)


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """A local timm state dict of the tiny model, with its original 1000-class head."""
    torch.manual_seed(123)
    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model(TINY).state_dict(), path)
    return path


def test_model_normalises_resizes_and_has_a_new_head(tiny_weights):
    model = create_model(f"timm/{TINY}", num_classes=4, img_size=48, weights=str(tiny_weights)).eval()
    seen = {}
    model.backbone.conv_stem.register_forward_hook(lambda module, inputs, output: seen.update(shape=inputs[0].shape))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert seen["shape"] == (2, 3, 48, 48) and model.resize_to == 48
    assert model.normalize.mean.flatten().tolist() == pytest.approx(model.backbone.pretrained_cfg["mean"])
    # The file's backbone tensors are loaded; its 1000-class head is replaced by a new 4-class one.
    stored = torch.load(tiny_weights, weights_only=True)
    assert torch.equal(model.backbone.conv_stem.weight, stored["conv_stem.weight"])
    assert stored["classifier.weight"].shape[0] == 1000 and model.get_classifier().weight.shape[0] == 4
    assert model.export_metadata["weights"].startswith("file tiny.pth sha256:")
    assert model.rebuild_kwargs["img_size"] == 48 and "weights" not in model.rebuild_kwargs


def test_frozen_parts_keep_weights_and_batchnorm_statistics_after_a_step():
    torch.manual_seed(0)
    model = create_timm_classifier(TINY, num_classes=4, img_size=32, freeze=1)
    stages = stages_of(model.backbone)
    frozen_names = {name for stage in stages[:-1] for name in stage}
    model.train()  # what the training loop calls every epoch: frozen stages must stay in eval mode
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.arange(8) % 4)
    loss.backward()
    torch.optim.SGD(trainable, lr=0.5).step()
    after = model.backbone.state_dict()
    frozen_modules = {name.rsplit(".", 1)[0] for name in frozen_names}
    for key, value in after.items():
        module = key.rsplit(".", 1)[0]
        if module in frozen_modules:  # weights, running_mean, running_var, num_batches_tracked
            assert torch.equal(value, before[key]), key
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(k.startswith("classifier") for k in changed)
    assert any(k.rsplit(".", 1)[0] not in frozen_modules and "running_var" in k for k in changed)  # last stage trains


def test_freeze_all_leaves_only_the_head_and_refuses_too_many_stages():
    model = create_timm_classifier(TINY, num_classes=4, img_size=32, freeze="all")
    assert model.frozen_backbone
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["backbone.classifier.weight",
                                                                           "backbone.classifier.bias"]
    assert not create_timm_classifier(TINY, num_classes=4, img_size=32, freeze="none").frozen_backbone
    with pytest.raises(CifarxError, match="only 6 stages"):
        create_timm_classifier(TINY, num_classes=4, img_size=32, freeze=9)
    with pytest.raises(CifarxError, match="--freeze must be"):
        create_timm_classifier(TINY, num_classes=4, img_size=32, freeze="some")


def test_backbone_learning_rate_scale_splits_head_and_backbone_groups():
    from cifarx.training.optimiser import parameter_groups

    model = create_timm_classifier(TINY, num_classes=4, img_size=32)
    config = make_train_config(model=f"timm/{TINY}", lr=0.1, backbone_lr_scale=0.01)
    groups = parameter_groups(model, config)
    head = {id(p) for p in model.get_classifier().parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(0.1 if in_head.pop() else 0.001)


def test_training_loop_keeps_a_frozen_backbone_and_checkpoint_rebuilds_without_weights(image_folder, tmp_path,
                                                                                      tiny_weights):
    from cifarx.training.run import train

    config = make_train_config(model=f"timm/{TINY}", data=str(image_folder), epochs=2, batch_size=16, val_size=16,
                               out=str(tmp_path / "run"), lr=1e-2,
                               model_kwargs={"img_size": 40, "freeze": "all", "weights": str(tiny_weights)})
    train(config)
    stored = torch.load(tiny_weights, weights_only=True)
    tiny_weights.unlink()  # the checkpoint alone must rebuild the model
    model, payload = load_model(tmp_path / "run" / "best.pt")
    assert payload["model"]["kwargs"]["img_size"] == 40 and "weights" not in payload["model"]["kwargs"]
    assert payload["model"]["export_metadata"]["backbone"] == f"timm/{TINY}"
    state = model.backbone.state_dict()
    for key, value in stored.items():  # weights and BatchNorm statistics, untouched by two epochs of training
        if not key.startswith("classifier"):
            assert torch.equal(state[key], value), key


def test_exported_resized_model_takes_32px_input_and_matches_onnx_runtime(image_folder, tmp_path, tiny_weights):
    import onnx
    import onnxruntime as ort

    from cifarx.deploy.export import export_onnx

    model = create_timm_classifier(TINY, num_classes=4, img_size=56, weights=str(tiny_weights)).eval()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model_name=f"timm/{TINY}", model_kwargs=model.rebuild_kwargs,
                    class_names=["airplane", "automobile", "bird", "cat"], state_dict=model.state_dict(),
                    config={"data": str(image_folder), "val_size": 8, "seed": 0}, metrics={"val_accuracy": 0.5},
                    export_metadata=model.export_metadata)
    report = export_onnx(checkpoint, tmp_path / "model.onnx", parity_count=8)
    assert report["top1_agreement"] == 1.0
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert "Resize" in {node.op_type for node in proto.graph.node}
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["resize_to"] == "56" and metadata["backbone"] == f"timm/{TINY}"
    assert metadata["weights"].startswith("file tiny.pth")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    batch = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(session.run(["logits"], {"input": batch})[0], expected, atol=1e-4, rtol=1e-4)


def test_cached_features_fit_the_head_and_reuse_the_cache(image_folder, tmp_path):
    from cifarx.training.batches import split_train_val
    from cifarx.training.loop import evaluate
    from cifarx.training.run import train

    def run(name, reporter=None):
        config = make_train_config(model=f"timm/{TINY}", data=str(image_folder), epochs=3, batch_size=16, val_size=16,
                                   out=str(tmp_path / name), lr=1e-2, cached_features=True,
                                   model_kwargs={"img_size": 40, "freeze": "all"})
        return config, train(config, reporter=reporter)

    computing, loading = ProgressRecorder(), ProgressRecorder()
    config, first = run("first", computing)
    _, second = run("second", loading)
    assert not first["features_from_cache"] and second["features_from_cache"]
    # The feature pass reports its progress (64 images a batch) up to each split's size; the cached one none.
    assert computing.calls == [("features of 80 images", 64, 80), ("features of 80 images", 80, 80),
                               ("features of 16 images", 16, 16)]
    assert loading.calls == []
    assert second["best_val_accuracy"] == first["best_val_accuracy"]
    # The checkpoint is the whole model: its own forward pass reproduces the accuracy measured on cached features.
    model, payload = load_model(tmp_path / "first" / "best.pt")
    _, val_set = split_train_val(config)
    assert evaluate(model, val_set, 8, torch.device("cpu"))["accuracy"] == pytest.approx(first["best_val_accuracy"])
    assert payload["model"]["kwargs"]["freeze"] == "all"
    with pytest.raises(CifarxError, match="frozen backbone"):
        train(make_train_config(model=f"timm/{TINY}", data=str(image_folder), epochs=1, batch_size=16, val_size=16,
                                out=str(tmp_path / "unfrozen"), cached_features=True, model_kwargs={"img_size": 32}))


def test_cli_transfer_options_reach_the_model(image_folder, tmp_path):
    from click.testing import CliRunner

    from cifarx.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", f"timm/{TINY}", "--data", str(image_folder), "--epochs", "1",
                                      "--batch-size", "16", "--val-size", "16", "--img-size", "36", "--freeze", "all",
                                      "--cached-features", "--backbone-lr-scale", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"] == {"img_size": 36, "freeze": "all"} and config["cached_features"]
    assert config["backbone_lr_scale"] == 0.5
    assert read_checkpoint(out / "best.pt")["model"]["kwargs"]["img_size"] == 36


def test_freeze_bn_keeps_every_batchnorm_as_built_while_the_rest_fine_tunes(image_folder, tmp_path, tiny_weights):
    from click.testing import CliRunner

    from cifarx.cli.main import cli

    def batchnorm_state(model):
        layers = {name for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        return {k: v.clone() for k, v in model.backbone.state_dict().items() if k.rsplit(".", 1)[0] in layers}

    start = create_model(f"timm/{TINY}", num_classes=10, img_size=32, weights=str(tiny_weights))
    for flag, out in (("--freeze-bn", tmp_path / "frozen"), ("--no-freeze-bn", tmp_path / "training")):
        result = CliRunner().invoke(cli, ["train", "--model", f"timm/{TINY}", "--data", str(image_folder), "--epochs",
                                          "1", "--batch-size", "16", "--val-size", "16", "--img-size", "32",
                                          "--freeze", "none", "--weights", str(tiny_weights), flag, "--out", str(out)])
        assert result.exit_code == 0, result.output
    frozen, payload = load_model(tmp_path / "frozen" / "last.pt")
    training, _ = load_model(tmp_path / "training" / "last.pt")
    assert payload["model"]["kwargs"]["freeze_bn"] is True  # a resumed run rebuilds the same trainable set
    before, kept, moved = batchnorm_state(start), batchnorm_state(frozen), batchnorm_state(training)
    assert before and all(torch.equal(kept[k], before[k]) for k in before)  # statistics and scale/shift
    batchnorms = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(p.requires_grad for m in batchnorms for p in m.parameters())
    assert any(not torch.equal(moved[k], before[k]) for k in before if k.endswith("running_mean"))
    assert not torch.equal(frozen.backbone.conv_stem.weight, start.backbone.conv_stem.weight)  # the convs trained


def test_freeze_depthwise_keeps_the_depthwise_filters_while_the_pointwise_ones_fine_tune(image_folder, tmp_path,
                                                                                         tiny_weights):
    from click.testing import CliRunner

    from cifarx.cli.main import cli

    def convs(model, depthwise):
        return {name: m.weight.detach().clone() for name, m in model.backbone.named_modules()
                if isinstance(m, torch.nn.Conv2d) and (m.groups > 1 and m.groups == m.in_channels) == depthwise}

    start = create_model(f"timm/{TINY}", num_classes=10, img_size=32, weights=str(tiny_weights))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", f"timm/{TINY}", "--data", str(image_folder), "--epochs", "1",
                                      "--batch-size", "16", "--val-size", "16", "--img-size", "32", "--freeze", "none",
                                      "--weights", str(tiny_weights), "--freeze-depthwise", "--out", str(out)])
    assert result.exit_code == 0, result.output
    trained, payload = load_model(out / "last.pt")
    assert payload["model"]["kwargs"]["freeze_depthwise"] is True  # a resumed run rebuilds the same trainable set
    before, kept = convs(start, depthwise=True), convs(trained, depthwise=True)
    assert before and all(torch.equal(kept[name], before[name]) for name in before)
    assert not any(m.weight.requires_grad for name, m in trained.backbone.named_modules() if name in before)
    pointwise_before, pointwise_after = convs(start, depthwise=False), convs(trained, depthwise=False)
    assert all(not torch.equal(pointwise_after[name], pointwise_before[name]) for name in pointwise_before)


def test_pretrained_without_a_reachable_hub_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(transfer, "_hub_available", lambda: False)
    with pytest.raises(CifarxError, match="hub is unreachable") as error:
        create_timm_classifier("resnet10t", pretrained=True)
    assert "\n" not in str(error.value)
    with pytest.raises(CifarxError, match="not both"):
        create_timm_classifier(TINY, pretrained=True, weights="x.pth")
    with pytest.raises(CifarxError, match="unknown timm model"):
        create_model("timm/no_such_net")


@pytest.mark.parametrize("package", WEIGHTS_PACKAGES, ids=lambda package: package.extra)
def test_package_mapping_refuses_a_shape_mismatch(package, monkeypatch):
    pytest.importorskip(package.module)
    target = timm.create_model(package.models[0]).state_dict()
    name = next(key for key in target if key.endswith("conv_dw.weight"))  # the first depthwise kernel (3x3 in both)
    target[name] = torch.zeros(target[name].shape[0], 1, 5, 5)
    with pytest.raises(CifarxError, match=rf"{package.name} tensor \d+ \S+ \(\d+, 1, 3, 3\) does not fit "
                                          rf"{re.escape(name)} \(\d+, 1, 5, 5\)") as error:
        transfer.package_state_dict(package, target)
    assert "\n" not in str(error.value)
    with pytest.raises(CifarxError, match="not the same architecture"):
        transfer.package_state_dict(package, timm.create_model("resnet10t").state_dict())
    with pytest.raises(CifarxError, match=f"{package.network} weights"):
        create_timm_classifier("resnet10t", weights=package.name)
    # Through the CLI's path: a package tensor of the wrong shape is one line naming it, not a traceback.
    real_load = torch.load

    def load_with_a_wrong_tensor(path, *args, **kwargs):
        state = real_load(path, *args, **kwargs)
        key = next(k for k in state if k.endswith("_depthwise_conv.weight"))
        state[key] = state[key][:, :, :2, :2]
        return state

    monkeypatch.setattr(torch, "load", load_with_a_wrong_tensor)
    wrong = r"_depthwise_conv\.weight \(\d+, 1, 2, 2\) does not fit blocks\.0\.0\.conv_dw\.weight"
    with pytest.raises(CifarxError, match=wrong):
        create_timm_classifier(package.models[0], weights=package.name)


@pytest.mark.parametrize("package", WEIGHTS_PACKAGES, ids=lambda package: package.extra)
def test_offline_package_is_the_default_and_holds_imagenet_weights(package, monkeypatch):
    """Every package tensor lands in timm's model (shapes checked), at the network's native size, and the 1000-class
    head still knows ImageNet: Grace Hopper's portrait (shipped with matplotlib, the classic ImageNet demo image)
    comes out 'military uniform', several times as likely as the runner-up (random or shuffled weights give a flat,
    arbitrary answer)."""
    pytest.importorskip(package.module)
    import matplotlib
    from PIL import Image
    from timm.data import ImageNetInfo

    portrait = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not portrait.is_file():
        pytest.skip("matplotlib's sample image is not installed")
    monkeypatch.setattr(transfer, "_hub_available", lambda: False)
    model = create_timm_classifier(package.models[0], num_classes=1000, pretrained=True).eval()
    assert model.export_metadata["weights"].startswith(package.name)
    assert model.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    size = {"lite0": 224, "lite2": 260}[package.extra]
    assert model.resize_to == size
    module = __import__(package.module)
    source = torch.load(getattr(module, package.file_class).get_model_file_path(), weights_only=True)
    loaded = model.backbone.state_dict()
    assert len(source) == len(loaded)
    assert all(torch.equal(a, b) for a, b in zip(source.values(), loaded.values()))
    with Image.open(portrait) as image:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(pixels / 255).permute(2, 0, 1)[None]).softmax(1)[0]
    first, second = probabilities.topk(2).values.tolist()
    assert ImageNetInfo().index_to_label_name(int(probabilities.argmax())) == "n03763968"  # military uniform
    assert first > 3 * second  # Lite0 0.39 vs 0.09, Lite2 0.18 vs 0.03


def test_progressive_resizing_trains_at_rising_sizes_and_validates_at_img_size(image_folder, tmp_path, monkeypatch):
    from cifarx.training import loop as train_module

    seen = []  # (training?, side) of every batch the backbone gets

    def recording_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        model.backbone.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
        return model

    monkeypatch.setattr(train_module, "create_model", recording_model)
    config = make_train_config(model=f"timm/{TINY}", data=str(image_folder), epochs=3, batch_size=16, val_size=16,
                               out=str(tmp_path / "run"), progressive_sizes=[32, 40],
                               model_kwargs={"img_size": 48, "freeze": "none"})
    train_module.train(config)
    training_sides = [side for training, side in seen if training]
    assert sorted(set(training_sides), key=training_sides.index) == [32, 40, 48]
    assert len(training_sides) == 3 * (len(training_sides) // 3)  # one size per epoch, an epoch's batches each
    assert {side for training, side in seen if not training} == {48}
    model, _ = load_model(tmp_path / "run" / "best.pt")
    assert model.resize_to == 48 and model.training_resize_to is None  # export sees img_size only


@pytest.mark.parametrize("settings, message", [
    (dict(model="simple-cnn", model_kwargs={}), "needs a timm/<name> model"),
    (dict(cached_features=True), "cannot act on --cached-features"),
    (dict(progressive_sizes=[32, 56]), "at or below --img-size 48"),
])
def test_progressive_resizing_where_it_cannot_act_is_refused_in_one_line(image_folder, tmp_path, settings, message):
    from cifarx.training.run import train

    values = dict(model=f"timm/{TINY}", data=str(image_folder), epochs=3, batch_size=16, val_size=16,
                  out=str(tmp_path / "run"), progressive_sizes=[32, 40], model_kwargs={"img_size": 48, "freeze": 2})
    with pytest.raises(CifarxError, match=re.escape(message)) as error:
        train(make_train_config(**{**values, **settings}))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sizes, epochs", [([40, 32], 3), ([4], 3), ([32, 40], 2)])
def test_progressive_sizes_that_do_not_rise_or_outnumber_the_epochs_are_refused(sizes, epochs):
    with pytest.raises(CifarxError, match="must rise, each >= 8, with fewer sizes than --epochs"):
        make_train_config(model=f"timm/{TINY}", epochs=epochs, progressive_sizes=sizes)
