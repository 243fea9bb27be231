# SPDX-License-Identifier: Apache-2.0
"""Decode attention over an INT4 KV cache (FireQ format, :mod:`fastlayers.quant.rope_kv`).

``int4_kv_decode(q [B, Hq, d], k, k_scale, v, v_scale, length=None, scale=None, starts=None,
softcap=None)`` with the cache as uint8 ``[B, Hkv, T, d/2]`` and FP8 scales ``[B, Hkv, T, d/g]``
(values: ``[B, Hkv, T, dv/2]`` and ``[.., dv/g]``, ``dv`` the keys' ``d`` or a head size of their
own, one group ``g``):
one query token per sequence against the first ``length`` cached tokens (from token ``starts[b]``
on for row ``b`` when given: left padding); GQA (``Hq % Hkv == 0``); optional logit soft-capping
(``softcap``, Gemma 2); fp32 softmax. Returns ``(out [B, Hq, dv] in q's dtype, lse [B, Hq]
fp32)``. CPU and CUDA (split-KV; an even head_dim up to 256 with an even ``dv`` up to ``d``, or
multi-head latent attention's 576 / 512) kernels; elsewhere the reference
(dequantize, then softmax attention).
"""

from __future__ import annotations

import math

import torch

from fastlayers import _dtypes, _ext
from fastlayers.ops._common import (
    LIB,
    apply_sinks,
    check_index_range,
    check_int,
    check_no_alias,
    check_scale_softcap,
    check_sinks,
    check_tensor,
    check_tensors,
    device_code,
    device_guard,
    direct_call_ok,
    empty,
    has_kernel,
    no_dispatch_modes,
    on_cpu,
    on_cuda,
    plain_tensors,
    ptr,
    register_no_backward,
    stream_of,
)
from fastlayers.quant.kv_cache import buffers_layout_ok
from fastlayers.quant.rope_kv import (
    PAIRINGS,
    apply_rope,
    dequantize_kv_int4,
    quantize_kv_int4,
    quantize_q_fp8,
)
from fastlayers.reference.skip import attention_weights

FP8 = torch.float8_e4m3fn

LIB.define(
    "kv_quantize(Tensor x, Tensor? post_scale, int group_size, Tensor? cos=None, Tensor? sin=None,"
    " str pairing='half') -> (Tensor, Tensor)"
)
LIB.define(
    "kv_cache_write(Tensor x, Tensor(a!) packed, Tensor(b!) scales, int start, Tensor? post_scale,"
    " Tensor? cos=None, Tensor? sin=None, str pairing='half') -> ()"
)
LIB.define(
    "q_quantize(Tensor q, Tensor? scale, Tensor? cos=None, Tensor? sin=None, str pairing='half',"
    " bool fp8=True) -> Tensor"
)
LIB.define(
    "int4_kv_decode(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, int length,"
    " float scale, Tensor? starts=None, float softcap=0.0, int num_splits=0) -> (Tensor, Tensor)"
)
LIB.define(
    "int4_kv_attention(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, int length,"
    " float scale, float softcap=0.0, Tensor? starts=None) -> (Tensor, Tensor)"
)
register_no_backward("kv_quantize", "q_quantize", "int4_kv_decode", "int4_kv_attention")


