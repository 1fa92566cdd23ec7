"""What is particular to the report families (shape/export/parity of every model is in test_models.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.errors import CifarxError
from cifarx.models.blocknet import Block
from cifarx.models.shake_shake import ShakeShake, shake_shake
from cifarx.models.registry import create_model


def test_block_equals_k_separate_convolutions_mixed_by_predicted_weights():
    torch.manual_seed(0)
    block = Block(8, 16, num_convs=3).eval()
    with torch.no_grad():
        block.conv_biases.normal_()
    x = torch.randn(5, 8, 12, 12)
    weights = block.mixing(x)
    assert weights.shape == (5, 3) and torch.allclose(weights.sum(1), torch.ones(5))  # softmax over K, per image
    kernels, biases = block.convs.weight.split(8, dim=1), block.conv_biases.view(3, 16)
    mixed = sum(weights[:, k, None, None, None] * F.conv2d(x, kernels[k], biases[k], padding=1) for k in range(3))
    expected = block.post(mixed + block.residual(x))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_blocknet_builder_arguments_shape_the_backbone():
    small = create_model("blocknet", blocks=2, channels=64, num_convs=2, dropout=0.0)
    blocks = [m for m in small.modules() if isinstance(m, Block)]
    assert [b.c_out for b in blocks] == [64, 64] and all(b.num_convs == 2 for b in blocks)
    assert isinstance(blocks[0].residual, nn.Sequential) and isinstance(blocks[1].residual, nn.Identity)
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.modules()) == 1  # between blocks only
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    default = create_model("blocknet")
    assert [b.c_out for b in default.modules() if isinstance(b, Block)] == [128] * 4
    widths = create_model("blocknet", channels=[32, 64, 96])
    assert [b.c_out for b in widths.modules() if isinstance(b, Block)] == [32, 64, 96]
    with pytest.raises(CifarxError, match="weight_activation"):
        create_model("blocknet", weight_activation="tanh")


def test_vgg16_bn_has_thirteen_conv_bn_layers_and_a_dense_head():
    model = create_model("vgg16-bn")
    layers = list(model.modules())
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 13
    assert [m.out_features for m in layers if isinstance(m, nn.Linear)] == [10]
    assert 14.5e6 < sum(p.numel() for p in model.parameters()) < 15e6


def test_shake_shake_is_stochastic_in_training_and_deterministic_in_evaluation():
    model = create_model("shake-shake-26-2x64d", width=8)
    x = torch.rand(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_shake_shake_evaluates_at_the_expectation():
    x1, x2 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(shake_shake(x1, x2, training=False), (x1 + x2) / 2)


def test_shake_function_mixes_gradients_with_beta_not_alpha():
    x1, x2 = torch.randn(3, 2, 4, 4, requires_grad=True), torch.randn(3, 2, 4, 4, requires_grad=True)
    alpha, beta = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1), torch.tensor([0.7, 0.2, 0.4]).view(3, 1, 1, 1)
    out = ShakeShake.apply(x1, x2, alpha, beta)
    torch.testing.assert_close(out, alpha * x1 + (1 - alpha) * x2)  # forward: alpha
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(x1.grad, beta * upstream)  # backward: beta, not alpha
    torch.testing.assert_close(x2.grad, (1 - beta) * upstream)


def test_training_draws_forward_and_backward_coefficients_independently_per_image():
    torch.manual_seed(0)
    x1 = torch.ones(64, 1, 1, 1, requires_grad=True)
    out = shake_shake(x1, torch.zeros(64, 1, 1, 1), training=True)  # = alpha per image
    out.sum().backward()  # x1.grad = beta per image
    alpha, beta = out.detach().flatten(), x1.grad.flatten()
    assert alpha.std() > 0.1 and beta.std() > 0.1  # one coefficient per image, not per batch
    assert not torch.allclose(alpha, beta)
    assert abs(torch.corrcoef(torch.stack([alpha, beta]))[0, 1]) < 0.5
