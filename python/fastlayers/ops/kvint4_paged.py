# SPDX-License-Identifier: Apache-2.0
"""Decode attention over a **paged** INT4 KV cache (vLLM's block tables, FlashInfer's HND pages).

``int4_kv_decode_paged(q [B, Hq, d], k_pages, k_scale_pages, v_pages, v_scale_pages,
block_table, seq_lens, scale=None, softcap=None, sinks=None, num_splits=0)``:

- the cache in pages of ``page_size`` tokens (a power of two): ``k_pages`` uint8
  ``[num_pages, Hkv, page_size, d/2]``, ``k_scale_pages`` float8_e4m3fn
  ``[num_pages, Hkv, page_size, d/g]``, values likewise with their head size ``dv`` (the keys'
  ``d`` or one of their own; one group ``g``); the FireQ INT4 format of
  :mod:`fastlayers.quant.rope_kv`, rows exactly as in the contiguous cache;
- ``block_table`` int32 ``[B, max_pages]``: batch row ``b``'s token ``t`` sits in page
  ``block_table[b, t // page_size]`` at slot ``t % page_size``;
- ``seq_lens`` int32 ``[B]``: row ``b`` attends to its tokens ``0 .. seq_lens[b] - 1`` (at most
  ``max_pages * page_size``; 0: zeros, lse -inf). Entries of ``block_table`` past a row's
  last page are not read (any value).

The same attention as :func:`~fastlayers.ops.kvint4.int4_kv_decode` (GQA, fp32 softmax,
soft-capping, sinks); returns ``(out [B, Hq, dv] in q's dtype, lse [B, Hq] fp32)``. The CPU and
CUDA decode kernels read the pages in place (a block-table lookup per token row; on CPU, blocks
of keys end at page ends and the next page is prefetched); the work split is planned over
``max_pages * page_size`` tokens (no host synchronization: CUDA-graph capturable), a split
past a row's end does nothing. The reference gathers each row's pages into a left-padded
contiguous cache and runs the contiguous reference.

``int4_kv_attention_paged(q [B, Hq, Tq, d], ..., q_lens=None)``: the causal attention of Tq new
tokens per row (query i of row b is its token ``seq_lens[b] - Tq + i``; with ``q_lens``, each
row's first ``q_lens[b]`` queries are its last new tokens and the rest padding) on the prefill
kernels.

``kv_cache_write_paged(x [N, Hkv, d], packed_pages, scale_pages, slots [N], post_scale=None,
cos=None, sin=None, pairing="half")`` writes N new tokens' keys (or values) into their slots
(``page * page_size + slot_in_page``, vLLM's slot mapping; -1: not written): RoPE, post-RoPE
scale and INT4 quantization as :func:`~fastlayers.ops.kvint4.kv_quantize`, each token straight
into its page row.

``int4_kv_attention_paged_planned(q, ..., step)`` / ``kv_cache_write_paged_planned(x, ..., step)``:
the ragged prefill and the write on a :class:`~fastlayers.quant.PagedStep`'s metadata
(``Int4PagedKVCache.plan`` or ``quant.plan_paged_step``: checked once, at the plan), with no
device-to-host read per layer.
"""

from __future__ import annotations

import math

import torch

from fastlayers import _ext
from fastlayers._dtypes import QUERIES
from fastlayers.ops._common import (
    LIB,
    apply_sinks,
    capturing,
    check_no_alias,
    check_scale_softcap,
    check_sinks,
    check_tensor,
    check_tensors,
    direct_call_ok,
    empty,
    has_kernel,
    on_cuda,
    register_no_backward,
)
from fastlayers.ops.kvint4 import (
    FP8,
    _attention_reference,
    _check_kv_quantize,
    _check_num_splits,
    _cuda_workspace,
    _kv_quantize_reference,
    _launch_quantize,
    _reference,
    _run,
    _softcap_arg,
)

LIB.define(
    "int4_kv_decode_paged(Tensor q, Tensor k_pages, Tensor k_scale_pages, Tensor v_pages,"
    " Tensor v_scale_pages, Tensor block_table, Tensor seq_lens, float scale, float softcap=0.0,"
    " int num_splits=0) -> (Tensor, Tensor)"
)
LIB.define(
    "int4_kv_attention_paged(Tensor q, Tensor k_pages, Tensor k_scale_pages, Tensor v_pages,"
    " Tensor v_scale_pages, Tensor block_table, Tensor seq_lens, float scale, float softcap=0.0,"
    " Tensor? q_lens=None) -> (Tensor, Tensor)"
)
LIB.define(
    "int4_kv_attention_paged_varlen(Tensor q, Tensor k_pages, Tensor k_scale_pages,"
    " Tensor v_pages, Tensor v_scale_pages, Tensor block_table, Tensor seq_lens,"
    " Tensor cu_seqlens_q, int max_seqlen_q, float scale, float softcap=0.0) -> (Tensor, Tensor)"
)
LIB.define(
    "kv_cache_write_paged(Tensor x, Tensor(a!) packed_pages, Tensor(b!) scale_pages, Tensor slots,"
    " Tensor? post_scale, Tensor? cos=None, Tensor? sin=None, str pairing='half') -> ()"
)
register_no_backward(
    "int4_kv_decode_paged", "int4_kv_attention_paged", "int4_kv_attention_paged_varlen"
)

_NAMES = ("q", "k_pages", "k_scale_pages", "v_pages", "v_scale_pages", "block_table", "seq_lens")


