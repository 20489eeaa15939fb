"""SharpnessMonitor restricted to named parameters: the top eigenvalue of the Hessian
block of those parameters (a lower bound of the full lambda_max), validated at setup."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from test_sharpness_monitor import exact_hessian
from torch.utils.data import TensorDataset

from lightning_stability.probes.curvature_subset import (
    check_patterns,
    matches,
    unmatched_patterns,
)
from lightning_stability.probes.sharpness import SharpnessMonitor

KEY = "stability/sharpness/lambda_max"


def _block(model, names_selected):
    """Indices of the selected parameters in the flat parameter vector."""
    idx, offset = [], 0
    for name, p in model.named_parameters():
        if name in names_selected:
            idx.extend(range(offset, offset + p.numel()))
        offset += p.numel()
    return torch.tensor(idx)


@pytest.mark.parametrize(
    ("patterns", "selected"),
    [
        (["net.2"], {"net.2.weight", "net.2.bias"}),
        (["*.bias"], {"net.0.bias", "net.2.bias"}),
        (["net.0.weight", "net.2.b*"], {"net.0.weight", "net.2.bias"}),
    ],
)
def test_subset_reads_the_top_eigenvalue_of_its_hessian_block(patterns, selected):
    model = TinyClassifier(opt="sgd", lr=0.05).double()
    cb = SharpnessMonitor(
        every_n_steps=4, directional=False, tol=1e-8, max_iter=60, params=patterns
    )
    x, y = classification_data().tensors
    trainer(max_steps=4, callbacks=[cb]).fit(model, loader(TensorDataset(x.double(), y)))
    h, _ = exact_hessian(model, cb._batches)
    idx = _block(model, selected)
    block = h[idx][:, idx]
    want = float(torch.linalg.eigvalsh(block)[-1])
    assert cb.readings[KEY].value == pytest.approx(want, rel=1e-6)
    # Cauchy interlacing: a principal block's top eigenvalue bounds the full one below
    assert want <= float(torch.linalg.eigvalsh(h)[-1]) + 1e-12


def test_subset_run_trains_bit_identically():
    def run(callbacks):
        model = TinyClassifier(opt="adam", lr=0.01)
        torch.manual_seed(0)
        trainer(max_steps=6, callbacks=callbacks).fit(model, loader(classification_data()))
        return flat_weights(model)

    torch.manual_seed(0)
    monitored = run([SharpnessMonitor(every_n_steps=3, params=["net.2"])])
    torch.manual_seed(0)
    assert torch.equal(monitored, run([]))


def test_a_pattern_that_matches_nothing_is_an_error_at_setup():
    cb = SharpnessMonitor(every_n_steps=2, params=["net.2", "decoder.*"])
    with pytest.raises(ValueError, match=r"params: .*decoder\.\*"):
        trainer(max_steps=2, callbacks=[cb]).fit(TinyClassifier(), loader(classification_data()))


@pytest.mark.parametrize("bad", ["net.2", [], [""], [3]])
def test_params_must_be_a_list_of_patterns(bad):
    with pytest.raises(ValueError, match="params"):
        SharpnessMonitor(params=bad)
    with pytest.raises(ValueError, match="params"):
        check_patterns(bad)


def test_hvp_must_be_a_known_mode():
    with pytest.raises(ValueError, match="hvp"):
        SharpnessMonitor(hvp="forward")


def test_pattern_forms():
    assert matches("blocks.11.attn.weight", "blocks.11")
    assert matches("blocks.11.attn.weight", "blocks.1*.attn.*")
    assert matches("ln_f.weight", "*ln*")
    assert not matches("blocks.110.weight", "blocks.11")
    assert unmatched_patterns(["a.weight", "b.bias"], ["a", "c*"]) == ["c*"]
