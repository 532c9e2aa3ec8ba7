"""What the benchmark scripts share: the example GPT's flags, batches and plain-PyTorch step."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from gpt import GPT, GPTConfig, loss_fn

import harmony
from swap.tier import fmt_bytes

Step = Callable[[torch.Tensor, torch.Tensor], None]


def add_gpt_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The model, batch and thread flags every benchmark takes (defaults: the example GPT)."""
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=1)


def gpt_config(args: argparse.Namespace, n_layer: int | None = None) -> GPTConfig:
    return GPTConfig(vocab_size=65, block_size=args.block_size,
                     n_layer=args.n_layer if n_layer is None else n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)


def batches(cfg: GPTConfig, n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of ``size`` random token sequences and their next-token targets."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (size, cfg.block_size), generator=g)
        out.append((x, torch.roll(x, -1, dims=1)))
    return out


def plain_step(cfg: GPTConfig, micro_batch_size: int) -> Step:
    """Plain PyTorch gradient accumulation over ``torch.split`` micro-batches, then AdamW."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        for xm, ym in zip(x.split(micro_batch_size), y.split(micro_batch_size)):
            (loss_fn(model(xm), ym) * (xm.shape[0] / x.shape[0])).backward()
        opt.step()
        opt.zero_grad()
    return step


def stepped(make: Callable[[int], harmony.Trainer], budget: int,
            batch: tuple[torch.Tensor, torch.Tensor], name: str) -> harmony.Trainer:
    """A trainer ``make(budget)`` after its first step on ``batch`` (it profiles and plans).

    A device budget sized from the training state (a third of it, say) leaves no room for
    the activations of a small model, whose activations outweigh its weights: then the
    trainer is made again with the least device budget any plan needs
    (``InfeasiblePlan.device_needed``), and a line on stderr naming ``name`` says so.

    Args:
        make: builds a trainer for a device budget in bytes.
        budget: the device budget to try first.
        batch: ``(inputs, targets)`` of the first step.
        name: the benchmark row, for the line.

    Returns:
        The trainer, one step taken.

    Raises:
        harmony.InfeasiblePlan: no device budget makes a plan fit (another budget is short).

    Example::

        t = stepped(lambda b: harmony.Trainer(GPT(cfg), loss_fn, device_memory=b),
                    state // 3, data[0], "harmony, budget 1/3")
    """
    trainer = make(budget)
    try:
        trainer.step(*batch)
        return trainer
    except harmony.InfeasiblePlan as err:
        trainer.close()
        if err.device_needed <= budget:  # the device is not what is short
            raise
        print(f"{name}: a device budget of {fmt_bytes(budget)} leaves no room for the "
              f"activations; using {fmt_bytes(err.device_needed)}, the least any plan needs",
              file=sys.stderr)  # (stdout holds the table)
        trainer = make(err.device_needed)
        trainer.step(*batch)
        return trainer
