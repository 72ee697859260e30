"""Poster geometry: how big a poster is for an IPC, where its patches lie, how they are cut out,
and how a poster is initialised.

Conventions (shared by labels, rendering and artifacts):
  - a poster is a float tensor [C, H, W] (H = rows, W = columns);
  - a grid "X x Y" has X columns and Y rows: class grid ox x oy, patch grid px x py;
  - patch k sits at column index k // py and row index k % py (column-major, as the official
    code enumerates patches), so a patch's flat index is stable across the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from podd_engine.config import POSTER_INITS, parse_grid  # noqa: F401 (re-exported)
from podd_engine.errors import GeometryError




def evenly_spaced(full: int, size: int, count: int) -> list[int]:
    """Start offsets of `count` windows of `size` over `full`: the first at 0, the last flush
    with the far edge, the rest rounded from even spacing (round half to even, like NumPy)."""
    if count == 1:
        return [0]
    step = (full - size) / (count - 1)
    return [int(round(i * step)) for i in range(count)]  # Python's round is half-to-even


def poster_size_for_ipc(ipc: float, image_size: tuple[int, int], num_classes: int,
                        class_grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a poster holding at most ipc * n * H * W pixels, with the aspect ratio
    of the class grid laid out with image-sized cells. E.g. CIFAR-100 at 0.4 IPC -> 202 x 202
    (the paper's example) and CIFAR-10 at 0.9 IPC on a 5x2 grid -> 60 x 153 (the official one)."""
    if ipc <= 0:
        raise GeometryError(f"ipc must be positive, got {ipc}", "ipc")
    h, w = image_size
    cols, rows = class_grid
    budget = ipc * num_classes * h * w
    aspect = (cols * w) / (rows * h)  # width / height
    height = max(1, math.floor(math.sqrt(budget / aspect) + 1e-9))
    width = math.floor(budget / height + 1e-9)
    return height, width


@dataclass(frozen=True)
class PosterGeometry:
    """Everything about a poster's shape: sizes, class grid, patch grid and patch positions."""

    channels: int
    image_size: tuple[int, int]  # (H, W) of one data-set image = one patch
    num_classes: int
    class_grid: tuple[int, int]  # (columns, rows)
    patch_grid: tuple[int, int]  # (columns, rows)
    poster_size: tuple[int, int]  # (height, width)
    requested_ipc: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        cols, rows = self.class_grid
        if cols * rows != self.num_classes:
            raise GeometryError(f"class_grid {cols}x{rows} has {cols * rows} cells but the data set "
                                f"has {self.num_classes} classes: choose a grid whose columns x "
                                f"rows = {self.num_classes}", "class_grid")
        px, py = self.patch_grid
        if px < 1 or py < 1:
            raise GeometryError(f"patch_grid {px}x{py} needs at least one column and one row",
                                "patch_grid")
        (ph, pw), (h, w) = self.poster_size, self.image_size
        if ph < h or pw < w:
            ipc = self.requested_ipc if self.requested_ipc is not None else self.achieved_ipc
            raise GeometryError(f"ipc {ipc:g} gives a {ph}x{pw} poster, smaller than one {h}x{w} "
                                f"image: raise ipc to at least {self.minimum_ipc():.2f} or "
                                f"change class_grid", "ipc")
        # more patch columns (rows) than the poster has pixels across (down) is no grid: the
        # paper's own settings repeat a few start positions (16x6 at 0.3 IPC: 6 rows on 4),
        # so only that is refused
        if px > pw or py > ph:
            raise GeometryError(f"patch_grid {px}x{py} has more patches across or down than "
                                f"the {ph}x{pw} poster has pixels (at most {pw}x{ph}): choose a "
                                f"smaller patch_grid", "patch_grid")

    @classmethod
    def for_ipc(cls, ipc: float, *, channels: int, image_size: tuple[int, int],
                num_classes: int, class_grid: tuple[int, int] | str,
                patch_grid: tuple[int, int] | str) -> "PosterGeometry":
        class_grid = parse_grid(class_grid, "class_grid")
        return cls(channels, tuple(image_size), num_classes, class_grid,
                   parse_grid(patch_grid, "patch_grid"),
                   poster_size_for_ipc(ipc, image_size, num_classes, class_grid),
                   requested_ipc=ipc)

    def minimum_ipc(self) -> float:
        """The smallest IPC whose poster (with this class grid's aspect) still holds one image."""
        (h, w), (cols, rows) = self.image_size, self.class_grid
        aspect = (cols * w) / (rows * h)
        pixels = max(h * h * aspect, w * w / aspect)
        return math.ceil(100 * pixels / (self.num_classes * h * w)) / 100

    @property
    def poster_pixels(self) -> int:
        return self.poster_size[0] * self.poster_size[1]

    @property
    def achieved_ipc(self) -> float:
        """Poster pixels / (n * H * W): the budget the poster really uses."""
        h, w = self.image_size
        return self.poster_pixels / (self.num_classes * h * w)

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @cached_property
    def patch_positions(self) -> torch.Tensor:
        """[P, 2] (top, left) of every patch, in flat patch order (column-major)."""
        (ph, pw), (h, w) = self.poster_size, self.image_size
        xs = evenly_spaced(pw, w, self.patch_grid[0])
        ys = evenly_spaced(ph, h, self.patch_grid[1])
        return torch.tensor([(y, x) for x in xs for y in ys], dtype=torch.long)

    def patch_pixel_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[P, H*W] flat poster-pixel index of every pixel of every patch (cached per device,
        so the inner loop never copies it)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_pixel_index_by_device", {})
        if device not in cache:
            h, w = self.image_size
            rows = self.patch_positions[:, :1] + torch.arange(h)  # [P, h]
            cols = self.patch_positions[:, 1:] + torch.arange(w)  # [P, w]
            index = rows[:, :, None] * self.poster_size[1] + cols[:, None, :]
            cache[device] = index.reshape(len(rows), -1).to(device)
        return cache[device]

    def summary(self) -> dict:
        return {"poster_height": self.poster_size[0], "poster_width": self.poster_size[1],
                "poster_pixels": self.poster_pixels, "achieved_ipc": round(self.achieved_ipc, 4),
                "class_grid": f"{self.class_grid[0]}x{self.class_grid[1]}",
                "patch_grid": f"{self.patch_grid[0]}x{self.patch_grid[1]}",
                "num_patches": self.num_patches}


