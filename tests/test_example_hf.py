"""examples/finetune_hf.py runs end to end: trains, plots, exports a loadable folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
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
