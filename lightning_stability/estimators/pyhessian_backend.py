"""PyHessian (Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian",
2020) as an alternative backend for the top eigenvalues and the trace.

PyHessian 0.1 wants ``hessian(model, criterion, data=(x, y), cuda=...)`` and, on the way,
puts the model in eval mode, writes ``.grad`` with ``create_graph=True`` (a live graph
hanging off every parameter), draws from the global RNG and knows only the device strings
``'cuda'`` and ``'cpu'``. This wrapper gives it a shim module whose forward pass is the
caller's loss closure, and undoes every one of those effects on exit.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_stability.estimators.hvp import flatten
from lightning_stability.estimators.isolation import frozen_rng, preserved_state
from lightning_stability.estimators.lanczos import EigenResult
from lightning_stability.estimators.trace import TraceResult

__all__ = ["PyHessianBackend"]


class _LossShim(nn.Module):
    """A module with no parameters of its own: it registers the caller's parameters (the
    same objects, not copies) so PyHessian differentiates with respect to them, and its
    forward pass ignores its input and returns the closure's loss."""

    def __init__(self, loss_closure: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        super().__init__()
        self.shared = nn.ParameterList(params)
        self._closure = loss_closure

    def forward(self, _inputs: Tensor) -> Tensor:
        return self._closure()


def _identity_criterion(loss: Tensor, _targets: Tensor) -> Tensor:
    return loss


class PyHessianBackend:
    """Top eigenvalues (power iteration with deflation) and trace (Hutchinson) of the
    Hessian of ``loss_closure()`` computed by the ``pyhessian`` package, with no side
    effects on the caller.

    Args:
        loss_closure: returns the scalar loss at the current parameters.
        params: parameters (``nn.Parameter``) to differentiate with respect to; frozen
            ones are skipped.
        module: the model the closure runs; its train/eval modes, buffers and ``.grad``
            are restored afterwards (the closure runs in whatever mode it had).
        seed: seeds PyHessian's random vectors inside a forked RNG, so results are
            reproducible and the caller's RNG stream is untouched. Default 0.

    Note that power iteration converges to the eigenvalue largest in *magnitude*, which
    is the most negative one when negative curvature dominates; :func:`lanczos_top_k`
    returns the largest algebraic eigenvalue.
    """

    def __init__(
        self,
        loss_closure: Callable[[], Tensor],
        params: Sequence[Tensor],
        module: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        if not all(isinstance(p, nn.Parameter) for p in self.params):
            raise ValueError("params: PyHessian needs nn.Parameter objects")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"params: all on one device expected, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._closure = loss_closure
        self._module = module
        self.seed = seed

    @contextlib.contextmanager
    def _session(self) -> Iterator[tuple[object, list[int]]]:
        # The package's __init__ rebinds the name ``hessian`` to the class, so the
        # submodule (whose global we wrap to count products) is fetched explicitly.
        ph = importlib.import_module("pyhessian.hessian")

        counter = [0]
        original_hvp = ph.hessian_vector_product

        def counting_hvp(grads: list[Tensor], params: list[Tensor], v: list[Tensor]):
            counter[0] += 1
            return original_hvp(grads, params, v)

        grads = [p.grad for p in self.params]
        shim = _LossShim(self._closure, self.params)
        cuda = self.device.type == "cuda"
        dummy = torch.zeros(1, device=self.device)
        with contextlib.ExitStack() as stack:
            if self._module is not None:
                stack.enter_context(preserved_state(self._module))
            stack.enter_context(frozen_rng([self.device]))
            if cuda:
                # PyHessian moves tensors to the bare string 'cuda': make that name mean
                # the device the parameters live on.
                stack.enter_context(torch.cuda.device(self.device))
            # PyHessian's backward(create_graph=True) warns of a parameter/grad reference
            # cycle; the cycle is broken below by resetting every .grad.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            torch.manual_seed(self.seed)
            for p in self.params:
                p.grad = None
            ph.hessian_vector_product = counting_hvp
            try:
                # Keep PyHessian's eval() off the caller's modules: the shim has no
                # submodules, and preserved_state restores modes anyway.
                engine = ph.hessian(shim, _identity_criterion, data=(dummy, dummy), cuda=cuda)
                yield engine, counter
            finally:
                ph.hessian_vector_product = original_hvp
                # Drop the create_graph gradients (they keep the graph alive) and put the
                # caller's gradients back.
                for p, g in zip(self.params, grads):
                    p.grad = g
                with contextlib.suppress(NameError):
                    engine.gradsH = None
                    engine.params = None

    def top_k(self, k: int = 1, max_iter: int = 100, tol: float = 1e-3) -> EigenResult:
        """Top ``k`` eigenpairs by PyHessian's power iteration with deflation.

        ``tol`` is PyHessian's relative change between consecutive iterates; ``max_iter``
        bounds each eigenvalue's iterations. Eigenvalues are returned in PyHessian's
        order (largest magnitude first), float64 on the CPU.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        with self._session() as (engine, counter):
            values, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
            eigvecs = torch.stack([flatten([t.detach() for t in v]) for v in vectors], dim=1)
            products = counter[0]
        return EigenResult(
            eigenvalues=torch.tensor(values, dtype=torch.float64),
            eigenvectors=eigvecs,
            num_products=products,
            converged=products < k * max_iter,
        )

    def trace(self, max_iter: int = 100, tol: float = 1e-3) -> TraceResult:
        """Hutchinson trace by PyHessian (stops when the running mean changes by less
        than ``tol`` relative, or after ``max_iter`` products). PyHessian's stopping test
        divides by the running trace, so a negative trace stops it after two samples."""
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        with self._session() as (engine, counter):
            samples = torch.tensor(engine.trace(maxIter=max_iter, tol=tol), dtype=torch.float64)
            products = counter[0]
        std = float(samples.std() / samples.numel() ** 0.5) if samples.numel() > 1 else float("nan")
        return TraceResult(float(samples.mean()), products, std)
