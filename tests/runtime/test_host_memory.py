"""What keeps the process's resident memory within the budgets, piece by piece
(harmony/runtime/host_memory.py, the NVMe store's requests, the CPU device tier's pool); the
bound as a whole is tests/integration/test_budgets_rss.py."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harmony
from harmony.runtime.host_memory import (
    available_bytes,
    bound_malloc,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from schedules.task import Loc
from swap.nvme import NvmeStore
from tests.models import mlp

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process: free one large block (glibc then raises its dynamic mmap threshold to
# that size), then allocate 64 blocks of 2 MiB and free all but the last; print how much of
# them the resident set still holds.
_FRAGMENT = """
import ctypes, sys
from harmony.runtime.host_memory import bound_malloc, rss_bytes
print(bound_malloc(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
before = rss_bytes()
blocks = [libc.malloc(2 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 2 << 20)
for b in blocks[:-1]:
    libc.free(b)
print((rss_bytes() - before) >> 20)
"""


def _held_after_free(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_blocks_go_back_to_the_kernel() -> None:
    if "fixed" not in bound_malloc():
        pytest.skip(f"malloc not set here: {bound_malloc()}")
    assert _held_after_free({}) < 16  # MiB: each 2 MiB block was a mapping of its own
    # (without it, glibc keeps the freed blocks under the one still in use)
    assert _held_after_free({"HARMONY_MALLOC": "off"}) > 64


def test_a_finished_nvme_request_lets_go_of_its_tensor(tmp_path: Path) -> None:
    """A store request used to keep (a view of) the caller's tensor in a reference cycle,
    alive until the garbage collector ran: a pack's weights per read and write."""
    n = 64 << 20
    gc.collect()
    gc.disable()
    try:
        with NvmeStore(tmp_path) as store:
            for op in ("write", "read"):
                buf = torch.ones(n, dtype=torch.uint8)  # (touched: resident)
                handle = store.write("k", buf) if op == "write" else store.read("k", buf)
                handle.wait()
                before = rss_bytes()
                del buf
                # (the worker thread that completed the request lets go a moment after)
                deadline = time.monotonic() + 5
                while rss_bytes() >= before - n // 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert rss_bytes() < before - n // 2, f"the {op}'s tensor is still alive"
    finally:
        gc.enable()


def test_cpu_device_tier_keeps_its_free_buffers_within_its_budget() -> None:
    x, y = torch.randn(12, 16), torch.randn(12, 5)
    with harmony.Trainer(mlp(), torch.nn.functional.mse_loss, micro_batch_size=3,
                         device_memory=100_000, host_memory=1 << 20) as t:
        for _ in range(3):
            t.step(x, y)
        device = t.tiers[Loc.DEVICE]
        assert device.capacity is not None and device.cached > 0
        assert device.used + device.cached <= device.capacity


def test_resident_set_measurements() -> None:
    assert rss_bytes() > 0 and available_bytes() > 0
    if peak_rss_bytes() is None:
        pytest.skip("no VmHWM here")
    if not reset_peak_rss():
        pytest.skip("clear_refs not writable here")
    before = peak_rss_bytes()
    assert before is not None
    big = torch.ones(32 << 20, dtype=torch.uint8)  # touched: resident
    after = peak_rss_bytes()
    assert after is not None and after >= before + (24 << 20)
    del big
