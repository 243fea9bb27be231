# SPDX-License-Identifier: Apache-2.0
"""INT4 KV decode benchmark: ``fastlayers.ops.int4_kv_decode`` (one new token per sequence over an
INT4 KV cache with FP8 scales, GQA 32/8, head dim 128) against bf16 ``scaled_dot_product_attention``
over the same context in bf16. GB/s counts the INT4 cache bytes read (keys, values, scales); the
fraction is against ``dst.copy_(src)`` in the same run. The bf16 cache is 3.8x larger. Both caches
rotate over copies past the last-level cache (one decode step reads each layer's cache once).
Also: head dim 256 (Gemma 2 / 3), values of their own head size (MiMo-V2-Flash's window layers),
multi-head latent attention's decode over its INT4 latent rows, the paged decode (block tables)
against the contiguous one, the paged cache write against quantize-then-copy, one decode step of
the whole attention core, and causal prefill.
"""

from __future__ import annotations

import functools

import torch

from fastlayers import _ext
from fastlayers.benchmark.harness import (
    CopyCase,
    Row,
    backend_label,
    copies_to_exceed_cache,
    peak_extra_mib,
    time_interleaved,
)
from fastlayers.ops.kvint4 import int4_kv_decode
from fastlayers.ops.kvint4_paged import int4_kv_decode_paged
from fastlayers.quant.rope_kv import quantize_kv_int4, quantize_q_fp8

HQ, HKV, D, GROUP = 32, 8, 128, 128
CASES = {"cpu": [(1, 1024), (1, 8192), (4, 4096)], "cuda": [(1, 4096), (16, 8192), (64, 32768)]}
QUICK = {"cpu": [(1, 2048)], "cuda": [(8, 8192)]}


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = [
        _decode_case(
            device,
            gen,
            batch,
            context,
            (HQ, HKV, D, D, GROUP),
            reps,
            "int4_kv_decode (GQA 32/8, d128, g128)",
        )  # fmt: skip
        for batch, context in (QUICK if quick else CASES)[device.type]
    ]
    if device.type == "cuda":  # fp32 queries (q_quantize's FP8 values: the FireQ route)
        batch, context = (QUICK if quick else CASES)[device.type][-1]
        rows.append(_decode_case(device, gen, batch, context, (HQ, HKV, D, D, GROUP), reps,
                                 "int4_kv_decode, fp32 queries (GQA 32/8, d128, g128)",
                                 torch.float32))  # fmt: skip
    for seed, sizes, label, cases in OTHER_SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows += [
            _decode_case(device, gen, batch, context, sizes, reps, label)
            for batch, context in cases[device.type][: 1 if quick else None]
        ]
    for batch, context in LATENT[device.type][: 1 if quick else None]:
        rows += _latent_case(device, batch, context, reps)
    rows += [_paged_case(device, batch, context, reps)
             for batch, context in PAGED[device.type][: 1 if quick else None]]  # fmt: skip
    rows += _paged_prefill(device, quick, reps)
    rows += _paged_mixed(device, quick, reps)
    rows += [
        _paged_write(device, tokens, reps)
        for tokens in PAGED_WRITE[device.type][: 1 if quick else None]
    ]
    rows += _paged_step(device, quick, reps)
    rows += _split_sweep(device, quick, reps)
    rows += _decode_step(device, quick, reps)
    rows += _prefill(device, quick, reps)
    rows += _latent_prefill(device, quick, reps)
    return rows


# Head dim 256 (Gemma 2 / 3: 16 query heads over 8 key/value heads); (batch, context)
HEAD_256 = {"cpu": [(1, 4096)], "cuda": [(16, 8192)]}

# Head dim 96 (Phi-3 mini: 32 query heads, one key/value head each; the CUDA-core decode, 24 lanes
# of 4 channels); (batch, context)
HEAD_96 = {"cpu": [(1, 4096)], "cuda": [(16, 4096)]}

# Values of their own head size (MiMo-V2-Flash's window layers: 64 query heads over 8 key/value
# heads, keys 192 channels, values 128; one group of 64 for both); (batch, context)
VALUE_DIM = {"cpu": [(1, 4096)], "cuda": [(16, 8192)]}

# The decode rows besides GQA 32/8 at d128: (generator seed, sizes as _decode_case takes them,
# label, (batch, context) per device)
OTHER_SHAPES = [
    (2, (16, 8, 256, 256, GROUP), "int4_kv_decode (Gemma 2 9B: GQA 16/8, d256, g128)", HEAD_256),
    (3, (32, 32, 96, 96, 32), "int4_kv_decode (Phi-3 mini: MHA 32/32, d96, g32)", HEAD_96),
    (1, (64, 8, 192, 128, 64),
     "int4_kv_decode, values of their own size (GQA 64/8, d192, dv128, g64)", VALUE_DIM),
]  # fmt: skip