def _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap,
           check_range: bool = True, q_tokens: bool = False, q_lens=None, cu_q=None,
           max_q: int = 0) -> None:  # fmt: skip
    """The paged call's arguments (shapes, dtypes, devices; with ``check_range`` and the host at
    hand, also ``seq_lens``, ``q_lens``, ``cu_q`` and the block-table entries the rows use);
    ``q_tokens``: the prefill's ``q [B, Hq, Tq, d]``, whose Tq tokens each row must hold, or its
    first ``q_lens[b]`` (int32 ``[B]``, in ``[0, Tq]``) where given; ``cu_q``: the ragged
    prefill's ``q [T, Hq, d]``, row ``b``'s tokens ``cu_q[b] .. cu_q[b + 1] - 1`` (int32
    ``[B + 1]`` from 0 to T, not decreasing), at most ``max_q`` per row."""
    for t, name in zip((q, k, k_scale, v, v_scale, block_table, seq_lens), _NAMES, strict=True):
        check_tensor(t, name)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    ragged = cu_q is not None
    if ragged:
        want = "[total_q_tokens, q_heads, head_dim]"
    else:
        want = "[batch, q_heads, q_tokens, head_dim]" if q_tokens else "[batch, q_heads, head_dim]"
    if q.dim() != (4 if q_tokens and not ragged else 3) or q.dtype not in QUERIES \
            or not q.shape[-1]:  # fmt: skip
        raise ValueError(
            f"q must be a float32/float16/bfloat16/float64 {want}, got {q.dtype} {tuple(q.shape)}"
        )
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    if ragged:
        check_tensor(cu_q, "cu_seqlens_q")
        if cu_q.dtype != torch.int32 or cu_q.dim() != 1 or not cu_q.shape[0] \
                or cu_q.device != q.device:  # fmt: skip
            raise ValueError(
                f"cu_seqlens_q must be int32 [batch + 1] (each row's first query token, then the "
                f"total) on {q.device}, got {cu_q.dtype} {tuple(cu_q.shape)} on {cu_q.device}"
            )
        b = cu_q.shape[0] - 1
        if max_q < 1:
            raise ValueError(f"max_seqlen_q must be >= 1, got {max_q}")
    if k.dtype != torch.uint8 or k.dim() != 4 or k.shape[3] * 2 != d or not k.shape[0]:
        raise ValueError(
            f"k_pages must be uint8 [num_pages > 0, kv_heads, page_size, {d // 2}], got {k.dtype} "
            f"{tuple(k.shape)}"
        )
    pages, hkv, page_size = k.shape[:3]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_pages.shape[2]) must be a power of two, got {page_size}")
    if not hkv or hq % hkv:
        raise ValueError(
            f"q heads ({hq}) must be a multiple of kv heads ({hkv}, k_pages.shape[1] > 0)"
        )
    if v.dtype != torch.uint8 or v.dim() != 4 or v.shape[:3] != k.shape[:3] or not v.shape[3]:
        raise ValueError(
            f"v_pages must be uint8 [{pages}, {hkv}, {page_size}, value_head_dim / 2] (k_pages' "
            f"pages, kv heads and page size), got {v.dtype} {tuple(v.shape)}"
        )
    dv = v.shape[3] * 2
    for s, name, width in ((k_scale, "k_scale_pages", d), (v_scale, "v_scale_pages", dv)):
        if (s.dtype != FP8 or s.dim() != 4 or s.shape[:3] != k.shape[:3] or not s.shape[3]
                or width % s.shape[3]):  # fmt: skip
            what = "head_dim" if name == "k_scale_pages" else "value_head_dim"
            raise ValueError(
                f"{name} must be float8_e4m3fn [{pages}, {hkv}, {page_size}, {what} / group], got "
                f"{s.dtype} {tuple(s.shape)}"
            )
    if d * v_scale.shape[3] != dv * k_scale.shape[3] or (d // k_scale.shape[3]) % 2:
        raise ValueError(
            f"k_scale_pages {tuple(k_scale.shape)} and v_scale_pages {tuple(v_scale.shape)} must "
            f"have one even quantization group for keys ({d} channels) and values ({dv})"
        )
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(
            f"block_table must be int32 [{b}, max_pages], got {block_table.dtype} "
            f"{tuple(block_table.shape)}"
        )
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (b,):
        raise ValueError(
            f"seq_lens must be int32 [{b}] (one per batch row), got {seq_lens.dtype} "
            f"{tuple(seq_lens.shape)}"
        )
    check_scale_softcap(scale, softcap)
    tokens, new = block_table.shape[1] * page_size, q.shape[2] if q_tokens else 0
    if ragged:
        new = max_q
    if q_lens is not None:
        check_tensor(q_lens, "q_lens")
        if q_lens.dtype != torch.int32 or tuple(q_lens.shape) != (b,) or q_lens.device != q.device:
            raise ValueError(
                f"q_lens must be int32 [{b}] (each row's query tokens) on {q.device}, got "
                f"{q_lens.dtype} {tuple(q_lens.shape)} on {q_lens.device}"
            )
    if new > tokens and q_lens is None:  # (with q_lens, queries past a row's count are padding)
        what = f"max_seqlen_q is {new}" if ragged else f"q has {new} tokens"
        raise ValueError(f"{what} but block_table holds at most {tokens} tokens a row")
    if not check_range or seq_lens.device.type == "meta" or capturing(seq_lens):
        return  # (the kernels clamp lengths, query counts and page indices)
    _check_values(seq_lens, block_table, pages, page_size, new, q_lens, cu_q, q.shape[0], max_q)


def _check_values(seq_lens, block_table, pages: int, page_size: int, new: int, q_lens=None,
                  cu_q=None, total: int = 0, max_q: int = 0) -> None:  # fmt: skip
    """The paged call's values (``_check``'s ranges) in one host read: the extremes of
    ``seq_lens``, of ``q_lens`` and of the ragged counts (``cu_q``'s steps), of each row's count
    less its length, and of the block-table entries the rows use, stacked (on a GPU one
    synchronization instead of one per check; on CPU fewer of torch's small ops)."""
    tokens = block_table.shape[1] * page_size
    parts: dict[str, torch.Tensor] = {}
    if cu_q is not None:
        parts["start"], parts["end"] = cu_q[0], cu_q[-1]
    if seq_lens.numel():
        parts["lo"], parts["hi"] = seq_lens.aminmax()
        if q_lens is not None:
            parts["q_lo"], parts["q_hi"] = q_lens.aminmax()
            parts["q_over"] = (q_lens - seq_lens).max()
        if cu_q is not None:
            n = cu_q.diff()
            parts["n_lo"], parts["n_hi"] = n.aminmax()
            parts["n_over"] = (n - seq_lens).max()
        if block_table.numel():  # (entries past a row's last page are never read)
            first = torch.arange(0, tokens, page_size, device=seq_lens.device,
                                 dtype=seq_lens.dtype)  # fmt: skip
            used = torch.where(first[None, :] < seq_lens[:, None], block_table, 0)
            parts["t_lo"], parts["t_hi"] = used.aminmax()
    if not parts:
        return
    v = dict(zip(parts, torch.stack(list(parts.values())).tolist(), strict=True))
    least = new if q_lens is None and cu_q is None else 0
    if "lo" in v and (v["lo"] < least or v["hi"] > tokens):
        cached = "; the new tokens must be cached" if least else ""
        raise ValueError(
            f"seq_lens must lie in [{least}, {tokens}] (block_table's pages x page_size{cached})"
        )
    if "q_lo" in v and (v["q_lo"] < 0 or v["q_hi"] > new):
        raise ValueError(f"q_lens must lie in [0, {new}] (q's query tokens)")
    if v.get("q_over", 0) > 0:
        raise ValueError("q_lens must not exceed seq_lens: a row's new tokens must be cached")
    if "start" in v and (v["start"] != 0 or v["end"] != total or v.get("n_lo", 0) < 0):
        down = " decreasing" if v.get("n_lo", 0) < 0 else ""
        raise ValueError(
            f"cu_seqlens_q must start at 0, not decrease and end at q's {total} tokens, got "
            f"{v['start']} .. {v['end']}{down}"
        )
    if v.get("n_hi", 0) > max_q:
        raise ValueError(f"max_seqlen_q ({max_q}) is below a row's query tokens (cu_seqlens_q)")
    if v.get("n_over", 0) > 0:
        raise ValueError(
            "cu_seqlens_q's rows must not exceed seq_lens: a row's new tokens must be cached"
        )
    if "t_lo" in v and (v["t_lo"] < 0 or v["t_hi"] >= pages):
        raise ValueError(f"block_table's entries for the rows' pages must lie in [0, {pages - 1}]")


def _gather(x: torch.Tensor, page: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Pages ``x [P, H, page_size, w]`` at ``(page, slot) [B, T]`` as a cache ``[B, H, T, w]``."""
    return x[page, :, slot].permute(0, 2, 1, 3)


def _contiguous(q, k, k_scale, v, v_scale, block_table, seq_lens):
    """The specification's view of the pages: each row's tokens gathered into a contiguous cache
    of ``max_pages * page_size`` tokens, right-aligned: ``(caches, tokens, starts)``, ``starts``
    each row's left padding (so a row's last token is the cache's last, as its queries are)."""
    page_size, tokens = k.shape[2], block_table.shape[1] * k.shape[2]
    starts = tokens - seq_lens.long().clamp(0, tokens)
    index = (torch.arange(tokens, device=q.device)[None, :] - starts[:, None]).clamp(min=0)
    page = block_table.long().gather(1, index // page_size).clamp(0, k.shape[0] - 1)
    slot = index % page_size
    return [_gather(x, page, slot) for x in (k, k_scale, v, v_scale)], tokens, starts.int()


def _reference_op(
    q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0, num_splits=0
):
    """The decode's specification: the contiguous decode's reference over ``_contiguous``'s cache
    (``num_splits``, a work split, changes nothing)."""
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap)
    _check_num_splits(num_splits)
    caches, tokens, starts = _contiguous(q, k, k_scale, v, v_scale, block_table, seq_lens)
    return _reference(q, *caches, tokens, scale, starts, softcap)


def _attention_reference_op(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0,
                            q_lens=None):  # fmt: skip
    """The prefill's specification: the contiguous causal reference over ``_contiguous``'s
    cache (query i of row b: the row's token ``seq_lens[b] - Tq + i``). With ``q_lens``: each
    row's queries moved to its last ``q_lens[b]`` positions for the reference (query i: token
    ``seq_lens[b] - q_lens[b] + i``), moved back after; the padding queries get zeros, lse -inf."""
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_tokens=True,
           q_lens=q_lens)  # fmt: skip
    args = (q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_lens)
    if (padded := _past_the_table(_attention_reference_op, *args)) is not None:
        return padded
    caches, tokens, starts = _contiguous(q, k, k_scale, v, v_scale, block_table, seq_lens)
    if q_lens is None:
        return _attention_reference(q, *caches, tokens, scale, softcap, starts=starts)
    b, hq, tq, _ = q.shape
    pad = tq - q_lens.long().clamp(0, tq)  # [B]
    j = torch.arange(tq, device=q.device)[None, :]
    moved = q.gather(2, (j - pad[:, None]).clamp(min=0)[:, None, :, None].expand_as(q))
    out, lse = _attention_reference(moved, *caches, tokens, scale, softcap, starts=starts)
    back = (j + pad[:, None]).clamp(max=tq - 1)[:, None, :]  # query i sits at i + pad
    real = (j < (tq - pad)[:, None])[:, None, :]  # [B, 1, Tq]
    out = out.gather(2, back[..., None].expand(b, hq, tq, out.shape[3]))
    lse = lse.gather(2, back.expand(b, hq, tq))
    return out.masked_fill(~real[..., None], 0.0), lse.masked_fill(~real, -math.inf)


def _past_the_table(fn, q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_lens):
    """Padded queries past what the block table holds (``q_lens`` given, ``Tq`` more than its
    ``max_pages * page_size`` tokens): padding in every row, since a row's count is at most its
    length. ``fn`` (the kernel's or the reference's prefill) on the queries the table can hold,
    the rest zeros with lse -inf; None where no query is past the table."""
    tokens = block_table.shape[1] * k.shape[2]
    b, hq, tq = q.shape[:3]
    if q_lens is None or tq <= tokens:
        return None
    if tokens:
        out, lse = fn(q[:, :, :tokens], k, k_scale, v, v_scale, block_table, seq_lens, scale,
                      softcap, q_lens.clamp(max=tokens))  # fmt: skip
    else:  # (no row holds a token: all padding)
        out = q.new_zeros((b, hq, 0, 2 * v.shape[3]))
        lse = q.new_zeros((b, hq, 0), dtype=torch.float32)
    return (torch.cat([out, out.new_zeros(b, hq, tq - tokens, out.shape[3])], 2),
            torch.cat([lse, lse.new_full((b, hq, tq - tokens), -math.inf)], 2))  # fmt: skip


def _padded(q, cu_q, max_q):
    """Ragged queries ``q [T, Hq, d]`` (row ``b``'s: tokens ``cu_q[b] ..``) as the padded layout
    ``[B, Hq, max_q, d]`` with ``q_lens``: ``(padded, q_lens, row, pos)``, ``row`` / ``pos``
    ``[T]`` each token's batch row and place in it (to take the outputs back)."""
    total = q.shape[0]
    q_lens = cu_q[1:] - cu_q[:-1]
    index = cu_q[:-1, None].long() + torch.arange(max_q, device=q.device)[None, :]  # [B, max_q]
    padded = q[index.clamp(0, max(total - 1, 0))].permute(0, 2, 1, 3)
    tokens = torch.arange(total, device=q.device, dtype=torch.int32)
    row = torch.searchsorted(cu_q[1:], tokens, right=True).clamp(max=cu_q.shape[0] - 2)
    return padded, q_lens, row, (tokens - cu_q[row]).long()


def _no_tokens(q, v):
    """The ragged prefill's outputs for ``q`` without tokens: ``[0, Hq, dv]``, ``[0, Hq]``."""
    hq = q.shape[1]
    return q.new_empty((0, hq, v.shape[3] * 2)), q.new_empty((0, hq), dtype=torch.float32)


def _varlen_reference_op(q, k, k_scale, v, v_scale, block_table, seq_lens, cu_seqlens_q,
                         max_seqlen_q, scale, softcap=0.0):  # fmt: skip
    """The ragged prefill's specification: the padded prefill's with ``q_lens`` (each row's
    queries at the start of its ``max_seqlen_q``), its rows taken back to the tokens."""
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_tokens=True,
           cu_q=cu_seqlens_q, max_q=max_seqlen_q)  # fmt: skip
    if q.shape[0] == 0:
        return _no_tokens(q, v)
    padded, q_lens, row, pos = _padded(q, cu_seqlens_q, max_seqlen_q)
    out, lse = _attention_reference_op(padded, k, k_scale, v, v_scale, block_table, seq_lens,
                                       scale, softcap, q_lens)  # fmt: skip
    return out[row, :, pos], lse[row, :, pos]


