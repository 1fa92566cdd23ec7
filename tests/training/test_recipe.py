"""Each recipe feature of the training loop, tested against its definition."""

import pytest
import torch
import torch.nn.functional as F

from cifarx.training.config import TrainConfig
from cifarx.models.common import TestTimeAugmentation
from cifarx.training.objectives import make_objective
from cifarx.training.optimiser import build_optimizer, parameter_groups
from cifarx.models.registry import create_model


def test_whitening_init_whitens_patches():
    torch.manual_seed(0)
    # Correlated channels and neighbouring pixels, like natural images.
    base = torch.rand(64, 1, 33, 33)
    images = (base[..., 1:, 1:] * 0.6 + base[..., :-1, :-1] * 0.4).expand(64, 3, 32, 32) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    images = (images + 0.05 * torch.rand(64, 3, 32, 32)).clamp(0, 1)
    model = create_model("fast")
    model.init_whitening(images, eps=0.0)
    out = model.whiten(model.normalize(images)) - model.whiten.bias.view(1, -1, 1, 1)
    half = out[:, : out.shape[1] // 2].permute(0, 2, 3, 1).reshape(-1, out.shape[1] // 2).double()
    covariance = half.T @ half / len(half)
    assert torch.allclose(covariance, torch.eye(len(covariance), dtype=torch.float64), atol=2e-2)
    assert not model.whiten.weight.requires_grad


def test_label_smoothing_matches_its_definition():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    smoothed = make_objective("supervised", label_smoothing=0.2)(lambda x: x, logits, labels)["loss"]
    target = torch.full((8, 10), 0.2 / 10).scatter_(1, labels[:, None], 1 - 0.2 + 0.2 / 10)
    assert smoothed.item() == pytest.approx(-(target * F.log_softmax(logits, 1)).sum(1).mean().item(), rel=1e-6)


def test_the_checkpoints_inference_weights_are_the_ema_not_the_trained_ones(image_folder, tmp_path):
    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.config import make_train_config
    from cifarx.training.run import train

    train(make_train_config(data=str(image_folder), epochs=1, batch_size=16, val_size=16, out=str(tmp_path / "run"),
                            lr=3e-3, ema_decay=0.5, ema_every=2))
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    ema, trained = last["train_state"]["ema"], last["train_state"]["model"]
    for key in ema:
        assert torch.equal(last["state_dict"][key], ema[key]), key  # what export and eval use
    assert any(not torch.equal(ema[key], trained[key]) for key in ema if ema[key].is_floating_point())


def test_norm_parameters_get_their_own_lr_and_decoupled_decay():
    model = create_model("fast")
    config = TrainConfig(model="fast", optimizer="sgd", lr=2.0, norm_lr_scale=64, weight_decay=0.002,
                         decoupled_weight_decay=True, nesterov=True)
    other, norm = parameter_groups(model, config)
    norm_params = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == norm_params
    assert norm["lr"] == 128.0 and other["lr"] == 2.0
    # lr x weight_decay = the decay per step, whatever the lr
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(0.002)
    assert other["lr"] * other["weight_decay"] == pytest.approx(0.002)
    optimizer = build_optimizer(model, config)
    assert optimizer.param_groups[0]["nesterov"] is True
    frozen = model.whiten.weight
    assert all(frozen is not p for g in optimizer.param_groups for p in g["params"])


def test_tta_averages_flipped_and_translated_views():
    model = create_model("fast").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        flip = TestTimeAugmentation(model, "flip")(x)
        assert torch.allclose(flip, (model(x) + model(x.flip(-1))) / 2, atol=1e-5)
        full = TestTimeAugmentation(model, "flip-translate")(x)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :32, :32], padded[..., 2:, 2:]]
        views = shifted + [s.flip(-1) for s in [F.pad(x.flip(-1), (1, 1, 1, 1), mode="reflect")[..., :32, :32],
                                                  F.pad(x.flip(-1), (1, 1, 1, 1), mode="reflect")[..., 2:, 2:]]]
        expected = (flip + sum(model(v if i < 2 else v.flip(-1)) for i, v in enumerate(views)) / 4) / 2
    assert torch.allclose(full, expected, atol=1e-5)


def test_evaluation_with_tta_also_gives_the_plain_accuracy_from_the_same_forward_passes():
    from cifarx.data.datasets import ImageSet
    from cifarx.training.loop import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()  # its mirror image differs
    image_set = ImageSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,)),
                         [str(i) for i in range(10)])
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    both = evaluate(model, image_set, 16, torch.device("cpu"), tta="flip")
    assert calls == [32, 32, 16]  # one pass per batch of 16 (the image and its flip), none without TTA
    x = image_set.images.float() / 255
    with torch.no_grad():
        plain, flipped = model(x), TestTimeAugmentation(model, "flip")(x)
    assert both["plain_accuracy"] == (plain.argmax(1) == image_set.labels).sum().item() / 40
    assert both["accuracy"] == (flipped.argmax(1) == image_set.labels).sum().item() / 40
    assert both["accuracy"] != both["plain_accuracy"]  # the two figures are not one number reported twice


