"""The Harmony paper's measured GPU profiles of GPT-2 models, as harmony layer profiles.

The authors of Harmony (VLDB 2022) profiled GPT-2 medium, XL and a 10B-parameter GPT-2 layer by
layer on GTX 1080 Ti GPUs (fp32, sequence length 1024, untied LM head); the JSON conversions
live in ``examples/data/profiles/`` (see the README there for every field). Loading one at a
micro-batch size gives :class:`~harmony.planning.profile.LayerProfile` values a planner and
simulator take as they take a profile harmony measured, so plans for a GPU server (a 10 GiB device,
PCIe at 11.5 GiB/s each way, batch 32) can be computed and checked on a machine without one.

How the paper's fields map, at micro-batch size ``u`` (LayerProfile values are per sample):

| LayerProfile | from the paper's layer ``l`` |
|---|---|
| ``w_bytes`` | ``W + B`` (parameters and buffers move together) |
| ``g_bytes`` | ``W`` |
| ``in_bytes`` | ``X[u] / u`` (``in_grad_bytes``: the same, 0 for the token ids of layer 0) |
| ``out_bytes`` | ``X[u]`` of layer ``l + 1`` / ``u``; the loss layer's output is a 4-byte scalar |
| ``saved_bytes`` | ``mem_bwd[u] - (W + B) - W - 2 X[u] - 3 out[u]``, at least 0, / ``u`` (*) |
| ``fwd_s``, ``bwd_s`` | ``t_fwd_gpu[u] / u``, ``t_bwd_gpu_incl_recompute[u] / u`` |
| ``fwd_group_s`` | ``t_fwd_gpu[v] / v`` at ``v = min(2u, largest profiled)`` (``group_samples``) |

(*) so that a one-layer pack's simulated backward peak (weights, gradients, input and its
gradient, output gradient, working bytes ``saved + 2 out``) equals the measured ``mem_bwd``.

The optimizer-state ratio is ``sum K / sum W`` (2.0: Adam) and the update speed is
``sum t_upd_cpu / sum W`` seconds per gradient byte. Micro-batch sizes between two profiled ones
are interpolated linearly; sizes beyond the profiled range are refused. The profiles say
nothing about randomness or batch statistics, so every layer counts as able to run a forward
over several micro-batches at once (``no_group`` empty), as the paper's system ran them.

>>> prof = load("gpt2_medium", micro_batch_size=2)
>>> len(prof.layers), prof.layers[1].name, prof.k_ratio
(28, 'blocks.0', 2.0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harmony.planning.meta import ModelProfile
from harmony.planning.profile import LayerProfile

PROFILE_DIR = Path(__file__).resolve().parents[2] / "examples" / "data" / "profiles"
PAPER_MODELS = {"gpt2_medium": "profile_gpt2_medium.json", "gpt2_xl": "profile_gpt2_xl.json",
                "gpt2_10b": "profile_gpt2_10b.json"}
SEQ_LEN = 1024


def _path(name: str) -> Path:
    key = name.replace("-", "_")
    if key in PAPER_MODELS:
        return PROFILE_DIR / PAPER_MODELS[key]
    if name.endswith(".json"):
        return Path(name)
    raise ValueError(f"unknown paper profile {name!r}; choose one of "
                     f"{', '.join('paper:' + k for k in PAPER_MODELS)} or give paper:FILE.json")


def _at(table: dict[str, float], u: int, what: str, model: str) -> float:
    """``table`` (keyed by micro-batch size) at ``u``: exact, interpolated, or refused."""
    sizes = sorted(int(k) for k in table)
    if u in sizes:
        return float(table[str(u)])
    lo = max((s for s in sizes if s < u), default=None)
    hi = min((s for s in sizes if s > u), default=None)
    if lo is None or hi is None:
        raise ValueError(f"{model} was profiled at micro-batch sizes {sizes[0]}..{sizes[-1]} "
                         f"for {what}; micro_batch_size={u} is outside that range: use "
                         f"--micro-batch-size between {sizes[0]} and {sizes[-1]}")
    a, b = float(table[str(lo)]), float(table[str(hi)])
    return a + (b - a) * (u - lo) / (hi - lo)


def load(name: str, micro_batch_size: int) -> ModelProfile:
    """The paper's profile ``name`` (``gpt2_medium``, ``gpt2_xl``, ``gpt2_10b`` or a JSON path)
    at ``micro_batch_size`` samples per micro-batch.

    Raises:
        ValueError: an unknown name, or a micro-batch size outside the profiled range (the
            message gives the range).
        FileNotFoundError: the JSON file is missing.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) \
            or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int")
    path = _path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no profile file {path}: the paper's profiles ship in the repository's "
            "examples/data/profiles/; from an installed package give paper:PATH/TO/FILE.json")
    data: dict[str, Any] = json.loads(path.read_text())
    model, u = str(data.get("model", name)), micro_batch_size
    raw = data["layers"]
    R = len(raw)
    x = [_at(lay["X"], u, "activations", model) for lay in raw]
    # The forward of a group of micro-batches: timed at twice the samples where profiled.
    fwd_sizes = [int(k) for k in raw[0]["t_fwd_gpu"]]
    big = min(2 * u, max(fwd_sizes))
    layers, params = [], []
    for i, lay in enumerate(raw):
        w_bytes, g_bytes = int(lay["W"]) + int(lay["B"]), int(lay["W"])
        out = x[i + 1] if i + 1 < R else 4.0  # the loss is a scalar
        mem_bwd = _at(lay["mem_bwd"], u, "backward", model)
        saved = max(0.0, mem_bwd - w_bytes - g_bytes - 2 * x[i] - 3 * out)
        layers.append(LayerProfile(
            name=_layer_name(i, R), w_bytes=w_bytes, g_bytes=g_bytes, in_bytes=x[i] / u,
            in_grad_bytes=0.0 if i == 0 else x[i] / u, saved_bytes=saved / u,
            out_bytes=out / u, fwd_s=_at(lay["t_fwd_gpu"], u, "forward", model) / u,
            bwd_s=_at(lay["t_bwd_gpu_incl_recompute"], u, "backward", model) / u,
            samples=u, fwd_group_s=_at(lay["t_fwd_gpu"], big, "forward", model) / big
            if big > u else None, group_samples=big if big > u else 0))
        params.append(int(lay["W"]) // 4)  # fp32
    total_w = sum(int(lay["W"]) for lay in raw)
    k_ratio = sum(int(lay["K"]) for lay in raw) / total_w
    upd = sum(float(lay["t_upd_cpu"]) for lay in raw) / total_w
    return ModelProfile(f"paper:{model}", f"Harmony paper, GTX 1080 Ti ({path.name})", layers,
                        params, u, k_ratio, upd, SEQ_LEN,
                        extra={"mem_fwd": [_at(lay["mem_fwd"], u, "forward", model)
                                           for lay in raw],
                               "mem_bwd": [_at(lay["mem_bwd"], u, "backward", model)
                                           for lay in raw]})


def _layer_name(i: int, layers: int) -> str:
    """embedding, blocks, final LayerNorm, LM head, loss (the paper's cut)."""
    if i == 0:
        return "embed"
    tail = {layers - 3: "ln_f", layers - 2: "lm_head", layers - 1: "loss"}
    return tail.get(i, f"blocks.{i - 1}")

