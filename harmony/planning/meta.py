"""Per-layer sizes and times of a model built on the meta device: planning without allocation.

A model built under ``with torch.device("meta"):`` has parameters with shapes and dtypes but no
storage, and every operation on meta tensors computes only the shapes of its results. Running
each layer of the chain once on a meta micro-batch therefore gives, for free, exactly what
:func:`harmony.planning.profile.profile_layers` measures by running it for real: the flat weight and
gradient bytes (the same :class:`~harmony.model.layout.Layout`), the bytes of the layer's input,
output and input gradient, and the bytes autograd saves for backward. A 70B-parameter model is
profiled in seconds in a few hundred MiB of memory.

Times cannot be measured on meta tensors; they are estimated from the floating-point operations
:class:`torch.utils.flop_counter.FlopCounterMode` counts (matrix multiplications and attention),
divided by the device's sustained FLOP/s (``device_flops``). Element-wise and memory-bound work
is not counted, so the estimate is a lower bound on the layer's time.

Attention: on meta tensors ``F.scaled_dot_product_attention`` falls back to the unfused math
path, which would save the [T, T] attention matrix for backward. Real runs pick a fused kernel
(flash attention on CPU and on recent GPUs) that saves only q, k, v, the output and the
log-sum-exp, so the profile routes such calls to the fused kernel's meta implementation, and
the saved bytes match a real run on CPU.

Whether a layer may run one forward over several micro-batches at once (a forward group) cannot
be measured on meta tensors either; the meta profile tells what the shapes and the operators
show (:class:`SampleMixing`): a layer whose forward runs a random operator (dropout) or batch
norm in training mode, or passes a tensor without the samples along dim 0, cannot group.

>>> from harmony.tools.builtin_models import build
>>> with torch.device("meta"):
...     spec = build("gpt-tiny")
>>> prof = profile_on_meta(spec, micro_batch_size=2)
>>> [lp.name for lp in prof.layers]
['embed', 'blocks.0', 'blocks.1', 'head']
>>> prof.layers[1].in_bytes  # per sample: [16 tokens, 32 channels] fp32
2048.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from harmony.model.chain import Chain, as_tuple, call
from harmony.model.layout import Layout
from harmony.model.precision import Precision
from harmony.planning.profile import LayerProfile, backward_saved_bytes

GPU_FLOPS = 100e12   # default: a data-centre GPU's sustained dense FLOP/s
CPU_FLOPS = 165e9    # fp32 matmul FLOP/s measured on the 2-core development machine

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class ModelSpec:
    """A model and what it takes to run one micro-batch of it.

    Args:
        name: shown in reports.
        model: a chain harmony can split (``nn.Sequential``, list, or ``harmony_chain()``).
        loss_fn: ``(output, target) -> scalar`` mean loss of one micro-batch.
        example_inputs: ``n -> (inputs, targets)`` for a micro-batch of ``n`` samples, created
            on the current default device (so under ``torch.device("meta")`` they are meta).
        seq_len: tokens per sample, when the model has sequences (shown in reports).
    """

    name: str
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    example_inputs: Callable[[int], tuple[Inputs, torch.Tensor]]
    seq_len: int | None = None


@dataclass
class ModelProfile:
    """A model's per-layer profile at one micro-batch size, plus what the planner needs besides.

    Attributes:
        name, source: what was profiled and how (meta estimate, measurement, paper profile).
        layers: one :class:`~harmony.planning.profile.LayerProfile` per layer of the chain.
        params: parameters per layer. micro_batch_size: the samples it was profiled at.
        k_ratio: optimizer-state bytes per gradient byte (2.0 for Adam(W) in fp32).
        upd_s_per_byte: seconds per gradient byte of the optimizer update where K lives.
        precision: what W, G and activation bytes were profiled in (``"fp32"``, ``"bf16"``,
            ``"fp16"``); in mixed precision K also holds fp32 masters (see ``k_total``).
    """

    name: str
    source: str
    layers: list[LayerProfile]
    params: list[int]
    micro_batch_size: int
    k_ratio: float = 2.0
    upd_s_per_byte: float = 1e-9
    seq_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def names(self) -> list[str]:
        return [lp.name for lp in self.layers]

    @property
    def k_total(self) -> float:
        """K bytes per G byte: optimizer state, plus the fp32 masters in mixed precision."""
        return Precision.parse(self.precision).k_ratio(self.k_ratio)

    def to_json(self) -> dict[str, Any]:
        return {"format": "harmony-profile/1", "name": self.name, "source": self.source,
                "micro_batch_size": self.micro_batch_size, "k_ratio": self.k_ratio,
                "upd_s_per_byte": self.upd_s_per_byte, "seq_len": self.seq_len,
                "params": self.params, "layers": [asdict(lp) for lp in self.layers],
                "extra": self.extra, "precision": self.precision}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelProfile:
        """Inverse of :meth:`to_json`; raises ValueError on another format."""
        if data.get("format") != "harmony-profile/1":
            raise ValueError(f"not a harmony profile (format={data.get('format')!r}); expected "
                             "a file written by `harmony report ... --run FILE`")
        return ModelProfile(data["name"], data["source"],
                            [_layer(lp) for lp in data["layers"]], list(data["params"]),
                            int(data["micro_batch_size"]), float(data["k_ratio"]),
                            float(data["upd_s_per_byte"]), data.get("seq_len"),
                            dict(data.get("extra", {})), str(data.get("precision", "fp32")))


def _layer(data: dict[str, Any]) -> LayerProfile:
    """A :class:`LayerProfile` from its JSON form (the per-parameter sizes as tuples)."""
    return LayerProfile(**{**data, "params": [tuple(p) for p in data.get("params", [])]})


class FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` on meta tensors to the fused (flash) kernel.

    Only calls the fused kernel takes as they are (no mask, no dropout, same head counts) are
    routed; anything else runs as written. Calls made inside another torch function (such as
    ``nn.MultiheadAttention``'s ``F.multi_head_attention_forward``) are not seen by the mode and
    keep the math path, which overestimates their saved bytes.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                     "enable_gqa")
            a = {**dict(zip(names, args)), **kwargs}
            q, k, v = a["query"], a["key"], a["value"]
            if (q.is_meta and q.dim() == 4 and a.get("attn_mask") is None
                    and not a.get("dropout_p") and q.shape[1] == k.shape[1] == v.shape[1]):
                out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, bool(a.get("is_causal", False)), scale=a.get("scale"))
                return out
        return func(*args, **kwargs)


def _flash_fwd(q: Any, k: Any, v: Any, *args: Any, out_val: Any = None, **kw: Any) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _flash_bwd(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_val: Any = None,
               **kw: Any) -> int:
    return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of matrix multiplications and attention run under it (``.flops``).

    Uses torch's FLOP formulas (``torch.utils.flop_counter``) but, unlike ``FlopCounterMode``,
    never decomposes an operator into its Python reference, which makes counting a meta run
    about ten times faster; every operator torch has a formula for is an ATen kernel reached
    as is. The fused CPU attention kernel, which has no formula in torch, counts like the CUDA
    ones.
    """

    _extra: ClassVar[dict[Any, Callable[..., int]]] = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_fwd,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_bwd}

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula: Callable[..., int] | None = self._extra.get(packet) or flop_registry.get(packet)
        if formula is not None:
            self.flops += int(formula(*args, out_val=out, **kwargs))
        return out


