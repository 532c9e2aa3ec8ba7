"""Forward groups: which layers the profiles let group, the forward-time model, and the
checks of ``forward_micro_batch_size`` (harmony/planning/groups.py, harmony/planning/profile.py)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from harmony.model.chain import Chain
from harmony.model.layout import Layout
from harmony.planning.groups import (
    forward_group_of,
    forward_seconds,
    group_sizes,
    grouped_packs,
    refuse_ungroupable,
    ungrouped,
)
from harmony.planning.meta import meta_profile
from harmony.planning.profile import UNCHECKED, LayerProfile, group_tolerance, profile_layers
from harmony.tools.paper_profiles import load as load_paper


class Shared(nn.Module):
    """Passes on a tensor that is the same for every sample (no batch dimension)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.ones(3, device=x.device)


class UseShared(nn.Module):
    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, s = xs  # (an nn.Sequential passes Shared's tuple as one argument)
        return x * s.sum()


class Centre(nn.Module):
    """Subtracts the micro-batch's mean: mixes samples, changes no buffer, draws nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Centre(), nn.Dropout(0.3),
                         nn.Dropout(0.0), nn.BatchNorm1d(32),
                         nn.BatchNorm1d(32, track_running_stats=False), Shared(), UseShared(),
                         nn.Linear(32, 5))


WHY = {
    "0": "", "1": "", "2": "treats the samples of a micro-batch together",
    "3": "draws random numbers in its forward (dropout)", "4": "",
    "5": "changes its buffers in its forward (running statistics)",
    "6": "treats the samples of a micro-batch together (as BatchNorm in training mode does)",
    "7": "passes a tensor without the samples along dim 0 (output 1 of shape (3,)",
    "8": "passes a tensor without the samples along dim 0 (input 1 of shape (3,)", "9": ""}


def _profile(model: nn.Module, group: bool = True) -> list[LayerProfile]:
    chain = Chain(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    return profile_layers(chain, [Layout([m]) for m in chain.layers], (x[:4],), y[:4],
                          nn.functional.cross_entropy, torch.device("cpu"),
                          group_inputs=(x[4:],) if group else None)


def test_the_profile_names_every_layer_that_cannot_group_and_why() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    profiles = _profile(model)
    for lp in profiles:
        assert WHY[lp.name] in lp.no_group and bool(lp.no_group) == bool(WHY[lp.name]), lp
        # a layer that may group was timed over both micro-batches (4 + 2 samples)
        assert (lp.fwd_group_s is not None) == (not lp.no_group), lp
        assert lp.group_samples == (6 if not lp.no_group else 0) and lp.samples == 4
    # the checks change neither the model (BatchNorm's statistics) nor the caller's generator
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_without_a_second_micro_batch_nothing_is_checked() -> None:
    profiles = _profile(_model(), group=False)
    assert all(lp.no_group == UNCHECKED and lp.fwd_group_s is None for lp in profiles)
    assert grouped_packs(profiles, ((0, 2), (2, 10))) == frozenset()


def test_rounding_of_larger_products_is_not_mixing() -> None:
    """Matrix products over more rows round differently (not bit for bit the same), which
    the tolerance allows; mixing samples is orders of magnitude above it."""
    torch.manual_seed(0)
    layer, x = nn.Linear(96, 96), torch.randn(8, 96)
    with torch.no_grad():
        together, apart = layer(x), torch.cat([layer(x[:2]), layer(x[2:])])
    diff = float((together - apart).abs().max() / apart.abs().max())
    assert 0 < diff <= group_tolerance(torch.float32)  # this CPU build: about 3e-7
    assert group_tolerance(torch.float32) == 1e-5
    assert group_tolerance(torch.bfloat16) == pytest.approx(8 * 2 ** -7)


def test_meta_profiles_see_random_operators_batch_norm_and_shapes() -> None:
    with torch.device("meta"):
        model = _model()
        x, y = torch.zeros(4, 16), torch.zeros(4, dtype=torch.long)
    profiles = meta_profile(Chain(model), x, y, nn.functional.cross_entropy)
    got = {lp.name: lp.no_group for lp in profiles}
    assert got["3"] == "draws random numbers in its forward (aten.bernoulli_)"
    assert got["4"] == ""  # dropout with p=0 draws nothing
    assert "batch norm in training mode" in got["5"] and "batch norm" in got["6"]
    assert got["2"] == ""  # (what a layer computes from its values needs a real run)
    assert WHY["7"] in got["7"] and WHY["8"] in got["8"]
    assert all(lp.fwd_group_s is None for lp in profiles)


def test_paper_profiles_time_a_forward_over_twice_the_samples() -> None:
    prof = load_paper("gpt2_medium", 4)
    lp = prof.layers[3]
    assert (lp.samples, lp.group_samples, lp.no_group) == (4, 8, "")
    # the paper's table: 27.23 ms at 4 samples, 53.21 ms at 8 (less per sample)
    assert lp.fwd_s * 4 == pytest.approx(0.027232, rel=1e-4)
    assert lp.fwd_group_s is not None and lp.fwd_group_s * 8 == pytest.approx(0.053209, rel=1e-4)
    big = load_paper("gpt2_medium", 9).layers[3]  # 2 x 9 is the table's largest forward
    assert big.group_samples == 18


def _lp(fwd_s: float, samples: int, group_s: float | None, group_samples: int,
        why: str = "") -> LayerProfile:
    return LayerProfile("l", 0, 0, 0.0, 0.0, 0.0, 0.0, fwd_s, 0.0, samples, group_s,
                        group_samples, why)


def test_forward_seconds() -> None:
    lp = _lp(2e-3, 2, 1.5e-3, 4)  # 4 ms at 2 samples, 6 ms at 4: 2 ms per call + 1 per sample
    assert [forward_seconds(lp, n) for n in (1, 2, 3, 4, 8)] == pytest.approx(
        [2e-3, 4e-3, 5e-3, 6e-3, 10e-3])
    # without a second timing, or up to the profiled size: linear, as before
    assert forward_seconds(_lp(2e-3, 2, None, 0), 8) == pytest.approx(16e-3)
    # a pair timed faster than one micro-batch (noise): at least a quarter of its rate
    noisy = _lp(2e-3, 2, 0.5e-3, 4)
    assert forward_seconds(noisy, 8) == pytest.approx(4e-3 + 6 * 0.125e-3)
    # larger forwards slower per sample: the line through both points says so
    assert forward_seconds(_lp(1e-3, 2, 1.5e-3, 4), 8) == pytest.approx(2e-3 + 6 * 2e-3)


def test_grouped_packs_and_reasons() -> None:
    layers = [_lp(1, 1, None, 0), _lp(1, 1, None, 0, "draws random numbers"),
              _lp(1, 1, None, 0), _lp(1, 1, None, 0, "mixes")]
    bounds = ((0, 1), (1, 3), (3, 4))
    # the last pack's forward runs inside its backward: its layers do not matter
    assert ungrouped(layers, bounds) == ((1, 1, "draws random numbers"),)
    assert grouped_packs(layers, bounds) == frozenset({0})
    assert grouped_packs(layers, ((0, 4),)) == frozenset()


def test_group_sizes() -> None:
    assert group_sizes(1) == [] and group_sizes(2) == [2]
    assert group_sizes(6) == [2, 4, 6] and group_sizes(16) == [2, 4, 8, 16]


@pytest.mark.parametrize(("value", "mbs", "schedule", "parallel", "match"), [
    (0, 2, "harmony", None, "forward_micro_batch_size=0 must be a positive int"),
    (True, 2, "harmony", None, "forward_micro_batch_size=True must be a positive int"),
    ("big", 2, "harmony", None, "forward_micro_batch_size='big' must be a positive int"),
    (6, 4, "harmony", None, "forward_micro_batch_size=6 is not a multiple of "
                            "micro_batch_size=4; use 4 or 8"),
    (3, 4, "harmony", None, "forward_micro_batch_size=3 is not a multiple of "
                            "micro_batch_size=4; use 4 or 8"),
    (8, "auto", "harmony", None, "give micro_batch_size as an int, or "
                                 "forward_micro_batch_size='auto'"),
    (8, 2, "per-microbatch", None, "only schedule='harmony' runs a forward over several"),
    ("auto", 2, "resident", None, "only schedule='harmony' runs a forward over several"),
    (8, 2, "harmony", "pipeline", "with parallel='pipeline' is not supported"),
])
def test_bad_forward_micro_batch_sizes(value: object, mbs: object, schedule: str,
                                       parallel: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        forward_group_of(value, mbs, schedule, parallel)


def test_forward_group_of() -> None:
    assert forward_group_of(None, 2, "resident", "pipeline") == 1
    assert forward_group_of(8, 2, "harmony", None) == 4
    assert forward_group_of(2, 2, "per-microbatch", "pipeline") == 1  # (one micro-batch each)
    assert forward_group_of("auto", "auto", "harmony", "data") is None


def test_refuse_ungroupable_names_the_layers() -> None:
    names = ["embed", "drop", "head"]
    why = ((0, 1, "draws random numbers in its forward (dropout)"),)
    with pytest.raises(ValueError, match=re.escape(
            "forward_micro_batch_size=8 asks for forwards over several micro-batches, but no "
            "pack can run one: layer 1 ('drop') draws random numbers in its forward")):
        refuse_ungroupable(8, 2, why, names)
    refuse_ungroupable(8, 3, why, names)  # another pack groups
    refuse_ungroupable(8, 1, (), names)  # one pack: no forward of its own
