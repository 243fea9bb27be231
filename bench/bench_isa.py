#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Every CPU kernel family under each kernel variant this CPU runs (AVX512-BF16, AVX-512, AVX2,
scalar; AVX512-BF16 differs from AVX-512 in the INT4 x FP8 GEMM and in bf16 varlen_attention,
FFF and PEER experts only),
timed call by call in alternation (``time_interleaved``) on the same inputs: which variant the
dispatcher should prefer on this machine, and what each gains over the next.

    python bench/bench_isa.py [--reps N] [--isa avx512 --isa avx2 ...] [--op NAME] [--out FILE.md]
    python bench/bench_isa.py --build old/_C.so --build new/_C.so [--op NAME]

The variants compute the same values (the test suite checks each against the reference); only
their speed differs here. The default is every variant the CPU supports but scalar.

With ``--build`` (twice or more) the variants are builds of the compiled module instead, under the
ISA in use: copy ``build/dev/_C*.so`` aside before and after a kernel change and time the two in
one process (the ops look ``fastlayers._ext.C`` up at each call, so each call runs the build its
variant sets). A VM whose speed drifts by 20-50 % between runs still gives a usable ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

import fastlayers
import fastlayers.ops as ops
from fastlayers import _ext
from fastlayers.benchmark.harness import describe_device, time_interleaved


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _case(name, shape, fn, *args):
    return name, shape, fn, args


# Each family's builder yields its cases (name, shape, fn, args), the inputs fresh random.
def _rmsnorm():
    for dtype in (torch.float32, torch.bfloat16):
        x, w = _randn(4096, 4096, dtype=dtype), _randn(4096, dtype=dtype)
        r, dy = _randn(4096, 4096, dtype=dtype), _randn(4096, 4096, dtype=dtype)
        shape = f"4096x4096 {str(dtype).removeprefix('torch.')}"
        yield _case("rms_norm", shape, fastlayers.rms_norm, x, w)
        yield _case(
            "rms_norm out=", shape, lambda x, w, y: fastlayers.rms_norm(x, w, out=y), x, w, r
        )
        yield _case("fused_add_rms_norm", shape, fastlayers.fused_add_rms_norm, x, r, w)
        yield _case("rms_norm_fp8", shape, fastlayers.rms_norm_fp8, x, w)
        yield _case("rms_norm_backward", shape, fastlayers.rms_norm_backward, dy, x, w)


def _fff():
    # UltraFastFeedForward width 768, depth 11 (the case), and the classic form.
    x = _randn(1024, 768)
    w_in, w_out = _randn(4095, 768) / 28, _randn(4095, 768) / 64
    yield _case("ultrafast_ff", "1024x768 depth 11", fastlayers.ultrafast_ff, x, w_in, w_out)
    yield _case("ultrafast_ff", "1x768 depth 11", fastlayers.ultrafast_ff, x[:1], w_in, w_out)
    bf16 = [t.to(torch.bfloat16) for t in (x, w_in, w_out)]  # (dot products by vdpbf16ps there)
    yield _case("ultrafast_ff", "1024x768 depth 11 bf16", fastlayers.ultrafast_ff, *bf16)
    leaves = (_randn(2047, 768) / 28, _randn(2047) / 10, _randn(2048, 768, 8) / 28)
    leaves += (_randn(2048, 8) / 10, _randn(2048, 8, 768) / 3, _randn(2048, 768) / 10)
    yield _case("fff_hard", "1024x768 depth 11 leaf 8", fastlayers.fff_hard, x, *leaves)


def _peer():
    # 1024^2 experts (product keys 2 x 1024), 8 heads, top-16, dim 512, 1024 tokens.
    q, keys = _randn(1024, 8, 256), _randn(8, 2, 1024, 128)
    retrieve = lambda q, k: fastlayers.peer_retrieve(q, k, 16)  # noqa: E731
    yield _case("peer_retrieve", "1024 tokens, 8 heads, 2x1024 keys", retrieve, q, keys)
    idx, gates = (t.reshape(1024, -1) for t in retrieve(q, keys))  # each token's 8 x 16 experts
    down, up = _randn(1 << 20, 512) / 23, _randn(1 << 20, 512) / 4  # 2 GiB each
    shape = "1024 tokens, 8x16 of 2^20 experts, d512"
    yield _case(
        "peer_experts", shape, fastlayers.peer_experts, _randn(1024, 512), idx, gates, down, up
    )
    del down, up
    bf16 = [t.to(torch.bfloat16) for t in (_randn(1024, 512), gates)]
    down, up = (_randn(1 << 20, 512, dtype=torch.bfloat16) for _ in "du")  # 1 GiB each
    yield _case("peer_experts", shape + " bf16", fastlayers.peer_experts, bf16[0], idx, bf16[1],
                down, up)  # fmt: skip


