import platform

import pytest
import torch

from tests.conftest import AtStep, InterruptAt, assert_same_weights, final_weights
from cifarx.training.batches import hardest, remembered_pick
from cifarx.training.checkpoint import read_checkpoint
from cifarx.training.config import TrainConfig, make_train_config
from cifarx.errors import CifarxError, TrainingInterrupted
from cifarx.training.optimiser import lr_factor
from cifarx.training.run import train


def tiny_config(folder, out, **overrides):
    values = dict(model="simple-cnn", data=str(folder), epochs=3, batch_size=16, val_size=16, out=str(out), lr=3e-3,
                  augment=["crop", "flip", "cutout"], cutout_size=8)
    values.update(overrides)
    return make_train_config(**values)


def test_run_folder_has_config_metrics_curves_and_checkpoints(trained_run):
    run = trained_run["run"]
    for name in ("config.json", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy") and len(lines) == 3
    best = read_checkpoint(run / "best.pt")
    assert best["model"]["name"] == "simple-cnn" and best["class_names"][0] == "airplane"
    assert best["train_state"] is None  # best.pt is for inference: small, no optimiser state


def test_same_seed_same_metrics_bit_for_bit(image_folder, tmp_path):
    first = train(tiny_config(image_folder, tmp_path / "a", epochs=2))
    second = train(tiny_config(image_folder, tmp_path / "b", epochs=2))
    assert (tmp_path / "a" / "metrics.csv").read_text().split("\n")[1].split(",")[:5] == \
        (tmp_path / "b" / "metrics.csv").read_text().split("\n")[1].split(",")[:5]
    assert first["final_val_accuracy"] == second["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


@pytest.mark.parametrize("interrupt_after", [5, 10])  # mid-epoch, and at an epoch's last step (5 steps an epoch)
def test_ctrl_c_checkpoints_and_resume_ends_like_an_uninterrupted_run(image_folder, tmp_path, interrupt_after):
    reference = train(tiny_config(image_folder, tmp_path / "ref", ema_decay=0.9))
    config = tiny_config(image_folder, tmp_path / "cut", ema_decay=0.9)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(config, reporter=InterruptAt(interrupt_after))
    resumed = train(resume=tmp_path / "cut")
    assert resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))
    assert (tmp_path / "cut" / "metrics.csv").read_text().splitlines()[1:] != []


class CrashAt(AtStep):
    """Dies without any cleanup after `steps` steps: what is on disk then is what kill -9 would leave."""

    def act(self):
        raise SystemError("simulated crash")


def test_resume_after_a_crash_mid_epoch_ends_like_an_uninterrupted_run(image_folder, tmp_path):
    reference = train(tiny_config(image_folder, tmp_path / "ref"))
    with pytest.raises(SystemError):
        train(tiny_config(image_folder, tmp_path / "cut"), reporter=CrashAt(12))  # during epoch 3
    resumed = train(resume=tmp_path / "cut")
    assert resumed["epochs_run"] == 3 and resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))


def test_early_stopping_stops(image_folder, tmp_path):
    summary = train(tiny_config(image_folder, tmp_path / "run", epochs=30, lr=1e-9, patience=2))
    assert summary["epochs_run"] < 30


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("optimizer", "sgdx"),
                                         ("augment", ["flip", "alternating-flip"]), ("muon_momentum", 1.0),
                                         ("muon_lr", float("nan")), ("whiten_bias_epochs", -1),
                                         ("hard_fraction", 0.0), ("hard_fraction", 1.5), ("hard_selection", "oracle")])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(CifarxError):
        make_train_config(**{field: value})


def test_lr_schedules_warm_up_then_decay():
    config = TrainConfig(schedule="onecycle", warmup_epochs=1, epochs=4)
    factors = [lr_factor(step, 40, 10, config) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] < 0.05 and all(a >= b for a, b in zip(factors[9:], factors[10:]))
    multistep = TrainConfig(schedule="multistep", milestones=[2, 3], gamma=0.5)
    assert [lr_factor(s, 40, 10, multistep) for s in (0, 19, 20, 30)] == [1.0, 1.0, 0.5, 0.25]
    cosine = TrainConfig(schedule="cosine", final_lr_fraction=0.1)
    assert lr_factor(0, 40, 10, cosine) == pytest.approx(1.0) and lr_factor(40, 40, 10, cosine) == pytest.approx(0.1)


