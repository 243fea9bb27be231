# SPDX-License-Identifier: Apache-2.0
"""What fastlayers reads of a Hugging Face decoder's structure, in one place (never imports
``transformers``: modules are recognised by their attribute names).

Each known layout of the norms around a decoder layer's two sublayers is a residual
``h = h + post(sublayer(pre(h)))`` with ``pre`` / ``post`` absent where the layout has none. The
layout is read from the names of the layer's norm submodules (the same name means different
places in different families: Llama's ``post_attention_layernorm`` is the feedforward's input
norm, Gemma 2's normalises the attention's output):

* Llama-style (Llama, Mistral, Qwen2/3, Gemma, Phi-3, Granite, StableLM, GLM, ...):
  ``input_layernorm`` before the attention, ``post_attention_layernorm`` before the feedforward;
  Apertus names them ``attention_layernorm`` / ``feedforward_layernorm``, LFM2 ``operator_norm`` /
  ``ffn_norm``, Jamba and Bamba ``input_layernorm`` / ``pre_ff_layernorm``;
* sandwich, a norm before and after each sublayer: Gemma 2/3 (``input_layernorm`` /
  ``post_attention_layernorm`` around the attention, ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` around the feedforward; VaultGemma has the two pre-norms only),
  GLM-4 (``input_layernorm`` / ``post_self_attn_layernorm``, ``post_attention_layernorm`` /
  ``post_mlp_layernorm``), AFMoE (``input_layernorm`` / ``post_attention_layernorm``,
  ``pre_mlp_layernorm`` / ``post_mlp_layernorm``) and HyperCLOVA X (``input_layernorm`` /
  ``post_norm1``, ``post_attention_layernorm`` / ``post_norm2``);
* post-norm (OLMo 2/3, EXAONE 4): ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on
  the sublayers' outputs only;
* parallel (Cohere, Phi, StableLM's ``use_parallel_residual``): one ``input_layernorm`` read by
  both sublayers, ``h = h + attn(n(h)) + mlp(n(h))``; GPT-NeoX's ``use_parallel_residual`` has a
  norm for each, ``h = h + attn(input_layernorm(h)) + mlp(post_attention_layernorm(h))`` (the
  names of the Llama style: running the layer tells them apart).

GPT-NeoX names the attention ``attention`` (``self_attn`` elsewhere) and keeps its layers in
``model.gpt_neox``, GPT-2 in ``model.transformer.h`` with ``attn`` (:func:`inner_model`,
:data:`ATTENTION_NAMES`); feedforwards are ``mlp``, ``block_sparse_moe`` or ``feed_forward``.

Names alone are not trusted: the layout read from them is checked by running the layer once with
its attention answering a fixed random tensor (:func:`_layout_holds`); the layer's output must be
what the layout computes from it (a layer that cannot be run so is refused: Beam's depth-scaled
residuals passed as Gemma 2's sandwich while the check could not call its forward). Anything else
is refused with a TypeError naming what is not understood, never run in a Llama-shaped guess: a
layer with a submodule no layout places (a norm of another name, Gemma 3n's AltUp, ...), or one
whose output is not its names' layout.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import weakref
from collections.abc import Callable

import torch

# The name of each decoder layer's attention: Llama-style ``self_attn``, GPT-NeoX's ``attention``,
# GPT-2's ``attn``, Falcon's and BLOOM's ``self_attention``.
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
# Where a causal LM keeps the module holding its layers: ``model`` (Llama-style), ``gpt_neox``,
# GPT-2's ``transformer``.
_INNER_NAMES = ("model", "gpt_neox", "transformer")


# The name of each decoder layer's feedforward: ``mlp``, Granite MoE's and Mixtral-style
# ``block_sparse_moe``, ``feed_forward``; Granite 4's hybrid layers add a dense ``shared_mlp`` to
# their MoE's output (:func:`shared_feedforward`), or have it alone.
FEEDFORWARD_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "shared_mlp")


def feedforward_name(layer: torch.nn.Module) -> str | None:
    """The name of ``layer``'s feedforward submodule (:data:`FEEDFORWARD_NAMES`; a feedforward
    block's ``mixer``: :func:`block_kind`), or None."""
    found = next((n for n in FEEDFORWARD_NAMES if _has(layer, n)), None)
    return "mixer" if found is None and block_kind(layer) == "ffn" else found


# Nemotron-H's blocks hold one sublayer each, ``h + mixer(norm(h))``: an attention, a Mamba layer,
# an MLP or a MoE, as their ``block_type`` says.
_FFN_BLOCKS = ("mlp", "moe")
_ATTENTION_BLOCKS = ("full_attention", "attention", "sliding_attention")


def block_kind(layer: torch.nn.Module) -> str | None:
    """``"attn"`` (an attention or a linear attention) or ``"ffn"`` for a layer that is one
    sublayer block (Nemotron-H: ``norm`` and ``mixer``), None for a layer of both sublayers."""
    if not (_has(layer, "mixer") and _has(layer, "norm")) or any(
        _has(layer, n) for n in (*ATTENTION_NAMES, *FEEDFORWARD_NAMES)
    ):
        return None
    return "ffn" if getattr(layer, "block_type", None) in _FFN_BLOCKS else "attn"


def feedforward_of(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer``'s feedforward module (``mlp``, ``block_sparse_moe`` or ``feed_forward``)."""
    return getattr(layer, feedforward_name(layer) or "mlp")


def shared_feedforward(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The dense feedforward a layer adds to its feedforward's output on the same input (Granite
    4's ``shared_mlp`` beside its MoE), or None; :func:`feedforward` computes their sum, which
    the layout check compares with what the layer itself computes."""
    if feedforward_name(layer) != "shared_mlp" and _has(layer, "shared_mlp"):
        return layer.shared_mlp
    return None


def attention_name(layer: torch.nn.Module) -> str | None:
    """The name of ``layer``'s attention submodule (:data:`ATTENTION_NAMES`; an attention block's
    ``mixer``: :func:`block_kind`), or None."""
    found = next((n for n in ATTENTION_NAMES if _has(layer, n)), None)
    if found is None and block_kind(layer) == "attn":
        return "mixer" if getattr(layer, "block_type", None) in _ATTENTION_BLOCKS else None
    return found


def attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer``'s attention module (:data:`ATTENTION_NAMES`)."""
    return getattr(layer, attention_name(layer) or "self_attn")


# Hybrid models mix tokens with something other than softmax attention in some layers: Qwen3-Next,
# Qwen3.5 and OLMo-hybrid name their gated delta nets ``linear_attn``, LFM2/LFM3 their short
# convolutions ``conv``, Granite 4 its Mamba-2 layers ``mamba``; Kimi-Linear and Bailing-hybrid
# keep theirs as ``self_attn`` and say so in ``config.layer_types`` (or the layer's
# ``layer_type``).
LINEAR_MIXER_NAMES = ("linear_attn", "conv", "mamba")
_LINEAR_TYPES = ("linear_attention", "conv", "mamba", "mamba2")


def mixer_name(layer: torch.nn.Module) -> str | None:
    """The name of ``layer``'s token mixer: its attention (:data:`ATTENTION_NAMES`) or, in a
    hybrid's other layers, its linear attention or convolution (:data:`LINEAR_MIXER_NAMES`; a
    block's ``mixer``, :func:`block_kind`)."""
    found = attention_name(layer) or next((n for n in LINEAR_MIXER_NAMES if _has(layer, n)), None)
    return "mixer" if found is None and block_kind(layer) is not None else found


def mixer_of(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer``'s token mixer (:func:`mixer_name`)."""
    return getattr(layer, mixer_name(layer) or "self_attn")


def linear_mixer(layer: torch.nn.Module) -> str | None:
    """What ``layer`` mixes tokens with where that is not softmax attention (a hybrid's linear
    attention, convolution or state-space layer: by the mixer's name, the config's
    ``layer_types`` at its ``layer_idx`` or the layer's own ``layer_type`` / ``block_type``), as
    words for messages; None for a softmax attention layer."""
    name = mixer_name(layer)
    if name is None:
        return None
    mixer = getattr(layer, name)
    if block_kind(layer) == "ffn":  # (Nemotron-H's MLP and MoE blocks: no attention either)
        return f"{type(mixer).__name__} (a feedforward block)"
    kinds = [getattr(layer, "layer_type", None), getattr(layer, "block_type", None)]
    cfg, idx = getattr(mixer, "config", None), getattr(mixer, "layer_idx", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types):
        kinds.append(types[idx])
    kind = next((k for k in kinds if k in _LINEAR_TYPES), None)
    if name in LINEAR_MIXER_NAMES or kind is not None:
        what = "a convolution" if name == "conv" or kind == "conv" else "a linear attention"
        return f"{type(mixer).__name__} ({what})"
    return None


def head_dim_of(attn: torch.nn.Module) -> int | None:
    """The attention's head size: ``head_dim``, or GPT-NeoX's ``head_size``."""
    d = getattr(attn, "head_dim", None)
    d = getattr(attn, "head_size", None) if d is None else d
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def inner_model(model) -> torch.nn.Module:
    """The module that holds the decoder layers, the embeddings and the final norm: ``model.model``
    (Llama-style), ``model.gpt_neox``, ``model.transformer`` (GPT-2), or ``model`` itself."""
    for name in _INNER_NAMES:
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module) and any(
            isinstance(getattr(inner, n, None), torch.nn.ModuleList) for n in ("layers", "h")
        ):
            return inner
    return model


def decoder_layers(model, what: str = "this function") -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``,
    ``model.gpt_neox.layers``, GPT-2's ``model.transformer.h``, or ``layers``)."""
    for path in ("model.layers", "gpt_neox.layers", "transformer.h", "layers",
                 "model.model.layers"):  # fmt: skip
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, torch.nn.ModuleList) and len(m) and mixer_name(m[0]) is not None:
            return m
    raise TypeError(
        f"{what}: expected a Hugging Face decoder (model.model.layers, model.gpt_neox.layers or "
        f"model.transformer.h, each with an attention ({' / '.join(ATTENTION_NAMES)}; hybrids: "
        f"{' / '.join(LINEAR_MIXER_NAMES)}), a "
        f"feedforward ({' / '.join(FEEDFORWARD_NAMES)}) and its norms), got " + type(model).__name__
    )


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """Attribute names of the norms around each sublayer (None: no norm there)."""

    attn_pre: str | None
    attn_post: str | None
    ffn_pre: str | None
    ffn_post: str | None
    residual_multiplier: float = 1.0  # h = h + sublayer(...) * this (Granite), for both sublayers
    parallel: bool = False  # both sublayers read attn_pre(h) (== ffn_pre) of the layer's input h
    single: str | None = None  # "attn" / "ffn": a block of that sublayer alone (Nemotron-H)


