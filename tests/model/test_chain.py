"""How harmony calls the layers of a chain: nn.Sequential exactly as PyTorch runs it, harmony's
positional convention for declared chains, and a module used at several positions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import harmony
from harmony.model.chain import Chain, as_tuple, call
from harmony.model.probe import ChainMismatch, check_chain
from tests.models import assert_weights_close


class Fork(nn.Module):
    """x -> (h, skip): a tuple for the next module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)), x


class Through(nn.Module):
    """(h, skip) -> (h', skip): takes the tuple as one argument, as in nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, skip = xs
        return torch.relu(self.lin(h)) + h, skip


class Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 4)

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, skip = xs
        return self.lin(torch.cat([h, skip], dim=-1))


class Wrap(nn.Module):
    """x -> (x,): a one-element tuple, which the next module receives as that tuple."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2,)


class Unwrap(nn.Module):
    def forward(self, xs: tuple[torch.Tensor]) -> torch.Tensor:
        assert isinstance(xs, tuple) and len(xs) == 1, type(xs)
        return xs[0] + 1


def _tuple_model() -> nn.Sequential:
    torch.manual_seed(0)
    fork, through, merge = Fork(), Through(), Merge()
    return nn.Sequential(fork, through, Split2(), Wrap(), Unwrap(), Join2(), through, merge)


class Split2(nn.Module):
    """(h, skip) -> h * skip-summary: a tensor (so Wrap/Unwrap see tensors)."""

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, skip = xs
        return torch.cat([h, skip], dim=-1)


class Join2(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :16], x[..., 16:]


def shared_sequential() -> nn.Sequential:
    """One Linear and one ReLU instance each used at two positions."""
    torch.manual_seed(0)
    lin, act = nn.Linear(16, 16), nn.ReLU()
    return nn.Sequential(nn.Linear(8, 16), act, lin, act, nn.Linear(16, 16), nn.Tanh(), lin,
                         nn.Linear(16, 4))


def _data(n: int = 3, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g))
            for _ in range(n)]


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _plain(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
           mbs: int = 2) -> dict[str, torch.Tensor]:
    """Plain PyTorch: model(x) over torch.split micro-batches, one step per batch."""
    opt = _opt(list(model.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(mbs), y.split(mbs)):
            (nn.functional.mse_loss(model(xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _harmony(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device_memory: int | None = None, **kw: object) -> tuple[dict[str, torch.Tensor],
                                                                         harmony.Trainer]:
    t = harmony.Trainer(model, nn.functional.mse_loss, optimizer=_opt, micro_batch_size=2,
                        device_memory=device_memory, **kw)  # type: ignore[arg-type]
    with t:
        for x, y in batches:
            t.step(x, y)
        return t.state_dict(), t


@pytest.mark.parametrize("budget", [None, 6000])
def test_sequential_passes_tuples_as_one_argument(budget: int | None) -> None:
    """Modules that take a tuple as one argument (h, skip = xs), a one-element tuple between
    two modules, and a module used twice: trained bitwise as plain PyTorch (the Linear used
    twice sits in one pack or, under the budget, in two: then within 1e-5 relative)."""
    batches = _data()
    want = _plain(_tuple_model(), batches)
    got, t = _harmony(_tuple_model(), batches, device_memory=budget)
    assert got.keys() == want.keys()
    plan = t.plan
    assert plan is not None
    if budget is None:
        for k in want:
            assert torch.equal(got[k], want[k]), k
    else:  # the Through used at positions 1 and 6 is in two packs: tied weights
        pack_of = [p for p, (a, b) in enumerate(plan.bounds) for _ in range(a, b)]
        assert pack_of[1] != pack_of[6], plan.describe(t.chain.names)
        assert_weights_close(got, want, 1e-5)


@pytest.mark.parametrize("budget", [None, 4000])
def test_module_used_at_two_positions_is_trained_at_both(budget: int | None) -> None:
    """nn.Sequential(..., lin, ..., lin, ...): both positions run and train the one Linear
    (bitwise in one pack; as tied weights, within 1e-5, when the budget puts them apart)."""
    batches = _data()
    want = _plain(shared_sequential(), batches)
    got, t = _harmony(shared_sequential(), batches, device_memory=budget)
    assert len(t.chain) == 8  # every position, the repeated ones too
    assert torch.equal(got["2.weight"], got["6.weight"])
    plan = t.plan
    assert plan is not None
    pack_of = [p for p, (a, b) in enumerate(plan.bounds) for _ in range(a, b)]
    if budget is None:
        for k in want:
            assert torch.equal(got[k], want[k]), k
    else:
        assert pack_of[2] != pack_of[6], plan.describe(t.chain.names)
        assert_weights_close(got, want, 1e-5)
    assert not torch.equal(want["2.weight"], shared_sequential().state_dict()["2.weight"])


def test_module_with_buffers_at_two_positions_is_refused_naming_them() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    model = nn.Sequential(norm, nn.Linear(8, 8), norm, nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"layer 2 \(2\).*layer 0 \(0\)"):
        harmony.Trainer(model, nn.functional.mse_loss)


def test_tuple_input_reaches_the_first_module_as_one_tuple() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Merge())
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g))
    y = torch.randn(4, 4, generator=g)
    want = model(x).detach()
    with harmony.Trainer(model, nn.functional.mse_loss, micro_batch_size=2,
                         optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0)) as t:
        loss = t.step(x, y)
    assert loss == pytest.approx(float(nn.functional.mse_loss(want, y)), rel=1e-6)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compose(chain: Chain, x: torch.Tensor) -> object:
    value: tuple[torch.Tensor, ...] = (x,)
    out: object = x
    for layer in chain.layers:
        out = call(layer, value)
        value = as_tuple(out, "layer")
    return out


