"""ZCA whitening and per-channel normalisation, on the real 8x8 digits."""

import numpy as np
import pytest
import torch

from podd_engine.data import create_dataset
from podd_engine.preprocess import (ChannelNormalization, ZCAWhitening, fit_preprocessing,
                                    load_preprocessing, standardize_per_image)


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", use_cache=False)


def whitened_covariance(zca: ZCAWhitening, images: torch.Tensor) -> torch.Tensor:
    z = zca.transform(images).flatten(1).double()
    return z.T @ z / len(z)


def test_standardize_per_image_centres_and_unit_normalises(digits):
    x = standardize_per_image(digits.train_images).flatten(1)
    assert torch.allclose(x.mean(1), torch.zeros(len(x)), atol=1e-6)
    assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_whitened_covariance_is_identity_on_the_data_subspace(digits):
    # Nearly unregularised: on every direction the data spans, variance becomes 1.
    zca = ZCAWhitening.fit(digits.train_images, regularization=1e-6)
    cov = whitened_covariance(zca, digits.train_images)
    spanned = zca.eigenvectors[:, zca.eigenvalues > 1e-4 * zca.eigenvalues.max()]
    assert spanned.shape[1] > 40  # digits span most of the 64 dimensions
    restricted = spanned.T @ cov @ spanned
    assert torch.allclose(restricted, torch.eye(len(restricted), dtype=restricted.dtype),
                          atol=2e-3)


def test_regularised_zca_decorrelates_and_shrinks_weak_directions(digits):
    zca = ZCAWhitening.fit(digits.train_images)  # the papers' 0.1 x mean eigenvalue
    cov = whitened_covariance(zca, digits.train_images)
    in_eigenbasis = zca.eigenvectors.T @ cov @ zca.eigenvectors
    off_diagonal = in_eigenbasis - torch.diag(torch.diagonal(in_eigenbasis))
    assert off_diagonal.abs().max() < 1e-4  # whitened features are uncorrelated
    variances = torch.diagonal(in_eigenbasis)
    assert variances.max() <= 1.0 + 1e-4 and variances.max() > 0.95
    assert variances.min() < 0.5  # weak directions are damped rather than blown up


def test_zca_matches_an_independent_numpy_reference_in_hwc_order(digits):
    """The official code flattens channels-last with NumPy; we flatten CHW with torch chunks."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (600, 3, 6, 5), dtype=np.uint8))
    ours = ZCAWhitening.fit(images, 0.1, chunk=128).transform(images, chunk=100)

    x = images.permute(0, 2, 3, 1).reshape(len(images), -1).numpy().astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x / len(x))
    scale = 1.0 / np.sqrt(eigenvalues + 0.1 * eigenvalues.mean())
    reference = (x @ (eigenvectors * scale) @ eigenvectors.T).reshape(len(x), 6, 5, 3)
    reference = torch.from_numpy(reference).permute(0, 3, 1, 2).float()
    assert torch.allclose(ours, reference, atol=1e-4)


def test_inverse_round_trips_train_and_test_images(digits):
    zca = ZCAWhitening.fit(digits.train_images)
    for images in (digits.train_images, digits.test_images):
        restored = zca.inverse(zca.transform(images))
        assert torch.allclose(restored, standardize_per_image(images), atol=1e-5)


def test_zca_rejects_images_of_another_shape(digits):
    zca = ZCAWhitening.fit(digits.train_images)
    with pytest.raises(ValueError, match=r"fitted on \(1, 8, 8\) images"):
        zca.transform(torch.zeros(2, 1, 9, 9))


def test_channel_normalization_round_trip(digits):
    norm = ChannelNormalization.fit(digits.train_images)
    x = norm.transform(digits.train_images)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert torch.allclose(norm.inverse(x), digits.train_images / 255.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["zca", "normalize"])
def test_fit_preprocessing_is_cached_and_state_round_trips(digits, tmp_path, monkeypatch, kind):
    first = fit_preprocessing(digits, kind, cache_dir=tmp_path)
    assert len(list((tmp_path / "preprocessing").glob(f"{kind}-*.pt"))) == 1
    monkeypatch.setattr(ZCAWhitening, "fit", classmethod(lambda *a, **k: 1 / 0))
    monkeypatch.setattr(ChannelNormalization, "fit", classmethod(lambda *a, **k: 1 / 0))
    second = fit_preprocessing(digits, kind, cache_dir=tmp_path)  # no refit: from the cache
    restored = load_preprocessing(first.state_dict())
    for other in (second, restored):
        assert torch.allclose(other.transform(digits.test_images),
                              first.transform(digits.test_images))


def test_unknown_preprocessing_kind(digits):
    with pytest.raises(ValueError, match="preprocessing must be one of zca, normalize"):
        fit_preprocessing(digits, "pca")


def test_a_zca_fit_is_the_same_whatever_the_callers_thread_count():
    """A product or eigendecomposition on 2 threads differs from 1 thread in the last bits,
    and a trial trained on either fit differs by tenths of a point: the fit runs on one
    thread, and the caller's thread count comes back afterwards."""
    images = torch.randint(0, 256, (2000, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    before = torch.get_num_threads()
    fits = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            fits.append(ZCAWhitening.fit(images))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fits[0].eigenvectors, fits[1].eigenvectors)
    assert torch.equal(fits[0].eigenvalues, fits[1].eigenvalues)