class SampleMixing(TorchDispatchMode):
    """Notes, in ``why_not``, the first operator run under it that rules out running a layer
    over several micro-batches at once: one that draws random numbers (tagged
    ``nondeterministic_seeded``: dropout), or batch norm in training mode over ``samples``
    along dim 0 (its statistics mix the micro-batches). The real profiler
    (:func:`harmony.planning.profile.profile_layers`) measures this instead of looking."""

    def __init__(self, samples: int) -> None:
        super().__init__()
        self.samples, self.why_not = samples, ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.why_not:
            names = [a.name for a in func._schema.arguments]
            given = {**dict(zip(names, args)), **kwargs}
            if torch.Tag.nondeterministic_seeded in func.tags and given.get("dropout_p", 1) \
                    and given.get("train", True) and given.get("p", 1):
                # (fused attention and dropout kernels draw only with a dropout probability)
                self.why_not = f"draws random numbers in its forward ({func._overloadpacket})"
            elif "batch_norm" in func._schema.name:
                x = given.get("input")
                if given.get("training") and isinstance(x, torch.Tensor) and x.dim() \
                        and x.shape[0] == self.samples:
                    self.why_not = ("treats the samples of a micro-batch together (batch norm "
                                    "in training mode)")
        return func(*args, **kwargs)


