"""Linear centred kernel alignment (CKA) between two sets of activations.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited") compares two representations of the same ``n`` samples::

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L)),   K = X X^T,  L = Y Y^T

The plain (biased) HSIC estimator, ``tr(K H L H) / (n - 1)^2``, is biased towards 1 when
features outnumber samples: independent Gaussian features read close to 1 once ``d`` is
much larger than ``n``. The debiased estimator is the unbiased HSIC of Song et al.
2012 ("Feature Selection via Dependence Maximization"), written with U-centred Gram
matrices as in Nguyen et al. 2021 ("Do Wide and Deep Networks Learn the Same Things?");
it gives about 0 for independent features.

Both estimators are computed in one of two algebraically equal forms: the ``n x n``
Gram form, or the feature form built from ``X^T Y`` (``d_x x d_y``) and row norms, which
never materialises an ``n x n`` matrix. Features are centred and everything is
accumulated in float64 whatever the input dtype, so a large feature offset in float32
input does not cost precision.

Degenerate input: a representation with zero variance over the samples (every sample
identical, e.g. a dead layer) has no linear structure to compare. CKA is then defined as
0 rather than NaN; likewise when a debiased self-HSIC estimate is not positive (possible
only for tiny ``n``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CKAForm",
    "Representation",
    "centred_features",
    "cka_from_hsic",
    "hsic",
    "linear_cka",
    "representation_cka",
]

CKAForm = Literal["auto", "gram", "feature"]

# Rounding in the column mean leaves centred values of order eps * |x| even when every
# sample is identical; anything below this fraction of the raw norm counts as no variance.
_ZERO_VARIANCE_RTOL = 64 * torch.finfo(torch.float64).eps


def centred_features(x: Tensor) -> Tensor:
    """``x`` as an ``(n, d)`` float64 matrix (trailing dimensions flattened) with every
    feature (column) centred to mean zero over the ``n`` samples."""
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading sample dimension, got shape {tuple(x.shape)}")
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    return flat - flat.mean(dim=0, keepdim=True)


def _has_variance(raw: Tensor, centred: Tensor) -> bool:
    scale = raw.detach().to(torch.float64).norm()
    return bool(centred.norm() > _ZERO_VARIANCE_RTOL * scale) and bool(scale > 0)


def _check_debiased(n: int) -> None:
    if n < 4:
        raise ValueError(
            f"debiased HSIC needs at least 4 samples (it divides by n(n-3)), got n={n}; "
            "use debiased=False or more samples"
        )


def _hsic_gram(kx: Tensor, ky: Tensor, debiased: bool) -> Tensor:
    """HSIC from two ``n x n`` Gram matrices of centred features."""
    n = kx.shape[0]
    if not debiased:
        return (kx * ky).sum() / (n - 1) ** 2
    _check_debiased(n)
    # Song et al. 2012, eq. 5: the Gram matrices with their diagonals removed.
    kt = kx - torch.diag(torch.diagonal(kx))
    lt = ky - torch.diag(torch.diagonal(ky))
    trace = (kt * lt).sum()
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = 2.0 * (kt.sum(dim=1) * lt.sum(dim=1)).sum() / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _hsic_features(x: Tensor, y: Tensor, debiased: bool) -> Tensor:
    """The same quantity as :func:`_hsic_gram` for ``K = X X^T``, ``L = Y Y^T`` without
    forming ``K`` or ``L``: every Gram term is rewritten through ``X^T Y`` and row norms."""
    n = x.shape[0]
    cross_cov = (x.T @ y).square().sum()  # tr(K L) = ||X^T Y||_F^2
    if not debiased:
        return cross_cov / (n - 1) ** 2
    _check_debiased(n)
    rx = x.square().sum(dim=1)  # diag(K)
    ry = y.square().sum(dim=1)
    sx = x.sum(dim=0)
    sy = y.sum(dim=0)
    trace = cross_cov - (rx * ry).sum()
    sums = (sx.dot(sx) - rx.sum()) * (sy.dot(sy) - ry.sum()) / ((n - 1) * (n - 2))
    cross = 2.0 * ((x @ sx - rx) * (y @ sy - ry)).sum() / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _resolve_form(form: str, n: int, dx: int, dy: int) -> str:
    if form not in ("auto", "gram", "feature"):
        raise ValueError(f"form must be one of 'auto', 'gram', 'feature', got {form!r}")
    if form == "auto":
        return "gram" if n < max(dx, dy) else "feature"
    return form


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same samples: got n={x.shape[0]} and n={y.shape[0]}"
        )


def hsic(x: Tensor, y: Tensor, *, debiased: bool = True, form: CKAForm = "auto") -> Tensor:
    """Linear-kernel HSIC between activations ``x`` (``n x ...``) and ``y`` (``n x ...``).

    Args:
        x, y: the same ``n`` samples in two representations; trailing dims are flattened.
        debiased: the unbiased estimator of Song et al. 2012 (needs ``n >= 4``) instead of
            the plain ``tr(KHLH) / (n - 1)^2``.
        form: ``"gram"`` (``n x n``), ``"feature"`` (``d_x x d_y``) or ``"auto"`` (Gram
            form when ``n`` is smaller than the feature count).

    Returns:
        A float64 scalar tensor.
    """
    _check_pair(x, y)
    xc, yc = centred_features(x), centred_features(y)
    chosen = _resolve_form(form, xc.shape[0], xc.shape[1], yc.shape[1])
    if chosen == "gram":
        return _hsic_gram(xc @ xc.T, yc @ yc.T, debiased)
    return _hsic_features(xc, yc, debiased)


def cka_from_hsic(hsic_xy: Tensor, hsic_xx: Tensor, hsic_yy: Tensor) -> Tensor:
    """``hsic_xy / sqrt(hsic_xx * hsic_yy)``, and 0 when either self-term is not positive
    (a representation without variance)."""
    denom = hsic_xx * hsic_yy
    if not bool(hsic_xx > 0) or not bool(hsic_yy > 0) or not bool(denom > 0):
        return torch.zeros((), dtype=torch.float64, device=hsic_xy.device)
    return hsic_xy / denom.sqrt()


def linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False, form: CKAForm = "auto") -> Tensor:
    """Linear CKA between two representations of the same samples (Kornblith et al. 2019).

    Args:
        x: activations ``(n, ...)``; trailing dimensions are flattened to features.
        y: activations ``(n, ...)`` of the same ``n`` samples (any feature count).
        debiased: use the unbiased HSIC (Song et al. 2012; U-centring as in Nguyen et al.
            2021). Default ``False`` is the plain estimator of Kornblith et al., which is
            biased towards 1 when features outnumber samples.
        form: ``"gram"``, ``"feature"`` or ``"auto"`` (the ``n x n`` Gram form when ``n`` is
            smaller than the larger feature count, the feature form otherwise).

    Returns:
        A float64 scalar tensor: 1 for representations equal up to an orthogonal
        transform and isotropic scaling, 0 when either has zero variance. The debiased
        value can be slightly negative for unrelated representations.

    Raises:
        ValueError: different sample counts, ``n < 4`` with ``debiased=True``, or an
            unknown ``form``.
    """
    _check_pair(x, y)
    if debiased:
        _check_debiased(x.shape[0])
    return representation_cka(
        Representation.of(x, form="feature"),
        Representation.of(y, form="feature"),
        debiased=debiased,
        form=form,
    )


class Representation:
    """What CKA needs of one set of activations, kept between comparisons.

    Holds the centred features (``n x d``, float64) or, when that is smaller, only the
    centred Gram matrix (``n x n``), so that a probe can remember a reference without
    keeping raw activations. The self-HSIC terms are cached.

    Args:
        features: centred ``(n, d)`` float64 features, or ``None`` when only the Gram
            matrix is kept.
        gram: centred ``(n, n)`` float64 Gram matrix, or ``None``.
        has_variance: ``False`` when every sample had the same activations.
    """

    def __init__(
        self, features: Tensor | None, gram: Tensor | None, has_variance: bool = True
    ) -> None:
        if (features is None) == (gram is None):
            raise ValueError("exactly one of features and gram must be given")
        self.features = features
        self.gram = gram
        self.has_variance = has_variance
        self._self_hsic: dict[bool, Tensor] = {}

    @classmethod
    def of(cls, x: Tensor, form: CKAForm = "auto") -> Representation:
        """Centre ``x`` (``(n, ...)``) and keep the Gram matrix when ``n < d`` (or when
        ``form="gram"``), else the centred features."""
        xc = centred_features(x)
        n, d = xc.shape
        chosen = _resolve_form(form, n, d, d)
        variance = _has_variance(x, xc)
        if chosen == "gram":
            return cls(None, xc @ xc.T, variance)
        return cls(xc, None, variance)

    @property
    def num_samples(self) -> int:
        t = self.features if self.features is not None else self.gram
        assert t is not None
        return int(t.shape[0])

    @property
    def num_features(self) -> int | None:
        """Feature count, or ``None`` when only the Gram matrix is kept."""
        return None if self.features is None else int(self.features.shape[1])

    def to(self, device: torch.device | str) -> Representation:
        """The same representation with its tensors on ``device`` (self if already there)."""
        t = self.features if self.features is not None else self.gram
        assert t is not None
        if t.device == torch.device(device):
            return self
        moved = Representation(
            None if self.features is None else self.features.to(device),
            None if self.gram is None else self.gram.to(device),
            self.has_variance,
        )
        moved._self_hsic = {k: v.to(device) for k, v in self._self_hsic.items()}
        return moved

    def gram_matrix(self) -> Tensor:
        """The centred ``n x n`` Gram matrix (formed on demand from the features)."""
        if self.gram is not None:
            return self.gram
        assert self.features is not None
        return self.features @ self.features.T

    def self_hsic(self, debiased: bool) -> Tensor:
        if debiased not in self._self_hsic:
            self._self_hsic[debiased] = _pair_hsic(self, self, debiased, "auto")
        return self._self_hsic[debiased]

    def to_state(self) -> dict[str, Tensor | bool | None]:
        """Plain tensors and flags, for a checkpoint."""
        return {"features": self.features, "gram": self.gram, "has_variance": self.has_variance}

    @classmethod
    def from_state(cls, state: dict) -> Representation:
        return cls(state.get("features"), state.get("gram"), bool(state["has_variance"]))


def _pair_hsic(a: Representation, b: Representation, debiased: bool, form: str) -> Tensor:
    if a.features is not None and b.features is not None:
        n, dx, dy = a.num_samples, a.features.shape[1], b.features.shape[1]
        if _resolve_form(form, n, dx, dy) == "feature":
            return _hsic_features(a.features, b.features, debiased)
    elif form == "feature":
        raise ValueError("form='feature' needs the features, but only a Gram matrix is kept")
    return _hsic_gram(a.gram_matrix(), b.gram_matrix(), debiased)


def representation_cka(
    a: Representation, b: Representation, *, debiased: bool = True, form: CKAForm = "auto"
) -> Tensor:
    """Linear CKA between two kept representations of the same samples (float64 scalar;
    0 when either has no variance). See :func:`linear_cka`."""
    if a.num_samples != b.num_samples:
        raise ValueError(
            f"representations must hold the same samples: got n={a.num_samples} and "
            f"n={b.num_samples}"
        )
    if debiased:
        _check_debiased(a.num_samples)
    if not (a.has_variance and b.has_variance):
        return torch.zeros((), dtype=torch.float64)
    xy = _pair_hsic(a, b, debiased, form)
    if form == "auto":
        xx, yy = a.self_hsic(debiased), b.self_hsic(debiased)
    else:
        xx, yy = _pair_hsic(a, a, debiased, form), _pair_hsic(b, b, debiased, form)
    return cka_from_hsic(xy, xx, yy)