def _check(q, k, k_scale, v, v_scale, length, scale, q_tokens: bool = False, softcap=0.0) -> None:
    for t, name in ((q, "q"), (k, "k"), (k_scale, "k_scale"), (v, "v"), (v_scale, "v_scale")):
        check_tensor(t, name)
    want = "[batch, q_heads, q_tokens, head_dim]" if q_tokens else "[batch, q_heads, head_dim]"
    if q.dim() != (4 if q_tokens else 3) or q.dtype not in _dtypes.QUERIES:
        raise ValueError(
            f"q must be a float32/float16/bfloat16/float64 {want}, got {q.dtype} {tuple(q.shape)}"
        )
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    if k.dtype != torch.uint8 or k.dim() != 4 or k.shape[0] != b or k.shape[3] * 2 != d:
        raise ValueError(
            f"k must be uint8 [{b}, kv_heads, tokens, {d // 2}], got {k.dtype} {tuple(k.shape)}"
        )
    if v.dtype != torch.uint8 or v.dim() != 4 or v.shape[:3] != k.shape[:3] or not v.shape[3]:
        raise ValueError(
            f"v must be uint8 [{b}, {k.shape[1]}, {k.shape[2]}, value_head_dim / 2] (k's batch, "
            f"kv heads and tokens), got {v.dtype} {tuple(v.shape)}"
        )
    for t, name in ((k, "k"), (k_scale, "k_scale"), (v, "v"), (v_scale, "v_scale")):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    hkv, t_max = k.shape[1], k.shape[2]
    if not hkv or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv}, k.shape[1] > 0)")
    dv = v.shape[3] * 2
    for s, name, width in ((k_scale, "k_scale", d), (v_scale, "v_scale", dv)):
        bad_shape = (
            s.dim() != 4 or tuple(s.shape[:3]) != (b, hkv, t_max) or not s.shape[3]
            or width % s.shape[3]
        )  # fmt: skip
        if s.dtype != FP8 or bad_shape:
            what = "head_dim" if name == "k_scale" else "value_head_dim"
            raise ValueError(
                f"{name} must be float8_e4m3fn [{b}, {hkv}, {t_max}, {what} / group], got "
                f"{s.dtype} {tuple(s.shape)}"
            )
    if d * v_scale.shape[3] != dv * k_scale.shape[3]:  # the kernels take one group size
        raise ValueError(
            f"k_scale {tuple(k_scale.shape)} and v_scale {tuple(v_scale.shape)} must have one "
            f"quantization group for keys ({d} channels) and values ({dv})"
        )
    if (d // k_scale.shape[3]) % 2:
        raise ValueError("the quantization group must be even")
    if not 0 <= length <= t_max:
        raise ValueError(f"length must be in [0, {t_max}], got {length}")
    if q_tokens and not (q.shape[2] <= length or q.shape[2] == 0):
        raise ValueError(
            f"q has {q.shape[2]} tokens but the cache only {length}: the new tokens must be cached"
        )
    check_scale_softcap(scale, softcap)


def _softcapped(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's logit soft-capping of scaled scores (``softcap`` 0: none)."""
    return softcap * torch.tanh(s / softcap) if softcap else s


def _check_starts(starts, q, length: int, check_range: bool = True) -> None:
    """``starts``: None or int32 ``[batch]`` on q's device with values in ``[0, length]`` (the range
    needs the host: not checked while a CUDA graph is captured; the kernels clamp it)."""
    if starts is None:
        return
    check_tensor(starts, "starts")
    if starts.dtype != torch.int32 or tuple(starts.shape) != (q.shape[0],):
        raise ValueError(
            f"starts must be int32 [{q.shape[0]}] (one per batch row), got {starts.dtype} "
            f"{tuple(starts.shape)}"
        )
    if starts.device != q.device:
        raise ValueError(f"starts is on {starts.device} but q is on {q.device}")
    if check_range:
        check_index_range(starts, "starts", 0, length, f"[0, {length}] (length)")


def _with_sink(lse: torch.Tensor, sinks) -> torch.Tensor:
    """The log-denominator ``lse [B, Hq(, Tq)]`` with the attention sinks' logits added (keys of
    zero value): the references' own formulation, not the ops' rescaling of the output."""
    if sinks is None:
        return lse
    sink = sinks.to(lse.dtype).reshape(1, -1, *([1] * (lse.dim() - 2)))
    return torch.logaddexp(lse, sink.expand_as(lse))


def _reference(q, k, k_scale, v, v_scale, length, scale, starts=None, softcap=0.0, sinks=None):
    _check(q, k, k_scale, v, v_scale, length, scale, softcap=softcap)
    _check_starts(starts, q, length)
    b, hq, d = q.shape
    dt = _reference_dtype(q)
    keys = dequantize_kv_int4(k[:, :, :length], k_scale[:, :, :length], dt)
    values = dequantize_kv_int4(v[:, :, :length], v_scale[:, :, :length], dt)
    rep = hq // k.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    s = _softcapped(torch.einsum("bhd,bhtd->bht", q.to(dt), keys) * scale, softcap)
    if length == 0:
        lse = torch.full((b, hq), -math.inf, device=q.device)
        return q.new_zeros(b, hq, values.shape[-1]), _with_sink(lse, sinks)
    seen = torch.ones(1, 1, length, dtype=torch.bool, device=q.device)
    if starts is not None:  # left padding: row b sees tokens starts[b] .. length - 1
        seen = (torch.arange(length, device=q.device)[None, :] >= starts[:, None].long())[:, None]
        s = s.masked_fill(~seen, -math.inf)
        values = values.masked_fill(~seen[..., None], 0.0)  # (never read, as in the kernels)
    lse = _with_sink(torch.logsumexp(s, -1), sinks)
    # a row that sees no token: zeros (lse -inf, or the sink's)
    p = attention_weights(s, seen, None if sinks is None else sinks.to(dt).reshape(1, -1, 1))
    out = torch.einsum("bht,bhtd->bhd", p, values)
    return out.to(q.dtype), lse.float()


def _reference_dtype(q: torch.Tensor) -> torch.dtype:
    """What the references compute in: float64 for a float64 query (a float64 reference; it was
    fp32 scores whatever the query, whose matmul's last bits vary from call to call with the
    library's blocking: 4e-5 apart in one call of ten), else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _reference_op(q, k, k_scale, v, v_scale, length, scale, starts=None, softcap=0.0, num_splits=0):
    """The op's reference implementation (``num_splits``, a CUDA work split, changes nothing)."""
    _check_num_splits(num_splits)
    return _reference(q, k, k_scale, v, v_scale, length, scale, starts, softcap)


def _check_num_splits(num_splits) -> int:
    num_splits = check_int(num_splits, "num_splits")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: chosen by the length), got {num_splits}")
    return num_splits


def _attention_reference(q, k, k_scale, v, v_scale, length, scale, softcap=0.0, sinks=None,
                         starts=None):  # fmt: skip
    """Causal attention of ``q [B, Hq, Tq, d]``: query i is the cache's token length - Tq + i;
    ``sinks [Hq]``: a logit per head in the softmax's denominator; ``starts [B]``: batch row b's
    tokens before ``starts[b]`` hidden (left padding; a query that sees no token: zeros, lse
    -inf)."""
    _check(q, k, k_scale, v, v_scale, length, scale, q_tokens=True, softcap=softcap)
    _check_starts(starts, q, length)
    b, hq, tq, d = q.shape
    dt = _reference_dtype(q)
    keys = dequantize_kv_int4(k[:, :, :length], k_scale[:, :, :length], dt)
    values = dequantize_kv_int4(v[:, :, :length], v_scale[:, :, :length], dt)
    rep = hq // k.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    s = _softcapped(torch.einsum("bhqd,bhtd->bhqt", q.to(dt), keys) * scale, softcap)
    visible = torch.arange(length, device=q.device)[None, :] <= (
        length - tq + torch.arange(tq, device=q.device)[:, None]
    )
    visible = visible[None, None]
    if starts is not None:
        shown = torch.arange(length, device=q.device)[None, :] >= starts.long()[:, None]
        visible = visible & shown[:, None, None, :]
        values = values.masked_fill(~shown[:, None, :, None], 0.0)  # (unread, as in the kernels)
    s = s.masked_fill(~visible, -math.inf)
    lse = _with_sink(torch.logsumexp(s, -1), sinks)
    # non-finite scores propagate as NaN (as in the decode reference and SDPA; a nan_to_num here
    # turned those rows into zeros); a query that sees no key (left padding) gets zeros
    p = attention_weights(s, visible, None if sinks is None else sinks.to(dt).reshape(1, -1, 1, 1))
    out = torch.einsum("bhqt,bhtd->bhqd", p, values)
    return out.to(q.dtype), lse.float()


def _attention_kernel(q, k, k_scale, v, v_scale, length, scale, softcap=0.0, starts=None):
    _check(q, k, k_scale, v, v_scale, length, scale, q_tokens=True, softcap=softcap)
    _check_starts(starts, q, length)
    device = q.device
    workspace = None
    if q.dtype == torch.float64:  # (the reference: float64 throughout, as without kernels)
        return _attention_reference(q, k, k_scale, v, v_scale, length, scale, softcap,
                                    starts=starts)  # fmt: skip
    if on_cuda(device) and has_kernel(device, "int4_kv_decode"):
        floats = _cuda_workspace("int4_kv_attention", q, k, v, max(length, 1))
        if floats == 0:
            return _attention_reference(q, k, k_scale, v, v_scale, length, scale, softcap,
                                        starts=starts)  # fmt: skip
        if q.shape[2] == 1:  # one query token: the split-KV decode kernel, which needs one
            workspace = empty((floats,), torch.float32, device)
    elif device.type not in ("cpu", "cuda") or not has_kernel(device, "int4_kv_decode"):
        return _attention_reference(q, k, k_scale, v, v_scale, length, scale, softcap,
                                    starts=starts)  # fmt: skip
    out, lse = _run(q, k, k_scale, v, v_scale, length, scale, workspace, starts, softcap)
    return out.to(q.dtype), lse


def _run(q, k, k_scale, v, v_scale, length, scale, workspace=None, starts=None, softcap=0.0,
         num_splits=0, seq_lens=None, block_table=None, q_lens=None, q_starts=None,
         max_q=0):  # fmt: skip
    """The kernel on ``q [B, Hq, d]`` (decode) or ``[B, Hq, Tq, d]``: ``(out in q's shape with the
    values' head size last, lse [B, Hq(, Tq)] fp32)``; out in q's dtype on CPU (16-bit queries
    read and the output written as they are, no fp32 copies), fp32 on CUDA. ``num_splits``: the
    CUDA decode's (the workspace sized for them). Optional, decode and prefill: ``seq_lens``
    (int32 ``[B]``, each row's end) and ``block_table`` (int32 ``[B, max_pages]``: the cache
    tensors are then pages ``[num_pages, Hkv, page_size, .]``, ``length`` is
    ``max_pages * page_size``); prefill: ``q_lens`` (int32 ``[B]``, each row's query tokens, the
    rest padding), or ``q_starts`` (int32 ``[B + 1]``, ragged queries: ``q [T, Hq, d]``, row
    ``b``'s tokens ``q_starts[b] .. q_starts[b + 1] - 1``, at most ``max_q`` of them)."""
    hq, d = q.shape[1], q.shape[-1]
    if q_starts is not None:
        b, tq = q_starts.shape[0] - 1, max_q
    else:
        b, tq = q.shape[0], q.shape[2] if q.dim() == 4 else 1
    out_shape = (*q.shape[:-1], v.shape[3] * 2)
    hkv, t_max = k.shape[1], k.shape[2]
    device = q.device
    half = q.dtype in (torch.float16, torch.bfloat16)
    q32 = q16 = out16 = None
    if not on_cuda(device) and half:
        q16 = q.contiguous()
        out = out16 = empty(out_shape, q.dtype, device)
    else:
        q32 = q.float().contiguous()
        # CUDA with 16-bit queries: also pass them as they are (the tensor-core kernels' input;
        # the decode's then forms one fp16 product per score instead of two).
        if on_cuda(device) and half:
            q16 = q.contiguous()
        out = empty(out_shape, torch.float32, device)
    kc, ksc = k.contiguous(), k_scale.contiguous()
    (vc, v_row), (vsc, vs_row) = _token_rows(v), _token_rows(v_scale)  # (rows of any spacing)
    sc = starts.contiguous() if starts is not None else None
    lens = seq_lens.contiguous() if seq_lens is not None else None
    table = block_table.contiguous() if block_table is not None else None  # (held for the call)
    counts = q_lens.contiguous() if q_lens is not None else None
    cu = q_starts.contiguous() if q_starts is not None else None
    paged = {}
    if table is not None:  # (the pages' rows; t_max unused)
        paged = dict(block_table=ptr(table), block_stride=table.shape[1], page_size=t_max,
                     pages=k.shape[0])  # fmt: skip
    lse = empty(q.shape[:-1], torch.float32, device)
    if b * hq * tq * q.shape[0] == 0:
        return out, lse
    with device_guard(device):
        _c_int4_kv_decode(
            ptr(q32), ptr(kc), ptr(ksc), ptr(vc), ptr(vsc), 0 if out16 is not None else ptr(out),
            ptr(lse), b, hq, hkv, d, d // k_scale.shape[3], t_max, length, scale,
            device=device_code(device), workspace=ptr(workspace), stream=stream_of(device),
            q_tokens=tq, q16=ptr(q16), q16_dtype=_dtypes.code(q16.dtype) if q16 is not None else 0,
            out16=ptr(out16), starts=ptr(sc), softcap=softcap, dv=v.shape[3] * 2, v_row=v_row,
            v_scale_row=vs_row, splits=num_splits, lengths=ptr(lens), q_lens=ptr(counts),
            q_starts=ptr(cu), q_total=q.shape[0], **paged,
        )  # fmt: skip
    return out, lse


# The shapes the CUDA kernels take (int4_kv_decode_cuda_workspace answers 0 for the others).
_CUDA_SHAPES = (
    "an even head_dim up to 256 and values of an even number of channels no wider than the "
    "keys, or multi-head latent attention's 576 / 512"
)


def _cuda_workspace(op: str, q, k, v, length: int, num_splits: int = 0) -> int:
    """Floats of workspace the CUDA kernels need for ``op`` on this shape (``length`` cached
    tokens, the decode in ``num_splits`` splits, 0: the length's), or 0 where they do not take it
    (warned once per op: the reference runs)."""
    b, hq, d, hkv, dv = q.shape[0], q.shape[1], q.shape[-1], k.shape[1], v.shape[3] * 2
    floats = _ext.C.int4_kv_decode_cuda_workspace(b, hq, hkv, d, length, dv, num_splits)
    if floats == 0:
        _ext.warn_once(
            f"{op}-cuda-shape",
            f"fastlayers.{op}: head_dim {d} (values {dv}) with {hq // hkv} query heads per kv head "
            f"is not a CUDA kernel shape ({_CUDA_SHAPES}); running the PyTorch reference",
        )
    return floats


def _token_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t [B, H, T, w]`` as the kernels read it: ``(tensor, elements from one token to the
    next)``, 0 for a contiguous tensor; a view whose tokens are evenly spaced rows of ``w``
    contiguous elements (the keys' first channels: multi-head latent attention's latent) is
    read in place, anything else copied."""
    if t.is_contiguous():
        return t, 0
    b, h, n, w = t.shape
    row = t.stride(2)
    even = (
        n > 1 and (w == 1 or t.stride(3) == 1) and row >= w
        and (h == 1 or t.stride(1) == n * row) and (b == 1 or t.stride(0) == h * n * row)
    )  # fmt: skip
    return (t, row) if even else (t.contiguous(), 0)


def _kernel(q, k, k_scale, v, v_scale, length, scale, starts=None, softcap=0.0, num_splits=0):
    _check(q, k, k_scale, v, v_scale, length, scale, softcap=softcap)
    _check_starts(starts, q, length)
    num_splits = _check_num_splits(num_splits)
    device = q.device
    # (a float64 query: the reference, float64 throughout, as without kernels)
    if (device.type not in ("cpu", "cuda") or not has_kernel(device, "int4_kv_decode")
            or q.dtype == torch.float64):  # fmt: skip
        return _reference(q, k, k_scale, v, v_scale, length, scale, starts, softcap)
    workspace = None
    if on_cuda(device):  # split-KV: per-split partial outputs and lse
        floats = _cuda_workspace("int4_kv_decode", q, k, v, length, num_splits)
        if floats == 0:
            return _reference(q, k, k_scale, v, v_scale, length, scale, starts, softcap)
        workspace = empty((floats,), torch.float32, device)
    out, lse = _run(q, k, k_scale, v, v_scale, length, scale, workspace, starts, softcap,
                    num_splits)  # fmt: skip
    return out.to(q.dtype), lse


LIB.impl("int4_kv_decode", _kernel, "CPU")
LIB.impl("int4_kv_decode", _kernel, "CUDA")
LIB.impl("int4_kv_decode", _reference_op, "CompositeExplicitAutograd")
LIB.impl("int4_kv_attention", _attention_kernel, "CPU")
LIB.impl("int4_kv_attention", _attention_kernel, "CUDA")
LIB.impl("int4_kv_attention", _attention_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::int4_kv_attention", lib=LIB)
def _attention_fake(q, k, k_scale, v, v_scale, length, scale, softcap=0.0, starts=None):
    _check(q, k, k_scale, v, v_scale, length, scale, q_tokens=True, softcap=softcap)
    _check_starts(starts, q, length, check_range=False)
    out = q.new_empty((*q.shape[:3], v.shape[3] * 2))
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def _length_and_scale(q, k, k_scale, v, v_scale, length, scale) -> tuple[int, float]:
    """The public calls' defaults: ``length`` all cached tokens, ``scale`` ``head_dim ** -0.5``
    (after the checks those need)."""
    check_tensors(q=q, k=k, k_scale=k_scale, v=v, v_scale=v_scale)
    if q.dim() < 3 or q.shape[-1] == 0 or k.dim() != 4:
        raise ValueError(
            f"q must be [batch, q_heads, (q_tokens,) head_dim > 0] and k [batch, kv_heads, "
            f"tokens, head_dim / 2]; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    length = k.shape[2] if length is None else check_int(length, "length")
    return length, q.shape[-1] ** -0.5 if scale is None else float(scale)


def _softcap_arg(softcap) -> float:
    """``softcap`` as the ops take it: None is 0.0 (no capping); a real number, else TypeError."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    return float(softcap)


def int4_kv_attention(
    q, k, k_scale, v, v_scale, length: int | None = None, scale=None, softcap=None, sinks=None,
    starts=None,
):  # fmt: skip
    """Causal attention of several new tokens over the INT4 cache (prefill, or speculative
    verification): ``q [B, Hq, Tq, d]`` are the cache's tokens ``length - Tq .. length - 1``
    (already written to it); query ``i`` sees the cached tokens ``0 .. length - Tq + i``. Returns
    ``(out [B, Hq, Tq, dv] in q's dtype, lse [B, Hq, Tq] fp32)`` (``dv``: the values' head size,
    ``v.shape[3] * 2``; the keys' or one of their own). CPU kernel (keys and values
    dequantized per block in registers, online softmax) and CUDA kernels (head_dim 64, 80, 96,
    128 or 256 with ``dv == d``, and keys of 192 with values of 128: tensor cores, 64 queries x 64
    keys per tile, fp32 queries as fp16 hi + lo parts; multi-head latent attention's 576 / 512
    with the values read from the key rows or from rows of their own: tensor cores, 32 queries
    per tile, each warp a quarter of the channels; otherwise one warp per query row, the decode
    kernel's shapes);
    elsewhere the reference.
    ``softcap`` (Gemma 2's logit soft-capping): each scaled score ``s`` becomes
    ``softcap * tanh(s / softcap)`` before the softmax; None or 0 for none. ``sinks`` (GPT-OSS's
    attention sinks, floating ``[Hq]``): a logit per query head in the softmax's denominator,
    applied to the kernel's output through its lse (:func:`~fastlayers.ops._common.apply_sinks`).
    ``starts`` (optional, int32 ``[batch]``): batch row ``b``'s cached tokens before
    ``starts[b]`` are hidden from its queries (a left-padded prompt: the padding is skipped, not
    read); a query that sees no token (a padding position) gets zeros and lse -inf."""
    length, scale = _length_and_scale(q, k, k_scale, v, v_scale, length, scale)
    softcap = _softcap_arg(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    if direct_call_ok(q, k, k_scale, v, v_scale, starts):  # (without the dispatcher)
        out, lse = _attention_kernel(q, k, k_scale, v, v_scale, length, scale, softcap, starts)
    else:
        out, lse = torch.ops.fastlayers.int4_kv_attention(q, k, k_scale, v, v_scale, length,
                                                          scale, softcap, starts)  # fmt: skip
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks[:, None])


@torch.library.register_fake("fastlayers::int4_kv_decode", lib=LIB)
def _fake(q, k, k_scale, v, v_scale, length, scale, starts=None, softcap=0.0, num_splits=0):
    _check(q, k, k_scale, v, v_scale, length, scale, softcap=softcap)
    _check_num_splits(num_splits)
    _check_starts(starts, q, length, check_range=False)
    out = q.new_empty((*q.shape[:2], v.shape[3] * 2))
    return out, q.new_empty(q.shape[:2], dtype=torch.float32)


def int4_kv_decode(
    q, k, k_scale, v, v_scale, length: int | None = None, scale=None, starts=None, softcap=None,
    sinks=None, num_splits: int = 0,
):  # fmt: skip
    """See the module docstring. ``length`` defaults to all cached tokens, ``scale`` to
    ``head_dim ** -0.5``. ``starts`` (optional, int32 ``[batch]``): batch row ``b`` attends to the
    cached tokens ``starts[b] .. length - 1`` only (left-padded batches: the padding is skipped,
    not read); a row that sees no token gets zeros and lse -inf. ``softcap`` (Gemma 2's logit
    soft-capping): each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``; None or 0 for
    none. ``sinks`` (GPT-OSS's attention sinks, floating ``[Hq]``): a logit per query head in the
    softmax's denominator (applied through the lse: a row that sees no token keeps zeros, its
    lse becomes the sink).

    Work split (flash-decoding): one task per (batch row, kv head, slice of the group's query
    heads), each task's cached tokens in ranges whose softmax states merge after (split-KV): on
    CPU where the tasks are fewer than the threads, so the result depends on the thread count at
    rounding level (fp32 sums in another order; deterministic for a given count); on CUDA by the
    context length: one split per 256 cached tokens, at most 64, or ``num_splits`` of them when
    it is > 0 (as FlashAttention's ``flash_attn_with_kvcache``: 1 for none; clamped to 64 and to
    the length; a tuning knob, the result differs only in rounding; the CPU kernel ignores it).
    CUDA kernels: tensor cores for head_dim 64, 128 or 256 with ``dv == d`` and groups of a
    multiple of 16 channels, CUDA cores for the other supported shapes."""
    length, scale = _length_and_scale(q, k, k_scale, v, v_scale, length, scale)
    softcap = _softcap_arg(softcap)
    num_splits = _check_num_splits(num_splits)
    if starts is not None:
        check_tensor(starts, "starts")
    check_sinks(sinks, q.shape[1], q.device)
    if direct_call_ok(q, k, k_scale, v, v_scale, starts):  # the implementation, no dispatcher
        out, lse = _kernel(q, k, k_scale, v, v_scale, length, scale, starts, softcap, num_splits)
    else:
        out, lse = torch.ops.fastlayers.int4_kv_decode(q, k, k_scale, v, v_scale, length, scale,
                                                       starts, softcap, num_splits)  # fmt: skip
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)


