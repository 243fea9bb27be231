# SPDX-License-Identifier: Apache-2.0
"""What fastlayers reads of a Hugging Face decoder's structure, in one place (never imports
``transformers``: modules are recognised by their attribute names).

Three layouts of the norms around a decoder layer's two sublayers are known, each a residual
``h = h + post(sublayer(pre(h)))`` with ``pre`` / ``post`` absent where the layout has none:

* Llama-style (Llama, Mistral, Qwen2/3, Gemma, Phi-3, Granite, ...): ``input_layernorm`` before the
  attention, ``post_attention_layernorm`` before the feedforward;
* sandwich (Gemma 2/3): ``input_layernorm`` / ``post_attention_layernorm`` around the attention,
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the feedforward;
* post-norm (OLMo 2): ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on the
  sublayers' outputs only.

Anything else (a parallel attention + feedforward block such as Cohere's, one norm for both) is
refused with a TypeError naming what is missing, never run in a Llama-shaped guess.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

import torch


def decoder_layers(model, what: str = "this function") -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``, or ``layers``)."""
    for path in ("model.layers", "layers", "model.model.layers"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, torch.nn.ModuleList) and len(m) and hasattr(m[0], "self_attn"):
            return m
    raise TypeError(
        f"{what}: expected a Hugging Face decoder (model.model.layers, each with self_attn, mlp "
        "and its norms), got " + type(model).__name__
    )


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """Attribute names of the norms around each sublayer (None: no norm there)."""

    attn_pre: str | None
    attn_post: str | None
    ffn_pre: str | None
    ffn_post: str | None
    residual_multiplier: float = 1.0  # h = h + sublayer(...) * this (Granite), for both sublayers


def _has(layer: torch.nn.Module, name: str) -> bool:
    return isinstance(getattr(layer, name, None), torch.nn.Module)


def decoder_layout(layer: torch.nn.Module, what: str = "this function") -> DecoderLayout:
    """The norm layout of one decoder layer (module docstring); TypeError for an unknown one."""
    kind = type(layer).__name__
    if not (_has(layer, "self_attn") and _has(layer, "mlp")):
        raise TypeError(f"{what}: {kind} has no self_attn and mlp submodules")
    mult = getattr(layer, "residual_multiplier", 1.0)
    if _has(layer, "pre_feedforward_layernorm") or _has(layer, "post_feedforward_layernorm"):
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")  # fmt: skip
        return DecoderLayout(*(n if _has(layer, n) else None for n in names), mult)
    if _has(layer, "post_attention_layernorm"):  # (and input_layernorm: Llama-style models)
        pre = "input_layernorm" if _has(layer, "input_layernorm") else None
        return DecoderLayout(pre, None, "post_attention_layernorm", None, mult)
    raise TypeError(
        f"{what}: {kind} is not a known decoder layout (Llama-style input_layernorm + "
        "post_attention_layernorm, Gemma 2/3 sandwich norms or OLMo 2 post-norms); a parallel "
        "attention + feedforward block is not supported"
    )


def attention_unsupported(attn: torch.nn.Module, need_separate_qkv: bool = True) -> str | None:
    """Why fastlayers' own attention paths (the INT4 KV cache, routed attention) cannot stand in
    for ``attn`` (None: they can): they compute softmax(q k^T * scaling) v without logit
    soft-capping, from separate q/k/v projections."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    if cap is not None:
        return f"{type(attn).__name__} soft-caps its attention logits (softcapping {cap})"
    if need_separate_qkv and not all(_has(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        return f"{type(attn).__name__} has no separate q_proj / k_proj / v_proj (fused projection)"
    return None


def qk_norms(attn: torch.nn.Module):
    """``(q_norm, k_norm)`` applied between the projections and RoPE (Qwen3, Gemma 3 per head;
    OLMo 2 over the whole projection), or ``(None, None)``."""
    q, k = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if isinstance(q, torch.nn.Module) and isinstance(k, torch.nn.Module):
        return q, k
    return None, None


def apply_qk_norm(norm, t: torch.Tensor) -> torch.Tensor:
    """``norm`` on ``t [..., heads, head_dim]``: per head when its weight has ``head_dim``
    entries, else over the flattened heads (OLMo 2 normalises the whole projection)."""
    if norm is None:
        return t
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[-1] == t.shape[-1]:
        return norm(t)
    return norm(t.flatten(-2)).view(t.shape)


@dataclasses.dataclass(frozen=True)
class RopeLayout:
    """How a model's attention applies RoPE: the channel pairing fastlayers' kernels and scale
    folding must follow, and the model's own ``apply_rotary_pos_emb(q, k, cos, sin)``."""

    pairing: str  # "half" (rotate_half: channel j with j + d/2) or "interleaved" (2i with 2i + 1)
    apply: Callable


def rope_layout(attn: torch.nn.Module, what: str = "this function") -> RopeLayout:
    """The RoPE layout of ``attn``, read by probing the model's own ``apply_rotary_pos_emb`` (from
    the module that defines ``attn``'s class) against both pairings; ValueError for partial RoPE
    or a pairing that is neither."""
    name = type(attn).__name__
    factor = _rotary_fraction(attn)
    if factor != 1.0:
        raise ValueError(f"{what}: {name} rotates only {factor:g} of each head (partial RoPE)")
    layout = _probe_rope(type(attn), attn.head_dim)
    if isinstance(layout, str):
        raise ValueError(f"{what}: {name}{layout}")
    return layout


def _rotary_fraction(attn: torch.nn.Module) -> float:
    """The fraction of each head RoPE rotates: the config's ``partial_rotary_factor`` (top level,
    or in ``rope_parameters`` as transformers 5 keeps it), or the module's ``rotary_ndims``."""
    cfg = getattr(attn, "config", None)
    factor = getattr(cfg, "partial_rotary_factor", None)
    params = getattr(cfg, "rope_parameters", None)
    if factor is None and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    ndims, d = getattr(attn, "rotary_ndims", None), getattr(attn, "head_dim", None)
    if factor is None and isinstance(ndims, int) and isinstance(d, int) and d > 0:
        factor = ndims / d
    return 1.0 if factor is None else float(factor)


@functools.lru_cache(maxsize=64)
def _probe_rope(cls: type, d: int) -> RopeLayout | str:
    """The RoPE layout of attention class ``cls`` at head dim ``d``, or why there is none."""
    from fastlayers.quant.rope_kv import PAIRINGS, rotate_pairs

    fn = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
    if not callable(fn):
        return ": found no apply_rotary_pos_emb next to its class"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 2, d, generator=g)  # [B, H, T, d]
    theta = torch.rand(1, 2, d // 2, generator=g) * 3  # [B, T, d/2]
    for pairing in PAIRINGS:  # cos / sin equal within each pair of the candidate pairing
        half = pairing == "half"
        angle = torch.cat([theta, theta], -1) if half else theta.repeat_interleave(2, -1)
        cos, sin = angle.cos(), angle.sin()
        got = fn(x, x, cos, sin)[1].float()
        want = x * cos[:, None] + rotate_pairs(x, pairing) * sin[:, None]
        if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return RopeLayout(pairing, fn)
    return "'s RoPE pairs channels neither as rotate-half nor interleaved"
