"""Objectives: what a training step minimises. `objective(model, images, labels) -> {"loss", "logits", ...}`.

Families differ here (and in their builders and presets), never by a copy of the training loop.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarx.data.datasets import random_colour_affine, random_crop_flip_cutout
from cifarx.errors import CifarxError
from cifarx.models.registry import registrar
from cifarx.models.ensemble import Ensemble

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict]
_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


register_objective = registrar(_OBJECTIVES, "objective")


def make_objective(name: str, num_classes: int = 10, **kwargs) -> Objective:
    """The objective `name` with its settings; `num_classes` reaches the ones that keep per-class state."""
    if name not in _OBJECTIVES:
        raise CifarxError(f"unknown objective {name!r}; choose from {', '.join(sorted(_OBJECTIVES))}")
    factory = _OBJECTIVES[name]
    if "num_classes" in inspect.signature(factory).parameters:
        kwargs["num_classes"] = num_classes
    try:
        return factory(**kwargs)
    except TypeError as error:  # a setting the objective does not have (a preset or --set typo)
        raise CifarxError(f"objective {name}: {error}") from None


@register_objective("supervised")
def supervised(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy on the model's logits, with optional label smoothing."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = model(images)
        return {"loss": F.cross_entropy(logits, labels, label_smoothing=label_smoothing), "logits": logits}

    return objective


@register_objective("ensemble")
def ensemble(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy on each member's logits of an `ensemble` model, summed: the members share no parameter, so each
    gets the gradient (and, at the same lr, the step) it would get training alone. The logits reported are the mean."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        if not isinstance(getattr(model, "module", model), Ensemble):  # `module`: under DistributedDataParallel
            raise CifarxError("objective ensemble trains an ensemble model (--model ensemble)")
        member_logits = model(images, members=True)
        losses = [F.cross_entropy(logits, labels, label_smoothing=label_smoothing) for logits in member_logits]
        return {"loss": torch.stack(losses).sum(), "logits": member_logits.mean(0)}

    return objective


# ---------------------------------------------------------------------------------------------- FixMatch


@register_objective("fixmatch")
class AdaptiveFixMatch(nn.Module):
    """Supervised cross-entropy on the labelled images + `weight` x FixMatch's term on the unlabelled ones (label
    -1), with class-wise adaptive thresholds (FlexMatch, Zhang et al. 2021) and distribution alignment.

    FlexMatch lowers the threshold of the classes the model is still learning: class c's threshold is
    `threshold` x M(beta_c), M(x) = x / (2 - x), where beta_c is the share of unlabelled images confidently
    predicted as c, normalised by the largest such share or by the share not yet confident, whichever is larger.
    FlexMatch counts those images per index over the data set; here the shares are moving averages over batches
    (`momentum` per step), so the objective needs no image indices and its state is three small tensors, kept in
    last.pt like the optimiser's. Distribution alignment (ReMixMatch) divides each pseudo-label distribution by
    the moving average of the model's predictions, times the uniform class prior, before thresholding.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, weight: float = 1.0, threshold: float = 0.95,
                 adaptive: bool = True, align: bool = True, momentum: float = 0.99, cutout: int = 16,
                 distortion: float = 0.0):
        super().__init__()
        if not 0 < threshold < 1 or not 0 <= momentum < 1 or not weight >= 0:
            raise CifarxError("fixmatch: threshold in (0, 1), momentum in [0, 1) and weight >= 0")
        self.label_smoothing, self.weight, self.threshold = label_smoothing, weight, threshold
        self.adaptive, self.align, self.momentum, self.cutout, self.distortion = adaptive, align, momentum, cutout, distortion
        self.register_buffer("confident_share", torch.zeros(num_classes))  # of unlabelled images, per predicted class
        self.register_buffer("unconfident_share", torch.ones(()))
        self.register_buffer("prediction_mean", torch.full((num_classes,), 1 / num_classes))

    def class_thresholds(self) -> torch.Tensor:
        """Each class's confidence threshold for its pseudo-labels (the fixed one when not adaptive)."""
        if not self.adaptive:
            return torch.full_like(self.confident_share, self.threshold)
        beta = self.confident_share / torch.maximum(self.confident_share.max(), self.unconfident_share).clamp(min=1e-12)
        return self.threshold * beta / (2 - beta)

    def forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = model(images)
        loss = _labelled_cross_entropy(logits, labels, self.label_smoothing)
        out = {"logits": logits, "classification": loss.detach()}
        unlabelled = labels < 0
        if not unlabelled.any() or not self.weight:
            return {"loss": loss, **out}
        probabilities = logits[unlabelled].detach().softmax(1)
        if self.training:  # the moving averages follow the model only while it trains
            with torch.no_grad():
                self.prediction_mean.lerp_(probabilities.mean(0), 1 - self.momentum)
        if self.align:
            probabilities = probabilities / self.prediction_mean.clamp(min=1e-6)
            probabilities = probabilities / probabilities.sum(1, keepdim=True)
        confidence, pseudo_labels = probabilities.max(1)
        if self.training:
            with torch.no_grad():
                above = confidence >= self.threshold
                counts = torch.bincount(pseudo_labels[above], minlength=len(self.confident_share))
                self.confident_share.lerp_(counts / len(confidence), 1 - self.momentum)
                self.unconfident_share.lerp_((~above).float().mean(), 1 - self.momentum)
        mask = (confidence >= self.class_thresholds()[pseudo_labels]).float()
        strong = images[unlabelled]
        strong = random_colour_affine(strong, None, self.distortion) if self.distortion else strong
        strong = random_crop_flip_cutout(strong, generator=None, pad=4, flip=True, cutout=self.cutout)
        agreement = (F.cross_entropy(model(strong), pseudo_labels, reduction="none") * mask).mean()
        out.update(consistency=agreement.detach(), confident_share=mask.mean())
        return {"loss": loss + self.weight * agreement, **out}