def _check_rows(x, name: str) -> tuple[int, int, int, int]:
    """``x`` (keys, values or queries) a float32/float16/bfloat16 ``[batch, heads, tokens,
    head_dim]`` tensor; returns its shape."""
    check_tensor(x, name)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() != 4:
        heads = "heads" if name == "q" else "kv_heads"
        raise ValueError(
            f"{name} must be float32/float16/bfloat16 [batch, {heads}, tokens, head_dim], got "
            f"{x.dtype} {tuple(x.shape)}"
        )
    return x.shape


def _check_kv_quantize(
    x, post_scale, group_size, cos=None, sin=None, pairing="half", names=("x", "post_scale")
) -> None:
    xn, sn = names
    b, h, t, d = _check_rows(x, xn)
    if d == 0:  # (as the reference, quant.quantize_kv_int4)
        raise ValueError(f"{xn} must have head_dim > 0, got shape {tuple(x.shape)}")
    if group_size <= 0 or group_size % 2 or d % group_size:
        raise ValueError(f"head_dim {d} must be a multiple of an even group_size, got {group_size}")
    if post_scale is not None:
        check_tensor(post_scale, sn)
        if post_scale.dtype != torch.float32 or tuple(post_scale.shape) != (h, d):
            raise ValueError(
                f"{sn} must be float32 [{h}, {d}], got {post_scale.dtype} {tuple(post_scale.shape)}"
            )
        if post_scale.device != x.device:
            raise ValueError(f"{sn} is on {post_scale.device} but {xn} is on {x.device}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if cos is not None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        for tab, name in ((cos, "cos"), (sin, "sin")):
            check_tensor(tab, name)
            ok = tab.dim() in (2, 3) and tuple(tab.shape[-2:]) == (t, d)
            if not ok or (tab.dim() == 3 and tab.shape[0] not in (1, b)):
                lead = "1" if b == 1 else f"{b} or 1"
                raise ValueError(
                    f"{name} must be [{t}, {d}] or [{lead}, {t}, {d}] (tokens, head_dim), got "
                    f"{tuple(tab.shape)}"
                )
            if not tab.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {tab.dtype}")
            if tab.device != x.device:
                raise ValueError(f"{name} is on {tab.device} but {xn} is on {x.device}")
        if cos.shape != sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match")


def _kv_quantize_reference(x, post_scale, group_size, cos=None, sin=None, pairing="half"):
    _check_kv_quantize(x, post_scale, group_size, cos, sin, pairing)
    if cos is not None:
        x = apply_rope(x, cos, sin, pairing)  # fp32
    if post_scale is not None:
        x = x.float() * post_scale[None, :, None, :]  # in fp32, not rounded to x's dtype
    return quantize_kv_int4(x, group_size)


def _c_kv_quantize(
    x,
    rows,
    d,
    group,
    tokens,
    heads,
    dtype,
    *,
    device=0,
    post_scale=0,
    packed=0,
    scales=0,
    cos=0,
    sin=0,
    cos_batch_stride=0,
    interleaved=False,
    stream=0,
    out_tokens=0,
    out_start=0,
    q_out=0,
    q_fp8=True,
    slots=0,
    page_size=0,
    num_slots=0,
) -> None:
    """``_C.kv_quantize`` (csrc/bindings.cpp) on raw pointers: the one place that knows the order of
    its arguments (``slots`` int64, ``page_size``, ``num_slots``: a paged write, see kvint4.h)."""
    _ext.C.kv_quantize(device, x, post_scale, packed, scales, rows, d, group, tokens, heads, dtype,
                       cos, sin, cos_batch_stride, interleaved, stream, out_tokens, out_start,
                       q_out, q_fp8, slots, page_size, num_slots)  # fmt: skip


def _c_int4_kv_decode(
    q,
    k,
    k_scale,
    v,
    v_scale,
    out,
    lse,
    batch,
    hq,
    hkv,
    d,
    group,
    t_max,
    length,
    scale,
    *,
    device=0,
    workspace=0,
    stream=0,
    q_tokens=1,
    q16=0,
    q16_dtype=0,
    out16=0,
    starts=0,
    softcap=0.0,
    dv=0,
    v_row=0,
    v_scale_row=0,
    splits=0,
    lengths=0,
    block_table=0,
    block_stride=0,
    page_size=0,
    pages=0,
    q_lens=0,
    q_starts=0,
    q_total=0,
) -> None:
    """``_C.int4_kv_decode`` (csrc/bindings.cpp) on raw pointers: the one place that knows the order
    of its arguments (``dv``: the values' head size, 0 for ``d``; ``v_row`` / ``v_scale_row``: the
    elements from one value token to the next, 0 for rows of their own; ``splits``: the CUDA
    decode's, 0 for the length's; ``lengths``: int32 per-row ends; ``block_table`` ... ``pages``:
    a paged cache; ``q_lens``: int32 per-row query counts, prefill; ``q_starts`` / ``q_total``:
    ragged queries, ``[q_total, hq]`` rows, int32 row starts; see kvint4.h)."""
    _ext.C.int4_kv_decode(device, q, k, k_scale, v, v_scale, out, lse, batch, hq, hkv, d, group,
                          t_max, length, scale, workspace, stream, q_tokens, q16, q16_dtype, out16,
                          starts, softcap, dv, v_row, v_scale_row, splits, lengths, block_table,
                          block_stride, page_size, pages, q_lens, q_starts, q_total)  # fmt: skip


def _launch_quantize(
    x,
    scale,
    group,
    cos,
    sin,
    pairing,
    packed=None,
    scales=None,
    out_tokens=0,
    out_start=0,
    q_out=None,
    fp8=True,
    slots=None,
) -> None:
    """The cache-write kernel on checked arguments: ``x`` rotated (``cos``/``sin``), times ``scale``
    ``[heads, d]``, into INT4 ``packed``/``scales`` (rows in order, or a cache buffer's tokens
    ``out_start ..`` of ``out_tokens``, or with ``slots`` (int64 ``[B]``, ``x`` of one token per
    row) contiguous pages ``[num_pages, heads, page_size, .]`` at those slots, the ones out of
    range skipped), or for the query side into fp32 ``q_out`` (through FP8 when ``fp8``)."""
    b, h, t, d = x.shape
    if b * h * t == 0:
        return
    xc = x.contiguous()
    sc = scale.contiguous() if scale is not None else None
    cs = sn = None
    cos_batch_stride = 0
    if cos is not None:
        cs, sn = cos.float().contiguous(), sin.float().contiguous()
        if cs.dim() == 3 and cs.shape[0] == b and b > 1:
            cos_batch_stride = t * d
    paged = {}
    if slots is not None:  # (held for the call)
        slots = slots.to(torch.int64).contiguous()
        paged = dict(slots=ptr(slots), page_size=packed.shape[2],
                     num_slots=packed.shape[0] * packed.shape[2])  # fmt: skip
    with device_guard(x.device):
        _c_kv_quantize(ptr(xc), b * h * t, d, group, t, h, _dtypes.code(x.dtype),
                       device=device_code(x.device), post_scale=ptr(sc), packed=ptr(packed),
                       scales=ptr(scales), cos=ptr(cs), sin=ptr(sn),
                       cos_batch_stride=cos_batch_stride, interleaved=pairing == "interleaved",
                       stream=stream_of(x.device), out_tokens=out_tokens, out_start=out_start,
                       q_out=ptr(q_out), q_fp8=fp8, **paged)  # fmt: skip


def _kv_quantize_kernel(x, post_scale, group_size, cos=None, sin=None, pairing="half"):
    _check_kv_quantize(x, post_scale, group_size, cos, sin, pairing)
    if x.device.type not in ("cpu", "cuda") or not has_kernel(x.device, "kv_quantize"):
        return _kv_quantize_reference(x, post_scale, group_size, cos, sin, pairing)
    b, h, t, d = x.shape
    packed = empty((b, h, t, d // 2), torch.uint8, x.device)
    scales = empty((b, h, t, d // group_size), FP8, x.device)
    _launch_quantize(x, post_scale, group_size, cos, sin, pairing, packed, scales)
    return packed, scales


LIB.impl("kv_quantize", _kv_quantize_kernel, "CPU")
LIB.impl("kv_quantize", _kv_quantize_kernel, "CUDA")
LIB.impl("kv_quantize", _kv_quantize_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::kv_quantize", lib=LIB)
def _kv_quantize_fake(x, post_scale, group_size, cos=None, sin=None, pairing="half"):
    _check_kv_quantize(x, post_scale, group_size, cos, sin, pairing)
    b, h, t, d = x.shape
    return (x.new_empty((b, h, t, d // 2), dtype=torch.uint8),
            x.new_empty((b, h, t, d // group_size), dtype=FP8))  # fmt: skip


def kv_quantize(x, group_size: int, post_scale=None, cos=None, sin=None, pairing: str = "half"):
    """The INT4 KV cache write: ``x [B, H_kv, T, d]``, rotated by RoPE when ``cos``/``sin`` are
    given (``[T, d]`` or ``[B, T, d]``, the Hugging Face ``position_embeddings``; see
    :func:`fastlayers.quant.apply_rope`), times ``post_scale [H_kv, d]`` (fp32, optional),
    quantized per (token, head, group) -> ``(packed uint8 [B, H_kv, T, d/2], scales
    float8_e4m3fn [B, H_kv, T, d/g])``, exactly :func:`fastlayers.quant.quantize_kv_int4` of the
    rotated and scaled fp32 keys. One pass on CPU; the reference elsewhere."""
    check_tensors(("post_scale", "cos", "sin"), x=x, post_scale=post_scale, cos=cos, sin=sin)
    group_size = check_int(group_size, "group_size")
    if direct_call_ok(x, post_scale, cos, sin):
        return _kv_quantize_kernel(x, post_scale, group_size, cos, sin, pairing)
    return torch.ops.fastlayers.kv_quantize(x, post_scale, group_size, cos, sin, pairing)


# ---- The cache write in place ----------------------------------------------------------------


def _check_kv_cache_write(x, packed, scales, start, post_scale, cos, sin, pairing,
                          memory: bool = True) -> int:  # fmt: skip
    """The checks of :func:`kv_cache_write` (``memory``: also that the buffers share no memory
    with the inputs, which needs real data pointers); returns the quantization group size."""
    b, h, t, d = _check_rows(x, "x")
    check_tensor(packed, "packed")
    check_tensor(scales, "scales")
    if d % 2:
        raise ValueError(f"x's head_dim must be even (two INT4 values per byte), got {d}")
    if (
        packed.dtype != torch.uint8
        or packed.dim() != 4
        or tuple(packed.shape[:2]) != (b, h)
        or (packed.shape[3] * 2 != d)
    ):
        raise ValueError(
            f"packed must be uint8 [{b}, {h}, capacity, {d // 2}] (x's batch, heads, head_dim "
            f"/ 2), got {packed.dtype} {tuple(packed.shape)}"
        )
    cap = packed.shape[2]
    groups = scales.shape[3] if scales.dim() == 4 else 0
    if (
        scales.dtype != FP8 or scales.dim() != 4 or tuple(scales.shape[:3]) != (b, h, cap)
        or not groups or d % groups
    ):  # fmt: skip
        raise ValueError(
            f"scales must be float8_e4m3fn [{b}, {h}, {cap}, head_dim / group], got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    for buf, name in ((packed, "packed"), (scales, "scales")):
        if buf.device != x.device:
            raise ValueError(f"{name} is on {buf.device} but x is on {x.device}")
        if not buf.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous (a cache buffer), got strides {buf.stride()}"
            )
    group = d // groups
    _check_kv_quantize(x, post_scale, group, cos, sin, pairing)
    if not 0 <= start <= cap - t:
        raise ValueError(
            f"start must be in [0, {cap - t}]: the {t} tokens of x must fit the cache's {cap}, got "
            f"{start}"
        )
    if not memory:
        return group
    inputs = {"x": x, "post_scale": post_scale, "cos": cos, "sin": sin}
    check_no_alias({"packed": packed, "scales": scales},
                   {k: v for k, v in inputs.items() if v is not None}, set())  # fmt: skip
    check_no_alias({"packed": packed}, {"scales": scales}, set())
    return group


def _kv_cache_write_reference(x, packed, scales, start, post_scale, cos=None, sin=None,
                              pairing="half"):  # fmt: skip
    group = _check_kv_cache_write(x, packed, scales, start, post_scale, cos, sin, pairing)
    kq, ks = _kv_quantize_reference(x, post_scale, group, cos, sin, pairing)
    end = start + x.shape[2]
    packed[:, :, start:end] = kq
    scales[:, :, start:end] = ks


def _kv_cache_write_kernel(x, packed, scales, start, post_scale, cos=None, sin=None,
                           pairing="half"):  # fmt: skip
    group = _check_kv_cache_write(x, packed, scales, start, post_scale, cos, sin, pairing)
    if x.device.type not in ("cpu", "cuda") or not has_kernel(x.device, "kv_cache_write"):
        return _kv_cache_write_reference(x, packed, scales, start, post_scale, cos, sin, pairing)
    _launch_quantize(x, post_scale, group, cos, sin, pairing, packed, scales, packed.shape[2],
                     start)  # fmt: skip


LIB.impl("kv_cache_write", _kv_cache_write_kernel, "CPU")
LIB.impl("kv_cache_write", _kv_cache_write_kernel, "CUDA")
LIB.impl("kv_cache_write", _kv_cache_write_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::kv_cache_write", lib=LIB)
def _kv_cache_write_fake(x, packed, scales, start, post_scale, cos=None, sin=None, pairing="half"):
    _check_kv_cache_write(x, packed, scales, start, post_scale, cos, sin, pairing, memory=False)


def kv_cache_write(x, packed, scales, start: int, post_scale=None, cos=None, sin=None,
                   pairing: str = "half") -> None:  # fmt: skip
    """:func:`kv_quantize` written into a cache in place: the ``T`` tokens of ``x [B, H_kv, T, d]``
    (rotated by RoPE when ``cos``/``sin`` are given, times ``post_scale``), quantized, go to tokens
    ``start .. start + T - 1`` of the cache buffers ``packed`` (uint8 ``[B, H_kv, capacity, d/2]``)
    and ``scales`` (float8_e4m3fn ``[B, H_kv, capacity, d/g]``; the group ``g`` is read from its
    shape), both contiguous. The same bytes as ``kv_quantize`` and a slice assignment, in one
    pass with no temporaries (vLLM's ``reshape_and_cache`` plays this part). Returns None."""
    check_tensors(("post_scale", "cos", "sin"), x=x, packed=packed, scales=scales,
                  post_scale=post_scale, cos=cos, sin=sin)  # fmt: skip
    start = check_int(start, "start")
    if direct_call_ok(x, packed, scales, post_scale, cos, sin):
        _kv_cache_write_kernel(x, packed, scales, start, post_scale, cos, sin, pairing)
    else:
        torch.ops.fastlayers.kv_cache_write(x, packed, scales, start, post_scale, cos, sin, pairing)


def write_kv_direct(k, v, buffers, start: int, group_size: int, post_scale=None, cos=None,
                    sin=None, pairing: str = "half") -> bool:  # fmt: skip
    """:func:`kv_cache_write` of ``k`` (rotated, times ``post_scale``) and ``v`` into an
    :class:`~fastlayers.quant.kv_cache.Int4KVStore`'s own ``buffers`` at token ``start``, by the
    kernel straight away: a decode step is latency, and the op's checks and dispatch cost as much
    as the write. The store has fitted its buffers to ``k`` (batch, heads, widths, device, room
    for the tokens); checked here: ``k``/``v``/``post_scale``/``cos``/``sin`` as the op checks
    them (ValueError/TypeError naming them). Returns False, writing nothing, where the op must run
    (compiling, tracing, dispatch modes, tensor subclasses, a device without the kernel)."""
    if not (no_dispatch_modes() and plain_tensors(k, v, post_scale, cos, sin)
            and has_kernel(k.device, "kv_cache_write")):  # fmt: skip
        return False
    _check_kv_quantize(k, post_scale, group_size, cos, sin, pairing, ("k", "post_scale"))
    _check_kv_quantize(v, None, group_size, names=("v", "post_scale"))
    if v.device != k.device:
        raise ValueError(f"v is on {v.device} but k is on {k.device}")
    kb, ksb, vb, vsb = buffers
    _launch_quantize(k, post_scale, group_size, cos, sin, pairing, kb, ksb, kb.shape[2], start)
    _launch_quantize(v, None, group_size, None, None, "half", vb, vsb, vb.shape[2], start)
    return True


# ---- The query side --------------------------------------------------------------------------


def _check_q_quantize(q, scale, cos, sin, pairing, fp8) -> None:
    check_tensor(q, "q")
    if q.dim() == 4 and q.shape[3] % 2:
        raise ValueError(f"q's head_dim must be even, got {q.shape[3]}")
    _check_kv_quantize(q, scale, q.shape[3] if q.dim() == 4 else 2, cos, sin, pairing,
                       names=("q", "scale"))  # fmt: skip
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {fp8!r}")


def _q_quantize_reference(q, scale, cos=None, sin=None, pairing="half", fp8=True):
    _check_q_quantize(q, scale, cos, sin, pairing, fp8)
    x = apply_rope(q, cos, sin, pairing) if cos is not None else q.float()
    if scale is not None:
        x = x * scale[None, :, None, :]
    return quantize_q_fp8(x) if fp8 else x


def _q_quantize_kernel(q, scale, cos=None, sin=None, pairing="half", fp8=True):
    _check_q_quantize(q, scale, cos, sin, pairing, fp8)
    if q.device.type not in ("cpu", "cuda") or not has_kernel(q.device, "q_quantize"):
        return _q_quantize_reference(q, scale, cos, sin, pairing, fp8)
    out = empty(q.shape, torch.float32, q.device)
    _launch_quantize(q, scale, q.shape[3], cos, sin, pairing, q_out=out, fp8=fp8)
    return out


LIB.impl("q_quantize", _q_quantize_kernel, "CPU")
LIB.impl("q_quantize", _q_quantize_kernel, "CUDA")
LIB.impl("q_quantize", _q_quantize_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::q_quantize", lib=LIB)
def _q_quantize_fake(q, scale, cos=None, sin=None, pairing="half", fp8=True):
    _check_q_quantize(q, scale, cos, sin, pairing, fp8)
    return q.new_empty(q.shape, dtype=torch.float32)


def q_quantize(q, scale=None, cos=None, sin=None, pairing: str = "half", fp8: bool = True):
    """The query side of the INT4 KV attention: ``q [B, H_q, T, d]`` rotated by RoPE when
    ``cos``/``sin`` are given (as :func:`kv_quantize`), times ``scale [H_q, d]`` (fp32, optional:
    the inverse of the keys' post-RoPE scale, repeated over the GQA group), then through FP8-E4M3
    with one scale per (token, head) when ``fp8`` (:func:`fastlayers.quant.quantize_q_fp8`).
    Returns the fp32 values ``[B, H_q, T, d]`` the attention kernels take. One pass on CPU and
    CUDA; the reference elsewhere."""
    check_tensors(("scale", "cos", "sin"), q=q, scale=scale, cos=cos, sin=sin)
    if direct_call_ok(q, scale, cos, sin):
        return _q_quantize_kernel(q, scale, cos, sin, pairing, fp8)
    return torch.ops.fastlayers.q_quantize(q, scale, cos, sin, pairing, fp8)


# ---- One decode step on a store's buffers, without the op layer -------------------------------


def _store_buffers_ok(buffers, store=None) -> bool:
    """An Int4KVStore's four buffers as the kernels need them (the store keeps them so; checked
    because a wrong one would be read or written out of bounds): packed keys uint8
    ``[B, H, capacity, d/2]`` and values ``[B, H, capacity, d_v/2]``, their scales float8_e4m3fn
    ``[B, H, capacity, d/g]`` and ``[.., d_v/g]`` (one group ``g``), contiguous, on the CPU.
    With the ``store`` whose buffers they are, its :meth:`~fastlayers.quant.kv_cache.Int4KVStore.
    layout_ok` (once per tuple of buffers): that saves two checks of four tensors a layer and
    decode step (~30 us of the demo's ~180 in the model; ~8 us each in a tight loop)."""
    kq, ks, vq, vs = buffers
    if store is not None and store.buffers is buffers:
        layout = store.layout_ok()
    else:
        layout = buffers_layout_ok(buffers)
    return (
        layout and on_cpu(kq.device) and ks.shape[3] > 0 and vs.shape[3] > 0
        and kq.shape[3] * vs.shape[3] == vq.shape[3] * ks.shape[3]  # (one group size)
    )  # fmt: skip


def _cpu_direct(*tensors) -> bool:
    """The first tensor on the CPU, the call eager with plain tensors (:func:`direct_call_ok`), and
    the CPU kernels built."""
    return on_cpu(tensors[0].device) and direct_call_ok(*tensors) and _ext.has_cpu_kernels()


def _fp32_table_ok(t, shape) -> bool:
    """None, or a contiguous fp32 CPU tensor of ``shape`` (a scale table a kernel reads whole)."""
    return t is None or (
        t.dtype == torch.float32 and t.shape == shape and on_cpu(t.device)
        and t.is_contiguous()
    )  # fmt: skip


def decode_step_direct(query, q_scale, fp8: bool, buffers, length: int, scale: float,
                       starts=None, softcap: float = 0.0, sinks=None, store=None):  # fmt: skip
    """One decode step of the Hugging Face integration on an
    :class:`~fastlayers.quant.kv_cache.Int4KVStore`'s ``buffers`` (which hold ``length`` tokens):
    ``q_quantize(query, q_scale, fp8=fp8)`` then ``int4_kv_decode(..., length, scale, starts,
    softcap)``,
    the two CPU kernels called directly: at a few hundred cached tokens the two ops' checks and
    dispatch cost several times their kernels (the same bytes as the ops). ``query [B, Hq, 1, d]``
    float32/16/bf16; ``q_scale`` None or fp32 ``[Hq, d]``; ``starts`` None or int32 ``[B]`` in
    ``[0, length]`` (built by the caller from the attention mask); ``sinks`` None or floating
    ``[Hq]`` on the query's device (applied before the one rounding); ``store``: the
    :class:`~fastlayers.quant.kv_cache.Int4KVStore` the buffers are (:func:`_store_buffers_ok`).
    Returns ``out [B, Hq, dv]`` in
    the query's dtype, or None (nothing run) where the ops must run: not on CPU, compiling or
    tracing, dispatch modes, tensor subclasses, gradients wanted, neither a scale nor FP8, or
    shapes the ops would refuse (they then raise their errors)."""
    if (q_scale is None and not fp8) or not _cpu_direct(query, q_scale, starts):
        return None
    kq, ks, vq, vs = buffers
    b, hq, t, d = query.shape if query.dim() == 4 else (0, 0, 0, 0)
    ok = (
        t == 1 and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and kq.shape[0] == b and kq.shape[3] * 2 == d
        and hq % kq.shape[1] == 0
        and 0 <= length <= kq.shape[2] and ks.shape[3] > 0 and d % ks.shape[3] == 0
        and math.isfinite(softcap) and softcap >= 0
        and (d // ks.shape[3]) % 2 == 0 and _store_buffers_ok(buffers, store)
        and _fp32_table_ok(q_scale, (hq, d))
        and (sinks is None or (sinks.is_floating_point() and sinks.shape == (hq,)
                               and sinks.device == query.device))
        and (starts is None or (starts.dtype == torch.int32 and starts.shape == (b,)
                                and on_cpu(starts.device) and starts.is_contiguous()))
    )  # fmt: skip
    if not ok:
        return None
    x = query if query.is_contiguous() else query.contiguous()
    qs = empty((b, hq, d), torch.float32, query.device)
    _c_kv_quantize(x.data_ptr(), b * hq, d, d, 1, hq, _dtypes.code(query.dtype),
                   post_scale=ptr(q_scale), q_out=qs.data_ptr(), q_fp8=fp8)  # fmt: skip
    out = empty((b, hq, vq.shape[3] * 2), torch.float32, query.device)
    lse = empty((b, hq), torch.float32, query.device)
    _c_int4_kv_decode(qs.data_ptr(), kq.data_ptr(), ks.data_ptr(), vq.data_ptr(), vs.data_ptr(),
                      out.data_ptr(), lse.data_ptr(), b, hq, kq.shape[1], d, d // ks.shape[3],
                      kq.shape[2], length, scale, starts=ptr(starts),
                      softcap=softcap, dv=vq.shape[3] * 2)  # fmt: skip
    if sinks is not None:
        return apply_sinks(out, lse, sinks, query.dtype)[0]
    return out.to(query.dtype)


def write_step_direct(k, v, buffers, start: int, group_size: int, post_scale=None,
                      store=None) -> bool:  # fmt: skip
    """:func:`write_kv_direct` without RoPE tables, for a decode step on CPU: ``k [B, H, t, d]``
    (times ``post_scale``) and ``v [B, H, t, d_v]`` quantized into the store's ``buffers`` at token
    ``start``, the kernel called with only the checks memory safety needs (the same bytes;
    ``store``: the store the buffers are, :func:`_store_buffers_ok`).
    Returns False, writing nothing, unless the call is eager on CPU with plain tensors that fit
    the buffers (the caller then takes the checked path, which raises the errors)."""
    if not _cpu_direct(k, v, post_scale):
        return False
    kq, ks, vq, vs = buffers
    b, h, t, d = k.shape if k.dim() == 4 else (0, 0, 0, 0)
    dv = v.shape[3] if v.dim() == 4 else 0
    ok = (
        t > 0 and v.shape[:3] == k.shape[:3] and v.dtype == k.dtype
        and k.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and isinstance(group_size, int) and group_size > 0 and group_size % 2 == 0
        and d % group_size == 0
        and tuple(kq.shape[:2]) == (b, h) and kq.shape[3] * 2 == d
        and ks.shape[3] * group_size == d and vq.shape[3] * 2 == dv
        and vs.shape[3] * group_size == dv and 0 <= start <= kq.shape[2] - t
        and on_cpu(v.device) and _store_buffers_ok(buffers, store)
        and _fp32_table_ok(post_scale, (h, d))
    )  # fmt: skip
    if not ok:
        return False
    code, cap = _dtypes.code(k.dtype), kq.shape[2]
    for x, scale, packed, scales in ((k, post_scale, kq, ks), (v, None, vq, vs)):
        x = x if x.is_contiguous() else x.contiguous()
        _c_kv_quantize(x.data_ptr(), b * h * t, x.shape[3], group_size, t, h, code,
                       post_scale=ptr(scale), packed=packed.data_ptr(), scales=scales.data_ptr(),
                       out_tokens=cap, out_start=start)  # fmt: skip
    return True
