"""CUDA graphs for the inner steps of RaT-BPTT.

On a GPU an eager inner step is bound by kernel launches, not by arithmetic: at the CIFAR-10
paper geometry (96 patches of 32x32, ConvNet-128) a step launches a few hundred small kernels
and an H100 is busy for about 40 % of the step's wall time (docs/benchmarks.md). The inner
steps all have the same shapes, so each kind of step is captured once as a CUDA graph and then
replayed: one launch instead of hundreds, with the same kernels on the same data.

Two kinds of step are captured, each once per augmentation operation (flip, rotate, none):
  plain    the no-graph Adam step of the curriculum and of the recompute forward pass;
  reverse  one step of the recompute reverse sweep: rebuild the step's graph from its saved
           input state and push the adjoint (dL/dparams, dL/dm, dL/dv) through it.

Graphs read and write fixed ("static") tensors: before a replay the step's inputs (patch
indices, augmentation values, the Adam step's bias corrections) are copied into them. The
bias corrections change every step, so the graphed Adam takes them as device tensors; it
computes the same update as `inner.adam_update`, up to float32 rounding (tests compare
the meta-gradient with and without graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from podd_engine.inner import (AdamState, InnerBatch, adam_scalars, adam_update_differentiable,
                               adam_update_static_, inner_loss)
from podd_engine.preprocess import AugmentationDraw


def cuda_graphs_supported(device: torch.device, precision: str) -> bool:
    """Graphs are used for fp32 steps on CUDA devices. (bf16 autocast caches weight casts,
    which a captured graph would freeze.)"""
    return device.type == "cuda" and precision == "fp32"


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    outputs: list[torch.Tensor | None]


class StepGraphs:
    """Captured inner steps for one network and one poster geometry on one CUDA device.

    Use: `state = graphs.begin(state, poster, label_array)` at the start of an outer step (the
    returned state's tensors are the graphs' static tensors), then `plain_step(state, inner)`
    for each no-graph step and `reverse_step(...)` in the reverse sweep.
    """

    def __init__(self, model: nn.Module, synthetic, schedule, learn_labels: bool,
                 poster: torch.Tensor, label_array: torch.Tensor) -> None:
        self.model, self.synthetic, self.schedule = model, synthetic, schedule
        self.learn_labels = learn_labels
        device = poster.device
        self.device = device
        batch = min(schedule.batch_size, synthetic.geometry.num_patches)
        self.indices = torch.zeros(batch, dtype=torch.long, device=device)
        self.augmentation = {"flip": torch.zeros(batch, dtype=torch.bool, device=device),
                             "rotate": torch.zeros(batch, device=device),
                             "none": torch.empty(0, device=device)}
        # step size and sqrt(bias correction 2), in the poster's dtype
        self.scalars = torch.zeros(2, device=device, dtype=poster.dtype)
        self.poster = poster.detach().clone().requires_grad_(True)
        self.labels = label_array.detach().clone().requires_grad_(learn_labels)
        fresh = AdamState.fresh(model)
        # the plain step's state, updated in place; params are leaves that need gradients
        self.state = AdamState({k: p.requires_grad_(True) for k, p in fresh.params.items()},
                               fresh.m, fresh.v)
        # the reverse step's input state and incoming adjoints
        self.leaf = fresh.clone()
        for d in (self.leaf.params, self.leaf.m, self.leaf.v):
            for t in d.values():
                t.requires_grad_(True)
        self.adjoint = [torch.zeros_like(t) for t in self._flat(fresh)]
        self._graphs: dict[tuple[str, str], _Captured] = {}

    @staticmethod
    def _flat(state) -> list[torch.Tensor]:
        return [*state.params.values(), *state.m.values(), *state.v.values()]

    # ---- the outer step's inputs --------------------------------------------------------------
    @torch.no_grad()
    def begin(self, state, poster: torch.Tensor, label_array: torch.Tensor):
        """Load the outer step's starting network state, poster and labels into the static
        tensors; returns the state to pass to `plain_step` (it aliases the static tensors)."""
        torch._foreach_copy_(self._flat(self.state), self._flat(state))
        self.state.step = state.step
        self.poster.copy_(poster)
        self.labels.copy_(label_array)
        return self.state

    def _load_inner(self, inner, step: int) -> str:
        """Copy one inner step's random choices and Adam scalars into the static tensors."""
        self.indices.copy_(inner.indices, non_blocking=True)
        op = inner.augmentation.op
        if op != "none":
            self.augmentation[op].copy_(inner.augmentation.values, non_blocking=True)
        step_size, bias2_sqrt = adam_scalars(step, self.schedule.lr, self.schedule.betas)
        self.scalars.copy_(torch.tensor([step_size, bias2_sqrt], dtype=torch.float64))
        return op

    def _batch(self, op: str, poster: torch.Tensor, labels: torch.Tensor):
        draw = AugmentationDraw(op, self.augmentation[op])
        return self.synthetic.batch(poster, labels, InnerBatch(self.indices, draw))

    # ---- plain step ---------------------------------------------------------------------------
    def _plain_body(self, op: str) -> Callable[[], list]:
        def body() -> list:
            with torch.no_grad():
                images, targets = self._batch(op, self.poster, self.labels)
            params = self.state.params
            loss = inner_loss(self.model, params, images, targets, "fp32")
            grads = torch.autograd.grad(loss, list(params.values()))
            adam_update_static_(list(params.values()), list(self.state.m.values()),
                                list(self.state.v.values()), list(grads), self.scalars[0],
                                self.scalars[1], self.schedule.betas, self.schedule.eps)
            return []
        return body

    def plain_step(self, state, inner) -> None:
        """One no-graph inner Adam step on the static state (as `inner_step(differentiable=
        False)`)."""
        assert state is self.state, "plain_step runs on the state returned by begin()"
        op = self._load_inner(inner, state.step + 1)
        self._replay(("plain", op), self._plain_body(op))
        state.step += 1

    # ---- reverse step -------------------------------------------------------------------------
    def _reverse_body(self, op: str) -> Callable[[], list]:
        keys = list(self.leaf.params)
        wrt = [self.poster] + ([self.labels] if self.learn_labels else [])

        def body() -> list:
            images, targets = self._batch(op, self.poster, self.labels)
            params = [self.leaf.params[k] for k in keys]
            loss = inner_loss(self.model, self.leaf.params, images, targets, "fp32")
            grads = torch.autograd.grad(loss, params, create_graph=True)
            outputs = []
            news = [adam_update_differentiable(self.leaf.params[k], self.leaf.m[k],
                                               self.leaf.v[k], g, self.scalars[0],
                                               self.scalars[1], self.schedule.betas,
                                               self.schedule.eps) for k, g in zip(keys, grads)]
            for i in range(3):  # params, then m, then v: the order of _flat
                outputs += [new[i] for new in news]
            return list(torch.autograd.grad(outputs, self._flat(self.leaf) + wrt, self.adjoint,
                                            allow_unused=True))
        return body

    def reverse_step(self, saved, inner, adjoint: list[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Push `adjoint` (dL/d(params, m, v) after the step, flat in params/m/v order) back
        through the step that started from `saved`. Returns the adjoint before the step and
        the gradients w.r.t. the poster (and the label array). The returned tensors are the
        graph's outputs: consume them before the next reverse_step."""
        with torch.no_grad():
            torch._foreach_copy_(self._flat(self.leaf), self._flat(saved))
            torch._foreach_copy_(self.adjoint, adjoint)
        op = self._load_inner(inner, saved.step + 1)
        outputs = self._replay(("reverse", op), self._reverse_body(op))
        n = len(self.adjoint)
        before = [g if g is not None else torch.zeros_like(t)
                  for g, t in zip(outputs[:n], self.adjoint)]
        return before, outputs[n:]

    # ---- capture and replay -------------------------------------------------------------------
    def _replay(self, key: tuple[str, str], body: Callable[[], list]) -> list:
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(body)
        captured.graph.replay()
        return captured.outputs

    def _capture(self, body: Callable[[], list]) -> _Captured:
        # Warm up on a side stream first (as CUDA graph capture requires): lazy initialisation
        # (cuDNN handles, autograd's device threads, cached index tensors) must not be captured.
        # The warm-up overwrites the static tensors, so the current values are kept and restored.
        keep = [t.detach().clone() for t in self._flat(self.state) + self._flat(self.leaf)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body()
        with torch.no_grad():
            torch._foreach_copy_(self._flat(self.state) + self._flat(self.leaf), keep)
        return _Captured(graph, outputs)