def _has(layer: torch.nn.Module, name: str) -> bool:
    return isinstance(getattr(layer, name, None), torch.nn.Module)


def _in_features(module: torch.nn.Module):
    """A linear layer's input width: ``in_features``, or GPT-2's ``Conv1D``'s ``nx``."""
    width = getattr(module, "in_features", None)
    return getattr(module, "nx", None) if width is None else width


def _out_features(module: torch.nn.Module):
    """A linear layer's output width: ``out_features``, or GPT-2's ``Conv1D``'s ``nf``."""
    width = getattr(module, "out_features", None)
    return getattr(module, "nf", None) if width is None else width


def _children_besides(module: torch.nn.Module, known) -> set[str]:
    """The names of ``module``'s child modules other than ``known``, dropouts (identities in
    inference) and what fastlayers attached itself (``fastlayers_router``)."""
    return {
        name
        for name, child in module.named_children()
        if name not in known
        and not name.startswith("fastlayers_")
        and not isinstance(child, torch.nn.Dropout)
    }


# (attn_pre, attn_post, ffn_pre, ffn_post) of each family, and the names of which a layer must have
# at least one to be of it; a layer matches when all its norms are among the family's names.
_FAMILIES = (
    (("input_layernorm", None, "post_attention_layernorm", None),
     ("post_attention_layernorm",)),  # Llama-style
    (("ln_1", None, "ln_2", None), ("ln_2",)),  # GPT-2
    (("attention_layernorm", None, "feedforward_layernorm", None),
     ("attention_layernorm", "feedforward_layernorm")),  # Apertus
    (("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
      "post_feedforward_layernorm"),
     ("pre_feedforward_layernorm", "post_feedforward_layernorm")),  # Gemma 2/3, OLMo 2/3
    (("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
      "post_mlp_layernorm"),
     ("post_self_attn_layernorm",)),  # GLM-4
    (("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"),
     ("pre_mlp_layernorm",)),  # AFMoE
    (("input_layernorm", "post_norm1", "post_attention_layernorm", "post_norm2"),
     ("post_norm1", "post_norm2")),  # HyperCLOVA X
    (("operator_norm", None, "ffn_norm", None), ("operator_norm", "ffn_norm")),  # LFM2
    (("input_layernorm", None, "pre_ff_layernorm", None), ("pre_ff_layernorm",)),  # Jamba, Bamba
    (("operator_norm", "post_operator_norm", "ffn_norm", "post_ffn_norm"),
     ("post_operator_norm", "post_ffn_norm")),  # LFM3
)  # fmt: skip


def decoder_layout(layer: torch.nn.Module, what: str = "this function") -> DecoderLayout:
    """The norm layout of one decoder layer (module docstring); TypeError for an unknown one.
    Read once per layer and set of submodule names (the check runs the layer)."""
    kind = type(layer).__name__
    single = block_kind(layer)
    if single is not None:
        return _block_layout(layer, single, what)
    attn = mixer_name(layer)
    ffn = feedforward_name(layer)
    if attn is None or ffn is None:
        raise TypeError(f"{what}: {kind} has no attention ({' / '.join(ATTENTION_NAMES)}; "
                        f"hybrids: {' / '.join(LINEAR_MIXER_NAMES)}) and feedforward "
                        f"({' / '.join(FEEDFORWARD_NAMES)}) submodules")  # fmt: skip
    others = _children_besides(layer, (attn, ffn, "shared_mlp"))
    key = tuple(sorted(others))
    known = _LAYOUTS.get(layer)
    if known is not None and known[0] == key:
        return known[1]
    candidates = _layouts_by_names(layer, others)
    if not candidates:
        raise TypeError(
            f"{what}: {kind} is not a known decoder layout: its submodules besides {attn} and "
            f"{ffn} ({', '.join(sorted(others)) or 'none'}) are not the norms of a Llama-style, "
            "sandwich (Gemma 2/3, GLM-4, AFMoE, HyperCLOVA X, LFM3), post-norm (OLMo 2) or "
            "parallel (Cohere, Phi, GPT-NeoX) layer"
        )
    for layout in candidates:  # (the names of GPT-NeoX's parallel block are Llama's)
        holds = _layout_holds(layer, layout)
        if holds is not False:
            break
    if holds is not True:
        layout = candidates[0] if holds is False else layout
        how = "does not compute" if holds is False else "could not be run to check it computes"
        raise TypeError(
            f"{what}: {kind} {how} what the names of its norms say ({_describe(layout)}), "
            "checked by running it once with its attention answering a fixed tensor"
        )
    _LAYOUTS[layer] = (key, layout)
    return layout


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _block_layout(layer: torch.nn.Module, single: str, what: str) -> DecoderLayout:
    """A one-sublayer block's layout, ``h + mixer(norm(h))``, checked by running the block with
    its mixer answering a fixed tensor (TypeError where it computes anything else)."""
    known = _LAYOUTS.get(layer)
    if known is not None and known[0] == ("<block>",):
        return known[1]
    layout = DecoderLayout("norm", None, None, None, single=single) if single == "attn" else \
        DecoderLayout(None, None, "norm", None, single=single)  # fmt: skip
    modes = [(m, m.training) for m in layer.modules()]
    mixer, holds = layer.mixer, False
    try:
        p = activation_like(layer)
        g = torch.Generator().manual_seed(0)
        width = layer.norm.weight.shape[-1]
        h = torch.randn(1, 5, width, generator=g).to(p)
        c = torch.randn(1, 5, width, generator=g).mul(2).to(p)
        layer.eval()
        with torch.no_grad():
            for bare in (False, True):  # (an attention answers a tuple, the others a tensor)
                fixed = layer._modules["mixer"] = _FixedAttention(c, bare)
                try:
                    out = layer(h, attention_mask=None)
                    break
                except Exception:  # noqa: BLE001 (the other answer, or a block not callable)
                    if bare:
                        raise
            _TUPLE_OUTPUT[layer] = isinstance(out, tuple)
            out = out[0] if isinstance(out, tuple) else out
            tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2
            holds = all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
                        for a, b in ((fixed.seen, layer.norm(h)), (out, h + c)))  # fmt: skip
    except Exception:  # noqa: BLE001 (refused below)
        holds = False
    finally:
        layer._modules["mixer"] = mixer
        for module, training in modes:
            module.training = training
    if not holds:
        raise TypeError(f"{what}: {type(layer).__name__} is a one-sublayer block that does not "
                        "compute h + mixer(norm(h)), checked by running it")  # fmt: skip
    _LAYOUTS[layer] = (("<block>",), layout)
    return layout


