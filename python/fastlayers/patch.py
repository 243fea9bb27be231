# SPDX-License-Identifier: Apache-2.0
"""``patch_model``: swap a model's layers for fastlayers ones in one call, with a report.

Works on Hugging Face decoders of the layouts :mod:`fastlayers._decoder` reads (Llama / Mistral /
Qwen / Gemma 1-3 / OLMo 2 / Granite / Cohere / Phi / GLM-style, the README lists those tested) and
plain ``torch.nn`` models; never imports ``transformers`` itself (modules are recognised by their
class names and attributes, layouts checked by running each layer once). What a model's structure
does not allow (a fused qkv projection or attention parts of unknown role for the INT4 KV and
routed attention, a layer of unknown layout for a skip plan) raises before anything is changed.

* ``rms_norm=True``: every ``*RMSNorm`` module (``LlamaRMSNorm``, ``MistralRMSNorm``,
  ``Qwen2RMSNorm``, ``GemmaRMSNorm`` with its ``1 + w`` form, ``torch.nn.RMSNorm``) becomes
  :class:`fastlayers.RMSNorm` sharing the same ``weight`` parameter (state dict unchanged), in
  the form (offset, rounding) that reproduces the module bit for bit, found by running a copy
  of it (``fastlayers.nn.rmsnorm.rms_norm_form``); a module matching no form is left, reported.
* ``linear="int4_fp8"``: :func:`fastlayers.quantize_` (FireQ INT4 x FP8; GPTQ when
  ``calibration`` is given; the LM head stays in float) with the default
  :class:`fastlayers.QuantizeConfig`; ``linear=QuantizeConfig(...)`` with that one (e.g.
  ``group_size=32``: on small models the INT4 grid's error dominates, and finer groups cut it;
  the Hopper CUTLASS GEMM takes groups of 128 and multiples, others run the CUDA fallback).
* ``kv_cache="int4_rope_aware"``: FireQ's RoPE-aware INT4 KV (needs ``calibration``); pass
  ``cache=fastlayers.quant.Int4KVCache.for_model(model)`` to ``generate()``.
* ``skip_plan``: a :class:`fastlayers.SkipPlan` installed with :func:`fastlayers.apply_skip_plan`.
* ``mlp="fff" | "peer"``: replaces each decoder layer's feedforward with a fastlayers module of
  **new, untrained parameters** (train or distil them; the model's outputs change):
  :class:`fastlayers.UltraFastFeedForward` with ``2^(depth+1) - 1 <= intermediate_size`` neurons, or
  :class:`fastlayers.PEER` with ``K^2 >= intermediate_size`` experts (K a power of two), 8 heads,
  top-16, queries of ``min(256, hidden_size)`` per head. ``unpatch_model`` puts the original
  feedforwards back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from fastlayers.nn.rmsnorm import RMSNorm, rms_norm_form

if TYPE_CHECKING:
    from fastlayers.quantize import QuantizeConfig


@dataclasses.dataclass
class PatchReport:
    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # path, old, new
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # what, why
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, old, new in self.swapped:
            key = f"{old} -> {new}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"{n:5d} x {what}" for what, n in self.summary().items()]
        lines += [f"  not applied: {what} ({why})" for what, why in self.left]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines) if lines else "nothing patched"


def _set(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rms_norm_like(module: torch.nn.Module) -> bool:
    """Whether fastlayers.RMSNorm can replace ``module`` (its offset: ``RMSNorm.from_module``)."""
    if isinstance(module, RMSNorm):
        return False
    weight = getattr(module, "weight", None)
    is_param = isinstance(weight, torch.nn.Parameter)
    if not type(module).__name__.endswith("RMSNorm") or not is_param or weight.dim() != 1:
        return False
    if isinstance(module, torch.nn.RMSNorm):
        return module.elementwise_affine is not False and len(module.normalized_shape) == 1
    return getattr(module, "variance_epsilon", getattr(module, "eps", None)) is not None


def _new_mlp(kind: str, hidden: int, intermediate: int, like: torch.Tensor) -> torch.nn.Module:
    kw = {"device": like.device, "dtype": like.dtype}
    if kind == "fff":
        from fastlayers.nn.fff import UltraFastFeedForward

        depth = max(1, (intermediate + 1).bit_length() - 2)  # 2^(depth+1) - 1 <= intermediate
        return UltraFastFeedForward(hidden, hidden, depth, **kw)
    from fastlayers.nn.peer import PEER

    keys = 1 << max(1, math.ceil(math.log2(math.sqrt(intermediate))))
    # (queries of 256 per head, as PEER-pytorch's dim_key=128 per half: dim_key=hidden would
    # make the query projection as large as the feedforward it replaces)
    return PEER(hidden, keys * keys, heads=8, topk=16, dim_key=min(256, hidden // 2 * 2), **kw)


def _feedforward_sizes(mlp: torch.nn.Module) -> tuple[int | None, int | None]:
    """``(hidden, intermediate)`` of a feedforward that names neither: its first linear layer's
    input and output widths (``dense_h_to_4h``, GPT-2's ``Conv1D`` ``c_fc``)."""
    from fastlayers.quantize import _linear_weight

    for module in mlp.modules():
        w = _linear_weight(module)
        if w is not None:
            return w.shape[1], w.shape[0]
    return None, None


class _TupleFeedForward(torch.nn.Module):
    """A new feedforward standing in for one that returned a tuple (Llama 4's MoE: ``(output,
    router_logits)``, which its layer unpacks): ``(module(x), None, ...)`` of the same length."""

    def __init__(self, module: torch.nn.Module, length: int):
        super().__init__()
        self.module, self.length = module, length

    def forward(self, x):
        return (self.module(x), *([None] * (self.length - 1)))


def _output_length(mlp: torch.nn.Module, hidden: int, like: torch.Tensor) -> int | None:
    """The length of the tuple ``mlp`` returns (run once on zeros), None for a tensor or where it
    cannot run here (a model on the meta device)."""
    if like.device.type == "meta":
        return None
    x = torch.zeros(1, 2, hidden, dtype=like.dtype, device=like.device)
    training = mlp.training
    try:
        with torch.no_grad():
            out = mlp.eval()(x)
    except Exception:  # noqa: BLE001 (a feedforward that cannot run alone: taken as a tensor's)
        return None
    finally:
        mlp.train(training)
    return len(out) if isinstance(out, tuple) else None


def _swap_mlps(model, kind: str, originals: dict, report: PatchReport) -> None:
    from fastlayers._decoder import block_kind, decoder_layers, feedforward_name

    try:
        layers = decoder_layers(model, "patch_model(mlp=...)")
    except TypeError:
        report.left.append((f"mlp={kind!r}", "no decoder layers with an .mlp to replace"))
        return
    index = {id(m): path for path, m in model.named_modules()}
    for layer in layers:
        if block_kind(layer) == "attn":  # (Nemotron-H: a block without a feedforward)
            continue
        old = getattr(layer, feedforward_name(layer) or "mlp", None)
        weight = next(old.parameters(), None) if old is not None else None
        cfg = getattr(old, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(old, "hidden_size", None)
        inter = getattr(cfg, "intermediate_size", None) or getattr(old, "intermediate_size", None)
        if weight is not None and not (hidden and inter):  # (GPT-NeoX, GPT-2: no sizes named)
            hidden, inter = _feedforward_sizes(old)
        if weight is None or not hidden or not inter:
            report.left.append((index.get(id(old), "mlp"), "feedforward sizes not found"))
            continue
        path = index[id(old)]
        new = _new_mlp(kind, hidden, inter, weight).train(old.training)  # (PEER's batch norm)
        name = f"fastlayers.{type(new).__name__}"
        length = _output_length(old, hidden, weight)
        if length is not None:  # (the layer unpacks a tuple: a tensor there split its batch)
            new = _TupleFeedForward(new, length)
            report.notes.append(f"{path} returned a tuple of {length}: its new feedforward "
                                "returns (output, None, ...), no router logits")  # fmt: skip
        originals[path] = old
        _set(model, path, new)
        report.swapped.append((path, type(old).__name__, name))
    report.notes.append(
        f"mlp={kind!r}: the new feedforwards are untrained (train or distil them before use)"
    )


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch_model(
    model: torch.nn.Module,
    rms_norm: bool = True,
    linear: str | QuantizeConfig | None = None,
    kv_cache: str | None = None,
    mlp: str | None = None,
    skip_plan=None,
    calibration=None,
) -> PatchReport:
    """Swaps ``model``'s layers in place (see the module docstring) and returns what was done."""
    _check_model(model)
    if not isinstance(rms_norm, bool):
        raise TypeError(f"rms_norm must be a bool, got {rms_norm!r}")
    report = PatchReport()
    originals: dict[str, torch.nn.Module] = getattr(model, "_fastlayers_originals", {})
    from fastlayers.quantize import QuantizeConfig

    if linear is None:
        quantize_config = None
    elif isinstance(linear, QuantizeConfig):
        linear.validate()
        quantize_config = linear
    elif isinstance(linear, str) and linear == "int4_fp8":
        quantize_config = QuantizeConfig(progress=False)
    else:
        raise ValueError(
            f"linear must be None, 'int4_fp8' or a fastlayers.QuantizeConfig, got {linear!r}"
        )
    if kv_cache not in (None, "int4_rope_aware"):
        raise ValueError(f"kv_cache must be None or 'int4_rope_aware', got {kv_cache!r}")
    if mlp not in (None, "fff", "peer"):
        raise ValueError(f"mlp must be None, 'fff' or 'peer', got {mlp!r}")
    if kv_cache is not None and calibration is None:
        raise ValueError("kv_cache='int4_rope_aware' needs calibration batches (input ids)")
    # every refusal before the model changes (unsupported attention or decoder layouts)
    if kv_cache is not None:
        from fastlayers.quant.rope_kv_hf import check_rope_aware_kv

        check_rope_aware_kv(model, "patch_model(kv_cache='int4_rope_aware')")
    if skip_plan is not None:
        from fastlayers.skip_plan import check_skip_plan

        check_skip_plan(model, skip_plan)
    if kv_cache is not None:  # calibrate on the float model, before anything else changes it
        from fastlayers import quant

        post = quant.calibrate_rope_aware_kv(model, calibration)
        quant.apply_rope_aware_kv(model, post)
        from fastlayers._decoder import (
            MLAProjections,
            attention_of,
            decoder_layers,
            linear_mixer,
            mla_projections,
            qk_norms,
        )

        layers = [(i, x) for i, x in enumerate(decoder_layers(model)) if not linear_mixer(x)]
        latent = {i for i, x in layers if isinstance(mla_projections(attention_of(x)),
                                                       MLAProjections)}  # fmt: skip
        report.swapped += [(f"layer {i} attention", "float latent" if i in latent else "float KV",
                            "INT4 latent (RoPE-aware)" if i in latent else "INT4 KV (RoPE-aware)")
                           for i, _ in layers]  # fmt: skip
        if any(qk_norms(attention_of(x))[1] is not None for i, x in layers if i not in latent):
            report.notes.append(
                "INT4 KV: post-RoPE scales only (q_norm / k_norm would undo pre-RoPE scales)"
            )
        if latent:
            report.notes.append(
                "INT4 KV of multi-head latent attention: the cached latent and RoPE key part are "
                "INT4 (post-RoPE scales only), expanded into heads by the model"
            )
        report.notes.append(
            "generate() with the INT4 cache: cache=fastlayers.quant.Int4KVCache.for_model(model)"
        )
    if rms_norm:
        for path, module in list(model.named_modules()):
            if not _rms_norm_like(module):
                continue
            # the same Parameter (state dict and ties unchanged), eps, and the module's own
            # offset and rounding, found by running it (rms_norm_form)
            form = rms_norm_form(module)
            if form is None:
                report.left.append(
                    (path, "its rounding matches none of fastlayers.RMSNorm's forms")
                )
                continue
            new = RMSNorm.from_module(module, weight_offset=form[0], round_once=form[1])
            originals[path] = module
            _set(model, path, new)
            report.swapped.append((path, type(module).__name__, "fastlayers.RMSNorm"))
    if mlp is not None:  # before quantization: the replaced feedforwards need none
        _swap_mlps(model, mlp, originals, report)
    if quantize_config is not None:
        from fastlayers.quantize import quantize_

        kinds = {name: type(m).__name__ for name, m in model.named_modules()}  # (GPT-2: Conv1D)
        q = quantize_(model, quantize_config, calibration=calibration)
        report.swapped += [(r.name, kinds[r.name], "fastlayers.Int4Fp8Linear") for r in q.layers]
        if q.skipped:
            report.left.append((", ".join(q.skipped), "kept in float (LM head / odd sizes)"))
        report.notes.append("quantized linears are not restored by unpatch_model")

    if skip_plan is not None:
        from fastlayers.skip_plan import apply_skip_plan

        apply_skip_plan(model, skip_plan)
        report.swapped.append(("decoder layers", "all sublayers", f"SkipPlan "
                               f"({skip_plan.cost_fraction():.2f} of sublayers run)"))  # fmt: skip
    model._fastlayers_originals = originals
    return report


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restores the RMSNorm modules, the feedforwards, the skip plan and the KV attention that
    :func:`patch_model` replaced (quantized linears stay quantized)."""
    _check_model(model)
    for path, module in getattr(model, "_fastlayers_originals", {}).items():
        _set(model, path, module)
    model._fastlayers_originals = {}
    from fastlayers.skip_plan import remove_skip_plan

    try:
        remove_skip_plan(model)
    except TypeError:  # not a decoder model
        pass
    if hasattr(model, "_fl_previous_attention"):
        from fastlayers import quant

        quant.remove_rope_aware_kv(model)
    return model
