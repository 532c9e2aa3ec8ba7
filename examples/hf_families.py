"""Which Hugging Face model families harmony splits: every causal LM (or masked LM) class the
installed ``transformers`` knows, built offline from its default config shrunk to a few
thousand parameters.

For each family it prints one line:

* ``split``: the chain's composition equals ``model(x, use_cache=False).logits`` bit for bit
  and the probe harmony runs before training (``harmony.model.probe``) agrees;
* ``refused``: harmony refuses to split it automatically, and why (declare its chain by hand:
  docs/hf.md);
* ``DIFFERENT``: the composition differs from the model's logits and the probe did not refuse
  it (a silently different chain: a bug to report);
* ``not built``: the shrunk config does not make a model that runs in plain ``transformers``
  (a limit of this script's shrinking, not of harmony).

    python examples/hf_families.py                  # every causal LM family (~50 min on 2 cores)
    python examples/hf_families.py --masked          # masked LMs
    python examples/hf_families.py llama gemma2 bloom
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import torch

try:
    import harmony  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harmony.model.chain import Chain
from harmony.model.hf import Unsplittable
from harmony.model.probe import ChainMismatch, check_chain

# shrunk sizes, set wherever a config has the attribute
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=97, n_embd=32, n_layer=2, n_head=4, d_model=32,
             ffn_dim=64, n_positions=64, max_position_embeddings=64, num_layers=2, head_dim=8,
             moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, embedding_size=32, d_ff=64, n_inner=64,
             shared_expert_intermediate_size=32, kv_lora_rank=8, q_lora_rank=8,
             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)


class _Slow(Exception):
    pass


def _shrink(config: Any) -> None:
    for target in (config, getattr(config, "text_config", None)):
        if target is None:
            continue
        for key, value in SMALL.items():
            try:
                if hasattr(target, key):
                    setattr(target, key, value)
            except Exception:  # a field this config guards: it keeps its own
                continue
    config.use_cache = False


def check(model_type: str, masked: bool) -> tuple[str, str]:
    """(verdict, detail) for one family."""
    import transformers

    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    try:
        config = transformers.AutoConfig.for_model(model_type)
        _shrink(config)
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        x = torch.randint(1, 90, (2, 8))
        with torch.no_grad():
            want = model(x, use_cache=False).logits
    except Exception as err:  # any failure of plain transformers
        return "not built", f"{type(err).__name__}: {str(err)[:90]}"
    name = type(model).__name__
    try:
        chain = Chain(model)
    except Unsplittable as err:
        return "refused", f"{name}: {str(err).split('; declare')[0][:160]}"
    with torch.no_grad():
        value: tuple[torch.Tensor, ...] = (x,)
        out: Any = x
        for layer in chain.layers:
            out = layer(*value)
            value = out if isinstance(out, tuple) else (out,)
    same = out.shape == want.shape and torch.equal(out, want)
    try:
        check_chain(chain, (torch.randint(1, 90, (3, 8)),), single=True)
        probe = "agrees"
    except ChainMismatch as err:
        probe = f"refuses ({err.what}, {err.relative:.2g})"
    if same and probe == "agrees":
        return "split", f"{name}: {len(chain)} layers, bitwise; probe agrees"
    if not same and probe != "agrees":
        return "refused", f"{name}: the probe {probe}"
    return "DIFFERENT", f"{name}: composition {'equal' if same else 'differs'}, probe {probe}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("families", nargs="*", help="model types (default: all)")
    p.add_argument("--masked", action="store_true", help="masked LMs instead of causal LMs")
    p.add_argument("--timeout", type=int, default=60, help="seconds per family")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        print("hf_families.py needs transformers: pip install 'harmony[hf]'")
        return 1
    mapping = (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES if args.masked
               else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    families = args.families or sorted(mapping)
    counts: dict[str, int] = {}

    def slow(*_: object) -> None:
        raise _Slow

    signal.signal(signal.SIGALRM, slow)
    for family in families:
        signal.alarm(args.timeout)
        try:
            verdict, detail = check(family, args.masked)
        except _Slow:
            verdict, detail = "not built", f"took over {args.timeout} s"
        finally:
            signal.alarm(0)
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{family:<28} {verdict:<10} {detail}", flush=True)
    print("; ".join(f"{v}: {n}" for v, n in sorted(counts.items())))
    return 1 if counts.get("DIFFERENT") else 0


if __name__ == "__main__":
    sys.exit(main())