def batch_first(value: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...],
                samples: int) -> str:
    """Why a layer taking ``value`` and giving ``out`` cannot group because of their shapes:
    a tensor without the ``samples`` along dim 0 ("" when every tensor has them)."""
    for what, values in (("input", value), ("output", out)):
        for j, t in enumerate(values):
            if t.dim() == 0 or t.shape[0] != samples:
                return (f"passes a tensor without the samples along dim 0 ({what} {j} of shape "
                        f"{tuple(t.shape)} in a micro-batch of {samples})")
    return ""


def _storage_key(t: torch.Tensor) -> int:
    # Meta storages have no address (data_ptr() is 0 for all); the StorageImpl's identity tells
    # views of one storage apart from distinct storages, as data_ptr() does on a real device.
    return int(t.untyped_storage()._cdata)


def _signature(layer: nn.Module, value: tuple[torch.Tensor, ...],
               last: bool) -> tuple[Any, ...] | None:
    """What a layer's profile depends on, comparably; None when it cannot be told."""
    parts: list[Any] = [last, tuple((tuple(t.shape), t.stride(), t.dtype) for t in value)]
    for mod_name, mod in layer.named_modules():
        state = []
        for k, v in sorted(vars(mod).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):
                return None  # a plain tensor attribute: its values could matter
            state.append((k, repr(v)))
        hooks = [repr(h) for h in (*mod._forward_hooks.values(),
                                   *mod._forward_pre_hooks.values(),
                                   *mod._backward_hooks.values())]
        parts.append((mod_name, type(mod), tuple(state), tuple(hooks)))
    for kind, items in (("p", layer.named_parameters()), ("b", layer.named_buffers())):
        parts += [(kind, k, tuple(t.shape), t.dtype, t.requires_grad) for k, t in items]
    return tuple(parts)


def _nbytes(value: tuple[torch.Tensor, ...], floating_only: bool = False) -> int:
    return sum(t.numel() * t.element_size() for t in value
               if not floating_only or t.is_floating_point())


