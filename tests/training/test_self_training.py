"""Self-training: class-balanced deterministic selection, labels from the teacher only, rounds that resume."""

import json

import pytest
import torch

from cifarx.training import self_training
from cifarx.training.config import make_train_config
from cifarx.errors import CifarxError
from tests.training.test_prefix_cache import tiny_weights  # noqa: F401  (the fixture)

TINY_TEACHER = {"model": "simple-cnn", "epochs": 2, "batch_size": 16, "lr": 3e-3, "optimizer": "adam"}


def tiny_config(image_folder, out, **self_training_settings):
    settings = {"rounds": 1, "keep_per_class": 0.5, "teacher": TINY_TEACHER, **self_training_settings}
    return make_train_config(model="simple-cnn", data=str(image_folder), val_size=16, labelled=24, unlabelled="all",
                             epochs=1, batch_size=16, lr=3e-3, optimizer="adam", self_training=settings, out=str(out))


def test_selection_keeps_each_predicted_class_to_its_quota_most_confident_first():
    # 40 rows, 4 classes: the teacher predicts class 0 for 20 rows, so a plain top-confidence cut would be mostly 0s
    probabilities = torch.full((40, 4), 0.1)
    predicted = torch.tensor([0] * 20 + [1] * 10 + [2] * 6 + [3] * 4)
    confidence = torch.linspace(0.4, 0.9, 40)
    probabilities[torch.arange(40), predicted] = confidence
    rows, labels = self_training.select_pseudo_labels(probabilities, keep_per_class=0.5, threshold=0.0, seed=0)
    quota = int(0.5 * 40 / 4)
    assert torch.bincount(labels, minlength=4).tolist() == [quota, quota, quota, 4]  # class 3 has only 4
    kept_zeros = rows[labels == 0]
    assert set(kept_zeros.tolist()) == set(range(20 - quota, 20)), "the most confident of the class"
    rows_above, _ = self_training.select_pseudo_labels(probabilities, keep_per_class=1.0, threshold=0.8, seed=0)
    assert (confidence[rows_above] >= 0.8).all() and len(rows_above) == int((confidence >= 0.8).sum())


def test_selection_is_deterministic_for_a_seed_and_breaks_ties_by_it():
    probabilities = torch.full((30, 3), 1 / 3)  # every row tied: only the seed decides
    first = self_training.select_pseudo_labels(probabilities, 0.5, 0.0, seed=3)
    again = self_training.select_pseudo_labels(probabilities, 0.5, 0.0, seed=3)
    other = self_training.select_pseudo_labels(probabilities, 0.5, 0.0, seed=4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_students_learn_the_teachers_labels_never_the_hidden_ones(image_folder, tmp_path, monkeypatch):
    from cifarx.data import datasets as datamod
    from cifarx.training.batches import split_train_val
    from cifarx.training.run import train

    # a teacher that calls every image class 2: if the hidden labels leaked, the students' labels would vary
    def constant_teacher(model, images, *settings):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)  # only images reach it
        probabilities = torch.full((len(images), 4), 0.1)
        probabilities[:, 2] = 0.7
        return probabilities

    monkeypatch.setattr(self_training, "teacher_probabilities", constant_teacher)
    config = tiny_config(image_folder, tmp_path / "run")
    train(config)
    selection = torch.load(tmp_path / "run" / "round-1" / "pseudo_labels.pt", weights_only=True)
    assert selection["labels"].unique().tolist() == [2] and len(selection["labels"]) == int(0.5 * 56 / 4) * 1
    student = make_train_config(**{**config.to_dict(), "self_training": {},
                                   "pseudo_labels": str(tmp_path / "run" / "round-1" / "pseudo_labels.pt")})
    train_set, _ = split_train_val(student)
    assert (train_set.labels != datamod.UNLABELLED).all()
    assert train_set.labels[24:].unique().tolist() == [2]  # after the 24 labelled images: the teacher's labels


