"""Where a report's per-layer profile comes from: a model built on the meta device and profiled
there, a model built for real and measured on the CPU, the Harmony paper's GPU profiles, or a
profile file a report or ``ModelProfile.to_json`` wrote.

>>> prof = load_profile("paper:gpt2_medium", 4)
>>> prof.micro_batch_size
4
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harmony.model.chain import Chain
from harmony.model.layout import Layout
from harmony.model.precision import Precision
from harmony.planning.lora import add_lora
from harmony.planning.meta import GPU_FLOPS, ModelProfile, ModelSpec, profile_on_meta
from harmony.planning.profile import profile_layers
from harmony.tools import builtin_models, paper_profiles

__all__ = ["load_profile", "load_spec", "measure_profile"]


def _default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


def load_spec(ref: str, seq_len: int | None = None) -> ModelSpec:
    """The model named by ``ref``, built on the current default device.

    ``ref`` is a built-in name (:data:`harmony.tools.builtin_models.BUILTINS`) or
    ``path/to/file.py:function``. The function is called as ``function(seq_len=T)`` when a
    sequence length is given (else ``function()``) and returns one of:

    * a :class:`~harmony.planning.meta.ModelSpec`;
    * a tuple ``(model, loss_fn, example_inputs)``, where ``example_inputs(n)`` returns
      ``(inputs, targets)`` for a micro-batch of ``n`` samples (inputs: a tensor or a tuple);
    * a model alone, which then has a method ``harmony_example(n)`` returning the same and may
      have ``harmony_loss(output, target)`` (default: cross entropy over the last dimension).

    The model must be a chain harmony can split (``nn.Sequential``, a list, or
    ``harmony_chain()``). Build it and its inputs on the default device (no ``.to("cpu")``,
    no ``device=`` arguments), so that under ``torch.device("meta")`` nothing is allocated.

    Raises:
        ValueError: an unknown name, a missing file or function, or a result of another shape.
    """
    if ":" not in ref or ref in builtin_models.BUILTINS:
        return builtin_models.build(ref, seq_len)
    path_text, func_name = ref.rsplit(":", 1)
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"model {ref!r}: no file {path_text!r}; give a built-in name "
                         f"({', '.join(builtin_models.BUILTINS)}), paper:NAME, or "
                         "path/to/file.py:function")
    mod_spec = importlib.util.spec_from_file_location(f"_harmony_model_{path.stem}", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    with _on_path(path.resolve().parent):
        mod_spec.loader.exec_module(module)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"model {ref!r}: {path_text} has no function {func_name!r}")
    kwargs: dict[str, Any] = {}
    if seq_len is not None:
        params = inspect.signature(func).parameters
        if "seq_len" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"--seq-len {seq_len} given but {func_name}() takes no seq_len "
                             "argument; add one or leave --seq-len out")
        kwargs["seq_len"] = seq_len
    result = func(**kwargs)
    name = f"{path.name}:{func_name}"
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module):
        model, loss_fn, example = result
        for what, value in (("loss_fn", loss_fn), ("example_inputs", example)):
            if not callable(value):  # (a batch itself in place of the function, say)
                raise ValueError(f"{name} returned a {type(value).__name__} as {what}; "
                                 "return (model, loss_fn, example_inputs) where loss_fn(output, "
                                 "target) gives the loss and example_inputs(n) gives (inputs, "
                                 "targets) for n samples")
        return ModelSpec(name, model, loss_fn, example, seq_len)
    if isinstance(result, nn.Module):
        example = getattr(result, "harmony_example", None)
        if not callable(example):
            raise ValueError(f"{name} returned a bare {type(result).__name__} without a "
                             "harmony_example(n) method; return (model, loss_fn, "
                             "example_inputs) instead, or add the method")
        return ModelSpec(name, result, getattr(result, "harmony_loss", _default_loss), example,
                         seq_len)
    raise ValueError(f"{name} returned a {type(result).__name__}; return (model, loss_fn, "
                     "example_inputs), a harmony.planning.meta.ModelSpec, or a model with "
                     "harmony_example(n)")


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))  # so the file can import its neighbours
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def load_profile(model: str, micro_batch_size: int, seq_len: int | None = None,
                 device_flops: float = GPU_FLOPS, precision: str = "fp32",
                 lora: int | None = None) -> ModelProfile:
    """The profile of ``model`` at ``micro_batch_size``, without allocating the model.

    ``model``: ``paper:NAME`` (the paper's measured profiles), a ``.json`` file written by
    ``harmony report ... --run FILE`` or ``--json FILE`` or by :meth:`ModelProfile.to_json`, or
    anything
    :func:`load_spec` takes (built on the meta device and profiled there). ``precision``
    (``"fp32"``, ``"bf16"``, ``"fp16"``): the dtypes W, G and activations are profiled in;
    profiles from files keep the precision they were made in, which must match. ``lora``: the
    rank of LoRA adapters added to every ``nn.Linear`` of the blocks, everything else frozen
    (:func:`harmony.planning.lora.add_lora`): frozen layers count as weights only.

    Raises:
        ValueError: as :func:`load_spec` and :func:`harmony.tools.paper_profiles.load`; an unknown
            precision, or a profile file made in another precision; ``lora`` with a profile
            file, or without ``peft`` installed.
    """
    Precision.parse(precision)  # ValueError naming the choices
    if model.startswith("paper:") or model.endswith(".json"):
        if lora is not None:
            raise ValueError(f"--lora {lora} adds adapters to a model harmony builds; {model} "
                             "is a profile already: give a built-in name or "
                             "path/to/file.py:function")
        prof = _load_profile_file(model, micro_batch_size, seq_len)
        if prof.precision != precision:
            raise ValueError(f"{model} was profiled in {prof.precision}, not {precision}; "
                             f"pass --precision {prof.precision}, or profile the model itself "
                             f"in {precision}")
        return prof
    with torch.device("meta"):
        spec = load_spec(model, seq_len)
        if lora is not None:
            adapted = add_lora(spec.model, lora, Chain(spec.model).layers)
    prof = profile_on_meta(spec, micro_batch_size, device_flops, precision=precision)
    if lora is not None:
        trainable = sum(p.numel() for p in spec.model.parameters() if p.requires_grad)
        prof.extra["lora"] = {"r": lora, "adapted_linears": adapted, "trainable": trainable}
    return prof


def _load_profile_file(model: str, micro_batch_size: int, seq_len: int | None) -> ModelProfile:
    if model.startswith("paper:"):
        if seq_len not in (None, paper_profiles.SEQ_LEN):
            raise ValueError(f"paper profiles are measured at seq_len={paper_profiles.SEQ_LEN};"
                             f" leave --seq-len out (got {seq_len})")
        return paper_profiles.load(model[len("paper:"):], micro_batch_size)
    if model.endswith(".json"):
        data = json.loads(Path(model).read_text())
        if data.get("format") == "harmony-report/1":  # a --json report carries its profile
            data = data["profile"]
        prof = ModelProfile.from_json(data)
        if prof.micro_batch_size != micro_batch_size:  # per-sample values scale linearly
            prof.extra["profiled_micro_batch_size"] = prof.micro_batch_size
            prof.micro_batch_size = micro_batch_size
        return prof
    raise ValueError(f"{model!r} is not a profile file")


def measure_profile(model: str, micro_batch_size: int, seq_len: int | None = None,
                    precision: str = "fp32", lora: int | None = None) -> ModelProfile:
    """Build ``model`` for real on the CPU and measure every layer with
    :func:`harmony.planning.profile.profile_layers` (this allocates the whole model), in
    ``precision`` (W in its dtypes, layers under autocast), on one micro-batch; a second one checks
    each layer for forward groups and times them. ``lora``: as :func:`load_profile`."""
    prec = Precision.parse(precision)
    if model.startswith("paper:") or model.endswith(".json"):
        raise ValueError(f"--run measures a model by running it; {model!r} is a profile "
                         "already. Give a built-in name or path/to/file.py:function")
    torch.manual_seed(0)
    spec = load_spec(model, seq_len)
    if lora is not None:
        add_lora(spec.model, lora, Chain(spec.model).layers)
    chain = Chain(spec.model)
    inputs, targets = spec.example_inputs(2 * micro_batch_size)
    both = inputs if isinstance(inputs, tuple) else (inputs,)
    u = micro_batch_size
    # (copies: a tensor saved for backward counts its whole storage, not a half's view of it)
    layers = profile_layers(chain, [Layout([m], prec.dtype_of) for m in chain.layers],
                            tuple(t[:u].clone() for t in both), targets[:u].clone(),
                            spec.loss_fn, torch.device("cpu"), prec,
                            group_inputs=tuple(t[u:].clone() for t in both))
    params = [sum(p.numel() for p in m.parameters()) for m in chain.layers]
    return ModelProfile(spec.name, "measured on cpu (harmony.planning.profile.profile_layers)",
                        layers, params, micro_batch_size, seq_len=spec.seq_len, precision=precision)