def _varlen_kernel(q, k, k_scale, v, v_scale, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                   scale, softcap=0.0, check_range: bool = True):  # fmt: skip
    """The ragged prefill's kernels (``check_range``: False for metadata valid by construction,
    :class:`~fastlayers.quant.PagedStep`'s: no host read)."""
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap,
           check_range=check_range, q_tokens=True, cu_q=cu_seqlens_q,
           max_q=max_seqlen_q)  # fmt: skip
    if q.shape[0] == 0:
        return _no_tokens(q, v)
    if max_seqlen_q == 1 and q.shape[0] == cu_seqlens_q.shape[0] - 1:
        # one token a row (a decode step): q is the decode's own layout, no padding or gathers
        return _launch("int4_kv_decode_paged", _reference_op, q, k, k_scale, v, v_scale,
                       block_table, seq_lens, scale, softcap)  # fmt: skip
    if max_seqlen_q == 1:  # (decode rows, some empty: the decode kernels, on the padded layout)
        padded, q_lens, row, pos = _padded(q, cu_seqlens_q, 1)
        out, lse = _launch("int4_kv_attention_paged", _attention_reference_op, padded, k, k_scale,
                           v, v_scale, block_table, seq_lens, scale, softcap,
                           q_lens=q_lens)  # fmt: skip
        return out[row, :, pos], lse[row, :, pos]
    return _launch("int4_kv_attention_paged_varlen", _varlen_reference_op, q, k, k_scale, v,
                   v_scale, block_table, seq_lens, scale, softcap, cu_q=cu_seqlens_q,
                   max_q=max_seqlen_q)  # fmt: skip