FAULTS_PER_REALLOCATION = """
import resource, sys, torch
import cifarx.training.loop  # what a `cifarx train` process has loaded when the CLI sets the switch
from cifarx.process import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
blocks = [torch.ones(64 << 18) for _ in range(2)]  # 64 MB each, like a step's activations
del blocks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block = torch.ones(64 << 18)
    del block
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_training_memory_is_reused_without_page_faults():
    import subprocess
    import sys
    # a subprocess each: the setting is process-wide and cannot be undone

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1])

    took, kept = faults("keep")
    _, default = faults("default")
    assert took
    assert default > 20_000  # glibc's default: each 64 MB block is a fresh mmap, 16k pages faulted in again
    assert kept < default / 20


def test_ema_warmup_makes_a_short_run_judged_on_recent_weights_not_the_initial_ones(image_folder, tmp_path):
    """EMA decay 0.999 over a dozen steps keeps ~99% of the random init; with ema_warmup the decay starts near 0."""
    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.config import make_train_config
    from cifarx.training.run import train

    distances = {}
    for warmup in (False, True):
        out = tmp_path / f"warmup-{warmup}"
        train(make_train_config(model="simple-cnn", data=str(image_folder), epochs=2, batch_size=16, val_size=16,
                                lr=3e-3, ema_decay=0.999, ema_warmup=warmup, out=str(out)))
        last = read_checkpoint(out / "last.pt")
        trained, averaged = last["train_state"]["model"], last["state_dict"]
        distances[warmup] = sum((trained[k].float() - averaged[k].float()).norm() for k in trained
                                if trained[k].is_floating_point())
    assert distances[True] < distances[False] / 2


def test_alternating_flip_run_resumes_with_the_same_flips(image_folder, tmp_path):
    config = dict(augment=["crop", "alternating-flip"])
    reference = train(tiny_config(image_folder, tmp_path / "ref", **config))
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(image_folder, tmp_path / "cut", **config), reporter=InterruptAt(7))  # epoch 2: the flipped one
    resumed = train(resume=tmp_path / "cut")
    assert resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_bfloat16_precision_autocasts_the_training_steps_forward_pass_and_nothing_else(image_folder, tmp_path, precision):
    conv_outputs = {True: set(), False: set()}  # grad enabled (training step) / disabled (validation)

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            conv_outputs[torch.is_grad_enabled()].add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = train(tiny_config(image_folder, tmp_path / "run", epochs=1, precision=precision))
    finally:
        handle.remove()
    assert conv_outputs == {True: {getattr(torch, precision)}, False: {torch.float32}}
    assert summary["training_precision"] == precision
    assert all(w.dtype == torch.float32 for w in final_weights(tmp_path / "run").values() if w.is_floating_point())


def test_hardest_keeps_the_highest_loss_images_scored_without_gradients_or_batchnorm_updates():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 3)).train()
    images, labels = torch.randn(10, 3, 2, 2), torch.randint(3, (10,))
    running_mean = model[2].running_mean.clone()
    kept_images, kept_labels = hardest(model, images, labels, 4, torch.float32)
    assert model.training and torch.equal(model[2].running_mean, running_mean)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(images), labels, reduction="none")
        kept_losses = torch.nn.functional.cross_entropy(model(kept_images), kept_labels, reduction="none")
    assert torch.equal(kept_losses.sort().values, losses.topk(4).values.sort().values)


def test_hard_fraction_steps_on_batch_size_images_picked_from_a_pool_of_batch_size_over_fraction(
        image_folder, tmp_path, monkeypatch):
    import cifarx.training.loop as loop

    pools = []

    def recording(model, images, labels, keep, forward_dtype):
        pools.append((len(images), keep))
        return hardest(model, images, labels, keep, forward_dtype)

    monkeypatch.setattr(loop, "hardest", recording)
    summary = train(tiny_config(image_folder, tmp_path / "run", epochs=2, hard_fraction=0.5))
    steps = read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["run"]["global_step"]
    assert steps == 2 * (summary["train_images"] // 32)  # half the steps of batch 16: each draws 32 images
    assert pools == [(32, 16)] * steps
    with pytest.raises(CifarxError, match="ranks labelled images by cross-entropy: objective fixmatch"):
        make_train_config(hard_fraction=0.5, objective="fixmatch")
    with pytest.raises(CifarxError, match="the linear probe .* fits its head without that loop"):
        make_train_config(model="timm/resnet10t", model_kwargs={"freeze": "all"}, cached_features=True, hard_fraction=0.5)
    with pytest.raises(CifarxError, match="remembered picks an epoch's images by their loss; labelled_fraction"):
        make_train_config(hard_fraction=0.5, hard_selection="remembered", labelled_fraction=0.5)


def test_remembered_pick_takes_the_highest_remembered_losses_and_breaks_ties_at_random():
    config = make_train_config(hard_fraction=0.25, hard_selection="remembered", seed=3)
    losses = torch.tensor([0.1, 2.0, 0.3, 5.0, 0.2, 0.4, 1.0, 0.0])
    assert sorted(remembered_pick(losses, config, epoch=0).tolist()) == [1, 3]
    never_trained = torch.full((1000,), float("inf"))
    firsts = [remembered_pick(never_trained, config, epoch) for epoch in (0, 1)]
    assert all(len(set(pick.tolist())) == 250 for pick in firsts)
    assert not torch.equal(firsts[0].sort().values, firsts[1].sort().values)  # not the lowest indices every time
    assert torch.equal(remembered_pick(never_trained, config, 0), firsts[0])  # fixed by (seed, epoch)


def test_remembered_selection_goes_round_every_image_then_trains_where_the_remembered_loss_is_highest(
        image_folder, tmp_path, monkeypatch):
    import cifarx.training.loop as loop

    picks = []

    def recording(losses, config, epoch):
        picked = remembered_pick(losses, config, epoch)
        picks.append((losses.clone(), picked))
        return picked

    monkeypatch.setattr(loop, "remembered_pick", recording)
    config = tiny_config(image_folder, tmp_path / "run", epochs=3, hard_fraction=0.5, hard_selection="remembered")
    summary = train(config)
    state = read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["run"]
    half = summary["train_images"] // 2
    assert state["global_step"] == 3 * (half // 16)  # half the images an epoch, nothing scored
    (first_losses, first), (second_losses, second), (third_losses, third) = picks
    assert first_losses.isinf().all() and len(first) == half
    trained = first[: half - half % 16]  # the whole batches of the pick trained, and only they got a loss
    assert second_losses[trained].isfinite().all() and (second_losses.isfinite().sum() == len(trained))
    assert second_losses[second].isinf().all()  # never-trained images come first
    assert torch.equal(third.sort().values, third_losses.topk(half).indices.sort().values)
    assert state["remembered_losses"].isfinite().sum() > len(trained)  # kept in last.pt for --resume


def test_remembered_selection_resumes_from_ctrl_c_like_an_uninterrupted_run(image_folder, tmp_path):
    settings = dict(epochs=3, hard_fraction=0.5, hard_selection="remembered")
    reference = train(tiny_config(image_folder, tmp_path / "ref", **settings))
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(image_folder, tmp_path / "cut", **settings), reporter=InterruptAt(3))  # mid epoch 2
    resumed = train(resume=tmp_path / "cut")
    assert resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))


def test_unknown_precision_is_one_clear_line(image_folder, tmp_path):
    with pytest.raises(CifarxError, match="unknown precision 'fp8'; choose from float32, bfloat16"):
        train(tiny_config(image_folder, tmp_path / "run", precision="fp8"))


def learned_weights(state_dict):
    """Parameters only: BatchNorm running statistics move in any training step, even at a negligible lr."""
    return {key: value for key, value in state_dict.items() if "running_" not in key and "num_batches" not in key}


def test_init_from_starts_a_new_run_from_the_checkpoints_weights(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path / "first", epochs=2))
    trained = learned_weights(read_checkpoint(tmp_path / "first" / "best.pt")["state_dict"])
    # an lr too small to move a float32 weight: the new run's weights are where it started
    for name, init_from in (("continued", str(tmp_path / "first")), ("fresh", None)):
        train(tiny_config(image_folder, tmp_path / name, epochs=1, lr=1e-20, init_from=init_from))
    continued = learned_weights(read_checkpoint(tmp_path / "continued" / "last.pt")["state_dict"])
    fresh = learned_weights(read_checkpoint(tmp_path / "fresh" / "last.pt")["state_dict"])
    assert all(torch.allclose(continued[key], trained[key], atol=1e-12) for key in trained)
    assert not all(torch.allclose(fresh[key], trained[key], atol=1e-3) for key in trained)


def test_init_from_refuses_another_network_or_other_classes_in_one_line(image_folder, tmp_path):
    from tests.conftest import make_image_folder

    train(tiny_config(image_folder, tmp_path / "first", epochs=1))
    with pytest.raises(CifarxError, match="holds a simple-cnn model; this run trains simple-cnn-plain"):
        train(tiny_config(image_folder, tmp_path / "plain", model="simple-cnn-plain", init_from=str(tmp_path / "first")))
    other = make_image_folder(tmp_path / "other", "train", classes=["cat", "dog", "frog", "ship"])
    with pytest.raises(CifarxError, match="trained on the classes airplane, automobile, bird, cat; this run's data"):
        train(tiny_config(other, tmp_path / "other-run", init_from=str(tmp_path / "first")))
    with pytest.raises(CifarxError, match="no checkpoint"):
        train(tiny_config(image_folder, tmp_path / "none", init_from=str(tmp_path)))
    with pytest.raises(CifarxError, match="the linear probe .* fits a new head without that loop"):
        make_train_config(model="timm/efficientnet_lite0", model_kwargs={"freeze": "all"}, cached_features=True,
                          init_from=str(tmp_path / "first"), data=str(image_folder))
    from cifarx.training.checkpoint import load_initial_weights
    from cifarx.models.registry import create_model

    # same shapes, another function: a timm backbone built without the weights package's padding and epsilon
    with pytest.raises(CifarxError, match="was built with timm_kwargs None, this run with .*the same --weights"):
        load_initial_weights(create_model("simple-cnn", num_classes=4), tmp_path / "first", "simple-cnn",
                             {"timm_kwargs": {"pad_type": "same"}}, ["airplane", "automobile", "bird", "cat"])
