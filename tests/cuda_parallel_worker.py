"""One rank of a two-GPU NCCL run, for tests/parallel/test_cuda_parallel.py (started as a new
process per rank, with torchrun's variables set, so CUDA starts fresh in each; ``torchrun
--nproc_per_node=2 -m tests.cuda_parallel_worker --mode data --out DIR`` runs it too).

``--mode data``: each rank trains the tiny transformer of tests/models.py on its half of every
global batch (parallel="data"). ``--mode pipeline``: the two ranks are the two stages of one
model (parallel="pipeline"). Either way the rank writes ``OUT/rank<r>.pt``: the final
``state_dict()``, the losses and its device.
"""

from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path

import torch

import harmony
from tests.models import MODELS

MODEL, BATCH, MICRO, STEPS = "transformer", 8, 2, 3


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [MODELS[MODEL][2](BATCH, g) for _ in range(STEPS)]


def optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def trainer(parallel: str | None, device: str = "cuda") -> harmony.Trainer:
    factory, loss_fn, _ = MODELS[MODEL]
    return harmony.Trainer(factory(0.1), loss_fn, optimizer=optimizer, micro_batch_size=MICRO,
                           device=device, parallel=parallel)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["data", "pipeline"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.out)
    try:
        losses = []
        with trainer(args.mode) as t:
            for x, y in batches():
                if args.mode == "data":  # this rank's half of the global batch
                    half = BATCH // world
                    x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
                losses.append(t.step(x, y))
            state = t.state_dict()  # (collective with pipeline stages)
            torch.save({"state": state, "losses": losses, "device": str(t.device),
                        "current": torch.cuda.current_device()}, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
