"""Small models shared by the tests, and the plain-PyTorch reference they are compared with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harmony.model.rng import layer_rng


def mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 96), nn.ReLU(), nn.Dropout(dropout), nn.Linear(96, 96),
                         nn.Tanh(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 5))


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, length: int, dropout: float) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool,
                                     device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class TinyTransformer(nn.Module):
    """A model that declares its chain (not an nn.Sequential)."""

    def __init__(self, vocab: int = 11, dim: int = 32, length: int = 8, layers: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = Embed(vocab, dim, length, dropout)
        self.blocks = nn.ModuleList(Block(dim, 4, dropout) for _ in range(layers))
        self.head = Head(dim, vocab)

    def harmony_chain(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.harmony_chain():
            x = layer(x)
        return x


def tied_transformer(dropout: float = 0.0) -> TinyTransformer:
    """TinyTransformer whose head's projection is the token embedding (tied weights)."""
    model = TinyTransformer(dropout=dropout)
    model.head.out.weight = model.embed.tok.weight
    return model


class Split(nn.Module):
    """x -> (a, b, mask): a tuple boundary holding a non-float tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(12, 24)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a(x), torch.tanh(self.b(x)), (x[:, :1] > 0).long()


class Mix(nn.Module):
    """(a, b, mask) -> (a', b', mask): both branches read both inputs."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(48, 24), nn.Linear(24, 24)
        self.drop = nn.Dropout(dropout)

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.drop(torch.relu(self.f(torch.cat([a, b], dim=1))))
        return h + mask * b, self.g(a) * b, mask


