"""Built-in decoder-only transformers by name, for planning without downloads.

Each name maps to a :class:`TransformerConfig`; :func:`build` turns it into a
:class:`~harmony.planning.meta.ModelSpec`: a plain-torch model whose layers form a chain, the token
cross-entropy loss, and a function that makes one micro-batch of token ids. Build under
``torch.device("meta")`` (what ``harmony report`` does) and nothing is allocated, so a
70B-parameter model is planned in seconds::

    Embedding   token ids [B, T] (int64)  ->  [B, T, C]
    Block x N   [B, T, C]                 ->  [B, T, C]    attention + MLP, pre-norm, residual
    Head        [B, T, C]                 ->  logits [B, T, V]   final norm + projection

| name | layers x width | heads (kv) | MLP | parameters (untied head) |
|---|---|---|---|---|
| gpt-tiny | 2 x 32 | 4 | GELU 4x | 30.1K (tests) |
| llama-tiny | 2 x 32 | 4 (2) | SwiGLU 96 | 28.8K (tests) |
| gpt2 | 12 x 768 | 12 | GELU 4x | 163.0M |
| gpt2-medium | 24 x 1024 | 16 | GELU 4x | 406.3M |
| gpt2-xl | 48 x 1600 | 25 | GELU 4x | 1.638B |
| llama-7b | 32 x 4096 | 32 | SwiGLU 11008 | 6.74B |
| llama-13b | 40 x 5120 | 40 | SwiGLU 13824 | 13.0B |
| llama-70b | 80 x 8192 | 64 (8) | SwiGLU 28672 | 69.0B |

GPT-2 ties its LM head to the token embedding; the head here is separate, as in the Harmony
paper's profiles, whose GPT-2 medium and XL have exactly these 406.3M and 1.638B parameters
(harmony trains tied weights too: see harmony/model/tied.py). Attention is
``F.scaled_dot_product_attention`` with ``is_causal=True`` (a fused kernel: no [T, T] matrix is
kept for backward). Llama's grouped-query attention repeats each key/value head for its group
before the kernel, as the reference code does. No dropout.

>>> spec = build("gpt-tiny")
>>> [type(m).__name__ for m in spec.model.harmony_chain()]
['Embedding', 'Block', 'Block', 'Head']
>>> x, y = spec.example_inputs(3)
>>> spec.loss_fn(spec.model(x), y).shape
torch.Size([])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from harmony.planning.meta import ModelSpec


@dataclass(frozen=True)
class TransformerConfig:
    """The shape of a decoder-only transformer. Validates itself, naming the wrong field.

    Args:
        vocab_size: tokens. n_layer: blocks. dim: channels C. n_head: query heads.
        n_kv_head: key/value heads (grouped-query attention when fewer than ``n_head``; it must
            divide ``n_head``). None: as many as ``n_head``.
        ffn_hidden: hidden width of the MLP (GELU: usually 4C; SwiGLU: the gate's width).
        max_seq_len: the longest sequence (learned position table length for GPT-2, default
            ``seq_len`` for both).
        style: ``"gpt2"`` (LayerNorm with bias, learned positions, GELU MLP, biased linears) or
            ``"llama"`` (RMSNorm, rotary positions, SwiGLU MLP, no biases).
    """

    vocab_size: int
    n_layer: int
    dim: int
    n_head: int
    ffn_hidden: int
    max_seq_len: int
    style: str = "gpt2"
    n_kv_head: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "dim", "n_head", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name}={value!r} must be a positive int")
        if self.style not in ("gpt2", "llama"):
            raise ValueError(f"TransformerConfig.style={self.style!r}: use 'gpt2' or 'llama'")
        if self.dim % self.n_head:
            raise ValueError(f"TransformerConfig.dim={self.dim} is not divisible by "
                             f"n_head={self.n_head}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ValueError(f"TransformerConfig.n_kv_head={self.n_kv_head} must divide "
                             f"n_head={self.n_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


def _gpt2(n_layer: int, dim: int, n_head: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=50257, n_layer=n_layer, dim=dim, n_head=n_head,
                             ffn_hidden=4 * dim, max_seq_len=1024)


def _llama(n_layer: int, dim: int, n_head: int, ffn_hidden: int,
           n_kv_head: int | None = None) -> TransformerConfig:
    return TransformerConfig(vocab_size=32000, n_layer=n_layer, dim=dim, n_head=n_head,
                             n_kv_head=n_kv_head, ffn_hidden=ffn_hidden, max_seq_len=4096,
                             style="llama")


BUILTINS: dict[str, TransformerConfig] = {
    "gpt-tiny": TransformerConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, ffn_hidden=128,
                                  max_seq_len=16),
    "llama-tiny": TransformerConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2,
                                    ffn_hidden=96, max_seq_len=16, style="llama"),
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "llama-7b": _llama(32, 4096, 32, 11008),
    "llama-13b": _llama(40, 5120, 40, 13824),
    "llama-70b": _llama(80, 8192, 64, 28672, n_kv_head=8),
}


class Embedding(nn.Module):
    """Token ids [B, T] -> [B, T, C] (plus a learned position embedding for GPT-2)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Embedding(config.max_seq_len, config.dim) if config.style == "gpt2" \
            else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))  # [T, C] broadcasts
        return x


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x [B, H, T, D] (the rotate-half form)."""
    T, D = x.shape[2], x.shape[3]
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # [T, D/2]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        bias = config.style == "gpt2"
        hd, kv = config.head_dim, config.kv_heads
        self.q = nn.Linear(config.dim, config.n_head * hd, bias=bias)
        self.k = nn.Linear(config.dim, kv * hd, bias=bias)
        self.v = nn.Linear(config.dim, kv * hd, bias=bias)
        self.o = nn.Linear(config.n_head * hd, config.dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        # [B, T, H*D] -> [B, H, T, D]: heads become a batch dimension for the attention kernel.
        q = self.q(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if c.style == "llama":
            q, k = _rotate(q, c.rope_theta), _rotate(k, c.rope_theta)
        if c.kv_heads != c.n_head:  # grouped-query attention: each kv head serves a group
            group = c.n_head // c.kv_heads
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.swiglu = config.style == "llama"
        bias = not self.swiglu
        self.up = nn.Linear(config.dim, config.ffn_hidden, bias=bias)
        self.gate = nn.Linear(config.dim, config.ffn_hidden, bias=False) if self.swiglu else None
        self.down = nn.Linear(config.ffn_hidden, config.dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _norm(config: TransformerConfig) -> nn.Module:
    if config.style == "llama":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class Block(nn.Module):
    """One pre-norm decoder block, [B, T, C] -> [B, T, C]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(config), Attention(config)
        self.norm2, self.mlp = _norm(config), MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final norm and the projection to the vocabulary, [B, T, C] -> logits [B, T, V]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm = _norm(config)
        self.out = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Transformer(nn.Module):
    """A decoder-only transformer whose layers form a chain (see the module docstring)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = Head(config)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(_init_weights)

    def harmony_chain(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.harmony_chain():
            x = layer(x)
        return x


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over every token: logits [B, T, V], targets [B, T] -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(name: str, seq_len: int | None = None) -> ModelSpec:
    """The built-in model ``name`` for sequences of ``seq_len`` tokens (default: its longest).

    Parameters are created on the current default device: wrap the call in
    ``with torch.device("meta"):`` to allocate nothing. ``example_inputs(n)`` returns token ids
    and next-token targets, both [n, seq_len] int64, on the default device at call time.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or a bad ``seq_len``.
    """
    try:
        config = BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; choose one of "
                         f"{', '.join(BUILTINS)}") from None
    T = config.max_seq_len if seq_len is None else seq_len
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    if config.max_seq_len < T:
        if config.style == "gpt2":  # a learned position table cannot be extended
            raise ValueError(f"seq_len={T} is longer than {name}'s {config.max_seq_len} "
                             "positions; use --seq-len <= " f"{config.max_seq_len}")
        config = replace(config, max_seq_len=T)  # rotary positions extend to any length
    model = Transformer(config)
    vocab = config.vocab_size

    def example_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, vocab, (n, T)), torch.randint(0, vocab, (n, T)))

    return ModelSpec(name, model, token_cross_entropy, example_inputs, T)


def parameter_count(name: str) -> int:
    """Parameters of built-in ``name`` (computed on the meta device; nothing is allocated)."""
    with torch.device("meta"):
        spec = build(name)
    return sum(p.numel() for p in spec.model.parameters())

