"""Linear CKA against an independent numpy implementation of the published formulas."""

import numpy as np
import pytest
import torch

from lightning_stability.estimators.cka import (
    Representation,
    centred_features,
    hsic,
    linear_cka,
    representation_cka,
)


def _np_hsic_biased(kx: np.ndarray, ky: np.ndarray) -> float:
    # Kornblith et al. 2019, eq. 3: tr(K H L H) / (n - 1)^2.
    n = kx.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(kx @ h @ ky @ h)) / (n - 1) ** 2


def _np_u_centre(k: np.ndarray) -> np.ndarray:
    # U-centring (Szekely & Rizzo 2014; used for CKA by Nguyen et al. 2021): zero diagonal,
    # rows/columns corrected with n-2 and the grand sum with (n-1)(n-2).
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    row = k.sum(axis=1, keepdims=True) / (n - 2)
    col = k.sum(axis=0, keepdims=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    u = k - row - col + total
    np.fill_diagonal(u, 0.0)
    return u


def _np_hsic_debiased(kx: np.ndarray, ky: np.ndarray) -> float:
    n = kx.shape[0]
    return float((_np_u_centre(kx) * _np_u_centre(ky)).sum()) / (n * (n - 3))


def _np_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    kx, ky = x @ x.T, y @ y.T  # raw (uncentred) Gram matrices: the estimators centre
    f = _np_hsic_debiased if debiased else _np_hsic_biased
    return f(kx, ky) / np.sqrt(f(kx, kx) * f(ky, ky))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _correlated(n, dx, dy, seed=0):
    x = _randn(n, dx, seed=seed) + 2.0  # an offset: the estimators must centre
    y = torch.tanh(x @ _randn(dx, dy, seed=seed + 1)) + 0.5 * _randn(n, dy, seed=seed + 2)
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", ["auto", "gram", "feature"])
@pytest.mark.parametrize(("n", "dx", "dy"), [(40, 12, 25), (30, 60, 90)])
def test_matches_numpy_reference(debiased, form, n, dx, dy):
    x, y = _correlated(n, dx, dy)
    got = linear_cka(x, y, debiased=debiased, form=form)
    want = _np_cka(x.numpy(), y.numpy(), debiased)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) < 1e-6
    assert 0.1 < want < 0.99  # a non-trivial value, not an identity


def test_hsic_matches_reference_terms():
    x, y = _correlated(20, 7, 9)
    kx, ky = (x @ x.T).numpy(), (y @ y.T).numpy()
    assert hsic(x, y, debiased=True).item() == pytest.approx(_np_hsic_debiased(kx, ky), rel=1e-9)
    assert hsic(x, y, debiased=False).item() == pytest.approx(_np_hsic_biased(kx, ky), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("d", [8, 80])
def test_one_under_orthogonal_transform_and_isotropic_scaling(debiased, d):
    x = _randn(50, d)
    q, _ = torch.linalg.qr(_randn(d, d, seed=3))
    y = 7.5 * x @ q + 3.0  # rotation, isotropic scale, and a shift
    assert linear_cka(x, y, debiased=debiased).item() == pytest.approx(1.0, abs=1e-10)
    # Anisotropic scaling is not an invariance: CKA must notice it.
    scales = torch.linspace(0.01, 10.0, d, dtype=torch.float64)
    assert linear_cka(x, x * scales, debiased=debiased).item() < 0.95


def test_debiased_removes_bias_of_wide_independent_features():
    x = _randn(64, 4096, seed=1)
    y = _randn(64, 4096, seed=2)
    assert linear_cka(x, y).item() > 0.9  # the plain estimator's known bias towards 1
    assert abs(linear_cka(x, y, debiased=True).item()) < 0.05


def test_float32_with_large_offset_matches_float64():
    x, y = _correlated(128, 16, 24, seed=5)
    x, y = x - x.mean(0), y - y.mean(0)
    for debiased in (False, True):
        want = linear_cka(x, y, debiased=debiased).item()
        got = linear_cka((x + 1e3).float(), (y + 1e3).float(), debiased=debiased).item()
        assert abs(got - want) < 1e-4


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_forms_agree(debiased):
    for n, d in [(16, 100), (100, 16)]:
        x, y = _correlated(n, d, d + 3, seed=n)
        gram = linear_cka(x, y, debiased=debiased, form="gram").item()
        feature = linear_cka(x, y, debiased=debiased, form="feature").item()
        assert gram == pytest.approx(feature, abs=1e-10)


def test_trailing_dimensions_are_flattened():
    x = _randn(12, 3, 4, 4)
    y = _randn(12, 5, 2)
    assert linear_cka(x, y, debiased=True).item() == pytest.approx(
        linear_cka(x.reshape(12, -1), y.reshape(12, -1), debiased=True).item(), abs=1e-12
    )
    assert centred_features(x).shape == (12, 48)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(_randn(3, 5), _randn(3, 5), debiased=True)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(_randn(10, 5), _randn(11, 5))
    with pytest.raises(ValueError, match="form must be one of"):
        linear_cka(_randn(10, 5), _randn(10, 5), form="dense")
    # The biased estimator is defined for 2 samples.
    assert torch.isfinite(linear_cka(_randn(2, 5), _randn(2, 5)))


@pytest.mark.parametrize("debiased", [False, True])
def test_zero_variance_gives_zero_not_nan(debiased):
    x = _randn(16, 6)
    constant = torch.full((16, 6), 0.1, dtype=torch.float64)
    assert linear_cka(constant, x, debiased=debiased).item() == 0.0
    assert linear_cka(constant, constant, debiased=debiased).item() == 0.0
    assert linear_cka(torch.zeros(16, 6), x, debiased=debiased).item() == 0.0


def test_representation_keeps_the_smaller_matrix_and_round_trips():
    wide = Representation.of(_randn(10, 50))
    tall = Representation.of(_randn(50, 10))
    assert wide.features is None and wide.gram.shape == (10, 10)
    assert tall.gram is None and tall.features.shape == (50, 10)

    x, y = _correlated(10, 50, 40, seed=9)
    a, b = Representation.of(x), Representation.of(y)
    want = linear_cka(x, y, debiased=True).item()
    assert representation_cka(a, b).item() == pytest.approx(want, abs=1e-12)
    restored = Representation.from_state(a.to_state())
    assert representation_cka(restored, b).item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="same samples"):
        representation_cka(a, Representation.of(_randn(11, 40)))
