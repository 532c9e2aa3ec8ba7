"""Hugging Face ``transformers`` language models as harmony chains, without user code.

:func:`hf_chain` splits a ``*ForCausalLM`` model into an embedding layer, one layer per decoder
block and a head (final norm + LM head) whose composition computes ``model(input_ids).logits``
for unpadded ``input_ids`` (no ``attention_mask``, no cache). The layers are small wrappers that
hold the model's own submodules, so parameters are shared with the model and its
``state_dict()`` keys are unchanged. They compute what the Hugging Face forward computes
between those submodules: position ids, rotary embeddings, OPT's and GPT-2's learned
positions, and the causal (or sliding-window) mask, which each block rebuilds from its input's
shape with the library's own mask function (so ``config._attn_implementation``, eager or sdpa,
is honoured).

Supported: Llama-style models (``model.embed_tokens``, ``model.layers``, ``model.norm``,
``model.rotary_emb``: Llama, Mistral, Qwen2 and others sharing that layout), OPT, GPT-NeoX and
GPT-2; and the encoder masked LMs BERT and RoBERTa (:mod:`harmony.hf_encoders`). An LM head
tied to the embeddings stays tied: the Trainer trains it as one parameter (harmony/tied.py).
Anything else raises ``ValueError`` saying how to declare the chain by hand.

This module never imports ``transformers`` unless it is handed a ``transformers`` model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["hf_chain", "hf_chain_method", "is_hf_model"]

_HOW_TO = ("declare the chain by hand: give a module wrapping the model a method harmony_chain() "
           "returning (name, layer) pairs (an embedding layer, one layer per block, a head); each "
           "layer takes the previous layer's output, a tensor or a tuple of tensors "
           "(see docs/hf.md)")


def is_hf_model(model: object) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` module (checked by its class's
    module name, so ``transformers`` is not imported)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("transformers.")


def hf_chain_method(model: object) -> Callable[[], list[tuple[str, nn.Module]]] | None:
    """``hf_chain`` bound to ``model`` if it is a Hugging Face model, else ``None``: what
    :class:`harmony.chain.Chain` uses when the model declares no ``harmony_chain()``."""
    return partial(hf_chain, model) if is_hf_model(model) else None  # type: ignore[arg-type]


def _mask_fn_call(fn: Any, config: Any, hidden: torch.Tensor,
                  position_ids: torch.Tensor | None) -> Any:
    """Call ``create_causal_mask``-like ``fn`` for unpadded input and no cache, whichever
    keyword names the installed transformers uses."""
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {"config": config, "attention_mask": None}
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in params:
            kw[name] = None
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    if position_ids is not None and "position_ids" in params:
        kw["position_ids"] = position_ids
    return fn(**kw)


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """Position ids as Hugging Face makes them without a cache: ``arange(seq)[None]``."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


class _RotaryEmbed(nn.Module):
    """input_ids -> (hidden, cos, sin): token embeddings (+ dropout) and the rotary tables."""

    def __init__(self, embed: nn.Module, rotary: nn.Module, dropout: nn.Module | None) -> None:
        super().__init__()
        self.embed, self.rotary = embed, rotary
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.dropout(self.embed(input_ids))
        cos, sin = self.rotary(hidden, _positions(hidden))
        return hidden, cos, sin


class _RotaryBlock(nn.Module):
    """(hidden, cos, sin) -> (hidden', cos, sin): one decoder layer with its mask."""

    def __init__(self, layer: nn.Module, config: Any, sliding: bool) -> None:
        super().__init__()
        self.layer = layer
        self._config = config  # not a module: kept out of the module tree
        self._sliding = sliding

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers import masking_utils

        fn = (masking_utils.create_sliding_window_causal_mask if self._sliding
              else masking_utils.create_causal_mask)
        pos = _positions(hidden)
        mask = _mask_fn_call(fn, self._config, hidden, pos)
        out = self.layer(hidden, attention_mask=mask, position_ids=pos,
                         position_embeddings=(cos, sin))
        if isinstance(out, tuple):  # older transformers return (hidden, ...)
            out = out[0]
        return out, cos, sin


