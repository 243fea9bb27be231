# SPDX-License-Identifier: Apache-2.0
"""The paged INT4 KV decode (``int4_kv_decode_paged``): vLLM-style block tables over pages
``[num_pages, Hkv, page_size, .]`` of the FireQ INT4 cache, each batch row its own length. Every
row is checked against the contiguous decode's float64 reference over that row's tokens alone,
with the pages shuffled, the slots past a row's end and every unused page poisoned (random
bytes, NaN scales: a read of them shows), and the block table's unused entries out of range."""

import pytest
import torch

from _emu import launches_since
from _tolerances import opcheck_with_fp8_inputs, rand
from fastlayers import quant
from fastlayers.ops.kvint4 import _reference
from fastlayers.ops.kvint4_paged import _reference_op, int4_kv_decode_paged

NAN_FP8 = float("nan")


def _paged(caches, lens, page_size, spare_pages=3, generator_seed=0):
    """Contiguous caches ``[(x [B, H, T, w]), ...]`` (keys, key scales, values, value scales) as
    pages of ``page_size`` tokens in shuffled order: ``(pages list, block_table int32 [B,
    max_pages], seq_lens int32 [B])``. Unused slots and pages: random bytes, NaN scales; the block
    table's entries past each row's last page: -7 or a page index past the end."""
    b, hkv = caches[0].shape[:2]
    device = caches[0].device
    max_pages = max((n + page_size - 1) // page_size for n in lens) + 1
    used = sum((n + page_size - 1) // page_size for n in lens)
    num_pages = used + spare_pages
    g = torch.Generator().manual_seed(generator_seed)
    pages = []
    for x in caches:
        shape = (num_pages, hkv, page_size, x.shape[3])
        if x.dtype == torch.float8_e4m3fn:
            pages.append(torch.full(shape, NAN_FP8, device=device).to(x.dtype))
        else:
            pages.append(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device))
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.empty(b, max_pages, dtype=torch.int32)
    table[:, ::2], table[:, 1::2] = -7, num_pages + 3
    for row, n in enumerate(lens):
        for j in range((n + page_size - 1) // page_size):
            page, t0 = order.pop(), j * page_size
            table[row, j] = page
            t1 = min(n, t0 + page_size)
            for x, xp in zip(caches, pages, strict=True):
                xp[page, :, : t1 - t0] = x[row, :, t0:t1]
    return pages, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _cache(b, hkv, t, d, dv, group, device):
    keys = rand(b, hkv, t, d, dtype=torch.float32, device=device)
    values = rand(b, hkv, t, dv, dtype=torch.float32, device=device)
    return (*quant.quantize_kv_int4(keys, group), *quant.quantize_kv_int4(values, group))


def _cuda_path(t) -> bool:
    """Whether the ops take their CUDA path for ``t`` (a GPU, or the emulation's cuda_emu device;
    the CPU device of an emulation build launches no CUDA kernel)."""
    from fastlayers.ops import _common

    return _common.on_cuda(t.device)


TOLERANCE = {torch.float64: 2e-5, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _check_rows(q, out, lse, cache, lens, scale, softcap=0.0):
    """Each row of the paged call against the contiguous float64 reference over its own tokens;
    a row of no token: zeros and lse -inf."""
    tol = TOLERANCE[q.dtype]
    for row, n in enumerate(lens):
        if n == 0:
            assert bool((out[row] == 0).all()) and bool(torch.isneginf(lse[row]).all())
            continue
        one = [x[row : row + 1, :, :n] for x in cache]
        want, want_lse = _reference(q[row : row + 1].double(), *one, n, scale, softcap=softcap)
        torch.testing.assert_close(out[row : row + 1].double(), want.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(
            lse[row : row + 1].double(), want_lse.double(), rtol=2e-5, atol=2e-5
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d,dv,group,page_size,lens",
    [
        (8, 2, 128, 128, 32, 16, [300, 17, 0, 64]),  # tensor cores on CUDA; AVX-512 register tiles
        (6, 3, 40, 40, 8, 1, [23, 1, 9]),  # pages of one token; CUDA cores
        (4, 4, 64, 64, 64, 64, [64, 63, 129]),  # whole pages and one token over
        (16, 2, 96, 64, 16, 8, [41, 300]),  # values of their own head size (CUDA cores)
        (4, 1, 256, 256, 128, 32, [100, 33]),  # head_dim 256 (tensor cores: warp pairs)
    ],
)
def test_int4_kv_decode_paged_matches_each_rows_reference(device, dtype, hq, hkv, d, dv, group,
                                                          page_size, lens):  # fmt: skip
    torch.manual_seed(d + page_size + len(lens))
    b = len(lens)
    cache = _cache(b, hkv, max(lens), d, dv, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    q = rand(b, hq, d, dtype=dtype, device=device)
    before = launches_since(("decode_split_kernel", "decode_tc_kernel"))
    out, lse = int4_kv_decode_paged(q, *pages, table, seq_lens)
    launched = launches_since(("decode_split_kernel", "decode_tc_kernel"), before)
    assert out.dtype == dtype and out.shape == (b, hq, dv) and lse.shape == (b, hq)
    _check_rows(q, out, lse, cache, lens, d**-0.5)
    if launched is not None and _cuda_path(
        q
    ):  # (emulated: the paged CUDA decode, not the reference)
        assert sum(launched) == 1, launched
    # the reference (gather, then the contiguous reference) is the same specification
    ref, ref_lse = _reference_op(q.double(), *pages, table, seq_lens, d**-0.5)
    _check_rows(q.double(), ref, ref_lse, cache, lens, d**-0.5)


def test_int4_kv_decode_paged_softcap_sinks_and_splits(device):
    """Soft-capping, attention sinks (through the lse) and the CUDA decode's num_splits (1, 5, 64:
    splits past a row's end empty) give each row's reference; CPU ignores num_splits (same bits)."""
    from fastlayers.ops._common import apply_sinks, on_cuda

    hq, hkv, d, group, page_size, lens = 8, 2, 64, 16, 16, [200, 31, 77]
    cache = _cache(3, hkv, 200, d, d, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    q = rand(3, hq, d, dtype=torch.float32, device=device)
    out, lse = int4_kv_decode_paged(q, *pages, table, seq_lens, scale=0.3, softcap=2.0)
    _check_rows(q, out, lse, cache, lens, 0.3, softcap=2.0)
    sinks = rand(hq, dtype=torch.float32, device=device)
    got = int4_kv_decode_paged(q, *pages, table, seq_lens, sinks=sinks)
    plain = int4_kv_decode_paged(q, *pages, table, seq_lens)
    want = apply_sinks(*plain, sinks)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for splits in (1, 5, 64):
        out, lse = int4_kv_decode_paged(q, *pages, table, seq_lens, num_splits=splits)
        if on_cuda(q.device):
            _check_rows(q, out, lse, cache, lens, d**-0.5)
        else:
            assert torch.equal(out, plain[0]) and torch.equal(lse, plain[1])


@pytest.mark.parametrize("page_size", [16, 64])
def test_int4_kv_decode_paged_latent_values_in_the_key_rows(device, page_size):
    """Multi-head latent attention: the values are the key pages' first 512 channels, a view read
    in place (CUDA: the latent tensor-core decode)."""
    hq, hkv, d, dv, group, lens = 16, 1, 576, 512, 64, [150, 64]
    keys = quant.quantize_kv_int4(rand(2, hkv, 150, d, dtype=torch.float32, device=device), group)
    pages, table, seq_lens = _paged(list(keys), lens, page_size)
    kp, ksp = pages
    vp, vsp = kp[..., : dv // 2], ksp[..., : dv // group]
    q = rand(2, hq, d, dtype=torch.bfloat16, device=device)
    out, lse = int4_kv_decode_paged(q, kp, ksp, vp, vsp, table, seq_lens)
    cache = (*keys, keys[0][..., : dv // 2].contiguous(), keys[1][..., : dv // group].contiguous())
    _check_rows(q, out, lse, cache, lens, d**-0.5)


def test_int4_kv_decode_paged_every_cpu_isa(cpu_isa):
    """The CPU kernel's tiles stop at page ends (the AVX2 / AVX-512 register tiles take 32
    consecutive rows): pages of 4, 16 and 128 tokens at each ISA."""
    hq, hkv, d, group, lens = 8, 2, 64, 16, [130, 7, 45]
    cache = _cache(3, hkv, 130, d, d, group, "cpu")
    q = rand(3, hq, d, dtype=torch.bfloat16, device="cpu")
    for page_size in (4, 16, 128):
        pages, table, seq_lens = _paged(cache, lens, page_size)
        out, lse = int4_kv_decode_paged(q, *pages, table, seq_lens)
        _check_rows(q, out, lse, cache, lens, d**-0.5)


def test_int4_kv_decode_paged_bad_input_and_opcheck():
    hq, hkv, d, group, lens = 4, 2, 32, 16, [20, 5]
    cache = _cache(2, hkv, 20, d, d, group, "cpu")
    (kp, ksp, vp, vsp), table, seq_lens = _paged(cache, lens, 8)
    q = rand(2, hq, d, dtype=torch.float32, device="cpu")

    def call(**change):
        args = dict(q=q, k_pages=kp, k_scale_pages=ksp, v_pages=vp, v_scale_pages=vsp,
                    block_table=table, seq_lens=seq_lens)  # fmt: skip
        args.update(change)
        return int4_kv_decode_paged(*args.values())

    bad_table = table.clone()
    bad_table[1, 0] = kp.shape[0]  # a page the row uses, out of range
    cases = [
        (dict(k_pages=kp[:, :, :6]), "power of two"),
        (dict(block_table=table.long()), "block_table must be int32"),
        (dict(block_table=table[:1]), "block_table must be int32 \\[2, max_pages\\]"),
        (dict(seq_lens=seq_lens.long()), "seq_lens must be int32"),
        (
            dict(seq_lens=torch.tensor([33, 5], dtype=torch.int32)),
            "seq_lens must lie in \\[0, 32\\]",
        ),
        (dict(seq_lens=torch.tensor([-1, 5], dtype=torch.int32)), "seq_lens must lie in"),
        (dict(block_table=bad_table), "block_table's entries"),
        (dict(v_pages=vp[1:]), "v_pages must be uint8"),
        (dict(k_scale_pages=ksp.float()), "k_scale_pages must be float8_e4m3fn"),
        (dict(q=q[:, :3]), "multiple of kv heads"),
        (dict(q=q[0]), "q must be"),
        (dict(seq_lens=seq_lens.to("meta")), "seq_lens is on meta"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**change)
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        call(block_table=[[0, 1]])
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        int4_kv_decode_paged(q, kp, ksp, vp, vsp, table, seq_lens, num_splits=-1)
    # an unused block-table entry is any value; the op's schema, fake and dispatch
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_decode_paged.default,
                            (q, kp, ksp, vp, vsp, table, seq_lens, 0.2))  # fmt: skip


@pytest.mark.parametrize("page_size", [1, 8, 16, 64])
@pytest.mark.parametrize("hq", [8, 32])
def test_cpu_paged_equals_contiguous_bit_for_bit(cpu_isa, page_size, hq):
    """The CPU kernels walk a paged cache in the contiguous cache's blocks of keys (a block runs
    over page ends: its rows in segments), so the paged decode and prefill give the contiguous
    ones' bits, at every page size (pages of 1 to 64 tokens against blocks of 32) and ISA, with
    GQA groups in registers (8 heads per kv head) and in slices (32)."""
    from fastlayers.ops import int4_kv_attention, int4_kv_attention_paged, int4_kv_decode

    b, hkv, d, group, n = 3, 1, 64, 32, 203
    cache = _cache(b, hkv, n, d, d, group, "cpu")
    pages, table, seq_lens = _paged(cache, [n] * b, page_size)
    q = rand(b, hq, d, dtype=torch.bfloat16, device="cpu")
    got = int4_kv_decode_paged(q, *pages, table, seq_lens)
    want = int4_kv_decode(q, *cache, n)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    q = rand(b, hq, 37, d, dtype=torch.float32, device="cpu")
    got = int4_kv_attention_paged(q, *pages, table, seq_lens)
    want = int4_kv_attention(q, *cache, n)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_int4_kv_decode_paged_compiles():
    """torch.compile(fullgraph=True) traces the op (its fake) and gives the eager result."""
    hq, hkv, d, group, lens = 4, 2, 64, 32, [40, 9]
    cache = _cache(2, hkv, 40, d, d, group, "cpu")
    pages, table, seq_lens = _paged(cache, lens, 16)
    q = rand(2, hq, d, dtype=torch.float32, device="cpu")

    def step(q, table, seq_lens):
        return int4_kv_decode_paged(q, *pages, table, seq_lens)[0] * 2

    got = torch.compile(step, fullgraph=True)(q, table, seq_lens)
    torch.testing.assert_close(got, step(q, table, seq_lens), rtol=0, atol=0)


def test_int4_kv_attention_paged_varlen_compiles():
    """torch.compile(fullgraph=True) of the ragged prefill with max_seqlen_q given (no host read):
    the eager result."""
    from fastlayers.ops import int4_kv_attention_paged_varlen

    hq, hkv, d, group, lens = 4, 2, 64, 32, [40, 9]
    cache = _cache(2, hkv, 40, d, d, group, "cpu")
    pages, table, seq_lens = _paged(cache, lens, 16)
    q = rand(12, hq, d, dtype=torch.float32, device="cpu")
    cu = torch.tensor([0, 9, 12], dtype=torch.int32)

    def step(q, table, seq_lens, cu):
        return int4_kv_attention_paged_varlen(q, *pages, table, seq_lens, cu, 9)[0] * 2

    got = torch.compile(step, fullgraph=True)(q, table, seq_lens, cu)
    torch.testing.assert_close(got, step(q, table, seq_lens, cu), rtol=0, atol=0)


@pytest.mark.parametrize("split", [False, True])
def test_int4_kv_attention_paged_planned_compiles(monkeypatch, split):
    """torch.compile(fullgraph=True) of the planned attention (a step of a decode row beside a
    9-token row; with the CUDA route's split forced on CPU): the eager result."""
    from fastlayers.ops import int4_kv_attention_paged_planned, kvint4_paged

    monkeypatch.setattr(kvint4_paged, "split_decode_rows", lambda device: split)
    hq, hkv, d, group, lens = 4, 2, 64, 32, [40, 9]
    cache = _cache(2, hkv, 40, d, d, group, "cpu")
    pages, table, seq_lens = _paged(cache, lens, 16)
    step = quant.plan_paged_step(table, seq_lens, [0, 1, 10], 16, pages[0].shape[0])
    assert (step.split is not None) == split
    q = rand(10, hq, d, dtype=torch.float32, device="cpu")

    def run(q):
        return int4_kv_attention_paged_planned(q, *pages, step)[0] * 2

    got = torch.compile(run, fullgraph=True)(q)
    torch.testing.assert_close(got, run(q), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_write_paged_then_decode(device, dtype):
    """Three sequences filled token by token and in chunks, through a shuffled page pool (page
    size 8): the pages hold kv_quantize's bytes of each token (RoPE at its own position, post
    scale), and the paged decode over them is each row's reference over kv_quantize's cache."""
    from fastlayers.ops import kv_cache_write_paged, kv_quantize

    hq, hkv, d, group, page_size, lens = 4, 2, 64, 16, 8, [19, 1, 8]
    pool = 12
    k_pages = torch.zeros(pool, hkv, page_size, d // 2, dtype=torch.uint8, device=device)
    k_scales = torch.zeros(pool, hkv, page_size, d // group, dtype=torch.uint8, device=device)
    k_scales = k_scales.view(torch.float8_e4m3fn)
    v_pages, v_scales = k_pages.clone(), k_scales.clone()
    keys = rand(3, hkv, 19, d, dtype=dtype, device=device)
    values = rand(3, hkv, 19, d, dtype=dtype, device=device)
    angle = torch.arange(19, device=device)[:, None] * torch.rand(d // 2, device=device)[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # [19, d]
    post = 0.5 + rand(hkv, d, dtype=torch.float32, device=device).abs()
    order = torch.randperm(pool).tolist()
    table = torch.full((3, 3), -1, dtype=torch.int32)
    for row, n in enumerate(lens):
        for j in range((n + page_size - 1) // page_size):
            table[row, j] = order.pop()
    table = table.to(device)
    for t0, t1 in ((0, 5), (5, 6), (6, 7), (7, 19)):  # chunks of new tokens of every live row
        rows = [(row, t) for row, n in enumerate(lens) for t in range(t0, min(t1, n))]
        x_k = torch.stack([keys[row, :, t] for row, t in rows])
        x_v = torch.stack([values[row, :, t] for row, t in rows])
        pos = torch.tensor([t for _, t in rows], device=device)
        slots = torch.stack(
            [table[row, t // page_size] * page_size + t % page_size for row, t in rows]
        )
        kv_cache_write_paged(x_k, k_pages, k_scales, slots, post, cos[pos], sin[pos])
        kv_cache_write_paged(x_v, v_pages, v_scales, slots.int(), None)
    want_k = kv_quantize(keys, group, post, cos, sin)
    want_v = kv_quantize(values, group, None)
    for row, n in enumerate(lens):
        for t in range(n):
            page, slot = int(table[row, t // page_size]), t % page_size
            assert torch.equal(k_pages[page, :, slot], want_k[0][row, :, t])
            assert torch.equal(
                k_scales[page, :, slot].view(torch.uint8), want_k[1][row, :, t].view(torch.uint8)
            )
            assert torch.equal(v_pages[page, :, slot], want_v[0][row, :, t])
    q = rand(3, hq, d, dtype=dtype, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = int4_kv_decode_paged(q, k_pages, k_scales, v_pages, v_scales, table, seq_lens)
    _check_rows(q, out, lse, (*want_k, *want_v), lens, d**-0.5)
    with pytest.raises(ValueError, match="slots must lie in"):
        kv_cache_write_paged(x_v, v_pages, v_scales, slots + pool * page_size, None)
    with pytest.raises(ValueError, match="scale_pages must be float8_e4m3fn"):
        kv_cache_write_paged(x_v, v_pages, v_scales.view(torch.uint8), slots, None)
    with pytest.raises(ValueError, match="cos must be"):
        kv_cache_write_paged(x_k, k_pages, k_scales, slots, post, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "h", "d", "group", "page_size", "pairing"), [
    (13, 2, 64, 16, 8, "half"), (5, 3, 96, 32, 1, "interleaved"), (33, 1, 80, 80, 16, None),
    (1, 4, 128, 32, 64, "half"),
])  # fmt: skip
def test_kv_cache_write_paged_matches_reference(device, dtype, n, h, d, group, page_size,
                                                pairing):  # fmt: skip
    """The paged write's kernel == its reference (kv_quantize's reference, an indexed copy),
    bit for bit, with -1 slots among the tokens (not written) and shuffled slots over a pool of
    random bytes: every row no token names keeps its bytes; each written row holds kv_quantize's
    bytes of its token."""
    from fastlayers.ops import kv_quantize
    from fastlayers.ops.kvint4_paged import _write_reference, kv_cache_write_paged

    pool = (2 * n + page_size - 1) // page_size + 1
    x = rand(n, h, d, dtype=dtype, device=device, scale=3.0)
    x[0, 0, :group] = 0  # an all-zero group
    post = torch.rand(h, d, device=device) * 4 + 0.1
    cos = sin = None
    if pairing is not None:
        ang = torch.rand(n, d, device=device) * 6
        cos, sin = ang.cos(), ang.sin()
    slots = torch.randperm(pool * page_size)[:n].to(device)
    slots[1::3] = -1
    pages = [torch.randint(0, 256, (pool, h, page_size, w), dtype=torch.uint8, device=device)
             for w in (d // 2, d // group)]  # fmt: skip
    pages[1] = pages[1].view(torch.float8_e4m3fn)
    before = [t.view(torch.uint8).clone() for t in pages]
    refs = [t.clone() for t in pages]
    kv_cache_write_paged(x, *pages, slots, post, cos, sin, pairing or "half")
    _write_reference(x, *refs, slots, post, cos, sin, pairing or "half")
    tables = [None if t is None else t[:, None] for t in (cos, sin)]
    want = kv_quantize(x[:, :, None], group, post, *tables, pairing or "half")
    written = torch.zeros(pool * page_size, dtype=torch.bool)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            written[slot] = True
            for buf, w in zip(pages, want, strict=True):
                got = buf.view(torch.uint8)[slot // page_size, :, slot % page_size]
                assert torch.equal(got, w.view(torch.uint8)[i, :, 0])
    keep = (~written).reshape(pool, 1, page_size, 1).to(device)
    for buf, ref, old in zip(pages, refs, before, strict=True):
        assert torch.equal(buf.view(torch.uint8), ref.view(torch.uint8))
        untouched = buf.view(torch.uint8) == old
        assert bool(untouched[keep.expand_as(untouched)].all())


def test_kv_cache_write_paged_bad_slots_strided_pages_and_opcheck():
    """Slots out of range, other negatives than -1 and a slot given twice are ValueErrors; pages
    that are not contiguous take the reference (warned once) and get the same bytes; opcheck."""
    from fastlayers import _ext
    from fastlayers.ops.kvint4_paged import kv_cache_write_paged

    x = rand(4, 2, 32, dtype=torch.bfloat16, device="cpu")
    packed = torch.zeros(5, 2, 8, 16, dtype=torch.uint8)
    scales = torch.zeros(5, 2, 8, 2, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for slots, match in (([0, 1, 2, 40], "slots must lie in \\[0, 39\\]"),
                         ([0, -2, 2, 3], "slots must lie in"),
                         ([7, -1, 7, 3], "slots must be distinct")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            kv_cache_write_paged(x, packed, scales, torch.tensor(slots))
    kv_cache_write_paged(x, packed, scales, torch.tensor([-1, 3, -1, 39]))  # (-1 twice: fine)
    # more than 1024 slots: checked on the device (sorted) instead of as a list
    xl = rand(1500, 2, 32, dtype=torch.bfloat16, device="cpu")
    pl = torch.zeros(400, 2, 8, 16, dtype=torch.uint8)
    sl = torch.zeros(400, 2, 8, 2, dtype=torch.uint8).view(torch.float8_e4m3fn)
    big = torch.randperm(3200)[:1500]
    big[::7] = -1
    kv_cache_write_paged(xl, pl, sl, big)
    for i, v, match in ((5, 3200, "slots must lie in"), (5, -3, "slots must lie in"),
                        (1, int(big[2]), "slots must be distinct")):  # fmt: skip
        bad = big.clone()
        bad[i] = v
        with pytest.raises(ValueError, match=match):
            kv_cache_write_paged(xl, pl, sl, bad)
    slots = torch.tensor([3, -1, 12, 39])
    pool = torch.randint(0, 256, (5, 2, 2, 8, 16), dtype=torch.uint8)  # [pages, K/V, ...]
    scale_pool = torch.randint(0, 256, (5, 2, 2, 8, 2), dtype=torch.uint8)
    strided = (pool[:, 0], scale_pool[:, 0].view(torch.float8_e4m3fn))
    dense = [t.clone() for t in strided]
    _ext._warned.discard("kv_cache_write_paged-strided")
    with pytest.warns(RuntimeWarning, match="kernel writes contiguous pages"):
        kv_cache_write_paged(x, *strided, slots)
    kv_cache_write_paged(x, *dense, slots)
    for a, b in zip(strided, dense, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    torch.library.opcheck(  # (not test_schema: it compares float8 pages with arithmetic)
        torch.ops.fastlayers.kv_cache_write_paged, (x, packed, scales, slots, None),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )  # fmt: skip


class _History:
    """Each sequence's keys and values as written (fp32, [kv_heads, tokens, d]) per layer: what
    the contiguous reference decodes over."""

    def __init__(self, layers):
        self.k = [dict() for _ in range(layers)]
        self.v = [dict() for _ in range(layers)]

    def add(self, layer, seq, k, v):
        for store, x in ((self.k[layer], k), (self.v[layer], v)):
            store[seq] = torch.cat([store.get(seq, x[:, :0]), x], 1)

    def fork(self, parent, child):
        for store in (*self.k, *self.v):
            store[child] = store[parent].clone()

    def truncate(self, seq, length):
        for store in (*self.k, *self.v):
            store[seq] = store[seq][:, :length]


def _check_cache_decode(cache, history, seqs, group, device, hq=4):
    """Every layer's paged decode of ``seqs`` against the float64 reference over each sequence's
    own history (quantized as the cache quantizes it)."""
    table, seq_lens = cache.block_table(seqs)
    for layer in range(len(cache.pages)):
        q = rand(len(seqs), hq, cache.head_dim, dtype=torch.float32, device=device)
        out, lse = cache.decode(layer, q, table, seq_lens)
        for row, seq in enumerate(seqs):
            k, v = history.k[layer][seq], history.v[layer][seq]
            assert k.shape[1] == cache.length(seq) == int(seq_lens[row])
            kq, ks = quant.quantize_kv_int4(k[None], group)
            vq, vs = quant.quantize_kv_int4(v[None], group)
            want, want_lse = _reference(q[row : row + 1].double(), kq, ks, vq, vs, k.shape[1],
                                        cache.head_dim**-0.5)  # fmt: skip
            torch.testing.assert_close(out[row : row + 1].double(), want.double(), rtol=2e-5,
                                       atol=2e-5)  # fmt: skip
            torch.testing.assert_close(lse[row : row + 1], want_lse, rtol=2e-5, atol=2e-5)


def _check_cache_attention(cache, history, seqs, tq, group, device, hq=4):
    """Every layer's paged prefill of the last ``tq`` tokens of ``seqs`` against the causal
    float64 reference over each sequence's own history."""
    from fastlayers.ops.kvint4 import _attention_reference

    table, seq_lens = cache.block_table(seqs)
    for layer in range(len(cache.pages)):
        q = rand(len(seqs), hq, tq, cache.head_dim, dtype=torch.float32, device=device)
        out, lse = cache.attention(layer, q, table, seq_lens)
        for row, seq in enumerate(seqs):
            k, v = history.k[layer][seq], history.v[layer][seq]
            kq, ks = quant.quantize_kv_int4(k[None], group)
            vq, vs = quant.quantize_kv_int4(v[None], group)
            want, want_lse = _attention_reference(q[row : row + 1].double(), kq, ks, vq, vs,
                                                  k.shape[1], cache.head_dim**-0.5)  # fmt: skip
            torch.testing.assert_close(out[row : row + 1].double(), want.double(), rtol=2e-5,
                                       atol=2e-5)  # fmt: skip
            torch.testing.assert_close(lse[row : row + 1], want_lse, rtol=2e-5, atol=2e-5)


def _check_cache_varlen(cache, history, seqs, counts, group, device, hq=4):
    """Every layer's ragged prefill of the last ``counts[i]`` tokens of each of ``seqs`` (one call)
    against the causal float64 reference over each sequence's own history."""
    table, seq_lens = cache.block_table(seqs)
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    starts = torch.tensor(cu, dtype=torch.int32, device=device)
    for layer in range(len(cache.pages)):
        q = rand(cu[-1], hq, cache.head_dim, dtype=torch.float32, device=device)
        out, lse = cache.attention_varlen(layer, q, table, seq_lens, starts, max(counts))
        _check_ragged_rows(q, out, lse, cache, history, layer, seqs, counts, group)


def _check_ragged_rows(q, out, lse, cache, history, layer, seqs, counts, group, tol=2e-5):
    """Ragged outputs ``out [N, Hq, dv]`` / ``lse [N, Hq]`` of queries ``q`` (each of ``seqs``'
    last ``counts[i]`` tokens in turn) against the causal float64 reference over each sequence's
    own history of layer ``layer``."""
    from fastlayers.ops.kvint4 import _attention_reference

    at = 0
    for seq, n in zip(seqs, counts, strict=True):
        k, v = history.k[layer][seq], history.v[layer][seq]
        kq, ks = quant.quantize_kv_int4(k[None], group)
        vq, vs = quant.quantize_kv_int4(v[None], group)
        mine = q[at : at + n].transpose(0, 1)[None].double()
        want, want_lse = _attention_reference(mine, kq, ks, vq, vs, k.shape[1],
                                              cache.head_dim**-0.5)  # fmt: skip
        got = out[at : at + n].transpose(0, 1)[None].double()
        torch.testing.assert_close(got, want.double(), rtol=tol, atol=tol)
        got_lse = lse[at : at + n].transpose(0, 1)[None]
        torch.testing.assert_close(got_lse, want_lse, rtol=tol, atol=tol)
        at += n
    assert at == q.shape[0]


def _step(cache, history, seqs, tokens, device):
    """``tokens`` new tokens (a count, or one per sequence) of random keys and values for every
    layer of ``seqs``, through reserve and write."""
    counts = [tokens] * len(seqs) if isinstance(tokens, int) else tokens
    slots = cache.reserve(seqs, tokens)
    n = sum(counts)
    for layer in range(len(cache.pages)):
        k = rand(n, cache.kv_heads, cache.head_dim, dtype=torch.float32, device=device)
        v = rand(n, cache.kv_heads, cache.value_dim, dtype=torch.float32, device=device)
        cache.write(layer, k, v, slots)
        at = 0
        for seq, c in zip(seqs, counts, strict=True):
            history.add(layer, seq, k[at : at + c].transpose(0, 1), v[at : at + c].transpose(0, 1))
            at += c


def test_paged_cache_continuous_batching(device):
    """Sequences join with prompts of their own lengths, decode together, one leaves mid-way and
    a new one reuses its pages; two layers; every step's decode against each sequence's own
    reference. At the end the pool is whole again."""
    group = 16
    cache = quant.Int4PagedKVCache(2, num_pages=24, page_size=8, kv_heads=2, head_dim=32,
                                   group_size=group, device=device)  # fmt: skip
    history = _History(2)
    a, b = cache.new_sequence(), cache.new_sequence()
    _step(cache, history, [a, b], [13, 3], device)  # prompts
    _check_cache_attention(cache, history, [a, b], 3, group, device)  # their last 3 tokens
    for _ in range(6):
        _step(cache, history, [a, b], 1, device)
    _check_cache_decode(cache, history, [a, b], group, device)
    cache.free(a)
    c = cache.new_sequence()
    _step(cache, history, [b, c], [1, 17], device)  # c's prompt beside b's decode: one call
    _check_cache_varlen(cache, history, [b, c], [1, 17], group, device)
    for _ in range(8):  # (b crosses a page end)
        _step(cache, history, [b, c], 1, device)
    _check_cache_decode(cache, history, [c, b], group, device)
    assert cache.length(b) == 18 and cache.length(c) == 25
    used = -(-18 // 8) + -(-25 // 8)
    assert cache.free_pages == cache.num_pages - used
    cache.free(b)
    cache.free(c)
    assert cache.free_pages == cache.num_pages and cache.sequences() == []


def test_paged_cache_plan_reads_nothing_back(monkeypatch, device):
    """A planned step (cache.plan: reserve + metadata in one copy) writes and attends with no
    device-to-host read in the layers' calls (Tensor.tolist / item / bool / int patched to count;
    the unplanned calls make three, one each), and the same bytes and outputs as the calls on
    tensors of the caller's: a prompt chunk beside decode tokens, then a decode-only step (the
    decode kernels)."""
    group, d = 16, 32
    planned, checked = (quant.Int4PagedKVCache(1, num_pages=16, page_size=8, kv_heads=2,
                                               head_dim=d, group_size=group, device=device)
                        for _ in range(2))  # fmt: skip
    seqs = [[c.new_sequence() for _ in range(3)] for c in (planned, checked)]
    reads = []
    for counts in ([11, 1, 4], [1, 1, 1]):
        n = sum(counts)
        q = rand(n, 4, d, dtype=torch.float32, device=device)
        k, v = (rand(n, 2, d, dtype=torch.float32, device=device) for _ in range(2))
        step = planned.plan(seqs[0], counts)
        slots = checked.reserve(seqs[1], counts)
        table, seq_lens = checked.block_table(seqs[1])
        count = [0]
        for name in ("tolist", "item", "__bool__", "__int__"):
            method = getattr(torch.Tensor, name)

            def counted(self, *args, _method=method, _count=count, **kwargs):
                _count[0] += 1
                return _method(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        planned.write(0, k, v, step)
        out, lse = planned.attention_step(0, q, step)
        reads.append(count[0])
        checked.write(0, k, v, slots)
        want = checked.attention_varlen(0, q, table, seq_lens, step.cu_seqlens_q,
                                        step.max_seqlen_q)  # fmt: skip
        reads.append(count[0] - reads[-1])
        monkeypatch.undo()
        for x, y in zip(planned.pages[0], checked.pages[0], strict=True):
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        if step.split is None:
            assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
        else:  # (CUDA: the decode row through the decode kernel, its own summation order)
            torch.testing.assert_close(out, want[0], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(lse, want[1], rtol=2e-5, atol=2e-5)
    assert reads == [0, 3, 0, 3]  # (unplanned: one read per call, the two writes and the attention)
    with pytest.raises(ValueError, match="q must be \\[3 \\(the step's new tokens\\)"):
        planned.attention_step(0, q[:2], step)  # (its kernels would read past q)
    with pytest.raises(ValueError, match="must be"):
        planned.write(0, k[:2], v[:2], step)


@pytest.mark.parametrize("counts", [[1, 1, 11, 4], [11, 4, 1, 1], [1, 11, 0, 1, 4]])
def test_paged_cache_plan_splits_decode_rows(monkeypatch, device, counts):
    """A planned step of one-token rows beside longer ones runs its decode rows through the
    split-KV decode kernel and the rest through the ragged prefill (on CUDA; forced here on CPU):
    decode rows first or last as views, else gathered, the outputs back in the step's order. Each
    row against the causal float64 reference, with sinks, and on CPU bit for bit the one call's
    outputs (its kernels run a one-token row alike). On CPU a plan carries no split."""
    from fastlayers.ops import kvint4_paged
    from fastlayers.ops._common import apply_sinks

    group, d, hq = 16, 32, 4
    cache = quant.Int4PagedKVCache(1, num_pages=32, page_size=8, kv_heads=2, head_dim=d,
                                   group_size=group, device=device)  # fmt: skip
    history = _History(1)
    seqs = [cache.new_sequence() for _ in counts]
    _step(cache, history, seqs, [5 + 4 * i for i in range(len(counts))], device)  # prompts
    on_cpu = not kvint4_paged.split_decode_rows(torch.device(device))  # (cuda_emu: CUDA's route)
    if on_cpu:
        assert cache.plan(seqs, counts).split is None
        for seq, n in zip(seqs, counts, strict=True):
            cache.truncate(seq, cache.length(seq) - n)
        monkeypatch.setattr(kvint4_paged, "split_decode_rows", lambda device: True)
    step = cache.plan(seqs, counts)
    assert step.split is not None
    views = counts[:2] == [1, 1] or counts[-2:] == [1, 1]
    assert isinstance(step.split.decode_tokens, slice) == views
    n = sum(counts)
    k, v = (rand(n, 2, d, dtype=torch.float32, device=device) for _ in range(2))
    cache.write(0, k, v, step)
    at = 0
    for seq, c in zip(seqs, counts, strict=True):
        history.add(0, seq, k[at : at + c].transpose(0, 1), v[at : at + c].transpose(0, 1))
        at += c
    q = rand(n, hq, d, dtype=torch.float32, device=device)
    decodes = ("decode_split_kernel", "decode_tc_kernel")
    before = launches_since(decodes)
    out, lse = cache.attention_step(0, q, step)
    launched = launches_since(decodes, before)
    if launched is not None and not on_cpu:  # (emulated: the decode rows' one decode launch)
        assert sum(launched) == 1, launched
    _check_ragged_rows(q, out, lse, cache, history, 0, seqs, counts, group)
    sinks = rand(hq, dtype=torch.float32, device=device)
    got = cache.attention_step(0, q, step, sinks=sinks)
    for x, y in zip(got, apply_sinks(out, lse, sinks), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    if on_cpu:
        one = cache.attention_varlen(0, q, step.block_table, step.seq_lens, step.cu_seqlens_q,
                                     step.max_seqlen_q)  # fmt: skip
        assert torch.equal(out, one[0]) and torch.equal(lse, one[1])


def test_plan_paged_step_over_a_callers_block_table(device):
    """quant.plan_paged_step: FlashInfer's plan over a block manager of the caller's (here the
    cache's reserve and block_table, as tensors): the cache's slots, and the planned write and
    attention ops over the raw pages equal the checked ops (bit for bit without a split, to
    fp32 tolerance with one). Bad metadata raises at the plan, once; a step on a pool other than
    its own raises at the run."""
    from fastlayers import ops

    group, d = 16, 32
    cache = quant.Int4PagedKVCache(1, num_pages=24, page_size=8, kv_heads=2, head_dim=d,
                                   group_size=group, device=device)  # fmt: skip
    history = _History(1)
    seqs = [cache.new_sequence() for _ in range(3)]
    _step(cache, history, seqs, [9, 3, 17], device)
    counts = [5, 1, 1]
    slots = cache.reserve(seqs, counts)
    table, lens = cache.block_table(seqs)
    cu = torch.tensor([0, 5, 6, 7], dtype=torch.int32)
    step = quant.plan_paged_step(table.cpu(), lens.cpu(), cu, 8, 24, device=device)
    assert step.counts == tuple(counts) and torch.equal(step.slots, slots)
    assert step.block_table.device.type == torch.device(device).type
    pages = cache.pages[0]
    k, v = (rand(7, 2, d, dtype=torch.float32, device=device) for _ in range(2))
    q = rand(7, 4, d, dtype=torch.float32, device=device)
    ops.kv_cache_write_paged_planned(k, pages[0], pages[1], step)
    ops.kv_cache_write_paged_planned(v, pages[2], pages[3], step)
    got = ops.int4_kv_attention_paged_planned(q, *pages, step)
    before = [t.clone() for t in pages]
    cache.write(0, k, v, slots)  # (the checked write: the same bytes)
    for x, y in zip(before, pages, strict=True):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    want = ops.int4_kv_attention_paged_varlen(q, *pages, table, lens, cu.to(device), 5)
    for x, y in zip(got, want, strict=True):
        if step.split is None:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)
    # (lists work as well; the plan is the one place that checks)
    again = quant.plan_paged_step(table.tolist(), lens.tolist(), [0, 5, 6, 7], 8, 24, device)
    assert torch.equal(again.slots, step.slots)
    rows, n_lens = table.tolist(), lens.tolist()
    bad = [
        (dict(block_table=[[99] + rows[0][1:]] + rows[1:]), "pages must lie in \\[0, 23\\]"),
        (dict(seq_lens=[n_lens[0] + 8 * len(rows[0])] + n_lens[1:]), "seq_lens .* must lie in"),
        (dict(cu_seqlens_q=[0, 5, 4, 7]), "must start at 0 and not decrease"),
        (dict(cu_seqlens_q=[0, 5, 6]), "cu_seqlens_q 4 starts"),
        (dict(block_table=[rows[0], rows[0], rows[2]],
              seq_lens=[n_lens[0]] * 2 + n_lens[2:]), "share a slot"),
        (dict(page_size=6), "power of two"),
        (dict(seq_lens=torch.tensor(n_lens, device="meta")), "meta tensor"),
    ]  # fmt: skip
    for change, match in bad:
        args = dict(block_table=rows, seq_lens=n_lens, cu_seqlens_q=[0, 5, 6, 7], page_size=8,
                    num_pages=24)  # fmt: skip
        args.update(change)
        with pytest.raises(ValueError, match=match):
            quant.plan_paged_step(**args)
    with pytest.raises(TypeError, match="block_table must be a 2-d integer"):
        quant.plan_paged_step(table.float(), lens, cu, 8, 24)
    small = [t[:20] for t in pages]  # (a pool of fewer pages than the plan's)
    with pytest.raises(ValueError, match="at least 24 pages of 8 tokens"):
        ops.int4_kv_attention_paged_planned(q, *small, step)
    with pytest.raises(ValueError, match="at least 24 pages of 8 tokens"):
        ops.kv_cache_write_paged_planned(k, small[0], small[1], step)
    with pytest.raises(TypeError, match="step must be a PagedStep"):
        ops.int4_kv_attention_paged_planned(q, *pages, (table, lens))


def test_paged_cache_fork_copies_on_write_and_truncate_frees(device):
    """A fork shares its parent's pages; the first write of either into the shared last page
    copies it (the other's tokens unchanged); truncation (speculative rollback) gives whole pages
    back; running out of pages raises with nothing changed."""
    group = 16
    cache = quant.Int4PagedKVCache(1, num_pages=8, page_size=4, kv_heads=1, head_dim=32,
                                   group_size=group, device=device)  # fmt: skip
    history = _History(1)
    parent = cache.new_sequence()
    _step(cache, history, [parent], 6, device)  # pages: one full, one half
    child = cache.fork(parent)
    history.fork(parent, child)
    assert cache.free_pages == 6  # (nothing copied yet)
    _step(cache, history, [parent, child], 1, device)  # both write into the shared half page
    assert cache.free_pages == 5  # one copy
    _step(cache, history, [child], 3, device)
    _check_cache_decode(cache, history, [parent, child], group, device)
    cache.truncate(child, 2)  # into the shared full page
    history.truncate(child, 2)
    assert cache.free_pages == 7 - 1  # the child's own pages back; the shared one kept
    _step(cache, history, [child], 1, device)  # copy on write of the shared first page
    _check_cache_decode(cache, history, [parent, child], group, device)
    free = cache.free_pages
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.reserve([parent, child], 40)
    assert cache.free_pages == free and cache.length(parent) == 7
    with pytest.raises(ValueError, match="unknown sequence 9"):
        cache.reserve([9])
    with pytest.raises(ValueError, match="must not repeat"):
        cache.reserve([parent, parent])
    with pytest.raises(ValueError, match="length must be in"):
        cache.truncate(parent, 8)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        quant.Int4PagedKVCache(1, 8, 6, 1, 32, 16)
    with pytest.raises(ValueError, match="layer must be in"):
        cache.write(1, *([rand(1, 1, 32, dtype=torch.float32, device=device)] * 2),
                    cache.reserve([parent]))  # fmt: skip


def test_paged_cache_plans_copies_exactly():
    """Two forks writing into one shared half page take one copy (the last writer keeps the
    page): a pool with exactly that many free pages is enough."""
    cache = quant.Int4PagedKVCache(1, num_pages=2, page_size=4, kv_heads=1, head_dim=32,
                                   group_size=32)  # fmt: skip
    history = _History(1)
    a = cache.new_sequence()
    _step(cache, history, [a], 2, "cpu")
    b = cache.fork(a)
    history.fork(a, b)
    _step(cache, history, [a, b], 1, "cpu")
    assert cache.free_pages == 0
    _check_cache_decode(cache, history, [a, b], 32, "cpu")


def _check_prefill_rows(q, out, lse, cache, lens, scale, softcap=0.0):
    """Each row of a paged prefill (its last Tq tokens' queries) against the contiguous causal
    float64 reference over that row's own tokens."""
    from fastlayers.ops.kvint4 import _attention_reference

    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[q.dtype]
    for row, n in enumerate(lens):
        one = [x[row : row + 1, :, :n] for x in cache]
        want, want_lse = _attention_reference(q[row : row + 1].double(), *one, n, scale, softcap)
        torch.testing.assert_close(out[row : row + 1].double(), want.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse[row : row + 1].double(), want_lse.double(), rtol=2e-5,
                                   atol=2e-5)  # fmt: skip


# (tensor-core tile counted under cuda::tc::launch's expression, "kernel")
PREFILL_KERNELS = ("kernel", "prefill_kernel", "prefill_latent_tc_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d,dv,group,page_size,tq,lens,launched",
    [
        (8, 2, 128, 128, 32, 16, 9, [300, 9, 64], [1, 0, 0]),  # tensor-core tile
        (4, 2, 64, 64, 16, 32, 70, [70, 200], [1, 0, 0]),  # two query tiles
        (6, 3, 40, 40, 8, 4, 5, [23, 5, 9], [0, 1, 0]),  # a warp per query row
        (16, 2, 96, 64, 16, 8, 3, [41, 3], [0, 1, 0]),  # values of their own size
    ],
)
def test_int4_kv_attention_paged_matches_each_rows_reference(
    device, dtype, hq, hkv, d, dv, group, page_size, tq, lens, launched
):
    """Tq new tokens per row (a prompt chunk, a speculative draft) over its paged cache: query i of
    row b is its token seq_lens[b] - Tq + i; shuffled and poisoned pages; also soft-capped. In the
    emulation, the kernel that ran is checked."""
    from fastlayers.ops import int4_kv_attention_paged
    from fastlayers.ops.kvint4_paged import _attention_reference_op

    torch.manual_seed(d + tq)
    b = len(lens)
    cache = _cache(b, hkv, max(lens), d, dv, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    q = rand(b, hq, tq, d, dtype=dtype, device=device)
    before = launches_since(PREFILL_KERNELS)
    for cap in (0.0, 1.5):
        out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens, softcap=cap)
        assert out.dtype == dtype and out.shape == (b, hq, tq, dv) and lse.shape == (b, hq, tq)
        _check_prefill_rows(q, out, lse, cache, lens, d**-0.5, cap)
    if before is not None and _cuda_path(q):
        assert launches_since(PREFILL_KERNELS, before) == [2 * n for n in launched]
    ref, ref_lse = _attention_reference_op(q.double(), *pages, table, seq_lens, d**-0.5)
    _check_prefill_rows(q.double().float(), ref.float(), ref_lse, cache, lens, d**-0.5)


def _check_counted_rows(q, out, lse, cache, lens, q_lens, scale, softcap=0.0):
    """Each row's first q_lens[b] queries against the contiguous causal float64 reference over the
    row's own tokens (query i: token lens[b] - q_lens[b] + i); its padding queries: zeros, lse
    -inf."""
    from fastlayers.ops.kvint4 import _attention_reference

    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[q.dtype]
    for row, (n, m) in enumerate(zip(lens, q_lens, strict=True)):
        assert bool((out[row, :, m:] == 0).all()) and bool(torch.isneginf(lse[row, :, m:]).all())
        if m == 0:
            continue
        one = [x[row : row + 1, :, :n] for x in cache]
        qm = q[row : row + 1, :, :m].double()
        want, want_lse = _attention_reference(qm, *one, n, scale, softcap)
        got = out[row : row + 1, :, :m].double()
        torch.testing.assert_close(got, want.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse[row : row + 1, :, :m].double(), want_lse.double(),
                                   rtol=2e-5, atol=2e-5)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d,dv,group,page_size,tq,lens,q_lens,launched",
    [
        # tensor-core tile, two query tiles: a row of one tile, a decode row, an empty row
        (4, 2, 128, 128, 32, 16, 70, [300, 9, 64, 80], [70, 1, 0, 65], [1, 0, 0]),
        (6, 3, 40, 40, 8, 4, 5, [23, 3, 9], [2, 3, 5], [0, 1, 0]),  # a warp per query row
        (16, 2, 96, 64, 16, 8, 3, [41, 3], [1, 0], [0, 1, 0]),  # values of their own size
    ],
)
def test_int4_kv_attention_paged_query_counts(
    device, dtype, hq, hkv, d, dv, group, page_size, tq, lens, q_lens, launched
):
    """Rows of different numbers of new tokens in one call (chunked prefill beside decode rows):
    row b's first q_lens[b] queries are its last tokens, the rest of its Tq padding (NaN queries
    here: a padding query that leaked into a sum would show) with zeros and lse -inf; a row's
    seq_len may be below Tq. Kernel and reference; the kernel that ran checked in the emulation."""
    from fastlayers.ops import int4_kv_attention_paged
    from fastlayers.ops.kvint4_paged import _attention_reference_op

    torch.manual_seed(d + tq)
    b = len(lens)
    cache = _cache(b, hkv, max(lens), d, dv, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    q = rand(b, hq, tq, d, dtype=dtype, device=device)
    for row, m in enumerate(q_lens):
        q[row, :, m:] = float("nan")
    counts = torch.tensor(q_lens, dtype=torch.int32, device=device)
    before = launches_since(PREFILL_KERNELS)
    for cap in (0.0, 1.5):
        out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens, softcap=cap, q_lens=counts)
        assert out.dtype == dtype and out.shape == (b, hq, tq, dv) and lse.shape == (b, hq, tq)
        _check_counted_rows(q, out, lse, cache, lens, q_lens, d**-0.5, cap)
    if before is not None and _cuda_path(q):
        assert launches_since(PREFILL_KERNELS, before) == [2 * n for n in launched]
    ref, ref_lse = _attention_reference_op(q.double(), *pages, table, seq_lens, d**-0.5, 0.0,
                                           counts)  # fmt: skip
    _check_counted_rows(q.double().float(), ref.float(), ref_lse, cache, lens, q_lens, d**-0.5)


def test_int4_kv_attention_paged_query_counts_latent_one_token_and_bad_input(device):
    """q_lens on the latent tensor-core prefill (values in place), with Tq = 1 (the decode
    kernels: a row of no query gets zeros, lse -inf), and its bad values."""
    from fastlayers.ops import int4_kv_attention_paged

    hq, hkv, d, dv, group, lens, tq = 16, 1, 576, 512, 64, [100, 40, 7], 33
    keys = quant.quantize_kv_int4(rand(3, hkv, 100, d, dtype=torch.float32, device=device), group)
    pages, table, seq_lens = _paged(list(keys), lens, 16)
    kp, ksp = pages
    vp, vsp = kp[..., : dv // 2], ksp[..., : dv // group]
    cache = (*keys, keys[0][..., : dv // 2].contiguous(), keys[1][..., : dv // group].contiguous())
    q = rand(3, hq, tq, d, dtype=torch.bfloat16, device=device)
    q_lens = [33, 5, 0]
    counts = torch.tensor(q_lens, dtype=torch.int32, device=device)
    before = launches_since(PREFILL_KERNELS)
    out, lse = int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens, q_lens=counts)
    if before is not None and _cuda_path(q):
        assert launches_since(PREFILL_KERNELS, before) == [0, 0, 1]
    _check_counted_rows(q, out, lse, cache, lens, q_lens, d**-0.5)
    ones = torch.tensor([1, 0, 1], dtype=torch.int32, device=device)
    one, one_lse = int4_kv_attention_paged(q[:, :, :1], kp, ksp, vp, vsp, table, seq_lens,
                                           q_lens=ones)  # fmt: skip
    _check_counted_rows(q[:, :, :1], one, one_lse, cache, lens, [1, 0, 1], d**-0.5)
    for bad, match in (
        (counts.long(), "q_lens must be int32"),
        (counts[:2], "q_lens must be int32"),
        (counts + 1, "q_lens must lie in \\[0, 33\\]"),
        (torch.tensor([33, 41, 0], dtype=torch.int32, device=device), "must lie in"),
        (torch.tensor([33, 5, 8], dtype=torch.int32, device=device), "must not exceed seq_lens"),
    ):
        with pytest.raises(ValueError, match=match):
            int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens, q_lens=bad)
    with pytest.raises(TypeError, match="q_lens must be a torch.Tensor"):
        int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens, q_lens=[33, 5, 0])


@pytest.mark.parametrize("page_size", [1, 4])
def test_int4_kv_attention_paged_padding_past_the_block_table(device, page_size):
    """Queries padded to a bucket (Tq = 16) past what the block table holds (two pages): with
    q_lens they are padding in every row (a row's count is at most its length), so the call runs
    (kernels and reference alike): each row's counted queries against its reference, the rest
    zeros with lse -inf. A table of no page: every row empty, all padding. Without q_lens the
    error names the table."""
    from fastlayers.ops import int4_kv_attention_paged
    from fastlayers.ops.kvint4_paged import _attention_reference_op

    hq, hkv, d, group, tq = 4, 2, 32, 16, 16
    lens = [2 * page_size, 1, 0]
    cache = _cache(3, hkv, 2 * page_size, d, d, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    table = table[:, :2]  # (at most two pages a row)
    q = rand(3, hq, tq, d, dtype=torch.float32, device=device)
    q_lens = [2 * page_size - 1, 1, 0]
    counts = torch.tensor(q_lens, dtype=torch.int32, device=device)
    out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens, q_lens=counts)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    _check_counted_rows(q, out, lse, cache, lens, q_lens, d**-0.5)
    ref, ref_lse = _attention_reference_op(q.double(), *pages, table, seq_lens, d**-0.5, 0.0,
                                           counts)  # fmt: skip
    _check_counted_rows(q, ref.float(), ref_lse, cache, lens, q_lens, d**-0.5)
    compiled = torch.compile(int4_kv_attention_paged, fullgraph=True)
    got = compiled(q, *pages, table, seq_lens, q_lens=counts)
    torch.testing.assert_close(got, (out, lse), rtol=1e-6, atol=1e-6)
    none, zero = table[:, :0], torch.zeros(3, dtype=torch.int32, device=device)
    out, lse = int4_kv_attention_paged(q, *pages, none, zero, q_lens=zero)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    with pytest.raises(ValueError, match="q has 16 tokens but block_table holds at most"):
        int4_kv_attention_paged(q, *pages, table, seq_lens)


@pytest.mark.parametrize("values", ["key rows", "own pages"])
def test_int4_kv_attention_paged_latent_and_one_token(device, values):
    """Multi-head latent attention's rows over pages (the latent tensor-core prefill), the values
    the key pages' first 512 channels (in place) or pages of their own; one query token is the
    decode's result."""
    from fastlayers.ops import int4_kv_attention_paged

    hq, hkv, d, dv, group, lens, tq = 16, 1, 576, 512, 64, [100, 40], 33
    keys = quant.quantize_kv_int4(rand(2, hkv, 100, d, dtype=torch.float32, device=device), group)
    if values == "key rows":
        pages, table, seq_lens = _paged(list(keys), lens, 16)
        kp, ksp = pages
        vp, vsp = kp[..., : dv // 2], ksp[..., : dv // group]
        cache = (*keys, keys[0][..., : dv // 2].contiguous(),
                 keys[1][..., : dv // group].contiguous())  # fmt: skip
    else:
        vals = quant.quantize_kv_int4(rand(2, hkv, 100, dv, dtype=torch.float32, device=device),
                                      group)  # fmt: skip
        (kp, ksp, vp, vsp), table, seq_lens = _paged([*keys, *vals], lens, 16)
        cache = (*keys, *vals)
    q = rand(2, hq, tq, d, dtype=torch.bfloat16, device=device)
    before = launches_since(PREFILL_KERNELS)
    out, lse = int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens)
    if before is not None and _cuda_path(q):
        assert launches_since(PREFILL_KERNELS, before) == [0, 0, 1]
    _check_prefill_rows(q, out, lse, cache, lens, d**-0.5)
    one, one_lse = int4_kv_attention_paged(q[:, :, -1:], kp, ksp, vp, vsp, table, seq_lens)
    want, want_lse = int4_kv_decode_paged(q[:, :, -1], kp, ksp, vp, vsp, table, seq_lens)
    torch.testing.assert_close(one[:, :, 0], want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(one_lse[:, :, 0], want_lse, rtol=2e-5, atol=2e-5)


def _ragged(q, q_lens):
    """Each row's first q_lens[b] queries of ``q [B, Hq, Tq, d]``, one row after the other:
    ``(q [T, Hq, d], cu_seqlens_q int32 [B + 1])``."""
    rows = [q[row, :, :m].transpose(0, 1) for row, m in enumerate(q_lens)]
    cu = [0]
    for m in q_lens:
        cu.append(cu[-1] + m)
    return torch.cat(rows).contiguous(), torch.tensor(cu, dtype=torch.int32, device=q.device)


def _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu):
    """The ragged call's rows, token by token, bit for bit the padded call's (with q_lens) on the
    same queries: the same kernel arithmetic in another layout."""
    total = int(cu[-1])
    assert out.shape == (total, q.shape[1], padded.shape[-1]) and lse.shape == (total, q.shape[1])
    for row, m in enumerate(q_lens):
        c = int(cu[row])
        assert torch.equal(out[c : c + m], padded[row, :, :m].transpose(0, 1)), row
        assert torch.equal(lse[c : c + m], padded_lse[row, :, :m].transpose(0, 1)), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d,dv,group,page_size,lens,q_lens,launched",
    [
        # tensor-core tile: a row of two query tiles, a decode row, an empty row, a partial tile
        (4, 2, 128, 128, 32, 16, [300, 9, 64, 80], [70, 1, 0, 65], [1, 0, 0]),
        (6, 3, 40, 40, 8, 4, [23, 3, 9], [2, 3, 5], [0, 1, 0]),  # a warp per query row
        (16, 2, 96, 64, 16, 8, [41, 3, 5], [1, 0, 2], [0, 1, 0]),  # values of their own size
    ],
)
def test_int4_kv_attention_paged_varlen_matches_reference(
    device, dtype, hq, hkv, d, dv, group, page_size, lens, q_lens, launched
):
    """Ragged queries (FlashAttention's cu_seqlens_q): every row's new tokens one after the other
    in q [T, Hq, d], no padding. Each row's queries against the contiguous causal float64
    reference over the row's own tokens, and bit for bit the padded call with q_lens (the outputs
    poisoned before the kernels write them); softcap; the ragged reference op; the kernel that ran,
    in the emulation."""
    from fastlayers.ops import int4_kv_attention_paged, int4_kv_attention_paged_varlen
    from fastlayers.ops.kvint4_paged import _attention_reference_op, _varlen_reference_op

    torch.manual_seed(d + sum(q_lens))
    b, tq = len(lens), max(q_lens)
    cache = _cache(b, hkv, max(lens), d, dv, group, device)
    pages, table, seq_lens = _paged(cache, lens, page_size)
    q = rand(b, hq, tq, d, dtype=dtype, device=device)
    counts = torch.tensor(q_lens, dtype=torch.int32, device=device)
    qr, cu = _ragged(q, q_lens)
    for cap in (0.0, 1.5):
        before = launches_since(PREFILL_KERNELS)
        out, lse = int4_kv_attention_paged_varlen(qr, *pages, table, seq_lens, cu, tq, softcap=cap)
        if before is not None and _cuda_path(q):
            assert launches_since(PREFILL_KERNELS, before) == launched
        assert out.dtype == dtype
        padded, padded_lse = int4_kv_attention_paged(q, *pages, table, seq_lens, softcap=cap,
                                                     q_lens=counts)  # fmt: skip
        _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu)
        _check_counted_rows(q, padded, padded_lse, cache, lens, q_lens, d**-0.5, cap)
    # max_seqlen_q read off cu_seqlens_q, or any larger bound: the same
    again = int4_kv_attention_paged_varlen(qr, *pages, table, seq_lens, cu, softcap=1.5)
    most = table.shape[1] * page_size  # (max_seqlen_q at most a row's tokens)
    wider = int4_kv_attention_paged_varlen(qr, *pages, table, seq_lens, cu, most, softcap=1.5)
    for x, y in ((again, (out, lse)), (wider, (out, lse))):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    ref, ref_lse = _varlen_reference_op(qr.double(), *pages, table, seq_lens, cu, tq, d**-0.5)
    padded, padded_lse = _attention_reference_op(q.double(), *pages, table, seq_lens, d**-0.5, 0.0,
                                                 counts)  # fmt: skip
    _check_counted_rows(q.double().float(), padded.float(), padded_lse, cache, lens, q_lens,
                        d**-0.5)  # fmt: skip
    _check_ragged(q, ref, ref_lse, q_lens, padded, padded_lse, cu)


def test_int4_kv_attention_paged_varlen_latent_decode_rows_sinks_and_strides(device):
    """The latent tensor-core prefill (values in the key pages) on ragged queries; a call of decode
    rows alone (at most one query a row: the decode kernels) equal to int4_kv_decode_paged's rows;
    attention sinks; a strided q; no tokens at all."""
    from fastlayers.ops import int4_kv_attention_paged, int4_kv_attention_paged_varlen

    hq, hkv, d, dv, group, lens = 16, 1, 576, 512, 64, [100, 40, 7]
    keys = quant.quantize_kv_int4(rand(3, hkv, 100, d, dtype=torch.float32, device=device), group)
    pages, table, seq_lens = _paged(list(keys), lens, 16)
    kp, ksp = pages
    vp, vsp = kp[..., : dv // 2], ksp[..., : dv // group]
    cache = (*keys, keys[0][..., : dv // 2].contiguous(), keys[1][..., : dv // group].contiguous())
    q = rand(3, hq, 33, d, dtype=torch.bfloat16, device=device)
    q_lens = [33, 5, 0]
    counts = torch.tensor(q_lens, dtype=torch.int32, device=device)
    qr, cu = _ragged(q, q_lens)
    before = launches_since(PREFILL_KERNELS)
    out, lse = int4_kv_attention_paged_varlen(qr, kp, ksp, vp, vsp, table, seq_lens, cu, 33)
    if before is not None and _cuda_path(q):
        assert launches_since(PREFILL_KERNELS, before) == [0, 0, 1]
    padded, padded_lse = int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens,
                                                 q_lens=counts)  # fmt: skip
    _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu)
    _check_counted_rows(q, padded, padded_lse, cache, lens, q_lens, d**-0.5)
    # fp32 queries (the tile's hi + lo parts, loaded a row stride apart)
    out, lse = int4_kv_attention_paged_varlen(qr.float(), kp, ksp, vp, vsp, table, seq_lens, cu)
    padded, padded_lse = int4_kv_attention_paged(q.float(), kp, ksp, vp, vsp, table, seq_lens,
                                                 q_lens=counts)  # fmt: skip
    _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu)
    # decode rows alone, one of them without a query
    ones = [1, 0, 1]
    q1, cu1 = _ragged(q[:, :, -1:], ones)
    out, lse = int4_kv_attention_paged_varlen(q1, kp, ksp, vp, vsp, table, seq_lens, cu1)
    want, want_lse = int4_kv_decode_paged(q[:, :, -1], kp, ksp, vp, vsp, table, seq_lens)
    assert torch.equal(out, want[[0, 2]]) and torch.equal(lse, want_lse[[0, 2]])
    every = torch.arange(4, dtype=torch.int32, device=device)  # one token each: q as it is
    out, lse = int4_kv_attention_paged_varlen(q[:, :, -1], kp, ksp, vp, vsp, table, seq_lens, every)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    # sinks: the padded call's
    sinks = rand(hq, dtype=torch.float32, device=device)
    out, lse = int4_kv_attention_paged_varlen(qr, kp, ksp, vp, vsp, table, seq_lens, cu, 33,
                                              sinks=sinks)  # fmt: skip
    padded, padded_lse = int4_kv_attention_paged(q, kp, ksp, vp, vsp, table, seq_lens,
                                                 q_lens=counts, sinks=sinks)  # fmt: skip
    _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu)
    # a strided q: the same as its contiguous copy
    wide = torch.cat([qr, qr], -1)[..., :d]
    assert not wide.is_contiguous()
    got = int4_kv_attention_paged_varlen(wide, kp, ksp, vp, vsp, table, seq_lens, cu, 33)
    want = int4_kv_attention_paged_varlen(qr, kp, ksp, vp, vsp, table, seq_lens, cu, 33)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    none = torch.zeros(4, dtype=torch.int32, device=device)
    out, lse = int4_kv_attention_paged_varlen(qr[:0], kp, ksp, vp, vsp, table, seq_lens, none)
    assert out.shape == (0, hq, dv) and lse.shape == (0, hq)


def test_int4_kv_attention_paged_varlen_every_cpu_isa_bad_input_and_opcheck(cpu_isa):
    from fastlayers.ops import int4_kv_attention_paged, int4_kv_attention_paged_varlen

    hq, hkv, d, group, lens = 8, 2, 64, 16, [130, 7, 45, 20]
    cache = _cache(4, hkv, 130, d, d, group, "cpu")
    q = rand(4, hq, 40, d, dtype=torch.bfloat16, device="cpu")
    q_lens = [40, 7, 0, 1]
    counts = torch.tensor(q_lens, dtype=torch.int32)
    qr, cu = _ragged(q, q_lens)
    pages, table, seq_lens = _paged(cache, lens, 8)
    out, lse = int4_kv_attention_paged_varlen(qr, *pages, table, seq_lens, cu, 40)
    padded, padded_lse = int4_kv_attention_paged(q, *pages, table, seq_lens, q_lens=counts)
    _check_ragged(q, out, lse, q_lens, padded, padded_lse, cu)
    _check_counted_rows(q, padded, padded_lse, cache, lens, q_lens, d**-0.5)
    args = (*pages, table, seq_lens)
    for bad_q, bad_cu, bad_max, match in (
        (qr, cu.long(), 40, "cu_seqlens_q must be int32"),
        (qr, cu[None], 40, "cu_seqlens_q must be int32"),
        (qr, cu[:-1], 40, "block_table must be int32 \\[3, max_pages\\]"),  # (its batch)
        (qr, cu - cu * (cu == 48), 40, "must start at 0, not decrease and end at q's 48"),
        (qr, cu + 1, 40, "must start at 0"),
        (qr, torch.tensor([0, 40, 30, 48, 48], dtype=torch.int32), 40, "decreasing"),
        (qr, cu, 39, "max_seqlen_q \\(39\\) is below a row's query tokens"),
        (qr, cu, 0, "max_seqlen_q must be >= 1"),
        (qr, cu, 10**6, "max_seqlen_q is 1000000 but block_table holds at most"),
        (qr, torch.tensor([0, 40, 48, 48, 48], dtype=torch.int32), 40, "must not exceed seq_lens"),
        (q, cu, 40, "q must be"),
    ):
        with pytest.raises(ValueError, match=match):
            int4_kv_attention_paged_varlen(bad_q, *args, bad_cu, bad_max)
    for bad_cu in (cu.bool(), cu.float(), cu[:, None]):  # (max_seqlen_q read off it: not read)
        with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
            int4_kv_attention_paged_varlen(qr, *args, bad_cu)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a torch.Tensor"):
        int4_kv_attention_paged_varlen(qr, *args, [0, 40, 47, 47, 48], 40)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        int4_kv_attention_paged_varlen(qr, *args, cu, 40.0)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention_paged_varlen.default,
                            (qr.float(), *args, cu, 40, 0.2))  # fmt: skip


def test_int4_kv_attention_paged_every_cpu_isa_bad_input_and_opcheck(cpu_isa):
    from fastlayers.ops import int4_kv_attention_paged

    hq, hkv, d, group, lens, tq = 8, 2, 64, 16, [130, 7, 45], 7
    cache = _cache(3, hkv, 130, d, d, group, "cpu")
    q = rand(3, hq, tq, d, dtype=torch.bfloat16, device="cpu")
    for page_size in (4, 64):
        pages, table, seq_lens = _paged(cache, lens, page_size)
        out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens)
        _check_prefill_rows(q, out, lse, cache, lens, d**-0.5)
    with pytest.raises(ValueError, match="seq_lens must lie in \\[7, "):
        int4_kv_attention_paged(q, *pages, table, seq_lens - 1)
    with pytest.raises(ValueError, match="q must be"):
        int4_kv_attention_paged(q[:, :, 0], *pages, table, seq_lens)
    with pytest.raises(ValueError, match="block_table holds at most"):
        int4_kv_attention_paged(q, *pages, table[:, :0], seq_lens * 0)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention_paged.default,
                            (q.float(), *pages, table, seq_lens, 0.2))  # fmt: skip
    counts = torch.tensor([7, 3, 0], dtype=torch.int32)
    out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens, q_lens=counts)
    _check_counted_rows(q, out, lse, cache, lens, [7, 3, 0], d**-0.5)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention_paged.default,
                            (q.float(), *pages, table, seq_lens, 0.2, 0.0, counts))  # fmt: skip


def test_int4_kv_paged_strided_inputs(device):
    """Strided (non-contiguous) q, block_table and seq_lens, and pages that are views into a wider
    pool: the same result as contiguous copies (the ops copy what the kernels cannot read in place
    and hold those copies through the call)."""
    from fastlayers.ops import int4_kv_attention_paged

    hq, hkv, d, group, lens = 4, 2, 64, 16, [40, 9, 23]
    cache = _cache(3, hkv, 40, d, d, group, device)
    (kp, ksp, vp, vsp), table, seq_lens = _paged(cache, lens, 8)
    wide_table = torch.stack([table, table + 1000], -1)[..., 0]  # stride 2 along the pages
    wide_lens = torch.stack([seq_lens, seq_lens], -1)[:, 0]
    wide_k = torch.cat([kp, kp], -1)[..., : d // 2]  # rows of d bytes, the first d / 2 used
    assert not (wide_table.is_contiguous() or wide_lens.is_contiguous() or wide_k.is_contiguous())
    qd = rand(hq, 3, d, dtype=torch.float32, device=device).transpose(0, 1)  # [3, hq, d] strided
    out, lse = int4_kv_decode_paged(qd, wide_k, ksp, vp, vsp, wide_table, wide_lens)
    want = int4_kv_decode_paged(qd.contiguous(), kp, ksp, vp, vsp, table, seq_lens)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=0)
    qp = rand(3, 5, hq, d, dtype=torch.float32, device=device).transpose(1, 2)  # [3, hq, 5, d]
    out, lse = int4_kv_attention_paged(qp, wide_k, ksp, vp, vsp, wide_table, wide_lens)
    want = int4_kv_attention_paged(qp.contiguous(), kp, ksp, vp, vsp, table, seq_lens)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=0)
