"""Semi-supervised VAE (vae-ssl, objectives vae-m1 / vae-m2): data split, label hiding, ELBO, marginalisation, figures,
CLI, export and eval. Synthetic images only."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cifarx.data import datasets as datamod
from cifarx.training.batches import split_train_val
from cifarx.cli.main import cli
from cifarx.training.config import make_train_config
from cifarx.errors import CifarxError
from cifarx.training.objectives import make_objective
from cifarx.models.registry import create_model
from cifarx.training.run import train
from tests.conftest import assert_one_line_error


def synthetic_set(per_class=(30, 20, 40), seed=0) -> datamod.ImageSet:
    """Images whose first pixel holds their own index, so a subset can be traced back to its source."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    images = torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return datamod.ImageSet(images, labels, [f"c{i}" for i in range(len(per_class))])


def ssl_config(folder, out, method="m2", **overrides):
    values = dict(data=str(folder), val_size=16, labelled_per_class=4, unlabelled="all", epochs=4, batch_size=16,
                  lr=3e-3, schedule="constant", warmup_epochs=0, out=str(out))
    values.update(overrides)
    return make_train_config(f"vae-ssl-{method}", **values)


# ---------------------------------------------------------------------------------------------- data


def test_labelled_subset_is_stratified_and_fixed_by_the_seed():
    full = synthetic_set()
    first = datamod.semi_supervised_subset(full, 18, 40, seed=3)
    again = datamod.semi_supervised_subset(full, 18, 40, seed=3)
    other = datamod.semi_supervised_subset(full, 18, 40, seed=4)
    labelled = first.labels >= 0
    assert torch.bincount(first.labels[labelled]).tolist() == [6, 4, 8]  # in proportion to 30/20/40
    assert (first.labels[~labelled] == datamod.UNLABELLED).sum() == 40
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images[labelled], other.images[labelled])
    source = first.images[:, 0, 0, 0].long()
    assert len(set(source.tolist())) == 58  # labelled and unlabelled images never overlap
    assert torch.equal(full.labels[source[labelled]], first.labels[labelled])  # the kept labels are the true ones

    per_class = datamod.semi_supervised_subset(full, None, "all", seed=3, labelled_per_class=5)
    assert torch.bincount(per_class.labels[per_class.labels >= 0]).tolist() == [5, 5, 5]
    assert len(per_class) == len(full)  # 'all': every other image, unlabelled
    with pytest.raises(CifarxError, match="labelled-per-class"):
        datamod.semi_supervised_subset(full, None, 0, seed=3, labelled_per_class=21)  # the smallest class has 20
    with pytest.raises(CifarxError, match="--unlabelled"):
        datamod.semi_supervised_subset(full, 18, 73, seed=3)


def test_mixed_batches_hold_a_fixed_labelled_share_and_oversample_evenly():
    labels = torch.cat([torch.arange(10) % 3, torch.full((90,), datamod.UNLABELLED)])
    batches = datamod.mixed_batches(labels, 20, 5, steps=8, generator=torch.Generator().manual_seed(0))
    assert batches.shape == (8, 20)
    assert ((labels[batches] >= 0).sum(1) == 5).all()
    assert torch.bincount(batches[:, :5].flatten(), minlength=10).tolist() == [4] * 10  # 40 draws over 10 images
    assert len(batches[:, 5:].unique()) == 90  # 120 draws cover all 90 unlabelled images