def _launch(op: str, reference, q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap,
            num_splits=0, q_lens=None, cu_q=None, max_q=0):  # fmt: skip
    """The kernels of ``op`` (decode: ``q [B, Hq, d]``; prefill: ``[B, Hq, Tq, d]``, with
    ``q_lens`` where given, or ragged ``[T, Hq, d]`` with ``cu_q`` and ``max_q`` > 1) on checked
    arguments, or ``reference(...)`` of the same arguments where they do not run."""
    device, tokens = q.device, block_table.shape[1] * k.shape[2]
    args = (q, k, k_scale, v, v_scale, block_table, seq_lens)
    if cu_q is not None:
        args += (cu_q, max_q)
    args += (scale, softcap)
    if q_lens is not None:
        args += (q_lens,)
    # (a float64 query: the reference, float64 throughout, as without kernels)
    if (device.type not in ("cpu", "cuda") or not has_kernel(device, op) or tokens == 0
            or q.dtype == torch.float64):  # fmt: skip
        return reference(*args)
    workspace = None
    one = cu_q is None and (q.dim() == 3 or q.shape[2] == 1)  # one query token: the decode kernels
    if on_cuda(device):  # (split-KV over max_pages * page_size tokens)
        floats = _cuda_workspace(op, q, k, v, tokens, num_splits)
        if floats == 0:
            return reference(*args)
        if one:  # the split-KV decode kernel's
            workspace = empty((floats,), torch.float32, device)
    out, lse = _run(q, k, k_scale, v, v_scale, tokens, scale, workspace, None, softcap, num_splits,
                    seq_lens=seq_lens, block_table=block_table, q_lens=None if one else q_lens,
                    q_starts=cu_q, max_q=max_q)  # fmt: skip
    if one and q_lens is not None:  # (a row of no query: padding; the decode kernels take none)
        real = (q_lens > 0)[:, None, None]
        out, lse = out.masked_fill(~real[..., None], 0.0), lse.masked_fill(~real, -math.inf)
    return out.to(q.dtype), lse


def _kernel(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0, num_splits=0):
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap)
    num_splits = _check_num_splits(num_splits)
    return _launch("int4_kv_decode_paged", _reference_op, q, k, k_scale, v, v_scale, block_table,
                   seq_lens, scale, softcap, num_splits)  # fmt: skip


def _attention_kernel(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0,
                      q_lens=None):  # fmt: skip
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_tokens=True,
           q_lens=q_lens)  # fmt: skip
    args = (q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, q_lens)
    if (padded := _past_the_table(_attention_kernel, *args)) is not None:
        return padded
    return _launch("int4_kv_attention_paged", _attention_reference_op, q, k, k_scale, v, v_scale,
                   block_table, seq_lens, scale, softcap, q_lens=q_lens)  # fmt: skip