def test_rounds_end_in_an_ordinary_run_that_exports_and_resume_reloads_the_teachers_predictions(
        image_folder, tmp_path, monkeypatch):
    from cifarx.deploy.export import export_onnx
    from cifarx.training.run import train

    run = tmp_path / "run"
    summary = train(tiny_config(image_folder, run))
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["method"] == "self-training"
    assert summary["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in summary["rounds"])
                                                     + summary["teacher_pass_seconds"], abs=0.2)
    report = export_onnx(run, tmp_path / "student.onnx", parity_count=16)
    assert report["top1_agreement"] == 1.0
    selection = (run / "round-1" / "pseudo_labels.pt").read_bytes()

    # the student was killed before its first checkpoint: --resume trains it on the saved selection,
    # without asking the teacher again
    for name in ("best.pt", "last.pt", "summary.json"):
        (run / "round-1" / name).unlink()
    (run / "summary.json").unlink()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's predictions are in the run folder; resume must reload them")

    monkeypatch.setattr(self_training, "teacher_probabilities", no_teacher)
    resumed = train(resume=run)
    assert (run / "round-1" / "pseudo_labels.pt").read_bytes() == selection
    assert json.loads((run / "summary.json").read_text())["rounds"][1]["round"] == 1
    assert resumed["epochs_run"] == 1


@pytest.mark.parametrize("settings, message", [
    ({"rounds": 0}, "rounds must be"),
    ({"keep_per_class": 0}, "keep_per_class must be"),
    ({"threshold": 1.0}, "threshold must be"),
    ({"tta": "rotate"}, "tta must be"),
    ({"teacher": "no-such-preset"}, "must name a preset"),
    ({"rouds": 2}, "unknown self_training setting"),
])
def test_self_training_settings_are_refused_in_one_line_before_a_run(image_folder, tmp_path, settings, message):
    with pytest.raises(CifarxError, match=message):
        tiny_config(image_folder, tmp_path / "run", **settings).validate()
    assert not (tmp_path / "run").exists()


def test_self_training_without_unlabelled_images_is_refused(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "run")
    config.unlabelled = 0
    with pytest.raises(CifarxError, match="needs unlabelled images"):
        config.validate()


# ---------------------------------------------------------------------------------------------- FixMatch


class ConstantImageClassifier(torch.nn.Module):
    """Logits looked up by an image's (constant) pixel value: crop/flip views of a constant image keep it."""

    def __init__(self, table: dict[float, list[float]]):
        super().__init__()
        self.table = table

    def forward(self, images):
        return torch.tensor([self.table[round(float(v), 2)] for v in images.mean((1, 2, 3))])


def test_fixmatch_pseudo_labels_below_their_class_threshold_contribute_nothing():
    from cifarx.training.objectives import make_objective

    objective = make_objective("fixmatch", num_classes=2, threshold=0.9, adaptive=False, align=False, cutout=0)
    sure, unsure = [4.0, 0.0], [0.0, 1.0]  # softmax 0.98 for class 0; 0.73 for class 1 (below 0.9)
    model = ConstantImageClassifier({0.1: [0.0, 0.0], 0.2: sure, 0.3: unsure})
    images = torch.stack([torch.full((3, 32, 32), v) for v in (0.1, 0.2, 0.3)])
    out = objective(model, images, torch.tensor([0, -1, -1]))
    expected = torch.nn.functional.cross_entropy(torch.tensor([sure]), torch.tensor([0])) / 2  # the unsure row adds 0
    assert out["confident_share"] == 0.5
    assert out["consistency"] == pytest.approx(float(expected), rel=1e-5)


def test_fixmatch_class_thresholds_rise_as_the_model_grows_confident_in_a_class():
    from cifarx.training.objectives import make_objective

    objective = make_objective("fixmatch", num_classes=3, threshold=0.95, momentum=0.5, align=False, cutout=0)
    assert objective.class_thresholds().tolist() == [0.0, 0.0, 0.0]  # FlexMatch's warm-up: nothing learnt yet
    model = ConstantImageClassifier({0.1: [0.0, 0.0, 0.0], 0.5: [8.0, 0.0, 0.0]})
    images = torch.stack([torch.full((3, 32, 32), v) for v in (0.1, 0.5, 0.5, 0.5)])
    history = []
    for _ in range(4):
        objective(model, images, torch.tensor([0, -1, -1, -1]))
        history.append(objective.class_thresholds())
    class_0 = [float(t[0]) for t in history]
    assert class_0 == sorted(class_0) and class_0[0] > 0 and class_0[-1] > 0.9
    assert all(float(t[1]) == 0 and float(t[2]) == 0 for t in history), "classes never predicted stay open"


def test_fixmatch_state_is_saved_in_last_pt_for_resume(image_folder, tmp_path):
    from cifarx.training.checkpoint import read_checkpoint
    from cifarx.training.run import train

    config = make_train_config("ssl-fast-fixmatch", data=str(image_folder), val_size=16, labelled=24, epochs=2,
                               batch_size=32, out=str(tmp_path / "run"), tta="none")
    config.model, config.lookahead_every = "simple-cnn", 0
    train(config)
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["objective"]
    assert set(saved) == {"confident_share", "unconfident_share", "prediction_mean"}
    assert not torch.equal(saved["prediction_mean"], torch.full((4,), 0.25)), "the averages moved during training"


