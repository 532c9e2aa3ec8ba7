"""Hugging Face ``transformers`` (and ``peft``) models as harmony chains, without user code.

:func:`hf_chain` splits any ``transformers`` model whose blocks sit in one ``nn.ModuleList``
(causal LMs, masked LMs, ...) into an embedding layer (``embed``: the model's forward up to its
blocks), one layer per block and a head (``head``: the final norm, the LM head and whatever the
model does to its logits), whose composition computes ``model(*inputs).logits``; see
:mod:`harmony.model.hf_split` and :mod:`harmony.model.hf_analysis` for how, and docs/hf.md. The
layers hold the model's own submodules, so parameters are shared with the model and its
``state_dict()`` keys are unchanged. A ``peft``
model (LoRA) is split through the ``transformers`` model inside it.

Anything harmony cannot split raises :class:`harmony.model.hf_capture.Unsplittable` (a
``ValueError``) saying why and how to declare the chain by hand. This module never imports
``transformers`` or ``peft`` itself.
"""

from __future__ import annotations

from torch import nn

from harmony.model.hf_capture import HOW_TO, Unsplittable
from harmony.model.hf_split import HFSplit, split

__all__ = ["HOW_TO", "Unsplittable", "hf_chain", "hf_split", "is_hf_model", "is_peft_model",
           "transformers_model"]


def _library(model: object) -> str:
    return type(model).__module__.split(".", 1)[0] if isinstance(model, nn.Module) else ""


def is_hf_model(model: object) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` or ``peft`` module (checked by its
    class's module name, so neither library is imported)."""
    return _library(model) in ("transformers", "peft")


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a ``peft`` model (``get_peft_model(...)``)."""
    return _library(model) == "peft" and hasattr(model, "get_base_model")


def transformers_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model of ``model``: itself, or the one inside a ``peft`` model."""
    if is_peft_model(model):
        inner = model.get_base_model()  # type: ignore[operator]
        assert isinstance(inner, nn.Module)
        return inner
    return model


def hf_split(model: nn.Module) -> HFSplit | None:
    """The :class:`~harmony.model.hf_split.HFSplit` of a Hugging Face model; None for any other.

    Raises:
        Unsplittable: a Hugging Face model harmony cannot split (the message says why and how
            to declare its chain by hand).
    """
    if not is_hf_model(model):
        return None
    top = transformers_model(model)
    if _library(top) != "transformers":
        raise Unsplittable(f"{type(model).__name__} wraps a {type(top).__name__}, not a "
                           f"transformers model; {HOW_TO}")
    return split(model, top)


def hf_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of a Hugging Face model, in order, as ``(name, layer)`` pairs.

    The first layer takes the model's inputs (``input_ids``, batch first; more inputs, such
    as an ``attention_mask``, in the order of the model's ``forward`` arguments), the last
    returns the logits, equal to ``model(*inputs, use_cache=False).logits``. Names are the
    blocks' module paths (``model.layers.0``), plus ``embed`` and ``head`` for the ends.

    Example::

        layers = hf_chain(GPT2LMHeadModel(config))   # [("embed", ...), ("transformer.h.0",
        h = input_ids                                #   ...), ..., ("head", ...)]
        for _, layer in layers:
            h = layer(*h) if isinstance(h, tuple) else layer(h)   # h: the logits

    Raises:
        ValueError: not a Hugging Face model, or one harmony cannot split
            (:class:`~harmony.model.hf_capture.Unsplittable`); the message says how to declare the
            chain by hand.
    """
    got = hf_split(model)
    if got is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model; {HOW_TO}")
    return got.layers
