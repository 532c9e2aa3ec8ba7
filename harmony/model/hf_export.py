"""Exporting trained Hugging Face models the way their libraries save them.

* a ``transformers`` model: its ``config.json`` beside the weights, so ``from_pretrained``
  loads the folder (:func:`write_config`);
* a ``peft`` model (LoRA...): the adapter alone, written by the model's own
  ``save_pretrained`` from harmony's trained values (``adapter_config.json``,
  ``adapter_model.safetensors``, its README), so ``PeftModel.from_pretrained(base, folder)``
  loads it (:func:`write_adapter`). The frozen base is not written: it did not change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from harmony.model.hf import is_peft_model, transformers_model

__all__ = ["adapter_keys", "write_adapter", "write_config"]


def adapter_keys(model: nn.Module) -> set[str] | None:
    """The ``state_dict`` keys of a ``peft`` model's trainable parameters (its adapter, and
    any module it trains whole); None for any other model."""
    if not is_peft_model(model):
        return None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}


def write_config(model: nn.Module, out: Path) -> None:
    """Write ``out/config.json`` for a ``transformers`` model (nothing for another)."""
    config = getattr(transformers_model(model), "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(out / "config.json")


def write_adapter(model: nn.Module, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """Write a ``peft`` model's adapter with ``weights`` (its trainable values under the
    model's keys) into ``out`` as ``model.save_pretrained(out)`` would; returns ``out``.

    The files are written into a temporary folder beside ``out`` and then moved in, so a
    failure leaves ``out`` as it was.

    Raises:
        OSError: the folder cannot be written (nothing in ``out`` changed).
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(tmp, state_dict=weights,  # type: ignore[operator]
                              save_embedding_layers=False)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                dest = out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