def cached_tiny_config(image_folder, out, weights, **overrides):
    """Self-training of timm's tiny EfficientNet on cached prefix activations: teacher and student alike."""
    from tests.training.test_prefix_cache import TINY

    model = {"model": f"timm/{TINY}", "model_kwargs": {"img_size": 48, "freeze": 2, "weights": str(weights)},
             "cached_features": True, "augment": ["crop", "flip", "cutout"], "cutout_size": 12, "batch_size": 16,
             "lr": 3e-3, "optimizer": "adam"}
    teacher = {**model, "epochs": 2, "labelled": 24, "unlabelled": 0}
    settings = {"rounds": 1, "keep_per_class": "all", "tta": "flip", "teacher": teacher}
    return make_train_config(**{**model, "data": str(image_folder), "val_size": 16, "labelled": 24,
                                "unlabelled": "all", "epochs": 2, "self_training": settings, "out": str(out),
                                **overrides})


def test_self_training_on_cached_activations_computes_the_prefix_once_for_teacher_and_student(
        image_folder, tmp_path, tiny_weights):
    from cifarx.training.run import train

    summary = train(cached_tiny_config(image_folder, tmp_path / "run", tiny_weights))
    student = summary["rounds"][1]
    assert student["prefix_from_cache"], "the teacher pass cached every training image; the student loads it"
    selection = torch.load(tmp_path / "run" / "round-1" / "pseudo_labels.pt", weights_only=True)
    assert len(selection["rows"]) == len(selection["unlabelled_rows"]) == 56  # keep_per_class "all"


def test_the_teacher_sees_the_plain_and_flipped_images_without_the_students_strong_view(image_folder, tiny_weights):
    """The teacher's cached pass is the whole model on each image and its flip, averaged: translation and cutout
    (the student's noise) never touch what the teacher labels from."""
    from cifarx.data import datasets as datamod
    from cifarx.models.registry import create_model
    from cifarx.runtimes.measuring import to_model_input  # noqa: F401  (the same [0,1] floats as the loop)
    from cifarx.training.prefix_cache import prefix_probabilities
    from cifarx.training.runfolder import SilentReporter

    config = cached_tiny_config(image_folder, "unused", tiny_weights)
    teacher = create_model(config.model, num_classes=4, **config.model_kwargs).eval()
    images = datamod.load_split(str(image_folder), "train").images[:20]
    rows = torch.arange(5, 15)
    got = prefix_probabilities(teacher, images, rows, config, torch.device("cpu"), SilentReporter(), flip=True)
    with torch.no_grad():
        plain = datamod.to_float(images[rows])
        expected = (teacher(plain).softmax(1) + teacher(plain.flip(3)).softmax(1)) / 2
    assert torch.allclose(got, expected, atol=2e-2)  # float16 cache


def test_a_cached_self_training_run_resumes_after_ctrl_c_mid_round_to_the_uninterrupted_weights(
        image_folder, tmp_path, tiny_weights):
    from tests.conftest import InterruptAt, assert_same_weights, final_weights
    from cifarx.errors import TrainingInterrupted
    from cifarx.training.run import train

    train(cached_tiny_config(image_folder, tmp_path / "straight", tiny_weights))
    with pytest.raises(TrainingInterrupted):  # 24 labels / 16: 1 step an epoch for the teacher; then the student's
        train(cached_tiny_config(image_folder, tmp_path / "stopped", tiny_weights), reporter=InterruptAt(4))
    train(resume=tmp_path / "stopped")
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped"))


@pytest.mark.parametrize("budget", [250, 1500, 4000])
def test_a_label_budget_is_stratified_and_the_same_for_a_seed(budget):
    from cifarx.data import datasets as datamod

    labels = torch.arange(10).repeat_interleave(4500)  # a 45,000-image split, 10 balanced classes
    image_set = datamod.ImageSet(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels, [str(c) for c in range(10)])
    draw = datamod.semi_supervised_subset(image_set, budget, "all", seed=0)
    labelled = draw.labels[draw.labels != datamod.UNLABELLED]
    assert torch.bincount(labelled, minlength=10).tolist() == [budget // 10] * 10
    assert torch.equal(draw.labels, datamod.semi_supervised_subset(image_set, budget, "all", seed=0).labels)
