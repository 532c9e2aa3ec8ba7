"""Meta-device profiles against real ones, and the built-in models' shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harmony.model.chain import Chain
from harmony.model.layout import Layout
from harmony.planning.meta import FlopCount, meta_profile, profile_on_meta
from harmony.planning.profile import profile_layers
from harmony.tools.builtin_models import BUILTINS, build, parameter_count
from harmony.tools.paper_profiles import load as load_paper

SIZES = ("w_bytes", "g_bytes", "in_bytes", "in_grad_bytes", "out_bytes", "saved_bytes")


def _real_profile(name: str, u: int) -> list:
    torch.manual_seed(0)
    spec = build(name)
    chain = Chain(spec.model)
    x, y = spec.example_inputs(u)
    return profile_layers(chain, [Layout([m]) for m in chain.layers], (x,), y, spec.loss_fn,
                          torch.device("cpu"))


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("u", [1, 3])
def test_meta_sizes_equal_measured_sizes(name: str, u: int) -> None:
    with torch.device("meta"):
        spec = build(name)
    meta = profile_on_meta(spec, u)
    real = _real_profile(name, u)
    assert [lp.name for lp in meta.layers] == [lp.name for lp in real]
    for m, r in zip(meta.layers, real):
        # Saved bytes too: the meta run routes attention to the fused kernel the CPU picks, so
        # both save q, k, v, the output and the log-sum-exp (not a [T, T] matrix).
        assert {f: getattr(m, f) for f in SIZES} == {f: getattr(r, f) for f in SIZES}, m.name
    assert all(lp.fwd_s > 0 and lp.bwd_s > 2 * lp.fwd_s for lp in meta.layers[1:])


def test_meta_profile_allocates_nothing_and_refuses_real_weights() -> None:
    with torch.device("meta"):
        spec = build("gpt-tiny")
    assert all(p.is_meta for p in spec.model.parameters())
    real = build("gpt-tiny")
    x, y = real.example_inputs(2)
    with pytest.raises(ValueError, match="not the meta device"):
        meta_profile(Chain(real.model), x, y, real.loss_fn)


def test_identical_layers_are_profiled_once_with_the_same_result() -> None:
    cfg = dataclasses.replace(BUILTINS["llama-tiny"], n_layer=4)
    with torch.device("meta"):
        from harmony.tools.builtin_models import Transformer, token_cross_entropy
        model = Transformer(cfg)
        x = torch.randint(0, cfg.vocab_size, (2, 16))
    chain = Chain(model)
    again = meta_profile(chain, x, x, token_cross_entropy, reuse=True)
    fresh = meta_profile(chain, x, x, token_cross_entropy, reuse=False)
    assert again == fresh


def test_times_are_flops_over_device_speed() -> None:
    with torch.device("meta"):
        spec = build("gpt-tiny")
        a = torch.empty(4, 8)
        b = torch.empty(8, 16)
    with FlopCount() as fc:
        a @ b
    assert fc.flops == 2 * 4 * 8 * 16
    fast = profile_on_meta(spec, 2, device_flops=1e12)
    slow = profile_on_meta(spec, 2, device_flops=1e9)
    block_fast, block_slow = fast.layers[1], slow.layers[1]
    assert block_slow.fwd_s == pytest.approx(1000 * block_fast.fwd_s)
    # forward: q, k, v, o (4 C^2) and the MLP (8 C^2) per token, attention 2 T C (x2)
    C, T = 32, 16
    flops = 2 * T * (12 * C * C) + 2 * 2 * T * T * C
    assert block_fast.fwd_s == pytest.approx(flops / 1e12)


@pytest.mark.parametrize("name, params", [
    ("gpt2-medium", 406_286_336), ("gpt2-xl", 1_638_022_400),  # = the paper's profiles
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-70b", 68_976_648_192)])
def test_builtin_parameter_counts(name: str, params: int) -> None:
    assert parameter_count(name) == params


def test_gpt2_layers_match_the_papers_weights() -> None:
    with torch.device("meta"):
        spec = build("gpt2-medium")
    ours = profile_on_meta(spec, 1)
    paper = load_paper("gpt2_medium", 1)
    # The paper cuts the head into LayerNorm, projection and loss; ours is one layer.
    assert [lp.g_bytes for lp in ours.layers[:-1]] == [lp.g_bytes for lp in paper.layers[:-3]]
    assert ours.layers[-1].g_bytes == sum(lp.g_bytes for lp in paper.layers[-3:])
    assert [lp.in_bytes for lp in ours.layers] == [lp.in_bytes for lp in paper.layers[:-2]]


def test_builtin_refuses_bad_names_and_lengths() -> None:
    with pytest.raises(ValueError, match="gpt2-xl"):
        build("gpt3")
    with pytest.raises(ValueError, match="seq-len <= 1024"):
        build("gpt2", seq_len=2048)
    with torch.device("meta"):
        assert build("llama-7b", seq_len=8192).seq_len == 8192  # rotary positions extend


def test_saved_bytes_leave_out_the_targets_of_the_whole_batch() -> None:
    """A loss saves its targets, here a micro-batch's view of the whole batch's tensor: that
    storage is the caller's batch, not activation memory, so it is not counted."""
    from harmony.planning.profile import backward_saved_bytes

    head = torch.nn.Linear(16, 10)
    x = torch.randn(4, 16)
    batch = torch.randint(0, 10, (4096,))

    def saved(targets: torch.Tensor) -> int:
        return backward_saved_bytes(head, (x,), Layout([head]), torch.nn.functional.cross_entropy,
                                    targets, last=True, name="head")

    view, alone = batch[:4], batch[:4].clone()
    assert view.untyped_storage().nbytes() == 4096 * 8  # (what was counted before)
    assert saved(view) == saved(alone) < 4096 * 8
