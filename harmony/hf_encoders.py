"""Hugging Face encoder masked LMs (BERT, RoBERTa) as harmony chains; see :mod:`harmony.hf`.

``BertForMaskedLM`` and ``RobertaForMaskedLM`` split into the model's own embeddings module
(word + position + token type embeddings, LayerNorm, dropout; token_type_ids default to zeros,
and RoBERTa numbers positions from ``padding_idx + 1`` as its own forward does), one layer per
encoder block, and the MLM head, whose decoder is tied to the word embeddings by default (see
harmony/tied.py). Attention is bidirectional: each block builds its mask with the library's
``create_bidirectional_mask`` for unpadded input (no ``attention_mask``), which honours
``config._attn_implementation`` as the model's forward does (``create_causal_mask`` for a
config with ``is_decoder``, as the model's forward would use).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harmony.hf import _check_config, _mask_fn_call

__all__ = ["encoder_chain"]


class _EncoderBlock(nn.Module):
    """hidden -> hidden: one encoder layer with its (bidirectional) mask."""

    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self._config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers import masking_utils

        fn = (masking_utils.create_causal_mask if getattr(self._config, "is_decoder", False)
              else masking_utils.create_bidirectional_mask)
        mask = _mask_fn_call(fn, self._config, hidden, None)
        out = self.layer(hidden, mask)
        return out[0] if isinstance(out, tuple) else out


# model class -> (attribute of the encoder model, attribute of the MLM head)
_MASKED_LMS = {"BertForMaskedLM": ("bert", "cls"), "RobertaForMaskedLM": ("roberta", "lm_head")}


def encoder_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of a BERT or RoBERTa masked LM, or None for another model.

    The first layer (the model's embeddings module) takes ``input_ids`` (batch, seq); the last
    (the MLM head) returns logits equal to ``model(input_ids).logits``. Names are the model's
    module paths (``bert.encoder.layer.0``), plus ``embed`` and ``head``.
    """
    attrs = _MASKED_LMS.get(type(model).__name__)
    if attrs is None:
        return None
    base: Any = getattr(model, attrs[0], None)
    head = getattr(model, attrs[1], None)
    if base is None or not isinstance(head, nn.Module) or getattr(base, "pooler", None) is not None:
        return None  # not the layout this function knows
    config = _check_config(model)
    return [("embed", base.embeddings),
            *((f"{attrs[0]}.encoder.layer.{i}", _EncoderBlock(b, config))
              for i, b in enumerate(base.encoder.layer)),
            ("head", head)]
