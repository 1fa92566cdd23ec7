"""A convolutional VAE with a classifier, for learning from few labels plus many unlabelled images.

The seed report ("Classifying CIFAR-10 with Transfer Learning and GPU Acceleration", KTH): encoder of four stride-2
3x3 convs (32/64/128/256, ReLU), a 256-d latent with mean and log-variance heads, a decoder of transposed convs, and
a classifier with two hidden layers of 100.

Two variants, chosen by `conditional`:
- M1 (`conditional=False`): q(z|x) and p(x|z); the classifier reads the latent mean, as in the seed.
- M2 (`conditional=True`, Kingma et al. 2014): q(z|x,y) and p(x|y,z); the classifier q(y|x) reads the encoder's
  features, so the unlabelled ELBO shapes the same convolutions the classifier uses. With `classifier_model` set,
  q(y|x) is instead that registered model reading the image itself, as in the paper, where q(y|x) is a network of
  its own: the seed's four convs and 100-100 MLP memorise 1,500 labels, so a deeper q(y|x) is what can use them.

`forward(x)` is the classifier path (encoder -> classifier logits), so export, eval and predict see an ordinary
classifier; the objectives in cifarx/objectives.py (`vae-m1`, `vae-m2`) use `features`, `negative_elbo` and
`decode`. The pixel likelihood is a Gaussian around the decoder's output with one learned scale (a "sigma-VAE"),
so the ELBO is in nats and the balance of reconstruction and KL needs no hand-set weight.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from cifarx.errors import CifarxError
from cifarx.models.common import Normalize
from cifarx.models.registry import create_model, register_model

FIGURE_IMAGES = 2000  # validation images encoded for the latent projection each epoch


def _mlp(width_in: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class SemiSupervisedVAE(nn.Module):
    """Encoder -> (latent mean, log-variance) -> decoder, plus the classifier that `forward` returns logits of."""

    def __init__(self, num_classes: int = 10, conditional: bool = True, latent_dim: int = 256, hidden: int = 100,
                 channels: tuple[int, ...] = (32, 64, 128, 256), batch_norm: bool = True,
                 classifier_model: str | None = None):
        super().__init__()
        if classifier_model and not conditional:
            raise CifarxError("classifier_model needs conditional=true (M2): M1's classifier reads the latent mean")
        self.num_classes, self.conditional, self.latent_dim = num_classes, conditional, latent_dim
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        c_in = 3
        for width in channels:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
                       nn.ReLU(inplace=True)]
            c_in = width
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.bottom = 32 >> len(channels)  # spatial size after the stride-2 convs (2 for four of them)
        feature_dim = channels[-1] * self.bottom**2
        label_dim = num_classes if conditional else 0
        self.mean_head = nn.Linear(feature_dim + label_dim, latent_dim)
        self.log_var_head = nn.Linear(feature_dim + label_dim, latent_dim)
        self.image_classifier = bool(classifier_model)
        if classifier_model:
            self.classifier = create_model(classifier_model, num_classes)
        else:
            self.classifier = _mlp(feature_dim if conditional else latent_dim, hidden, num_classes)
        self.decoder_input = nn.Linear(latent_dim + label_dim, feature_dim)
        layers = []
        widths = list(reversed(channels))
        for c_in, width in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, width, 4, stride=2, padding=1),
                       nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU(inplace=True)]
        layers.append(nn.ConvTranspose2d(widths[-1], 3, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*layers)
        self.log_scale = nn.Parameter(torch.zeros(()))  # log sigma of the Gaussian pixel likelihood, learned

    @property
    def default_objective(self) -> str:
        """The objective this variant is trained with (tests/test_models.py uses it for the all-parameters check)."""
        return "vae-m2" if self.conditional else "vae-m1"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, F] for pixels in [0, 1]."""
        return self.encoder(self.normalize(images))

    def posterior(self, features: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x) (M1) or q(z|x,y) (M2, `onehot` [B, classes])."""
        if self.conditional:
            features = torch.cat([features, onehot], 1)
        return self.mean_head(features), self.log_var_head(features)

    def classify(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of q(y|x), from the image (`classifier_model`), the encoder features (M2) or the latent mean (M1);
        `features` saves a second encoder pass when the caller has them."""
        if self.image_classifier:
            return self.classifier(images)
        if features is None:
            features = self.features(images)
        return self.classifier(features if self.conditional else self.posterior(features)[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)

    def decode(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel means in [0, 1], [B, 3, 32, 32], of p(x|z) (M1) or p(x|y,z) (M2)."""
        if self.conditional:
            z = torch.cat([z, onehot], 1)
        grid = self.decoder_input(z).view(len(z), -1, self.bottom, self.bottom)
        return torch.sigmoid(self.decoder(grid))

    def negative_elbo(self, images: torch.Tensor, features: torch.Tensor, onehot: torch.Tensor | None = None) -> dict:
        """Per-image terms of -ELBO in nats: {"reconstruction": -log p(x|z[,y]), "kl": KL(q || N(0, I)), "mean"}.

        One reparameterised sample of z (global torch RNG, which the training loop seeds per epoch).
        """
        mean, log_var = self.posterior(features, onehot)
        posterior = Normal(mean, torch.exp(0.5 * log_var))
        reconstruction = self.decode(posterior.rsample(), onehot)
        variance = torch.exp(2 * self.log_scale).expand_as(reconstruction)
        nll = F.gaussian_nll_loss(reconstruction, images, variance, full=True, reduction="none").flatten(1).sum(1)
        kl = kl_divergence(posterior, Normal(torch.zeros_like(mean), torch.ones_like(mean))).sum(1)
        return {"reconstruction": nll, "kl": kl, "mean": mean}

    @torch.no_grad()
    def latent_mean(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(posterior mean of z, the one-hot class it is conditioned on): M2 uses the predicted class, M1 none."""
        features = self.features(images)
        onehot = None
        if self.conditional:
            onehot = F.one_hot(self.classify(images, features).argmax(1), self.num_classes).float()
        return self.posterior(features, onehot)[0], onehot

    @torch.no_grad()
    def on_epoch_end(self, run_dir: Path, val_set, epoch: int) -> None:
        """Training-loop hook: reconstruction, sample and latent-projection PNGs in RUN_DIR/figures/."""
        was_training = self.training
        self.eval()
        try:
            write_figures(self, val_set, Path(run_dir) / "figures", epoch)
        finally:
            self.train(was_training)


def write_figures(model: SemiSupervisedVAE, val_set, folder: Path, epoch: int) -> list[Path]:
    """Reconstructions of validation images, samples from the prior (M2: one row per class) and a PCA of the
    latent means coloured by class; written atomically, one set per epoch. Returns the paths written."""
    import matplotlib.pyplot as plt  # the backend is chosen where the process starts (cifarx.process: Agg)
    from torchvision.utils import make_grid

    from cifarx.data.datasets import to_float
    from cifarx.io import atomic_savefig

    device = next(model.parameters()).device
    written = []

    def save_grid(images: torch.Tensor, rows: int, title: str, name: str) -> None:
        grid = make_grid(images.cpu(), nrow=len(images) // rows, padding=1, pad_value=1.0)
        figure, axis = plt.subplots(figsize=(grid.shape[2] / 40, grid.shape[1] / 40 + 0.4))
        axis.imshow(grid.permute(1, 2, 0).numpy())
        axis.set_title(title, fontsize=9)
        axis.axis("off")
        path = folder / f"{name}-epoch{epoch:03d}.png"
        atomic_savefig(figure, path)
        plt.close(figure)
        written.append(path)

    # Fixed noise, so the grids of successive epochs show the same z decoded by a better decoder.
    noise = torch.Generator().manual_seed(0)
    per_row = 8
    z = torch.randn(model.num_classes * per_row, model.latent_dim, generator=noise).to(device)
    onehot = None
    if model.conditional:
        classes = torch.arange(model.num_classes, device=device).repeat_interleave(per_row)
        onehot = F.one_hot(classes, model.num_classes).float()
    save_grid(model.decode(z, onehot), model.num_classes,
              f"samples, epoch {epoch}" + (" (one row per class)" if model.conditional else ""), "samples")
    if len(val_set) < 2:  # a projection needs two points
        return written
    # Evenly spaced through the split, which is ordered by class in image folders, so every class shows.
    spread = torch.linspace(0, len(val_set) - 1, min(len(val_set), FIGURE_IMAGES)).round().long().unique()
    originals = to_float(val_set.images[spread[torch.linspace(0, len(spread) - 1, 32).round().long()]]).to(device)
    mean, onehot = model.latent_mean(originals)
    reconstructions = model.decode(mean, onehot)
    pairs = torch.stack([originals, reconstructions], 1).flatten(0, 1)  # original, reconstruction side by side
    save_grid(pairs, 4, f"reconstructions (left of each pair: original), epoch {epoch}", "reconstructions")

    images = to_float(val_set.images[spread]).to(device)
    means = torch.cat([model.latent_mean(batch)[0] for batch in images.split(500)]).cpu()
    labels = val_set.labels[spread]
    _, _, basis = torch.pca_lowrank(means, q=2)  # centres the data itself
    projected = (means - means.mean(0)) @ basis
    figure, axis = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab10")
    for label, name in enumerate(val_set.class_names):
        chosen = labels == label
        axis.scatter(projected[chosen, 0], projected[chosen, 1], s=4, alpha=0.6, color=colours(label % 10), label=name)
    axis.set(xlabel="PC 1", ylabel="PC 2",
             title=f"latent means (PCA), epoch {epoch}" + (" - z given the predicted class" if model.conditional else ""))
    axis.legend(fontsize=7, markerscale=3, loc="best")
    path = folder / f"latent-epoch{epoch:03d}.png"
    atomic_savefig(figure, path)
    plt.close(figure)
    written.append(path)
    return written


@register_model("vae-ssl")
def vae_ssl(num_classes: int = 10, conditional: bool = True, **kwargs) -> nn.Module:
    """The seed's convolutional VAE with a classifier; conditional=True for M2 (default), False for M1."""
    return SemiSupervisedVAE(num_classes, conditional=conditional, **kwargs)

