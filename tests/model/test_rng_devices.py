"""layer_rng on CUDA devices, checked on CPU with stand-in generators for two GPUs: the
generator that is seeded is the one that is saved and restored, and it is the one of the GPU
whose kernels run (``cuda:N``, or the current device for ``cuda`` alone)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import harmony


class TwoGpus:
    """torch.cuda's generator functions over two CPU generators (GPU 0 and GPU 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gens = (torch.Generator().manual_seed(100), torch.Generator().manual_seed(101))
        self.current = 0
        for name, value in [("get_rng_state", self.get_rng_state),
                            ("set_rng_state", self.set_rng_state),
                            ("default_generators", self.gens),
                            ("current_device", lambda: self.current)]:
            monkeypatch.setattr(torch.cuda, name, value)

    def _index(self, device: Any) -> int:
        if isinstance(device, int):
            return device
        d = torch.device(device)
        return self.current if d.index is None else d.index

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return self.gens[self._index(device)].get_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        self.gens[self._index(device)].set_state(state)

    def draw(self, index: int) -> torch.Tensor:
        """What a dropout kernel on GPU ``index`` would draw."""
        return torch.rand(4, generator=self.gens[index])


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> TwoGpus:
    return TwoGpus(monkeypatch)


@pytest.mark.parametrize("device,current,runs_on", [
    ("cuda", 1, 1),      # "cuda" alone on a process whose current device is 1
    ("cuda:1", 0, 1),    # an explicit device other than the current one
    ("cuda:0", 1, 0),
])
def test_each_layer_draws_its_own_masks_on_the_gpu_that_runs_it(
        gpus: TwoGpus, device: str, current: int, runs_on: int) -> None:
    gpus.current = current
    before = [g.get_state() for g in gpus.gens]
    draws = []
    for layer in range(3):
        with harmony.layer_rng(0, 5, 2, layer, torch.device(device)):
            draws.append(gpus.draw(runs_on))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    with harmony.layer_rng(0, 5, 2, 1, torch.device(device)):  # recompute: the same masks
        assert torch.equal(gpus.draw(runs_on), draws[1])
    for g, state in zip(gpus.gens, before):  # both GPUs' generators as they were
        assert torch.equal(g.get_state(), state)


def test_generator_index(gpus: TwoGpus) -> None:
    from harmony.model.rng import generator_index

    gpus.current = 1
    assert generator_index(torch.device("cuda")) == 1
    assert generator_index(torch.device("cuda", 0)) == 0
    assert generator_index(torch.device("cpu")) is None


def test_a_device_given_as_a_string_seeds_the_same_generators(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``device`` may be written as Trainer(device=...) takes it: "cpu", "cuda:1"."""
    with harmony.layer_rng(0, 1, 2, 3, "cpu"):
        by_name = torch.rand(4)
    with harmony.layer_rng(0, 1, 2, 3, torch.device("cpu")):
        assert torch.equal(torch.rand(4), by_name)
    gpus = TwoGpus(monkeypatch)
    with harmony.layer_rng(0, 1, 2, 3, "cuda:1"):
        on_one = gpus.draw(1)
    with harmony.layer_rng(0, 1, 2, 3, torch.device("cuda", 1)):
        assert torch.equal(gpus.draw(1), on_one)
