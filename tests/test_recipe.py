"""Each recipe feature of the training loop, tested against its definition."""

import pytest
import torch
import torch.nn.functional as F

from cifarx.config import TrainConfig
from cifarx.models.common import TestTimeAugmentation
from cifarx.objectives import make_objective
from cifarx.optimiser import build_optimizer, parameter_groups
from cifarx.registry import create_model


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
    from cifarx.checkpoint import read_checkpoint
    from cifarx.config import make_train_config
    from cifarx.train import train

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


def test_export_folds_tta_into_the_graph(trained_run, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from cifarx.checkpoint import load_model
    from cifarx.export import export_onnx

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
    from cifarx.optimiser import Lookahead

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

    from cifarx.checkpoint import read_checkpoint
    from cifarx.config import make_train_config
    from cifarx.errors import TrainingInterrupted
    from cifarx.runfolder import SilentReporter
    from cifarx.train import train

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
