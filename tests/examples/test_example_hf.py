"""examples/finetune_hf.py runs end to end: trains, plots, exports a loadable folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import finetune_hf  # noqa: E402


@pytest.mark.parametrize("model", ["llama", "opt", "gpt2"])  # gpt2: a tied LM head
def test_finetune_hf_trains_plots_and_exports(tmp_path: Path, model: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    png, out = tmp_path / "loss.png", tmp_path / "export"
    finetune_hf.main(["--model", model, "--steps", "4", "--batch-size", "4",
                      "--block-size", "16", "--plot", str(png), "--export", str(out)])
    text = capsys.readouterr().out
    assert "pack 0" in text and "steps in" in text
    if "matplotlib is not installed" not in text:
        assert png.stat().st_size > 1000
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in loaded.parameters()) > 0
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    if model == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_unknown_model_is_refused() -> None:
    with pytest.raises(SystemExit, match="neither a preset"):
        finetune_hf.main(["--model", "no-such-model"])


def test_finetune_hf_lora_from_a_config_folder_on_a_text_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A family without a preset (Phi-3), given as a folder holding its config.json, trained
    with LoRA on a text file of one's own; the adapter exported as peft saves it."""
    peft = pytest.importorskip("peft")
    folder = tmp_path / "phi3"
    folder.mkdir()
    config = transformers.Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=128,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    text = tmp_path / "notes.txt"
    text.write_text("harmony trains models larger than device memory. " * 40)
    out = tmp_path / "adapter"
    finetune_hf.main(["--model", str(folder), "--text", str(text), "--lora", "4",
                      "--steps", "3", "--batch-size", "4", "--block-size", "16",
                      "--plot", "", "--export", str(out)])
    printed = capsys.readouterr().out
    assert "LoRA r=4" in printed and "adapter written to" in printed
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    base = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(folder))
    loaded = peft.PeftModel.from_pretrained(base, out)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in loaded.state_dict().items())
