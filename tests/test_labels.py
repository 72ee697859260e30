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


@pytest.mark.parametrize("pooling", ["poster", "array"])
@pytest.mark.parametrize("n,class_grid,patch_grid,ipc", [
    (10, (5, 2), (16, 6), 0.3), (10, (5, 2), (16, 6), 0.9), (100, (10, 10), (20, 20), 0.4),
    (200, (20, 10), (60, 30), 0.3), (200, (20, 10), (40, 20), 0.9),
])
def test_learned_labels_every_class_starts_with_mass(n, class_grid, patch_grid, ipc, pooling):
    g = geometry(ipc, n, class_grid, patch_grid)
    order = random_order(class_grid, seed=1)
    labels = create_labels("learned", g, order, pooling=pooling)
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


def official_array_labels(array: torch.Tensor, g: PosterGeometry) -> torch.Tensor:
    """The official code's learned-label extraction, rebuilt from its description (crop the
    [1, n, rows, cols] label array with a window shrunk by array/poster, at starts spread like
    the patches', x-major; sum; L1-normalise), with NumPy's rounding as it uses."""
    import numpy as np

    _, _, rows, cols = array.shape
    (ph, pw), (h, w) = g.poster_size, g.image_size
    size_x = max(1, int(np.floor(w * (1 / (pw / cols)))))
    size_y = max(1, int(np.floor(h * (1 / (ph / rows)))))
    xs = np.linspace(0, cols - size_x, g.patch_grid[0]).round().astype(int)
    ys = np.linspace(0, rows - size_y, g.patch_grid[1]).round().astype(int)
    crops = torch.stack([array[0, :, y:y + size_y, x:x + size_x] for x in xs for y in ys])
    labels = crops.sum(dim=(2, 3))
    return labels / labels.sum(1, keepdim=True)


@pytest.mark.parametrize("n,class_grid,patch_grid,ipc,label_grid", [
    (10, (5, 2), (16, 6), 1.0, None), (10, (5, 2), (16, 6), 0.5, None),
    (10, (5, 2), (16, 6), 0.3, None), (10, (5, 2), (20, 8), 1.0, None),
    (100, (10, 10), (20, 20), 1.0, (20, 20)),  # a 2 x 2-cell window per patch
    (200, (20, 10), (60, 30), 0.9, None),
])
def test_array_pooling_matches_the_official_extraction(n, class_grid, patch_grid, ipc,
                                                       label_grid):
    g = geometry(ipc, n, class_grid, patch_grid)
    labels = create_labels("learned", g, random_order(class_grid, seed=2), label_grid,
                           pooling="array")
    cols, rows = labels.label_grid
    labels.array = torch.rand(rows * cols, n, generator=torch.Generator().manual_seed(0))
    official = official_array_labels(labels.array.T.reshape(1, n, rows, cols), g)
    assert torch.allclose(labels.patch_labels(), official, atol=1e-6)
    some = torch.tensor([5, 0, 17])
    assert torch.allclose(labels.patch_labels(some), official[some], atol=1e-6)


def test_array_pooling_starts_at_the_fixed_labels_where_the_paper_setting_has_no_ties():
    # CIFAR-10 at 1 IPC with the paper's 16 x 6 patches: each patch reads one label cell,
    # the class its fixed label names; the poster pooling starts from mixed labels instead
    g = geometry(1.0)
    order = random_order((5, 2), seed=3)
    fixed = fixed_labels(g, order)
    by_array = create_labels("learned", g, order, pooling="array").patch_labels()
    by_poster = create_labels("learned", g, order, pooling="poster").patch_labels()
    assert torch.equal(by_array, fixed)
    assert (by_poster.max(1).values < 1).sum() >= 48  # most patches straddle two cells


def test_array_pooling_gradient_reaches_only_the_cells_patches_read():
    g = geometry(1.0, patch_grid=(3, 1))  # starts at cells 0, 2, 4 of the top row only
    labels = create_labels("learned", g, identity_order((5, 2)), pooling="array")
    array = labels.array.clone().requires_grad_(True)
    (labels.patch_labels(array=array) * torch.rand(3, 10)).sum().backward()
    touched = (array.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == [0, 2, 4]  # row-major cells of the 5 x 2 array: the top row's 0, 2, 4
    with pytest.raises(ValueError, match="label_pooling must be one of poster, array"):
        create_labels("learned", g, identity_order((5, 2)), pooling="pixels")


def test_tiled_images_read_whole_cells_so_the_pooling_does_not_matter():
    # RaT-BPTT's layout: 2 images per class, exactly tiled, one label cell per image
    g = PosterGeometry(3, (32, 32), 10, (5, 2), (10, 2), (64, 320))
    order = random_order((5, 2), seed=4)
    by_array, by_poster = (create_labels("learned", g, order, (10, 2), pooling=p)
                           for p in ("array", "poster"))
    assert torch.equal(by_array.coverage, by_poster.coverage)


def test_label_pooling_is_a_checked_setting_that_keeps_earlier_keys():
    from podd_engine.config import TrialConfig
    from podd_engine.errors import SettingError

    default = TrialConfig(labels="learned")
    assert TrialConfig(labels="learned", label_pooling="poster").key() == default.key()
    by_array = TrialConfig(labels="learned", label_pooling="array")
    assert by_array.key() != default.key()
    assert (default.labels_name, by_array.labels_name) == ("learned", "learned-array")
    with pytest.raises(SettingError, match="label_pooling must be one of poster, array"):
        TrialConfig(label_pooling="pixels").validate()
