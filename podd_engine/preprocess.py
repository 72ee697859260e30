"""Image preprocessing as RaT-BPTT and PoDD use it: ZCA whitening (default) or per-channel
normalisation, each with an inverse so posters can be rendered as pictures.

ZCA, following the official implementations (docs/reference-implementation.md, section 1):
  1. every image is centred by its own mean and scaled to unit L2 norm (so the input scale,
     0..255 or 0..1, does not matter);
  2. the covariance C = X^T X / N is taken over the training set only;
  3. W = V diag(1 / sqrt(e + r)) V^T with r = regularization * mean(e)  (0.1 in the papers);
  4. train and test images both get step 1, then W from the training set.
The flattening order (CHW here, HWC in the official code) does not change the result: ZCA is
equivariant to permuting coordinates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from podd_engine.config import AUGMENTATIONS, PREPROCESSING_KINDS
from podd_engine.data import ImageDataset, default_cache_dir
from podd_engine.fileio import atomic_torch_save

ZCA_REGULARIZATION = 0.1


def standardize_per_image(images: torch.Tensor) -> torch.Tensor:
    """Centre each image by its own mean and scale it to unit L2 norm (float32 [N, C, H, W])."""
    x = images.to(torch.float32).flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # constant images stay zero
    return x.view(images.shape)


@contextlib.contextmanager
def one_cpu_thread():
    """Run the block on one CPU thread. A BLAS product or eigendecomposition splits its sums
    by thread, so a fit made with 2 threads differs in the last bits from one made with 1; the
    cached fit is shared by every later trial, and training amplifies those bits into tenths of
    a point (docs/benchmarks.md). One thread makes a fit the same whichever process makes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ZCAWhitening:
    """Regularised ZCA whitening fitted on a training set of shape [C, H, W] images."""

    eigenvectors: torch.Tensor  # [d, d] float64, columns are eigenvectors of the covariance
    eigenvalues: torch.Tensor  # [d] float64, >= 0
    regularization: float
    image_shape: tuple[int, int, int]

    @classmethod
    def fit(cls, images: torch.Tensor, regularization: float = ZCA_REGULARIZATION,
            *, device: str | torch.device = "cpu", chunk: int = 4096) -> "ZCAWhitening":
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"ZCA needs a non-empty [N, C, H, W] batch, got {tuple(images.shape)}")
        if regularization < 0:
            raise ValueError(f"ZCA regularization must be >= 0, got {regularization}")
        d = images[0].numel()
        with one_cpu_thread():
            cov = torch.zeros(d, d, dtype=torch.float64, device=device)
            for start in range(0, len(images), chunk):  # bounded memory for large training sets
                x = standardize_per_image(images[start:start + chunk].to(device)).flatten(1)
                cov += (x.T @ x).to(torch.float64)
            cov /= len(images)
            eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        return cls(eigenvectors.cpu(), eigenvalues.clamp_min(0).cpu(), float(regularization),
                   tuple(images.shape[1:]))

    @property
    def _scaled_eigenvalues(self) -> torch.Tensor:
        return self.eigenvalues + self.regularization * self.eigenvalues.mean()

    def _matrix(self, power: float) -> torch.Tensor:
        v = self.eigenvectors
        return ((v * self._scaled_eigenvalues.pow(power)) @ v.T).to(torch.float32)

    @property
    def matrix(self) -> torch.Tensor:
        """W (symmetric): whitened = standardized @ W."""
        if getattr(self, "_w", None) is None:
            self._w = self._matrix(-0.5)
        return self._w

    @property
    def inverse_matrix(self) -> torch.Tensor:
        if getattr(self, "_w_inv", None) is None:
            self._w_inv = self._matrix(0.5)
        return self._w_inv

    def transform(self, images: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """uint8 or float images [N, C, H, W] -> whitened float32 images of the same shape."""
        self._check_shape(images)
        w = self.matrix.to(images.device)
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        for start in range(0, len(images), chunk):
            x = standardize_per_image(images[start:start + chunk]).flatten(1)
            out[start:start + chunk] = (x @ w).view(-1, *self.image_shape)
        return out

    def inverse(self, whitened: torch.Tensor) -> torch.Tensor:
        """Whitened images -> per-image standardised images (the per-image mean and norm that
        step 1 removed cannot be recovered; rendering rescales for display)."""
        self._check_shape(whitened)
        x = whitened.to(torch.float32).flatten(1) @ self.inverse_matrix.to(whitened.device)
        return x.view(whitened.shape)

    def _check_shape(self, images: torch.Tensor) -> None:
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"ZCA was fitted on {self.image_shape} images, got "
                             f"{tuple(images.shape[1:])}")

    def state_dict(self) -> dict:
        return {"kind": "zca", "eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues,
                "regularization": self.regularization, "image_shape": list(self.image_shape)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ZCAWhitening":
        return cls(state["eigenvectors"], state["eigenvalues"], float(state["regularization"]),
                   tuple(state["image_shape"]))


@dataclass
class ChannelNormalization:
    """Per-channel mean/std normalisation of images scaled to [0, 1]."""

    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    @classmethod
    def fit(cls, images: torch.Tensor) -> "ChannelNormalization":
        x = images.to(torch.float64) / 255.0 if images.dtype == torch.uint8 else images.double()
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-8)
        return cls(mean.float(), std.float())

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1).to(x.device)) / self.std.view(1, -1, 1, 1).to(x.device)

    def inverse(self, normalized: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel values."""
        m, s = (t.view(1, -1, 1, 1).to(normalized.device) for t in (self.mean, self.std))
        return normalized * s + m

    def state_dict(self) -> dict:
        return {"kind": "normalize", "mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ChannelNormalization":
        return cls(state["mean"], state["std"])


Preprocessing = ZCAWhitening | ChannelNormalization


def fit_preprocessing(
    dataset: ImageDataset,
    kind: str = "zca",
    *,
    regularization: float = ZCA_REGULARIZATION,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Preprocessing:
    """Fit (or load from the cache) the preprocessing of `dataset`'s training set."""
    if kind not in PREPROCESSING_KINDS:
        raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING_KINDS)}, "
                         f"got {kind!r}")
    key = preprocessing_key(dataset, kind, regularization)
    path = Path(cache_dir or default_cache_dir()) / "preprocessing" / f"{kind}-{key}.pt"
    if path.exists():
        try:
            return load_preprocessing(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # unreadable or stale format: refit below
            pass
    if kind == "zca":
        fitted: Preprocessing = ZCAWhitening.fit(dataset.train_images, regularization,
                                                 device=device)
    else:
        fitted = ChannelNormalization.fit(dataset.train_images)
    atomic_torch_save(fitted.state_dict(), path)
    return fitted


def load_preprocessing(state: dict) -> Preprocessing:
    kinds = {"zca": ZCAWhitening, "normalize": ChannelNormalization}
    if state.get("kind") not in kinds:
        raise ValueError(f"unknown preprocessing state kind {state.get('kind')!r}")
    return kinds[state["kind"]].from_state_dict(state)


def preprocessing_key(dataset: ImageDataset, kind: str,
                      regularization: float = ZCA_REGULARIZATION) -> str:
    """Identifies a fitted preprocessing: its kind and settings plus a content hash of the
    training images and labels it was fitted on (a few hundred ms for CIFAR-10)."""
    h = hashlib.sha256(f"{kind}:{regularization if kind == 'zca' else ''}".encode())
    h.update(str(tuple(dataset.train_images.shape)).encode())
    h.update(dataset.train_images.contiguous().numpy().tobytes())
    h.update(dataset.train_labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Differentiable augmentation (RaT-BPTT / PoDD "flip_rotate"): per call one operation is chosen
# for the whole batch, with per-image random parameters: a horizontal flip with probability 0.5,
# or a rotation by an angle uniform in +-15 degrees (bilinear, zero padding). Both are
# differentiable in the images, so gradients flow back to the poster.
# --------------------------------------------------------------------------------------------

ROTATION_DEGREES = 15.0


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices of one augmentation call, so it can be replayed exactly."""

    op: str  # "flip", "rotate" or "none"
    values: torch.Tensor  # flip: [B] bool; rotate: [B] angles in radians


def draw_augmentation(batch: int, strategy: str, generator: torch.Generator | None = None
                      ) -> AugmentationDraw:
    if strategy == "none":
        return AugmentationDraw("none", torch.empty(0))
    if strategy != "flip_rotate":
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {strategy!r}")
    if torch.rand((), generator=generator) < 0.5:
        return AugmentationDraw("flip", torch.rand(batch, generator=generator) < 0.5)
    angles = (torch.rand(batch, generator=generator) * 2 - 1) * (ROTATION_DEGREES * torch.pi / 180)
    return AugmentationDraw("rotate", angles)


def apply_augmentation(images: torch.Tensor, draw: AugmentationDraw) -> torch.Tensor:
    if draw.op == "none":
        return images
    values = draw.values.to(images.device)
    if draw.op == "flip":
        return torch.where(values.view(-1, 1, 1, 1), images.flip(-1), images)
    cos, sin = torch.cos(values), torch.sin(values)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(images.dtype), list(images.shape),
                                           align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)