class Declared(nn.Module):
    """The positional convention: Fork's tuple is spread over Through2's arguments."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fork, self.mid, self.out = Fork(), Through2(), Merge2()

    def harmony_chain(self) -> list[nn.Module]:
        return [self.fork, self.mid, self.mid, self.out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(*self.mid(*self.mid(*self.fork(x))))


class Through2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.lin(h)) + h, skip


class Merge2(Merge):
    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward((h, skip))


@pytest.mark.parametrize("make", [_tuple_model, shared_sequential, Declared],
                         ids=["sequential-tuples", "sequential-shared", "declared-positional"])
def test_chain_is_transparent(make: Callable[[], nn.Module]) -> None:
    """The chain's composition gives the plain model's output and gradients, bit for bit, in
    both conventions (one argument for nn.Sequential, positional for harmony_chain())."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    model = make()
    want = model(x)
    want.square().sum().backward()
    want_g = _grads(model)
    model.zero_grad()
    chain = Chain(model)
    assert chain.one_argument == isinstance(model, nn.Sequential)
    got = _compose(chain, x)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    got.square().sum().backward()
    got_g = _grads(model)
    assert got_g.keys() == want_g.keys()
    for k in want_g:
        assert torch.equal(got_g[k], want_g[k]), k


class Doubled(nn.Sequential):
    """An nn.Sequential whose forward is not the composition of its modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * 2


def test_probe_refuses_a_sequential_whose_forward_differs() -> None:
    torch.manual_seed(0)
    model = Doubled(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = _data(1)[0]
    t = harmony.Trainer(model, nn.functional.mse_loss, micro_batch_size=2)
    with t, pytest.raises(ChainMismatch, match="the output differs by .*check_chain=False"):
        t.step(x, y)
    with harmony.Trainer(model, nn.functional.mse_loss, micro_batch_size=2,
                         check_chain=False) as t:
        t.step(x, y)  # told not to check: trains the chain


def test_a_batch_of_the_wrong_shape_is_torchs_error_not_a_chain_mismatch() -> None:
    """A first layer that fails on the user's batch with every weight present too is the
    batch's fault: the probe lets torch's own error through (as check_chain=False does)
    instead of telling the user to declare the chain by hand; the trainer steps on after."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = _data(1)[0]
    with harmony.Trainer(model, nn.functional.mse_loss, micro_batch_size=2) as t:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as err:
            t.step(torch.zeros(x.shape[0], 5), y)
        assert not isinstance(err.value, ChainMismatch)
        t.step(x, y)


def test_probe_passes_plain_sequential_and_leaves_model_untouched() -> None:
    model = shared_sequential().train()
    model.add_module("norm", nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 8)
    got = check_chain(Chain(model), (x,), single=True)
    assert got is not None and got.relative == 0.0 and len(got.parameters) >= 4
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training
