"""A small GPT, written as a chain of layers that harmony can split into packs.

The model is nanoGPT's (pre-LayerNorm blocks, causal self-attention, a 4x GELU MLP), laid out
so that data flows through a plain list of layers, each taking the previous layer's output:

    Embedding   token ids [B, T] (int64)  ->  [B, T, C]
    Block x N   [B, T, C]                 ->  [B, T, C]
    Head        [B, T, C]                 ->  logits [B, T, V]

``GPT.harmony_chain()`` returns that list; ``GPT.forward`` runs the same list, so one model
trains under harmony or under plain PyTorch. Unlike nanoGPT the output projection is not tied
to the token embedding: tied weights across layers are not supported by harmony yet.

    >>> config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    >>> model = GPT(config)
    >>> [type(layer).__name__ for layer in model.harmony_chain()]
    ['Embedding', 'Block', 'Block', 'Head']
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 65])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. Validates itself; a wrong value raises ``ValueError`` naming it.

    Args:
        vocab_size: number of distinct tokens (65 characters for tiny Shakespeare).
        block_size: the longest context, in tokens (the position table's length).
        n_layer: transformer blocks. n_head: attention heads per block.
        n_embd: channels C; must divide evenly into ``n_head`` heads.
        dropout: probability for every dropout (embeddings, attention, residuals), in [0, 1).
    """

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r} must be a positive int")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}; every head needs n_embd/n_head channels")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} must be a float in [0, 1)")


class Embedding(nn.Module):
    """Token ids [B, T] -> token embedding + learned position embedding, [B, T, C]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]  # T
        if length > self.block_size:
            raise ValueError(f"a sequence of {length} tokens is longer than block_size="
                             f"{self.block_size}; crop it or build the model with a larger one")
        pos = torch.arange(length, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, C] + [T, C] broadcasts


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, nh, T, hs]: heads become a batch dimension for the attention kernel.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # The fused kernel masks the future itself (is_causal) and never materialises [T, T]
        # attention weights for autograd; dropout only while training.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                           else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block, [B, T, C] -> [B, T, C]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to the vocabulary, [B, T, C] -> logits [B, T, V]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    """A character-level GPT whose layers form a chain (see the module docstring).

    Args:
        config: the model's shape.

    Weights are initialised as in GPT-2 (normal, std 0.02; residual projections scaled down by
    sqrt(2 * n_layer) so the residual stream's variance does not grow with depth), so seeding
    torch before construction makes the model reproducible.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = Head(config)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def harmony_chain(self) -> list[nn.Module]:
        """The layers in the order data flows through them; harmony packs consecutive ones."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, V], running the same chain harmony runs."""
        x = idx
        for layer in self.harmony_chain():
            x = layer(x)
        return x

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``idx`` [B, T] by ``max_new_tokens`` sampled tokens; returns [B, T + new].

        ``temperature=0`` picks the most likely token (greedy); otherwise tokens are sampled
        with ``generator``, so a fixed generator gives a fixed sample.
        """
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :]  # only the last position
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over every token: logits [B, T, V], targets [B, T] -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
