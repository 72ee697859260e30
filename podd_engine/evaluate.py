"""The evaluation protocol of the paper (after DSA / RaT-BPTT): M freshly initialised networks
are trained on the distilled set alone (all poster patches with their soft labels; Adam, lr
1e-3, random batches, flip/rotate augmentation), and their test accuracy is measured after
300, 600, 1000 and 2000 steps. The figure quoted is the mean (+- std over the M models) at the
last checkpoint.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from podd_engine.inner import soft_cross_entropy
from podd_engine.models import reinitialize
from podd_engine.preprocess import apply_augmentation, draw_augmentation

DEFAULT_EVAL_STEPS = (300, 600, 1000, 2000)


@dataclass(frozen=True)
class EvalResult:
    steps: tuple[int, ...]
    accuracies: list[list[float]]  # [model][checkpoint] test accuracy in [0, 1]

    def mean(self, checkpoint: int = -1) -> float:
        return statistics.fmean(a[checkpoint] for a in self.accuracies)

    def std(self, checkpoint: int = -1) -> float:
        values = [a[checkpoint] for a in self.accuracies]
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    def summary(self) -> dict:
        out = {"eval_models": len(self.accuracies), "test_accuracy": self.mean(),
               "test_accuracy_std": self.std()}
        for i, step in enumerate(self.steps):
            out[f"test_accuracy_{step}"] = self.mean(i)
            out[f"test_accuracy_std_{step}"] = self.std(i)
        out["per_model"] = self.accuracies
        return out


@torch.no_grad()
def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  chunk: int = 2000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), chunk):
        logits = model(images[start:start + chunk])
        correct += int((logits.argmax(1) == labels[start:start + chunk]).sum())
    model.train()
    return correct / len(images)


def train_and_test(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, *,
                   steps: Sequence[int] = DEFAULT_EVAL_STEPS, batch_size: int = 96,
                   lr: float = 1e-3, augmentation: str = "flip_rotate",
                   generator: torch.Generator | None = None) -> list[float]:
    """Train `model` (already initialised) on (images, soft targets); test accuracy at `steps`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = min(batch_size, len(images))
    results = []
    model.train()
    for step in range(1, max(steps) + 1):
        idx = torch.randperm(len(images), generator=generator)[:batch].to(images.device)
        draw = draw_augmentation(batch, augmentation, generator)
        loss = soft_cross_entropy(model(apply_augmentation(images[idx], draw)), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in steps:
            results.append(test_accuracy(model, test_images, test_labels))
    return results


def evaluate_synthetic(make_model: Callable[[], nn.Module], images: torch.Tensor,
                       targets: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, *, models: int = 8,
                       steps: Sequence[int] = DEFAULT_EVAL_STEPS, batch_size: int = 96,
                       lr: float = 1e-3, augmentation: str = "flip_rotate", seed: int = 0,
                       on_model: Callable[[int, list[float]], None] | None = None) -> EvalResult:
    """The paper's protocol over `models` fresh networks (seeded: model i uses seed + i)."""
    steps = tuple(sorted(set(int(s) for s in steps)))
    images, targets = images.detach(), targets.detach()
    accuracies = []
    for i in range(models):
        generator = torch.Generator().manual_seed(seed + i)
        model = make_model()
        reinitialize(model, generator)
        accuracies.append(train_and_test(model, images, targets, test_images, test_labels,
                                         steps=steps, batch_size=batch_size, lr=lr,
                                         augmentation=augmentation, generator=generator))
        if on_model is not None:
            on_model(i, accuracies[-1])
    return EvalResult(steps, accuracies)
