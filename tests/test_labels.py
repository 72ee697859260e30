"""PoDDL: fixed and learned patch labels."""

import pytest
import torch

from podd_engine.labels import cell_coverage, create_labels, fixed_labels
from podd_engine.ordering import identity_order, random_order
from podd_engine.poster import PosterGeometry


def geometry(ipc=1.0, n=10, class_grid=(5, 2), patch_grid=(16, 6), size=32):
    return PosterGeometry.for_ipc(ipc, channels=3, image_size=(size, size), num_classes=n,
                                  class_grid=class_grid, patch_grid=patch_grid)


def test_fixed_labels_on_exact_tiles_are_one_hot_per_class():
    g = geometry(1.0, patch_grid=(5, 2))  # 64 x 160: every patch is exactly one class cell
    order = torch.tensor([[3, 1, 4, 0, 5], [9, 2, 6, 8, 7]])
    labels = fixed_labels(g, order)
    expected = [int(order[k % 2, k // 2]) for k in range(10)]  # column-major patches
    assert labels.argmax(1).tolist() == expected
    assert torch.equal(labels.max(1).values, torch.ones(10))


def test_fixed_labels_split_exact_ties_equally():
    # 1 x 2 class grid on a 32 x 64 poster; a patch at x=16 has 16 columns of each class.
    g = PosterGeometry(1, (32, 32), 2, (2, 1), (3, 1), (32, 64))
    labels = fixed_labels(g, torch.tensor([[0, 1]]))
    assert labels.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]


def test_fixed_labels_follow_the_majority():
    g = PosterGeometry(1, (32, 32), 2, (2, 1), (5, 1), (32, 64))  # x = 0, 8, 16, 24, 32
    labels = fixed_labels(g, torch.tensor([[1, 0]]))
    assert labels.tolist() == [[0, 1], [0, 1], [0.5, 0.5], [1, 0], [1, 0]]


def test_coverage_rows_sum_to_one_and_match_pixel_counts():
    g = geometry(0.6, patch_grid=(9, 4))
    cov = cell_coverage(g, (5, 2))
    assert torch.allclose(cov.sum(1), torch.ones(len(cov)))
    # brute force: count the pixels of patch 5 in each upsampled cell
    cell_rows = torch.arange(g.poster_size[0]) * 2 // g.poster_size[0]
    cell_cols = torch.arange(g.poster_size[1]) * 5 // g.poster_size[1]
    y, x = g.patch_positions[5].tolist()
    cells = (cell_rows[y:y + 32, None] * 5 + cell_cols[None, x:x + 32]).flatten()
    assert torch.allclose(cov[5], torch.bincount(cells, minlength=10) / 1024.0)


@pytest.mark.parametrize("n,class_grid,patch_grid,ipc", [
    (10, (5, 2), (16, 6), 0.3), (10, (5, 2), (16, 6), 0.9), (100, (10, 10), (20, 20), 0.4),
    (200, (20, 10), (60, 30), 0.3), (200, (20, 10), (40, 20), 0.9),
])
def test_learned_labels_every_class_starts_with_mass(n, class_grid, patch_grid, ipc):
    g = geometry(ipc, n, class_grid, patch_grid)
    order = random_order(class_grid, seed=1)
    labels = create_labels("learned", g, order)
    assert labels.num_parameters == n * n  # same label budget as 1-IPC learned labels
    assert (labels.array.sum(0) > 0).all()  # every class has label mass in the array
    patch = labels.patch_labels()
    assert patch.shape == (g.num_patches, n)
    assert torch.allclose(patch.sum(1), torch.ones(len(patch)), atol=1e-6)
    covered = patch.sum(0) > 0
    assert covered.all(), f"classes {torch.nonzero(~covered).flatten().tolist()} get no patch label"


def test_learned_labels_with_another_label_grid_still_cover_every_class():
    g = geometry(0.5, 100, (10, 10), (20, 20))
    labels = create_labels("learned", g, identity_order((10, 10)), label_grid=(9, 9))
    assert labels.num_parameters == 81 * 100
    assert (labels.array.sum(0) > 0).all()
    assert torch.allclose(labels.array.sum(1), torch.ones(81))


def test_learned_labels_initially_equal_class_shares_and_clip_negatives():
    g = geometry(0.6, patch_grid=(9, 4))
    order = identity_order((5, 2))
    labels = create_labels("learned", g, order)
    counts = cell_coverage(g, (5, 2))  # class cell i holds class i under identity
    assert torch.allclose(labels.patch_labels(), counts, atol=1e-6)
    labels.array -= 0.5
    labels.clip_()
    assert labels.array.min() == 0
    assert create_labels("fixed", g, order).num_parameters == 0
    with pytest.raises(ValueError, match="labels must be one of fixed, learned"):
        create_labels("soft", g, order)
