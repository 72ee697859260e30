"""The methods podd-sweep runs, one registry entry each.

An entry says what a method makes and how it takes part in a comparison:
  role     poster    judged: the lowest IPC at which it beats the baseline is the answer
           baseline  the reference a poster must beat (RaT-BPTT's whole images, 1 IPC)
           control   not distilled: real images with the same storage, the floor
  distils  whether it runs the RaT-BPTT outer loop (a control is evaluated as it is made)
  ignores  settings that have no effect on it; they are reset to their defaults so that two
           trials that run the same computation compare (and hash) equal
  whole_ipc  its IPC counts whole images per class (not a pixel budget)
  layout   poster: a poster of about IPC x n images' pixels in the class grid's aspect, cut into
           the patch grid (PoDD's geometry); tiled: IPC whole images per class cell, no overlap
  geometry a method's own geometry, (config, data set) -> PosterGeometry, where neither layout
           fits (None: by layout)

Torch-free: the spec, the recorder and the report ask it without loading the engine.
Adding a method is one `register_method` entry (here, or from a plug-in or a test) plus its
code: a geometry function where neither layout fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POSTER, BASELINE, CONTROL = "poster", "baseline", "control"

# The settings that make up one poster *configuration* at an IPC: the report averages a
# configuration over its seeds and, at each IPC, judges the best configuration. Everything
# else that changes results (steps, horizon, network, evaluation, data) is the *schedule*:
# runs of different schedules are never averaged or compared with each other.
CONFIGURATION_AXES = ("patch_grid", "order", "order_grid", "labels", "label_pooling",
                      "embedder", "clip_model", "clip_pretrained", "clip_weights", "clip_mode")
# How PoCO's text encoder is chosen: meaningless without a class layout to order.
_ORDERING_SETTINGS = ("order", "order_grid", "embedder", "clip_model", "clip_pretrained",
                      "clip_weights", "clip_mode")
# What only the distillation uses; an undistilled control ignores it.
_DISTILLATION_SETTINGS = ("steps", "total_inner_steps", "window", "real_batch", "real_chunk",
                          "lr", "label_lr_scale", "clip_coef", "unroll", "precision",
                          "cuda_graphs", "init", "eval_every", "curriculum")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    role: str
    distils: bool = True
    whole_ipc: bool = False
    ignores: tuple[str, ...] = ()
    layout: str = "poster"
    geometry: Callable[[Any, Any], Any] | None = None

    @property
    def uses_patch_grid(self) -> bool:
        return "patch_grid" not in self.ignores

    @property
    def uses_order(self) -> bool:
        return "order" not in self.ignores

    def final_step(self, steps: int) -> int:
        """The outer step its final evaluation is recorded at (0: nothing is distilled)."""
        return steps if self.distils else 0


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.role not in (POSTER, BASELINE, CONTROL):
        raise ValueError(f"method {method.name!r}: role must be {POSTER}, {BASELINE} or "
                         f"{CONTROL}, got {method.role!r}")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove an entry (tests register toy methods and clean up after themselves)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}, got {name!r}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods_with_role(role: str) -> tuple[str, ...]:
    return tuple(m.name for m in _REGISTRY.values() if m.role == role)


register_method(Method(
    "podd", "a poster whose overlapping patches are the images (PoCO layout, PoDDL labels)",
    POSTER))
register_method(Method(
    "rat-bptt", "the paper's baseline: IPC whole images per class, exactly tiled, no overlap",
    BASELINE, whole_ipc=True, ignores=("patch_grid", "label_pooling") + _ORDERING_SETTINGS,
    layout="tiled"))  # whole tiles read whole label cells, however the window is pooled
register_method(Method(
    "random-real", "real training images laid out as the poster would be (class grid, same "
    "pixels, same patches and labels), not distilled", CONTROL, distils=False,
    ignores=_DISTILLATION_SETTINGS))
