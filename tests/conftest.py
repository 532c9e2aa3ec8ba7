from collections.abc import Iterator

import pytest
import torch

from swap.engine import SwapEngine
from swap.stats import Stats

# Tiny models run fastest on one thread, and a shared 2-core machine makes OpenMP's spinning
# threads slow everything down; results do not depend on it (references run the same way).
torch.set_num_threads(1)


@pytest.fixture
def engine() -> Iterator[SwapEngine]:
    """A swap engine on CPU (worker threads for copies), closed after the test."""
    e = SwapEngine(torch.device("cpu"), Stats())
    yield e
    e.close()