LIB.impl("int4_kv_decode_paged", _kernel, "CPU")
LIB.impl("int4_kv_decode_paged", _kernel, "CUDA")
LIB.impl("int4_kv_decode_paged", _reference_op, "CompositeExplicitAutograd")
LIB.impl("int4_kv_attention_paged", _attention_kernel, "CPU")
LIB.impl("int4_kv_attention_paged", _attention_kernel, "CUDA")
LIB.impl("int4_kv_attention_paged", _attention_reference_op, "CompositeExplicitAutograd")
LIB.impl("int4_kv_attention_paged_varlen", _varlen_kernel, "CPU")
LIB.impl("int4_kv_attention_paged_varlen", _varlen_kernel, "CUDA")
LIB.impl("int4_kv_attention_paged_varlen", _varlen_reference_op, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::int4_kv_attention_paged_varlen", lib=LIB)
def _varlen_fake(q, k, k_scale, v, v_scale, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                 scale, softcap=0.0):  # fmt: skip
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, check_range=False,
           q_tokens=True, cu_q=cu_seqlens_q, max_q=max_seqlen_q)  # fmt: skip
    out = q.new_empty((*q.shape[:2], v.shape[3] * 2))
    return out, q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("fastlayers::int4_kv_attention_paged", lib=LIB)
def _attention_fake(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0,
                    q_lens=None):  # fmt: skip
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, check_range=False,
           q_tokens=True, q_lens=q_lens)  # fmt: skip
    out = q.new_empty((*q.shape[:3], v.shape[3] * 2))
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("fastlayers::int4_kv_decode_paged", lib=LIB)
def _fake(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap=0.0, num_splits=0):
    _check(q, k, k_scale, v, v_scale, block_table, seq_lens, scale, softcap, check_range=False)
    _check_num_splits(num_splits)
    out = q.new_empty((*q.shape[:2], v.shape[3] * 2))
    return out, q.new_empty(q.shape[:2], dtype=torch.float32)


def int4_kv_decode_paged(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens, scale=None,
    softcap=None, sinks=None, num_splits: int = 0,
):  # fmt: skip
    """See the module docstring. ``scale`` defaults to ``head_dim ** -0.5``; ``softcap`` (Gemma 2's
    logit soft-capping) None or 0 for none; ``sinks`` (GPT-OSS's attention sinks, floating
    ``[Hq]``) a logit per query head in the softmax's denominator; ``num_splits`` the CUDA
    decode's splits of ``max_pages * page_size`` tokens (0: one per 256, at most 64; the CPU
    kernel ignores it). The CUDA kernels take the contiguous decode's shapes (tensor cores for
    head_dim 64, 128, 256, 192 / 128 and 576 / 512; CUDA cores for the other even head sizes up
    to 256); elsewhere the reference runs."""
    args = (q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens)
    check_tensors(**dict(zip(_NAMES, args, strict=True)))
    if q.dim() != 3 or not q.shape[-1]:
        raise ValueError(f"q must be [batch, q_heads, head_dim > 0], got {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = _softcap_arg(softcap)
    num_splits = _check_num_splits(num_splits)
    check_sinks(sinks, q.shape[1], q.device)
    if direct_call_ok(*args):  # the implementation, no dispatcher
        out, lse = _kernel(*args, scale, softcap, num_splits)
    else:
        out, lse = torch.ops.fastlayers.int4_kv_decode_paged(*args, scale, softcap, num_splits)
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)


def _check_write(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing,
                 memory: bool = True, check_slots: bool = True) -> int:  # fmt: skip
    """The checks of :func:`kv_cache_write_paged` (``memory``: also the slots' range and
    distinctness on the host, when not captured and ``check_slots``, and that the pages share no
    memory with the inputs); returns the quantization group size."""
    for t, name in ((x, "x"), (packed_pages, "packed_pages"), (scale_pages, "scale_pages"),
                    (slots, "slots")):  # fmt: skip
        check_tensor(t, name)
    if x.dim() != 3:
        raise ValueError(f"x must be [tokens, kv_heads, head_dim], got {tuple(x.shape)}")
    n, h, d = x.shape
    if packed_pages.dtype != torch.uint8 or packed_pages.dim() != 4 or packed_pages.shape[1] != h \
            or packed_pages.shape[3] * 2 != d:  # fmt: skip
        raise ValueError(
            f"packed_pages must be uint8 [num_pages, {h}, page_size, {d // 2}], got "
            f"{packed_pages.dtype} {tuple(packed_pages.shape)}"
        )
    pages, _, page_size, _ = packed_pages.shape
    if (scale_pages.dtype != FP8 or scale_pages.dim() != 4
            or scale_pages.shape[:3] != packed_pages.shape[:3] or not scale_pages.shape[3]
            or d % scale_pages.shape[3]):  # fmt: skip
        raise ValueError(
            f"scale_pages must be float8_e4m3fn [{pages}, {h}, {page_size}, head_dim / group], "
            f"got {scale_pages.dtype} {tuple(scale_pages.shape)}"
        )
    if slots.dtype not in (torch.int32, torch.int64) or tuple(slots.shape) != (n,):
        raise ValueError(
            f"slots must be int32 or int64 [{n}], got {slots.dtype} {tuple(slots.shape)}"
        )
    for t, name in ((packed_pages, "packed_pages"), (scale_pages, "scale_pages"), (slots, "slots")):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for tab, name in ((cos, "cos"), (sin, "sin")):
        if tab is not None and (tab.dim() != 2 or tuple(tab.shape) != (n, d)):
            raise ValueError(
                f"{name} must be [{n}, {d}] (each token's position), got {tuple(tab.shape)}"
            )
    group = d // scale_pages.shape[3]
    rows, cos_rows, sin_rows = _as_rows(x, cos, sin)
    _check_kv_quantize(rows, post_scale, group, cos_rows, sin_rows, pairing)
    if not memory:
        return group
    if check_slots and n and not capturing(slots) and slots.device.type != "meta":
        _check_slots(slots, pages * page_size - 1)
    inputs = {"x": x, "slots": slots, "post_scale": post_scale, "cos": cos, "sin": sin}
    check_no_alias({"packed_pages": packed_pages, "scale_pages": scale_pages},
                   {k: v for k, v in inputs.items() if v is not None}, set())  # fmt: skip
    check_no_alias({"packed_pages": packed_pages}, {"scale_pages": scale_pages}, set())
    return group


