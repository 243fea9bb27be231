# SPDX-License-Identifier: Apache-2.0
"""``quantize_``: FireQ post-training quantisation of a model's linear layers, in place.

1. Channel-wise smoothing (FireQ), where a producer -> consumer pair is recognised: for the
   consumer weight ``W_C [out, in]`` (the rows of all consumers of one producer, concatenated),
   ``lambda_j = c / mean_i |W_C[i, j]|`` with ``c`` the mean of those column means (so lambda is
   about 1 on average); consumer columns are multiplied by lambda and the producer's outputs
   divided by it, which leaves the float model's function unchanged. Every input column of the
   consumer then has the same mean magnitude, so one outlier column no longer sets the INT4 step of
   every group it falls in; the inverse factor moves into the activations, which FP8 (per-token
   scale, 3-bit mantissa) carries without loss of relative precision. Pairs recognised (Hugging
   Face names): the norm feeding the feedforward ``-> mlp.{gate,up}_proj`` (GPT-NeoX:
   ``mlp.dense_h_to_4h``; ``post_attention_layernorm`` in Llama-style and GPT-NeoX layers, also
   GPT-NeoX's parallel block, where it feeds the feedforward alone; ``pre_feedforward_layernorm``
   in Gemma 2/3; never a Gemma ``1 + w`` norm) and ``mlp.up_proj ->
   mlp.down_proj`` (Llama, Mistral, Qwen: the MLP is linear in ``up``), ``self_attn.v_proj ->
   self_attn.o_proj`` (when ``o_proj`` reads ``v_proj``'s channels one to one, i.e. no
   grouped-query sharing) and BERT's ``attention.self.value -> attention.output.dense``.
2. Every eligible ``nn.Linear`` (not matched by ``skip``, even ``in_features``) becomes an
   :class:`fastlayers.Int4Fp8Linear`.
   Values: round to nearest, or GPTQ (Frantar et al.) when calibration inputs are given: columns
   are quantised in order and each one's rounding error is spread over the columns not yet
   quantised, weighted by the inverse Hessian ``(X^T X)^-1`` of the layer's inputs; group scales
   are chosen (optionally by a clipping search) when a group starts.
3. A report: per layer, the relative error of the quantised weight and, when calibration inputs
   are given, of the layer's output on the activations the float model produced for them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys

import torch

from fastlayers._decoder import decoder_layout, feedforward_name, mixer_name, shared_feedforward
from fastlayers.nn.int4_fp8 import Int4Fp8Linear
from fastlayers.nn.rmsnorm import norm_weight_offset
from fastlayers.ops.int4_fp8 import QuantizedWeight, quantize_int4
from fastlayers.reference import fp8 as ref_fp8
from fastlayers.reference import int4_fp8 as ref
from fastlayers.reference.int4_fp8 import CHANNEL_SCALES

METHODS = ("auto", "rtn", "gptq")

# The norm whose output a decoder layer's feedforward reads, resolved per layer
# (``post_attention_layernorm`` in Llama-style layers, ``pre_feedforward_layernorm`` in Gemma 2/3,
# none in OLMo 2).
FFN_NORM = "<the decoder layer's feedforward norm>"

# (producer path, consumer paths, producer kind), relative to a common parent module.
SMOOTH_PAIRS = (
    (FFN_NORM, ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    (FFN_NORM, ("mlp.dense_h_to_4h",), "norm"),  # GPT-NeoX
    ("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
    ("attention.self.value", ("attention.output.dense",), "linear"),
)


# Mixture-of-experts routers, left in float by default as vLLM and SGLang leave them: INT4 noise in
# a router moves tokens to other experts (Mixtral / Qwen-MoE ``mlp.gate``, HunYuan ``gate.wg``,
# ``router``, Qwen-MoE's ``shared_expert_gate``).
MOE_ROUTERS = ("*.gate", "*.wg", "*.router", "*.shared_expert_gate")


@dataclasses.dataclass
class QuantizeConfig:
    """Options of :func:`quantize_`.

    group_size: INT4 group size along in_features (128). channel_scale: ``"per_channel"``,
    ``"per_tensor_pow2"`` or ``"none"``. skip: ``fnmatch`` patterns of module names left in
    float (the LM head by default, its error reaching the logits directly, and mixture-of-experts
    routers, :data:`MOE_ROUTERS`). smooth: apply FireQ's
    channel-wise smoothing to the recognised pairs. method: how the INT4 values are chosen --
    ``"rtn"`` (round to nearest), ``"gptq"`` (GPTQ's error feedback over the calibration
    activations' Hessian; needs calibration) or ``"auto"`` (gptq with calibration, else rtn).
    clip_search: per group, the group scale among ``max / 7 * {1.0, 0.95, ..., 0.6}`` with the
    least squared error (instead of the group max alone). gptq_damp: added to the Hessian's
    diagonal, as a fraction of its mean (0.1: calibration sets of a few thousand tokens leave the
    Hessian of wide layers rank-deficient; GPTQ's usual 0.01 then overfits them). Every choice
    stores the same format and the GEMM computes the same contract; they differ only in which
    values are stored.
    out_dtype: output dtype of the quantised layers (None: each layer's own dtype). progress: a
    progress line on stderr.
    """

    group_size: int = 128
    channel_scale: str = "per_channel"
    skip: tuple[str, ...] = ("lm_head", "*.lm_head", *MOE_ROUTERS)
    smooth: bool = True
    method: str = "auto"
    clip_search: bool = True
    gptq_damp: float = 0.1
    out_dtype: torch.dtype | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError for a field out of range (at construction, and again by :func:`quantize_`,
        since fields may be reassigned)."""
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2:
            raise ValueError(f"group_size must be a positive even int, got {g!r}")
        if self.channel_scale not in CHANNEL_SCALES:
            raise ValueError(
                f"channel_scale must be one of {CHANNEL_SCALES}, got {self.channel_scale!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


@dataclasses.dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    smoothed: bool
    weight_error: float  # ||W_q - W|| / ||W|| of the (smoothed) weight
    output_error: float | None = None  # ||y_q - y|| / ||y|| on the calibration activations


@dataclasses.dataclass
class QuantizeReport:
    layers: list[LayerReport]
    skipped: list[str]
    smoothed_pairs: list[str]

    def table(self) -> str:
        head = f"{'layer':<48} {'shape':>12} {'smoothed':>8} {'weight err':>10} {'output err':>10}"
        lines = [head]
        for r in self.layers:
            out = f"{r.output_error:.4f}" if r.output_error is not None else "-"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(
                f"{r.name:<48} {shape:>12} {str(r.smoothed):>8} {r.weight_error:>10.4f} {out:>10}"
            )
        if self.skipped:
            lines.append(f"left in float: {', '.join(self.skipped)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _get(module: torch.nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _smooth_pair(producer, consumers, kind) -> bool:
    """Applies one smoothing in place; False (nothing changed) when the pair does not fit."""
    if not all(isinstance(c, torch.nn.Linear) for c in consumers):
        return False
    width = consumers[0].in_features
    if any(c.in_features != width for c in consumers):
        return False
    if kind == "linear":
        if not isinstance(producer, torch.nn.Linear) or producer.out_features != width:
            return False
    else:
        weight = getattr(producer, "weight", None)
        if (
            not isinstance(weight, torch.Tensor)
            or weight.shape != (width,)
            or norm_weight_offset(producer)  # Gemma (1 + w): w / lambda is not it
        ):
            return False
    with torch.no_grad():
        w_c = torch.cat([c.weight.float() for c in consumers])
        col = w_c.abs().mean(0)
        ok = col > 0
        if not bool(ok.any()):
            return False
        c = col[ok].mean()
        lam = torch.where(ok, c / col.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        for cons in consumers:
            cons.weight.copy_((cons.weight.float() * lam).to(cons.weight.dtype))
        pw = producer.weight
        pw.copy_((pw.float() / (lam[:, None] if kind == "linear" else lam)).to(pw.dtype))
        bias = getattr(producer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.float() / lam).to(bias.dtype))
    return True


def _ffn_norm(module: torch.nn.Module) -> str | None:
    """The path of the norm feeding ``module``'s feedforward alone, for a decoder layer of a known
    layout (fastlayers._decoder); None otherwise (the one norm of a Cohere / Phi parallel block
    feeds the attention too, which smoothing it would change; GPT-NeoX's has one per sublayer)."""
    if mixer_name(module) is None or feedforward_name(module) is None:
        return None
    if shared_feedforward(module) is not None:  # (it reads the norm too: Granite 4's shared_mlp)
        return None
    try:
        layout = decoder_layout(module)
    except TypeError:
        return None
    return None if layout.parallel and layout.ffn_pre == layout.attn_pre else layout.ffn_pre


def _smooth(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    done = []
    for name, module in model.named_modules():
        for producer_path, consumer_paths, kind in SMOOTH_PAIRS:
            if producer_path == FFN_NORM:
                producer_path = _ffn_norm(module)
                if producer_path is None:
                    continue
            producer = _get(module, producer_path)
            consumers = [_get(module, p) for p in consumer_paths]
            if producer is None or any(c is None for c in consumers):
                continue
            if _smooth_pair(producer, consumers, kind):
                prefix = f"{name}." if name else ""
                done.append((prefix + producer_path, [prefix + p for p in consumer_paths]))
    return done


CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 .. 0.6


def _lut_values(q: torch.Tensor, s8: torch.Tensor) -> torch.Tensor:
    """fp8(q * s8) in float64 (the look-up-table value of each INT4 code)."""
    return ref_fp8.to_fp8((q * s8).float()).double()


def _group_scales(block, c, clip_search: bool):
    """FP8 group scales ``[N]`` for one group ``block [N, g]`` (float64) and channel scales c."""
    a = block.abs().amax(-1).clamp_min(1e-12)
    ratios = CLIP_RATIOS if clip_search else (1.0,)
    best_err = best = None
    for ratio in ratios:
        s8 = ref_fp8.to_fp8((ref_fp8.div_rn(ratio * a, 7) / c).float()).double()
        s8 = s8.clamp(ref.GROUP_SCALE_MIN, ref.LUT_SCALE_MAX)
        q = torch.round(block / (c * s8)[:, None]).clamp(-8, 7)
        err = ((c[:, None] * _lut_values(q, s8[:, None]) - block) ** 2).sum(-1)
        if best is None:
            best_err, best = err, s8
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s8, best)
    return best


def quantize_int4_gptq(
    weight: torch.Tensor,
    inputs: torch.Tensor | None,
    group_size: int = 128,
    channel_scale: str = "per_channel",
    clip_search: bool = True,
    damp: float = 0.1,
) -> QuantizedWeight:
    """The FireQ INT4 format for ``weight [N, K]``, values chosen by GPTQ over ``inputs [rows, K]``
    (the layer's calibration activations; None: round to nearest). Channel scales follow
    :func:`fastlayers.quantize_int4`; group scales are taken from the error-updated weights when
    each group starts (clipping search optional) and capped at 56 so every table entry stays in
    FP8 range. Computed in float64 on the weight's device; GPTQ's lazy batch updates, one group
    per batch."""
    n, k = weight.shape
    c = ref.quantize_int4(weight.detach().float(), group_size, channel_scale)[2].double()
    w = weight.detach().double().clone()
    hinv = None
    if inputs is not None:
        x = inputs.reshape(-1, k).to(device=w.device, dtype=torch.float64)
        h = x.t() @ x / max(x.shape[0], 1)
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
        chol = torch.linalg.cholesky(h)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    q_all = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = []
    for j0 in range(0, k, group_size):
        j1 = min(k, j0 + group_size)
        s8 = _group_scales(w[:, j0:j1], c, clip_search)
        scales.append(s8)
        step = c * s8
        if hinv is None:
            q_all[:, j0:j1] = torch.round(w[:, j0:j1] / step[:, None]).clamp(-8, 7).to(torch.int8)
            continue
        errs = torch.empty(n, j1 - j0, dtype=w.dtype, device=w.device)
        for i in range(j0, j1):
            q = torch.round(w[:, i] / step).clamp(-8, 7)
            q_all[:, i] = q.to(torch.int8)
            err = (w[:, i] - c * _lut_values(q, s8)) / hinv[i, i]
            w[:, i + 1 : j1] -= err[:, None] * hinv[i, i + 1 : j1][None, :]
            errs[:, i - j0] = err
        w[:, j1:] -= errs @ hinv[j0:j1, j1:]
    group_scale = torch.stack(scales, 1).float().to(ref_fp8.FP8)
    return QuantizedWeight(ref.pack_int4(q_all), group_scale, c.float(), group_size)


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of a layer :func:`quantize_` replaces: a ``torch.nn.Linear``'s (or
    a subclass's that is one: :func:`_plain_linear`), or the transpose of a Hugging Face
    ``Conv1D``'s ``[in, out]`` (GPT-2's projections: ``x @ W + b``, a linear layer stored the other
    way round); None for anything else."""
    if type(module) is torch.nn.Linear or _plain_linear(module):
        return module.weight
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    ):
        return weight.t()
    return None


_PLAIN_LINEAR: dict[type, bool] = {}


def _plain_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a subclass of ``torch.nn.Linear`` that computes ``F.linear`` and
    nothing else (Falcon's ``FalconLinear``, ``x @ W.T + b``): no parameters, buffers or
    submodules besides ``weight`` and ``bias``, and its forward's answer on a random input is
    ``F.linear``'s (to fp32 rounding). A subclass with adapters (LoRA) or another forward is
    left alone. Probed once per class, on a small copy of the layer."""
    cls = type(module)
    if not isinstance(module, torch.nn.Linear) or cls is torch.nn.Linear:
        return False
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if names - {"weight", "bias"} or any(True for _ in module.children()):
        return False
    if cls not in _PLAIN_LINEAR:
        ok = False
        try:  # (a small layer of the class: __init__(in_features, out_features, bias))
            g = torch.Generator().manual_seed(0)
            probe = cls(24, 8, bias=True)
            with torch.no_grad():
                probe.weight.copy_(torch.randn(8, 24, generator=g))
                probe.bias.copy_(torch.randn(8, generator=g))
                x = torch.randn(3, 5, 24, generator=g)
                want = torch.nn.functional.linear(x, probe.weight, probe.bias)
                ok = bool(torch.allclose(probe(x), want, rtol=1e-5, atol=1e-5))
        except Exception:  # noqa: BLE001 (a constructor or forward of another form: not plain)
            ok = False
        _PLAIN_LINEAR[cls] = ok
    return _PLAIN_LINEAR[cls]


def _record_inputs(model, linears, calibration, max_rows=2048):
    """Runs ``calibration`` through the float model and keeps (up to max_rows) input rows per
    linear layer."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    hooks = []
    for name, layer in linears.items():

        def hook(mod, args, _name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            kept = sum(t.shape[0] for t in store[_name])
            if kept < max_rows:
                store[_name].append(x[: max_rows - kept].clone())

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                for batch in calibration:
                    if isinstance(batch, dict):
                        model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        model(*batch)
                    else:
                        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items() if v}


def quantize_(
    model: torch.nn.Module, config: QuantizeConfig | None = None, calibration=None
) -> QuantizeReport:
    """Quantizes ``model``'s linear layers (``torch.nn.Linear``, and GPT-2's ``Conv1D``, a linear
    layer stored transposed) to INT4 x FP8 in place (FireQ) and returns a report.

    ``calibration``: optional inputs to measure each layer's output error on real activations:
    an iterable of batches (tensors, tuples of positional arguments, or dicts of keyword
    arguments for ``model``) or a callable ``f(model)`` that runs the model. The float model runs
    them once (after smoothing, which does not change its function) before any layer is replaced.
    """
    config = QuantizeConfig() if config is None else config
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantizeConfig):
        raise TypeError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    config.validate()
    if config.method == "gptq" and calibration is None:
        raise ValueError("method='gptq' needs calibration inputs")
    gptq = config.method == "gptq" or (config.method == "auto" and calibration is not None)
    smoothed = _smooth(model) if config.smooth else []
    smoothed_layers = {c for _, consumers in smoothed for c in consumers}
    skipped, linears = [], {}
    for name, module in model.named_modules():
        weight = _linear_weight(module)
        if weight is None:
            continue
        if any(fnmatch.fnmatch(name, p) for p in config.skip) or weight.shape[1] % 2:
            skipped.append(name)
        else:
            linears[name] = module
    inputs = _record_inputs(model, linears, calibration) if calibration is not None else {}
    reports = []
    for i, (name, linear) in enumerate(linears.items()):
        if config.progress:
            print(f"\rquantize_: {i + 1}/{len(linears)} {name:<60}", end="", file=sys.stderr)
        w = _linear_weight(linear)
        if gptq or config.clip_search:
            qw = quantize_int4_gptq(
                w, inputs.get(name) if gptq else None, config.group_size, config.channel_scale,
                config.clip_search, config.gptq_damp,
            )  # fmt: skip
        else:
            qw = quantize_int4(w, config.group_size, config.channel_scale)
        out_dtype = config.out_dtype or (
            w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        )
        q = Int4Fp8Linear.from_quantized(qw, linear.bias, out_dtype)
        with torch.no_grad():
            w = w.float()
            weight_error = ((q.dequantize() - w).norm() / w.norm().clamp_min(1e-30)).item()
            output_error = None
            if name in inputs:
                x = inputs[name]
                want = torch.nn.functional.linear(x.float(), w, None)
                got = q(x.to(linear.weight.dtype)).float()  # (Conv1D: the same dtype)
                if linear.bias is not None:
                    got = got - linear.bias.float()
                output_error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        reports.append(
            LayerReport(name, tuple(w.shape), name in smoothed_layers, weight_error, output_error)
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    if config.progress and linears:
        print(file=sys.stderr)
    return QuantizeReport(reports, skipped, [f"{p} -> {', '.join(c)}" for p, c in smoothed])
