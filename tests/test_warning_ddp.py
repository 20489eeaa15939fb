"""EarlyWarning under DDP: a spike planted in one rank's data raises the same events on
both ranks (WATCH from the deviation, WARNING when that rank's loss leaves its band),
although only that rank's (deliberately unsynchronised) reading spikes."""

import pytest
import torch
from helpers import DumpOnFitEnd, TinyClassifier, classification_data, ddp_trainer, load_ranks
from torch.utils.data import DataLoader, Dataset

from lightning_stability.probes.base import StabilityProbe
from lightning_stability.warning import EarlyWarning, Level

BATCH = 8
SPIKE = 25  # first spiked batch (per-rank index); optimizer step SPIKE + 1


class LocalLossProbe(StabilityProbe):
    """Publishes each rank's own training loss, not reduced across ranks, so that the
    ranks' readings differ and only the warning layer's reduction can make them agree."""

    def __init__(self):
        super().__init__()
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = float(outputs["loss"])
        self.history.append((trainer.global_step, value))
        self.publish(trainer, pl_module, {"loss/value": value}, log=False)


class RankOneSpike(Dataset):
    """The same samples on every rank (no distributed sampler), except that on rank 1
    batches SPIKE .. SPIKE + 2 have blown-up inputs and shifted labels."""

    def __init__(self):
        self.x, self.y = classification_data(n=512).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        if torch.distributed.get_rank() == 1 and SPIKE * BATCH <= i < (SPIKE + 3) * BATCH:
            return x * 30.0, (y + 1) % 3
        return x, y


def extract(trainer, pl_module):
    ew = next(c for c in trainer.callbacks if isinstance(c, EarlyWarning))
    probe = next(c for c in trainer.callbacks if isinstance(c, LocalLossProbe))
    return {
        "events": [(int(e.level), e.step, e.signals, e.message, e.deviation) for e in ew.events],
        "losses": dict(probe.history),
        "level": int(ew.level),
    }


@pytest.mark.ddp
def test_spike_on_one_rank_raises_the_same_event_on_both(tmp_path):
    callbacks = [
        LocalLossProbe(),
        EarlyWarning(use_step_loss=False),
        DumpOnFitEnd(tmp_path, extract),
    ]
    t = ddp_trainer(max_steps=SPIKE + 6, callbacks=callbacks, use_distributed_sampler=False)
    t.fit(
        TinyClassifier(opt="adam"),
        DataLoader(RankOneSpike(), batch_size=BATCH, shuffle=False),
    )
    r0, r1 = load_ranks(tmp_path)
    step = SPIKE + 1
    # only rank 1's own reading spiked
    assert r1["losses"][step] > 5 * r0["losses"][step]
    assert r0["losses"][step] < 1.0
    assert r0["events"] == r1["events"]
    assert r0["level"] == r1["level"]
    # the deviation is soft evidence: WATCH only, after patience=2
    level, at, signals, message, deviation = r0["events"][0]
    assert (level, at) == (Level.WATCH, step + 1)
    assert signals[0] == "stability/loss/value"
    assert deviation >= 8.0
    assert "stability/loss/value" in message
    # rank 1's loss band: spiked steps 26-28, the trailing median of 5 above the band
    # from step 28 and leaving after confirm=2 steps; rank 0's band saw nothing, so its
    # WARNING comes only from the reduction over ranks
    warnings_ = [e for e in r0["events"] if e[0] >= Level.WARNING]
    assert [(e[0], e[1]) for e in warnings_] == [(Level.WARNING, step + 3)]
    assert warnings_[0][2][0] == "stability/loss/value"
    assert "loss leaving its band" in warnings_[0][3]
