"""Every registered model, tested for free: shape, backward, one optimiser step, ONNX export and ORT parity."""

import numpy as np
import pytest
import torch

from cifarx.training.checkpoint import save_checkpoint
from tests.conftest import REDUCED_WIDTH
from cifarx.errors import CifarxError
from cifarx.models.registry import create_model, list_models, register_model


def full_width(name):
    return pytest.param(name, {}, marks=pytest.mark.slow, id=f"{name}-full-width")


@pytest.mark.parametrize("name, kwargs", [(name, REDUCED_WIDTH.get(name, {})) for name in list_models()]
                         + [full_width(name) for name in REDUCED_WIDTH])
def test_registered_model_trains_exports_and_matches_onnx(name, kwargs, tmp_path, image_folder):
    import onnxruntime as ort

    from cifarx.deploy.export import export_onnx

    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **kwargs)
    images = torch.rand(4, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (4, 4)
    labels = torch.tensor([0, 1, 2, 3])
    if hasattr(model, "default_objective"):  # parts off the logits path (a VAE's decoder) learn from their own loss
        from cifarx.training.objectives import make_objective

        make_objective(model.default_objective)(model, images, labels)["loss"].backward()
    else:
        torch.nn.functional.cross_entropy(logits, labels).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    before = [p.detach().clone() for p in trainable]
    torch.optim.SGD(trainable, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))

    model.eval()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model_name=name, model_kwargs=kwargs, class_names=["airplane", "automobile", "bird", "cat"],
                    state_dict=model.state_dict(), config={"data": str(image_folder), "val_size": 8, "seed": 0},
                    metrics={"val_accuracy": 0.5})
    report = export_onnx(checkpoint, tmp_path / "model.onnx", parity_count=8)
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_delta"] < 1e-3
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    logits, probabilities = session.run(None, {"input": batch})
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("simple-cnn")(lambda num_classes=10: None)
    with pytest.raises(CifarxError, match="unknown model"):
        create_model("no-such-model")


def test_simple_cnn_matches_the_report():
    model = create_model("simple-cnn")
    assert sum(p.numel() for p in model.parameters()) == 308_394
    assert create_model("simple-cnn")(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_the_int8_variant_of_fast_puts_every_batchnorm_right_after_a_convolution():
    """What int8 runtimes need: each BatchNorm folds into the convolution before it, and ReLU (not GELU) fuses into
    the int8 kernel; the flagship's order (conv, max-pool, BatchNorm) cannot fold its first BatchNorm of a group."""
    import torch.nn as nn

    from cifarx.training.config import make_train_config

    def after_conv(model):
        layers = [layer for group in model.body if isinstance(group, nn.Sequential) for layer in group]
        return [isinstance(layers[i - 1], nn.Conv2d) for i, layer in enumerate(layers) if isinstance(layer, nn.BatchNorm2d)]

    config = make_train_config("fast-int8")
    variant = create_model("fast", **config.model_kwargs)
    assert all(after_conv(variant)) and not any(isinstance(m, nn.GELU) for m in variant.modules())
    assert not all(after_conv(create_model("fast")))