def _to_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def meta_profile(chain: Chain, inputs: Inputs, targets: torch.Tensor,
                 loss_fn: Callable[..., torch.Tensor],
                 device_flops: float = GPU_FLOPS, reuse: bool = True,
                 precision: Precision | None = None) -> list[LayerProfile]:
    """Profile every layer of ``chain`` on meta tensors: sizes exact, times from FLOPs.

    Mirrors :func:`harmony.planning.profile.profile_layers` (same fields, per sample, same
    accounting of saved tensors: unique storages that are neither a parameter of the layer nor its
    input).

    Args:
        chain: the model's layers, with parameters on the meta device.
        inputs, targets: one micro-batch on the meta device (inputs: a tensor or a tuple).
        loss_fn: ``(output, target) -> scalar``; run after the last layer.
        device_flops: sustained FLOP/s of the device, for the time estimate.
        reuse: profile a layer identical to an earlier one (same class and attribute values
            in every submodule, same parameter and buffer shapes and dtypes, same input shapes
            and dtypes) only once. Anything that prints differently counts as different, so
            a false match needs two layers that look alike in every attribute yet compute
            differently.
        precision: mixed precision profiles W in its dtypes (fp32 G) and stands in for autocast,
            which does not act on meta tensors: each layer's floating-point inputs are cast to
            the compute dtype (as autocast casts a matmul's operands) and the loss runs on an
            fp32 copy of the output (autocast runs losses in fp32). Layers whose ops autocast
            would keep in fp32 internally are estimated in the compute dtype.

    Raises:
        ValueError: a parameter, buffer or input not on the meta device (build the model under
            ``with torch.device("meta"):``), or ``device_flops`` not positive.
    """
    if not device_flops > 0:
        raise ValueError(f"device_flops={device_flops!r} must be a positive number of FLOP/s")
    value = _to_tuple(inputs)
    for name, t in [*chain.model.named_parameters(), *chain.model.named_buffers(),
                    *((f"input {i}", x) for i, x in enumerate(value)), ("targets", targets)]:
        if not t.is_meta:
            raise ValueError(f"{name} is on {t.device}, not the meta device; build the model and "
                             "its example inputs under `with torch.device('meta'):` so nothing "
                             "is allocated")
    samples = value[0].shape[0]
    mixed = precision is not None and precision.mixed
    if mixed:
        assert precision is not None
        dtype_of, low = precision.dtype_of, precision.compute_dtype
        inner_loss = loss_fn

        def loss_fn(out: Any, target: torch.Tensor) -> torch.Tensor:
            return inner_loss(out.float() if out.is_floating_point() else out, target)
    out: list[LayerProfile] = []
    n = len(chain)
    seen: dict[tuple[Any, ...], tuple[LayerProfile, tuple[torch.Tensor, ...]]] = {}
    with FusedAttention():
        for i, (name, layer) in enumerate(zip(chain.names, chain.layers)):
            key = _signature(layer, value, last=i == n - 1) if reuse else None
            if key is not None and key in seen:
                # An identical layer on identical inputs (the 80 blocks of a 70B model): reuse.
                lp, outs = seen[key]
                out.append(replace(lp, name=name))
                value = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                  device="meta") for t in outs)
                continue
            layout = Layout([layer], dtype_of if mixed else None)
            homes = [e.tensor.data for e in layout.entries]
            if mixed:  # W in its dtypes; the layer's float inputs in the compute dtype
                for e in layout.entries:
                    e.tensor.data = e.tensor.data.to(e.dtype)
            run = tuple(t.to(low) if mixed and t.is_floating_point() else t for t in value)
            with torch.no_grad(), FlopCount() as fc, SampleMixing(samples) as mixing:
                out_value = as_tuple(call(layer, run), f"layer {name!r}")
            fwd_flops = fc.flops

            with FlopCount() as fc:
                saved = backward_saved_bytes(layer, run, layout, loss_fn, targets,
                                             last=i == n - 1, name=name,
                                             storage_key=_storage_key)
            bwd_flops = fc.flops
            for e, h in zip(layout.entries, homes):
                e.tensor.data = h
            out.append(LayerProfile(
                name=name, w_bytes=layout.w_bytes, g_bytes=layout.g_bytes,
                in_bytes=_nbytes(value) / samples, in_grad_bytes=_nbytes(value, True) / samples,
                saved_bytes=saved / samples,
                out_bytes=_nbytes(out_value) / samples,
                fwd_s=fwd_flops / device_flops / samples,
                bwd_s=bwd_flops / device_flops / samples, samples=samples,
                no_group=mixing.why_not or batch_first(value, out_value, samples),
                params=layout.trainable_spans(),
                frozen_bytes=layout.w_bytes - layout.frozen_start))
            value = tuple(t.detach() for t in out_value)
            if key is not None:
                seen[key] = (out[-1], value)
    return out


def profile_on_meta(spec: ModelSpec, micro_batch_size: int, device_flops: float = GPU_FLOPS,
                    upd_s_per_byte: float = 1e-9, k_ratio: float = 2.0,
                    precision: str = "fp32") -> ModelProfile:
    """:func:`meta_profile` of a :class:`ModelSpec` built on the meta device.

    Args:
        spec: built under ``with torch.device("meta"):``.
        micro_batch_size: samples in the profiled micro-batch.
        device_flops: sustained FLOP/s of the device (``GPU_FLOPS``, ``CPU_FLOPS`` or measured).
        upd_s_per_byte, k_ratio: carried into the result for the planner (defaults: Adam(W)
            in fp32, updated at 1 GB/s of gradients).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`meta_profile`).

    Raises:
        ValueError: as :func:`meta_profile`, or a ``micro_batch_size`` below 1.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) \
            or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int")
    chain = Chain(spec.model)
    with torch.device("meta"):
        inputs, targets = spec.example_inputs(micro_batch_size)
    layers = meta_profile(chain, inputs, targets, spec.loss_fn, device_flops,
                          precision=Precision.parse(precision))
    params = [sum(p.numel() for p in layer.parameters()) for layer in chain.layers]
    return ModelProfile(spec.name, f"meta-device estimate, times at {device_flops:.3g} FLOP/s",
                        layers, params, micro_batch_size, k_ratio, upd_s_per_byte, spec.seq_len,
                        precision=precision)
