"""PerturbationAudit: what one audit costs, and whether a falling learning-rate margin comes
before divergence on the scenario suite.

Cost: the digits MLP (SGD + momentum, the suite's ``stable_digits_sgd`` task) is trained once
bare and once with an audit at the end of every epoch; the cost of an audit is reported as a
multiple of the median bare epoch's wall time, next to its number of rollouts (each rollout is
``horizon`` optimizer steps on the fork, so ``rollouts * horizon / steps_per_epoch`` bounds the
ratio from above; on a tiny model a fork step is cheaper than a Trainer step, whose fixed
per-step overhead dominates).

Lead time: each scenario of ``benchmarks/scenarios`` runs with only the audit attached
(optimization dimension). An alarm is the first audit whose learning-rate margin falls below
``--alarm`` (default 1.5: half again the run's own step size would already diverge within the
horizon). For diverging scenarios the lead time is ``divergence_step - alarm_step`` (positive:
the alarm came first); for stable ones any alarm is a false alarm. Audits happen only at epoch
ends, so the alarm's resolution is one epoch.

    python -m benchmarks.audit --quick       # 3 digits scenarios, 1 seed (minutes on 2 cores)
    python -m benchmarks.audit               # every scenario, 3 seeds

Writes ``benchmarks/audit.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.reference import quiet_trainer
from lightning_stability.estimators.perturbation import AuditConfig
from lightning_stability.probes.audit import PerturbationAudit

OUT = Path(__file__).with_name("audit.json")
MARGIN = "stability/audit/optimization/lr_margin"
QUICK_SCENARIOS = ("stable_digits_sgd", "lr_too_high", "lr_spike")


class _EpochClock(Callback):
    """Wall time of every training epoch, and of every audit (read from the audit itself,
    which runs inside ``on_train_epoch_end`` and so is excluded from the epoch's time)."""

    def __init__(self, audit: PerturbationAudit | None) -> None:
        self.audit = audit
        self.epochs: list[float] = []
        self.audits: list[float] = []
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(self._last - self._start)
        if self.audit is not None and len(self.audits) < len(self.audit.history):
            self.audits.append(self.audit.last_seconds)


def _audit(kwargs: dict[str, Any]) -> PerturbationAudit:
    """A ``PerturbationAudit`` from one flat dict (the form the results record): its own
    arguments, and the rest as its ``AuditConfig``."""
    own = {k: v for k, v in kwargs.items() if k in ("every_n_epochs", "num_batches", "seed")}
    config = AuditConfig(**{k: v for k, v in kwargs.items() if k not in own})
    return PerturbationAudit(audit=config, **own)


def audit_cost(epochs: int, audit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Median audit time over median bare-epoch time on the digits MLP."""
    from benchmarks.scenarios.registry import SCENARIOS

    scenario = SCENARIOS["stable_digits_sgd"]
    out: dict[str, Any] = {}
    for use in (False, True):
        pl.seed_everything(0, verbose=False)
        module, train_loader, _, _, _ = scenario.make(0)
        audit = _audit(audit_kwargs) if use else None
        clock = _EpochClock(audit)
        callbacks: list[Callback] = [clock] if audit is None else [audit, clock]
        trainer = quiet_trainer(
            max_epochs=epochs,
            callbacks=callbacks,
        )
        trainer.fit(module, train_loader)
        if use:
            out["audit_s"] = clock.audits
            out["rollouts"] = [h["values"]["rollouts"] for h in audit.history]
            out["epoch_with_audit_s"] = clock.epochs
        else:
            out["epoch_s"] = clock.epochs
            out["steps_per_epoch"] = trainer.num_training_batches
    epoch = statistics.median(out["epoch_s"][1:] or out["epoch_s"])
    out["cost_per_audit_epochs"] = statistics.median(out["audit_s"]) / epoch
    out["audit_kwargs"] = audit_kwargs
    return out


def lead_times(
    names: list[str], seeds: list[int], alarm: float, audit_kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    from benchmarks.scenarios.registry import SCENARIOS
    from benchmarks.scenarios.runner import run_scenario

    rows = []
    for name in names:
        scenario = SCENARIOS[name]
        for seed in seeds:

            def factory(mode: str, sc: Any) -> tuple[list[Callback], list[str]]:
                return [_audit(audit_kwargs)], []

            record = run_scenario(scenario, seed, "bare", factory, keep_history=True)
            series = record.history.get(MARGIN, [])  # type: ignore[attr-defined]
            alarm_step = next((s for s, v in series if v < alarm), None)
            div = record.divergence_step
            if scenario.kind == "diverging":
                lead = (div - alarm_step) if (div is not None and alarm_step is not None) else None
            else:
                lead = None
            rows.append(
                {
                    "scenario": name,
                    "kind": scenario.kind,
                    "seed": seed,
                    "divergence_step": div,
                    "alarm_step": alarm_step,
                    "lead_steps": lead,
                    "detected_before": lead is not None and lead > 0,
                    "false_alarm": scenario.kind == "stable" and alarm_step is not None,
                    "margins": [(int(s), float(v)) for s, v in series],
                    "wall_s": record.wall_s,
                }
            )
            margins = " ".join(f"{v:.2g}@{s}" for s, v in series[:8])
            print(
                f"{name:<20} {seed:>4} {_fmt(div):>6} {_fmt(alarm_step):>6} {_fmt(lead):>6}  "
                f"{margins}"
            )
    return rows


def _fmt(x: Any) -> str:
    return "-" if x is None else str(x)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 digits scenarios, 1 seed, short cost run"
    )
    parser.add_argument("--alarm", type=float, default=1.5, help="margin below which to alarm")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--skip-scenarios", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cost_kwargs: dict[str, Any] = {"every_n_epochs": 1}
    print("cost of one audit (defaults: horizon 20, 4 dimensions) on the digits MLP")
    cost = audit_cost(epochs=2 if args.quick else 6, audit_kwargs=cost_kwargs)
    print(
        f"  epoch {statistics.median(cost['epoch_s']):.3f} s ({cost['steps_per_epoch']} steps), "
        f"audit {statistics.median(cost['audit_s']):.3f} s, "
        f"{statistics.median(cost['rollouts']):.0f} rollouts -> "
        f"{cost['cost_per_audit_epochs']:.1f} epochs per audit"
    )
    payload: dict[str, Any] = {"quick": args.quick, "cost": cost, "alarm": args.alarm}

    if not args.skip_scenarios:
        from benchmarks.scenarios.registry import SCENARIOS

        names = [n for n in args.only.split(",") if n] or (
            list(QUICK_SCENARIOS) if args.quick else list(SCENARIOS)
        )
        unknown = sorted(set(names) - set(SCENARIOS))
        if unknown:
            parser.error(f"--only: unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
        seeds = list(range(args.seeds or (1 if args.quick else 3)))
        scenario_kwargs = {
            "every_n_epochs": 1,
            "horizon": 10,
            "dimensions": ("optimization",),
            "bisection_steps": 2,
            "num_batches": 2,
        }
        print(f"\nlead time (alarm when lr_margin < {args.alarm}; audit {scenario_kwargs})")
        print(f"{'scenario':<20} {'seed':>4} {'div':>6} {'alarm':>6} {'lead':>6}  margins@step")
        rows = lead_times(names, seeds, args.alarm, scenario_kwargs)
        diverging = [r for r in rows if r["kind"] == "diverging"]
        stable = [r for r in rows if r["kind"] == "stable"]
        leads = [r["lead_steps"] for r in diverging if r["detected_before"]]
        summary = {
            "recall_before_divergence": (
                sum(r["detected_before"] for r in diverging) / len(diverging)
                if diverging
                else math.nan
            ),
            "median_lead_steps": statistics.median(leads) if leads else None,
            "false_alarm_rate": (
                sum(r["false_alarm"] for r in stable) / len(stable) if stable else math.nan
            ),
        }
        print(
            f"recall before divergence {summary['recall_before_divergence']:.2f}, "
            f"median lead {summary['median_lead_steps']} steps, "
            f"false alarms {summary['false_alarm_rate']:.2f}"
        )
        payload.update(scenario_audit=scenario_kwargs, scenarios=rows, summary=summary)
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"wrote {OUT}")
    return payload


if __name__ == "__main__":
    main()