def _as_rows(x, cos, sin):
    """``(x, cos, sin)`` of the paged write as ``kv_quantize`` takes them: ``x [N, Hkv, 1, d]``
    (a batch of one-token rows), ``cos`` / ``sin`` ``[N, 1, d]`` (or None)."""
    return x[:, :, None, :], *(None if tab is None else tab[:, None, :] for tab in (cos, sin))


def _check_slots(slots: torch.Tensor, last: int) -> None:
    """``slots`` (not empty) in ``[-1, last]``, the ones not -1 distinct: one host read (a decode
    step's few slots as a list, a prefill chunk's sorted on the device)."""
    if slots.numel() <= 1024:  # (a list beats torch's small ops: ~5 us against ~45 at 64 slots)
        vals = slots.tolist()
        low, high = min(vals), max(vals)
        used = [v for v in vals if v >= 0]
        repeated = len(set(used)) != len(used)
    else:
        s = slots.sort().values
        twice = ((s[1:] == s[:-1]) & (s[1:] >= 0)).any()
        low, high, repeated = torch.stack([s[0], s[-1], twice.long()]).tolist()
    if low < -1 or high > last:
        raise ValueError(
            f"slots must lie in [0, {last}] (num_pages x page_size), or be -1 for none"
        )
    if repeated:
        raise ValueError("slots must be distinct (-1 aside): two tokens were given one slot")


def _write_reference(x, packed_pages, scale_pages, slots, post_scale, cos=None, sin=None,
                     pairing="half"):  # fmt: skip
    """The specification: ``kv_quantize``'s reference of the tokens, then an indexed copy of the
    ones with a slot (not -1) into their pages' rows."""
    group = _check_write(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing)
    _write_indexed(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing, group)


def _write_indexed(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing, group):
    """``_write_reference`` on checked arguments."""
    rows, cos, sin = _as_rows(x, cos, sin)
    packed, scales = _kv_quantize_reference(rows, post_scale, group, cos, sin, pairing)
    keep = slots >= 0
    slots, page_size = slots[keep].long(), packed_pages.shape[2]
    page, slot = slots.div(page_size, rounding_mode="floor"), slots % page_size
    packed_pages[page, :, slot] = packed[keep][:, :, 0]
    scale_pages.view(torch.uint8)[page, :, slot] = scales.view(torch.uint8)[keep][:, :, 0]


def _write_kernel(x, packed_pages, scale_pages, slots, post_scale, cos=None, sin=None,
                  pairing="half", check_slots: bool = True):  # fmt: skip
    """The one-pass write (``check_slots``: False for slots valid by construction,
    :class:`~fastlayers.quant.PagedStep`'s: no host read; the inputs' aliasing is checked then
    too)."""
    group = _check_write(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing,
                         check_slots=check_slots)  # fmt: skip
    op = "kv_cache_write_paged"
    args = (x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing, group)
    if x.device.type not in ("cpu", "cuda") or not has_kernel(x.device, op):
        return _write_indexed(*args)
    if not (packed_pages.is_contiguous() and scale_pages.is_contiguous()):
        _ext.warn_once(
            f"{op}-strided",
            f"fastlayers.{op}: the kernel writes contiguous pages; packed_pages strides "
            f"{packed_pages.stride()}, scale_pages {scale_pages.stride()}: running the PyTorch "
            "reference (an indexed copy)",
        )
        return _write_indexed(*args)
    rows, cos, sin = _as_rows(x, cos, sin)
    _launch_quantize(rows, post_scale, group, cos, sin, pairing, packed_pages, scale_pages,
                     slots=slots)  # fmt: skip


