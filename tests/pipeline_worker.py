"""One rank of a pipelined run, for tests/parallel/test_pipeline.py (forked, two per test).

``run(rank, ranks, port, out, **options)`` joins a gloo group on 127.0.0.1:port (or lets the
trainer start it from torchrun's environment variables when ``env_init``), trains the tiny
transformer of tests/models.py with dropout for ``steps`` steps on batches drawn from a seeded
generator, and writes ``out/rank<r>.pt``: the final ``state_dict()`` (collective: the whole
model), the losses, the traffic counters, the rank's lowered schedule and sizes and its stage.
``load`` resumes from a checkpoint (training on from its step count), ``save`` writes one at
the end (and exports the weights to ``save + "-export"``).
``frozen_shared`` trains instead a small MLP whose frozen layer is used twice.
With ``fail_at=(rank, n)`` that rank's second-to-last layer raises on its n-th call (or, with
``hang_s``, sleeps that long).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import harmony
from tests import copier
from tests.models import MODELS

MODEL = "transformer"
BATCH, MICRO = 6, 2


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [MODELS[MODEL][2](BATCH, g) for _ in range(steps)]


def make_model(dropout: float) -> nn.Module:
    return MODELS[MODEL][0](dropout)


def frozen_shared_model() -> nn.Sequential:
    """Six layers, the second and fourth one frozen Linear (the same module twice)."""
    torch.manual_seed(3)
    shared = nn.Linear(16, 16).requires_grad_(False)
    return nn.Sequential(nn.Linear(16, 16), shared, nn.Linear(16, 16), shared, nn.Tanh(),
                         nn.Linear(16, 4))


def frozen_shared_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 4, generator=g))
            for _ in range(steps)]


def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


class Boom(nn.Module):
    """Wraps a layer; its ``at_call``-th call raises, or sleeps ``hang_s`` seconds (profiling
    calls it too)."""

    def __init__(self, layer: nn.Module, at_call: int, hang_s: float) -> None:
        super().__init__()
        self.layer, self.calls, self.at_call, self.hang_s = layer, 0, at_call, hang_s

    def forward(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.at_call:
            if self.hang_s:
                time.sleep(self.hang_s)  # stuck, not dead: its peer must time out
            else:
                raise RuntimeError("injected failure")
        return self.layer(*args)


def run(rank: int, ranks: int, port: int, out: str, steps: int = 3, dropout: float = 0.1,
        device_memory: int | None = None, host_memory: int | None = None,
        stages: list[tuple[int, int]] | None = None,
        env_init: bool = False, fail_at: tuple[int, int] | None = None, hang_s: float = 0.0,
        timeout_s: float = 20.0, save: str | None = None, load: str | None = None,
        initial: bool = False, frozen_shared: bool = False) -> None:
    torch.set_num_threads(1)
    if env_init:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=ranks,
                                timeout=datetime.timedelta(seconds=timeout_s))
    model = frozen_shared_model() if frozen_shared else make_model(dropout)
    data = frozen_shared_batches(steps) if frozen_shared else batches(steps)
    if fail_at is not None and fail_at[0] == rank:
        layers = model.harmony_chain()
        layers[-2] = Boom(layers[-2], fail_at[1], hang_s)
        model.harmony_chain = lambda: layers
    loss_fn = nn.functional.mse_loss if frozen_shared else MODELS[MODEL][1]
    try:
        trainer = harmony.Trainer(model, loss_fn, optimizer=optimizer, micro_batch_size=MICRO,
                                  device_memory=device_memory, host_memory=host_memory,
                                  parallel="pipeline",
                                  stages=stages)
        if load is not None:
            trainer.load(load)
        before = trainer.state_dict() if initial else None  # (no packs are built yet)
        losses = [trainer.step(x, y) for x, y in data[trainer.step_count:]]
        state = trainer.state_dict()
        if save is not None:
            trainer.save(save)
            trainer.export(save + "-export")
        pipe = trainer.pipeline
        assert pipe is not None
        torch.save({"state": state, "before": before, "losses": losses, "steps": trainer.step_count,
                    "bytes": dict(trainer.stats.bytes_moved),
                    "by_kind": dict(trainer.stats.bytes_by_kind), "schedule": pipe.schedule,
                    "sizes": pipe.sizes, "stage": pipe.stage, "stages": pipe.stages,
                    "bounds": pipe.bounds, "placement": pipe.placement,
                    "copier": copier.used(trainer)},
                   Path(out) / f"rank{rank}.pt")
        trainer.close()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
