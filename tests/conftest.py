import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Two cores on CI: one intra-op thread per process keeps DDP tests from oversubscribing.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