def test_export_folds_tta_into_the_graph(trained_run, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from cifarx.training.checkpoint import load_model
    from cifarx.deploy.export import export_onnx

    report = export_onnx(trained_run["run"], tmp_path / "tta.onnx", tta="flip-translate", parity_count=8)
    assert report["top1_agreement"] == 1.0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "tta.onnx")).metadata_props}
    assert meta["tta"] == "flip-translate"
    model, _ = load_model(trained_run["run"])
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    with torch.no_grad():
        expected = TestTimeAugmentation(model, "flip-translate")(torch.from_numpy(x)).numpy()
        plain = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, plain, atol=1e-4)


def test_lookahead_pulls_weights_to_their_average_and_copies_it_back():
    from cifarx.training.optimiser import Lookahead

    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    moved = model.weight.detach().clone()
    lookahead.update(model, decay=0.75)
    expected = 0.75 * start + 0.25 * moved
    assert torch.allclose(lookahead.average["weight"], expected) and torch.allclose(model.weight, expected)
    lookahead.update(model, decay=1.0)  # the final copy: the network takes the average unchanged
    assert torch.allclose(model.weight, expected)


def test_lookahead_run_resumes_exactly(image_folder, tmp_path):
    import os
    import signal

    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.config import make_train_config
    from cifarx.errors import TrainingInterrupted
    from cifarx.training.runfolder import SilentReporter
    from cifarx.training.run import train

    class InterruptAt(SilentReporter):
        def __init__(self):
            self.steps = 0

        def advance(self, loss):
            self.steps += 1
            if self.steps == 7:
                os.kill(os.getpid(), signal.SIGINT)

    def config(out):
        return make_train_config(model="fast", data=str(image_folder), epochs=2, batch_size=16, val_size=16,
                                 out=str(out), optimizer="sgd", lr=0.05, lookahead_every=2)

    train(config(tmp_path / "ref"))
    with pytest.raises(TrainingInterrupted):
        train(config(tmp_path / "cut"), reporter=InterruptAt())
    train(resume=tmp_path / "cut")
    a = read_checkpoint(tmp_path / "ref" / "last.pt")["train_state"]
    b = read_checkpoint(tmp_path / "cut" / "last.pt")["train_state"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert all(torch.equal(a["lookahead"][k], b["lookahead"][k]) for k in a["lookahead"])


def test_muon_steps_the_conv_filters_and_the_other_optimiser_the_rest():
    import copy

    from cifarx.training.optimiser import MuonForFilters, lr_factor

    torch.manual_seed(0)
    model = create_model("fast").to(memory_format=torch.channels_last)  # as the loop trains it: no flat view exists
    plain = copy.deepcopy(model)
    config = TrainConfig(model="fast", optimizer="sgd", lr=0.1, momentum=0.85, nesterov=True, norm_lr_scale=4.0,
                         weight_decay=0.01, muon=True, muon_lr=0.2, muon_momentum=0.6)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, MuonForFilters)
    filters = {name for name, p in model.named_parameters() if p.ndim == 4 and p.requires_grad}
    assert len(filters) == 6 and "whiten.weight" not in filters  # the frozen whitening filters are not Muon's
    others = {id(p) for g in optimizer.others.param_groups for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in others} == \
        {n for n, p in model.named_parameters() if p.requires_grad} - filters

    images = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8) % 10
    for net in (model, plain):
        F.cross_entropy(net(images), labels).backward()
    # What Muon alone does to one filter bank, as a matrix [out, in*k*k] rescaled to norm sqrt(out) first
    weight, grad = model.body[1][4].weight.detach(), model.body[1][4].weight.grad
    matrix = weight.reshape(len(weight), -1).clone()
    matrix.mul_(len(matrix) ** 0.5 / matrix.norm())
    matrix.grad = grad.reshape(len(grad), -1).clone()
    torch.optim.Muon([matrix], lr=0.2, momentum=0.6, nesterov=True, weight_decay=0.0).step()
    # ...and what the configured SGD alone does to everything else
    reference = torch.optim.SGD(parameter_groups(plain, config, leave_out=[p for p in plain.parameters() if p.ndim == 4]),
                                lr=0.1, momentum=0.85, nesterov=True)
    optimizer.step()
    reference.step()
    assert torch.allclose(model.body[1][4].weight, matrix.view_as(weight), atol=1e-6)
    assert not torch.allclose(model.body[1][4].weight, plain.body[1][4].weight)  # SGD would have stepped it elsewhere
    stepped, unstepped = dict(model.named_parameters()), dict(plain.named_parameters())
    for name in stepped.keys() - filters:
        assert torch.equal(stepped[name], unstepped[name]), name  # stepped by SGD, untouched by Muon
    assert torch.equal(model.whiten.weight, plain.whiten.weight)

    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    # One schedule for both: every group's lr, Muon's too, is its peak lr x the step's factor.
    from cifarx.training.optimiser import build_scheduler

    config.schedule, config.warmup_epochs, config.epochs = "linear", 1, 2
    scheduler = build_scheduler(optimizer, 10, config)
    for _ in range(3):
        optimizer.step()  # no gradients: moves nothing
        scheduler.step()
    factor = lr_factor(3, 20, 10, config)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.2 * factor)
    assert [g["lr"] for g in optimizer.others.param_groups] == pytest.approx([0.1 * factor, 0.4 * factor])


