"""Faults injected into trials on purpose, for tests and reliability drills
(docs/reliability.md): an engine error, out-of-memory, a dying worker, or numbers that go bad.

    PODD_SWEEP_FAULTS=faults.json podd-sweep launch SPEC
    # faults.json: [{"trial": "ipc0.5", "step": 40, "kind": "error", "times": 1}]

Only the trainable calls `FaultPlan.maybe_fail`; the numeric faults act on the distiller
through its public hooks (its poster, and `real_batch_transform` on the real batches).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

FAULTS_ENV = "PODD_SWEEP_FAULTS"  # a JSON file of faults to inject (tests, docs/reliability.md)
# Fault kinds that damage the numbers of a running distillation: they need a distiller (step >= 1)
# and are found by the engine's own finiteness checks at the next outer step.
NUMERIC_FAULTS = ("nan", "nan-poster", "inf-poster", "nan-loss")
FAULT_KINDS = ("error", "oom", "exit", *NUMERIC_FAULTS)


@dataclass
class FaultPlan:
    """Faults injected into trials, for tests and reliability drills. The file named by the
    environment variable PODD_SWEEP_FAULTS (on the driver) holds a JSON list of
    {"trial": NAME-SUBSTRING, "step": N, "kind": KIND, "times": K}: the K first times a matching
    trial reaches outer step N, it fails that way. KIND: `error` (an engine exception), `oom`
    (torch.OutOfMemoryError), `exit` (the worker process dies), `nan-poster` (or `nan`) and
    `inf-poster` (the poster's pixels become NaN / +inf), `nan-loss` (the real-batch loss of
    the following steps is NaN)."""

    path: str | None = None

    def maybe_fail(self, trial_name: str, step: int, distiller=None) -> None:
        if not self.path or not Path(self.path).exists():
            return
        for index, fault in enumerate(json.loads(Path(self.path).read_text())):
            if fault.get("trial", "") not in trial_name or int(fault.get("step", 0)) != step:
                continue
            kind = fault.get("kind", "error")
            if kind not in FAULT_KINDS:
                raise ValueError(f"{self.path}: fault {index}: unknown kind {kind!r}; one of "
                                 f"{', '.join(FAULT_KINDS)}")
            if kind in NUMERIC_FAULTS and distiller is None:
                raise ValueError(f"{self.path}: fault {index}: kind {kind!r} needs a running "
                                 f"distillation: give a step of 1 or more")
            fired = Path(f"{self.path}.fired") / f"{index}-{trial_name}"
            fired.parent.mkdir(parents=True, exist_ok=True)
            count = int(fired.read_text()) if fired.exists() else 0
            if count >= int(fault.get("times", 1)):
                continue
            fired.write_text(str(count + 1))
            _inject(kind, step, distiller)


def _inject(kind: str, step: int, distiller) -> None:
    import torch

    if kind in ("nan", "nan-poster", "inf-poster"):
        with torch.no_grad():
            distiller.poster.fill_(float("inf") if kind == "inf-poster" else float("nan"))
    elif kind == "nan-loss":
        _poison_real_batches(distiller)
    elif kind == "oom":
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
    elif kind == "exit":
        os._exit(17)  # the worker process dies, as when a node is lost
    else:
        raise RuntimeError(f"injected fault at step {step}")


def _poison_real_batches(distiller) -> None:
    """From the next outer step on, the real images the poster is scored on are NaN, so the
    real-batch loss is NaN: what a diverged loss looks like to the engine. The engine's own
    check must catch it (nothing here raises). Only this distiller's batches change: the data
    set's tensors, memory-mapped and shared, stay untouched."""
    import torch

    distiller.real_batch_transform = lambda images, labels: (
        torch.full_like(images, float("nan")), labels)
