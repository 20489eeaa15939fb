"""Minibatch linear CKA as a ``torchmetrics.Metric`` (syncs across DDP ranks)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stability.estimators.cka import cka_from_hsic, hsic

__all__ = ["MinibatchCKA"]


class MinibatchCKA(Metric):
    """Linear CKA accumulated over minibatches (Nguyen et al. 2021, "Do Wide and Deep
    Networks Learn the Same Things?", section 3.1)::

        CKA = mean_b HSIC_u(X_b, Y_b) / sqrt(mean_b HSIC_u(X_b, X_b) * mean_b HSIC_u(Y_b, Y_b))

    Each :meth:`update` adds the three debiased (unbiased, Song et al. 2012) HSIC terms of
    one minibatch to float64 sums; the ``mean`` cancels in the ratio. The sums are
    torchmetrics states with ``dist_reduce_fx="sum"``, so under DDP every rank computes
    the same value, equal to a single process updated with the union of all ranks'
    minibatches (in any order).

    When it equals the full-data formula: with a single minibatch it *is*
    ``linear_cka(x, y, debiased=True)``. With several, the per-batch unbiased HSIC ignores
    pairs of samples from different batches, so it is not the CKA of the concatenation;
    each averaged term is an unbiased estimate of the same population HSIC as the
    full-data debiased term, so for i.i.d. batches the two agree up to sampling noise of
    order ``1/sqrt(batch size)``. Identities that hold per batch hold exactly for the
    metric: 1 when ``y`` is an orthogonal transform and isotropic scaling of ``x`` (the
    same for every batch); about 0 for independent features however wide. The plain
    (biased) per-batch estimator would not average out its bias towards 1, which is why
    ``debiased=True`` is the default.

    Args:
        debiased: sum unbiased HSIC terms (default ``True``; each batch then needs at
            least 4 samples); ``False`` sums the plain estimator per batch.

    Example::

        metric = MinibatchCKA()
        for x, y in batches:
            metric.update(x, y)
        metric.compute()  # float64 scalar
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hsic_xy: Tensor
    hsic_xx: Tensor
    hsic_yy: Tensor
    num_batches: Tensor

    def __init__(self, debiased: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(debiased, bool):
            raise ValueError(f"debiased must be True or False, got {debiased!r}")
        self.debiased = debiased
        for name in ("hsic_xy", "hsic_xx", "hsic_yy"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "num_batches", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one minibatch: ``x`` and ``y`` are ``(n, ...)`` activations of the same
        ``n`` samples (trailing dimensions flattened)."""
        self.hsic_xy += hsic(x, y, debiased=self.debiased).to(self.hsic_xy.device)
        self.hsic_xx += hsic(x, x, debiased=self.debiased).to(self.hsic_xx.device)
        self.hsic_yy += hsic(y, y, debiased=self.debiased).to(self.hsic_yy.device)
        self.num_batches += 1

    def compute(self) -> Tensor:
        """The minibatch CKA (float64 scalar; 0 when either representation showed no
        variance, NaN before any update)."""
        if int(self.num_batches) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return cka_from_hsic(self.hsic_xy, self.hsic_xx, self.hsic_yy)