LIB.impl("kv_cache_write_paged", _write_kernel, "CPU")
LIB.impl("kv_cache_write_paged", _write_kernel, "CUDA")
LIB.impl("kv_cache_write_paged", _write_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::kv_cache_write_paged", lib=LIB)
def _write_fake(x, packed_pages, scale_pages, slots, post_scale, cos=None, sin=None,
                pairing="half"):  # fmt: skip
    _check_write(x, packed_pages, scale_pages, slots, post_scale, cos, sin, pairing, memory=False)


def kv_cache_write_paged(x, packed_pages, scale_pages, slots, post_scale=None, cos=None, sin=None,
                         pairing: str = "half") -> None:  # fmt: skip
    """Writes the new tokens ``x [N, Hkv, d]`` (float32/float16/bfloat16; keys or values) into a
    paged INT4 cache: token ``i`` to page ``slots[i] // page_size``, slot ``slots[i] % page_size``
    of ``packed_pages`` uint8 ``[num_pages, Hkv, page_size, d/2]`` and ``scale_pages``
    float8_e4m3fn ``[num_pages, Hkv, page_size, d/g]`` (the group ``g`` read off its shape).
    Optional, as :func:`~fastlayers.ops.kvint4.kv_quantize`: RoPE with ``cos`` / ``sin`` ``[N, d]``
    (each token's own position) and ``pairing``, then ``post_scale [Hkv, d]``. ``slots`` int32 or
    int64 ``[N]``, distinct, in ``[0, num_pages * page_size)``, or -1 for a token not to write
    (vLLM's padding slot); checked on the host, not while a CUDA graph is captured (then the
    kernels skip a slot out of range). One pass on CPU and CUDA (vLLM's ``reshape_and_cache``:
    each token quantized straight into its page row); pages that are not contiguous take the
    reference, an indexed copy (warned once). Returns None."""
    check_tensors(("post_scale", "cos", "sin"), x=x, packed_pages=packed_pages,
                  scale_pages=scale_pages, slots=slots, post_scale=post_scale, cos=cos,
                  sin=sin)  # fmt: skip
    args = (x, packed_pages, scale_pages, slots, post_scale, cos, sin)
    if direct_call_ok(*args):
        _write_kernel(*args, pairing)
    else:
        torch.ops.fastlayers.kv_cache_write_paged(*args, pairing)


def int4_kv_attention_paged(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens, scale=None,
    softcap=None, sinks=None, q_lens=None,
):  # fmt: skip
    """Causal attention of ``Tq`` new tokens per row over a paged INT4 cache (prefill of a chunk,
    speculative decoding's verification): ``q [B, Hq, Tq, d]``, row ``b``'s query ``i`` is its
    token ``seq_lens[b] - Tq + i`` (the new tokens already written: ``seq_lens[b] >= Tq``) and
    sees the row's tokens up to it. ``q_lens`` (int32 ``[B]``, optional): rows of different
    numbers of new tokens in one call (chunked prefill beside decode rows): row ``b``'s first
    ``q_lens[b]`` queries are its tokens ``seq_lens[b] - q_lens[b] + i``, the rest of its Tq are
    padding (zeros, lse -inf; their tiles skipped); ``0 <= q_lens[b] <= min(Tq, seq_lens[b])``
    (Tq, a padding bucket, may then exceed what the block table holds).
    Returns ``(out [B, Hq, Tq, dv] in q's dtype, lse [B, Hq, Tq] fp32)``. Pages, block table and
    the other arguments as :func:`int4_kv_decode_paged`; the CPU and CUDA prefill kernels
    (:func:`~fastlayers.ops.kvint4.int4_kv_attention`'s) read the pages in place; elsewhere the
    reference."""
    args = (q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens)
    check_tensors(("q_lens",), **dict(zip(_NAMES, args, strict=True)), q_lens=q_lens)
    if q.dim() != 4 or not q.shape[-1]:
        raise ValueError(
            f"q must be [batch, q_heads, q_tokens, head_dim > 0], got {tuple(q.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = _softcap_arg(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    if direct_call_ok(*args, q_lens):  # the implementation, no dispatcher
        out, lse = _attention_kernel(*args, scale, softcap, q_lens)
    else:
        out, lse = torch.ops.fastlayers.int4_kv_attention_paged(*args, scale, softcap, q_lens)
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks[:, None])


def int4_kv_attention_paged_varlen(
    q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens, cu_seqlens_q,
    max_seqlen_q=None, scale=None, softcap=None, sinks=None,
):  # fmt: skip
    """:func:`int4_kv_attention_paged` on **ragged** queries (FlashAttention's ``cu_seqlens_q`` /
    ``max_seqlen_q``, FlashInfer's ``qo_indptr``): a serving step's prefill chunks and decode rows
    in one call without padding. ``q [T, Hq, d]`` holds every row's new tokens one after the
    other; row ``b``'s are tokens ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` (int32
    ``[B + 1]``, from 0 to T, not decreasing), its query ``i`` the row's token
    ``seq_lens[b] - n_b + i`` (``n_b`` its count, at most ``seq_lens[b]``: the new tokens already
    written), seeing the row's tokens up to it. ``max_seqlen_q`` (int): the largest ``n_b``, the
    kernels' grid; None reads it from ``cu_seqlens_q`` on the host (while a CUDA graph is captured:
    T, or a row's most tokens if fewer, every tile past a row's count exiting at once). Returns
    ``(out [T, Hq, dv] in q's dtype, lse [T, Hq] fp32)``. Pages, block table, ``scale``,
    ``softcap`` and ``sinks`` as :func:`int4_kv_attention_paged`; the CPU and CUDA prefill kernels
    read q, out and lse in this layout (no copies); a call whose rows hold at most one query each
    takes the decode kernels.
    ``cu_seqlens_q`` and ``max_seqlen_q`` are checked on the host, not while a CUDA graph is
    captured (then a row past ``max_seqlen_q`` tokens, or tokens outside ``cu_seqlens_q``, are
    left unwritten)."""
    args = (q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_table, seq_lens)
    check_tensors(**dict(zip(_NAMES, args, strict=True)), cu_seqlens_q=cu_seqlens_q)
    if q.dim() != 3 or not q.shape[-1]:
        raise ValueError(f"q must be [total_q_tokens, q_heads, head_dim > 0], got {tuple(q.shape)}")
    if max_seqlen_q is None:
        if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1:
            max_seqlen_q = 1  # (any: the checks reject cu_seqlens_q)
        elif capturing(q) or cu_seqlens_q.device.type == "meta" or cu_seqlens_q.numel() < 2:
            # (no host read: q's tokens, at most a row's, bound every row's count)
            most = q.shape[0]
            if block_table.dim() == 2 and k_pages.dim() == 4:
                most = min(most, block_table.shape[1] * k_pages.shape[2])
            max_seqlen_q = max(most, 1)
        else:
            max_seqlen_q = max(int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()), 1)
    elif isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int):
        raise TypeError(f"max_seqlen_q must be an int or None, got {type(max_seqlen_q).__name__}")
    return _varlen_call(args, cu_seqlens_q, max_seqlen_q, scale, softcap, sinks)


def _varlen_call(args, cu, most, scale, softcap, sinks, check_range: bool = True):
    """The ragged prefill of ``args`` (q, pages, block table, lengths; q ``[T, Hq, d]``) with
    query starts ``cu`` and ``most`` queries a row: the implementation straight away where the
    dispatcher would add nothing, else the op; then the sinks. ``check_range``: False for a
    :class:`~fastlayers.quant.PagedStep`'s metadata (the direct route reads none of it back)."""
    q = args[0]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = _softcap_arg(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    if direct_call_ok(*args, cu):  # the implementation, no dispatcher
        out, lse = _varlen_kernel(*args, cu, most, scale, softcap, check_range=check_range)
    else:
        out, lse = torch.ops.fastlayers.int4_kv_attention_paged_varlen(*args, cu, most, scale,
                                                                       softcap)  # fmt: skip
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)


# ---- A serving step's metadata valid by construction (Int4PagedKVCache.plan) ---------------------


def write_planned(x, packed_pages, scale_pages, slots, post_scale=None, cos=None, sin=None,
                  pairing: str = "half") -> None:  # fmt: skip
    """:func:`kv_cache_write_paged` with ``slots`` the cache's own (``PagedStep.slots``: in range
    and distinct by construction): no host read of them (shapes, dtypes and aliasing still
    checked). Under torch.compile or a dispatch mode: the op, with its checks."""
    args = (x, packed_pages, scale_pages, slots, post_scale, cos, sin)
    check_tensors(("post_scale", "cos", "sin"), x=x, packed_pages=packed_pages,
                  scale_pages=scale_pages, slots=slots, post_scale=post_scale, cos=cos,
                  sin=sin)  # fmt: skip
    if direct_call_ok(*args):
        _write_kernel(*args, pairing, check_slots=False)
    else:
        torch.ops.fastlayers.kv_cache_write_paged(*args, pairing)