def test_the_unlabelled_stream_never_yields_labels(image_folder, tmp_path, monkeypatch):
    """Every image the objective sees with a label is one of the labelled subset; all others arrive as -1."""
    import cifarx.training.loop as trainmod

    seen = []

    def recording(name, **kwargs):
        objective = make_objective(name, **kwargs)

        def record(model, images, labels):
            seen.append((images.clone(), labels.clone()))
            return objective(model, images, labels)

        return record

    monkeypatch.setattr(trainmod, "make_objective", recording)
    config = ssl_config(image_folder, tmp_path / "run", epochs=2, augment=[])
    train_set, _ = split_train_val(config)
    labelled = train_set.labels >= 0
    assert labelled.sum() == 16 and (~labelled).sum() == 64
    train(config)
    images = torch.cat([i for i, _ in seen])
    labels = torch.cat([l for _, l in seen])
    assert all((l >= 0).sum() == 4 for _, l in seen)  # labelled_fraction 0.25 of 16
    pixels = datamod.to_float(train_set.images).flatten(1)
    match = (images.flatten(1)[:, None] == pixels[None]).all(2)  # [seen images, train images]
    assert (match.sum(1) == 1).all()  # unique synthetic images: each seen image is exactly one training image
    source = match.int().argmax(1)
    assert torch.equal(labels[labels >= 0], train_set.labels[source[labels >= 0]])
    assert not labelled[source[labels < 0]].any()  # an unlabelled slot never carries a labelled image's label


def test_semi_supervised_settings_are_checked():
    with pytest.raises(CifarxError, match="supervised objective cannot"):
        make_train_config(model="vae-ssl", labelled=100, unlabelled=10)
    with pytest.raises(CifarxError, match="needs a labelled subset"):
        make_train_config(model="vae-ssl", objective="vae-m2", unlabelled=10)
    with pytest.raises(CifarxError, match="unlabelled"):
        make_train_config("vae-ssl-m2", unlabelled="many")
    with pytest.raises(CifarxError, match="labelled_fraction"):
        make_train_config("vae-ssl-m2", labelled_fraction=1.0)
    assert make_train_config("vae-ssl-m2", labelled_per_class=5).labelled is None  # per class replaces the total
    with pytest.raises(CifarxError, match="conditional=false"):
        make_objective("vae-m1")(create_model("vae-ssl", conditional=True), torch.rand(2, 3, 32, 32), torch.tensor([0, -1]))


# ---------------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("conditional", [False, True])
def test_elbo_terms_are_finite_and_batch_shaped(conditional):
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4, conditional=conditional)
    images = torch.rand(6, 3, 32, 32)
    onehot = F.one_hot(torch.arange(6) % 4, 4).float() if conditional else None
    terms = model.negative_elbo(images, model.features(images), onehot)
    assert terms["reconstruction"].shape == terms["kl"].shape == (6,)
    assert terms["mean"].shape == (6, 256)
    assert torch.isfinite(terms["reconstruction"]).all() and (terms["kl"] >= 0).all()


def test_m2_marginalises_every_unlabelled_image_over_every_class(monkeypatch):
    """The tiled batch gives the same loss as decoding each (unlabelled image, class) pair on its own."""
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4).eval()  # eval: BatchNorm independent of how the batch is tiled
    monkeypatch.setattr(torch.distributions.Normal, "rsample", lambda self, shape=torch.Size(): self.loc)
    images = torch.rand(5, 3, 32, 32)
    labels = torch.tensor([2, -1, 0, -1, -1])
    out = make_objective("vae-m2", alpha=0.5)(model, images, labels)
    assert out["unlabelled_elbo"].shape == (3, 4) and out["logits"].shape == (5, 4)

    with torch.no_grad():
        features = model.features(images)

        def negative_elbo(index, label):
            onehot = F.one_hot(torch.tensor([label]), 4).float()
            terms = model.negative_elbo(images[index : index + 1], features[index : index + 1], onehot)
            return (terms["reconstruction"] + terms["kl"]).item() + torch.log(torch.tensor(4.0)).item()

        expected = torch.tensor([[negative_elbo(i, c) for c in range(4)] for i in (1, 3, 4)])
        torch.testing.assert_close(out["unlabelled_elbo"], expected, rtol=1e-4, atol=1e-2)
        logits = model(images)
        q = logits[[1, 3, 4]].softmax(1)
        unlabelled = (q * expected).sum(1) + (q * q.log()).sum(1)
        labelled = negative_elbo(0, 2) + negative_elbo(2, 0)
        ce = F.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]))
        loss = (labelled + unlabelled.sum()) / (5 * 3 * 32 * 32) + 0.5 * ce
    torch.testing.assert_close(out["loss"].detach(), loss, rtol=1e-4, atol=1e-4)
    for only in (torch.tensor([0, 1, 2, 3, 0]), torch.full((5,), -1)):  # batches of one kind work too
        assert torch.isfinite(make_objective("vae-m2")(model, images, only)["loss"])


