"""Hugging Face models as harmony chains (harmony/model/hf.py, hf_split.py), compared with plain HF.

Tiny configs built from scratch (nothing is downloaded) of many families, none of which has
code of its own in harmony: the chain is found by running the model's forward. Untied LM heads
are compared bitwise, tied ones within a tolerance (see test_tied_training_close_to_plain_hf);
dropout 0 and ``use_cache=False``: a training forward has no use for the KV cache, and with the
cache OPT's eager attention reads keys back from it in another memory layout, so its logits
differ from the cache-free forward in the last bit (6e-8) even in plain HF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import harmony
from harmony.model.chain import Chain
from harmony.model.hf import Unsplittable, hf_chain, is_hf_model
from harmony.model.probe import ChainMismatch, check_chain
from schedules.task import Loc
from tests.models import assert_weights_close, cross_entropy_tokens, training_state_bytes

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)")

VOCAB, SEQ = 97, 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, use_cache=False)
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _configs(tied: bool) -> dict[str, Callable[[], Any]]:
    t = transformers
    c = {**_COMMON, "tie_word_embeddings": tied}
    kv = {**c, "num_key_value_heads": 2}
    return {
        "llama": lambda: t.LlamaConfig(**kv),
        # a window shorter than the sequence, so the sliding-window mask matters
        "mistral": lambda: t.MistralConfig(sliding_window=4, **kv),
        "qwen2": lambda: t.Qwen2Config(**kv),
        "qwen3": lambda: t.Qwen3Config(head_dim=8, **kv),
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
            attention_dropout=0.0, layerdrop=0.0, tie_word_embeddings=tied, use_cache=False),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **c),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
            tie_word_embeddings=tied, use_cache=False, bos_token_id=0, eos_token_id=0,
            **_NO_DROPOUT),
        "gptj": lambda: t.GPTJConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
            rotary_dim=4, tie_word_embeddings=tied, use_cache=False, bos_token_id=0,
            eos_token_id=0, **_NO_DROPOUT),
        # ALiBi positions, an embedding LayerNorm
        "bloom": lambda: t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                       hidden_dropout=0.0, attention_dropout=0.0,
                                       tie_word_embeddings=tied, use_cache=False),
        "phi": lambda: t.PhiConfig(partial_rotary_factor=0.5, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attention_dropout=0.0, **c),
        "phi3": lambda: t.Phi3Config(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, **kv),
        "stablelm": lambda: t.StableLmConfig(partial_rotary_factor=0.5, **kv),
        "starcoder2": lambda: t.Starcoder2Config(residual_dropout=0.0, embedding_dropout=0.0,
                                                 sliding_window=None, **kv),
        # mixture of experts
        "mixtral": lambda: t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kv),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32,
                                              shared_expert_intermediate_size=32, **kv),
        # embeddings scaled by sqrt(hidden), logits soft-capped, sliding windows: the kind of
        # model a decomposition reading only the module layout trains wrong
        "gemma": lambda: t.GemmaConfig(head_dim=8, **kv),
        "gemma2": lambda: t.Gemma2Config(head_dim=8, sliding_window=4,
                                         final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                                         **kv),
        "cohere": lambda: t.CohereConfig(logit_scale=0.5, **kv),
        "granite": lambda: t.GraniteConfig(logits_scaling=2.0, embedding_multiplier=3.0,
                                           residual_multiplier=0.5, attention_multiplier=0.3,
                                           **kv),
        "bert": lambda: t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **c),
        # RoBERTa numbers positions from pad_token_id + 1: room for SEQ after the padding index
        "roberta": lambda: t.RobertaConfig(hidden_dropout_prob=0.0, pad_token_id=1,
                                           attention_probs_dropout_prob=0.0,
                                           **{**c, "max_position_embeddings": SEQ + 2}),
    }


ENCODERS = ["bert", "roberta"]  # masked LMs: bidirectional attention
FAMILIES = list(_configs(False))
EAGER_ONLY = {"bloom", "gemma2", "gptj"}  # (HF refuses sdpa for these, or prefers eager)
TIED_FAMILIES = ["llama", "gpt2", "gemma", "bloom", *ENCODERS]


def _model(family: str, impl: str = "sdpa", tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = _configs(tied)[family]()
    cfg._attn_implementation = "eager" if family in EAGER_ONLY else impl
    auto = (transformers.AutoModelForMaskedLM if family in ENCODERS
            else transformers.AutoModelForCausalLM)
    return auto.from_config(cfg)


class Wrapped(nn.Module):
    """A model declaring its chain as hf_chain gives it (the HF model under ``hf.``)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def harmony_chain(self) -> list[tuple[str, nn.Module]]:
        return hf_chain(self.hf)


