"""PoDDL: a soft label for every poster patch, fixed or learned.

Both kinds start from the class layout: the class grid (an ordering, [rows, cols]) upsampled
to the poster with nearest-neighbour interpolation gives every poster pixel one class.

Fixed labels: per patch, count the pixels of each class; the majority class gets the label,
exact ties share it equally.

Learned labels (the paper's "label tensor Y of size ox x oy x n"): a small label array with one
n-class vector per cell (default: the class grid itself, so n x n parameters, as 1-IPC methods
with learned labels), initialised one-hot from the layout, nearest-upsampled to the poster and
averaged over each patch window, then L1-normalised. Negative entries are clipped to zero after
every outer step. Because the upsampled array is piecewise constant, the window average is a
fixed linear map of the array: `coverage[p, cell]` = the share of patch p lying in the cell's
region. Computing it once makes label extraction a single small matmul per step.

Where the window is averaged (`label_pooling`): `poster`, as the paper's text, pools the patch's
window on the array upsampled to the poster, so a patch straddling two class cells starts with
a mixed label. `array`, as the official code (`PoDDL.get_labels_from_array`), pools at the
array's own resolution: the window shrinks by the array-to-poster ratio (rounded down, at least
one cell) and its starts are spread over the array as the patches' are over the poster, so a
32-pixel patch on CIFAR-10's 2 x 5 array reads one cell and starts one-hot, with the label
its fixed label would have. Both are the same kind of linear map, so only `coverage` differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from podd_engine.config import LABEL_MODES, LABEL_POOLINGS
from podd_engine.errors import SettingError
from podd_engine.poster import PosterGeometry, evenly_spaced



def _cell_of_pixels(num_pixels: int, num_cells: int) -> torch.Tensor:
    """Nearest-neighbour upsampling index along one axis: pixel i -> cell floor(i * cells / pixels)
    (the same rule as torch's 'nearest' interpolation)."""
    return torch.div(torch.arange(num_pixels) * num_cells, num_pixels, rounding_mode="floor")


def cell_coverage(geometry: PosterGeometry, cell_grid: tuple[int, int]) -> torch.Tensor:
    """[P, rows*cols]: fraction of each patch's pixels lying in each cell of a `cell_grid`
    (cols x rows) array that is nearest-upsampled to the poster. Rows sum to 1."""
    cols, rows = cell_grid
    (ph, pw), (h, w) = geometry.poster_size, geometry.image_size
    row_of = _cell_of_pixels(ph, rows)
    col_of = _cell_of_pixels(pw, cols)
    top, left = geometry.patch_positions[:, 0], geometry.patch_positions[:, 1]
    # For each patch, how many of its rows fall in each cell row (and likewise for columns).
    row_counts = torch.stack([torch.bincount(row_of[t:t + h], minlength=rows) for t in top.tolist()])
    col_counts = torch.stack([torch.bincount(col_of[l:l + w], minlength=cols) for l in left.tolist()])
    coverage = row_counts[:, :, None] * col_counts[:, None, :]  # [P, rows, cols]
    return coverage.reshape(len(top), -1).to(torch.float32) / (h * w)


def array_coverage(geometry: PosterGeometry, cell_grid: tuple[int, int]) -> torch.Tensor:
    """[P, rows*cols]: each patch's window on the label array itself (the official code's
    pooling): floor(patch size * cells / poster size) cells a side, at least one, started at
    evenly spaced cells in the patches' own order (column-major), each cell weighted equally."""
    cols, rows = cell_grid
    (ph, pw), (h, w) = geometry.poster_size, geometry.image_size
    size_down, size_across = max(1, h * rows // ph), max(1, w * cols // pw)
    tops = evenly_spaced(rows, size_down, geometry.patch_grid[1])
    lefts = evenly_spaced(cols, size_across, geometry.patch_grid[0])
    coverage = torch.zeros(geometry.num_patches, rows, cols)
    for p, (left, top) in enumerate((x, y) for x in lefts for y in tops):
        coverage[p, top:top + size_down, left:left + size_across] = 1.0
    return coverage.reshape(geometry.num_patches, -1) / (size_down * size_across)


def class_layout_onehot(order: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[rows*cols, n]: one-hot class of every class-grid cell."""
    return torch.nn.functional.one_hot(order.flatten(), num_classes).to(torch.float32)


def fixed_labels(geometry: PosterGeometry, order: torch.Tensor) -> torch.Tensor:
    """[P, n] majority-class labels; exact ties are split equally among the tied classes."""
    rows, cols = order.shape
    counts = cell_coverage(geometry, (cols, rows)) @ class_layout_onehot(order, geometry.num_classes)
    counts = torch.round(counts * geometry.image_size[0] * geometry.image_size[1])  # exact pixels
    majority = (counts == counts.max(dim=1, keepdim=True).values).to(torch.float32)
    return majority / majority.sum(dim=1, keepdim=True)


def _label_grid_init(order: torch.Tensor, num_classes: int,
                     label_grid: tuple[int, int]) -> torch.Tensor:
    """[rows*cols, n] initial label array: for each label cell, the class shares of the pixels
    it covers in the upsampled class layout (one-hot when the label grid is the class grid).
    Every class has label mass because the label cells tile the whole poster."""
    class_rows, class_cols = order.shape
    cols, rows = label_grid
    # Work at a common resolution where both grids are exact blocks.
    hh, ww = class_rows * rows, class_cols * cols
    class_map = order[_cell_of_pixels(hh, class_rows)][:, _cell_of_pixels(ww, class_cols)]
    cell_map = (_cell_of_pixels(hh, rows)[:, None] * cols + _cell_of_pixels(ww, cols)[None, :])
    array = torch.zeros(rows * cols, num_classes)
    array.index_put_((cell_map.flatten(), class_map.flatten()), torch.ones(hh * ww), accumulate=True)
    return array / array.sum(dim=1, keepdim=True)


@dataclass
class PosterLabels:
    """Soft labels of every patch. `array` is the label parameter tensor ([cells, n]): learned
    labels optimise it; fixed labels keep the per-patch labels as a constant."""

    mode: str
    coverage: torch.Tensor | None  # [P, cells] window-average map (learned)
    array: torch.Tensor  # learned: [cells, n] parameters; fixed: [P, n] labels
    label_grid: tuple[int, int] | None = None

    @property
    def num_parameters(self) -> int:
        """Label values that have to be stored with the poster (learned labels are storage)."""
        return self.array.numel() if self.mode == "learned" else 0

    def patch_labels(self, indices: torch.Tensor | None = None,
                     array: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n] label distributions of the patches `indices` (default: all). `array` overrides
        the stored parameters (the functional form used inside the distillation step)."""
        array = self.array if array is None else array
        if self.mode == "fixed":
            return array if indices is None else array[indices.to(array.device)]
        coverage = self.coverage.to(device=array.device, dtype=array.dtype)
        if indices is not None:
            coverage = coverage[indices.to(array.device)]
        mixed = coverage @ array
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def clip_(self) -> None:
        """Keep learned labels non-negative (after every outer step)."""
        if self.mode == "learned":
            self.array.clamp_(min=0)

    def to(self, device: torch.device | str) -> "PosterLabels":
        coverage = None if self.coverage is None else self.coverage.to(device)
        return PosterLabels(self.mode, coverage, self.array.to(device), self.label_grid)


def create_labels(mode: str, geometry: PosterGeometry, order: torch.Tensor,
                  label_grid: tuple[int, int] | None = None,
                  pooling: str = "poster") -> PosterLabels:
    """PoDDL labels for `geometry` with the class layout `order` ([rows, cols]); `pooling`
    (learned labels only) is where each patch's label window is averaged."""
    if mode == "fixed":
        return PosterLabels("fixed", None, fixed_labels(geometry, order))
    if mode != "learned":
        raise SettingError(f"labels must be one of {', '.join(LABEL_MODES)}, got {mode!r}",
                           "labels")
    coverage_of = {"poster": cell_coverage, "array": array_coverage}.get(pooling)
    if coverage_of is None:
        raise SettingError(f"label_pooling must be one of {', '.join(LABEL_POOLINGS)}, got "
                           f"{pooling!r}", "label_pooling")
    rows, cols = order.shape
    label_grid = label_grid or (cols, rows)
    array = _label_grid_init(order, geometry.num_classes, label_grid)
    return PosterLabels("learned", coverage_of(geometry, label_grid), array, tuple(label_grid))
