# SPDX-License-Identifier: Apache-2.0
"""RMSNorm benchmark: fastlayers against torch.nn.RMSNorm, the Hugging Face eager formula and
torch.compile of it, as GB/s and as a fraction of the copy bandwidth measured in the same run."""

from __future__ import annotations

import torch

import fastlayers
from fastlayers import reference as ref
from fastlayers.benchmark import harness
from fastlayers.benchmark.harness import (
    CopyCase,
    Row,
    backend_label,
    copies_to_exceed_cache,
    time_interleaved,
)

QUICK_SHAPES = [(4096, 4096)]
FULL_SHAPES = {
    "cpu": [(1, 4096), (64, 4096), (4096, 4096), (2048, 8192), (1024, 5120), (512, 20000)],
    "cuda": [(64, 4096), (4096, 4096), (16384, 4096), (4096, 8192), (8192, 16384), (4096, 5125)],
}
QUICK_DTYPES = [torch.float32, torch.bfloat16]
FULL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hf_rms_norm(x, weight, eps=1e-6):
    """The Hugging Face LlamaRMSNorm forward, as models run it without fused kernels."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def hf_add_rms_norm(x, residual, weight, eps=1e-6):
    s = residual + x
    return hf_rms_norm(s, weight, eps), s


def eager_rms_norm_fp8(x, weight, eps=1e-6):
    """Norm, then dynamic per-token FP8 quantisation, unfused (a model without the kernel)."""
    return ref.rms_norm_fp8(x, weight, eps)


def _max_err(out, expected) -> float:
    return (out.float() - expected.float()).abs().max().item() if out.numel() else 0.0


def _cases(shape, dtype, device, with_compile: bool):
    """(op, ours, baselines {name: fn}, bytes moved, error check) for one shape and dtype.
    Every function takes one rotated input set (a, b, w): two [m, n] activations and a weight."""
    m, n = shape
    b = torch.tensor([], dtype=dtype).element_size()
    fwd_base = {
        "torch.nn.RMSNorm": lambda x, r, w: torch.nn.functional.rms_norm(x, (n,), w, 1e-6),
        "HF eager": lambda x, r, w: hf_rms_norm(x, w),
    }
    if with_compile:
        fwd_base["torch.compile(HF)"] = torch.compile(
            lambda x, r, w: hf_rms_norm(x, w), dynamic=False
        )
    yield (
        "rms_norm",
        lambda x, r, w: fastlayers.rms_norm(x, w),
        fwd_base,
        2 * m * n * b,
        lambda x, r, w, out: _max_err(out, ref.rms_norm(x, w)),
    )

    add_base = {
        "add + torch.nn.RMSNorm": lambda x, r, w: torch.nn.functional.rms_norm(
            x + r, (n,), w, 1e-6
        ),
        "HF eager": lambda x, r, w: hf_add_rms_norm(x, r, w),
    }
    yield (
        "fused_add_rms_norm",
        lambda x, r, w: fastlayers.fused_add_rms_norm(x, r, w),
        add_base,
        4 * m * n * b,
        lambda x, r, w, out: _max_err(out[0], ref.fused_add_rms_norm(x, r, w)[0]),
    )

    fp8_base = {"eager norm + quant": lambda x, r, w: eager_rms_norm_fp8(x, w)}
    yield (
        "rms_norm_fp8",
        lambda x, r, w: fastlayers.rms_norm_fp8(x, w),
        fp8_base,
        m * n * (b + 1) + 4 * m,
        lambda x, r, w, out: _max_err(out[0].float() * out[1], _dequant(ref.rms_norm_fp8(x, w))),
    )

    graphs = {}

    def torch_backward(x, dy, w):  # autograd's backward of F.rms_norm; graphs built in warm-up
        key = x.data_ptr()
        if key not in graphs:
            xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
            graphs[key] = (torch.nn.functional.rms_norm(xl, (n,), wl, 1e-6), xl, wl)
        y, xl, wl = graphs[key]
        return torch.autograd.grad(y, (xl, wl), dy, retain_graph=True)

    yield (
        "rms_norm_backward",
        lambda x, dy, w: fastlayers.rms_norm_backward(dy, x, w),
        {"torch.nn.RMSNorm autograd": torch_backward},
        3 * m * n * b,
        lambda x, dy, w, out: _max_err(out[0], ref.rms_norm_backward(dy, x, w)[0]),
    )

    # Writing into the caller's buffers (last: they overwrite the input sets). The second activation
    # of a set serves as out: no allocation, whose first-touch page faults cost a CPU caller about
    # as much as the norm itself.
    yield (
        "rms_norm(out=)",
        lambda x, r, w: fastlayers.rms_norm(x, w, out=r),
        {"copy_ into out (roofline)": lambda x, r, w: r.copy_(x)},
        2 * m * n * b,
        lambda x, r, w, out: _max_err(out, ref.rms_norm(x, w)),
    )

    def eager_add_norm_(x, r, w):  # what a model without the kernel does in place
        r.add_(x)
        x.copy_(torch.nn.functional.rms_norm(r, (n,), w, 1e-6))

    yield (
        "fused_add_rms_norm_",
        lambda x, r, w: fastlayers.fused_add_rms_norm_(x, r, w),
        {"add_ + torch.nn.RMSNorm + copy_": eager_add_norm_},
        4 * m * n * b,
        lambda x, r, w, out: _in_place_err(x, r, w),
    )


def _in_place_err(x, r, w) -> float:
    """fused_add_rms_norm_ on copies (the timed calls have already overwritten x and r)."""
    xi, ri = x.clone(), r.clone()
    fastlayers.fused_add_rms_norm_(xi, ri, w)
    return _max_err(xi, ref.fused_add_rms_norm(x, r, w)[0])


def _dequant(q_scale):
    return q_scale[0].float() * q_scale[1]


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES[device.type]
    dtypes = QUICK_DTYPES if quick else FULL_DTYPES
    rows: list[Row] = []
    backend = backend_label(device, "rms_norm")
    for shape in shapes:
        m, n = shape
        copies: dict[int, CopyCase] = {}  # per source size; freed with the next shape
        for dtype in dtypes:
            b = torch.tensor([], dtype=dtype).element_size()
            # torch.compile's first call costs ~20 s of compilation: full runs only, so --quick
            # stays under a minute with every family
            with_compile = not quick and harness.COMPILE_BASELINES
            per_set = 3 * m * n * b
            sets = copies_to_exceed_cache(per_set, device)
            gen = torch.Generator(device=device).manual_seed(0)
            inputs = [
                tuple(
                    torch.randn(*s, generator=gen, device=device).to(dtype)
                    for s in ((m, n), (m, n), (n,))
                )
                for _ in range(sets)
            ]
            for op, ours, baselines, nbytes, err in _cases(shape, dtype, device, with_compile):
                if nbytes not in copies:
                    copies[nbytes] = CopyCase(nbytes // 2, device)
                copy = copies[nbytes]
                t_ours, *t_bases, t_copy = time_interleaved(
                    [(ours, inputs, reps)]
                    + [(fn, inputs, reps) for fn in baselines.values()]
                    + [copy.case(reps)],
                    device,
                )
                # (quick: the first 256 rows, each normalised on its own; the fp64 references
                # at 4096 x 4096 would take a third of a quick run)
                check = inputs[0]
                if quick:
                    check = (check[0][:256], check[1][:256], *check[2:])
                max_err = err(*check, ours(*check))
                gbps = nbytes / t_ours.median_s / 1e9
                for name, t_base in zip(baselines, t_bases, strict=True):
                    rows.append(
                        Row(
                            op,
                            f"{m}x{n}",
                            str(dtype).replace("torch.", ""),
                            backend,
                            t_ours.median_s * 1e6,
                            name,
                            t_base.median_s * 1e6,
                            gbps,
                            gbps * 1e9 / copy.bandwidth(t_copy),
                            max_err,
                        )
                    )
    return rows
