import faulthandler
import os
from collections.abc import Iterator

import pytest
import torch

from swap.engine import SwapEngine
from swap.stats import Stats

# Tiny models run fastest on one thread, and a shared 2-core machine makes OpenMP's spinning
# threads slow everything down; results do not depend on it (references run the same way).
torch.set_num_threads(1)

HANG_SECONDS = 600  # the slowest test takes well under a minute here


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--copier", choices=("default", "deferred"), default=None,
                     help="run every swap engine with this copier (sets HARMONY_COPIER, which "
                          "subprocesses inherit); deferred: CUDA's semantics on CPU, with "
                          "buffer-lifetime checks and poisoned pools")


def pytest_configure(config: pytest.Config) -> None:
    copier = config.getoption("--copier")
    if copier is not None:  # (before any test starts a worker process, which inherits it)
        os.environ["HARMONY_COPIER"] = copier


def pytest_report_header(config: pytest.Config) -> str:
    return f"copier: {os.environ.get('HARMONY_COPIER') or 'default'}"


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
