"""The CKA heat map in TensorBoard: layers x checks, CKA to the previous check and to the
first, as a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability.vocabulary import CKA_HEATMAP

__all__ = ["cka_heatmap", "log_heatmap"]


def log_heatmap(
    trainer: pl.Trainer, layer_names: Sequence[str], history: Sequence[Mapping[str, Any]]
) -> None:
    """Add the heat map of ``history`` to the Trainer's TensorBoard loggers (none without
    one) at the current step."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    figure = cka_heatmap(layer_names, history)
    for logger in loggers:
        logger.experiment.add_figure(
            CKA_HEATMAP, figure, global_step=trainer.global_step, close=False
        )


def cka_heatmap(layer_names: Sequence[str], history: Sequence[Mapping[str, Any]]) -> Any:
    """A matplotlib ``Figure``: layers x checks, CKA to the previous check and to the first.
    Built without pyplot, so no global backend is touched."""
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    fig = Figure(figsize=(4 + 0.25 * len(steps), 1.5 + 0.35 * len(layer_names)))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    image = None
    for ax, key, title in zip(
        axes, ("cka", "cka_initial"), ("CKA to previous check", "CKA to first check")
    ):
        grid = torch.tensor([row[key] for row in history], dtype=torch.float64).T
        image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(layer_names)), labels=list(layer_names), fontsize=7)
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, labels=[str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return fig