def _logits(model: nn.Module, *x: torch.Tensor) -> torch.Tensor:
    out = model(*x, use_cache=False).logits if "use_cache" in _params(model) \
        else model(*x).logits
    assert isinstance(out, torch.Tensor)
    return out


def _params(model: nn.Module) -> set[str]:
    import inspect
    return set(inspect.signature(model.forward).parameters)


def _compose(layers: list[tuple[str, nn.Module]], *x: torch.Tensor) -> torch.Tensor:
    h: object = x
    for _, layer in layers:
        h = layer(*h) if isinstance(h, tuple) else layer(h)
    assert isinstance(h, torch.Tensor)
    return h


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_composes_to_logits(family: str, impl: str) -> None:
    if impl == "sdpa" and family in EAGER_ONLY:
        pytest.skip(f"{family} runs eager attention")
    model = _model(family, impl)
    assert is_hf_model(model)
    layers = hf_chain(model)
    assert layers[0][0] == "embed" and layers[-1][0] == "head"
    assert len(layers) == 2 + 2  # embed, two blocks, head
    covered = {id(p) for _, m in layers for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_compose(layers, x), _logits(model, x))
    got = check_chain(Chain(model), (x,), single=True)  # the probe agrees
    assert got is not None and got.relative == 0.0 and not got.eval_mode


def _adamw(tied: bool) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    # With a tied head, the tied gradient is summed in another order than plain autograd's (see
    # harmony/model/tied.py); eps=1e-3 keeps AdamW from blowing the rounding noise of gradients that
    # are zero in exact arithmetic (attention key biases) up to full-size steps.
    eps = 1e-3 if tied else 1e-8
    return lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=eps)


Weights = dict[str, torch.Tensor]


def _batches(steps: int = 3, seq: int = SEQ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, VOCAB, (5, seq), generator=g),
             torch.randint(0, VOCAB, (5, seq), generator=g)) for _ in range(steps)]


def _plain_hf(ref: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
              ) -> tuple[Weights, list[str]]:
    """Plain HF gradient accumulation over micro-batches of 2: (weights, trained keys)."""
    opt = make_opt([p for p in ref.parameters() if p.requires_grad])
    used: list[str] = []
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            (cross_entropy_tokens(_logits(ref, xm), ym) * (ym.shape[0] / y.shape[0])).backward()
        # (an untied BERT head keeps a bias its forward never reads: HF does not train it)
        used = [k for k, p in ref.named_parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}, used


