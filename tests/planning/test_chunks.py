"""Splitting a pack into update chunks: the runtime's split of a layout and the planner's split
of a profile agree, chunks tile the flat buffers, and chunk budgets are checked."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from harmony.model.layout import Layout
from harmony.model.precision import Precision
from harmony.planning.chunks import (
    STATE_SLACK,
    layout_chunks,
    parse_update_chunk,
    profile_chunks,
    split_chunks,
)


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 150))
def test_split_chunks_is_greedy_within_the_budget(items: list[int], budget: int) -> None:
    runs = split_chunks(items, budget)
    assert [i for r in runs for i in r] == list(range(len(items)))  # consecutive, all, once
    for r, after in zip(runs, runs[1:] + [None]):
        total = sum(items[i] for i in r)
        assert total <= budget or len(r) == 1  # an item over the budget is alone
        if after is not None:  # the next item did not fit
            assert total + items[after.start] > budget


def test_split_chunks_without_a_budget_is_one_run() -> None:
    assert split_chunks([5, 7, 9], None) == [range(0, 3)]
    assert split_chunks([], 10) == [range(0, 0)]


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    return [nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 64)),
            nn.Sequential(nn.BatchNorm1d(64), frozen, nn.Linear(64, 32))]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("budget", [None, 1, 6000, 20000, 10**9])
def test_layout_chunks_tile_the_pack(precision: str, budget: int | None) -> None:
    layout = Layout(_layers(), Precision.parse(precision).dtype_of)
    k_ratio = Precision.parse(precision).k_ratio(2.0)
    chunks = layout_chunks(layout, budget, k_ratio)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [i for c in chunks for i in c.params] == list(range(len(layout.trainable)))
    # the weights (buffers in the last chunk an update streams, then a chunk of the frozen
    # parameters, which updates leave alone) and the masters tile
    assert chunks[0].w[0] == 0 and chunks[-1].w[1] == layout.w_bytes
    assert chunks[-1].frozen and chunks[-1].w[0] == layout.frozen_start < layout.w_bytes
    assert not any(c.frozen for c in chunks[:-1]) and not chunks[-1].params
    assert chunks[0].m[0] == 0 and chunks[-1].m[1] == layout.g_bytes
    for a, b in itertools.pairwise(chunks):
        assert a.w[1] == b.w[0] and a.m[1] == b.m[0]
    spans = layout.trainable_spans()
    for c in chunks:
        assert all(c.w[0] <= layout.trainable[i].offset < c.w[1] for i in c.params)
        streamed = sum(spans[i][0] + k_ratio * spans[i][1] + STATE_SLACK for i in c.params)
        assert budget is None or streamed <= budget or len(c.params) <= 1
    if budget is None or budget >= 10**9:
        assert len(chunks) == 2
    if budget == 1:  # every parameter alone, then the buffers, then the frozen weights
        assert len(chunks) == len(layout.trainable) + 2 and not chunks[-2].params


@pytest.mark.parametrize("budget", [None, 1, 6000, 20000])
def test_planner_predicts_the_chunks_the_pack_builds(budget: int | None) -> None:
    """The planner splits per-layer profiles (each layer's parameter sizes) as the runtime
    splits the pack's layout: the same weight bytes per chunk an update streams (not the
    frozen parameters'), and K = k_ratio x masters (with room for each parameter's scalar
    state)."""
    layers, k_ratio = _layers(), 2.0
    pack = Layout(layers)
    per_layer = [Layout([m]) for m in layers]
    predicted = profile_chunks([(lay.trainable_spans(), lay.w_bytes, lay.g_bytes,
                                 lay.w_bytes - lay.frozen_start) for lay in per_layer],
                               budget, k_ratio)
    built = layout_chunks(pack, budget, k_ratio)
    assert predicted == [(c.w_bytes, math.ceil(k_ratio * c.m_bytes) + STATE_SLACK * len(c.params))
                         for c in built if not c.frozen]


def test_frozen_only_pack_has_nothing_to_stream() -> None:
    torch.manual_seed(0)
    frozen = nn.Linear(8, 8).requires_grad_(False)
    layout = Layout([frozen])
    chunks = layout_chunks(layout, None, 2.0)
    assert len(chunks) == 1 and chunks[0].frozen and chunks[0].w == (0, layout.w_bytes)
    assert profile_chunks([([], layout.w_bytes, 0, layout.w_bytes)], None, 2.0) == []


def test_parse_update_chunk() -> None:
    assert parse_update_chunk("64MiB") == 64 << 20
    assert parse_update_chunk(4096) == 4096
    assert parse_update_chunk("auto") == "auto"
    assert parse_update_chunk(None) is None
    for bad in (0, -1, "-5MiB", "lots", True, 1.5e-3, [64]):
        with pytest.raises(ValueError, match=r"update_chunk=.*'64MiB'.*'auto'.*None"):
            parse_update_chunk(bad)