def split_decode_rows(device: torch.device) -> bool:
    """Whether a planned step on ``device`` runs its one-token rows apart from its longer ones
    (:class:`~fastlayers.quant.paged_cache.DecodeSplit`): on CUDA, where a decode row fills only
    its GQA group's rows of a ragged prefill tile of 64 (the group's heads packed) and its keys
    are not split across CTAs. Not on CPU: there a decode row is a task of its GQA group's rows in
    either kernel, and one call measured as fast as two (``_paged_mixed``)."""
    return on_cuda(device)


def _check_step(step, pages: torch.Tensor, name: str) -> None:
    """``step`` a :class:`~fastlayers.quant.PagedStep` planned for a pool like ``pages`` (its
    page size, at least its pages: the entries it holds were checked against those)."""
    from fastlayers.quant.paged_cache import PagedStep  # (quant imports ops)

    if not isinstance(step, PagedStep):
        raise TypeError(
            f"step must be a PagedStep (Int4PagedKVCache.plan or quant.plan_paged_step), got "
            f"{type(step).__name__}"
        )
    check_tensor(pages, name)
    if pages.dim() != 4 or pages.shape[2] != step.page_size or pages.shape[0] < step.num_pages:
        raise ValueError(
            f"{name} must be a pool of at least {step.num_pages} pages of {step.page_size} tokens "
            f"(the one the step was planned for), got {tuple(pages.shape)}"
        )


def kv_cache_write_paged_planned(x, packed_pages, scale_pages, step, post_scale=None, cos=None,
                                 sin=None, pairing: str = "half") -> None:  # fmt: skip
    """:func:`kv_cache_write_paged` of a :class:`~fastlayers.quant.PagedStep`'s new tokens,
    ``x [N, Hkv, d]`` in the step's order, into their slots (valid and distinct by construction:
    not read back)."""
    _check_step(step, packed_pages, "packed_pages")
    write_planned(x, packed_pages, scale_pages, step.slots, post_scale, cos, sin, pairing)


def int4_kv_attention_paged_planned(q, k_pages, k_scale_pages, v_pages, v_scale_pages, step,
                                    scale=None, softcap=None, sinks=None):  # fmt: skip
    """:func:`int4_kv_attention_paged_varlen` of ``q [N, Hq, d]`` (the step's new tokens in its
    order) with a :class:`~fastlayers.quant.PagedStep`'s block table, lengths and query starts
    (FlashInfer's run after its plan; valid by construction): no host read of them (shapes and
    dtypes still checked), CUDA-graph capturable. Returns ``(out [N, Hq, dv], lse [N, Hq])``. A
    step with a ``split`` (on CUDA) runs its one-token rows through the split-KV decode kernel
    and the rest through the ragged prefill: two calls, their outputs joined in the step's
    order."""
    _check_step(step, k_pages, "k_pages")
    args = (q, k_pages, k_scale_pages, v_pages, v_scale_pages, step.block_table, step.seq_lens)
    check_tensors(**dict(zip(_NAMES, args, strict=True)))
    if q.dim() != 3 or q.shape[0] != step.num_tokens:  # (the kernels read the step's N rows)
        raise ValueError(
            f"q must be [{step.num_tokens} (the step's new tokens), q_heads, head_dim], got "
            f"{tuple(q.shape)}"
        )
    if step.split is None or not split_decode_rows(q.device):
        return _varlen_call(args, step.cu_seqlens_q, step.max_seqlen_q, scale, softcap, sinks,
                            check_range=False)  # fmt: skip
    return _split_call(args[:5], step.split, scale, softcap, sinks)


def _split_call(args, split, scale, softcap, sinks):
    """A mixed step as two calls (``split`` a :class:`~fastlayers.quant.paged_cache.DecodeSplit`
    of ``args``' q ``[N, Hq, d]``): the decode rows' split-KV decode, the other rows' ragged
    prefill; outputs joined into ``[N, Hq, dv]`` / ``[N, Hq]``, then the sinks."""
    q, pages = args[0], args[1:]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = _softcap_arg(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    views = isinstance(split.decode_tokens, slice)
    if views:
        q_dec, q_pre = q[split.decode_tokens], q[split.prefill_tokens]
    else:
        q_dec, q_pre = (q.index_select(0, split.decode_tokens),
                        q.index_select(0, split.prefill_tokens))  # fmt: skip
    dec = (q_dec, *pages, split.decode_table, split.decode_lens)
    pre = (q_pre, *pages, split.prefill_table, split.prefill_lens)
    if direct_call_ok(*dec, *pre[:1], split.prefill_cu):  # the implementations, unchecked ranges
        _check(*dec, scale, softcap, check_range=False)
        out_d, lse_d = _launch("int4_kv_decode_paged", _reference_op, *dec, scale, softcap)
        out_p, lse_p = _varlen_kernel(*pre, split.prefill_cu, split.prefill_max, scale, softcap,
                                      check_range=False)  # fmt: skip
    else:
        out_d, lse_d = torch.ops.fastlayers.int4_kv_decode_paged(*dec, scale, softcap, 0)
        out_p, lse_p = torch.ops.fastlayers.int4_kv_attention_paged_varlen(
            *pre, split.prefill_cu, split.prefill_max, scale, softcap
        )
    if views:  # (the decode rows first or last)
        first = split.decode_tokens.start == 0
        out = torch.cat([out_d, out_p] if first else [out_p, out_d])
        lse = torch.cat([lse_d, lse_p] if first else [lse_p, lse_d])
    else:
        out = empty((q.shape[0], *out_d.shape[1:]), out_d.dtype, q.device)
        lse = empty(q.shape[:2], torch.float32, q.device)
        out.index_copy_(0, split.decode_tokens, out_d).index_copy_(0, split.prefill_tokens, out_p)
        lse.index_copy_(0, split.decode_tokens, lse_d).index_copy_(0, split.prefill_tokens, lse_p)
    return (out, lse) if sinks is None else apply_sinks(out, lse, sinks)
