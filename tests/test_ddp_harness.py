"""The DDP test bed itself: two spawned gloo processes that train in lockstep."""

import pytest
import torch
from helpers import (
    DumpOnFitEnd,
    TinyClassifier,
    classification_data,
    ddp_trainer,
    load_ranks,
    loader,
    rank_and_weights,
)


@pytest.mark.ddp
def test_two_ranks_train_in_lockstep(tmp_path):
    model = TinyClassifier()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    t = ddp_trainer(max_steps=3, callbacks=[DumpOnFitEnd(tmp_path, rank_and_weights)])
    t.fit(model, loader(classification_data(), shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert torch.equal(r0["weights"], r1["weights"])
    assert not torch.equal(r0["weights"], before)