def _train_both(family: str, tied: bool, budget: bool, wrapped: bool = False,
                batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[Weights, Weights]:
    """3 AdamW steps, batch 5 in micro-batches of 2 (uneven), by harmony (with a device budget
    of half the training state when ``budget``, so weights and optimizer state swap) and by
    plain HF gradient accumulation: (harmony's weights, HF's)."""
    make_opt = _adamw(tied)
    batches = batches or _batches()
    limit = int(training_state_bytes(_model(family, tied=tied), 8) * 0.5) if budget else None
    model = _model(family, tied=tied)
    trainer = harmony.Trainer(Wrapped(model) if wrapped else model, cross_entropy_tokens,
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
    init = _model(family, tied=tied).state_dict()
    want, used = _plain_hf(_model(family, tied=tied), batches, make_opt)
    assert got.keys() == want.keys()
    assert len(used) >= len(list(_model(family, tied=tied).parameters())) - 1
    assert all(not torch.equal(want[k], init[k]) for k in used), \
        "every parameter should have been trained"
    return got, want


@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_equals_plain_hf(family: str, budget: bool) -> None:
    """Untied heads, with and without a budget that forces swapping: weights bitwise equal to
    plain HF."""
    got, want = _train_both(family, tied=False, budget=budget)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


RTOL = 1e-5


@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_tied_training_close_to_plain_hf(family: str, budget: bool) -> None:
    """Tied LM heads (embedding and head in different packs when the budget splits the model):
    per tensor, max|harmony - HF| <= 1e-5 * max(max|HF|, 1e-3) (the tied gradient's two uses
    are summed in another order: see tests/model/test_tied.py); both tied keys hold one value."""
    model = _model(family, tied=True)
    keys = [k for k, v in model.state_dict(keep_vars=True).items()
            if v is model.get_input_embeddings().weight]
    assert len(keys) == 2, keys  # the tie is real
    got, want = _train_both(family, tied=True, budget=budget)
    assert torch.equal(got[keys[0]], got[keys[1]])
    assert_weights_close(got, want, RTOL)


def test_declared_hf_chain_trains_as_the_model() -> None:
    """hf_chain's layers declared by a wrapper (the state_dict keys under ``hf.``)."""
    got, want = _train_both("llama", tied=False, budget=True, wrapped=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sliding_window_mask_appears_with_longer_sequences() -> None:
    """Mistral with sdpa needs no mask within its window (4) and a mask beyond it: the chain's
    values differ in structure from step to step and training still equals plain HF (the
    longer sequences re-home the packs, which keeps the rotary tables, buffers outside the
    state dict)."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, VOCAB, (5, n), generator=g),
                torch.randint(0, VOCAB, (5, n), generator=g)) for n in (3, 8, 3)]
    got, want = _train_both("mistral", tied=False, budget=True, batches=batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("family", ["llama", "phi3", "bert"])
def test_padded_inputs_with_attention_mask(family: str) -> None:
    """(input_ids, attention_mask) go to the model's forward as its first two positional
    arguments (as they are for these models): the chain gives its logits for a padded batch
    too."""
    model = _model(family, "sdpa")
    x = torch.randint(2, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, -2:] = 0
    with torch.no_grad():
        want = model(x, mask).logits
        assert torch.equal(_compose(hf_chain(model), x, mask), want)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_positions_and_token_types_as_hf(family: str) -> None:
    """Token ids equal to the padding index (RoBERTa numbers positions after it and gives
    padding tokens the padding position) and no token_type_ids (zeros): still HF's logits."""
    model = _model(family, tied=True)
    pad = model.config.pad_token_id
    x = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    x[0, 3] = x[1, 0] = pad
    with torch.no_grad():
        assert torch.equal(_compose(hf_chain(model), x), model(x).logits)


class _OldGemmaHead(nn.Module):
    """What a decomposition that reads only the module layout computes: lm_head(norm(h)),
    without Gemma 2's soft-capping of the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, hidden: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def test_probe_refuses_a_chain_that_computes_something_else() -> None:
    """Never silently different: a chain whose head forgets the soft-capping is refused with
    the measured difference, before anything trains."""
    model = _model("gemma2")
    chain = Chain(model)
    chain.layers[-1] = _OldGemmaHead(model)
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ChainMismatch, match=r"differs by [0-9.e+-]+ \(") as err:
        check_chain(chain, (x,), single=True)
    assert err.value.relative > 1e-3


def test_probe_catches_a_layer_reading_another_layers_weights() -> None:
    model = _model("llama")
    chain = Chain(model)
    embed = model.model.embed_tokens

    class Peek(nn.Module):  # the head reads the embedding's weight, which it does not hold
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *value: torch.Tensor) -> torch.Tensor:
            return self.inner(*value) + embed.weight[0, 0]

    chain.layers[-1] = Peek(chain.layers[-1])
    with pytest.raises(ChainMismatch, match="reads weights of another layer"):
        check_chain(chain, (torch.randint(0, VOCAB, (2, SEQ)),), single=True)


def test_probe_leaves_the_model_as_it_was() -> None:
    model = _model("gpt2").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (4, 40))
    state = torch.random.get_rng_state()
    got = check_chain(Chain(model), (x,), single=True)
    assert got is not None and got.shapes == [(2, 32)]  # two samples, 32 tokens
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and all(p.grad is None and p.requires_grad
                                  for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_on_the_meta_device_splits_and_stays_there() -> None:
    """The analysis runs a meta model on zeros on the CPU; its tensors stay on meta, and the
    same model materialized splits into the same layers."""
    cfg = _configs(False)["qwen3"]()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    layers = hf_chain(model)
    assert [n for n, _ in layers] == [n for n, _ in hf_chain(_model("qwen3"))]
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert all(t.is_meta for _, m in layers for t in (*m.parameters(), *m.buffers()))
    assert check_chain(Chain(model), (torch.zeros(2, SEQ, dtype=torch.long),), True) is None


def test_encoder_decoder_is_refused_naming_the_reason() -> None:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=4)
    with pytest.raises(Unsplittable, match="encoder-decoder.*harmony_chain"):
        hf_chain(transformers.T5ForConditionalGeneration(cfg))


def test_head_reading_more_than_the_hidden_state_is_refused() -> None:
    """BERT's sequence classifier reads the pooler's output, not the last hidden state."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64)
    model = transformers.BertForSequenceClassification(cfg)
    assert is_hf_model(model)
    with pytest.raises(ValueError, match="more than that block's hidden state.*harmony_chain"):
        hf_chain(model)


def test_is_hf_model_false_for_plain_modules() -> None:
    assert not is_hf_model(nn.Linear(2, 2))
    assert not is_hf_model(object())
