"""The bundled example: the GPT chain, exactness under swapping, the script, and learning."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmony

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import data_text  # noqa: E402
import train_gpt  # noqa: E402
from gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TINY = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_gpt(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def batches(n: int, batch_size: int, block_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [data_text.get_batch("train", batch_size, block_size, g) for _ in range(n)]


# -- the model ----------------------------------------------------------------------------------
def test_chain_equals_plain_forward():
    model = tiny_gpt()
    x, _ = batches(1, 3, TINY.block_size)[0]
    chain = model.harmony_chain()
    assert [type(m).__name__ for m in chain] == ["Embedding", "Block", "Block", "Head"]
    assert {id(p) for m in chain for p in m.parameters()} == {id(p) for p in model.parameters()}
    h = x
    for layer in chain:
        h = layer(h)
    assert h.shape == (3, TINY.block_size, TINY.vocab_size)
    assert torch.equal(h, model(x))


def test_attention_is_causal():
    model = tiny_gpt().eval()
    x, _ = batches(1, 2, TINY.block_size)[0]
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size  # only the future of position 9
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize(("field", "value", "names"), [
    ("n_layer", 0, "n_layer=0"), ("n_embd", 30, "n_embd=30"), ("dropout", 1.5, "dropout=1.5"),
    ("vocab_size", 2.0, "vocab_size=2.0")])
def test_config_names_the_wrong_value(field, value, names):
    with pytest.raises(ValueError, match=names):
        GPTConfig(**{"n_head": 4, "n_embd": 32, field: value})


def test_batches_are_deterministic_and_shifted():
    (x1, y1), = batches(1, 4, 8, seed=3)
    (x2, y2), = batches(1, 4, 8, seed=3)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (4, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    data = data_text.load()
    assert data.vocab_size == 65
    n = sum(len(t) for t in data.splits.values())
    assert len(data.splits["train"]) == int(0.9 * n)


# -- harmony against plain PyTorch ----------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["harmony", "per-microbatch"])
def test_swapped_training_equals_plain_accumulation(schedule):
    # Bitwise: in fp32 on the CPU, harmony runs the same kernels on the same micro-batches
    # (torch.split), weights each micro-batch's loss by n_m / N as the reference does, and
    # accumulates gradients in the same order; recompute replays the same deterministic
    # forward (dropout is 0). Pack boundaries only cut autograd's graph, which changes no value.
    def opt(ps):
        return torch.optim.AdamW(ps, lr=1e-2)

    model = tiny_gpt()
    reference = copy.deepcopy(model)
    steps = batches(3, 10, TINY.block_size)  # 10 = 4 + 4 + 2: an uneven last micro-batch
    state = model.num_params() * 16
    budget = 300_000  # well below the 482 kB training state, above one block's needs
    assert budget < state
    with harmony.Trainer(model, loss_fn, optimizer=opt, micro_batch_size=4,
                         device_memory=budget, schedule=schedule) as trainer:
        losses = [trainer.step(x, y) for x, y in steps]
        got = trainer.state_dict()
        assert trainer.plan is not None and len(trainer.plan.bounds) > 1
        assert trainer.stats.bytes_moved["host->device"] > 0  # packs really swapped
        assert trainer.stats.peak_bytes["device"] <= budget

    ref_opt = opt(list(reference.parameters()))
    ref_losses = []
    for x, y in steps:
        total = 0.0
        for xm, ym in zip(torch.split(x, 4), torch.split(y, 4)):
            loss = loss_fn(reference(xm), ym) * (xm.shape[0] / x.shape[0])
            loss.backward()
            total += loss.item()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(total)

    want = reference.state_dict()
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"weights differ from plain PyTorch: {differ}"
    assert losses == pytest.approx(ref_losses, rel=1e-6)


def test_dropout_gives_the_same_weights_under_every_schedule():
    # harmony seeds every layer call from (seed, step, micro-batch, layer), so the dropout masks
    # (nn.Dropout and the attention kernel's) match between a forward and its recompute and
    # across schedules and placements.
    config = dataclasses.replace(TINY, dropout=0.2)
    steps = batches(2, 8, config.block_size)
    results = {}
    for schedule, budget in [("harmony", 350_000), ("per-microbatch", 350_000),
                             ("resident", None)]:
        with harmony.Trainer(tiny_gpt(config), loss_fn, micro_batch_size=4, seed=7,
                             device_memory=budget, schedule=schedule) as trainer:
            for x, y in steps:
                trainer.step(x, y)
            results[schedule] = trainer.state_dict()
            assert (budget is None) == (trainer.stats.bytes_moved["host->device"] < 100_000)
    for schedule in ("per-microbatch", "resident"):
        differ = [k for k, v in results["harmony"].items()
                  if not torch.equal(v, results[schedule][k])]
        assert not differ, f"{schedule} differs from harmony: {differ}"


def test_loss_falls_over_30_steps():
    model = tiny_gpt()
    with harmony.Trainer(model, loss_fn, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                         micro_batch_size=4, device_memory=300_000) as trainer:
        losses = [trainer.step(x, y) for x, y in batches(30, 16, TINY.block_size, seed=1)]
        assert trainer.stats.bytes_moved["host->device"] > 0
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.0  # about ln(65) = 4.17 from a random start
    assert last < first - 0.5, losses  # 4.02 -> 3.14 when written


# -- the script -------------------------------------------------------------------------------
TINY_ARGS = ["--steps", "3", "--batch-size", "8", "--micro-batch-size", "4", "--n-layer", "2",
             "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--eval-every", "2",
             "--eval-batches", "1", "--sample-chars", "20", "--plot", ""]


def run_script(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(EXAMPLES / "train_gpt.py"), *args],
                          capture_output=True, text=True, env=environ, timeout=120)


def test_script_trains_and_prints_plan_and_loss(tmp_path):
    png = tmp_path / "loss.png"
    done = run_script([*TINY_ARGS, "--plot", str(png)])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # A third of this tiny model's 471 KiB state cannot hold a block's activations: the script
    # says so and takes the least budget any plan needs, still far below the state.
    assert "a third of the training state (157.00KiB) leaves no room" in out
    assert "training state 471.00KiB" in out and "vs device budget 262.50KiB" in out
    assert "plan: schedule harmony, 4 packs" in out and "at host" in out  # packs swap
    assert "step 1: loss 4.1" in out and "step 2: train loss" in out
    assert "final: train loss" in out and "val loss" in out
    assert "bytes moved per step: device->host" in out
    assert "sample:" in out
    if "matplotlib is not installed" not in out:
        assert png.stat().st_size > 1000  # the loss curve


# The refusals run main() in this process: no interpreter start, same code path.
def test_script_refuses_a_budget_it_was_given_that_cannot_work():
    with pytest.raises(SystemExit) as exit_:
        train_gpt.main([*TINY_ARGS, "--device-memory", "200KB"])
    message = str(exit_.value.code)
    assert "device_memory=195.31KiB is too small at micro_batch_size=4" in message
    assert "Use device_memory>=262.50KiB" in message


def test_script_refuses_more_ranks_than_samples(monkeypatch):
    for name, value in {"WORLD_SIZE": "16", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        train_gpt.main(TINY_ARGS)
    assert "--batch-size 8 leaves some of the 16 ranks without samples" in str(exit_.value.code)


def test_script_trains_data_parallel(tmp_path):
    """Two ranks (fork server, gloo, torchrun's variables) train on halves of the same batches and
    end where one process ends, up to rounding; only rank 0 prints."""
    from tests.dp_worker import fork_ranks

    codes = fork_ranks(_train_rank, (tmp_path,), tmp_path, world=2, timeout=90)
    logs = [(tmp_path / f"log{r}").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    one = train_gpt.main(TINY_ARGS)
    for r in range(2):
        got = torch.load(tmp_path / f"result{r}.pt")
        assert got == pytest.approx(one, rel=1e-5), (r, got, one)
    assert "bytes moved per step (rank 0): allreduce" in logs[0]
    assert "final: train loss" in logs[0] and "final:" not in logs[1]


def _train_rank(rank: int, out: Path) -> None:
    torch.save(train_gpt.main(TINY_ARGS), out / f"result{rank}.pt")
