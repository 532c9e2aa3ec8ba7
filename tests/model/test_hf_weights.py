"""Hugging Face directories built on the meta device and read one tensor at a time:
``harmony.load_meta`` and ``Trainer.from_pretrained`` (harmony/model/hf_weights.py), and
``export()`` back to shards that ``from_pretrained`` reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harmony
from tests.models import cross_entropy_tokens

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)")

VOCAB = 97


def _llama(tied: bool) -> object:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        tie_word_embeddings=tied, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, VOCAB, (4, 8), generator=g),
             torch.randint(0, VOCAB, (4, 8), generator=g)) for _ in range(n)]


BUDGETS = {"micro_batch_size": 2, "device_memory": "200KiB", "host_memory": "150KiB"}


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_trains_like_the_model_built_in_memory(tmp_path: Path,
                                                               tied: bool) -> None:
    model = _llama(tied)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")  # several shards
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    (tmp_path / "nvme").mkdir()
    kw = {**BUDGETS, "nvme_dir": str(tmp_path / "nvme")}
    meta = harmony.load_meta(tmp_path / "src")
    assert all(p.is_meta for p in meta.parameters())
    assert not any(b.is_meta for b in meta.buffers())  # (rotary tables stay real)
    batches = _batches()
    with harmony.Trainer(_llama(tied), cross_entropy_tokens, **kw) as ref, \
            harmony.Trainer.from_pretrained(tmp_path / "src", cross_entropy_tokens,
                                            **kw) as t:
        for x, y in batches:
            assert ref.step(x, y) == t.step(x, y)
        assert t.plan is not None and "nvme" in t.plan.placement.to_json()["w"]
        want, got = ref.state_dict(), t.state_dict()
        t.export(tmp_path / "out", max_shard_size="40KB")
    for k in want:
        assert torch.equal(got[k], want[k]), k
    back = type(model).from_pretrained(tmp_path / "out").state_dict()
    for k in back:
        assert torch.equal(back[k], got[k]), k


def test_load_meta_needs_a_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        harmony.load_meta(tmp_path)
