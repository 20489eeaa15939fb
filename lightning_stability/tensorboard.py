"""The "Stability" tab in TensorBoard: a custom-scalars layout written once per run.

TensorBoard's custom-scalars plugin groups existing scalar tags into charts; a chart's
tags are regular expressions, so per-layer series (``stability/cka/<layer>``) appear
without being listed. Reference lines (the edge of stability at 1.0 for the ratios, the
edge each curvature is compared with, the watch threshold) are ordinary scalars under ``stability/ref/`` so they plot on the same axes.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

__all__ = ["STABILITY_LAYOUT", "tensorboard_writers", "write_layout"]

STABILITY_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "Stability": {
        "edge-of-stability ratio (1.0 = edge)": [
            "Multiline",
            [
                r"stability/sharpness/eos_ratio$",
                r"stability/sharpness/directional_ratio$",
                r"stability/ref/edge$",
            ],
        ],
        "lambda_max vs its edge": [
            "Multiline",
            [
                r"stability/sharpness/lambda_max$",
                r"stability/sharpness/directional$",
                r"stability/sharpness/critical$",
                r"stability/ref/lambda_edge$",
            ],
        ],
        "preconditioned sharpness vs its edge (Adam)": [
            "Multiline",
            [r"stability/sharpness/preconditioned$", r"stability/ref/preconditioned_edge$"],
        ],
        "gradient norm and clip threshold": [
            "Multiline",
            [r"stability/grad/norm$", r"stability/grad/clip_threshold$"],
        ],
        "clip events and clip rate": [
            "Multiline",
            [r"stability/grad/clip_event$", r"stability/grad/clip_rate$"],
        ],
        "loss and its tail": [
            "Multiline",
            [r"stability/loss/value$", r"stability/loss/tail_max$", r"stability/loss/tail_q$"],
        ],
        "CKA per layer (to previous check)": ["Multiline", [r"stability/cka/.*"]],
        "CKA per layer (to first check)": ["Multiline", [r"stability/cka_initial/.*"]],
        "meta-state deviation and watch threshold": [
            "Multiline",
            [r"stability/meta/deviation$", r"stability/ref/watch_threshold$"],
        ],
        "level (0 ok, 1 watch, 2 warning, 3 critical)": ["Multiline", [r"stability/meta/level$"]],
        "learning-rate scale and stage": [
            "Multiline",
            [r"stability/action/lr_scale$", r"stability/action/stage$"],
        ],
        "perturbation audit margins": ["Multiline", [r"stability/audit/.*"]],
    }
}


def tensorboard_writers(loggers: list[Logger]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger among ``loggers`` (others are
    skipped: their scalars still arrive through ``pl_module.log``)."""
    return [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]


def write_layout(loggers: list[Logger], layout: dict[str, Any] | None = None) -> int:
    """Write the custom-scalars layout to every TensorBoard logger; returns how many."""
    writers = tensorboard_writers(loggers)
    for writer in writers:
        writer.add_custom_scalars(layout or STABILITY_LAYOUT)
    return len(writers)