# ---------------------------------------------------------------------------------------------- semi-supervised VAE
# Batches mix labelled images and unlabelled ones (label -1, see data.semi_supervised_subset). The -ELBO is
# divided by the pixel count (nats per dimension) so it sits on the same scale as a cross-entropy.


def _labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the labelled images of a batch; 0 when the batch has none."""
    total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum", label_smoothing=label_smoothing)
    return total / (labels >= 0).sum().clamp(min=1)


def _require_vae(model: nn.Module, conditional: bool, name: str) -> None:
    if getattr(model, "conditional", None) is not conditional:
        variant = "conditional=true (M2)" if conditional else "conditional=false (M1)"
        raise CifarxError(f"objective {name} needs the vae-ssl model with {variant}; use `cifarx train --method`")


@register_objective("vae-m1")
def vae_m1(label_smoothing: float = 0.0, detach_latent: bool = True) -> Objective:
    """M1: the VAE's -ELBO on every image, plus cross-entropy of the classifier on the labelled images' latent means.

    The seed trains the VAE, then the classifier on its frozen latent means. Here both train in the one loop, and
    `detach_latent` keeps the classifier's gradient out of the encoder, so the features stay purely unsupervised as
    in M1 (the classifier is small and follows the slowly changing latent means); no phase switch to checkpoint.
    """

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        _require_vae(model, False, "vae-m1")
        terms = model.negative_elbo(images, model.features(images))
        negative_elbo = (terms["reconstruction"] + terms["kl"]).mean() / images[0].numel()
        logits = model.classifier(terms["mean"].detach() if detach_latent else terms["mean"])
        classification = _labelled_cross_entropy(logits, labels, label_smoothing)
        return {"loss": negative_elbo + classification, "logits": logits, "negative_elbo": negative_elbo.detach(),
                "classification": classification.detach()}

    return objective


def _pseudo_label_consistency(model: nn.Module, images: torch.Tensor, logits: torch.Tensor, threshold: float,
                              cutout: int, distortion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled term (Sohn et al. 2020): the class q(y|x) gives an image's (weakly augmented) view, where
    it is at least `threshold` sure, is the target of a cross-entropy on a strongly augmented view of the same image.

    The strong view is another random translate and flip plus a cutout square and, with `distortion` > 0, per-image
    colour and affine changes of that strength (data.random_colour_affine), all batch-wise.
    Returns (mean loss over the images, share of images above the threshold).
    """
    confidence, pseudo_labels = logits.detach().softmax(1).max(1)
    confident = (confidence >= threshold).float()
    strong = random_colour_affine(images, None, distortion) if distortion else images
    strong = random_crop_flip_cutout(strong, generator=None, pad=4, flip=True, cutout=cutout)
    loss = (F.cross_entropy(model(strong), pseudo_labels, reduction="none") * confident).mean()
    return loss, confident.mean()