def test_m2_consistency_trains_the_classifier_on_its_confident_pseudo_labels():
    """FixMatch's term: off by default; with threshold 0 every unlabelled image counts, above 1 none does."""
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([1, -1, -1, 3, -1, -1])
    assert "consistency" not in make_objective("vae-m2")(model, images, labels)

    def run(threshold):
        torch.manual_seed(1)  # the same reparameterisation noise (drawn before the strong views) in both runs
        return make_objective("vae-m2", consistency=2.0, threshold=threshold)(model, images, labels)

    every, none = run(0.0), run(1.01)
    assert every["confident_share"] == 1 and every["consistency"] > 0
    assert none["confident_share"] == 0 and none["consistency"] == 0
    torch.testing.assert_close(every["loss"] - none["loss"], 2.0 * every["consistency"])


def test_m2_consistency_distorts_the_strong_view_only_when_asked(monkeypatch):
    from cifarx.training import objectives

    strengths = []
    monkeypatch.setattr(objectives, "random_colour_affine", lambda images, generator, strength: strengths.append(strength)
                        or images)
    model, images, labels = create_model("vae-ssl", num_classes=4), torch.rand(4, 3, 32, 32), torch.tensor([1, -1, -1, 0])
    make_objective("vae-m2", consistency=1.0)(model, images, labels)
    assert strengths == []
    make_objective("vae-m2", consistency=1.0, distortion=0.5)(model, images, labels)
    assert strengths == [0.5]


def test_m2_with_elbo_weight_zero_is_fixmatch_alone_and_decodes_nothing(monkeypatch):
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4, classifier_model="simple-cnn").eval()  # eval: no dropout
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([1, -1, -1, 0, -1, 2])
    full = make_objective("vae-m2")(model, images, labels)
    monkeypatch.setattr(model, "decode", lambda *args: pytest.fail("elbo_weight=0 must not decode"))
    torch.manual_seed(1)
    out = make_objective("vae-m2", elbo_weight=0.0, consistency=2.0, threshold=0.0)(model, images, labels)
    assert "negative_elbo" not in out and "negative_elbo" in full
    torch.testing.assert_close(out["loss"], out["classification"] + 2.0 * out["consistency"])
    torch.testing.assert_close(out["classification"], F.cross_entropy(model(images)[[0, 3, 5]], labels[[0, 3, 5]]))


def test_a_deeper_q_y_x_is_a_registered_model_reading_the_image():
    """classifier_model: q(y|x) is that network on the pixels (the encoder does not change its logits); M2 trains it."""
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4, classifier_model="simple-cnn").eval()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([1, -1, -1, 0])
    before = model(images)
    with torch.no_grad():
        model.encoder[0].weight.add_(1.0)
    torch.testing.assert_close(model(images), before)
    torch.testing.assert_close(model(images), model.classifier(images))
    loss = make_objective("vae-m2", consistency=1.0, threshold=0.0)(model.train(), images, labels)["loss"]
    loss.backward()
    assert model.classifier[1].weight.grad.abs().sum() > 0 and model.encoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(CifarxError, match="conditional"):
        create_model("vae-ssl", conditional=False, classifier_model="simple-cnn")


def test_the_card_names_the_semi_supervised_method_with_its_consistency_term():
    from cifarx.deploy.card import family_fields

    config = {"labelled": 1500, "unlabelled": 10000, "objective": "vae-m2"}
    assert family_fields({}, config)["method"] == "vae-m2"
    assert family_fields({}, {**config, "objective_kwargs": {"consistency": 1.0}})["method"] == "vae-m2+fixmatch"
    assert family_fields({}, {**config, "objective_kwargs": {"consistency": 1.0, "elbo_weight": 0}})["method"] == "fixmatch"