class _Head(nn.Module):
    """hidden (and whatever else flows along) -> logits: final norm(s)/projection + LM head."""

    def __init__(self, *mods: nn.Module | None, contiguous: bool = False) -> None:
        super().__init__()
        self.mods = nn.ModuleList(m for m in mods if m is not None)
        self._contiguous = contiguous

    def forward(self, hidden: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            hidden = m(hidden)
        return hidden.contiguous() if self._contiguous else hidden


class _OptEmbed(nn.Module):
    """input_ids -> hidden: tokens (+ project_in) + learned positions (with OPT's offset)."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.embed_tokens: nn.Module = decoder.embed_tokens
        self.embed_positions: nn.Module = decoder.embed_positions
        self.project_in: nn.Module | None = decoder.project_in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        embeds = self.embed_tokens(input_ids)
        ones = torch.ones(embeds.shape[0], embeds.shape[1], device=embeds.device)
        position_ids = (torch.cumsum(ones, dim=1) * ones - 1).long()
        pos = self.embed_positions(ones, 0, position_ids=position_ids)
        if self.project_in is not None:
            embeds = self.project_in(embeds)
        return embeds + pos.to(embeds.device)


class _OptBlock(nn.Module):
    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self._config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers import masking_utils

        ones = torch.ones(hidden.shape[0], hidden.shape[1], device=hidden.device)
        position_ids = (torch.cumsum(ones, dim=1) * ones - 1).long()
        # OPT's forward builds its mask without position ids
        mask = _mask_fn_call(masking_utils.create_causal_mask, self._config, hidden, None)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out


class _Gpt2Embed(nn.Module):
    """input_ids -> hidden: GPT-2's token + learned position embeddings, then dropout."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.wte: nn.Module = transformer.wte
        self.wpe: nn.Module = transformer.wpe
        self.drop: nn.Module = transformer.drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.wte(input_ids)
        pos = self.wpe(_positions(embeds))
        return self.drop(embeds + pos.to(embeds.device))


class _Gpt2Block(nn.Module):
    """hidden -> hidden: one GPT-2 block with the causal mask rebuilt from the shape."""

    def __init__(self, block: nn.Module, config: Any) -> None:
        super().__init__()
        self.block = block
        self._config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers import masking_utils

        pos = _positions(hidden)
        mask = _mask_fn_call(masking_utils.create_causal_mask, self._config, hidden, pos)
        out = self.block(hidden, attention_mask=mask, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out


def _sliding(config: Any, i: int) -> bool:
    """Whether layer ``i`` uses a sliding-window mask, as the model's own forward decides."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return bool(types[i] == "sliding_attention")
    return getattr(config, "sliding_window", None) is not None


def _has(obj: object, *names: str) -> bool:
    """Whether every ``obj.<name>`` is a module."""
    return all(isinstance(getattr(obj, n, None), nn.Module) for n in names)


def _check_config(model: nn.Module) -> Any:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model, which hf_chain "
                         f"does not split; {_HOW_TO}")
    layerdrop = getattr(config, "layerdrop", 0.0) or 0.0
    if layerdrop > 0:
        raise ValueError(f"{type(model).__name__} has layerdrop={layerdrop}, which skips blocks "
                         "at random and cannot be a fixed chain; set config.layerdrop = 0")
    return config


def hf_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of a Hugging Face causal LM (or BERT/RoBERTa masked LM), in order, as
    ``(name, layer)`` pairs.

    The first layer takes ``input_ids`` (batch, seq) and the last returns the logits, equal to
    ``model(input_ids).logits`` (no padding, no cache). Names are the model's module paths
    (``model.layers.0``), plus ``embed`` and ``head`` for the ends.

    Example::

        layers = hf_chain(GPT2LMHeadModel(config))   # [("embed", ...), ("transformer.h.0",
        h = input_ids                                #   ...), ..., ("head", ...)]
        for _, layer in layers:
            h = layer(*h) if isinstance(h, tuple) else layer(h)   # h: the logits

    Raises:
        ValueError: an architecture this function does not know; the message says how to
            declare the chain by hand.
    """
    name = type(model).__name__
    m: Any = model  # Hugging Face submodules, looked up by name
    lm_head: Any = getattr(m, "lm_head", None)
    base: Any = getattr(m, "model", None)
    neox: Any = getattr(m, "gpt_neox", None)
    if _has(m, "lm_head") and _has(base, "embed_tokens", "layers", "norm", "rotary_emb"):
        # Llama layout (Llama, Mistral, Qwen2, ...).
        config = _check_config(model)
        blocks = list(base.layers)[: config.num_hidden_layers]
        return [("embed", _RotaryEmbed(base.embed_tokens, base.rotary_emb, None)),
                *((f"model.layers.{i}", _RotaryBlock(b, config, _sliding(config, i)))
                  for i, b in enumerate(blocks)),
                ("head", _Head(base.norm, lm_head))]
    dec: Any = getattr(base, "decoder", None)
    if _has(m, "lm_head") and type(dec).__name__ == "OPTDecoder":
        # OPT: learned positions (with their offset), optional project_in/out.
        config = _check_config(model)
        return [("embed", _OptEmbed(dec)),
                *((f"model.decoder.layers.{i}", _OptBlock(b, config))
                  for i, b in enumerate(dec.layers)),
                ("head", _Head(dec.final_layer_norm, dec.project_out, lm_head,
                               contiguous=True))]
    if _has(m, "lm_head") and _has(neox, "embed_in", "emb_dropout", "layers",
                                   "final_layer_norm", "rotary_emb"):
        config = _check_config(model)
        return [("embed", _RotaryEmbed(neox.embed_in, neox.rotary_emb, neox.emb_dropout)),
                *((f"gpt_neox.layers.{i}", _RotaryBlock(b, config, False))
                  for i, b in enumerate(neox.layers)),
                ("head", _Head(neox.final_layer_norm, lm_head))]
    gpt2: Any = getattr(m, "transformer", None)
    if _has(m, "lm_head") and type(gpt2).__name__ == "GPT2Model":
        # GPT-2: learned positions; lm_head tied to wte by default (see harmony/tied.py).
        config = _check_config(model)
        return [("embed", _Gpt2Embed(gpt2)),
                *((f"transformer.h.{i}", _Gpt2Block(b, config)) for i, b in enumerate(gpt2.h)),
                ("head", _Head(gpt2.ln_f, lm_head))]
    from harmony.hf_encoders import encoder_chain  # BERT, RoBERTa

    layers = encoder_chain(model)
    if layers is not None:
        return layers
    raise ValueError(f"harmony cannot split the Hugging Face model {name} into layers "
                     "automatically (supported: Llama-layout causal LMs such as Llama, Mistral "
                     f"and Qwen2; OPT; GPT-NeoX; GPT-2; BERT and RoBERTa masked LMs); {_HOW_TO}")
