"""LoRA adapters on any chain, for planning: ``harmony report --lora R``.

:func:`add_lora` injects ``peft`` LoRA adapters of rank ``r`` into every ``nn.Linear`` of a
model's blocks (the chain's layers between the first and the last: not the embedding, not the
LM head, as LoRA fine-tuning usually does) and freezes everything else, on whatever device the
model is on: under ``torch.device("meta")`` nothing is allocated, so a 70B model's LoRA plan
costs seconds. The profile then counts frozen layers as weights only (no gradients, no
optimizer state), as the Trainer trains them.

Training a LoRA model needs none of this: give the Trainer the model ``peft.get_peft_model``
returns (see docs/hf.md).
"""

from __future__ import annotations

from torch import nn

__all__ = ["add_lora"]


def add_lora(model: nn.Module, r: int, chain_layers: list[nn.Module]) -> int:
    """Inject LoRA adapters of rank ``r`` into the ``nn.Linear`` modules of ``chain_layers``
    but the first and the last, in place; freeze every other parameter of ``model``.

    Returns:
        The number of adapted ``nn.Linear`` modules.

    Raises:
        ValueError: ``r`` is not a positive int, there is no ``nn.Linear`` to adapt, or
            ``peft`` is not installed (the message says how to install it).

    Example::

        with torch.device("meta"):
            spec = builtin_models.build("llama-70b")
        add_lora(spec.model, 16, Chain(spec.model).layers)
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora={r!r} must be a positive int (the adapters' rank)")
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs peft: pip install peft (or harmony's hf extra: "
                         "pip install 'harmony[hf]')") from None
    inner = {id(m) for layer in chain_layers[1:-1] for m in layer.modules()}
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m) in inner]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear in its blocks for LoRA "
                         "adapters")
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return len(targets)
