# SPDX-License-Identifier: Apache-2.0
"""CUDA-graph capture and replay of the ops (GPU only): the captured graph, replayed on new inputs
copied into the static buffers, gives what eager calls give. Nothing in these paths may synchronise
with the host while capturing (routing, varlen attention, PEER experts, INT4 x FP8, INT4 KV)."""

import pytest
import torch

import fastlayers
from _tolerances import rand
from fastlayers import quant

pytestmark = pytest.mark.cuda


def _check_graph(fn, make_inputs):
    """Capture ``fn`` on one input set, replay it on another (copied in), compare with eager."""
    static = make_inputs()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (lazy setup, allocator)
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    fresh = make_inputs()
    for s, f in zip(static, fresh, strict=True):
        if isinstance(s, torch.Tensor):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    want = fn(*fresh)
    outs = out if isinstance(out, tuple) else (out,)
    wants = want if isinstance(want, tuple) else (want,)
    for o, w in zip(outs, wants, strict=True):
        assert torch.equal(o, w), "replayed graph differs from the eager call"


def test_rms_norm_family_in_a_graph():
    dev = "cuda"
    _check_graph(lambda x, w: fastlayers.rms_norm(x, w),
                 lambda: (rand(33, 4096, dtype=torch.bfloat16, device=dev),
                          rand(4096, dtype=torch.bfloat16, device=dev)))  # fmt: skip
    _check_graph(lambda x, r, w: fastlayers.fused_add_rms_norm(x, r, w),
                 lambda: (rand(7, 769, dtype=torch.float16, device=dev),
                          rand(7, 769, dtype=torch.float16, device=dev),
                          rand(769, dtype=torch.float16, device=dev)))  # fmt: skip
    _check_graph(lambda x, w: fastlayers.rms_norm_fp8(x, w)[1],
                 lambda: (rand(5, 1024, dtype=torch.bfloat16, device=dev),
                          rand(1024, dtype=torch.bfloat16, device=dev)))  # fmt: skip


def test_fff_peer_and_int4_fp8_in_a_graph():
    dev = "cuda"
    ff = fastlayers.UltraFastFeedForward(128, 128, depth=5, device=dev).eval()
    with torch.no_grad():
        _check_graph(lambda x: ff(x), lambda: (rand(9, 128, dtype=torch.float32, device=dev),))
        peer = fastlayers.PEER(64, 16 * 16, heads=2, topk=4, device=dev).eval()
        _check_graph(lambda x: peer(x), lambda: (rand(6, 64, dtype=torch.float32, device=dev),))
        lin = fastlayers.Int4Fp8Linear.from_linear(torch.nn.Linear(256, 192, device=dev))
        _check_graph(lambda x: lin(x), lambda: (rand(3, 256, dtype=torch.bfloat16, device=dev),))


def test_routing_and_varlen_attention_in_a_graph():
    dev = "cuda"
    b, t, h, d = 2, 64, 4, 64

    def step(scores, q, k, v):
        idx, cu = fastlayers.route_topk(scores, 16)
        pos = (idx % t).long()
        return fastlayers.varlen_attention(q[idx], k[idx], v[idx], cu, cu, pos, pos)

    def inputs():
        return (torch.randn(b, t, device=dev), rand(b * t, h, d, dtype=torch.bfloat16, device=dev),
                rand(b * t, h, d, dtype=torch.bfloat16, device=dev),
                rand(b * t, h, d, dtype=torch.bfloat16, device=dev))  # fmt: skip

    _check_graph(step, inputs)


def test_int4_kv_decode_and_write_in_a_graph():
    dev = "cuda"

    def step(q, keys):
        kq, ks = fastlayers.ops.kv_quantize(keys, 128)
        return fastlayers.ops.int4_kv_decode(q, kq, ks, kq, ks)[0]

    _check_graph(step, lambda: (rand(2, 8, 128, dtype=torch.bfloat16, device=dev),
                                rand(2, 2, 300, 128, dtype=torch.float32, device=dev)))  # fmt: skip
    assert quant.Int4KVStore  # (the cache the decode path reads)


