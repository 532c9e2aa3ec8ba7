"""examples/bench_gpu.py on CPU with a tiny model: its arguments, its rows and the report it
writes (the GPU run itself is `.ci/gpu`'s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import bench_gpu

TINY = ["--model", "gpt-tiny", "--seq-len", "16", "--batch-size", "4", "--micro-batch-size", "2",
        "--device", "cpu", "--steps", "1"]


def test_the_report_has_every_row_and_the_numbers(tmp_path: Path) -> None:
    report = tmp_path / "bench.md"
    assert bench_gpu.main([*TINY, "--report", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("## GPU benchmark\n")
    assert "python examples/bench_gpu.py --model gpt-tiny" in text  # the command beside it
    assert "Model `gpt-tiny`: 30.08K parameters" in text
    assert "device budget 132.19KiB (25% of it)" in text  # 18 B/param of bf16 training state
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| run")}
    assert set(rows) == set(bench_gpu.TITLES.values())
    assert "packs" in rows["harmony"]
    float(rows["harmony"].split(" | ")[1])  # seconds per step
    assert "(accounted " in rows["harmony"]
    assert float(rows["plain PyTorch"].split(" | ")[2]) > 0  # tokens/s
    for ds in ("DeepSpeed ZeRO-Offload (stage 2, CPU)",
               "DeepSpeed ZeRO-3 (params + optimizer on CPU)"):
        assert "| skipped |" in rows[ds] and ("GPU only" in rows[ds] or "not installed" in rows[ds])
    assert "Losses per step (warm-up first): harmony " in text


def test_rows_start_from_the_same_weights(tmp_path: Path) -> None:
    """Both rows train the same initial model on the same batches: their first losses (before
    any update) agree up to bf16 rounding."""
    args = bench_gpu.parse_args([*TINY, "--report", str(tmp_path / "r.md"), "--steps", "1",
                                 "--warmup", "0"])
    budget = bench_gpu.device_budget(args, bench_gpu.parameter_count("gpt-tiny", 16))
    h = bench_gpu.run_variant("harmony", args, budget)
    p = bench_gpu.run_variant("pytorch", args, budget)
    assert h["status"] == p["status"] == "ok"
    assert h["losses"][0] == pytest.approx(p["losses"][0], rel=2e-2)


def test_a_row_that_fails_is_reported_and_the_others_run(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> dict:
        raise RuntimeError("CUDA error: out of resources")

    monkeypatch.setattr(bench_gpu, "run_pytorch", broken)
    report = tmp_path / "bench.md"
    bench_gpu.main([*TINY, "--report", str(report), "--variants", "pytorch,harmony"])
    text = report.read_text()
    assert "| plain PyTorch | failed |" in text and "out of resources" in text
    assert "| harmony | " in text and "| harmony | failed" not in text


def test_rows_that_no_longer_fit_the_time_limit_are_not_run(tmp_path: Path) -> None:
    report = tmp_path / "bench.md"
    bench_gpu.main([*TINY, "--report", str(report), "--time-limit", "10"])
    assert report.read_text().count("| not run |") == 4


def test_without_deepspeed_its_rows_say_so(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    args = bench_gpu.parse_args([*TINY, "--report", str(tmp_path / "r.md")])
    row = bench_gpu.run_variant("zero-offload", args, 1 << 20)
    assert row["status"] == "skipped" and "DeepSpeed is not installed" in row["why"]


def test_deepspeed_configuration() -> None:
    args = bench_gpu.parse_args([*TINY, "--report", "r.md", "--batch-size", "8"])
    budget = 8 << 20
    z2 = bench_gpu.ds_config(args, 2, budget, cpu_adam=True)
    assert z2["gradient_accumulation_steps"] == 4 and z2["bf16"] == {"enabled": True}
    assert z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in z2["zero_optimization"]
    assert z2["optimizer"]["type"] == "AdamW" and z2["zero_force_ds_cpu_optimizer"]
    z3 = bench_gpu.ds_config(args, 3, budget, cpu_adam=False)
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_max_live_parameters"] == budget // 4 // 2
    assert "optimizer" not in z3 and not z3["zero_force_ds_cpu_optimizer"]  # a torch AdamW


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "5"], "not a multiple of --micro-batch-size=2"),
    (["--variants", "harmony,megatron"], "choose from"),
    (["--device-fraction", "0"], "must be in"),
    (["--seq-len", "2048", "--model", "gpt2"], "longer than gpt2's 1024 positions"),
    (["--device-memory", "lots"], "is not a size"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_gpu.parse_args([*TINY, "--report", "r.md", *argv])
    assert message in capsys.readouterr().err


def test_cuda_is_refused_where_there_is_none(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--report", "r.md"])
    assert "CUDA is not available; use --device cpu" in capsys.readouterr().err