@pytest.mark.parametrize("detach_latent", [True, False])
def test_m1_keeps_the_classifier_gradient_out_of_the_encoder(detach_latent):
    torch.manual_seed(0)
    model = create_model("vae-ssl", num_classes=4, conditional=False)
    objective = make_objective("vae-m1", detach_latent=detach_latent)
    images = torch.rand(4, 3, 32, 32)

    def encoder_gradient(labels):
        torch.manual_seed(1)  # the same reparameterisation noise for both label sets
        return torch.autograd.grad(objective(model, images, labels)["loss"], model.encoder[0].weight)[0]

    with_labels, without_labels = encoder_gradient(torch.tensor([0, 1, -1, 3])), encoder_gradient(torch.full((4,), -1))
    assert torch.allclose(with_labels, without_labels) == detach_latent  # M1: labels never shape the encoder


# ---------------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("method", ["m1", "m2"])
def test_tiny_run_loss_falls_and_figures_are_written(method, image_folder, tmp_path):
    out = tmp_path / "run"
    summary = train(ssl_config(image_folder, out, method))
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(row["train_loss"]) for row in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert summary["train_images"] == 80
    for kind in ("samples", "reconstructions", "latent"):
        for epoch in (1, 4):
            png = out / "figures" / f"{kind}-epoch{epoch:03d}.png"
            assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not list((out / "figures").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_ctrl_c_and_resume_of_a_semi_supervised_run_ends_like_an_uninterrupted_one(image_folder, tmp_path):
    from cifarx.errors import TrainingInterrupted
    from tests.conftest import InterruptAt, assert_same_weights, final_weights

    reference = train(ssl_config(image_folder, tmp_path / "ref", epochs=2))
    with pytest.raises(TrainingInterrupted):
        train(ssl_config(image_folder, tmp_path / "cut", epochs=2), reporter=InterruptAt(7))  # mid epoch 2
    resumed = train(resume=tmp_path / "cut")
    assert resumed["final_val_accuracy"] == reference["final_val_accuracy"]
    assert_same_weights(final_weights(tmp_path / "cut"), final_weights(tmp_path / "ref"))


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_trains_exports_and_evaluates_the_classifier_path(image_folder, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--method", "m1", "--data", image_folder, "--val-size", 16, "--labelled-per-class", 4,
                     "--unlabelled", "all", "--epochs", 1, "--batch-size", 16, "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["objective"], config["model_kwargs"]) == ("vae-ssl", "vae-m1", {"conditional": False})
    assert (config["labelled_per_class"], config["unlabelled"]) == (4, "all")

    onnx_path = tmp_path / "vae.onnx"
    result = run_cli("export", out, "-o", onnx_path)
    assert result.exit_code == 0 and "top-1 agreement 100.00%" in result.output, result.output
    result = run_cli("eval", onnx_path, "--data", image_folder, "--split", "test", "--batch-sizes", "2",
                     "--repeats", 2, "--warmup", 1, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["images"] == 24 and set(report["per_class"]) == {"airplane", "automobile", "bird", "cat"}

    result = run_cli("train", "--method", "m2", "--preset", "vae-ssl-m2", "--data", image_folder)
    assert_one_line_error(result, "not both")


def test_model_vae_ssl_alone_means_the_m2_recipe_with_the_seeds_budget(monkeypatch):
    import cifarx.training.run

    configs = []
    monkeypatch.setattr(cifarx.training.run, "train", lambda config, reporter: configs.append(config) or {})
    assert run_cli("train", "--model", "vae-ssl").exit_code == 0
    assert run_cli("train", "--model", "vae-ssl", "--method", "supervised", "--labelled", 500).exit_code == 0
    m2, supervised = configs
    assert (m2.objective, m2.labelled, m2.unlabelled, m2.model_kwargs) == ("vae-m2", 1500, 10000, {"conditional": True})
    assert (supervised.objective, supervised.labelled, supervised.unlabelled) == ("supervised", 500, 0)
    result = run_cli("train", "--model", "vae-ssl", "--unlabelled", "lots")
    assert_one_line_error(result, "'all'")
