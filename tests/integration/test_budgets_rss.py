"""The process's resident memory stays within ``1.10 x (host_memory + device_memory) + 256
MiB`` above its baseline while training, for every placement, with and without NVMe, with
chunked and overlapped updates, for a model built on CPU and one built on the meta device,
when a new budget moves the state to new packs, and when a new trainer resumes from a
checkpoint.

Each case runs ``examples/bench_memory.py`` in a fresh process (RSS is the whole process's)
on a 21M-parameter decoder (84 MB of weights, 336 MB of AdamW training state), three at a
time; its peak RSS is Linux's ``VmHWM``, reset at the baseline.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import bench_memory

MIB = 1 << 20

# (case, how the model is built): every placement once, the builds alternating
RUNS = [("device", "cpu"), ("host", "meta"), ("host, overlapped", "cpu"), ("nvme", "meta"),
        ("nvme, chunked", "cpu"), ("nvme, chunked, overlapped", "meta")]
# cases that then save a checkpoint and load it into a new trainer (its model on the meta
# device), which steps once: the load is measured from a baseline of its own
RESUMED = {"nvme", "nvme, chunked"}
# cases whose device budget is raised before the second step: the state moves to new packs
# (through files in the NVMe directory) within the measured run
REHOMED = {"nvme", "nvme, chunked, overlapped"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    if bench_memory.peak_rss_supported() is False:
        pytest.skip("the kernel does not report the peak resident set (/proc/self/status)")
    nvme = tmp_path_factory.mktemp("rss-nvme")

    def run(case: str, build: str) -> dict:
        args = argparse.Namespace(build=build, n_layer=6, dim=512, vocab=2048, seq_len=32,
                                  batch_size=4, micro_batch_size=1, steps=2, threads=1,
                                  nvme_dir=str(nvme), resume=case in RESUMED,
                                  rehome=case in REHOMED)
        return bench_memory.run_case(case, args)

    with ThreadPoolExecutor(3) as pool:
        futures = {r: pool.submit(run, *r) for r in RUNS}
        return {r: f.result() for r, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "build"), RUNS)
def test_resident_memory_within_the_bound(results: dict[tuple[str, str], dict], case: str,
                                          build: str) -> None:
    r = results[(case, build)]
    peak, bound = r["peak_rss"], r["bound"]
    where = r["placement"]
    assert peak is not None
    assert peak <= bound, (
        f"{case} ({build}): peak RSS {peak / MIB:.0f} MiB above the baseline, bound "
        f"{bound / MIB:.0f} MiB; accounted peaks "
        f"{ {k: round(v / MIB) for k, v in r['peaks'].items()} }, placement {where}")
    # the case is what it says: the budgets put the state where the case name says
    homes = set(where["w"])
    if case.startswith("nvme"):
        assert "nvme" in homes
    elif case.startswith("host"):
        assert homes <= {"host", "device"} and "host" in homes
    else:
        assert homes == {"device"}
    assert ("chunked" in case) == (r["update_chunk"] is not None)
    assert ("overlapped" in case) == r["overlap"]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "build"), [r for r in RUNS if r[0] in RESUMED])
def test_resuming_from_a_checkpoint_takes_no_more_memory_than_training(
        results: dict[tuple[str, str], dict], case: str, build: str) -> None:
    """Loading a checkpoint applies it a tensor at a time and keeps none of what it read:
    the resumed trainer's peak stays within the bound and near the first run's (the AdamW
    state alone, 168 MB here, is far above the margin)."""
    r = results[(case, build)]
    peak, resumed = r["peak_rss"], r["resume_peak_rss"]
    assert resumed is not None
    assert resumed <= r["bound"]
    assert resumed <= peak + 64 * MIB, (
        f"{case} ({build}): loading a checkpoint and one step took {resumed / MIB:.0f} MiB "
        f"above the baseline, training from the start {peak / MIB:.0f} MiB")