def test_int4_kv_decode_paged_in_a_graph():
    """The paged decode plans its splits over the block table's width: no host read of seq_lens
    while capturing; replayed with other lengths and pages."""
    dev = "cuda"
    kp, ksp = quant.quantize_kv_int4(rand(40, 2, 16, 128, dtype=torch.float32, device=dev), 32)

    def step(q, table, seq_lens):
        return fastlayers.ops.int4_kv_decode_paged(q, kp, ksp, kp, ksp, table, seq_lens)[0]

    def inputs():
        table = torch.randperm(40, device=dev)[:24].reshape(2, 12).int()
        return (rand(2, 8, 128, dtype=torch.bfloat16, device=dev), table,
                torch.randint(0, 193, (2,), device=dev, dtype=torch.int32))  # fmt: skip

    _check_graph(step, inputs)


def test_int4_kv_attention_paged_varlen_in_a_graph():
    """The ragged paged prefill with max_seqlen_q given: no host read of cu_seqlens_q or seq_lens
    while capturing; replayed with other row counts, lengths and pages."""
    dev = "cuda"
    kp, ksp = quant.quantize_kv_int4(rand(40, 2, 16, 128, dtype=torch.float32, device=dev), 32)

    def step(q, table, seq_lens, cu):
        out = fastlayers.ops.int4_kv_attention_paged_varlen(q, kp, ksp, kp, ksp, table, seq_lens,
                                                            cu, 70)[0]  # fmt: skip
        # max_seqlen_q left out: the grid over q's 72 tokens, no host read
        out_bound = fastlayers.ops.int4_kv_attention_paged_varlen(q, kp, ksp, kp, ksp, table,
                                                                  seq_lens, cu)[0]  # fmt: skip
        return out, out_bound

    def inputs():
        table = torch.randperm(40, device=dev)[:36].reshape(3, 12).int()
        first = int(torch.randint(2, 71, ()))  # (the other rows: 1 and the rest of 72 tokens)
        cu = torch.tensor([0, first, first + 1, 72], dtype=torch.int32, device=dev)
        seq_lens = torch.randint(71, 193, (3,), device=dev, dtype=torch.int32)
        return rand(72, 8, 128, dtype=torch.bfloat16, device=dev), table, seq_lens, cu

    _check_graph(step, inputs)


@pytest.mark.parametrize("counts", [1, [1, 4, 1]])
def test_paged_cache_planned_step_in_a_graph(counts):
    """A step on cache.plan's metadata (write k, v, then attention_step) reads nothing back to the
    host: captured whole, replayed with other tokens, the eager step's outputs. A decode step
    (the decode kernels), and decode rows beside a draft of 4 (the plan's split: decode rows
    gathered into the decode kernel, the draft's prefill, the outputs scattered back)."""
    dev = "cuda"
    cache = quant.Int4PagedKVCache(1, num_pages=40, page_size=16, kv_heads=2, head_dim=128,
                                   group_size=32, device=dev)  # fmt: skip
    seqs = [cache.new_sequence() for _ in range(3)]
    slots = cache.reserve(seqs, [100, 37, 5])
    k, v = (rand(142, 2, 128, dtype=torch.bfloat16, device=dev) for _ in range(2))
    cache.write(0, k, v, slots)
    step = cache.plan(seqs, counts)
    assert (step.split is None) == (counts == 1)
    n = step.num_tokens

    def fn(q, k, v):
        cache.write(0, k, v, step)
        return cache.attention_step(0, q, step)

    _check_graph(fn, lambda: tuple(rand(n, h, 128, dtype=torch.bfloat16, device=dev)
                                   for h in (8, 2, 2)))  # fmt: skip


def test_kv_cache_write_paged_in_a_graph():
    """The paged cache write skips its slot checks while capturing (no host read); replayed with
    other tokens and slots, -1 (not written) among them: the pages as the eager call leaves them."""
    dev = "cuda"
    pages = [
        torch.zeros(40, 2, 16, 64, dtype=torch.uint8, device=dev),
        torch.zeros(40, 2, 16, 4, dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn),
    ]

    def step(x, slots):
        for t in pages:
            t.view(torch.uint8).zero_()
        fastlayers.ops.kv_cache_write_paged(x, *pages, slots)
        return tuple(t.view(torch.uint8).clone() for t in pages)

    def inputs():
        slots = torch.randperm(640, device=dev)[:24]
        slots[::5] = -1
        return rand(24, 2, 128, dtype=torch.bfloat16, device=dev), slots

    _check_graph(step, inputs)
