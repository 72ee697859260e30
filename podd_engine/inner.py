"""The inner loop's building blocks, shared by RaT-BPTT (`rat_bptt`), its CUDA graphs
(`cuda_graphs`) and the evaluation (`evaluate`): the schedule, the functional network and
Adam state, one inner batch, the soft cross-entropy, and Adam's update written four ways,
side by side so they stay the same arithmetic:

  adam_update                 out of place, differentiable (the unrolled window)
  adam_update_                in place, no graph (curriculum and recompute forward steps)
  adam_update_differentiable  out of place with device-tensor scalars (graphed reverse step)
  adam_update_static_         in place with device-tensor scalars (graphed plain step)

`adam_update` and `adam_update_` use the same operations, so a replayed step matches bit for
bit; the graphed pair computes the same update up to float32 rounding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from podd_engine.config import PRECISIONS
from podd_engine.labels import PosterLabels
from podd_engine.poster import PosterGeometry, extract_patches
from podd_engine.preprocess import AugmentationDraw, apply_augmentation

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class InnerSchedule:
    """Inner-loop settings of RaT-BPTT (and of the evaluation's training)."""

    total_steps: int = 200  # T: curriculum start + unrolled window never exceed it
    window: int = 60  # dT: differentiable (unrolled) steps
    batch_size: int = 96  # poster patches per inner step
    lr: float = 1e-3  # inner Adam
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    augmentation: str = "flip_rotate"

    def __post_init__(self) -> None:
        if not 1 <= self.window <= self.total_steps:
            raise ValueError(f"window must be between 1 and total_steps ({self.total_steps}), "
                             f"got {self.window}")


@dataclass
class AdamState:
    params: Params
    m: Params
    v: Params
    step: int = 0

    @classmethod
    def fresh(cls, model: nn.Module) -> "AdamState":
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        return cls(params, {k: torch.zeros_like(p) for k, p in params.items()},
                   {k: torch.zeros_like(p) for k, p in params.items()})

    def clone(self) -> "AdamState":
        """A copy that shares nothing with this state, not even an autograd history."""
        return AdamState(*({k: t.detach().clone() for k, t in d.items()}
                           for d in (self.params, self.m, self.v)), self.step)


@dataclass(frozen=True)
class InnerBatch:
    """The random choices of one inner step (kept so the step can be replayed exactly)."""

    indices: torch.Tensor  # patch indices
    augmentation: AugmentationDraw


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against label distributions."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) derivative at 0: a parameter whose gradient is exactly zero
    (a dead ReLU unit) must not turn the meta-gradient into NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))),
                       torch.zeros_like(x))


def adam_update(state: AdamState, grads: Params, lr: float, betas: tuple[float, float],
                eps: float) -> AdamState:
    """torch.optim.Adam's update (no weight decay, no amsgrad), out of place and differentiable.
    It uses the same operations as `adam_update_`, so a replayed step matches bit for bit."""
    b1, b2 = betas
    step = state.step + 1
    step_size, bias2_sqrt = adam_scalars(step, lr, betas)
    params, m, v = {}, {}, {}
    for k, p in state.params.items():
        m[k] = torch.lerp(state.m[k], grads[k], 1 - b1)
        v[k] = torch.addcmul(state.v[k] * b2, grads[k], grads[k], value=1 - b2)
        denom = safe_sqrt(v[k]) / bias2_sqrt + eps
        params[k] = torch.addcdiv(p, m[k], denom, value=step_size)
    return AdamState(params, m, v, step)


@torch.no_grad()
def adam_update_(state: AdamState, grads: Params, lr: float, betas: tuple[float, float],
                 eps: float) -> None:
    """The same update in place, for steps that need no graph (fused foreach kernels)."""
    b1, b2 = betas
    state.step += 1
    step_size, bias2_sqrt = adam_scalars(state.step, lr, betas)
    keys = list(state.params)
    params = [state.params[k] for k in keys]
    m, v, g = [state.m[k] for k in keys], [state.v[k] for k in keys], [grads[k] for k in keys]
    torch._foreach_lerp_(m, g, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g, g, value=1 - b2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=step_size)


@dataclass
class SyntheticSet:
    """What the inner loop trains on: poster patches and their labels."""

    geometry: PosterGeometry
    labels: PosterLabels

    def batch(self, poster: torch.Tensor, label_array: torch.Tensor, inner: InnerBatch
              ) -> tuple[torch.Tensor, torch.Tensor]:
        patches = extract_patches(poster, self.geometry, inner.indices)
        return (apply_augmentation(patches, inner.augmentation),
                self.labels.patch_labels(inner.indices, label_array))


def inner_loss(model: nn.Module, params: Params, images: torch.Tensor, targets: torch.Tensor,
               precision: str) -> torch.Tensor:
    with autocast_for(images.device, precision):
        logits = functional_call(model, params, (images,))
    return soft_cross_entropy(upcast(logits, targets.dtype), targets)


def inner_step(model: nn.Module, state: AdamState, synthetic: SyntheticSet, poster: torch.Tensor,
               label_array: torch.Tensor, inner: InnerBatch, schedule: InnerSchedule,
               precision: str = "fp32", differentiable: bool = True) -> AdamState:
    """One inner Adam step. Differentiable: the new state is a function of the old state, the
    poster and the label array. Otherwise: an in-place update with no graph."""
    if not differentiable:
        with torch.no_grad():
            images, targets = synthetic.batch(poster, label_array, inner)
        params = {k: p.requires_grad_(True) for k, p in state.params.items()}
        loss = inner_loss(model, params, images, targets, precision)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        for p in params.values():
            p.requires_grad_(False)
        adam_update_(state, grads, schedule.lr, schedule.betas, schedule.eps)
        return state
    images, targets = synthetic.batch(poster, label_array, inner)
    loss = inner_loss(model, state.params, images, targets, precision)
    grads = torch.autograd.grad(loss, list(state.params.values()), create_graph=True)
    return adam_update(state, dict(zip(state.params, grads)), schedule.lr, schedule.betas,
                       schedule.eps)


def upcast(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Losses are computed in the data's precision (bf16 autocast logits come back to fp32)."""
    return logits if logits.dtype == dtype else logits.to(dtype)


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def adam_scalars(step: int, lr: float, betas: tuple[float, float]) -> tuple[float, float]:
    """The step-dependent scalars of Adam's update at `step` (1-based): the signed step size
    -lr / (1 - b1^t) and sqrt(1 - b2^t); the eager and the graphed Adam updates share them."""
    b1, b2 = betas
    return -lr / (1 - b1 ** step), math.sqrt(1 - b2 ** step)


@torch.no_grad()
def adam_update_static_(params: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                        grads: list[torch.Tensor], step_size: torch.Tensor,
                        bias2_sqrt: torch.Tensor, betas: tuple[float, float], eps: float) -> None:
    """Adam's update in place with the step-dependent scalars as device tensors (capturable)."""
    b1, b2 = betas
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_add_(params, update)


def adam_update_differentiable(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                               grad: torch.Tensor, step_size: torch.Tensor,
                               bias2_sqrt: torch.Tensor, betas: tuple[float, float], eps: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same update out of place and differentiable (for the reverse sweep)."""
    b1, b2 = betas
    m_new = torch.lerp(m, grad, 1 - b1)
    v_new = torch.addcmul(v * b2, grad, grad, value=1 - b2)
    denom = safe_sqrt(v_new) / bias2_sqrt + eps
    return p + step_size * (m_new / denom), m_new, v_new
