"""Grouped settings of the warning layer: small frozen dataclasses shared by
:class:`~lightning_stability.warning.EarlyWarning`, its
:class:`~lightning_stability.warning.assessment.MetaStateMonitor` and
:class:`~lightning_stability.warning.loss_band.LossBand`; validated once, accepted from
LightningCLI YAML (``init_args: {trend: {tau: 0.7}}``)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_stability.configuration import field_aliases
from lightning_stability.probes.edge import LR_JUMP
from lightning_stability.vocabulary import check_nonnegative_int, check_positive_int

__all__ = [
    "BAND_FLAT_ALIASES",
    "EARLY_WARNING_FLAT_ALIASES",
    "WARNING_FLAT_ALIASES",
    "BandDamage",
    "BandLeaving",
    "BandShape",
    "Baselines",
    "DeviationThresholds",
    "EdgeRule",
    "LevelPolicy",
    "TrendTest",
]


def _require(ok: bool, owner: str, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class DeviationThresholds:
    """When the meta-state's deviation proposes WATCH (units: robust standard deviations).

    Attributes:
        watch_threshold: deviation that proposes WATCH (> 0; default 8).
        exit_ratio: a level is held while its evidence stays above ``exit_ratio`` times
            its enter threshold (in (0, 1]; default 0.6).
        cusum_drift: per-step allowance of the CUSUM on the deviation (> 0; default 5).
        cusum_threshold: the CUSUM's sum of excesses over ``cusum_drift`` that proposes
            WATCH (> 0; default 12; ``None``: no CUSUM).
    """

    watch_threshold: float = 8.0
    exit_ratio: float = 0.6
    cusum_drift: float = 5.0
    cusum_threshold: float | None = 12.0

    def __post_init__(self) -> None:
        owner = "DeviationThresholds"
        _require(self.watch_threshold > 0, owner, "watch_threshold", "> 0", self.watch_threshold)
        _require(0 < self.exit_ratio <= 1, owner, "exit_ratio", "in (0, 1]", self.exit_ratio)
        _require(self.cusum_drift > 0, owner, "cusum_drift", "> 0", self.cusum_drift)
        if self.cusum_threshold is not None:
            _require(
                self.cusum_threshold > 0,
                owner,
                "cusum_threshold",
                "> 0 or None",
                self.cusum_threshold,
            )


@dataclass(frozen=True)
class Baselines:
    """The rolling robust baselines the readings are scored against (units: readings and
    optimizer steps).

    Attributes:
        window: readings in each rolling baseline (>= 3; default 64).
        warmup: readings a baseline needs before it scores (in [1, window]; default 20).
        max_age: optimizer steps after which a reading is stale and left out (>= 1;
            default 250).
        freeze_limit: at most this many steps of baseline and band freezing while at
            WARNING or above (>= 0; default 200).
    """

    window: int = 64
    warmup: int = 20
    max_age: int = 250
    freeze_limit: int = 200

    def __post_init__(self) -> None:
        owner = "Baselines"
        _require(self.window >= 3, owner, "window", ">= 3", self.window)
        _require(
            1 <= self.warmup <= self.window, owner, "warmup", f"in [1, {self.window}]", self.warmup
        )
        check_positive_int(self.max_age, "max_age")
        check_nonnegative_int(self.freeze_limit, "freeze_limit")


@dataclass(frozen=True)
class TrendTest:
    """The critical-slowing-down test: rising variance and lag-1 autocorrelation
    (Dakos et al. 2012), on the readings whose signal asks for it.

    Attributes:
        window: values per rolling variance / autocorrelation window (>= 4; default 48).
        history: rolling statistics in the Kendall-tau trend test (>= 4; default 96).
        tau: Kendall tau of a rising trend (in (0, 1]; default 0.6).
        var_factor: growth of the rolling variance over the history (> 1; default 3).
        ac1_rise: growth of the lag-1 autocorrelation over the history (default 0.2).
        sustain: consecutive readings of slowing down (>= 1; default 10).
    """

    window: int = 48
    history: int = 96
    tau: float = 0.6
    var_factor: float = 3.0
    ac1_rise: float = 0.2
    sustain: int = 10

    def __post_init__(self) -> None:
        owner = "TrendTest"
        _require(self.window >= 4, owner, "window", ">= 4", self.window)
        _require(self.history >= 4, owner, "history", ">= 4", self.history)
        _require(0 < self.tau <= 1, owner, "tau", "in (0, 1]", self.tau)
        _require(self.var_factor > 1, owner, "var_factor", "> 1", self.var_factor)
        _require(self.sustain >= 1, owner, "sustain", ">= 1", self.sustain)

    def as_args(self) -> tuple[int, int, float, float, float, int]:
        """The arguments of :class:`~lightning_stability.warning.indicators.TrendIndicator`."""
        return (self.window, self.history, self.tau, self.var_factor, self.ac1_rise, self.sustain)


@dataclass(frozen=True)
class EdgeRule:
    """The edge-of-stability rule (units: the edge ratio, 1.0 = the edge).

    Attributes:
        margin: the rule fires above ``1 + margin`` (>= 0; default 0.25).
        sustain: consecutive fresh readings above it (>= 1; default 3).
        critical: a measured edge ratio above this while the loss is above its band is
            CRITICAL (> ``1 + margin``; default 2.0).
        lr_jump: one-step learning-rate growth that counts as a jump for the predicted
            ratio (> 1; default 1.5).
    """

    margin: float = 0.25
    sustain: int = 3
    critical: float = 2.0
    lr_jump: float = LR_JUMP

    def __post_init__(self) -> None:
        owner = "EdgeRule"
        _require(self.margin >= 0, owner, "margin", ">= 0", self.margin)
        _require(self.sustain >= 1, owner, "sustain", ">= 1", self.sustain)
        _require(
            self.critical > 1 + self.margin,
            owner,
            "critical",
            f"> 1 + margin = {1 + self.margin}",
            self.critical,
        )
        _require(self.lr_jump > 1, owner, "lr_jump", "> 1", self.lr_jump)


@dataclass(frozen=True)
class LevelPolicy:
    """How the level moves (units: optimizer steps).

    Attributes:
        patience: consecutive steps of evidence before the level rises (>= 1; default 2).
        min_dwell: minimum steps at a level before it falls (>= 0; default 10).
        cooldown: steps before a level that was left can be re-entered, and between
            repeated CRITICAL events (>= 0; default 50).
        repeat_every: steps between repeats of a persisting WARNING whose evidence still
            holds (>= 1; default 25; ``None``: only changes of level are issued).
    """

    patience: int = 2
    min_dwell: int = 10
    cooldown: int = 50
    repeat_every: int | None = 25

    def __post_init__(self) -> None:
        check_positive_int(self.patience, "patience")
        check_nonnegative_int(self.min_dwell, "min_dwell")
        check_nonnegative_int(self.cooldown, "cooldown")
        check_positive_int(self.repeat_every, "repeat_every", allow_none=True)


def _band(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"band {name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class BandShape:
    """How :class:`~lightning_stability.warning.loss_band.LossBand` draws the band of the
    training loss (units: losses and optimizer steps).

    Attributes:
        window: recent losses the band is computed from (default 64: short enough that the
            fast fall of early training has left it when the loss settles).
        warmup: losses needed before the band answers (in [1, window]; default 20).
        quantile: the band's top, a quantile of the window (in (0.5, 1); default 0.95).
        smooth: length of the trailing median compared with the band (default 5).
        rel_width: the band is never narrower than this fraction of the floor, so that a
            loss that has become constant does not turn rounding into trouble
            (default 0.05).
        scale_frac: the factors of :class:`BandLeaving` and :class:`BandDamage` are taken
            of the floor, or of this fraction of the loss the run started from (the median
            of its first ``warmup`` losses), whichever is larger (in [0, 1); default
            0.01): near zero, a loss that doubles from a ten-thousandth of where it
            started has not left anything that matters.
        memory: a loss is judged against the lowest band (lowest top) of the last
            ``memory`` steps (default 200), so that a loss creeping upwards is compared
            with where it was, not with a band it has already lifted.
        lag: losses in the local level of the start band (>= 2, at most ``window`` is
            used; 0 = no start band: the window's own band from the first steps; default
            16). Until the window has rolled over once (the first ``2 * window`` losses
            since the band began) it may still hold the fast fall of early training, and
            its quantile then measures that fall, not the noise: a run that turns unstable
            as soon as it has fallen would be judged against a band as wide as the fall.
            Over those steps the reference is instead the lowest start band: the window
            with each loss moved by the change of the local level (the median of the last
            ``lag`` losses) between its step and now, then drawn as usual. On a loss at
            its noise floor the level does not move and the start band is close to the
            window's own.
    """

    window: int = 64
    warmup: int = 20
    quantile: float = 0.95
    smooth: int = 5
    rel_width: float = 0.05
    scale_frac: float = 0.01
    memory: int = 200
    lag: int = 16

    def __post_init__(self) -> None:
        check_positive_int(self.window, "band window")
        check_positive_int(self.smooth, "band smooth")
        _band(
            1 <= self.warmup <= self.window, "warmup", f"in [1, window={self.window}]", self.warmup
        )
        check_positive_int(self.memory, "band memory")
        _band(0 <= self.scale_frac < 1, "scale_frac", "in [0, 1)", self.scale_frac)
        _band(0.5 < self.quantile < 1, "quantile", "in (0.5, 1)", self.quantile)
        _band(self.rel_width > 0, "rel_width", "> 0", self.rel_width)
        _band(
            isinstance(self.lag, int)
            and not isinstance(self.lag, bool)
            and self.lag != 1
            and self.lag >= 0,
            "lag",
            "0 or an integer >= 2",
            self.lag,
        )


@dataclass(frozen=True)
class BandLeaving:
    """When the training loss is leaving its band (WARNING) or one loss is a shock
    (units: band widths above the band's top, and multiples of the floor).

    Attributes:
        width: band widths above the top for ``leaving`` (> 0; default 3).
        factor: times the floor for ``leaving`` (>= 1; default 2).
        confirm: consecutive steps outside for ``leaving`` (>= 1; default 2).
        shock_width: widths above the top for a single-batch ``shock`` (> 0; default 50).
        shock_factor: times the floor for a ``shock`` (>= 1; default 10).
    """

    width: float = 3.0
    factor: float = 2.0
    confirm: int = 2
    shock_width: float = 50.0
    shock_factor: float = 10.0

    def __post_init__(self) -> None:
        check_positive_int(self.confirm, "band confirm")
        for name in ("width", "shock_width"):
            _band(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("factor", "shock_factor"):
            _band(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))


@dataclass(frozen=True)
class BandDamage:
    """When the training loss shows damage (CRITICAL evidence; units as
    :class:`BandLeaving`).

    Attributes:
        damage_width: widths above the top for ``damage`` (> 0; default 10).
        damage_factor: times the floor for ``damage`` (>= 1; default 3).
        sustain: consecutive steps for ``damage`` (>= 1; default 10).
        recovered: damage needs the trailing median at the end of its ``sustain`` steps to
            be at least this fraction of its value at their start (in (0, 1]; default
            0.5): a loss that halved has started to recover, one that wobbles on a high
            plateau has not.
        forget_low, forget_high: a trailing median back above ``forget_high`` times the
            loss the run started from (the median of its first three losses), after the
            band's floor had fallen to ``forget_low`` times it with the start above the
            band's top, is far above the floor whatever the band (defaults 0.5 and 0.8):
            a run that has lost what it learned is damaged.
    """

    damage_width: float = 10.0
    damage_factor: float = 3.0
    sustain: int = 10
    recovered: float = 0.5
    forget_low: float = 0.5
    forget_high: float = 0.8

    def __post_init__(self) -> None:
        check_positive_int(self.sustain, "band sustain")
        _band(0 < self.recovered <= 1, "recovered", "in (0, 1]", self.recovered)
        if not 0 < self.forget_low < self.forget_high:
            raise ValueError(
                "band forget_low and forget_high must satisfy 0 < forget_low < forget_high, "
                f"got {self.forget_low!r}, {self.forget_high!r}"
            )
        _band(self.damage_width > 0, "damage_width", "> 0", self.damage_width)
        _band(self.damage_factor >= 1, "damage_factor", ">= 1", self.damage_factor)


BAND_FLAT_ALIASES = {
    name: where
    for name, where in field_aliases(
        shape=BandShape, leaving=BandLeaving, damage=BandDamage
    ).items()
    if name != "lag"  # added after the grouping: it never had a flat keyword
}
"""The flat keywords of ``LossBand`` before its settings were grouped."""

WARNING_FLAT_ALIASES: dict[str, tuple[str, str]] = {
    "watch_threshold": ("deviation", "watch_threshold"),
    "exit_ratio": ("deviation", "exit_ratio"),
    "cusum_drift": ("deviation", "cusum_drift"),
    "cusum_threshold": ("deviation", "cusum_threshold"),
    "window": ("baselines", "window"),
    "warmup": ("baselines", "warmup"),
    "max_age": ("baselines", "max_age"),
    "freeze_limit": ("baselines", "freeze_limit"),
    "trend_window": ("trend", "window"),
    "trend_history": ("trend", "history"),
    "trend_tau": ("trend", "tau"),
    "trend_var_factor": ("trend", "var_factor"),
    "trend_ac1_rise": ("trend", "ac1_rise"),
    "trend_sustain": ("trend", "sustain"),
    "eos_margin": ("edge", "margin"),
    "eos_sustain": ("edge", "sustain"),
    "eos_critical": ("edge", "critical"),
    "lr_jump": ("edge", "lr_jump"),
}
"""The flat keywords of ``MetaStateMonitor`` and ``EarlyWarning`` before their settings
were grouped (``EarlyWarning`` adds those of :class:`LevelPolicy`)."""

EARLY_WARNING_FLAT_ALIASES = {**WARNING_FLAT_ALIASES, **field_aliases(levels=LevelPolicy)}
"""The flat keywords of ``EarlyWarning``: :data:`WARNING_FLAT_ALIASES` and the fields of
:class:`LevelPolicy`."""