class Join(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(24, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(a + b)


class TupleChain(nn.Sequential):
    """Layers passing tuples spread over positional arguments: harmony's positional
    convention, so the chain is declared (an nn.Sequential would pass each tuple as one
    argument, as its forward does)."""

    def harmony_chain(self) -> list[nn.Module]:
        return list(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h: object = x
        for layer in self:
            h = layer(*h) if isinstance(h, tuple) else layer(h)
        assert isinstance(h, torch.Tensor)
        return h


def tuple_chain(dropout: float = 0.0) -> TupleChain:
    torch.manual_seed(0)
    return TupleChain(Split(), Mix(dropout), Mix(dropout), Join())


def cross_entropy_tokens(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# name -> (model factory(dropout), loss, data(batch, generator) -> (inputs, targets))
MODELS: dict[str, tuple[Callable[[float], nn.Module], Callable, Callable]] = {
    "mlp": (mlp, nn.functional.cross_entropy,
            lambda n, g: (torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g))),
    "transformer": (lambda d: TinyTransformer(dropout=d), cross_entropy_tokens,
                    lambda n, g: (torch.randint(0, 11, (n, 8), generator=g),
                                  torch.randint(0, 11, (n, 8), generator=g))),
    "tuple": (tuple_chain, nn.functional.cross_entropy,
              lambda n, g: (torch.randn(n, 12, generator=g),
                            torch.randint(0, 3, (n,), generator=g))),
}


def layers_of(model: nn.Module) -> list[nn.Module]:
    chain = getattr(model, "harmony_chain", None)
    return list(chain()) if callable(chain) else list(model.children())


def reference_train(model: nn.Module, loss_fn: Callable, make_opt: Callable,
                    batches: list[tuple[torch.Tensor, torch.Tensor]], micro_batch_size: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain PyTorch gradient accumulation over ``torch.split`` micro-batches.

    Each layer call runs under :func:`harmony.layer_rng` with the same (seed, step, micro-batch,
    layer) as harmony, so dropout draws the same masks; without dropout this is untouched
    plain PyTorch.
    """
    layers = layers_of(model)
    opt = make_opt(list(model.parameters()))
    for step, (x, y) in enumerate(batches):
        n = y.shape[0]
        for m, (xm, ym) in enumerate(zip(x.split(micro_batch_size), y.split(micro_batch_size))):
            h: object = xm
            for i, layer in enumerate(layers):
                with layer_rng(seed, step, m, i, torch.device("cpu")):
                    h = layer(*h) if isinstance(h, tuple) else layer(h)
            (loss_fn(h, ym) * (ym.shape[0] / n)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grouped_reference_train(model: nn.Module, loss_fn: Callable, make_opt: Callable,
                            batches: list[tuple[torch.Tensor, torch.Tensor]],
                            micro_batch_size: int, bounds: tuple[tuple[int, int], ...],
                            forwards: dict[int, list[range]],
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """What harmony computes with forward groups, in plain PyTorch: pack p's forward runs
    without grad once per group of micro-batches in ``forwards[p]`` (their inputs
    concatenated, the output split into each micro-batch's input of pack p + 1); then, pack
    by pack from the last, each micro-batch's pack is recomputed from that input with grad
    and its backward passes the input's gradient down (a recompute leaves the buffers, such
    as BatchNorm's running statistics, as the forward left them). With a forward per
    micro-batch this is :func:`reference_train` (the recompute gives the forward's values);
    with groups it differs from it only by the rounding of the larger forwards."""
    layers = layers_of(model)
    opt = make_opt(list(model.parameters()))
    P = len(bounds)

    def run(p: int, step: int, m: int, h: tuple[torch.Tensor, ...]) -> object:
        out: object = h
        for i in range(*bounds[p]):
            with layer_rng(seed, step, m, i, torch.device("cpu")):
                out = layers[i](*out) if isinstance(out, tuple) else layers[i](out)
        return out

    def as_tuple(out: object) -> tuple[torch.Tensor, ...]:
        return out if isinstance(out, tuple) else (out,)  # type: ignore[return-value]

    for step, (x, y) in enumerate(batches):
        n = y.shape[0]
        parts = [t.split(micro_batch_size) for t in as_tuple(x)]
        stash = [[tuple(p[m] for p in parts) for m in range(len(parts[0]))]]
        ys = y.split(micro_batch_size)
        with torch.no_grad():
            for p in range(P - 1):
                nxt: list[tuple[torch.Tensor, ...]] = [()] * len(ys)
                for group in forwards[p]:
                    ins = [stash[p][m] for m in group]
                    out = run(p, step, group[0], tuple(torch.cat(ts) for ts in zip(*ins)))
                    counts = [v[0].shape[0] for v in ins]
                    pieces = [t.split(counts) for t in as_tuple(out)]
                    for k, m in enumerate(group):
                        nxt[m] = tuple(t[k] for t in pieces)
                stash.append(nxt)
        grads: list[tuple[torch.Tensor | None, ...]] = []
        for p in reversed(range(P)):
            down = []
            for m in range(len(ys)):
                leaf = tuple(t if p == 0 else t.detach().requires_grad_(t.is_floating_point())
                             for t in stash[p][m])
                buffers = [b for i in range(*bounds[p]) for b in layers[i].buffers()]
                kept = [b.clone() for b in buffers]
                out = run(p, step, m, leaf)
                if p == P - 1:
                    (loss_fn(out, ys[m]) * (ys[m].shape[0] / n)).backward()
                else:
                    pairs = [(o, g) for o, g in zip(as_tuple(out), grads[m])
                             if g is not None and o.requires_grad]
                    if pairs:
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                down.append(tuple(t.grad for t in leaf))
                with torch.no_grad():  # (after the backward, which may have saved them)
                    for b, v in zip(buffers, kept):
                        b.copy_(v)
            grads = down
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def training_state_bytes(model: nn.Module, state_per_param: int) -> int:
    """W + G + K bytes of an fp32 model whose optimizer keeps ``state_per_param`` bytes/param."""
    n = sum(p.numel() for p in model.parameters())
    return n * (8 + state_per_param)


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         rtol: float, floor: float = 1e-3) -> None:
    """Per tensor, ``max|got - want| <= rtol * max(max|want|, floor)``.

    The floor covers tensors that stay within rounding noise of zero, such as attention key
    biases (their gradient is zero in exact arithmetic: softmax ignores a shift), for which a
    relative comparison would compare noise with noise: they are held to ``rtol * floor``.
    """
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k] - want[k]).abs().max())
        scale = max(float(want[k].abs().max()), floor)
        assert err <= rtol * scale, (k, err, scale)