def _residual_multiplier(layer) -> float:
    """What the layer multiplies each sublayer's output by before adding it to the residual:
    Granite's ``residual_multiplier``, MiniCPM3's ``residual_scale`` (``scale_depth /
    sqrt(layers)``; a number only: Zaya's is a learned vector), else 1 (checked by running the
    layer, as the rest of its layout)."""
    for name in ("residual_multiplier", "residual_scale"):
        value = getattr(layer, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 1.0


def _layouts_by_names(layer, others: set[str]) -> list[DecoderLayout]:
    """The layouts the names of ``layer``'s norms allow, the likeliest first: Llama-style names
    also fit GPT-NeoX's parallel block ``h + attn(n1(h)) + mlp(n2(h))`` (its
    ``use_parallel_residual``), which only running the layer tells apart."""
    mult = _residual_multiplier(layer)
    for i, (names, markers) in enumerate(_FAMILIES):
        if others <= set(names) and any(m in others for m in markers):
            layout = DecoderLayout(*(n if n in others else None for n in names), mult)
            if i == 0 and layout.attn_pre is not None:  # (Llama-style: or parallel, 2 norms)
                parallel = dataclasses.replace(layout, parallel=True)
                return [layout, parallel]
            return [layout]
    if len(others) == 1 and others <= {"input_layernorm", "ln_1"}:  # (GPT-J, CodeGen: ln_1)
        norm = next(iter(others))  # (no norm before the feedforward: parallel, if it holds)
        return [DecoderLayout(norm, None, norm, None, mult, True)]
    if others == {"ln_attn", "ln_mlp"}:  # (Falcon's new decoder architecture: parallel, 2 norms)
        return [DecoderLayout("ln_attn", None, "ln_mlp", None, mult, True)]
    return []


def _describe(layout: DecoderLayout) -> str:
    m = "" if layout.residual_multiplier == 1.0 else f" * {layout.residual_multiplier:g}"
    if layout.parallel and layout.ffn_pre != layout.attn_pre:
        return (f"h + attn(n1(h)){m} + mlp(n2(h)){m}, n1 = {layout.attn_pre}, "
                f"n2 = {layout.ffn_pre}")  # fmt: skip
    if layout.parallel:
        return f"h + attn(n(h)){m} + mlp(n(h)){m}, n = {layout.attn_pre}"

    def sub(name, pre, post):
        inner = f"{name}({pre}(h))" if pre else f"{name}(h)"
        return f"h = h + {post}({inner}){m}" if post else f"h = h + {inner}{m}"

    return (sub("attn", layout.attn_pre, layout.attn_post) + "; "
            + sub("mlp", layout.ffn_pre, layout.ffn_post))  # fmt: skip


class _FixedAttention(torch.nn.Module):
    """Stands in for a layer's attention in :func:`_layout_holds`: answers ``out`` (as
    ``(out, None)`` like an attention, or bare like a hybrid's linear attention) and keeps what it
    was given."""

    def __init__(self, out: torch.Tensor, bare: bool = False):
        super().__init__()
        self.out, self.bare, self.seen = out, bare, None

    def forward(self, hidden_states, *args, **kwargs):
        self.seen = hidden_states
        return self.out if self.bare else (self.out, None)


def activation_like(module: torch.nn.Module) -> torch.Tensor:
    """A tensor of the dtype and device ``module``'s activations have, for probes: its first
    floating parameter or 16/32/64-bit floating buffer other than those a fastlayers module keeps
    in a dtype of its own (``_FIXED_DTYPE_BUFFERS``: an INT4 linear's float32 channel scales,
    which ``model.to(torch.bfloat16)`` leaves), else an empty one of the ``out_dtype`` of an INT4
    linear in it (an attention whose every projection is one: CodeGen's was probed in float32 in a
    bfloat16 model, to the float32 tolerance, and refused for its bfloat16 rounding), else fp32 on
    the device of its first tensor."""
    for sub in module.modules():
        fixed = getattr(sub, "_FIXED_DTYPE_BUFFERS", ())
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, t in own:
            if name not in fixed and t.is_floating_point() and t.element_size() >= 2:
                return t
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else None
    for sub in module.modules():
        if isinstance(getattr(sub, "out_dtype", None), torch.dtype):
            return torch.empty(0, dtype=sub.out_dtype, device=device)
    return torch.empty(0, device=device)


def _hidden_size(layer: torch.nn.Module, layout: DecoderLayout) -> int:
    """The width of the layer's residual stream: its config's, or the width of a norm."""
    width = getattr(getattr(mixer_of(layer), "config", None), "hidden_size", None)
    if isinstance(width, int):
        return width
    for name in (layout.attn_pre, layout.ffn_pre, layout.attn_post, layout.ffn_post):
        weight = getattr(getattr(layer, name or "", None), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.shape[-1]
    raise ValueError("no width found")


_TUPLE_OUTPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def returns_tuple(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s forward returns a tuple whose first element is the hidden states
    (GPT-Neo's blocks: ``(hidden_states, attn_weights)``) rather than the hidden states, as seen
    when :func:`decoder_layout` ran it; a stand-in forward must answer alike (the model reads
    ``outputs[0]``: a bare tensor would give it the first sequence of the batch)."""
    return _TUPLE_OUTPUT.get(layer, False)


def feedforward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's feedforward on ``x`` (:func:`feedforward_of`), its first element where it
    returns a tuple (GPT-OSS's MoE: ``(out, router_scores)``), in ``x``'s shape, plus the shared
    feedforward's where the layer has one (:func:`shared_feedforward`)."""
    out = feedforward_of(layer)(x)
    out = out[0] if isinstance(out, tuple) else out
    # (Llama 4's MoE answers its tokens flattened, [B * T, hidden]: the layer views them back)
    out = out.view(x.shape) if out.shape != x.shape and out.numel() == x.numel() else out
    shared = shared_feedforward(layer)
    return out if shared is None else out + shared(x)


def _layout_holds(layer: torch.nn.Module, layout: DecoderLayout) -> bool | None:
    """Whether ``layer`` computes what ``layout`` says: the layer runs once (eval mode, no
    gradients, a few random tokens) with its attention answering a fixed random tensor ``c``,
    and what its attention and feedforward were given and its output are compared with the
    layout's: ``pre(h)`` into the attention; ``mid = h + post(c) * m`` then the feedforward
    residual (sequential), or ``mid = h + c * m`` and ``mlp(pre(h))`` (parallel). A parallel
    block and a sequential one differ in what the feedforward reads, which a zero attention
    would not show. None: the layer could not be run (a device without storage, a forward that
    needs more than hidden states); decoder_layout refuses it as it refuses a mismatch."""
    modes = [(m, m.training) for m in layer.modules()]
    name = mixer_name(layer)
    attn = layer._modules[name]
    try:
        p = activation_like(layer)
        if p.device.type == "meta":
            return None
        width = _hidden_size(layer, layout)
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, 5, width, generator=g).to(p)
        c = torch.randn(1, 5, width, generator=g).mul(2).to(p)
        layer.eval()
        seen_mlp = []
        hook = feedforward_of(layer).register_forward_pre_hook(
            lambda mod, args: seen_mlp.append(args[0])
        )
        with torch.no_grad():
            try:  # (an attention answers a tuple, a hybrid's linear attention a tensor: Qwen3.5)
                for bare in (False, True):
                    fixed = layer._modules[name] = _FixedAttention(c, bare)
                    seen_mlp.clear()
                    try:  # (some layers take position_embeddings as a required argument: Beam)
                        out = layer(h, attention_mask=None, position_embeddings=None)
                        break
                    except Exception:  # noqa: BLE001 (the other answer, or a layer not callable)
                        if bare:
                            raise
            finally:
                hook.remove()
            _TUPLE_OUTPUT[layer] = isinstance(out, tuple)
            out = out[0] if isinstance(out, tuple) else out
            names = (layout.attn_pre, layout.attn_post, layout.ffn_pre, layout.ffn_post)
            norm = {n: getattr(layer, n) for n in names if n}

            def apply(name, t):
                return t if name is None else norm[name](t)

            m = layout.residual_multiplier
            mid = h + (fixed.out if layout.parallel else apply(layout.attn_post, fixed.out)) * m
            mlp_in = apply(layout.ffn_pre, h if layout.parallel else mid)
            want = mid + apply(layout.ffn_post, feedforward(layer, mlp_in)) * m
            seen, attn_in = fixed.seen, apply(layout.attn_pre, h)
    except Exception:  # noqa: BLE001 (a layer this check cannot call)
        return None
    finally:
        layer._modules[name] = attn
        for module, training in modes:
            module.training = training
    tol = 1e-4 if p.dtype == torch.float32 or p.dtype == torch.float64 else 3e-2
    pairs = ((seen, attn_in), (seen_mlp[0] if len(seen_mlp) == 1 else None, mlp_in), (out, want))
    return all(
        got is not None and torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)
        for got, ref in pairs
    )


def logit_softcap(attn: torch.nn.Module) -> float | None:
    """The attention's logit soft-capping (Gemma 2: ``cap * tanh(s / cap)``), or None."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    return cap


@dataclasses.dataclass(frozen=True)
class QKVProjections:
    """Where an attention module's queries, keys and values come from: three linear layers
    (``q_proj`` / ``k_proj`` / ``v_proj``; ``fused`` None) or one fused linear layer whose output
    holds them as ``[q | k | v]`` (``fused="concat"``: Phi-3's ``qkv_proj``, GPT-2's ``Conv1D``
    ``c_attn``, multi-query Falcon's ``query_key_value``) or group by group as ``[kv_heads, group +
    2, head_dim]``, each key/value head's ``group`` query heads then its key and its value
    (``fused="per_head"``: Persimmon's and GPT-NeoX's ``query_key_value``, one query head per
    group: ``[heads, 3, head_dim]``; Falcon's new decoder architecture), or in ``shards`` slices of
    ``[q | v | k]`` each (``fused="shards"``: CodeGen's ``qkv_proj``, interleaved across the 4
    model-parallel shards it was trained with; ``mp_num``). ``q``, ``k`` and ``v`` are the layers
    their rows come from (the same layer thrice when fused). ``q_gate``: the query layer gives each
    head's queries and then as many output gate logits, ``[heads, 2, head_dim]`` (Qwen3-Next,
    Qwen3.5: the attention's output is multiplied by ``sigmoid(gate)``). ``v_dim``: the values'
    head size where the module names one of its own (``v_head_dim``: MiMo-V2-Flash; separate
    projections only), else ``head_dim``; ``v_scale``: a factor the module multiplies its values by
    (MiMo-V2-Flash's ``v_scale``). :func:`attention_mismatch` checks the split against what the
    module itself gives its attention."""

    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    fused: str | None
    heads: int
    kv_heads: int
    head_dim: int
    q_gate: bool = False
    v_dim: int | None = None
    v_scale: float = 1.0
    shards: int = 1

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.v_dim is None else self.v_dim

    @property
    def in_features(self) -> int:
        return _in_features(self.q)

    def split(self, y: torch.Tensor):
        """The fused layer's output ``y [..., out]`` as ``(q, k, v)``, each ``[..., h * d]``."""
        hq, hk, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        if self.fused == "concat":
            return y[..., :hq], y[..., hq : hq + hk], y[..., hq + hk :]
        if self.fused == "shards":  # (each shard [q | v | k])
            per = y.unflatten(-1, (self.shards, 3, hq // self.shards))
            q, v, k = (per[..., j, :].flatten(-2) for j in range(3))
            return q, k, v
        g = self.heads // self.kv_heads  # (per_head: [kv_heads, g + 2, d])
        per = y.unflatten(-1, (self.kv_heads, g + 2, d))
        k, v = (per[..., j, :].flatten(-2) for j in (g, g + 1))
        return per[..., :g, :].flatten(-3), k, v

    def project(self, x: torch.Tensor):
        """``(q, k, v, gate)`` of tokens ``x [..., hidden]``, each ``[..., h * d]`` (``gate``:
        the output gate logits where ``q_gate``, else None)."""
        if self.fused is not None:
            return (*self.split(self.q(x)), None)
        q, gate = self.q(x), None
        if self.q_gate:
            halves = q.unflatten(-1, (self.heads, 2, self.head_dim))
            q, gate = halves[..., 0, :].flatten(-2), halves[..., 1, :].flatten(-2)
        return q, self.k(x), self.v(x), gate

    def rows(self, which: str) -> torch.Tensor | None:
        """The output rows of ``which`` ("q" or "k") in its layer's weight; None: all of them."""
        if self.q_gate and which == "q":
            d = self.head_dim
            return (torch.arange(self.heads)[:, None] * 2 * d + torch.arange(d)).reshape(-1)
        if self.fused is None:
            return None
        heads = self.heads if which == "q" else self.kv_heads
        n = heads * self.head_dim
        if self.fused == "concat":
            start = 0 if which == "q" else self.heads * self.head_dim
            return torch.arange(start, start + n)
        if self.fused == "shards":
            local, j = n // self.shards, "qvk".index(which)
            return (torch.arange(self.shards)[:, None] * 3 * local + j * local
                    + torch.arange(local)).reshape(-1)  # fmt: skip
        d, g = self.head_dim, self.heads // self.kv_heads  # (per_head: [kv_heads, g + 2, d])
        group = torch.arange(self.kv_heads)[:, None] * (g + 2) * d
        if which == "q":
            return (group[:, :, None] + torch.arange(g)[:, None] * d + torch.arange(d)).reshape(-1)
        return (group + g * d + torch.arange(d)).reshape(-1)


_FUSED_QKV = {"qkv_proj": "concat", "query_key_value": "per_head", "c_attn": "concat"}


def head_counts(attn: torch.nn.Module) -> tuple[int | None, int | None]:
    """``(query heads, key/value heads)`` of ``attn``: the module's own ``num_heads`` /
    ``num_key_value_heads`` where it has them (Laguna's head count per layer), the query heads
    over its own ``num_key_value_groups`` (MiMo-V2-Flash's window layers have twice the config's
    key/value heads), else its config's; the key/value heads are the query heads where nothing
    names them (multi-head attention: Persimmon, GPT-NeoX)."""
    cfg = getattr(attn, "config", None)

    def count(*names):
        for owner in (attn, cfg):
            for name in names:
                value = getattr(owner, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    heads = count("num_heads", "num_attention_heads")
    kv_heads = count("num_key_value_heads", "kv_heads")  # (GPT-BigCode's multi-query kv_heads)
    groups = getattr(attn, "num_key_value_groups", None)
    own = any(isinstance(getattr(attn, n, None), int) for n in ("num_key_value_heads", "kv_heads"))
    if not own and isinstance(heads, int) and isinstance(groups, int) and \
            not isinstance(groups, bool) and groups > 0 and heads % groups == 0:  # fmt: skip
        kv_heads = heads // groups
    return heads, heads if kv_heads is None else kv_heads


def qkv_projections(attn: torch.nn.Module) -> QKVProjections | str:
    """The :class:`QKVProjections` of ``attn``, or why there are none fastlayers can read."""
    name = type(attn).__name__
    heads, kv_heads = head_counts(attn)
    d = head_dim_of(attn)
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv_heads, d)):
        return f"{name} has no config.num_attention_heads / num_key_value_heads and head_dim"
    separate = ("q_proj", "k_proj", "v_proj")
    if not _has(attn, "q_proj") and _has(attn, "q_gate_proj") and mla_projections(attn) is None:
        separate = ("q_gate_proj", "k_proj", "v_proj")  # (MiniCPM5-MoE: queries and gates)
    found = [n for n in _FUSED_QKV if _has(attn, n)]
    if all(_has(attn, n) for n in separate) and not found:
        names, mods, fused = separate, [getattr(attn, n) for n in separate], None
    elif len(found) == 1 and not any(_has(attn, n) for n in separate):
        names, mods, fused = found, [getattr(attn, found[0])], _FUSED_QKV[found[0]]
    else:
        return (f"{name} has neither separate q_proj / k_proj / v_proj nor one fused qkv_proj / "
                "query_key_value / c_attn")  # fmt: skip
    odd = [n for n, m in zip(names, mods, strict=True) if not isinstance(_in_features(m), int)]
    if odd:  # (Moshi's per-codebook MoshiLinear, Zaya's convolutional qkv_proj)
        return f"{name}'s {', '.join(odd)} are not linear layers (no in_features)"
    shards = getattr(attn, "mp_num", 1)  # (CodeGen: qkv_proj's rows in shards of [q | v | k])
    if fused == "concat" and names[0] == "qkv_proj" and shards != 1:
        fused = "shards"
        if not isinstance(shards, int) or shards < 1 or (heads * d) % shards or kv_heads != heads:
            return f"{name}'s qkv_proj is in {shards!r} shards, which do not split its " \
                   f"{heads} heads of {d} channels"  # fmt: skip
    if fused == "per_head" and getattr(attn, "multi_query", False) is True and \
            getattr(attn, "new_decoder_architecture", False) is False:  # fmt: skip
        fused = "concat"  # (Falcon's multi-query layout: [q | k | v], one key/value head)
    if fused == "per_head" and kv_heads != heads and \
            getattr(attn, "new_decoder_architecture", False) is not True:  # fmt: skip
        return f"{name}'s query_key_value interleaves heads, but it has {heads} query and " \
               f"{kv_heads} key/value heads"  # fmt: skip
    width = (heads + 2 * kv_heads) * d
    got = _out_features(mods[0])
    if fused is not None and got != width:
        return f"{name}'s {names[0]} has {got} outputs, not {width} (queries, keys and values)"
    q, k, v = mods if fused is None else mods * 3
    gated = fused is None and got == 2 * heads * d  # (Qwen3-Next: queries and output gates)
    if names[0] == "q_gate_proj" and not gated:
        return f"{name}'s q_gate_proj has {got} outputs, not {2 * heads * d} (queries and gates)"
    if fused is None and got not in (heads * d, 2 * heads * d):
        return f"{name}'s q_proj has {got} outputs, not {heads * d} ({heads} heads of {d})"
    dv = getattr(attn, "v_head_dim", None)  # (MiMo-V2-Flash: values of another head size)
    dv = dv if isinstance(dv, int) and not isinstance(dv, bool) and dv > 0 and dv != d else None
    if dv is not None and fused is not None:
        return f"{name} has values of {dv} channels beside a fused {names[0]}"
    v_scale = getattr(attn, "v_scale", 1.0)  # (MiMo-V2-Flash: values times a constant)
    if isinstance(v_scale, bool) or not isinstance(v_scale, (int, float)):
        return f"{name}'s v_scale is not a number ({type(v_scale).__name__})"
    return QKVProjections(q, k, v, fused, heads, kv_heads, d, gated, dv, float(v_scale),
                          shards if fused == "shards" else 1)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MLAProjections:
    """Multi-head latent attention (DeepSeek V2/V3 and its kin): queries from ``q_proj`` or
    ``q_b_proj(q_a_layernorm(q_a_proj(x)))``, ``[heads, nope + rope]``; from ``kv_a_proj_with_mqa``
    a latent ``[kv_rank]`` (through ``kv_a_layernorm`` and ``kv_b_proj`` into each head's
    ``[nope]`` key channels and ``[v_dim]`` values) and one ``[rope]`` key part shared by the heads;
    RoPE on the queries' and that key's last ``rope`` channels, by the model's ``rope_fn``
    (interleaved where the config's ``rope_interleave`` says so; DeepSeek V2's on complex tables;
    None: no RoPE function next to the class, Kimi-Linear's). :func:`attention_mismatch` checks it
    against the module."""

    attn: torch.nn.Module
    heads: int
    nope: int
    rope: int
    v_dim: int
    kv_rank: int
    rope_fn: Callable | None
    complex_tables: bool = False  # the model gives complex tables cos + i sin (DeepSeek V2)

    @property
    def in_features(self) -> int:
        return _in_features(self.attn.kv_a_proj_with_mqa)

    def project(self, x: torch.Tensor, cos, sin):
        """``(q [n, H, nope + rope], k [n, H, nope + rope], v [n, H, v_dim])`` of tokens
        ``x [n, hidden]`` with RoPE tables ``cos`` / ``sin [n, rope]`` (None: no rotation)."""
        a, n = self.attn, x.shape[0]
        if _has(a, "q_a_proj"):
            q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x)))
        else:
            q = a.q_proj(x)
        q = q.view(n, self.heads, self.nope + self.rope)
        q_pass, q_rot = q[..., : self.nope], q[..., self.nope :]
        latent, k_rot = a.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], -1)
        kv = a.kv_b_proj(a.kv_a_layernorm(latent)).view(n, self.heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope :]
        k_rot = k_rot.view(n, 1, self.rope)
        if cos is not None and self.rope_fn is not None:  # (on [1, H, n, rope], tables [1, n, r])
            q_rot, k_rot = self.rope_fn(q_rot.transpose(0, 1)[None], k_rot.transpose(0, 1)[None],
                                        cos[None], sin[None])  # fmt: skip
            q_rot, k_rot = q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1)
        q = torch.cat([q_pass, q_rot], -1)
        k = torch.cat([k_nope, k_rot.expand(n, self.heads, self.rope)], -1)
        return q, k, v