def extract_patches(poster: torch.Tensor, geometry: PosterGeometry,
                    indices: torch.Tensor | None = None) -> torch.Tensor:
    """Cut patches out of a [C, H, W] poster -> [B, C, h, w], in one gather (no Python loop).

    Differentiable: the gradient of overlapping patches adds up on the shared poster pixels.
    `indices` selects a subset of the flat patch indices (default: all patches).
    """
    pixel_index = geometry.patch_pixel_index(poster.device)
    if indices is not None:
        pixel_index = pixel_index[indices]
    h, w = geometry.image_size
    flat = poster.reshape(poster.shape[0], -1)[:, pixel_index]  # [C, B, h*w]
    return flat.view(poster.shape[0], -1, h, w).transpose(0, 1)


def class_area_positions(geometry: PosterGeometry) -> tuple[list[int], list[int], tuple[int, int]]:
    """Row starts, column starts and (height, width) of the class areas used for initialisation.
    Areas are image-sized, enlarged only where image-sized areas could not cover the poster."""
    (ph, pw), (h, w) = geometry.poster_size, geometry.image_size
    cols, rows = geometry.class_grid
    area = (max(h, math.ceil(ph / rows)), max(w, math.ceil(pw / cols)))
    return (evenly_spaced(ph, area[0], rows), evenly_spaced(pw, area[1], cols), area)


def _blend_along(strips: list[torch.Tensor], starts: list[int], total: int,
                 dim: int) -> torch.Tensor:
    """Lay strips of equal length along `dim` at `starts`; where a strip overlaps what is already
    laid, cross-fade linearly (the earlier content's weight falls from 1 to 0 across the overlap)."""
    size = strips[0].shape[dim]
    shape = list(strips[0].shape)
    shape[dim] = total
    out = strips[0].new_zeros(shape)
    end = 0
    for strip, start in zip(strips, starts):
        overlap = max(0, min(end - start, size))
        if overlap > 0:
            fade = torch.linspace(1.0, 0.0, overlap, dtype=strip.dtype)
            view = [1] * strip.ndim
            view[dim] = overlap
            fade = fade.view(view)
            old = out.narrow(dim, start, overlap)
            new = strip.narrow(dim, 0, overlap)
            out.narrow(dim, start, overlap).copy_(old * fade + new * (1 - fade))
        out.narrow(dim, start + overlap, size - overlap).copy_(strip.narrow(dim, overlap,
                                                                            size - overlap))
        end = start + size
    return out


def compose_poster(geometry: PosterGeometry,
                   area: Callable[[int, int, tuple[int, int]], torch.Tensor]) -> torch.Tensor:
    """A [C, H, W] poster of one area per class cell, `area(row, col, (height, width))` each
    (called row by row), cross-faded linearly where neighbouring areas overlap."""
    ys, xs, size = class_area_positions(geometry)
    rows = [_blend_along([area(r, c, size) for c in range(len(xs))], xs, geometry.poster_size[1],
                         dim=2) for r in range(len(ys))]
    return _blend_along(rows, ys, geometry.poster_size[0], dim=1)


def init_poster(geometry: PosterGeometry, kind: str = "fade",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh poster [C, H, W].

    "fade" (the official code): one Gaussian area per class cell, each scaled to unit L2 norm,
    cross-faded linearly where neighbouring areas overlap. "gaussian" (the paper's Algorithm 1):
    i.i.d. N(0, 1) pixels.
    """
    c = geometry.channels
    if kind == "gaussian":
        return torch.randn(c, *geometry.poster_size, generator=generator)
    if kind not in POSTER_INITS:
        raise GeometryError(f"init must be 'fade' or 'gaussian', got {kind!r}", "init")

    def noise(row: int, col: int, size: tuple[int, int]) -> torch.Tensor:
        values = torch.randn(c * size[0] * size[1], generator=generator)
        return (values / values.norm()).view(c, *size)

    return compose_poster(geometry, noise)
