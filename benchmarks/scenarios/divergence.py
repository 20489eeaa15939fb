"""The rule that decides whether, and at which step, a training run diverged, and the step at
which a loss first leaves its band (:func:`band_exit_step`).

A run diverges at step ``t`` when its loss is non-finite at ``t``, or when from ``t`` on the
trailing median of the loss stays above ``factor`` times the best (lowest) trailing median
seen before ``t`` for ``patience`` consecutive steps. The trailing median (over ``smooth``
steps) keeps one noisy mini-batch from counting; the running minimum makes the rule
independent of the loss's scale; ``floor_frac`` (a fraction of the first trailing median)
stops a loss that has converged to almost zero from turning ordinary noise into a
"divergence"; ``patience`` separates a collapse from a blip that the run recovers from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

__all__ = ["DivergenceRule", "band_exit_step", "divergence_step"]


@dataclass(frozen=True)
class DivergenceRule:
    """Parameters of :func:`divergence_step`.

    Attributes:
        factor: how many times its running minimum the smoothed loss must exceed (default 3).
        patience: consecutive steps the excess must persist (default 10).
        smooth: length of the trailing median window, in steps (default 5).
        warmup: losses at the start that never enter the running minimum (initial losses
            are not a baseline; default 5).
        floor_frac: the running minimum never counts as lower than this fraction of the
            first smoothed loss (default 0.05).
    """

    factor: float = 3.0
    patience: int = 10
    smooth: int = 5
    warmup: int = 5
    floor_frac: float = 0.05

    def __post_init__(self) -> None:
        if not self.factor > 1.0:
            raise ValueError(f"factor must be > 1, got {self.factor!r}")
        for name in ("patience", "smooth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if not 0.0 <= self.floor_frac < 1.0:
            raise ValueError(f"floor_frac must be in [0, 1), got {self.floor_frac!r}")


def divergence_step(losses: Sequence[float], rule: DivergenceRule | None = None) -> int | None:
    """The first step (index into ``losses``) at which the run diverged, or ``None``.

    ``losses[i]`` is the training loss of optimizer step ``i``. A non-finite loss counts as
    divergence at once (the weights it produces are no longer usable); otherwise the excess
    must persist for ``rule.patience`` steps, and a run that ends before that has not
    diverged by this rule.
    """
    rule = rule or DivergenceRule()
    smoothed: list[float] = []
    best = math.inf
    floor = None
    run_start: int | None = None
    for t, loss in enumerate(losses):
        loss = float(loss)
        if not math.isfinite(loss):
            return run_start if run_start is not None else t
        smoothed.append(median([float(v) for v in losses[max(0, t - rule.smooth + 1) : t + 1]]))
        current = smoothed[-1]
        if floor is None:
            floor = rule.floor_frac * abs(current)
        bad = current > rule.factor * max(best, floor)
        if bad:
            if run_start is None:
                run_start = t
            if t - run_start + 1 >= rule.patience:
                return run_start
        else:
            run_start = None
        # only medians whose whole window lies past the warm-up form the baseline
        if t >= rule.warmup + rule.smooth - 1 and run_start is None:
            best = min(best, current)
    return None


def band_exit_step(
    losses: Sequence[float],
    onset: int = 0,
    window: int = 100,
    k: float = 5.0,
    rel_floor: float = 0.05,
    min_history: int = 10,
) -> int | None:
    """The first step ``t >= onset`` at which the loss leaves the band of its own recent
    past, or ``None``: the moment a shock becomes visible in the loss itself, independent
    of any detector.

    The band at ``t`` is built from the (finite) losses of the ``window`` steps before
    ``t``: with ``m`` their median and ``MAD`` their median absolute deviation,
    ``upper = m + max(k * 1.4826 * MAD, rel_floor * |m|)`` (``1.4826 * MAD`` estimates a
    normal standard deviation; the relative floor keeps a flat loss's ordinary noise out).
    The loss leaves its band when ``losses[t] > upper`` or is non-finite. Steps with fewer
    than ``min_history`` earlier losses are skipped. Defaults: a 100-step window, 5 MAD
    sigmas, a 5% floor.
    """
    if window < 1 or min_history < 1 or k < 0 or rel_floor < 0:
        raise ValueError("need window >= 1, min_history >= 1, k >= 0 and rel_floor >= 0")
    for t in range(max(0, onset), len(losses)):
        loss = float(losses[t])
        if not math.isfinite(loss):
            return t
        past = [float(v) for v in losses[max(0, t - window) : t] if math.isfinite(float(v))]
        if len(past) < min_history:
            continue
        m = median(past)
        mad = median(abs(v - m) for v in past)
        if loss > m + max(k * 1.4826 * mad, rel_floor * abs(m)):
            return t
    return None