# (with the output gates attention_output applies: Bailing-hybrid's g_proj, HunYuan V4's
# gate_proj; checked by running the module, as the rest)
_MLA_PARTS = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
              "kv_a_layernorm", "kv_b_proj", "o_proj", "g_proj", "gate_proj")  # fmt: skip


def mla_projections(attn: torch.nn.Module) -> MLAProjections | str | None:
    """The :class:`MLAProjections` of a multi-head latent attention, why it cannot be read (a
    string), or None for an attention of another kind."""
    if not (_has(attn, "kv_b_proj") or _has(attn, "kv_a_proj_with_mqa")):
        return None
    name, cfg = type(attn).__name__, getattr(attn, "config", None)
    sizes = [getattr(attn, n, getattr(cfg, n, None)) for n in
             ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")]  # fmt: skip
    heads = head_counts(attn)[0]
    if not all(isinstance(v, int) and v > 0 for v in (heads, *sizes)):
        return f"{name} is multi-head latent attention without the head sizes fastlayers reads"
    parts = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
    queries = _has(attn, "q_proj") or all(_has(attn, n) for n in ("q_a_proj", "q_a_layernorm",
                                                                  "q_b_proj"))  # fmt: skip
    # (a DSA indexer, DeepSeek V3.2's: it masks the keys each query sees, which routed attention
    # refuses and the INT4 KV path applies: sparse_indexer)
    unknown = sorted(_children_besides(attn, _MLA_PARTS + ("rotary_emb", "indexer")))
    if not queries or not all(_has(attn, n) for n in parts) or unknown:
        return (f"{name} is multi-head latent attention with other parts than DeepSeek V3's "
                f"({', '.join(unknown) or 'its projections'})")  # fmt: skip
    module = sys.modules.get(type(attn).__module__)
    # the config's rope_interleave; without one, the interleaving function where the module has
    # it (DeepSeek V3.2, GLM MoE DSA: their attention's; the plain one is their indexer's)
    interleave = getattr(cfg, "rope_interleave", None)
    if interleave is None:
        interleave = callable(getattr(module, "apply_rotary_pos_emb_interleave", None))
    fn_name = "apply_rotary_pos_emb_interleave" if interleave else "apply_rotary_pos_emb"
    fn = getattr(module, fn_name, None)  # (none: no RoPE, Kimi-Linear; checked by running it)
    native = getattr(module, "apply_rotary_emb", None)
    if not callable(fn) and callable(native):  # (DeepSeek V2: [B, H, T, d], complex tables)

        def fn(q, k, cos, sin, native=native):
            return native(q, k, torch.complex(cos.float(), sin.float()))

        return MLAProjections(attn, heads, *sizes, fn, True)
    return MLAProjections(attn, heads, *sizes, fn if callable(fn) else None)


def sparse_indexer(attn: torch.nn.Module) -> torch.nn.Module | None:
    """The module's DSA indexer (DeepSeek V3.2, GLM MoE DSA: it picks the keys each query attends
    to, a top-k of its own scores), or None."""
    indexer = getattr(attn, "indexer", None)
    return indexer if isinstance(indexer, torch.nn.Module) else None


def attention_in_features(attn: torch.nn.Module) -> int:
    """The width of the tokens an attention module reads."""
    mla = mla_projections(attn)
    return mla.in_features if isinstance(mla, MLAProjections) else qkv_projections(attn).in_features


def attention_unsupported(attn: torch.nn.Module, mla: bool = False) -> str | None:
    """Why fastlayers' own attention paths (the INT4 KV cache, routed attention) cannot stand in
    for ``attn`` (None: they can; ``mla``: multi-head latent attention is accepted, which routed
    attention runs and the INT4 KV cache does not): they compute softmax(cap(q k^T * scaling)) v
    from the q/k/v projections :func:`qkv_projections` reads (separate or fused; ``cap``: the
    model's logit soft-capping, :func:`logit_softcap`), with the q/k norms :func:`qk_norms` reads
    and nothing else of their own."""
    if isinstance(attn, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # (LongCat-Flash)
        return f"the layer's attention is a {type(attn).__name__} (several attentions per layer)"
    if getattr(attn, "config", None) is None:  # (XGLM: no attention interface to probe it with)
        return f"{type(attn).__name__} has no config (a Hugging Face attention module has one)"
    latent = mla_projections(attn)  # (DeepSeek V2/V3, Kimi-Linear's, MiniCPM3, ...)
    if latent is not None and not mla:
        return (
            f"{type(attn).__name__} is multi-head latent attention (keys and values from "
            "kv_a_proj_with_mqa / kv_b_proj), which the INT4 KV cache does not support"
        )
    if isinstance(latent, str):
        return latent
    if latent is not None:  # (HunYuan V4's MLA has attention sinks)
        return _parameters_unsupported(attn)
    qkv = qkv_projections(attn)
    if isinstance(qkv, str):
        return qkv
    unknown = sorted(_children_besides(attn, _ATTENTION_PARTS))
    if unknown:  # (AFMoE's gate_proj: a gated output fastlayers' paths do not apply)
        names = ", ".join(unknown)
        return f"{type(attn).__name__} has submodules fastlayers does not know: {names}"
    norms = qk_norms(attn)
    present = sorted(n for n in (*_QK_NORM_NAMES, _SHARED_QK_NORM) if _has(attn, n))
    shared = norms[0] is not None and norms[0] is norms[1]  # (Llama 4's one qk_norm)
    if len(present) != (1 if shared else sum(n is not None for n in norms)):
        return f"{type(attn).__name__} has q/k norms fastlayers cannot pair: {', '.join(present)}"
    for norm, h, which in zip(norms, head_counts(attn), "qk", strict=True):
        d = head_dim_of(attn)
        if norm is not None and (
            not isinstance(h, int) or not isinstance(d, int) or _qk_norm_form(norm, h, d) is None
        ):
            return (f"{type(attn).__name__}'s {which} norm ({type(norm).__name__}) normalises "
                    "neither each head nor the whole projection")  # fmt: skip
    return _parameters_unsupported(attn)


def _parameters_unsupported(attn: torch.nn.Module) -> str | None:
    """Why the module's own parameters are not what fastlayers' paths apply (any but ``sinks``, or
    sinks other than one floating logit per query head), or None."""
    own = sorted(name for name, _ in attn.named_parameters(recurse=False) if name != "sinks")
    if own:
        return f"{type(attn).__name__} has parameters fastlayers does not know: {', '.join(own)}"
    sinks = getattr(attn, "sinks", None)
    if sinks is not None and (
        not isinstance(sinks, torch.Tensor)
        or not sinks.is_floating_point()
        or sinks.shape != (head_counts(attn)[0],)
    ):
        return (f"{type(attn).__name__}'s sinks are not one logit per query head "
                f"({head_counts(attn)[0]})")  # fmt: skip
    return None


def attention_sinks(attn: torch.nn.Module) -> torch.Tensor | None:
    """The attention's sinks (GPT-OSS, GraniteSWA, MiMo-V2-Flash's window layers): a logit per
    query head in the softmax's denominator, the module's ``sinks`` parameter; None without."""
    sinks = getattr(attn, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) else None


def output_projection(attn: torch.nn.Module) -> torch.nn.Module:
    """The attention's output projection: ``o_proj``, Phi's ``dense``, LFM2's ``out_proj`` or
    GPT-2's ``c_proj``."""
    for name in ("o_proj", "dense", "out_proj", "c_proj"):
        out = getattr(attn, name, None)
        if isinstance(out, torch.nn.Module):
            return out
    raise TypeError(f"{type(attn).__name__} has no output projection (o_proj / dense / out_proj / "
                    "c_proj)")  # fmt: skip


# The attention submodules fastlayers' attention paths know (Phi names o_proj ``dense``, LFM2
# ``out_proj``; AFMoE's ``gate_proj`` and Laguna's ``g_proj`` gate the attention's output,
# BitNet's ``attn_sub_norm`` normalises it: attention_output).
_ATTENTION_PARTS = ("q_proj", "q_gate_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value",
                    "o_proj", "dense",
                    "out_proj", "qk_norm", "c_attn", "c_proj",
                    "q_norm", "k_norm",
                    "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm",
                    "gate_proj", "g_proj", "attn_sub_norm", "rotary_emb")  # fmt: skip


def attention_qkv(attn: torch.nn.Module, x: torch.Tensor, cos, sin, after_rope=None,
                  positions=None, columns=None):  # fmt: skip
    """The queries, keys and values ``[n, heads, head_dim]`` and the output gate logits
    ``[n, heads * head_dim]`` (None where the queries carry none: :class:`QKVProjections`)
    that ``attn`` computes from tokens ``x [n, hidden]`` with RoPE tables ``cos`` / ``sin
    [n, rotary_dim]`` (None: the model gives none, nothing rotates): its projections, its
    q/k norms (:func:`qk_norms`; before RoPE, or after where :func:`qk_norms_after_rope` says so,
    or ``after_rope`` when given), its own RoPE on the rotated channels (none on NoPE layers)
    and its query scale by place (:func:`query_position_scale`), which reads the tokens'
    ``positions [n]`` (position ids) or ``columns [n]`` (places in the cache) as the module does.
    Routed attention's stand-in for the module's first half, checked against the module itself
    by :func:`attention_mismatch`."""
    q, k, v, gate = _attention_qkv(attn, x, cos, sin, after_rope)
    scale = query_position_scale(attn)
    if scale is not None:
        q = scale.apply(q, columns if scale.by_column else positions)
    return q, k, v, gate


def attention_kv(attn: torch.nn.Module, x: torch.Tensor, cos, sin):
    """The keys and values of :func:`attention_qkv` (``[n, kv heads, head_dim]``), which do not
    depend on the tokens' places beyond the RoPE tables."""
    return _attention_qkv(attn, x, cos, sin, None)[1:3]


def _attention_qkv(attn: torch.nn.Module, x: torch.Tensor, cos, sin, after_rope):
    """:func:`attention_qkv` before the query scale by place."""
    mla = mla_projections(attn)
    if isinstance(mla, MLAProjections):  # (multi-head latent attention: values of their own size)
        return (*mla.project(x, cos, sin), None)
    n, d = x.shape[0], head_dim_of(attn)
    after = qk_norms_after_rope(attn) if after_rope is None else after_rope
    q_norm, k_norm = qk_norms(attn)
    qkv = qkv_projections(attn)
    q, k, v, gate = qkv.project(x)
    q, k, v = q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, qkv.value_dim)
    if qkv.v_scale != 1.0:  # (MiMo-V2-Flash, as its module does it: after the projection)
        v = v * qkv.v_scale
    if not after:
        q, k = apply_qk_norm(q_norm, q), apply_qk_norm(k_norm, k)
    rope = rope_layout(attn, "routed attention")
    rotates = cos is not None and rope.apply is not None  # (None: the model gives no tables,
    if rotates and applies_rope(attn, rope.table_width, rope.complex_tables):  # or has no RoPE)
        q, k = rope.rotate(q, k, cos, sin)
    if after:
        q, k = apply_qk_norm(q_norm, q), apply_qk_norm(k_norm, k)
    return q, k, v, gate


@dataclasses.dataclass(frozen=True)
class PositionQueryScale:
    """A query scale that grows with the token's place, ``1 + beta * log(1 + floor((p + shift) /
    period))`` per token (the temperature tuning of arXiv 2501.19399): Llama 4's NoPE layers
    (``attn_temperature_tuning``: ``p`` the token's column in the cache, shift 1, period
    ``floor_scale``, beta ``attn_scale``; the fp32 scale times the queries, then rounded) and
    Ministral 3 / Mistral 4 (``llama_4_scaling_beta``: ``p`` the position id, shift 0, period
    ``original_max_position_embeddings``; the scale rounded to the queries' dtype first), each
    in its module's arithmetic. :func:`attention_mismatch` checks it against the module."""

    beta: float
    period: float
    shift: float
    by_column: bool  # True: the token's place in the cache; False: its position id

    def apply(self, q: torch.Tensor, places) -> torch.Tensor:
        """``q [n, heads, head_dim]`` scaled by the scale of ``places [n]``."""
        if not isinstance(places, torch.Tensor) or places.shape != q.shape[:1]:
            what = "columns" if self.by_column else "positions"
            raise ValueError(
                f"the query scale by place needs the tokens' {what} as an [{q.shape[0]}] "
                f"tensor, got {tuple(places.shape) if isinstance(places, torch.Tensor) else places}"
            )
        p = places.to(device=q.device)
        if self.by_column:  # (Llama 4: log1p over the fp32 places, the product rounded once)
            s = torch.log1p(torch.floor((p.float() + self.shift) / self.period)) * self.beta + 1.0
            return (q * s[:, None, None]).to(q.dtype)
        s = 1 + self.beta * torch.log(1 + torch.floor(p / self.period))  # (Ministral 3)
        return q * s.to(q.dtype)[:, None, None]


def query_position_scale(attn: torch.nn.Module) -> PositionQueryScale | None:
    """The query scale by place that ``attn`` applies (:class:`PositionQueryScale`), or None."""
    if getattr(attn, "attn_temperature_tuning", False) and not getattr(attn, "use_rope", True):
        return PositionQueryScale(float(attn.attn_scale), float(attn.floor_scale), 1.0, True)
    rope = getattr(getattr(attn, "config", None), "rope_parameters", None)
    beta = rope.get("llama_4_scaling_beta") if isinstance(rope, dict) else None
    if beta is None:
        return None
    return PositionQueryScale(float(beta), float(rope["original_max_position_embeddings"]),
                              0.0, False)  # fmt: skip


def attention_output(attn: torch.nn.Module, o: torch.Tensor, x: torch.Tensor,
                     gate: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The module's output from the attention's ``o [n, heads * head_dim]`` of tokens
    ``x [n, hidden]``: the queries' output gate ``o * sigmoid(gate)`` (``gate`` from
    :func:`attention_qkv`: Qwen3-Next, Qwen3.5), AFMoE's output gate ``o * sigmoid(gate_proj(x))``,
    a ``g_proj`` gate ``o * act(g_proj(x))`` (per channel, or per head; ``act``: Laguna's
    softplus or LFM3's sigmoid, as :func:`attention_mismatch` found it), BitNet's
    ``attn_sub_norm(o)``, where the module has them, then the output projection."""
    if gate is not None:
        o = o * torch.sigmoid(gate)
    gate = getattr(attn, "gate_proj", None)
    if isinstance(gate, torch.nn.Module):
        o = o * torch.sigmoid(gate(x))
    gate = getattr(attn, "g_proj", None)
    if isinstance(gate, torch.nn.Module):
        act = torch.sigmoid if _G_PROJ_SIGMOID.get(attn, False) else torch.nn.functional.softplus
        g = act(gate(x).float()).to(o.dtype)
        o = o * g if g.shape[-1] == o.shape[-1] else (o.unflatten(-1, (g.shape[-1], -1))
                                                      * g[..., None]).flatten(-2)  # fmt: skip
    norm = getattr(attn, "attn_sub_norm", None)
    if isinstance(norm, torch.nn.Module):
        o = norm(o)
    return output_projection(attn)(o)


# the modules whose g_proj gate is a sigmoid (LFM3), as attention_mismatch found; softplus else
_G_PROJ_SIGMOID: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = "fastlayers_probe"


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function :func:`attention_mismatch` runs a module with: records what it is
    given and answers the module's ``_fl_probe_answer``."""
    module._fl_probe_seen = (query, key, value, kwargs)
    return module._fl_probe_answer, None


# where a probe's tokens sit: far past any context a query scale by place leaves alone
_PROBE_PLACE = 1 << 22


class _ProbeCache:
    """The cache a probe gives a module whose query scale reads its place in the cache (Llama 4's
    NoPE layers): it says :data:`_PROBE_PLACE` tokens came before and keeps nothing."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return _PROBE_PLACE

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


def _probe_extras(attn: torch.nn.Module, t: int) -> dict:
    """Arguments a probe passes besides the hidden states and RoPE tables: ``position_ids`` where
    the module's forward requires them (Ministral 3 scales its queries by position), and a
    :class:`_ProbeCache` where its query scale reads the cache's length (Llama 4), both at
    :data:`_PROBE_PLACE`, so that a scale by place shows."""
    params = inspect.signature(attn.forward).parameters
    extras = {}
    needs = params.get("position_ids")
    if needs is not None and needs.default is inspect.Parameter.empty:
        extras["position_ids"] = torch.arange(t)[None] + _PROBE_PLACE
    scale = query_position_scale(attn)
    if scale is not None and scale.by_column:
        name = next((n for n in ("cache", "past_key_values", "past_key_value") if n in params),
                    None)  # fmt: skip
        if name is not None:
            extras[name] = _ProbeCache()
    return extras


def attention_mismatch(attn: torch.nn.Module, queries: bool = True,
                       tables: bool = True) -> str | None:  # fmt: skip
    """Where :func:`attention_qkv`, the scaling and soft-capping fastlayers reads, and
    :func:`attention_output` differ from what ``attn`` itself does (None: nowhere): the module runs
    once (eval mode, no gradients, a few random tokens, RoPE tables of a random angle) with an
    attention function that records the queries, keys, values, ``scaling``, ``softcap`` and sinks
    it is given and answers a fixed random tensor, whose way through the rest of the module is then
    compared too. Names alone do not say what a module computes; this checks it. ``queries``
    False: the caller takes the queries the module gives its attention and recomputes only keys
    and values (the INT4 KV path), so they are not compared. ``tables`` False: the model gives
    its layers no RoPE tables (Granite 4's hybrids have no rotary embedding), so the module runs
    with ``position_embeddings=None`` and is compared with no rotation. A module is not run again
    for a check it passed or failed (``Int4KVCache.for_model`` asks for every new cache, and
    :func:`attention_mismatch_either_way` both ways, one of which fails on most models: Llama's
    forward cannot run without tables). The probe's inputs are fixed, so its outcome is too."""
    passed = _MATCHES.get(attn, ())
    if (True, tables) in passed or (queries, tables) in passed:
        return None
    failed = _MISMATCHES.get(attn, {}).get((queries, tables))
    if failed is not None:
        return failed
    name = type(attn).__name__
    from transformers import AttentionInterface  # (only ever asked of Hugging Face modules)

    AttentionInterface.register(_PROBE, _probe_attention)
    cfg = attn.config
    p = activation_like(attn)
    mla = mla_projections(attn)
    if isinstance(mla, str):
        return mla
    # (d: the values' head size, the answer's; dk: the keys', the scaling's default)
    if mla is None:
        qkv = qkv_projections(attn)
        if isinstance(qkv, str):
            return qkv
        rope = rope_layout(attn, "routed attention")
        applies_rope(attn, rope.table_width, rope.complex_tables)  # (its probe runs the module)
        width, d, dk = rope.table_width, qkv.value_dim, qkv.head_dim
    else:  # (multi-head latent attention: RoPE on `rope` channels, values of their own size)
        rope, width, d = None, mla.rope // (2 if mla.complex_tables else 1), mla.v_dim
        dk = mla.nope + mla.rope

    def refused(why: str) -> str:  # (what the probe showed, remembered)
        _MISMATCHES.setdefault(attn, {})[(queries, tables)] = why
        return why

    g = torch.Generator().manual_seed(0)
    t, hq = 5, head_counts(attn)[0]
    x = torch.randn(1, t, attention_in_features(attn), generator=g).to(p)
    angle = torch.rand(1, t, width, generator=g) * 3 + 0.5
    cos, sin = angle.cos().to(p), angle.sin().to(p)
    if not tables:
        given = None
    elif rope is not None:
        given = rope.module_tables(cos, sin)
    else:
        given = torch.complex(cos.float(), sin.float()) if mla.complex_tables else (cos, sin)
    cos0, sin0 = (cos[0], sin[0]) if tables else (None, None)
    attn._fl_probe_answer = torch.randn(1, t, hq, d, generator=g).to(p)
    previous, training = cfg._attn_implementation_internal, attn.training
    # (the module's own computation is checked: an override fastlayers installed, the INT4
    # rounding of apply_rope_aware_kv's expand_kv, set aside while it runs; a module copied
    # after the checks, or unpickled, is checked afresh, its override already in place)
    own = {n: attn.__dict__.pop(n) for n in _OWN_OVERRIDES if n in attn.__dict__}
    try:
        cfg._attn_implementation_internal = _PROBE
        attn.eval()
        with torch.no_grad():
            mask = None  # (a DSA indexer reads the mask: a causal one, all its top-k visible)
            if sparse_indexer(attn) is not None:
                future = torch.ones(t, t, dtype=torch.bool).triu(1)
                mask = torch.zeros(1, 1, t, t).to(p).masked_fill(future, torch.finfo(p.dtype).min)
            out = attn(hidden_states=x, position_embeddings=given, attention_mask=mask,
                       **_probe_extras(attn, t))[0]  # fmt: skip
            places = (False, True) if qk_norms(attn)[0] is not None else (False,)
            at = torch.arange(t) + _PROBE_PLACE  # (the probe's positions and cache columns)
            candidates = {a: attention_qkv(attn, x[0], cos0, sin0, a, at, at) for a in places}
            o, gate = attn._fl_probe_answer[0].reshape(t, hq * d), candidates[False][3]
            mine = {}  # (a g_proj gate: softplus (Laguna) or sigmoid (LFM3), told apart here)
            for sigmoid in (False, True) if _has(attn, "g_proj") else (False,):
                _G_PROJ_SIGMOID[attn] = sigmoid
                mine[sigmoid] = attention_output(attn, o, x[0], gate)
        query, key, value, kwargs = attn._fl_probe_seen
    except Exception as e:  # noqa: BLE001 (said, not raised: the caller refuses the module)
        return refused(f"{name} could not be run to check it ({type(e).__name__}: {e})")
    finally:
        cfg._attn_implementation_internal = previous
        attn.train(training)
        for extra in ("_fl_probe_answer", "_fl_probe_seen"):
            attn.__dict__.pop(extra, None)
        attn.__dict__.update(own)
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2

    def differs(got, want):
        want = want[0].transpose(0, 1) if want.dim() == 4 else want[0]
        return got.shape != want.shape or not torch.allclose(got.float(), want.float(), tol, tol)

    # the q/k norms' place: the one whose queries and keys the module's are (HunYuan: after RoPE)
    def agrees(q, k):
        return (not queries or not differs(q, query)) and not differs(k, key)

    after = next((a for a, (q, k, _, _) in candidates.items() if agrees(q, k)), False)
    q, k, v, _ = candidates[after]
    sigmoid = next((act for act, got in mine.items() if not differs(got, out)), False)
    _G_PROJ_SIGMOID[attn] = sigmoid
    for what, got, want in (("queries", q, query), ("keys", k, key), ("values", v, value),
                            ("output", mine[sigmoid], out)):  # fmt: skip
        if what == "queries" and not queries:
            continue
        if differs(got, want):
            return refused(f"{name}'s {what} are not what fastlayers computes from its submodules")
    _QK_AFTER_ROPE[attn] = after
    scaling = kwargs.get("scaling")
    scaling = dk**-0.5 if scaling is None else scaling
    if abs(scaling - attn.scaling) > 1e-6 * abs(scaling):
        return refused(
            f"{name} scales its scores by {scaling}, not its scaling attribute {attn.scaling}"
        )
    if kwargs.get("softcap") != logit_softcap(attn):
        return refused(
            f"{name} caps its scores at {kwargs.get('softcap')}, not {logit_softcap(attn)}"
        )
    given, sinks = kwargs.get("s_aux"), attention_sinks(attn)
    if (given is None) != (sinks is None) or (given is not None and not torch.equal(given, sinks)):
        return refused(f"{name}'s attention is given other sinks (s_aux) than its sinks parameter")
    _MATCHES[attn] = (*passed, (queries, tables))
    return None


# instance attributes fastlayers installs on an attention module, which attention_mismatch's probe
# sets aside (quant.apply_rope_aware_kv's expand_kv of multi-head latent attention)
_OWN_OVERRIDES = ("expand_kv",)
# the modules attention_mismatch passed, with the (queries, tables) of each check they passed
_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the modules attention_mismatch's probe refused: {(queries, tables): the mismatch}
_MISMATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_mismatch_either_way(attn: torch.nn.Module, tables: bool,
                                  queries: bool = True) -> str | None:  # fmt: skip
    """:func:`attention_mismatch` given RoPE tables and given None, ``tables`` (the model's way)
    first: None when either passes (a model may give some layers no tables: LaraMini's global
    layers), so the callers check which one each call is given (:func:`checked_with_tables`);
    else the mismatch of the model's way."""
    why = attention_mismatch(attn, queries=queries, tables=tables)
    other = attention_mismatch(attn, queries=queries, tables=not tables)
    return None if why is None or other is None else why


def model_gives_tables(model) -> bool:
    """Whether ``model`` gives its layers RoPE tables (``position_embeddings``) from a rotary
    embedding of its own; Granite 4's hybrids have none and give None."""
    return isinstance(getattr(inner_model(model), "rotary_emb", None), torch.nn.Module)


def checked_with_tables(attn: torch.nn.Module, tables: bool) -> bool:
    """Whether :func:`attention_mismatch` passed ``attn`` given RoPE tables (``tables``) or None."""
    return any(t == tables for _, t in _MATCHES.get(attn, ()))


_QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm",
                  "key_layernorm")  # fmt: skip
# one norm module for both (Llama 4's weightless L2 norm ``qk_norm``, after RoPE)
_SHARED_QK_NORM = "qk_norm"
_QK_AFTER_ROPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def qk_norms_after_rope(attn: torch.nn.Module) -> bool:
    """Whether ``attn`` applies its q/k norms after RoPE (HunYuan) rather than before (Qwen3,
    Gemma 3, OLMo 2, StableLM, ...): found by :func:`attention_mismatch`, which tries both."""
    return _QK_AFTER_ROPE.get(attn, False)


def qk_norms(attn: torch.nn.Module):
    """``(q_norm, k_norm)`` applied between the projections and RoPE (Qwen3, Gemma 3 per head;
    OLMo 2 over the whole projection; StableLM's and Phi's ``q_layernorm`` / ``k_layernorm``,
    LayerNorms per head; HunYuan's ``query_layernorm`` / ``key_layernorm``, after RoPE:
    :func:`qk_norms_after_rope`; Llama 4's one ``qk_norm`` for both, after RoPE), or
    ``(None, None)``."""
    shared = getattr(attn, _SHARED_QK_NORM, None)
    if isinstance(shared, torch.nn.Module):
        return shared, shared
    for i in range(0, len(_QK_NORM_NAMES), 2):
        q, k = (getattr(attn, n, None) for n in _QK_NORM_NAMES[i : i + 2])
        if isinstance(q, torch.nn.Module) and isinstance(k, torch.nn.Module):
            return q, k
    return None, None


def _qk_norm_form(norm: torch.nn.Module, heads: int, head_dim: int) -> str | None:
    """How ``norm`` applies to ``[..., heads, head_dim]``: ``"head"`` (one norm over each head's
    channels; a norm without parameters or width is taken so), ``"projection"`` (over all heads'
    channels, OLMo 2), ``"per_head"`` (a norm of its own for each head, ``norm.norms``:
    StableLM), or None (none of these)."""
    own = getattr(norm, "norms", None)
    if isinstance(own, torch.nn.ModuleList):
        widths = {_norm_width(n) for n in own}
        return "per_head" if len(own) == heads and widths == {head_dim} else None
    width = _norm_width(norm)
    if width is None and not any(True for _ in norm.parameters()):
        return "head"  # (NanoChat's RMSNorm without weights: the module check confirms it)
    return {head_dim: "head", heads * head_dim: "projection"}.get(width)


def _norm_width(norm: torch.nn.Module) -> int | None:
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    shape = getattr(norm, "normalized_shape", None)  # (a LayerNorm without affine weight)
    return shape[-1] if isinstance(shape, tuple) and len(shape) == 1 else None


def apply_qk_norm(norm, t: torch.Tensor) -> torch.Tensor:
    """``norm`` on ``t [..., heads, head_dim]`` in its form (:func:`_qk_norm_form`); ValueError
    for a norm of none of them (:func:`attention_unsupported` refuses those up front)."""
    if norm is None:
        return t
    form = _qk_norm_form(norm, t.shape[-2], t.shape[-1])
    if form == "head":
        return norm(t)
    if form == "projection":
        return norm(t.flatten(-2)).view(t.shape)
    if form == "per_head":
        return torch.stack([n(t[..., i, :]) for i, n in enumerate(norm.norms)], -2)
    raise ValueError(f"{type(norm).__name__} normalises neither each of {t.shape[-2]} heads of "
                     f"{t.shape[-1]} channels nor their concatenation")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RopeLayout:
    """How a model's attention applies RoPE: which channels it rotates together (what the scale
    folding of the INT4 KV calibration must respect) and the model's own
    ``apply_rotary_pos_emb(q, k, cos, sin)``, which fastlayers calls on the rotated channels."""

    pairing: str  # "half" (rotate_half: c with c + r/2) or "interleaved" (2i with 2i + 1)
    apply: Callable | None  # None: the attention has no RoPE function (GPT-2: no RoPE at all)
    rotary_dim: int  # RoPE rotates channels [0, rotary_dim) of each head (partial RoPE: < head_dim)
    table_width: int  # its cos / sin tables: rotary_dim wide, or half (GPT-OSS: one per pair)
    complex_tables: bool = False  # the model gives complex tables cos + i sin (Llama 4)
    sin_first: bool = False  # the model gives its tables as (sin, cos) (GPT-J)

    def module_tables(self, cos: torch.Tensor, sin: torch.Tensor):
        """Tables ``(cos, sin)`` as the model gives them to its attention modules."""
        if self.complex_tables:
            return torch.complex(cos.float(), sin.float())
        return (sin, cos) if self.sin_first else (cos, sin)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``(q, k)`` with the model's RoPE on their first ``rotary_dim`` channels, the others
        passed through (StableLM, GLM, Nemotron and Phi rotate the leading channels); ``cos`` /
        ``sin`` are the model's tables (``table_width`` wide), in the layout its function takes."""
        r = self.rotary_dim
        if self.apply is None:
            raise ValueError("this attention has no RoPE function to rotate with")
        if r == q.shape[-1]:
            return self.apply(q, k, cos, sin)
        qr, kr = self.apply(q[..., :r], k[..., :r], cos, sin)
        return torch.cat([qr, q[..., r:]], -1), torch.cat([kr, k[..., r:]], -1)


def rope_layout(attn: torch.nn.Module, what: str = "this function") -> RopeLayout:
    """The RoPE layout of ``attn``: the fraction of each head it rotates (the config's
    ``partial_rotary_factor`` or the module's ``rotary_ndims`` / ``rotary_dim``), and its
    pairing, read by probing the model's own ``apply_rotary_pos_emb`` (from the module that
    defines ``attn``'s class);
    ValueError for a pairing that is neither rotate-half nor interleaved."""
    name, d = type(attn).__name__, head_dim_of(attn)
    factor = _rotary_fraction(attn)
    r = int(d * factor)  # (Hugging Face's rotary dim: int(head_dim * partial_rotary_factor))
    if not 0 < r <= d or r % 2:
        raise ValueError(f"{what}: {name} rotates {factor:g} of its {d}-channel heads, not an "
                         "even number of channels")  # fmt: skip
    layout = _probe_rope(type(attn), r)
    if isinstance(layout, str):
        raise ValueError(f"{what}: {name}{layout}")
    return layout


_APPLIES_ROPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applies_rope(attn: torch.nn.Module, table_width: int, complex_tables: bool = False) -> bool:
    """Whether ``attn`` rotates its queries and keys at all: False for NoPE layers (EXAONE 4's
    global layers, SmolLM3's ``no_rope_layers``), read by running the module once on a few random
    tokens with RoPE tables of a random angle and of angle 0 (the same output: no RoPE).
    Remembered per module; True where the probe cannot run it."""
    known = _APPLIES_ROPE.get(attn)
    if known is not None:
        return known
    training = attn.training
    try:
        attn.eval()  # (no dropout in the probe)
        p = activation_like(attn)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, qkv_projections(attn).in_features, generator=g).to(p)
        angle = torch.rand(1, 4, table_width, generator=g) * 3 + 0.5

        sin_first = _sin_first(type(attn))  # (GPT-J's tables: (sin, cos))

        def run(cos, sin):
            emb = (sin.to(p), cos.to(p)) if sin_first else (cos.to(p), sin.to(p))
            emb = torch.complex(cos, sin) if complex_tables else emb
            return attn(hidden_states=x, position_embeddings=emb, attention_mask=None,
                        **_probe_extras(attn, 4))[0]  # fmt: skip

        with torch.no_grad():
            turned = run(angle.cos(), angle.sin())
            still = run(torch.ones_like(angle), torch.zeros_like(angle))
        result = not torch.equal(turned, still)
    except Exception:  # noqa: BLE001 (a module this probe cannot call: assume it rotates)
        result = True
    finally:
        attn.train(training)
    _APPLIES_ROPE[attn] = result
    return result


def cos_sin(tables, attn: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of RoPE tables as a model gives them (to ``attn``'s layer): a pair, GPT-J's
    pair ``(sin, cos)``, or Llama 4's complex ``cos + i sin`` (``freqs_cis``, one entry per
    pair)."""
    if isinstance(tables, torch.Tensor) and tables.is_complex():
        return tables.real, tables.imag
    if attn is not None and _sin_first(type(attn)):
        return tables[1], tables[0]
    return tables


def _one_tensor_signature(fn) -> bool:
    """Whether ``fn`` is GPT-J's / CodeGen's ``apply_rotary_pos_emb(tensor, sin, cos)``."""
    try:
        return list(inspect.signature(fn).parameters)[:3] == ["tensor", "sin", "cos"]
    except (TypeError, ValueError):
        return False


def _sin_first(cls: type) -> bool:
    """Whether attention class ``cls`` takes its RoPE tables as ``(sin, cos)``: GPT-J and CodeGen,
    whose ``apply_rotary_pos_emb(tensor, sin, cos)`` rotates one tensor."""
    known = _SIN_FIRST.get(cls)
    if known is None:
        fn = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        known = _SIN_FIRST[cls] = callable(fn) and _one_tensor_signature(fn)
    return known


# (per class, the probes' outcomes: plain dicts, which torch.compile reads as they are, where it
# traced through an lru_cache's function, probe and all: graph breaks on a data-dependent
# aten.equal in each routed layer)
_SIN_FIRST: dict[type, bool] = {}


def _one_tensor_rope(fn: Callable) -> Callable:
    """GPT-J's ``apply_rotary_pos_emb(tensor [B, T, H, d], sin, cos)`` (tables ``[B, T, d/2]``, one
    entry per interleaved pair) as ``apply_rotary_pos_emb(q, k, cos, sin)``: ``q`` / ``k``
    ``[B, H, T, d]``, or ``[n, H, d]`` with tables ``[n, d/2]`` (routed attention's tokens)."""

    def apply(q, k, cos, sin):
        if q.dim() == 3:  # (tokens as the sequence of one batch row)
            return fn(q[None], sin[None], cos[None])[0], fn(k[None], sin[None], cos[None])[0]
        return (fn(q.transpose(1, 2), sin, cos).transpose(1, 2),
                fn(k.transpose(1, 2), sin, cos).transpose(1, 2))  # fmt: skip

    return apply


def _complex_rope(fn: Callable) -> Callable:
    """Llama 4's ``apply_rotary_emb(xq [B, T, H, d], xk, freqs_cis [B, T, d/2])`` (complex
    products of consecutive channel pairs) as ``apply_rotary_pos_emb(q, k, cos, sin)``: ``q`` /
    ``k`` ``[B, H, T, d]`` with tables ``[B, T, d/2]``, or ``[n, H, d]`` with tables
    ``[n, d/2]`` (routed attention's tokens)."""

    def apply(q, k, cos, sin):
        freqs = torch.complex(cos.float(), sin.float())
        if q.dim() == 3:  # (tokens as the sequence of one batch row)
            qo, ko = fn(q[None], k[None], freqs[None])
            return qo[0], ko[0]
        qo, ko = fn(q.transpose(1, 2), k.transpose(1, 2), freqs)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return apply


def layer_type(attn: torch.nn.Module) -> str | None:
    """The layer's attention type as Hugging Face models index their per-type RoPE tables and
    masks: ``config.layer_types[layer_idx]`` (Gemma 3, OLMo 3, ...), else the module's own
    ``layer_type``, else None."""
    types, idx = getattr(attn.config, "layer_types", None), getattr(attn, "layer_idx", None)
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types):
        return types[idx]
    return getattr(attn, "layer_type", None)


def rope_tables(rotary: torch.nn.Module, attn: torch.nn.Module, x, positions):
    """The model's RoPE tables ``(cos, sin)`` for ``attn``'s layer at ``positions``: its rotary
    embedding, given the layer's type where its forward takes one (per-type RoPE parameters:
    Gemma 3's local and global layers, OLMo 3)."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(x, positions, layer_type(attn))
    return rotary(x, positions)


def _rotary_fraction(attn: torch.nn.Module) -> float:
    """The fraction of each head RoPE rotates: the config's ``partial_rotary_factor`` (top level,
    or in ``rope_parameters`` as transformers 5 keeps it, or in the layer type's entry there:
    MiMo-V2-Flash's), or the module's ``rotary_ndims``."""
    cfg = getattr(attn, "config", None)
    factor = getattr(cfg, "partial_rotary_factor", None)
    params = getattr(cfg, "rope_parameters", None)
    if factor is None and isinstance(params, dict):
        kind = getattr(attn, "layer_type", None)
        types, idx = getattr(cfg, "layer_types", None), getattr(attn, "layer_idx", None)
        if kind is None and isinstance(types, (list, tuple)) and isinstance(idx, int) and \
                0 <= idx < len(types):  # fmt: skip
            kind = types[idx]
        per_type = params.get(kind) if isinstance(kind, str) else None
        for entry in (params, per_type):
            # (proportional RoPE, LFM3's global layers: tables of the whole head whatever the
            # factor, the channels past it turned by zero frequencies)
            if isinstance(entry, dict) and factor is None and \
                    entry.get("rope_type") != "proportional":  # fmt: skip
                factor = entry.get("partial_rotary_factor")
    ndims, d = getattr(attn, "rotary_ndims", None), head_dim_of(attn)
    if ndims is None:  # (GPT-J, CodeGen: rotary_dim, None for the whole head)
        ndims = getattr(attn, "rotary_dim", None)
    if factor is None and isinstance(ndims, int) and isinstance(d, int) and d > 0:
        factor = ndims / d
    return 1.0 if factor is None else float(factor)


def _probe_rope(cls: type, r: int) -> RopeLayout | str:
    """:func:`_probe_rope_uncached`, once per class and rotated width."""
    known = _ROPE_PROBES.get((cls, r))
    if known is None:
        known = _ROPE_PROBES[(cls, r)] = _probe_rope_uncached(cls, r)
    return known


_ROPE_PROBES: dict[tuple[type, int], RopeLayout | str] = {}


def _probe_rope_uncached(cls: type, r: int) -> RopeLayout | str:
    """The RoPE layout of attention class ``cls`` rotating ``r`` channels, or why there is none.
    Each channel's unit vector through the model's function at a quarter turn (cos 0, sin 1 in
    every table entry, whatever layout the function expects its tables in: GLM's takes the
    rotate-half layout and interleaves it) gives the partner map, checked against each pairing's
    ``(a, b) -> (-b, a)`` (or its inverse); no turn (cos 1, sin 0) must give the channels back.
    Tables ``r`` wide first, then ``r / 2`` (GPT-OSS: one entry per pair). A module with no RoPE
    function next to it (GPT-2) gets a layout without one (``apply`` None): it rotates nothing,
    which :func:`attention_mismatch` checks like the rest."""
    from fastlayers.quant.rope_kv import PAIRINGS, rotate_pairs

    module = sys.modules.get(cls.__module__)
    fn, complex_tables = getattr(module, "apply_rotary_pos_emb", None), False
    sin_first = _sin_first(cls)
    if sin_first:  # (GPT-J: one tensor at a time, tables (sin, cos))
        fn = _one_tensor_rope(fn)
    native = getattr(module, "apply_rotary_emb", None)
    if (
        not callable(fn)
        and callable(native)
        and list(inspect.signature(native).parameters)[:3] == ["xq", "xk", "freqs_cis"]
    ):  # (Llama 4: complex tables)
        fn, complex_tables = _complex_rope(native), True
    if not callable(fn):  # (no RoPE: GPT-2; attention_mismatch sees any rotation it does)
        return RopeLayout("half", None, r, r)
    eye = torch.eye(r)[None, None]  # [B, H, T = r, r]: token c is channel c's unit vector
    failed = None
    for width in (r, r // 2):
        ones, zeros = torch.ones(1, r, width), torch.zeros(1, r, width)  # [B, T, width]
        try:
            turned = fn(eye, eye, zeros, ones)[1].float()
            still = fn(eye, eye, ones, zeros)[1].float()
        except Exception as e:  # noqa: BLE001 (tables of another width: the next one, or said)
            failed = failed or e
            continue
        if not torch.equal(still, eye):
            return "'s apply_rotary_pos_emb does not return the channels unrotated at angle 0"
        for pairing in PAIRINGS:  # (either direction: NanoChat rotates by -angle)
            partner = rotate_pairs(eye, pairing)
            if torch.equal(turned, partner) or torch.equal(turned, -partner):
                return RopeLayout(pairing, fn, r, width, complex_tables, sin_first)
        return "'s RoPE pairs channels neither as rotate-half nor interleaved"
    return f"'s apply_rotary_pos_emb failed on a probe ({type(failed).__name__}: {failed})"
