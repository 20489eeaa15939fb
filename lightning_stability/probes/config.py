"""Grouped settings of the probes: small frozen dataclasses, validated once, accepted from
LightningCLI YAML (``init_args: {cadence: {every_n_steps: 500}}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_stability.configuration import field_aliases
from lightning_stability.vocabulary import (
    check_choice,
    check_finite_positive,
    check_in_range,
    check_nonnegative_int,
    check_positive_int,
)

__all__ = [
    "BACKENDS",
    "DRIFT_FLAT_ALIASES",
    "DTYPES",
    "SHARPNESS_FLAT_ALIASES",
    "DriftCadence",
    "DriftLimits",
    "DriftProbe",
    "SharpnessCadence",
    "SharpnessEstimator",
    "SharpnessMeasures",
]

Backend = Literal["native", "pyhessian"]
BACKENDS: tuple[str, ...] = ("native", "pyhessian")
DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass(frozen=True)
class SharpnessCadence:
    """When :class:`~lightning_stability.probes.SharpnessMonitor` measures (units:
    optimizer steps).

    Attributes:
        every_n_steps: steps between Lanczos checks (default 2500). A check runs up to
            ``max_iter`` Hessian-vector products per eigenproblem (each an extra backward
            pass), so checks are spread out; the adaptive cadence makes them denser near
            the edge or when the early warning asks. ``benchmarks/RESULTS.md`` reports
            the cost.
        directional_every_n_steps: steps between directional / critical readings (at
            most ``every_n_steps``; ``None`` = ``every_n_steps``; default 1000).
        density_every_n_checks: every this many checks, estimate the spectral density
            (stochastic Lanczos quadrature) and write it as a histogram to an attached
            TensorBoard logger; 0 = never (default 0).
        adaptive: measure ``adaptive_factor`` times more often while ``eos_ratio`` exceeds
            ``ratio_threshold`` or a callback sets ``request_closer_watch`` (reduced over
            ranks); back off when calm (default True).
        ratio_threshold: ``eos_ratio`` above which checks become denser (default 0.8).
        adaptive_factor: cadence divisor while on closer watch (default 4).
    """

    every_n_steps: int = 2500
    directional_every_n_steps: int | None = 1000
    density_every_n_checks: int = 0
    adaptive: bool = True
    ratio_threshold: float = 0.8
    adaptive_factor: int = 4

    def __post_init__(self) -> None:
        check_positive_int(self.every_n_steps, "every_n_steps")
        check_positive_int(
            self.directional_every_n_steps, "directional_every_n_steps", allow_none=True
        )
        check_nonnegative_int(self.density_every_n_checks, "density_every_n_checks")
        check_finite_positive(self.ratio_threshold, "ratio_threshold")
        check_positive_int(self.adaptive_factor, "adaptive_factor")


@dataclass(frozen=True)
class SharpnessEstimator:
    """How :class:`~lightning_stability.probes.SharpnessMonitor` computes the top of the
    Hessian spectrum.

    Attributes:
        k: number of top eigenvalues (default 1; at most ``max_iter``).
        backend: ``"native"`` (Lanczos with warm start) or ``"pyhessian"`` (PyHessian's
            power iteration, isolated like the native path; no warm start; eigenvalues
            largest in magnitude; single process only). The preconditioned, directional,
            trace and density readings always use the native products (default
            ``"native"``).
        tol: relative tolerance of Lanczos, in [0, 1) (default 1e-3).
        max_iter: cap on Hessian-vector products per eigenproblem (default 30).
        warm_start: start Lanczos from the previous check's eigenvectors (default True).
        dtype: ``"float32"`` or ``"float64"``; ``None`` = float64 for float64 models, else
            float32 (default ``None``).
        seed: seed of Lanczos' random start vectors, identical on every rank (default 0).
    """

    k: int = 1
    backend: Backend = "native"
    tol: float = 1e-3
    max_iter: int = 30
    warm_start: bool = True
    dtype: Literal["float32", "float64"] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.k, "k")
        check_positive_int(self.max_iter, "max_iter")
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.dtype, "dtype", (*DTYPES, None))
        check_in_range(self.tol, "tol", 0.0, 1.0, high_open=True)
        if self.k > self.max_iter:
            raise ValueError(f"k must be <= max_iter={self.max_iter}, got {self.k}")


@dataclass(frozen=True)
class SharpnessMeasures:
    """Which readings :class:`~lightning_stability.probes.SharpnessMonitor` publishes
    besides ``lambda_max`` and ``eos_ratio``.

    Attributes:
        directional: ``directional`` / ``directional_ratio`` (default True).
        critical: ``critical`` (default True).
        preconditioned: for Adam/AdamW, also run Lanczos on the preconditioned Hessian
            (doubles a check's products; default True).
        trace: the Hessian trace by Hutch++ at each check (default False).
        trace_samples: Hessian-vector products of the trace estimate (default 30).
    """

    directional: bool = True
    critical: bool = True
    preconditioned: bool = True
    trace: bool = False
    trace_samples: int = 30

    def __post_init__(self) -> None:
        check_positive_int(self.trace_samples, "trace_samples")


@dataclass(frozen=True)
class DriftCadence:
    """When :class:`~lightning_stability.probes.RepresentationDriftMonitor` checks (units:
    epochs and optimizer steps).

    Attributes:
        every_n_epochs: check at the end of every n-th epoch (default 1; 0: by steps only).
        every_n_steps: the longest stretch between checks in optimizer steps (default
            1000; ``None``: epoch ends only). Epochs longer than this are checked every
            ``every_n_steps`` steps instead of at their end.
        min_steps: fewest optimizer steps between epoch-end checks (default 500, which
            bounds the cost of runs with short epochs; 0 checks at every due epoch end).
    """

    every_n_epochs: int = 1
    every_n_steps: int | None = 1000
    min_steps: int = 500

    def __post_init__(self) -> None:
        check_nonnegative_int(self.every_n_epochs, "every_n_epochs")
        check_positive_int(self.every_n_steps, "every_n_steps", allow_none=True)
        check_nonnegative_int(self.min_steps, "min_steps")


@dataclass(frozen=True)
class DriftProbe:
    """The fixed probe batch of
    :class:`~lightning_stability.probes.RepresentationDriftMonitor`.

    Attributes:
        probe_size: samples in the probe batch, at least 4 (debiased CKA; default 64:
            enough for the debiased estimator, and small enough that a check costs a
            fraction of a training step).
        source: ``"auto"`` (default: the training set when the probe runs through
            ``training_step``, which is written for training batches; the validation set,
            when there is one, for the ``forward`` path), ``"val"`` (falls back to the
            training set without a validation loader) or ``"train"``.
        seed: seed of the probe draw, of the feature hashing and of the RNG inside a check
            (default 0).
    """

    probe_size: int = 64
    source: Literal["auto", "val", "train"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.probe_size, bool) or not isinstance(self.probe_size, int):
            raise ValueError(f"probe_size must be an integer >= 4, got {self.probe_size!r}")
        if self.probe_size < 4:
            raise ValueError(f"probe_size must be an integer >= 4, got {self.probe_size!r}")
        check_choice(self.source, "source", ("auto", "val", "train"))


@dataclass(frozen=True)
class DriftLimits:
    """Memory and history bounds of
    :class:`~lightning_stability.probes.RepresentationDriftMonitor`.

    Attributes:
        max_features: features kept per layer and sample; wider layers are hashed down
            (default 16384).
        chunk_size: samples per probe step (bounds memory; default 128). A batch holding
            anything other than per-sample tensors is run in one piece.
        max_history: checks kept for the heat map (default 100).
    """

    max_features: int = 16384
    chunk_size: int = 128
    max_history: int = 100

    def __post_init__(self) -> None:
        check_positive_int(self.max_features, "max_features")
        check_positive_int(self.chunk_size, "chunk_size")
        check_positive_int(self.max_history, "max_history")


SHARPNESS_FLAT_ALIASES = field_aliases(
    cadence=SharpnessCadence, estimator=SharpnessEstimator, measures=SharpnessMeasures
)
"""The flat keywords of ``SharpnessMonitor`` before its settings were grouped."""
DRIFT_FLAT_ALIASES = field_aliases(cadence=DriftCadence, probe=DriftProbe, limits=DriftLimits)
"""The flat keywords of ``RepresentationDriftMonitor`` before its settings were grouped."""
