"""Poster geometry, patch extraction and initialisation."""

import pytest
import torch

from podd_engine.poster import (GeometryError, PosterGeometry, evenly_spaced, extract_patches,
                                init_poster, parse_grid, poster_size_for_ipc)


def cifar(ipc, class_grid="5x2", patch_grid="16x6", n=10):
    return PosterGeometry.for_ipc(ipc, channels=3, image_size=(32, 32), num_classes=n,
                                  class_grid=class_grid, patch_grid=patch_grid)


@pytest.mark.parametrize("ipc,n,grid,expected", [
    (0.9, 10, (5, 2), (60, 153)),  # the official CIFAR-10 0.9-IPC poster (153 x 60)
    (0.4, 100, (10, 10), (202, 202)),  # the paper's CIFAR-100 0.4-IPC example
    (1.0, 10, (5, 2), (64, 160)),  # exactly n images
    (0.3, 100, (10, 10), (175, 175)),
])
def test_poster_size_for_ipc(ipc, n, grid, expected):
    size = poster_size_for_ipc(ipc, (32, 32), n, grid)
    assert size == expected
    assert size[0] * size[1] <= ipc * n * 32 * 32  # never over budget


@pytest.mark.parametrize("ipc", [0.3, 0.45, 0.5, 0.7, 0.9, 1.0])
def test_achieved_ipc_is_close_below_the_request_with_the_grid_aspect(ipc):
    g = cifar(ipc)
    assert ipc * 0.97 <= g.achieved_ipc <= ipc
    assert g.poster_size[1] / g.poster_size[0] == pytest.approx(2.5, rel=0.06)


def test_patch_positions_span_the_poster_evenly():
    g = cifar(0.9)  # 60 x 153 poster, 16 x 6 patches of 32 px
    pos = g.patch_positions
    assert pos.shape == (96, 2)
    ys, xs = sorted(set(pos[:, 0].tolist())), sorted(set(pos[:, 1].tolist()))
    assert xs[0] == 0 and xs[-1] == 153 - 32 and len(xs) == 16
    assert ys[0] == 0 and ys[-1] == 60 - 32 and len(ys) == 6
    assert pos[:6, 1].tolist() == [0] * 6 and pos[:6, 0].tolist() == ys  # column-major order
    assert evenly_spaced(10, 4, 3) == [0, 3, 6] and evenly_spaced(9, 4, 3) == [0, 2, 5]
    assert evenly_spaced(40, 32, 1) == [0]


def test_extract_patches_equals_slicing_and_selects_subsets():
    g = cifar(0.5, patch_grid="7x3")
    poster = torch.randn(3, *g.poster_size)
    patches = extract_patches(poster, g)
    assert patches.shape == (21, 3, 32, 32)
    for k, (y, x) in enumerate(g.patch_positions.tolist()):
        assert torch.equal(patches[k], poster[:, y:y + 32, x:x + 32])
    subset = torch.tensor([20, 3, 3])
    assert torch.equal(extract_patches(poster, g, subset), patches[subset])


def test_gradient_counts_how_often_each_pixel_is_covered():
    g = cifar(0.5, patch_grid="5x3")
    poster = torch.randn(3, *g.poster_size, requires_grad=True)
    chosen = torch.tensor([0, 4, 7])
    extract_patches(poster, g, chosen).sum().backward()
    coverage = torch.zeros(g.poster_size)
    for y, x in g.patch_positions[chosen].tolist():
        coverage[y:y + 32, x:x + 32] += 1
    assert torch.equal(poster.grad, coverage.expand(3, -1, -1))
    assert coverage.max() > 1  # the chosen patches do overlap


def test_geometry_errors_name_the_setting():
    with pytest.raises(GeometryError, match=r"class_grid 4x2 has 8 cells .* 10 classes"):
        cifar(0.5, class_grid="4x2")
    with pytest.raises(GeometryError, match=r"ipc 0.05 gives a 14x36 poster, smaller than one "
                                            r"32x32 image: raise ipc to at least 0.25"):
        cifar(0.05)
    with pytest.raises(GeometryError, match=r"patch_grid 0x6 needs at least one"):
        cifar(0.5, patch_grid="0x6")
    with pytest.raises(GeometryError, match=r"not COLSxROWS"):
        parse_grid("16by6", "patch_grid")


def test_fade_init_unit_norm_areas_blended_without_seams():
    g = cifar(1.0, patch_grid="5x2")  # 64 x 160: class areas tile exactly
    poster = init_poster(g, "fade", torch.Generator().manual_seed(0))
    assert poster.shape == (3, 64, 160)
    for y in (0, 32):
        for x in range(0, 160, 32):
            assert poster[:, y:y + 32, x:x + 32].norm() == pytest.approx(1.0, rel=1e-5)
    overlapped = init_poster(cifar(0.5), "fade", torch.Generator().manual_seed(0))
    assert torch.isfinite(overlapped).all() and (overlapped != 0).float().mean() > 0.99
    # the cross-fade: with constant areas (area k = k), a row rises in a straight ramp from one
    # area's value to the next across their overlap: no seam, no jump
    from podd_engine.poster import class_area_positions, compose_poster

    geometry = cifar(0.5)
    ys, xs, (ah, aw) = class_area_positions(geometry)
    cols = len(xs)
    flat = compose_poster(geometry, lambda r, c, size: torch.full((3, *size), float(r * cols + c)))
    start, end = xs[1], xs[0] + aw  # the first overlap along the top row, [start, end)
    assert end - start >= 3
    row = flat[0, 0]
    assert torch.all(row[:start] == 0) and torch.all(row[end:xs[2]] == 1)
    ramp = row[start:end]  # the official fade: linspace(1, 0) weights, ends included
    assert ramp[0] == 0 and ramp[-1] == 1
    assert torch.allclose(ramp[1:] - ramp[:-1], torch.full((len(ramp) - 1,), 1 / (len(ramp) - 1)),
                          atol=1e-6)  # equal steps: a straight ramp
    gaussian = init_poster(g, "gaussian", torch.Generator().manual_seed(0))
    assert gaussian.std() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(GeometryError, match="init must be"):
        init_poster(g, "zeros")


def test_fade_init_is_seeded():
    g = cifar(0.7)
    a = init_poster(g, "fade", torch.Generator().manual_seed(3))
    b = init_poster(g, "fade", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
