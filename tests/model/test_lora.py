"""LoRA fine-tuning with peft: frozen base weights move as weights only, adapters train as in
plain peft, and the adapter is exported as peft saves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import harmony
from schedules.task import Loc
from tests.models import cross_entropy_tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

VOCAB, SEQ = 97, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(family: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  tie_word_embeddings=False, use_cache=False)
    cfg = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family](**common)
    cfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _lora(family: str = "llama", r: int = 4) -> Any:
    base = _base(family)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    for name, p in model.named_parameters():  # start B away from 0: every path trains
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model


def _opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in ps if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, VOCAB, (5, SEQ), generator=g),
             torch.randint(0, VOCAB, (5, SEQ), generator=g)) for _ in range(n)]


def _plain_peft(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    opt = _opt(list(model.parameters()))
    for x, y in batches:
        for xm, ym in zip(x.split(2), y.split(2)):
            logits = model(xm, use_cache=False).logits
            (cross_entropy_tokens(logits, ym) * (ym.shape[0] / y.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sizes(model: nn.Module) -> tuple[int, int]:
    """(bytes of trainable parameters, bytes of frozen ones)."""
    train = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    return train, frozen


@pytest.mark.parametrize("where", ["memory", "host", "nvme"])
def test_lora_trains_as_plain_peft(where: str, tmp_path: Path) -> None:
    """Adapters bitwise equal to plain peft over the same micro-batches, the base unchanged;
    the frozen base moves as weights only: no gradients, no optimizer state, never written
    back (with its home on NVMe too)."""
    batches = _batches()
    want = _plain_peft(_lora(), batches)
    model = _lora()
    train, frozen = _sizes(model)
    kw: dict[str, Any] = {}
    if where != "memory":
        kw["device_memory"] = (frozen + 4 * train) // 2  # half the training state: swaps
    if where == "nvme":
        kw.update(host_memory=frozen // 2, nvme_dir=str(tmp_path))
    trainer = harmony.Trainer(model, cross_entropy_tokens, optimizer=_opt, micro_batch_size=2,
                              **kw)
    with trainer:
        for x, y in batches:
            trainer.step(x, y)
        plan = trainer.plan
        assert plan is not None
        got = trainer.state_dict()
        stats = trainer.stats
        # the planner charges G and K for the adapters only
        assert sum(plan.sizes.g) <= train + 256 * len(plan.bounds) * 30
        if where != "memory":
            home = Loc.NVME if where == "nvme" else Loc.HOST
            assert len(plan.bounds) > 1 and home in plan.placement.w, \
                plan.describe(trainer.chain.names)
        state = sum(t.numel() * t.element_size() for pack in trainer.runtime.packs  # type: ignore[union-attr]
                    for s in pack.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0) if where != "nvme" else None
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    base = _lora().state_dict()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert changed and all("lora_" in k for k in changed)
    if state is not None:
        assert state == 2 * train  # AdamW's two moments of the adapters alone
    moved = {kind: n for (link, kind), n in stats.bytes_by_kind.items()}
    written_w = sum(n for (link, kind), n in stats.bytes_by_kind.items()
                    if kind == "W" and link.endswith(("->host", "->nvme")) and
                    not link.startswith("nvme->"))
    # per step at most the adapters (and the rotary tables, buffers) go home, never the base
    assert written_w <= len(batches) * (train + 4096), (written_w, train, stats.bytes_by_kind)
    if where != "memory":
        assert moved.get("W", 0) > 0
    assert sum(n for (link, kind), n in stats.bytes_by_kind.items() if kind == "G") \
        <= 3 * len(batches) * (train + 256 * 40)


def test_adapter_export_loads_with_peft(tmp_path: Path) -> None:
    batches = _batches(2)
    model = _lora()
    with harmony.Trainer(model, cross_entropy_tokens, optimizer=_opt,
                         micro_batch_size=2) as trainer:
        for x, y in batches:
            trainer.step(x, y)
        trained = trainer.state_dict()
        out = trainer.export(tmp_path / "adapter")
    files = {f.name for f in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the frozen base is not written
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(_base(), out)
    got = loaded.state_dict()
    for k, v in trained.items():
        assert torch.equal(got[k], v), k
    x = batches[0][0]
    with torch.no_grad():
        reference = _lora()
        reference.load_state_dict(trained)
        assert torch.equal(loaded(x).logits, reference(x, use_cache=False).logits)


def test_lora_report_counts_frozen_layers_as_weights_only() -> None:
    """harmony report --lora: frozen layers are W only, so the plan's host memory for the
    training state falls to about the weights'."""
    from harmony.tools.report import load_profile, make_report

    full = load_profile("llama-tiny", 1)
    lora = load_profile("llama-tiny", 1, lora=4)
    w = sum(lp.w_bytes for lp in full.layers)
    assert sum(lp.g_bytes for lp in full.layers) == w and not any(
        lp.frozen_bytes for lp in full.layers)
    assert 0 < sum(lp.g_bytes for lp in lora.layers) < w / 5
    assert sum(lp.frozen_bytes for lp in lora.layers) == w
    assert lora.extra["lora"]["adapted_linears"] == 14  # 7 per block: q k v o up gate down
    budget = 2 * w  # less than full training's state (4 x W): the rest lives on the host
    r_full = make_report(full, 4, budget, None)
    r_lora = make_report(lora, 4, budget, None)
    assert Loc.HOST in r_full.plan.placement.w
    assert r_lora.plan.predicted.peak[Loc.HOST] < r_full.plan.predicted.peak[Loc.HOST] / 2


def test_lora_report_without_peft_or_with_a_profile_file_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from harmony.tools.report import load_profile

    with pytest.raises(ValueError, match="profile already"):
        load_profile("paper:gpt2_medium", 1, lora=4)
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(ValueError, match="pip install peft"):
        load_profile("llama-tiny", 1, lora=4)


def test_lora_checkpoint_on_nvme_resumes_exactly(tmp_path: Path) -> None:
    """Save after two steps with the base homed on NVMe, load into a fresh trainer, train on:
    the same adapters as training straight through."""
    batches = _batches(4)
    model = _lora()
    train, frozen = _sizes(model)
    kw: dict[str, Any] = dict(optimizer=_opt, micro_batch_size=2,
                              device_memory=(frozen + 4 * train) // 2, host_memory=frozen // 2)
    with harmony.Trainer(model, cross_entropy_tokens, nvme_dir=str(tmp_path), **kw) as t:
        for x, y in batches[:2]:
            t.step(x, y)
        assert t.plan is not None and Loc.NVME in t.plan.placement.w
        t.save(tmp_path / "ckpt")
    with harmony.Trainer(_lora(), cross_entropy_tokens, nvme_dir=str(tmp_path), **kw) as t:
        t.load(tmp_path / "ckpt")
        for x, y in batches[2:]:
            t.step(x, y)
        got = t.state_dict()
    want = _plain_peft(_lora(), batches)
    for k in want:
        assert torch.equal(got[k], want[k]), k