def _int4_fp8():
    # The GEMM 4096x4096, group 128, and the activation quantization.
    wq = fastlayers.quantize_int4(_randn(4096, 4096) / 64, group_size=128)
    gemm = lambda xq, xs: fastlayers.int4_fp8_gemm(xq, xs, wq, out_dtype=torch.float32)  # noqa: E731
    for m in (1, 8, 16, 64, 256):
        xq, xs = fastlayers.quantize_fp8_per_token(_randn(m, 4096))
        yield _case("int4_fp8_gemm", f"M={m} 4096x4096", gemm, xq, xs)
    x = _randn(4096, 4096)
    yield _case("quantize_fp8_per_token", "4096x4096 fp32", fastlayers.quantize_fp8_per_token, x)


def _varlen_backward(dy, *args):  # args: q, k, v, cu_q, cu_k, q_pos, k_pos, out, lse (causal)
    return torch.ops.fastlayers.varlen_attention_backward(dy, None, *args, -1, 0, 0.125)


def _varlen():
    # One sequence, 2048 tokens routed of 4096 (positions sorted), 16 heads, d64.
    t = 2048
    pos = torch.sort(torch.randperm(4096)[:t]).values
    cu = torch.tensor([0, t], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = tuple(_randn(t, 16, 64, dtype=dtype) for _ in range(3))
        args = (*qkv, cu, cu, pos, pos)
        shape = f"{t} routed, h16 d64, {str(dtype).removeprefix('torch.')}"
        yield _case("varlen_attention", shape, fastlayers.varlen_attention, *args)
        out, lse = fastlayers.varlen_attention(*args, return_lse=True)
        yield _case("varlen_attention_backward", shape, _varlen_backward, torch.randn_like(out),
                    *args, out, lse)  # fmt: skip


def _kv_int4():
    # GQA 32/8, d128: decode over 4096 cached tokens, a 1024-token causal prefill (fp32 queries)
    # and 256 new tokens over 512 (bf16 queries), the cache-side and query-side quantization.
    cache = (*ops.kv_quantize(_randn(1, 8, 4096, 128), 128),)
    cache += ops.kv_quantize(_randn(1, 8, 4096, 128), 128)
    qd = ops.q_quantize(_randn(1, 32, 1, 128))[:, :, 0]  # one query token: [batch, heads, d]
    yield _case("int4_kv_decode", "4096 cached, 32/8 heads, d128", ops.int4_kv_decode, qd, *cache)
    prefix = [t[..., :1024, :].contiguous() for t in cache]
    qp = ops.q_quantize(_randn(1, 32, 1024, 128))
    yield _case(
        "int4_kv_attention", "1024 causal, 32/8 heads, d128", ops.int4_kv_attention, qp, *prefix
    )
    # multi-head latent attention's decode (16 heads over one latent of 576 channels, values its
    # first 512): on AMX tiles at the level amx_bf16
    latent = ops.kv_quantize(_randn(1, 1, 4096, 576), 64)
    mla = (*latent, latent[0][..., :256], latent[1][..., :8])
    qm = ops.q_quantize(_randn(1, 16, 1, 576))[:, :, 0]
    yield _case(
        "int4_kv_decode", "MLA 4096 cached, 16 heads, 576 / 512", ops.int4_kv_decode, qm, *mla
    )
    qb = _randn(1, 32, 256, 128).bfloat16()  # (the quick bench's prefill: bf16 queries)
    mid = [t[..., :512, :].contiguous() for t in cache]
    yield _case(
        "int4_kv_attention", "256 over 512, bf16, 32/8 heads, d128", ops.int4_kv_attention, qb, *mid
    )
    quantize = lambda x: ops.kv_quantize(x, 128)  # noqa: E731
    yield _case("kv_quantize", "1x8x1024x128 fp32", quantize, _randn(1, 8, 1024, 128))
    yield _case("q_quantize", "1x32x1024x128 fp32", ops.q_quantize, _randn(1, 32, 1024, 128))


# family builder -> the ops it times (a family's inputs are built only when one of them is wanted)
FAMILIES = {
    _rmsnorm: (
        "rms_norm",
        "rms_norm out=",
        "fused_add_rms_norm",
        "rms_norm_fp8",
        "rms_norm_backward",
    ),
    _fff: ("ultrafast_ff", "fff_hard"),
    _peer: ("peer_retrieve", "peer_experts"),
    _int4_fp8: ("int4_fp8_gemm", "quantize_fp8_per_token"),
    _varlen: ("varlen_attention", "varlen_attention_backward"),
    _kv_int4: ("int4_kv_decode", "int4_kv_attention", "kv_quantize", "q_quantize"),
}


def _cases(wanted=None):
    """(name, shape, fn, args) of each op in ``wanted`` (all when None), family by family, the
    inputs fresh random (seeded)."""
    torch.manual_seed(0)
    for build, names in FAMILIES.items():
        if wanted is None or any(n in wanted for n in names):
            yield from (c for c in build() if wanted is None or c[0] in wanted)


def _under(isa: str, fn):
    def call(*args):
        _ext.C.set_cpu_isa(isa)
        return fn(*args)

    return call


def _with_build(module, fn):
    def call(*args):
        _ext.C = module
        return fn(*args)

    return call


def _load_build(path: str, i: int):
    """The compiled module at ``path`` (any file name), imported under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"_fl_build{i}._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--isa", action="append", help="a variant to time (repeatable)")
    p.add_argument("--build", action="append", help="a built _C*.so to time (repeatable)")
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--out", help="write the table (markdown) to this file too")
    a = p.parse_args(argv)
    known = [n for names in FAMILIES.values() for n in names]
    if a.op and not set(a.op) <= set(known):
        print(f"unknown --op {sorted(set(a.op) - set(known))}; ops: {known}", file=sys.stderr)
        return 2
    if not _ext.has_cpu_kernels():
        print("the compiled CPU kernels are not loaded: nothing to compare", file=sys.stderr)
        return 1
    order = list(reversed(_ext.C.cpu_isa_names()))  # best first
    supported = order[order.index(_ext.C.detected_cpu_isa()) :]
    isas = a.isa or [i for i in supported if i != "scalar"] or ["scalar"]
    for i in isas:
        if i not in supported:
            print(f"this CPU does not run '{i}' (it runs {supported})", file=sys.stderr)
            return 2
    if _ext.C.avx512_emulated() and any(i.startswith("avx512") for i in isas):
        print("warning: this build emulates AVX-512 through SIMDe: its times mean nothing")
    before, loaded = _ext.C.cpu_isa(), _ext.C
    if a.build:
        names = a.build
        variants = [_load_build(b, i) for i, b in enumerate(a.build)]
        wrap = _with_build
    else:
        names, variants, wrap = isas, isas, _under
    lines = [
        f"# CPU kernel variants: {describe_device(torch.device('cpu'))}",
        "",
        f"fastlayers {fastlayers.__version__} (torch {torch.__version__}); median of {a.reps} "
        "calls per variant, the variants of a row interleaved call by call on the same inputs.",
        "",
        "| op | shape | " + " | ".join(f"{i} (us)" for i in names)
        + " | " + " | ".join(f"{names[0]} speed-up over {i}" for i in names[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(names) - 1),
    ]  # fmt: skip
    print("\n".join(lines), flush=True)
    try:
        for name, shape, fn, args in _cases(a.op):
            timings = time_interleaved(
                [(wrap(v, fn), [args], a.reps) for v in variants], torch.device("cpu")
            )
            us = [t.median_s * 1e6 for t in timings]
            ratios = [us[j] / us[0] for j in range(1, len(us))]
            line = (
                f"| {name} | {shape} | " + " | ".join(f"{u:.1f}" for u in us) + " | "
                + " | ".join(f"{r:.2f}x" for r in ratios) + " |"
            )  # fmt: skip
            print(line, flush=True)
            lines.append(line)
    finally:
        _ext.C = loaded
        _ext.C.set_cpu_isa(before)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
