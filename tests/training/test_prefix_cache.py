"""Partial fine-tuning on cached prefix activations (`--freeze N --cached-features`): tiny timm model, synthetic images."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from tests.conftest import ProgressRecorder, assert_one_line_error, run
from cifarx.training import prefix_cache
from cifarx.training.checkpoint import load_model
from cifarx.training.config import make_train_config
from cifarx.data.datasets import to_float
from cifarx.errors import CifarxError
from cifarx.models.transfer import TimmClassifier, create_timm_classifier
from cifarx.training.prefix_cache import FromPrefix, PrefixInputs, compute_prefix

TINY = "test_efficientnet"  # timm's own test network: 6 stages (stem + 5 block stages)


@pytest.fixture
def tiny_weights(tmp_path):
    """A local state dict of the tiny model with non-trivial BatchNorm statistics (eval mode then differs from train)."""
    torch.manual_seed(123)
    backbone = timm.create_model(TINY)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tiny.pth"
    torch.save(backbone.state_dict(), path)
    return path


def train_args(image_folder, out, *extra):
    return ["train", "--model", f"timm/{TINY}", "--data", image_folder, "--epochs", "2", "--batch-size", "16",
            "--val-size", "16", "--img-size", "48", "--lr", "3e-3", "--out", out, "--cached-features", *extra]


# Tolerances of the cached path against the whole model (max |logit difference|, logits of size ~1):
# float32 cache 1e-5 (the same operations, only batched apart); float16 cache 2e-2 (activations rounded to 11 bits).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("freeze", [1, 3])
def test_cached_prefix_gives_the_whole_models_logits_for_plain_and_flipped_images(tiny_weights, freeze, dtype,
                                                                                 tolerance):
    model = create_timm_classifier(TINY, num_classes=4, img_size=48, freeze=freeze, weights=str(tiny_weights))
    torch.nn.init.normal_(model.get_classifier().weight)  # a zero head would make every logit equal
    images = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    cached = compute_prefix(model, images, torch.device("cpu"), dtype, flip=True)
    assert cached.dtype == dtype and cached.shape[:2] == (10, 2) and model.prefix_depth == 7 - freeze
    model.train()  # what the loop does: the frozen prefix stays in eval mode, and the cache was computed so
    with torch.no_grad():
        for copy, pixels in enumerate((to_float(images), to_float(images).flip(3))):
            whole = model.eval()(pixels)
            from_cache = FromPrefix(model).eval()(cached[:, copy])
            assert (from_cache - whole).abs().max().item() < tolerance
            assert whole.std() > 0.1  # logits that differ, so the comparison means something


def test_prefix_run_trains_only_the_trailing_stages_without_running_the_whole_model_and_exports_with_parity(
        image_folder, tmp_path, tiny_weights, monkeypatch):
    from cifarx.training.batches import split_train_val
    from cifarx.training.loop import evaluate

    whole_model_calls = []
    forward = TimmClassifier.forward
    monkeypatch.setattr(TimmClassifier, "forward", lambda self, x: whole_model_calls.append(len(x)) or forward(self, x))
    out = tmp_path / "run"
    result = run(*train_args(image_folder, out, "--freeze", "2", "--weights", tiny_weights, "--ema-decay", "0.5",
                             "--label-smoothing", "0.1", "--set", "cache_dtype=float32"))
    assert result.exit_code == 0, result.output
    assert "KiB per image" in result.output
    # 2 epochs of 5 steps: had the loop run the whole model, it would have been called 10 times on 16 images
    assert 16 not in whole_model_calls
    monkeypatch.setattr(TimmClassifier, "forward", forward)

    model, payload = load_model(out / "best.pt")
    assert payload["model"]["kwargs"]["freeze"] == 2
    stored = torch.load(tiny_weights, weights_only=True)
    state = model.backbone.state_dict()
    prefix = ("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2.")  # stages 4 and 5 (blocks.4 + head) train
    for key, value in stored.items():
        if key.startswith(prefix):
            assert torch.equal(state[key], value), key
    for key in ("blocks.3.0.conv_pw.weight", "conv_head.weight"):  # the last two stages trained
        assert not torch.equal(state[key], stored[key]), key
    # Validation on cached activations is the whole model's validation (float32 cache).
    summary = json.loads((out / "summary.json").read_text())
    channels, height, width = summary["prefix_shape"]
    assert summary["prefix_bytes_per_image"] == 2 * 4 * channels * height * width  # plain + flip, float32
    assert summary["prefix_translate_cells"] == 1  # the default augmentations hold crop
    config = make_train_config(data=str(image_folder), val_size=16)
    _, val_set = split_train_val(config)
    assert evaluate(model, val_set, 8, torch.device("cpu"))["accuracy"] == pytest.approx(summary["best_val_accuracy"])

    exported = run("export", out, "--output", tmp_path / "model.onnx", "--parity-images", "16")
    assert exported.exit_code == 0, exported.output
    assert "top-1 agreement 100.00%" in exported.output


def test_each_epoch_draws_plain_or_flipped_copies_per_sample_deterministically():
    n = 64
    codes = torch.arange(n, dtype=torch.float16)
    train = torch.stack([codes, -codes - 1], 1).reshape(n, 2, 1, 1, 1)  # plain i, flipped -(i+1)
    inputs = PrefixInputs(train, torch.zeros(n, dtype=torch.long), None, 0.0, False)
    config = make_train_config(batch_size=16, seed=0)

    def epoch(number):
        return torch.cat([x.flatten() for x, _ in inputs.training_batches(config, number, torch.device("cpu"))])

    first = epoch(0)
    assert len(first) == n and first.dtype == torch.float32
    samples = torch.where(first >= 0, first, -first - 1)
    assert sorted(samples.tolist()) == list(range(n))  # every sample once an epoch
    flipped = (first < 0).float().mean().item()
    assert 0.25 < flipped < 0.75  # about half of the samples come as their flip
    assert torch.equal(epoch(0), first) and not torch.equal(epoch(1), first)  # seeded by (seed, epoch)


def test_crop_translates_cached_activations_by_whole_cells_per_sample_and_epoch():
    n, side = 256, 10
    rows = torch.arange(side, dtype=torch.float16)[:, None].expand(side, side)
    cols = torch.arange(side, dtype=torch.float16)[None, :].expand(side, side)
    grid = torch.stack([rows, cols])  # each cell holds its own coordinates
    train = grid.expand(n, 1, 2, side, side).clone()
    inputs = PrefixInputs(train, torch.zeros(n, dtype=torch.long), None, 0.0, False,
                          translate_cells=prefix_cache.translation_cells(make_train_config(crop_padding=4), side))
    assert inputs.translate_cells == 1  # 4 pixels of 32 are 1.25 cells of 10
    config = make_train_config(batch_size=64, seed=0)

    def epoch(number):
        return torch.cat([x for x, _ in inputs.training_batches(config, number, torch.device("cpu"))])

    first = epoch(0)
    # The centre cell of a translated map holds the coordinates of the cell it came from: shifted by -1, 0 or +1
    shifts = first[:, :, side // 2, side // 2] - side // 2
    assert set(shifts.flatten().tolist()) == {-1.0, 0.0, 1.0}
    assert len({tuple(s) for s in shifts.tolist()}) == 9  # every (dy, dx) drawn, per sample
    assert torch.equal(epoch(0), first) and not torch.equal(epoch(1), first)  # seeded by (seed, epoch)
    no_crop = make_train_config(augment=["flip"])
    assert prefix_cache.translation_cells(no_crop, side) == 0


def test_cutout_zeroes_one_square_of_cells_per_sample_and_leaves_the_translation_draws_alone():
    n, side = 128, 10
    train = torch.ones(n, 1, 3, side, side, dtype=torch.float16)
    labels = torch.zeros(n, dtype=torch.long)
    cutout = make_train_config(augment=["flip", "cutout"], cutout_size=12, batch_size=32)
    cells = prefix_cache.cutout_square(cutout, side)
    assert cells == 4  # 12 pixels of 32 are 3.75 cells of 10
    batches = torch.cat([x for x, _ in PrefixInputs(train, labels, None, 0.0, False, cutout_cells=cells)
                         .training_batches(cutout, 0, torch.device("cpu"))])
    zeroed = batches[:, 0] == 0  # [B,H,W]: the hole, the same in every channel
    assert torch.equal(zeroed, (batches == 0).all(1))
    rows, cols = zeroed.any(2), zeroed.any(1)
    # one square per sample, clipped at the borders: never wider than 4 cells, full 4x4 when it lies inside
    assert (rows.sum(1) <= cells).all() and (cols.sum(1) <= cells).all() and zeroed.any((1, 2)).all()
    assert torch.equal(zeroed.sum((1, 2)), rows.sum(1) * cols.sum(1)) and (zeroed.sum((1, 2)) == 16).any()
    assert len({tuple(map(tuple, z.nonzero()[0:1].tolist())) for z in zeroed}) > 10  # placed per sample
    # crop's translation draws do not depend on cutout (a stream each)
    grid = torch.arange(side * side, dtype=torch.float16).reshape(1, 1, 1, side, side).expand(n, 1, 1, side, side)
    crop, both = make_train_config(augment=["crop", "flip"], batch_size=32), make_train_config(
        augment=["crop", "flip", "cutout"], batch_size=32)
    shifted = [torch.cat([x for x, _ in PrefixInputs(grid.clone(), labels, None, 0.0, False, translate_cells=1,
                                                     cutout_cells=prefix_cache.cutout_square(c, side))
                          .training_batches(c, 0, torch.device("cpu"))]) for c in (crop, both)]
    kept = shifted[1] != 0
    assert torch.equal(shifted[0][kept], shifted[1][kept]) and (~kept).any()
    assert prefix_cache.cutout_square(make_train_config(augment=["flip"]), side) == 0


@pytest.mark.parametrize("augmentation", ["rotate", "alternating-flip", "erasing"])
def test_augmentations_that_cannot_act_on_cached_activations_are_refused_in_one_line(image_folder, tmp_path,
                                                                                     augmentation):
    out = tmp_path / "run"
    assert_one_line_error(run(*train_args(image_folder, out, "--freeze", "1", "--augment", f"crop,{augmentation}")),
                          "augments the cached activations with crop, flip, cutout only", augmentation)
    assert not out.exists()


def test_a_cache_that_would_not_fit_is_refused_in_one_line_before_anything_is_written(image_folder, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(prefix_cache, "available_memory", lambda: 1 << 14)  # 16 KiB
    out = tmp_path / "run"
    assert_one_line_error(run(*train_args(image_folder, out, "--freeze", "1")),
                          "would not fit in memory", "KiB per image", "GiB for 80 + 16 images")
    assert not out.exists()
    monkeypatch.undo()
    assert_one_line_error(run(*train_args(image_folder, out, "--freeze", "none")), "frozen backbone prefix")
    assert_one_line_error(run(*train_args(image_folder, out, "--model", "timm/resnet10t", "--freeze", "1")),
                          "EfficientNet family")
    assert not out.exists()


def test_prefix_run_resumes_to_the_uninterrupted_result(image_folder, tmp_path, tiny_weights):
    from cifarx.training.run import train

    def config(name, epochs):
        return make_train_config(model=f"timm/{TINY}", data=str(image_folder), epochs=epochs, batch_size=16,
                                 val_size=16, lr=3e-3, ema_decay=0.5, cached_features=True, out=str(tmp_path / name),
                                 model_kwargs={"img_size": 48, "freeze": 2, "weights": str(tiny_weights)})

    computing, loading = ProgressRecorder(), ProgressRecorder()
    reference = train(config("ref", 2), reporter=computing)
    train(config("cut", 1))
    resumed = train(resume=tmp_path / "cut", resume_options={"epochs": 2}, reporter=loading)
    assert not reference["prefix_from_cache"] and resumed["prefix_from_cache"]  # computed once, then read from disk
    # The pass that computes reports its progress batch by batch (64 images a batch) up to each split's size; a
    # pass read from disk reports none.
    assert computing.calls == [("prefix activations of 80 images", 64, 80), ("prefix activations of 80 images", 80, 80),
                               ("prefix activations of 16 images", 16, 16)]
    assert loading.calls == []
    assert resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    ref_state = load_model(tmp_path / "ref" / "last.pt")[0].state_dict()
    for key, value in load_model(tmp_path / "cut" / "last.pt")[0].state_dict().items():
        assert torch.equal(value, ref_state[key]), key


def test_unknown_cache_dtype_is_refused():
    with pytest.raises(CifarxError, match="cache_dtype"):
        make_train_config(cache_dtype="int8").validate()
