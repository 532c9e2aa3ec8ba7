"""harmony.parallel.dist on CUDA, checked on CPU with the process-group and device calls
recorded: each rank makes its own GPU current before NCCL starts (object collectives stage their
bytes on the current device) and binds the group to it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from harmony.parallel import dist as hdist


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, initialized: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.current = 0
        self.initialized = initialized
        self.env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "29500", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "init_process_group", self.init)
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
        monkeypatch.setattr(hdist.atexit, "register", lambda fn: None)

    def set_device(self, device: Any) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        self.calls.append(("set_device", index))
        self.current = index

    def init(self, backend: str, **kwargs: Any) -> None:
        self.calls.append(("init", backend, kwargs.get("device_id"), self.current))
        self.initialized = True


def test_a_rank_makes_its_gpu_current_before_nccl_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Recorder(monkeypatch)
    device = hdist.local_device(torch.device("cuda"))  # LOCAL_RANK=1 -> cuda:1
    group = hdist.join(device)
    assert r.calls[0] == ("set_device", 1)
    (_, backend, device_id, current), = [c for c in r.calls if c[0] == "init"]
    assert backend == "nccl" and current == 1
    assert device_id in (None, torch.device("cuda", 1))  # (None where torch lacks device_id)
    assert group.rank == 1 and group.local_rank == 1 and group.backend == "nccl"


def test_a_group_the_caller_made_still_gets_this_ranks_gpu_current(
        monkeypatch: pytest.MonkeyPatch) -> None:
    r = Recorder(monkeypatch, initialized=True)
    hdist.join(torch.device("cuda", 1))
    assert r.calls == [("set_device", 1)]


def test_a_gpu_that_is_not_there_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    Recorder(monkeypatch)
    with pytest.raises(ValueError, match=r"cuda:3 is not a GPU of this machine \(2 visible\)"):
        hdist.join(torch.device("cuda", 3))


def test_cpu_groups_touch_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Recorder(monkeypatch)
    hdist.join(torch.device("cpu"))
    assert r.calls == [("init", "gloo", None, 0)]