def _m2_generative(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M2's generative part: (logits of q(y|x), -ELBO of the batch in nats per pixel, the unlabelled images'
    -ELBO(x, y) for every class [U, classes]). Labelled images count -ELBO(x, y) at their class; each unlabelled
    image E_q[-ELBO(x, y)] minus the entropy of q(y|x). Batch-wise: the unlabelled images are tiled once per class
    and the tiled batch goes through the decoder in one call."""
    features = model.features(images)
    logits = model.classify(images, features)
    classes = logits.shape[1]
    labelled = labels >= 0
    unlabelled = ~labelled
    labelled_count, unlabelled_count = int(labelled.sum()), int(unlabelled.sum())
    tiled_labels = torch.arange(classes, device=labels.device).repeat_interleave(unlabelled_count)
    terms = model.negative_elbo(
        torch.cat([images[labelled], images[unlabelled].repeat(classes, 1, 1, 1)]),
        torch.cat([features[labelled], features[unlabelled].repeat(classes, 1)]),
        F.one_hot(torch.cat([labels[labelled], tiled_labels]), classes).float(),
    )
    # -log p(y) of the uniform class prior completes -ELBO(x, y).
    negative_elbo = terms["reconstruction"] + terms["kl"] + math.log(classes)
    # Rows of the tiled part are (class, image); transposed, each unlabelled image gets its row of classes.
    unlabelled_elbo = negative_elbo[labelled_count:].view(classes, unlabelled_count).T
    log_q = logits[unlabelled].log_softmax(1)  # q(y|x); plain tensors so a batch without unlabelled images works
    unlabelled_loss = (log_q.exp() * (unlabelled_elbo + log_q)).sum(1)  # E_q[-ELBO(x, y)] - entropy of q
    generative = (negative_elbo[:labelled_count].sum() + unlabelled_loss.sum()) / (len(images) * images[0].numel())
    return logits, generative, unlabelled_elbo


@register_objective("vae-m2")
def vae_m2(label_smoothing: float = 0.0, alpha: float = 1.0, consistency: float = 0.0, threshold: float = 0.95,
           cutout: int = 16, distortion: float = 0.0, elbo_weight: float = 1.0) -> Objective:
    """M2 (Kingma et al. 2014): -ELBO(x, y) of the labelled images, the unlabelled -ELBO marginalised over y with
    q(y|x) (minus its entropy) (`_m2_generative`), and alpha x the classifier's cross-entropy on the labelled images.

    `consistency` > 0 adds that weight times FixMatch's pseudo-label term on the unlabelled images
    (`_pseudo_label_consistency`), which the ELBO alone does not give the classifier.
    `elbo_weight` scales the generative part; 0 skips it (no decoding): FixMatch alone, to measure what the ELBO adds.
    """

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
        _require_vae(model, True, "vae-m2")
        unlabelled = labels < 0
        if elbo_weight:
            logits, generative, unlabelled_elbo = _m2_generative(model, images, labels)
            loss = elbo_weight * generative
            out = {"negative_elbo": generative.detach(), "unlabelled_elbo": unlabelled_elbo.detach()}
        else:
            logits, loss, out = model(images), 0.0, {}
        classification = _labelled_cross_entropy(logits, labels, label_smoothing)
        loss = loss + alpha * classification
        out.update(logits=logits, classification=classification.detach())
        if consistency and unlabelled.any():
            agreement, confident_share = _pseudo_label_consistency(model, images[unlabelled], logits[unlabelled],
                                                                   threshold, cutout, distortion)
            loss = loss + consistency * agreement
            out.update(consistency=agreement.detach(), confident_share=confident_share)
        return {"loss": loss, **out}

    return objective
