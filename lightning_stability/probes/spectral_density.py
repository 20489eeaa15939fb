"""The Hessian spectral density in TensorBoard: estimated by stochastic Lanczos quadrature
and written as a histogram (expected eigenvalue counts) and a figure (log scale)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_stability.estimators.density import slq_density
from lightning_stability.estimators.hvp import HessianOperator
from lightning_stability.vocabulary import SHARPNESS_DENSITY, SHARPNESS_DENSITY_PLOT

__all__ = ["density_figure", "log_density", "write_histogram"]


def log_density(
    trainer: pl.Trainer, op: HessianOperator, dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Estimate the spectral density of ``op`` (every rank, products are collective) and
    write it to the Trainer's TensorBoard loggers on rank 0; nothing without one."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    density = slq_density(op.matvec, op.dim, generator=gen, dtype=dtype, device=op.device)
    if trainer.is_global_zero:
        grid, values = density.curve(num_points=200)
        write_histogram(loggers, SHARPNESS_DENSITY, grid, values, op.dim, trainer.global_step)
        figure = density_figure(grid, values, trainer.global_step)
        for logger in loggers:
            logger.experiment.add_figure(
                SHARPNESS_DENSITY_PLOT, figure, trainer.global_step, close=False
            )


def density_figure(grid: Tensor, density: Tensor, step: int) -> Any:
    """A matplotlib ``Figure`` of the smoothed Hessian spectral density (log scale, so the
    bulk near zero and the outliers both show). Built without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6))
    ax = fig.subplots()
    ax.semilogy(grid.double().cpu().numpy(), density.double().cpu().clamp_min(1e-12).numpy())
    ax.set_xlabel("eigenvalue", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"Hessian spectral density (SLQ), step {step}", fontsize=9)
    fig.tight_layout()
    return fig


def write_histogram(
    loggers: list, tag: str, grid: Tensor, density: Tensor, dim: int, step: int
) -> None:
    """Write a smoothed spectral density as a TensorBoard histogram whose bucket counts
    are expected numbers of eigenvalues (density x bucket width x dim)."""
    grid = grid.detach().double().cpu()
    width = float(grid[1] - grid[0]) if grid.numel() > 1 else 1.0
    counts = density.detach().double().cpu() * width * dim
    total = float(counts.sum())
    for logger in loggers:
        logger.experiment.add_histogram_raw(
            tag,
            min=float(grid[0]),
            max=float(grid[-1]),
            num=total,
            sum=float((grid * counts).sum()),
            sum_squares=float((grid**2 * counts).sum()),
            bucket_limits=grid.tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
