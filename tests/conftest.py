import faulthandler
from collections.abc import Iterator

import pytest
import torch

from swap.engine import SwapEngine
from swap.stats import Stats

# Tiny models run fastest on one thread, and a shared 2-core machine makes OpenMP's spinning
# threads slow everything down; results do not depend on it (references run the same way).
torch.set_num_threads(1)

HANG_SECONDS = 600  # the slowest test takes well under a minute here


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """A test that hangs (say, threads waiting on each other) ends the run after HANG_SECONDS
    with every thread's traceback, instead of stalling until the CI's own time limit."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def engine() -> Iterator[SwapEngine]:
    """A swap engine on CPU (worker threads for copies), closed after the test."""
    e = SwapEngine(torch.device("cpu"), Stats())
    yield e
    e.close()
