"""RaT-BPTT: the outer loop that optimises a poster (and learned labels).

Every outer step:
  1. a fresh, randomly initialised network;
  2. a random curriculum start c ~ U[0, T - dT]: c ordinary inner Adam steps with no graph;
  3. dT differentiable inner Adam steps on random batches of augmented poster patches (the inner
     Adam state carries over from step 2);
  4. the cross-entropy of the final network on an augmented real batch;
  5. its gradient flows back through the dT steps to the poster (and learned labels); the poster
     gradient is clipped to 2x an EMA (0.9) of its norm; an outer Adam step; labels clipped >= 0.

The inner loop is functional (`torch.func.functional_call` with a parameter dict, the pieces in
`podd_engine/inner.py`), not `higher`.
Backpropagation through the dT steps has two equivalent implementations (tests check they give
the same gradient as a plain full-autograd reference):
  - "store": the classic way: the graph of all dT steps is kept, one backward at the end;
    memory grows with dT (about 330 MB per step at the CIFAR-10 paper geometry).
  - "recompute": all inner steps run without a graph; the network and Adam state before each of
    the dT steps are kept (a few MB each); then a reverse sweep rebuilds one step's graph at a
    time and pushes the adjoint (dL/dparams, dL/dm, dL/dv) through it. Memory: one step's graph,
    whatever dT is; cost: one extra forward/backward per unrolled step.
The real batch is processed in chunks (first-order only), so its size is not bounded by memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from podd_engine.config import UNROLL_MODES
from podd_engine.cuda_graphs import StepGraphs, cuda_graphs_supported
from podd_engine.inner import (AdamState, InnerBatch, InnerSchedule, Params, SyntheticSet,
                               autocast_for, inner_step, upcast)
from podd_engine.models import reinitialize
from podd_engine.preprocess import AugmentationDraw, apply_augmentation, draw_augmentation


class NonFiniteError(FloatingPointError):
    """The loss or the poster became NaN/inf; the trial should stop rather than burn budget."""


# --------------------------------------------------------------------------------------------
# The meta-gradient of one outer step
# --------------------------------------------------------------------------------------------

@dataclass
class MetaGradient:
    poster: torch.Tensor
    label_array: torch.Tensor | None
    real_loss: float
    real_accuracy: float
    curriculum_start: int


def real_loss_gradient(model: nn.Module, params: Params, images: torch.Tensor,
                       labels: torch.Tensor, draw: AugmentationDraw, chunk: int,
                       precision: str) -> tuple[Params, float, float]:
    """dL/dparams of the mean cross-entropy on the (augmented) real batch, in chunks."""
    leaf = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    total = {k: torch.zeros_like(p) for k, p in leaf.items()}
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        part = AugmentationDraw(draw.op, draw.values[start:stop] if draw.values.numel() else
                                draw.values)
        x = apply_augmentation(images[start:stop], part)
        with autocast_for(x.device, precision):
            logits = upcast(functional_call(model, leaf, (x,)), x.dtype)
        loss = F.cross_entropy(logits, labels[start:stop], reduction="sum") / len(images)
        for k, g in zip(leaf, torch.autograd.grad(loss, list(leaf.values()))):
            total[k] += g
        loss_sum += float(loss.detach())
        correct += int((logits.argmax(1) == labels[start:stop]).sum())
    return total, loss_sum, correct / len(images)


@dataclass(frozen=True)
class OuterPlan:
    """Every random choice of one outer step, drawn up front (so it can be replayed)."""

    curriculum: list[InnerBatch]  # the c ordinary steps
    window: list[InnerBatch]  # the dT differentiable steps
    real_augmentation: AugmentationDraw

    @property
    def curriculum_start(self) -> int:
        return len(self.curriculum)


def draw_plan(num_patches: int, real_batch: int, schedule: InnerSchedule,
              generator: torch.Generator, device: torch.device | str = "cpu",
              curriculum_start: int | None = None) -> OuterPlan:
    if curriculum_start is None:
        high = schedule.total_steps - schedule.window
        curriculum_start = int(torch.randint(0, high + 1, (1,), generator=generator))
    batch = min(schedule.batch_size, num_patches)
    steps = curriculum_start + schedule.window
    indices, draws = [], []
    for _ in range(steps):
        indices.append(torch.randperm(num_patches, generator=generator)[:batch].sort().values)
        draws.append(draw_augmentation(batch, schedule.augmentation, generator))
    # one host-to-device copy of every step's patch indices instead of one per inner step
    on_device = torch.stack(indices).to(device) if steps else torch.empty(0, batch)
    inner = [InnerBatch(on_device[i], draws[i]) for i in range(steps)]
    return OuterPlan(inner[:curriculum_start], inner[curriculum_start:],
                     draw_augmentation(real_batch, schedule.augmentation, generator))


def meta_gradient(
    model: nn.Module,
    initial: AdamState,
    synthetic: SyntheticSet,
    poster: torch.Tensor,
    label_array: torch.Tensor,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    schedule: InnerSchedule,
    plan: OuterPlan,
    *,
    unroll: str = "recompute",
    real_chunk: int = 1000,
    precision: str = "fp32",
    learn_labels: bool = False,
    graphs: StepGraphs | None = None,
) -> MetaGradient:
    """Gradient of the real-batch loss after the inner loop w.r.t. the poster (and labels),
    starting from the network state `initial` (it is consumed). With `graphs` (CUDA, fp32)
    the inner steps are replayed from captured CUDA graphs (podd_engine/cuda_graphs.py)."""
    if unroll not in UNROLL_MODES:
        raise ValueError(f"unroll must be one of {', '.join(UNROLL_MODES)}, got {unroll!r}")
    state = initial
    if graphs is not None:
        state = graphs.begin(state, poster, label_array)

    def plain_step(inner: InnerBatch) -> None:
        if graphs is not None:
            graphs.plain_step(state, inner)
        else:
            inner_step(model, state, synthetic, poster, label_array, inner, schedule, precision,
                       differentiable=False)

    for inner in plan.curriculum:  # curriculum: ordinary steps, no graph
        plain_step(inner)

    poster_leaf = poster.detach().requires_grad_(True)
    labels_leaf = label_array.detach().requires_grad_(learn_labels)
    wrt = [poster_leaf] + ([labels_leaf] if learn_labels else [])

    if unroll == "store":
        if graphs is not None:  # leave the graphs' static tensors alone from here on
            state = state.clone()
        for p in state.params.values():
            p.requires_grad_(True)
        for inner in plan.window:
            state = inner_step(model, state, synthetic, poster_leaf, labels_leaf, inner,
                               schedule, precision, differentiable=True)
        grad_params, loss, accuracy = real_loss_gradient(
            model, state.params, real_images, real_labels, plan.real_augmentation, real_chunk,
            precision)
        keys = list(state.params)
        grads = torch.autograd.grad([state.params[k] for k in keys], wrt,
                                    [grad_params[k] for k in keys], allow_unused=True)
    else:
        saved: list[AdamState] = []
        for inner in plan.window:  # forward without a graph, remembering each step's input state
            saved.append(state.clone())
            plain_step(inner)
        grad_params, loss, accuracy = real_loss_gradient(
            model, state.params, real_images, real_labels, plan.real_augmentation, real_chunk,
            precision)
        if graphs is not None:
            grads = _reverse_sweep_graphed(graphs, saved, plan.window, grad_params)
        else:
            grads = _reverse_sweep(model, synthetic, saved, plan.window, grad_params,
                                   poster_leaf, labels_leaf, wrt, schedule, precision)
    poster_grad = grads[0] if grads[0] is not None else torch.zeros_like(poster)
    label_grad = None
    if learn_labels:
        label_grad = grads[1] if grads[1] is not None else torch.zeros_like(label_array)
    return MetaGradient(poster_grad, label_grad, loss, accuracy, plan.curriculum_start)


def _reverse_sweep(model: nn.Module, synthetic: SyntheticSet, saved: list[AdamState],
                   window: list[InnerBatch], grad_params: Params, poster_leaf: torch.Tensor,
                   labels_leaf: torch.Tensor, wrt: list[torch.Tensor], schedule: InnerSchedule,
                   precision: str) -> list[torch.Tensor | None]:
    """Backpropagate dL/dparams_T through the window one recomputed step at a time."""
    keys = list(grad_params)
    adj_params = grad_params
    adj_m = {k: torch.zeros_like(t) for k, t in grad_params.items()}
    adj_v = {k: torch.zeros_like(t) for k, t in grad_params.items()}
    totals: list[torch.Tensor | None] = [None] * len(wrt)
    for state, inner in zip(reversed(saved), reversed(window)):
        leaf = AdamState(*({k: t.requires_grad_(True) for k, t in d.items()}
                           for d in (state.params, state.m, state.v)), state.step)
        new = inner_step(model, leaf, synthetic, poster_leaf, labels_leaf, inner, schedule,
                         precision, differentiable=True)
        outputs = [new.params[k] for k in keys] + [new.m[k] for k in keys] + [new.v[k] for k in keys]
        adjoints = ([adj_params[k] for k in keys] + [adj_m[k] for k in keys]
                    + [adj_v[k] for k in keys])
        inputs = ([leaf.params[k] for k in keys] + [leaf.m[k] for k in keys]
                  + [leaf.v[k] for k in keys] + wrt)
        grads = torch.autograd.grad(outputs, inputs, adjoints, allow_unused=True)
        n = len(keys)
        adj_params = {k: _or_zero(g, leaf.params[k]) for k, g in zip(keys, grads[:n])}
        adj_m = {k: _or_zero(g, leaf.m[k]) for k, g in zip(keys, grads[n:2 * n])}
        adj_v = {k: _or_zero(g, leaf.v[k]) for k, g in zip(keys, grads[2 * n:3 * n])}
        for i, g in enumerate(grads[3 * n:]):
            if g is not None:
                totals[i] = g if totals[i] is None else totals[i] + g
    return totals


def _reverse_sweep_graphed(graphs: StepGraphs, saved: list[AdamState], window: list[InnerBatch],
                           grad_params: Params) -> list[torch.Tensor | None]:
    """`_reverse_sweep` with each step replayed from a CUDA graph."""
    keys = list(grad_params)
    adjoint = ([grad_params[k] for k in keys] + [torch.zeros_like(grad_params[k]) for k in keys]
               + [torch.zeros_like(grad_params[k]) for k in keys])
    totals: list[torch.Tensor | None] = []
    for state, inner in zip(reversed(saved), reversed(window)):
        outputs, wrt_grads = graphs.reverse_step(state, inner, adjoint)
        adjoint = outputs  # copied into the graph's input before its next replay
        if not totals:
            totals = [None if g is None else g.clone() for g in wrt_grads]
        else:
            totals = [t if g is None else (g.clone() if t is None else t + g)
                      for t, g in zip(totals, wrt_grads)]
    return totals


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad.detach() if grad is not None else torch.zeros_like(like)


# --------------------------------------------------------------------------------------------
# The outer loop
# --------------------------------------------------------------------------------------------

@dataclass
class OuterSettings:
    lr: float = 1e-3  # outer Adam on the poster
    label_lr_scale: float = 1.0  # learned labels use lr / label_lr_scale
    clip_coef: float = 0.9  # EMA coefficient of the poster-gradient norm
    clip_factor: float = 2.0  # clip to clip_factor x EMA
    real_batch: int = 5000
    real_chunk: int = 1000
    unroll: str = "recompute"
    precision: str = "fp32"
    cuda_graphs: bool = True  # replay inner steps from CUDA graphs (CUDA, fp32 only)
    # when the curriculum start is drawn: every outer step, or once per epoch over the real
    # data and shared by its outer steps (the official code)
    curriculum: str = "step"


def clip_to_ema(grad: torch.Tensor, ema: float | None, coef: float = 0.9,
                factor: float = 2.0) -> tuple[torch.Tensor, float]:
    """Clip `grad` to `factor` x an exponential moving average of gradient norms (the first
    norm starts the average; the current norm is included before clipping, as the official
    code). Returns the clipped gradient and the updated average."""
    norm = float(grad.norm())
    ema = norm if ema is None else coef * ema + (1 - coef) * norm
    limit = factor * ema
    return grad * min(1.0, limit / (norm + 1e-6)), ema


@dataclass
class StepMetrics:
    step: int
    loss: float
    real_accuracy: float
    grad_norm: float
    grad_norm_ema: float
    curriculum_start: int
    seconds: float


@dataclass
class Distiller:
    """Holds the poster, labels and optimiser; `step()` runs one RaT-BPTT outer step."""

    model: nn.Module
    synthetic: SyntheticSet
    poster: torch.Tensor
    real_images: torch.Tensor  # preprocessed training images on the device
    real_labels: torch.Tensor
    schedule: InnerSchedule
    outer: OuterSettings
    generator: torch.Generator
    step_count: int = 0
    grad_norm_ema: float | None = None
    optimizer: torch.optim.Adam = field(init=False)
    _order: torch.Tensor | None = field(default=None, init=False)
    _cursor: int = field(default=0, init=False)
    _graphs: StepGraphs | None = field(default=None, init=False)
    _epoch_curriculum: int | None = field(default=None, init=False)  # curriculum "epoch"
    # a hook on every real batch before it is used, (images, labels) -> (images, labels): for
    # fault injection in drills (orchestrator.faults); None in normal runs
    real_batch_transform: Callable | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.poster = self.poster.detach().requires_grad_(True)
        groups = [{"params": [self.poster], "lr": self.outer.lr}]
        if self.learn_labels:
            self.synthetic.labels.array = self.synthetic.labels.array.detach().requires_grad_(True)
            groups.append({"params": [self.synthetic.labels.array],
                           "lr": self.outer.lr / self.outer.label_lr_scale})
        self.optimizer = torch.optim.Adam(groups)

    @property
    def learn_labels(self) -> bool:
        return self.synthetic.labels.mode == "learned"

    def step_graphs(self) -> StepGraphs | None:
        """The captured inner steps, made on first use (None where graphs are not used)."""
        if self._graphs is None and self.outer.cuda_graphs and cuda_graphs_supported(
                self.poster.device, self.outer.precision):
            self._graphs = StepGraphs(self.model, self.synthetic, self.schedule,
                                      self.learn_labels, self.poster,
                                      self.synthetic.labels.array)
        return self._graphs

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Epochs over the training set in a seeded random order (like a shuffled loader)."""
        n = len(self.real_images)
        size = min(self.outer.real_batch, n)
        if self._order is None or self._cursor + size > n:
            self._order = torch.randperm(n, generator=self.generator)
            self._cursor = 0
            if self.outer.curriculum == "epoch":  # one start for the whole epoch
                high = self.schedule.total_steps - self.schedule.window
                self._epoch_curriculum = int(torch.randint(0, high + 1, (1,),
                                                           generator=self.generator))
        idx = self._order[self._cursor:self._cursor + size].to(self.real_images.device)
        self._cursor += size
        return self.real_images[idx], self.real_labels[idx]

    def step(self) -> StepMetrics:
        start = time.perf_counter()
        images, labels = self._real_batch()
        if self.real_batch_transform is not None:
            images, labels = self.real_batch_transform(images, labels)
        reinitialize(self.model, self.generator)  # a fresh network every outer step
        plan = draw_plan(self.synthetic.geometry.num_patches, len(images), self.schedule,
                         self.generator, self.poster.device,
                         curriculum_start=self._epoch_curriculum)
        result = meta_gradient(self.model, AdamState.fresh(self.model), self.synthetic,
                               self.poster.detach(), self.synthetic.labels.array.detach(),
                               images, labels, self.schedule, plan, unroll=self.outer.unroll,
                               real_chunk=self.outer.real_chunk, precision=self.outer.precision,
                               learn_labels=self.learn_labels, graphs=self.step_graphs())
        if not math.isfinite(result.real_loss) or not torch.isfinite(result.poster).all():
            raise NonFiniteError(f"outer step {self.step_count + 1}: the real-batch loss or the "
                                 f"poster gradient is not finite (loss {result.real_loss})")
        grad_norm = float(result.poster.norm())
        poster_grad, self.grad_norm_ema = clip_to_ema(result.poster, self.grad_norm_ema,
                                                      self.outer.clip_coef, self.outer.clip_factor)
        self.optimizer.zero_grad(set_to_none=True)
        self.poster.grad = poster_grad
        if self.learn_labels:
            self.synthetic.labels.array.grad = result.label_array
        self.optimizer.step()
        self.synthetic.labels.clip_()
        if not torch.isfinite(self.poster).all():
            raise NonFiniteError(f"outer step {self.step_count + 1}: the poster is not finite")
        self.step_count += 1
        return StepMetrics(self.step_count, result.real_loss, result.real_accuracy, grad_norm,
                           self.grad_norm_ema, result.curriculum_start,
                           time.perf_counter() - start)

    def run(self, steps: int, on_step: Callable[[StepMetrics], None] | None = None) -> None:
        while self.step_count < steps:
            metrics = self.step()
            if on_step is not None:
                on_step(metrics)

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"poster": self.poster.detach().cpu(),
                "label_array": self.synthetic.labels.array.detach().cpu(),
                "optimizer": self.optimizer.state_dict(), "step": self.step_count,
                "grad_norm_ema": self.grad_norm_ema,
                "generator": self.generator.get_state(),
                "order": None if self._order is None else self._order.cpu(),
                "cursor": self._cursor, "epoch_curriculum": self._epoch_curriculum}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.poster.copy_(state["poster"])
            self.synthetic.labels.array.copy_(state["label_array"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.grad_norm_ema = state["grad_norm_ema"]
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._cursor = int(state["cursor"])
        self._epoch_curriculum = state.get("epoch_curriculum")  # older checkpoints: per step