def _decode_case(device: torch.device, gen, batch: int, context: int, sizes, reps: int,
                 label: str, qdtype=torch.bfloat16) -> Row:  # fmt: skip
    """``int4_kv_decode`` of one new token per sequence over ``context`` cached tokens against
    bf16 SDPA over the same cache in bf16; ``sizes``: query heads, key/value heads, the keys' and
    the values' head sizes, the quantization group; ``qdtype``: the INT4 side's queries. Both
    caches rotated past the last-level cache: a decode step reads its layer's cache cold."""
    hq, hkv, d, dv, group = sizes
    kf = torch.randn(batch, hkv, context, d, generator=gen).to(device)
    vf = torch.randn(batch, hkv, context, dv, generator=gen).to(device)
    q = torch.randn(batch, hq, d, generator=gen).to(device, torch.bfloat16)
    qi = q.to(qdtype)
    k, ks = quantize_kv_int4(kf, group)
    v, vs = quantize_kv_int4(vf, group)
    # (values of another size: the baseline's zero-padded to the keys' size; torch's CPU SDPA
    # takes its math path for them, ~4x slower than its fused kernel on the padded ones)
    kb, vb = kf.bfloat16(), torch.nn.functional.pad(vf.bfloat16(), (0, d - dv))
    del kf, vf
    nbytes = k.numel() + ks.numel() + v.numel() + vs.numel()
    int4_sets = [(qi, k, ks, v, vs)] + [
        (qi, *(t.clone() for t in (k, ks, v, vs)))
        for _ in range(copies_to_exceed_cache(nbytes, device) - 1)
    ]
    bf16_sets = [(q[:, :, None], kb, vb)] + [
        (q[:, :, None], kb.clone(), vb.clone())
        for _ in range(copies_to_exceed_cache(2 * (kb.numel() + vb.numel()), device) - 1)
    ]
    copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
    with torch.no_grad():
        t, t_ref, t_copy = time_interleaved(
            [
                (int4_kv_decode, int4_sets, reps),
                (_sdpa, bf16_sets, max(3, reps // 2)),
                copy_.case(reps),
            ],
            device,
        )
        del int4_sets, bf16_sets
        out, _ = int4_kv_decode(qi, k, ks, v, vs)
        from fastlayers.ops.kvint4 import _reference

        want, _ = _reference(qi.double(), k, ks, v, vs, context, d**-0.5)
        err = (out.double() - want).abs().max().item()
    gbps = nbytes / t.median_s / 1e9
    return Row(
        label,
        f"batch {batch} x context {context} ({nbytes / 2**20:.0f} MiB INT4 cache)",
        str(qdtype).removeprefix("torch."),
        backend_label(device, "int4_kv_decode"),
        t.median_s * 1e6,
        "bf16 SDPA over a bf16 cache" if dv == d else "bf16 SDPA, values zero-padded to d",
        t_ref.median_s * 1e6,
        gbps,
        gbps * 1e9 / copy_.bandwidth(t_copy),
        err,
    )


# The paged decode: vLLM's default page of 16 tokens, the pages of all rows in one shuffled pool;
# (batch, context).
PAGED = {"cpu": [(4, 4096)], "cuda": [(16, 8192)]}
PAGE_SIZE = 16


def _to_pages(caches, gen) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Contiguous caches ``[B, H, T, w]`` (T a multiple of PAGE_SIZE) as pages of PAGE_SIZE tokens
    in one shuffled pool: ``(pages, block_table, seq_lens)``."""
    batch, hkv, context = caches[0].shape[:3]
    device = caches[0].device
    per_row, pages = context // PAGE_SIZE, batch * context // PAGE_SIZE
    order = torch.randperm(pages, generator=gen).to(device)
    table = order.reshape(batch, per_row).int()  # row b's page j: order[b * per_row + j]

    def paged(x):  # [B, H, T, w] -> [pages, H, PAGE_SIZE, w], page order[b * per_row + j]
        chunks = x.view(torch.uint8).reshape(batch, hkv, per_row, PAGE_SIZE, -1).transpose(1, 2)
        out = torch.empty((pages, hkv, PAGE_SIZE, x.shape[3]), dtype=torch.uint8, device=device)
        out[order] = chunks.reshape(pages, hkv, PAGE_SIZE, -1)
        return out.view(x.dtype)

    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return [paged(x) for x in caches], table, seq_lens


# A planned decode step over an Int4PagedKVCache: (sequences, context) per device.
PAGED_STEP = {"cpu": (4, 1024), "cuda": (16, 4096)}


def _paged_step(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """One layer's decode step over an ``Int4PagedKVCache`` (write k, v; attention of one new
    token per sequence; GQA 32/8, d128, g128, bf16) on a plan (``cache.plan``: the metadata valid
    by construction, no device-to-host read per layer) against the same step on checked tensors
    (``cache.write`` with the slots, ``cache.decode``: five host reads of the metadata)."""
    from fastlayers.quant.paged_cache import Int4PagedKVCache

    if quick:
        return []
    batch, context = PAGED_STEP[device.type]
    gen = torch.Generator(device="cpu").manual_seed(11)
    cache = Int4PagedKVCache(1, batch * context // PAGE_SIZE + batch, PAGE_SIZE, HKV, D, GROUP,
                             device=device)  # fmt: skip
    seqs = [cache.new_sequence() for _ in range(batch)]
    slots = cache.reserve(seqs, context - 1)
    kv = torch.randn(2, slots.shape[0], HKV, D, generator=gen).to(device, torch.bfloat16)
    cache.write(0, kv[0], kv[1], slots)
    step = cache.plan(seqs, 1)
    table, seq_lens, new = step.block_table.clone(), step.seq_lens.clone(), step.slots.clone()
    q, k, v = (torch.randn(batch, h, D, generator=gen).to(device, torch.bfloat16)
               for h in (HQ, HKV, HKV))  # fmt: skip

    def planned():
        cache.write(0, k, v, step)
        return cache.attention_step(0, q, step)[0]

    def checked():
        cache.write(0, k, v, new)
        return cache.decode(0, q, table, seq_lens)[0]

    with torch.no_grad():
        t, t_ref = time_interleaved([(planned, [()], reps), (checked, [()], reps)], device)
        err = (planned().float() - checked().float()).abs().max().item()
    return [
        Row(
            f"Int4PagedKVCache decode step on a plan ({PAGE_SIZE}-token pages, GQA 32/8, d128)",
            f"{batch} sequences x 1 new token, context {context}: write k, v + attention",
            "bfloat16",
            backend_label(device, "int4_kv_decode_paged"),
            t.median_s * 1e6,
            "the same step on checked tensors (write, decode)",
            t_ref.median_s * 1e6,
            float("nan"),
            float("nan"),
            err,
        )
    ]


# The paged prefill: (batch, new tokens, context) per device.
PAGED_PREFILL = {"cpu": [(2, 128, 1024)], "cuda": [(4, 512, 4096)]}


def _paged_prefill(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """``int4_kv_attention_paged`` (GQA 32/8, d128, g128, bf16 queries; new tokens at the end of
    each row's context) against ``int4_kv_attention`` over the same tokens in a contiguous
    cache."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention
    from fastlayers.ops.kvint4_paged import int4_kv_attention_paged

    if quick:
        return []
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(6)
    for batch, tokens, context in PAGED_PREFILL[device.type]:
        shape = (batch, HKV, context, D)
        k, ks = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
        v, vs = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
        q = torch.randn(batch, HQ, tokens, D, generator=gen).to(device, torch.bfloat16)
        cache, table, seq_lens = _to_pages((k, ks, v, vs), gen)
        with torch.no_grad():
            t, t_ref = time_interleaved(
                [(int4_kv_attention_paged, [(q, *cache, table, seq_lens)], max(3, reps // 4)),
                 (int4_kv_attention, [(q, k, ks, v, vs)], max(3, reps // 4))],
                device,
            )  # fmt: skip
            out, _ = int4_kv_attention_paged(q, *cache, table, seq_lens)
            want, _ = _attention_reference(q.double(), k, ks, v, vs, context, D**-0.5)
            err = (out.double() - want).abs().max().item()
        rows.append(
            Row(
                f"int4_kv_attention_paged prefill ({PAGE_SIZE}-token pages, GQA 32/8, d128)",
                f"batch {batch} x {tokens} new tokens, context {context}",
                "bfloat16",
                backend_label(device, "int4_kv_attention_paged"),
                t.median_s * 1e6,
                "int4_kv_attention, the same tokens in a contiguous cache",
                t_ref.median_s * 1e6,
                float("nan"),
                float("nan"),
                err,
            )
        )
    return rows


# A mixed step (chunked prefill beside decodes): (rows, the chunk's new tokens, context) per
# device; row 0 takes the chunk, the others one token each.
PAGED_MIXED = {"cpu": (8, 128, 1024), "cuda": (16, 512, 4096)}


def _mixed_apart(q, pages, table, seq_lens):
    """The mixed step as two calls: the chunk row's prefill, then the other rows' decode."""
    from fastlayers.ops.kvint4_paged import int4_kv_attention_paged

    int4_kv_attention_paged(q[:1], *pages, table[:1], seq_lens[:1])
    int4_kv_decode_paged(q[1:, :, -1], *pages, table[1:], seq_lens[1:])


def _paged_mixed(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """``int4_kv_attention_paged(..., q_lens=...)`` of one step that mixes a prefill chunk (row 0)
    with one-token decodes (the other rows: their queries padded to the chunk's length) against
    the same work as two calls (``_mixed_apart``); the same step on ragged queries
    (``int4_kv_attention_paged_varlen``: no padding) against the padded call; and a planned
    step's split (the decode rows through the decode kernel, the chunk through the ragged
    prefill: ``attention_step``'s route on CUDA) against the one ragged call. GQA 32/8, d128,
    g128, bf16 queries."""
    from fastlayers.ops.kvint4 import _attention_reference, _reference
    from fastlayers.ops.kvint4_paged import (
        _split_call,
        int4_kv_attention_paged,
        int4_kv_attention_paged_varlen,
    )
    from fastlayers.quant.paged_cache import _make_step

    if quick:
        return []
    batch, tokens, context = PAGED_MIXED[device.type]
    gen = torch.Generator(device="cpu").manual_seed(7)
    shape = (batch, HKV, context, D)
    k, ks = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
    v, vs = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
    cache, table, seq_lens = _to_pages((k, ks, v, vs), gen)
    q = torch.randn(batch, HQ, tokens, D, generator=gen).to(device, torch.bfloat16)
    q[1:, :, :-1] = 0  # (padding)
    q[1:, :, 0] = q[1:, :, -1]  # a decode row's query first, its padding after
    q_lens = torch.tensor([tokens] + [1] * (batch - 1), dtype=torch.int32, device=device)
    fused = functools.partial(int4_kv_attention_paged, q_lens=q_lens)
    apart_q = q.clone()
    apart_q[1:, :, -1] = q[1:, :, 0]  # (the decode rows' queries where _mixed_apart reads them)
    ragged_q = torch.cat([q[0].transpose(0, 1), q[1:, :, 0]]).contiguous()  # [T, Hq, D]
    cu = torch.tensor([0, *range(tokens, tokens + batch)], dtype=torch.int32, device=device)
    ragged = functools.partial(int4_kv_attention_paged_varlen, cu_seqlens_q=cu, max_seqlen_q=tokens)
    # the planned step's split (on CUDA attention_step's route; timed here on every device): the
    # chunk through the ragged prefill, the decode rows through the split-KV decode
    counts = [tokens] + [1] * (batch - 1)
    step = _make_step(range(batch), counts, [0] * sum(counts), table.tolist(),
                      seq_lens.tolist(), device, True, PAGE_SIZE, cache[0].shape[0])  # fmt: skip
    split = functools.partial(_split_call, split=step.split, scale=None, softcap=None, sinks=None)
    with torch.no_grad():
        t, t_ref, t_ragged, t_split = time_interleaved(
            [(fused, [(q, *cache, table, seq_lens)], max(3, reps // 4)),
             (_mixed_apart, [(apart_q, cache, table, seq_lens)], max(3, reps // 4)),
             (ragged, [(ragged_q, *cache, table, seq_lens)], max(3, reps // 4)),
             (split, [((ragged_q, *cache),)], max(3, reps // 4))],
            device,
        )  # fmt: skip
        out, _ = fused(q, *cache, table, seq_lens)
        want, _ = _attention_reference(q[:1].double(), k[:1], ks[:1], v[:1], vs[:1], context,
                                       D**-0.5)  # fmt: skip
        err = (out[:1].double() - want).abs().max().item()
        got, _ = ragged(ragged_q, *cache, table, seq_lens)
        err_ragged = (got[:tokens].transpose(0, 1)[None].double() - want).abs().max().item()
        mem_ragged = peak_extra_mib(ragged, (ragged_q, *cache, table, seq_lens), device)
        mem_padded = peak_extra_mib(fused, (q, *cache, table, seq_lens), device)
        got_split, _ = split((ragged_q, *cache))
        err_split = (got_split[:tokens].transpose(0, 1)[None].double() - want).abs().max().item()
        want_dec, _ = _reference(q[1:, :, 0].double(), k[1:], ks[1:], v[1:], vs[1:], context,
                                 D**-0.5)  # fmt: skip
        err_split = max(err_split, (got_split[tokens:].double() - want_dec).abs().max().item())
    return [
        Row(
            f"int4_kv_attention_paged_varlen, planned step split ({PAGE_SIZE}-token pages, "
            "GQA 32/8, d128)",
            f"1 row x {tokens} new tokens + {batch - 1} decode rows, context {context}",
            "bfloat16",
            backend_label(device, "int4_kv_attention_paged_varlen"),
            t_split.median_s * 1e6,
            "the same step in one ragged call",
            t_ragged.median_s * 1e6,
            float("nan"),
            float("nan"),
            err_split,
        ),
        Row(
            f"int4_kv_attention_paged_varlen ({PAGE_SIZE}-token pages, GQA 32/8, d128)",
            f"1 row x {tokens} new tokens + {batch - 1} decode rows, context {context}",
            "bfloat16",
            backend_label(device, "int4_kv_attention_paged_varlen"),
            t_ragged.median_s * 1e6,
            "the same step padded (q_lens)",
            t.median_s * 1e6,
            float("nan"),
            float("nan"),
            err_ragged,
            mem_ragged,
            mem_padded,
        ),
        Row(
            f"int4_kv_attention_paged, q_lens ({PAGE_SIZE}-token pages, GQA 32/8, d128)",
            f"1 row x {tokens} new tokens + {batch - 1} decode rows, context {context}",
            "bfloat16",
            backend_label(device, "int4_kv_attention_paged"),
            t.median_s * 1e6,
            "two calls: the chunk's prefill, the decodes",
            t_ref.median_s * 1e6,
            float("nan"),
            float("nan"),
            err,
        ),
    ]


def _paged_case(device: torch.device, batch: int, context: int, reps: int) -> Row:
    """``int4_kv_decode_paged`` (GQA 32/8, d128, g128, bf16 queries) against ``int4_kv_decode``
    over the same tokens in a contiguous cache (the baseline column): the cost of the block
    table's indirection and of pages scattered in memory. Both rotated past the last-level
    cache."""
    from fastlayers.ops.kvint4 import _reference

    gen = torch.Generator(device="cpu").manual_seed(5)
    shape = (batch, HKV, context, D)
    k, ks = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
    v, vs = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
    q = torch.randn(batch, HQ, D, generator=gen).to(device, torch.bfloat16)
    cache, table, seq_lens = _to_pages((k, ks, v, vs), gen)
    nbytes = k.numel() + ks.numel() + v.numel() + vs.numel()
    copies = copies_to_exceed_cache(nbytes, device)
    paged_sets = [(q, *cache, table, seq_lens)] + [
        (q, *(t.clone() for t in cache), table, seq_lens) for _ in range(copies - 1)
    ]
    flat_sets = [(q, k, ks, v, vs)] + [
        (q, *(t.clone() for t in (k, ks, v, vs))) for _ in range(copies - 1)
    ]
    copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
    with torch.no_grad():
        t, t_ref, t_copy = time_interleaved(
            [(int4_kv_decode_paged, paged_sets, reps), (int4_kv_decode, flat_sets, reps),
             copy_.case(reps)],
            device,
        )  # fmt: skip
        del paged_sets, flat_sets
        out, _ = int4_kv_decode_paged(q, *cache, table, seq_lens)
        want, _ = _reference(q.double(), k, ks, v, vs, context, D**-0.5)
        err = (out.double() - want).abs().max().item()
    gbps = nbytes / t.median_s / 1e9
    return Row(
        f"int4_kv_decode_paged ({PAGE_SIZE}-token pages, GQA 32/8, d128, g128)",
        f"batch {batch} x context {context} ({nbytes / 2**20:.0f} MiB INT4 cache)",
        "bfloat16",
        backend_label(device, "int4_kv_decode_paged"),
        t.median_s * 1e6,
        "int4_kv_decode, the same tokens in a contiguous cache",
        t_ref.median_s * 1e6,
        gbps,
        gbps * 1e9 / copy_.bandwidth(t_copy),
        err,
    )


# The paged cache write's token counts (a decode step of a batch, a prefill chunk): keys of
# GQA 32/8's 8 kv heads, d128, g128, RoPE and post-RoPE scale, bf16.
PAGED_WRITE = {"cpu": [64, 2048], "cuda": [256, 8192]}


def _write_then_index(x, pages, scale_pages, slots, post, cos, sin):
    """The paged write as two ops, the baseline: ``kv_quantize``'s kernel into a temporary, then
    an indexed copy of each buffer into the pages' rows (fastlayers' route before the fused
    write)."""
    from fastlayers.ops.kvint4 import kv_quantize

    packed, scales = kv_quantize(x[:, :, None], GROUP, post, cos[:, None], sin[:, None])
    page, slot = slots.div(PAGE_SIZE, rounding_mode="floor"), slots % PAGE_SIZE
    pages[page, :, slot] = packed[:, :, 0]
    scale_pages.view(torch.uint8)[page, :, slot] = scales.view(torch.uint8)[:, :, 0]


def _paged_write(device: torch.device, tokens: int, reps: int) -> Row:
    """``kv_cache_write_paged`` of ``tokens`` new keys (one pass: RoPE, scale, quantization,
    each token straight into its page row) against ``_write_then_index``; slots shuffled over a
    pool of twice the tokens. GB/s counts the bf16 keys read and the INT4 rows and scales
    written; max err: the bytes where the two routes' pages differ (0: the same bytes)."""
    from fastlayers.ops.kvint4_paged import kv_cache_write_paged

    gen = torch.Generator(device="cpu").manual_seed(6)
    x = torch.randn(tokens, HKV, D, generator=gen).to(device, torch.bfloat16)
    ang = torch.rand(tokens, D, generator=gen).to(device) * 6
    cos, sin = ang.cos(), ang.sin()
    post = (torch.rand(HKV, D, generator=gen) + 0.5).to(device)
    pool = 2 * tokens // PAGE_SIZE + 1
    slots = torch.randperm(pool * PAGE_SIZE, generator=gen)[:tokens].to(device)
    pages = [torch.zeros(pool, HKV, PAGE_SIZE, D // 2, dtype=torch.uint8, device=device),
             torch.zeros(pool, HKV, PAGE_SIZE, D // GROUP, dtype=torch.uint8,
                         device=device).view(torch.float8_e4m3fn)]  # fmt: skip
    base = [t.clone() for t in pages]
    args = (x, *pages, slots, post, cos, sin)
    nbytes = x.numel() * 2 + tokens * HKV * (D // 2 + D // GROUP)
    copy_ = CopyCase(max(nbytes, 1 << 16), device)
    with torch.no_grad():
        t, t_ref, t_copy = time_interleaved(
            [(kv_cache_write_paged, [args], reps),
             (_write_then_index, [(x, *base, slots, post, cos, sin)], reps), copy_.case(reps)],
            device,
        )  # fmt: skip
    err = sum(
        int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
        for a, b in zip(pages, base, strict=True)
    )
    gbps = nbytes / t.median_s / 1e9
    return Row(
        f"kv_cache_write_paged ({PAGE_SIZE}-token pages, 8 kv heads, d128, g128, RoPE)",
        f"{tokens} tokens",
        "bfloat16",
        backend_label(device, "kv_cache_write_paged"),
        t.median_s * 1e6,
        "kv_quantize, then an indexed copy into the pages",
        t_ref.median_s * 1e6,
        gbps,
        gbps * 1e9 / copy_.bandwidth(t_copy),
        float(err),
    )


# CUDA only: the decode's split count (num_splits) at batch 1, where the default (one split per 256
# cached tokens) makes few CTAs: 8 kv heads x 4 splits at 1024 tokens, x 16 at 4096, against 132
# SMs on an H100. (batch, context) and the counts timed against the default.
SPLIT_SWEEP = [(1, 1024), (1, 4096)]
SPLITS = (1, 8, 16, 32, 64)


def _split_sweep(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """GQA 32/8, d128, g128, bf16 queries: ``int4_kv_decode(..., num_splits=n)`` for each of
    SPLITS against the default split (the baseline column), interleaved in one run."""
    if device.type != "cuda" or quick:
        return []
    from fastlayers.ops.kvint4 import _reference

    gen = torch.Generator(device="cpu").manual_seed(4)
    rows = []
    for batch, context in SPLIT_SWEEP:
        shape = (batch, HKV, context, D)
        k, ks = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
        v, vs = quantize_kv_int4(torch.randn(shape, generator=gen).to(device), GROUP)
        q = torch.randn(batch, HQ, D, generator=gen).to(device, torch.bfloat16)
        nbytes = k.numel() + ks.numel() + v.numel() + vs.numel()
        sets = [(q, k, ks, v, vs)] + [
            (q, *(t.clone() for t in (k, ks, v, vs)))
            for _ in range(copies_to_exceed_cache(nbytes, device) - 1)
        ]
        copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
        calls = [functools.partial(int4_kv_decode, num_splits=n) for n in SPLITS]
        with torch.no_grad():
            times = time_interleaved(
                [(int4_kv_decode, sets, reps)]
                + [(call, sets, reps) for call in calls]
                + [copy_.case(reps)],
                device,
            )
            want, _ = _reference(q.double(), k, ks, v, vs, context, D**-0.5)
            errs = [(call(q, k, ks, v, vs)[0].double() - want).abs().max().item() for call in calls]
        del sets
        # the default's split count, from the workspace it asks for (floats per split: hq (D + 1))
        floats = _ext.C.int4_kv_decode_cuda_workspace(batch, HQ, HKV, D, context, D, 0)
        default = floats // (batch * HQ * (D + 1))
        for n, t, err in zip(SPLITS, times[1:-1], errs, strict=True):
            gbps = nbytes / t.median_s / 1e9
            rows.append(
                Row(
                    f"int4_kv_decode, num_splits={n} (GQA 32/8, d128, g128)",
                    f"batch {batch} x context {context} ({nbytes / 2**20:.1f} MiB INT4 cache)",
                    "bfloat16",
                    backend_label(device, "int4_kv_decode"),
                    t.median_s * 1e6,
                    f"num_splits=0 (the length's: {default})",
                    times[0].median_s * 1e6,
                    gbps,
                    gbps * 1e9 / copy_.bandwidth(times[-1]),
                    err,
                )
            )
    return rows


# Multi-head latent attention's decode (DeepSeek-V2-Lite's attention: 16 heads, latent 512, RoPE
# part 64, nope 128, values 128; group 64); (batch, context).
LATENT = {"cpu": [(1, 4096), (4, 4096)], "cuda": [(16, 8192)]}
MLA_SIZES = (16, 128, 64, 128, 512, 64)  # heads, nope, rope, v, kv_lora_rank, group


def _latent_bf16(q, w, cache, nope: int, scaling: float):
    """The absorbed decode in PyTorch over a latent cache ``[B, 1, T, r + rope]`` (any float
    dtype): what :func:`~fastlayers.quant.rope_kv_hf.latent_rows_attention` computes over INT4
    rows."""
    r = w.shape[2]
    q_lat = torch.matmul(q[..., :nope].transpose(0, 1), w[:, :nope]).transpose(0, 1)
    qc = torch.cat([q_lat, q[..., nope:]], -1)  # [B, H, r + rope]
    s = torch.matmul(qc, cache[:, 0].transpose(1, 2)) * scaling  # [B, H, T]
    p = torch.softmax(s.float(), -1).to(q.dtype)
    o = torch.matmul(p, cache[:, 0, :, :r])  # [B, H, r]
    return torch.matmul(o.transpose(0, 1), w[:, nope:].transpose(1, 2)).transpose(0, 1)


def _latent_expanded(q, w2d, cache, sizes, scaling: float):
    """Hugging Face's decode step of multi-head latent attention after its cache update: every
    head's keys and values expanded from the whole latent cache (``kv_b_proj``), then SDPA."""
    heads, nope, rope, vd, r, _ = sizes
    b, _, t, _ = cache.shape
    kv = torch.nn.functional.linear(cache[..., :r], w2d).view(b, t, heads, nope + vd)
    k_nope, v = kv.transpose(1, 2).split([nope, vd], -1)
    k = torch.cat([k_nope, cache[..., r:].expand(b, heads, t, rope)], -1)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scaling)


def _latent_case(device: torch.device, batch: int, context: int, reps: int) -> list[Row]:
    """Multi-head latent attention's decode step over an INT4 latent cache
    (:func:`fastlayers.quant.rope_kv_hf.latent_rows_attention`: FP8 query, absorption, the INT4
    kernel reading the rows in place) against the same absorbed computation in bf16 PyTorch over a
    bf16 latent cache, and against Hugging Face's step (expand the whole cache, SDPA). Caches
    rotated past the last-level cache."""
    from fastlayers.quant.rope_kv import dequantize_kv_int4
    from fastlayers.quant.rope_kv_hf import latent_rows_attention

    heads, nope, rope, vd, r, group = MLA_SIZES
    gen = torch.Generator(device="cpu").manual_seed(3)
    cache_f = torch.randn(batch, 1, context, r + rope, generator=gen).to(device)
    w = (torch.randn(heads, nope + vd, r, generator=gen) * r**-0.5).to(device, torch.bfloat16)
    q = torch.randn(batch, heads, nope + rope, generator=gen).to(device, torch.bfloat16)
    scaling = (nope + rope) ** -0.5
    rows, scales = quantize_kv_int4(cache_f, group)
    cache_b = cache_f.bfloat16()
    del cache_f
    nbytes = rows.numel() + scales.numel()
    q4 = q[:, :, None]  # (one query token)
    int4_sets = [(q4, w, nope, rows, scales, context, None, scaling)] + [
        (q4, w, nope, rows.clone(), scales.clone(), context, None, scaling)
        for _ in range(copies_to_exceed_cache(nbytes, device) - 1)
    ]
    copies = copies_to_exceed_cache(2 * cache_b.numel(), device)
    bf16_sets = [(q, w, cache_b, nope, scaling)] + [
        (q, w, cache_b.clone(), nope, scaling) for _ in range(copies - 1)
    ]
    w2d = w.reshape(-1, r)
    expand_sets = [(q, w2d, c, MLA_SIZES, scaling) for _, _, c, _, _ in bf16_sets]
    copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
    with torch.no_grad():
        t, t_bf16, t_hf, t_copy = time_interleaved(
            [
                (latent_rows_attention, int4_sets, reps),
                (_latent_bf16, bf16_sets, reps),
                (_latent_expanded, expand_sets, 3),
                copy_.case(reps),
            ],
            device,
        )
        del int4_sets, bf16_sets, expand_sets
        out = latent_rows_attention(q4, w, nope, rows, scales, context, None, scaling)[:, :, 0]
        rounded = dequantize_kv_int4(rows, scales, torch.float64)
        want = _latent_bf16(quantize_q_fp8(q.double()), w.double(), rounded, nope, scaling)
        err = (out.double() - want).abs().max().item()
    gbps = nbytes / t.median_s / 1e9
    shape = f"batch {batch} x context {context} ({nbytes / 2**20:.1f} MiB INT4 latent)"
    label = "MLA decode over the INT4 latent (16 heads, r512 + rope64, v128)"
    backend = backend_label(device, "int4_kv_decode")
    frac = gbps * 1e9 / copy_.bandwidth(t_copy)
    return [
        Row(label, shape, "bfloat16", backend, t.median_s * 1e6,
            "bf16 absorbed in PyTorch over a bf16 latent cache", t_bf16.median_s * 1e6, gbps,
            frac, err),
        Row(label, shape, "bfloat16", backend, t.median_s * 1e6,
            "Hugging Face's step: expand the bf16 cache, SDPA", t_hf.median_s * 1e6, gbps, frac,
            err),
    ]  # fmt: skip


STEP = {"cpu": [(1, 2048)], "cuda": [(8, 8192)]}  # (batch, context)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def _bf16_step(q, k, v, cos, sin, kc, vc):
    """Hugging Face's decode step of a Llama attention core in bf16: RoPE on the new token's query
    and key, the key and value written into the preallocated cache in place, SDPA over it."""
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    kc[:, :, -1:] = k
    vc[:, :, -1:] = v
    return _sdpa(q, kc, vc)


def _int4_step(core, q, k, v, cos, sin, cache):
    out = core(q, k, v, cos, sin, cache)
    cache.truncate(cache.length - 1)  # the next call writes the same position again
    return out


def _decode_step(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """One decode step of the whole attention core (:class:`fastlayers.RopeAwareQuantAttention`:
    RoPE, FP8 query, the INT4 cache write in place, decode attention) against the same step in
    bf16 (RoPE, cache write, SDPA): the latency a layer pays per generated token, Python
    included."""
    from fastlayers.nn.quant_attention import RopeAwareQuantAttention
    from fastlayers.quant.kv_cache import Int4KVStore

    rows: list[Row] = []
    gen = torch.Generator(device="cpu").manual_seed(2)
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    for batch, context in STEP[device.type]:
        ang = torch.arange(context, dtype=torch.float32)[:, None] * inv
        ang = torch.cat([ang, ang], -1).to(device)
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

        post = torch.rand(HKV, D, generator=gen) + 0.5
        core = RopeAwareQuantAttention(HQ, HKV, D, GROUP, post).to(device)
        q, k, v = randn(batch, HQ, 1, D), randn(batch, HKV, 1, D), randn(batch, HKV, 1, D)
        c1, s1 = cos[-1:], sin[-1:]
        with torch.no_grad():
            store = core.new_cache()
            past = context - 1
            core(randn(batch, HQ, past, D), randn(batch, HKV, past, D), randn(batch, HKV, past, D),
                 cos[:past], sin[:past], store)  # fmt: skip
            _int4_step(core, q, k, v, c1, s1, store)  # (grows the buffers once, before timing)
            nbytes = 2 * batch * HKV * context * (D // 2 + D // GROUP)
            stores = [store]
            for _ in range(copies_to_exceed_cache(nbytes, device) - 1):
                clone = Int4KVStore()
                clone.buffers, clone.length = tuple(t.clone() for t in store.buffers), past
                stores.append(clone)
            kc, vc = randn(batch, HKV, context, D), randn(batch, HKV, context, D)
            bf16_caches = [(kc, vc)] + [
                (kc.clone(), vc.clone())
                for _ in range(copies_to_exceed_cache(2 * kc.numel() * 2, device) - 1)
            ]
            t, t_ref = time_interleaved(
                [
                    (_int4_step, [(core, q, k, v, c1, s1, st) for st in stores], reps),
                    (_bf16_step, [(q, k, v, c1, s1, *kv) for kv in bf16_caches], reps),
                ],
                device,
            )
            out = _int4_step(core, q, k, v, c1, s1, store)
            ref = Int4KVStore()
            ref.buffers, ref.length = tuple(t.clone() for t in store.buffers), past
            want = core.forward_reference(q, k, v, c1, s1, ref)
            err = (out.double() - want.double()).abs().max().item()
        rows.append(
            Row(
                "RopeAwareQuantAttention decode step (GQA 32/8, d128)",
                f"batch {batch}, context {context}: RoPE, FP8 q, INT4 cache write, decode",
                "bfloat16",
                backend_label(device, "int4_kv_decode"),
                t.median_s * 1e6,
                "bf16 step: RoPE, cache write, SDPA",
                t_ref.median_s * 1e6,
                float("nan"),
                float("nan"),
                err,
            )
        )
    return rows


PREFILL = {"cpu": [(512, 512), (1024, 1024)], "cuda": [(1024, 4096)]}  # (new tokens, context)
PREFILL_QUICK = {"cpu": [(256, 512)], "cuda": [(512, 2048)]}
# Speculative decoding's verification: a draft of a few tokens per row (batch, tokens, context):
# on CUDA the tile packs each GQA group's heads into its rows (4 x 4 = 16 of 64 here).
VERIFY = {"cpu": (4, 4, 1024), "cuda": (16, 4, 4096)}


def _prefill(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """``int4_kv_attention``: the last ``tokens`` of the cache attend causally over it (prefill),
    against bf16 causal SDPA over the same context held in bf16 (the GQA heads expanded). On CUDA
    also with FP8-quantized fp32 queries (``q_quantize``'s: the FireQ route), at head dim 256
    (Gemma 2 9B's GQA 16/8) and with keys of 192 and values of 128 (MiMo-V2-Flash's GQA 64/8) for
    the last shape; and a batch verifying a speculative draft of 4 tokens a row (``VERIFY``)."""
    rows: list[Row] = []
    gen = torch.Generator(device="cpu").manual_seed(1)
    sizes = (HQ, HKV, D, D, GROUP)  # heads, kv heads, keys' and values' head sizes, group
    cases = [(1, *c, False, sizes) for c in (PREFILL_QUICK if quick else PREFILL)[device.type]]
    if device.type == "cuda":
        cases.append((*cases[-1][:3], True, sizes))
        cases.append((*cases[-1][:3], False, (16, 8, 256, 256, GROUP)))
        cases.append((*cases[-1][:3], False, (64, 8, 192, 128, 64)))
    if not quick:
        cases.append((*VERIFY[device.type], False, sizes))
    for batch, tokens, context, fp8_queries, (hq, hkv, d, dv, group) in cases:
        kf = torch.randn(batch, hkv, context, d, generator=gen).to(device)
        vf = torch.randn(batch, hkv, context, dv, generator=gen).to(device)
        q = torch.randn(batch, hq, tokens, d, generator=gen).to(device, torch.bfloat16)
        qi = quantize_q_fp8(q.float()) if fp8_queries else q
        k, ks = quantize_kv_int4(kf, group)
        v, vs = quantize_kv_int4(vf, group)
        # (values of another size: the baseline's zero-padded to the keys' size, as the decode's;
        # torch's fused SDPA kernels take equal sizes)
        kb, vb = kf.bfloat16(), torch.nn.functional.pad(vf.bfloat16(), (0, d - dv))
        mask = torch.ones(tokens, context, dtype=torch.bool, device=device).tril(context - tokens)
        flops = 2 * batch * hq * (d + dv) * int(mask.sum())  # QK^T and PV on the visible pairs
        dims = f"d{d}" if dv == d else f"d{d}, dv{dv}"
        kind = "prefill" if batch == 1 else f"draft verification, batch {batch}"
        rows.append(
            _prefill_row(
                device,
                f"int4_kv_attention {kind}, FP8-quantized fp32 queries (GQA {hq}/{hkv}, {dims})"
                if fp8_queries
                else f"int4_kv_attention {kind} (GQA {hq}/{hkv}, {dims})",
                "float32" if fp8_queries else "bfloat16",
                (tokens, context, flops),
                (qi, k, ks, v, vs),
                lambda q, k, v, mask=mask: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, enable_gqa=True
                ),
                (q, kb, vb),
                "bf16 causal SDPA over a bf16 cache"
                if dv == d
                else "bf16 causal SDPA, values zero-padded to d",
                (qi.double(), k, ks, v, vs, context, d**-0.5),
                reps,
            )
        )
    return rows


def _latent_prefill(device: torch.device, quick: bool, reps: int) -> list[Row]:
    """Multi-head latent attention's prefill core over INT4 latent rows (DeepSeek-V2-Lite's 16
    heads; absorbed queries of 512 + 64 channels; the values the rows' first 512, read in place)
    against the same absorbed attention in PyTorch over a bf16 latent cache (scores, causal mask,
    softmax, P V), for the last prefill shape. CUDA only (on a CPU the latent's rows are the
    decode's)."""
    if device.type != "cuda":
        return []
    heads, rank, rope, group = 16, 512, 64, 64
    d = rank + rope
    tokens, context = (PREFILL_QUICK if quick else PREFILL)[device.type][-1]
    gen = torch.Generator(device="cpu").manual_seed(3)
    latent = torch.randn(1, 1, context, d, generator=gen).to(device)
    q = torch.randn(1, heads, tokens, d, generator=gen).to(device, torch.bfloat16)
    k, ks = quantize_kv_int4(latent, group)
    v, vs = k[..., : rank // 2], ks[..., : rank // group]  # views: the rows read in place
    cache = latent[:, 0].bfloat16()
    del latent
    mask = torch.ones(tokens, context, dtype=torch.bool, device=device).tril(context - tokens)
    scale = d**-0.5

    def absorbed(q, cache):
        s = torch.matmul(q, cache.transpose(1, 2)[:, None]).float() * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(q.dtype)
        return torch.matmul(p, cache[:, None, :, :rank])

    flops = 2 * heads * (d + rank) * int(mask.sum())  # QK^T and PV on the visible pairs
    return [
        _prefill_row(
            device,
            f"MLA prefill over the INT4 latent ({heads} heads, r{rank} + rope{rope})",
            "bfloat16",
            (tokens, context, flops),
            (q, k, ks, v, vs),
            absorbed,
            (q, cache),
            "bf16 absorbed in PyTorch over a bf16 latent cache",
            (q.double(), k, ks, v.contiguous(), vs.contiguous(), context, scale),
            reps,
        )
    ]


def _prefill_row(device, label, dtype, work, args, baseline, baseline_args, baseline_label,
                 reference_args, reps) -> Row:  # fmt: skip
    """One prefill row: ``int4_kv_attention(*args)`` timed interleaved with
    ``baseline(*baseline_args)``, its largest difference to the float64 reference over
    ``reference_args``, GFLOP/s from ``work = (tokens, context, flops)``."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention

    tokens, context, flops = work
    with torch.no_grad():
        t, t_ref = time_interleaved(
            [
                (int4_kv_attention, [args], max(3, reps // 4)),
                (baseline, [baseline_args], max(3, reps // 4)),
            ],
            device,
        )
        want, _ = _attention_reference(*reference_args)
        err = (int4_kv_attention(*args)[0].double() - want).abs().max().item()
    return Row(
        label,
        f"{tokens} new tokens, context {context} ({flops / t.median_s / 1e9:.0f} GFLOP/s)",
        dtype,
        backend_label(device, "int4_kv_decode"),
        t.median_s * 1e6,
        baseline_label,
        t_ref.median_s * 1e6,
        float("nan"),
        float("nan"),
        err,
    )
