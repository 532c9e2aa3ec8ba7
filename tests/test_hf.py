"""Hugging Face models as harmony chains (harmony/hf.py), compared with plain HF training.

Tiny configs built from scratch (nothing is downloaded), untied LM heads (compared bitwise) and
tied ones (compared within a tolerance, see test_tied_training_close_to_plain_hf), dropout 0
and ``use_cache=False``: a training forward has no use for the KV cache, and with the cache
OPT's eager attention reads keys back from it in another memory layout, so its logits differ
from the cache-free forward in the last bit (6e-8) even in plain HF.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import harmony
from harmony.hf import hf_chain, is_hf_model
from schedules.task import Loc
from tests.models import assert_weights_close, cross_entropy_tokens, training_state_bytes

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)")

VOCAB, SEQ = 97, 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
               use_cache=False)


def _config(family: str, impl: str, tied: bool = False) -> object:
    t = transformers
    common = {**_COMMON, "tie_word_embeddings": tied}
    cfg = {
        "llama": lambda: t.LlamaConfig(num_key_value_heads=2, **common),
        # a window shorter than the sequence, so the sliding-window mask matters
        "mistral": lambda: t.MistralConfig(num_key_value_heads=2, sliding_window=4, **common),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **common),
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
            attention_dropout=0.0, layerdrop=0.0, tie_word_embeddings=tied, use_cache=False),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0,
                                            **common),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
            use_cache=False, bos_token_id=0, eos_token_id=0),
        "bert": lambda: t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **common),
        # RoBERTa numbers positions from pad_token_id + 1: room for SEQ after the padding index
        "roberta": lambda: t.RobertaConfig(hidden_dropout_prob=0.0, pad_token_id=1,
                                           attention_probs_dropout_prob=0.0,
                                           **{**common, "max_position_embeddings": SEQ + 2}),
    }[family]()
    cfg._attn_implementation = impl
    return cfg


ENCODERS = ["bert", "roberta"]  # masked LMs: bidirectional attention


def _model(family: str, impl: str = "sdpa", tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    auto = (transformers.AutoModelForMaskedLM if family in ENCODERS
            else transformers.AutoModelForCausalLM)
    return auto.from_config(_config(family, impl, tied))


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "gpt2", *ENCODERS]
TIED_FAMILIES = ["llama", "gpt2", *ENCODERS]


class Wrapped(nn.Module):
    """Stands in for Chain's own hook: the HF model under ``hf.``, its chain from hf_chain."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def harmony_chain(self) -> list[tuple[str, nn.Module]]:
        return hf_chain(self.hf)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x).logits
    assert isinstance(out, torch.Tensor)
    return out


def _compose(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h: object = x
    for _, layer in hf_chain(model):
        h = layer(*h) if isinstance(h, tuple) else layer(h)
    assert isinstance(h, torch.Tensor)
    return h


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_composes_to_logits(family: str, impl: str) -> None:
    model = _model(family, impl)
    assert is_hf_model(model)
    layers = hf_chain(model)
    assert len(layers) == 2 + 2  # embed, two blocks, head
    covered = {id(p) for _, m in layers for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_compose(model, x), model(x).logits)


def _adamw(tied: bool) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    # With a tied head, the tied gradient is summed in another order than plain autograd's (see
    # harmony/tied.py); eps=1e-3 keeps AdamW from blowing the rounding noise of gradients that
    # are zero in exact arithmetic (attention key biases) up to full-size steps.
    eps = 1e-3 if tied else 1e-8
    return lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=eps)


Weights = dict[str, torch.Tensor]


def _train_both(family: str, tied: bool, budget: bool) -> tuple[Weights, Weights]:
    """3 AdamW steps, batch 5 in micro-batches of 2 (uneven), by harmony (with a device budget
    of half the training state when ``budget``, so weights and optimizer state swap) and by
    plain HF gradient accumulation: (harmony's weights, HF's)."""
    make_opt = _adamw(tied)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, VOCAB, (5, SEQ), generator=g),
                torch.randint(0, VOCAB, (5, SEQ), generator=g)) for _ in range(3)]
    limit = int(training_state_bytes(_model(family, tied=tied), 8) * 0.5) if budget else None
    trainer = harmony.Trainer(Wrapped(_model(family, tied=tied)), cross_entropy_tokens,
                              optimizer=make_opt, micro_batch_size=2, device_memory=limit)
    with trainer:
        for x, y in batches:
            trainer.step(x, y)
        plan = trainer.plan
        assert plan is not None
        if budget:
            assert len(plan.bounds) > 1
            assert Loc.HOST in plan.placement.w, plan.describe(trainer.chain.names)
        got = {k.removeprefix("hf."): v for k, v in trainer.state_dict().items()}

    ref = _model(family, tied=tied)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = make_opt(list(ref.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(_logits(ref, xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        # (an untied BERT head keeps a bias its forward never reads: HF does not train it)
        used = [k for k, p in ref.named_parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad()
    want = ref.state_dict()
    assert got.keys() == want.keys()
    assert len(used) >= len(list(ref.parameters())) - 1
    assert all(not torch.equal(want[k], init[k]) for k in used), \
        "every parameter should have been trained"
    return got, want


@pytest.mark.parametrize("family", FAMILIES)
def test_training_equals_plain_hf(family: str) -> None:
    """Untied heads under a budget that forces swapping: weights bitwise equal to plain HF."""
    got, want = _train_both(family, tied=False, budget=True)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


RTOL = 1e-5


@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_tied_training_close_to_plain_hf(family: str, budget: bool) -> None:
    """Tied LM heads (embedding and head in different packs when the budget splits the model):
    per tensor, max|harmony - HF| <= 1e-5 * max(max|HF|, 1e-3) (the tied gradient's two uses
    are summed in another order: see tests/test_tied.py); both tied keys hold one value."""
    model = _model(family, tied=True)
    keys = [k for k, v in model.state_dict(keep_vars=True).items()
            if v is model.get_input_embeddings().weight]
    assert len(keys) == 2, keys  # the tie is real
    got, want = _train_both(family, tied=True, budget=budget)
    assert torch.equal(got[keys[0]], got[keys[1]])
    assert_weights_close(got, want, RTOL)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_positions_and_token_types_as_hf(family: str) -> None:
    """Token ids equal to the padding index (RoBERTa numbers positions after it and gives
    padding tokens the padding position) and no token_type_ids (zeros): still HF's logits."""
    model = _model(family, tied=True)
    pad = model.config.pad_token_id
    x = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    x[0, 3] = x[1, 0] = pad
    with torch.no_grad():
        assert torch.equal(_compose(model, x), model(x).logits)


def test_unsupported_architecture_says_how_to_declare_chain() -> None:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64)
    model = transformers.BertForSequenceClassification(cfg)
    assert is_hf_model(model)
    with pytest.raises(ValueError, match="harmony_chain"):
        hf_chain(model)


def test_is_hf_model_false_for_plain_modules() -> None:
    assert not is_hf_model(nn.Linear(2, 2))
    assert not is_hf_model(object())
