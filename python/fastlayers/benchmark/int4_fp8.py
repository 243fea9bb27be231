# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8 benchmark: ``Int4Fp8Linear`` (FP8 per-token quantisation of a bf16 input + the INT4 x
FP8 GEMM, bf16 out) on Llama-class layer shapes against ``F.linear`` in float32 and bfloat16 with
the same weights and, on CUDA, ``torch._scaled_mm`` FP8 x FP8 (per-row / per-column scales); on
Hopper at up to 16 tokens also the GEMV that sm80/89 decode runs (which decode kernel is faster).
Inference, no grad.

Every timed call reads its weights cold: the layers rotate over enough copies to exceed the last
level cache (an 8 MiB INT4 weight would otherwise be served from a 32 MiB L3 while the 64 MiB
float32 one comes from memory). GB/s counts the bytes a call must move: INT4 weight, FP8 scales,
channel scales, input and output; the fraction is against ``dst.copy_(src)`` in the same run.
The error column is the max abs difference to a float64 evaluation of the quantised contract
(not to the float layer: that difference is the quantisation error, reported by the tests).
"""

from __future__ import annotations

import copy
import functools

import torch

import fastlayers
from fastlayers import _dtypes, _ext
from fastlayers.benchmark.harness import (
    CopyCase,
    Row,
    backend_label,
    copies_to_exceed_cache,
    time_interleaved,
)
from fastlayers.reference import int4_fp8 as ref

LAYERS = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out_features, in_features)
FFN = (4096, 14336)  # Llama-3-8B MLP: hidden, intermediate
FFN_TOKENS = {"cpu": [1, 16], "cuda": [1, 16, 1024, 4096]}
QUICK = {"layers": [(4096, 4096)], "tokens": [1, 16]}
FULL_TOKENS = {"cpu": [1, 16, 128], "cuda": [1, 16, 128, 1024, 4096]}


def _oracle_error(layer, x) -> float:
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    qw = layer.quantized_weight
    lut = ref.dequantize_int4(qw.qweight, qw.group_scale, torch.ones_like(qw.channel_scale),
                              qw.group_size)  # fmt: skip
    y64 = (xq.double() @ lut.double().t()) * xs.double() * qw.channel_scale.double()
    return (layer(x).double() - y64).abs().max().item()


def _label(layer, tokens: int, backend: str) -> str:
    """The backend column: on an sm90 GPU, the CUTLASS configuration that ran and its split-K
    factor (``bf16_t16 split4``)."""
    shape = layer.sm90_gemm_shape()
    if shape is None:
        return backend
    code = _dtypes.code(layer.out_dtype)
    splits = _ext.C.int4_fp8_sm90_splits(layer.sm90_weight.device.index, tokens, *shape, code)
    config = _ext.C.int4_fp8_sm90_config(tokens, code)
    return f"fastlayers/cutlass-sm90 {config}" + (f" split{splits}" if splits > 1 else "")


def _call(layer, x):
    return layer(x)


def _gemv(x, weight):
    """Int4Fp8Linear's computation through the generic op (the CUDA GEMV up to 16 rows)."""
    return fastlayers.int4_fp8_gemm(*fastlayers.quantize_fp8_per_token(x), weight)


def _ffn(gate, up, down, x):
    """The Llama MLP: down(silu(gate(x)) * up(x))."""
    return down(torch.nn.functional.silu(gate(x)) * up(x))