def _train_until_interrupted(config, steps: int) -> None:
    """Train `config` and interrupt it after `steps` steps as a user's Ctrl-C does (the loop sees it a step later)."""
    import os
    import signal

    from cifarx.errors import TrainingInterrupted
    from cifarx.training.runfolder import SilentReporter
    from cifarx.training.run import train

    class InterruptAt(SilentReporter):
        def __init__(self):
            self.steps = 0

        def advance(self, loss):
            self.steps += 1
            if self.steps == steps:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(config, reporter=InterruptAt())


def test_muon_run_resumes_exactly(image_folder, tmp_path):
    from cifarx.training.config import make_train_config

    def config(name):
        return make_train_config(model="fast", data=str(image_folder), epochs=2, batch_size=16, val_size=16,
                                 out=str(tmp_path / name), optimizer="sgd", lr=0.05, lookahead_every=2,
                                 schedule="linear", warmup_epochs=0.5, muon=True)

    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.run import train

    train(config("ref"))
    _train_until_interrupted(config("cut"), steps=7)  # mid-way through epoch 2 of 5 steps each
    train(resume=tmp_path / "cut")
    a, b = (read_checkpoint(tmp_path / name / "last.pt")["train_state"] for name in ("ref", "cut"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    muon_a, muon_b = a["optimizer"]["muon"], b["optimizer"]["muon"]
    assert len(muon_a["state"]) == 6  # a momentum buffer per filter bank, saved and restored
    for index, state in muon_a["state"].items():
        assert torch.equal(state["momentum_buffer"], muon_b["state"][index]["momentum_buffer"])
    assert muon_a["param_groups"][0]["lr"] == muon_b["param_groups"][0]["lr"]


def test_whitening_bias_trains_for_its_epochs_then_stays_and_bn_scales_never_move(image_folder, tmp_path):
    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.config import make_train_config
    from cifarx.training.run import train

    out = tmp_path / "run"
    # Lookahead on (every 2 of the 5 steps an epoch): its average would otherwise pull the frozen bias once more.
    _train_until_interrupted(make_train_config(model="fast", data=str(image_folder), epochs=3, batch_size=16,
                                               val_size=16, out=str(out), optimizer="sgd", lr=0.05, lookahead_every=2,
                                               whiten_bias_epochs=1), steps=4)  # seen at step 5: epoch 1's last
    first = read_checkpoint(out / "last.pt")["train_state"]["model"]
    assert read_checkpoint(out / "last.pt")["train_state"]["run"]["global_step"] == 5
    assert first["whiten.bias"].abs().sum() > 0  # trained in epoch 1 (it starts at zero)
    train(resume=out)
    last = read_checkpoint(out / "last.pt")["train_state"]["model"]
    assert torch.equal(last["whiten.bias"], first["whiten.bias"])
    assert torch.equal(last["whiten.weight"], first["whiten.weight"])
    assert not torch.equal(last["head.weight"], first["head.weight"])  # the rest trained on
    scales = [key for key in last if key.endswith(".weight") and key.replace(".weight", ".running_mean") in last]
    assert len(scales) == 6
    for key in scales:
        assert torch.equal(last[key], torch.ones_like(last[key])), key  # BatchNorm scales: fixed at 1 all along
    model = create_model("fast")
    assert not any(model.get_parameter(key).requires_grad for key in scales)


def test_whiten_bias_epochs_needs_a_whitening_conv(image_folder, tmp_path):
    from cifarx.training.config import make_train_config
    from cifarx.errors import CifarxError
    from cifarx.training.run import train

    config = make_train_config(model="simple-cnn", data=str(image_folder), epochs=1, batch_size=16, val_size=16,
                               out=str(tmp_path / "run"), whiten_bias_epochs=2)
    with pytest.raises(CifarxError, match="whitening conv"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_alternating_flip_flips_each_image_every_other_epoch():
    from cifarx.training.batches import check_batches, training_batches
    from cifarx.data.datasets import ImageSet
    from cifarx.errors import CifarxError

    count = 32
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8)
    image_set = ImageSet(images, torch.arange(count), [str(i) for i in range(count)])  # label = the image's index
    config = TrainConfig(augment=["alternating-flip"], batch_size=8, seed=3)
    flipped = torch.zeros(4, count, dtype=torch.bool)
    for epoch in range(4):
        for batch, labels in training_batches(image_set, config, epoch, torch.device("cpu"), images):
            for image, label in zip(batch, labels):
                original = images[label].float() / 255
                assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
                flipped[epoch, label] = torch.equal(image, original.flip(-1))
    assert (flipped[1:] != flipped[:-1]).all()  # every image changes side every epoch
    assert 0 < flipped[0].sum() < count  # the first epoch's sides are a coin per image
    with pytest.raises(CifarxError, match="batch-wise"):  # torchvision's per-image path has no such flip
        check_batches(image_set, TrainConfig(augment=["alternating-flip", "rotate"], batch_size=8))