def _ffn_rows(device: torch.device, reps: int) -> list[Row]:
    """The whole MLP block (three layers, SiLU, product) in INT4 x FP8 against bf16 F.linear: the
    issue's FFN target (>= 1.6x bf16 cuBLAS at 1024 tokens on an H100). Weights warm (three 4096 x
    14336 bf16 matrices are 352 MB; the block is compute-bound at 1024 tokens)."""
    hidden, inter = FFN
    gen = torch.Generator(device="cpu").manual_seed(1)
    lins = [
        torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16, device=device)
        for i, o in ((hidden, inter), (hidden, inter), (inter, hidden))
    ]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.in_features**-0.5)
    ours = [fastlayers.Int4Fp8Linear.from_linear(lin) for lin in lins]
    rows = []
    for tokens in FFN_TOKENS[device.type]:
        x = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(device, torch.bfloat16)
        nbytes = sum(n * k // 2 + n * (-(-k // 128)) + 4 * n for n, k in (
            (inter, hidden), (inter, hidden), (hidden, inter)))  # fmt: skip
        copy_ = CopyCase(nbytes // 2, device)
        with torch.no_grad():
            t_ours, t_base, t_copy = time_interleaved(
                [(_ffn, [(*ours, x)], reps), (_ffn, [(*lins, x)], reps), copy_.case(reps)], device
            )
        gbps = nbytes / t_ours.median_s / 1e9
        rows.append(
            Row(
                "Llama MLP block, Int4Fp8Linear x3 (g128)",
                f"{tokens}x{hidden}->{inter}->{hidden}",
                "bfloat16",
                _label(ours[0], tokens, backend_label(device, "int4_fp8_gemm")),
                t_ours.median_s * 1e6,
                "F.linear bf16 x3",
                t_base.median_s * 1e6,
                gbps,
                gbps * 1e9 / copy_.bandwidth(t_copy),
                float("nan"),  # the quantised block's accuracy: tests and the MiniLM study
            )
        )
    return rows


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    rows: list[Row] = []
    layers = QUICK["layers"] if quick else LAYERS
    tokens_list = QUICK["tokens"] if quick else FULL_TOKENS[device.type]
    backend = backend_label(device, "int4_fp8_gemm")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n, k in layers:
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device)
        lin = torch.nn.Linear(k, n, bias=False, device=device)
        with torch.no_grad():
            lin.weight.copy_(w)
        int4_bytes = n * k // 2 + n * (-(-k // 128)) + 4 * n
        copies = copies_to_exceed_cache(int4_bytes, device)
        layer = fastlayers.Int4Fp8Linear.from_linear(lin, out_dtype=torch.bfloat16)
        ours = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
        w32 = [w] + [w.clone() for _ in range(copies_to_exceed_cache(4 * n * k, device) - 1)]
        w16 = [w.bfloat16() for _ in range(copies_to_exceed_cache(2 * n * k, device))]
        for tokens in tokens_list:
            x = torch.randn(tokens, k, generator=gen).to(device)
            xb = x.bfloat16()
            nbytes = int4_bytes + tokens * (2 * k + 2 * n)
            copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
            with torch.no_grad():
                linear = torch.nn.functional.linear
                baselines = {
                    "F.linear fp32": (linear, [(x, t) for t in w32]),
                    "F.linear bf16": (linear, [(xb, t) for t in w16]),
                }
                if ours[0].sm90_weight is not None and tokens <= 16:
                    # the GEMV the sm80/89 decode runs, on the same INT4 weights: which of the
                    # two decode kernels Hopper should route to
                    baselines["fastlayers GEMV (sm80/89 decode)"] = (
                        _gemv,
                        [(xb, layer.quantized_weight) for layer in ours],
                    )
                if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
                    xq, xs = fastlayers.quantize_fp8_per_token(xb)
                    ones = torch.ones(1, n, device=device)
                    baselines["torch._scaled_mm fp8 x fp8"] = (
                        functools.partial(torch._scaled_mm, out_dtype=torch.bfloat16),
                        [(xq, ref.to_fp8(t).t(), xs, ones) for t in w16],
                    )
                base_reps = 3 if tokens >= 128 and device.type == "cpu" else max(3, reps // 2)
                t_ours, *t_bases, t_copy = time_interleaved(
                    [(_call, [(layer, xb) for layer in ours], reps)]
                    + [(fn, inputs, base_reps) for fn, inputs in baselines.values()]
                    + [copy_.case(reps)],
                    device,
                )
                err = _oracle_error(ours[0], xb)
                gbps = nbytes / t_ours.median_s / 1e9
                for name, t_base in zip(baselines, t_bases, strict=True):
                    rows.append(
                        Row(
                            "Int4Fp8Linear (g128, bf16 in/out)",
                            f"{tokens}x{k}->{n}",
                            "bfloat16",
                            _label(layer, tokens, backend),
                            t_ours.median_s * 1e6,
                            name,
                            t_base.median_s * 1e6,
                            gbps,
                            gbps * 1e9 / copy_.bandwidth(t_copy),
                            err,
                        )
                    )
    if not quick:
        rows += _ffn_rows(device, reps)
    return rows
