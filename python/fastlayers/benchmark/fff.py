# SPDX-License-Identifier: Apache-2.0
"""FFF benchmark: UltraFastFeedForward (UltraFastBERT 1x11 shape: width 768, depth 11, 4095 neurons,
12 visited per token) against a dense Linear-GELU-Linear of the same total width, a dense layer of
the *active* width (the compute floor), the PyTorch gather reference, torch.compile of it (full
runs), and, for the classic form, the ``fastfeedforward`` package when installed. Inference,
no grad.

GB/s counts the weight rows a token reads (``(depth+1) * (in + out)`` elements) plus x and y; the
fraction is against ``dst.copy_(src)`` of the same size in the same run (the rows come from cache
when the 4095-row table fits, so fractions above 1 are possible)."""

from __future__ import annotations

import functools

import torch

import fastlayers
from fastlayers import reference as ref
from fastlayers.benchmark import harness
from fastlayers.benchmark.harness import CopyCase, Row, backend_label, time_interleaved

WIDTH, DEPTH = 768, 11
QUICK_TOKENS = [1, 1024]
FULL_TOKENS = {"cpu": [1, 16, 128, 1024], "cuda": [1, 128, 1024, 16384]}
QUICK_DTYPES = [torch.float32]
FULL_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16]}


def _reference(module, x):
    return ref.ultrafast_ff(x, module.w_in, module.w_out)[0]


def _dense(width: int, dtype, device):
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, width), torch.nn.GELU(), torch.nn.Linear(width, WIDTH)
    ).to(device=device, dtype=dtype)


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    rows: list[Row] = []
    tokens_list = QUICK_TOKENS if quick else FULL_TOKENS[device.type]
    dtypes = QUICK_DTYPES if quick else FULL_DTYPES[device.type]
    backend = backend_label(device, "ultrafast_ff")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in dtypes:
        ufb = fastlayers.UltraFastFeedForward(WIDTH, WIDTH, DEPTH, device=device, dtype=dtype)
        ufb.eval()
        baselines = {
            "dense 4095 (Linear-GELU-Linear)": _dense(2 ** (DEPTH + 1) - 1, dtype, device),
            "dense 12 (active width: the floor)": _dense(DEPTH + 1, dtype, device),
            "PyTorch gather (reference)": functools.partial(_reference, ufb),
        }
        if not quick and harness.COMPILE_BASELINES:
            baselines["torch.compile(reference)"] = torch.compile(
                functools.partial(_reference, ufb), dynamic=False
            )
        b = torch.tensor([], dtype=dtype).element_size()
        for tokens in tokens_list:
            inputs = [
                (torch.randn(tokens, WIDTH, generator=gen).to(device=device, dtype=dtype),)
                for _ in range(4)
            ]
            nbytes = tokens * ((DEPTH + 1) * 2 * WIDTH + 2 * WIDTH) * b
            copy_ = CopyCase(max(nbytes // 2, 1 << 16), device)
            with torch.no_grad():
                t_ours, *t_bases, t_copy = time_interleaved(
                    [(ufb, inputs, reps)]
                    + [(fn, inputs, max(3, reps // 4)) for fn in baselines.values()]
                    + [copy_.case(reps)],
                    device,
                )
                copy_bw = copy_.bandwidth(t_copy)
                x0 = inputs[0][0]
                y = ufb(x0)
                y64 = ref.ultrafast_ff(x0.double(), ufb.w_in.double(), ufb.w_out.double())[0]
                err = (y.double() - y64).abs().max().item()
                gbps = nbytes / t_ours.median_s / 1e9
                for name, t_base in zip(baselines, t_bases, strict=True):
                    rows.append(
                        Row(
                            f"UltraFastFeedForward d{DEPTH}",
                            f"{tokens}x{WIDTH}",
                            str(dtype).replace("torch.", ""),
                            backend,
                            t_ours.median_s * 1e6,
                            name,
                            t_base.median_s * 1e6,
                            gbps,
                            gbps * 1e9 / copy_bw,
                            err,
                        )
                    )
    rows += _classic(device, quick, reps, backend)
    return rows


def _classic(device, quick, reps, backend) -> list[Row]:
    """FastFeedForward (width 768, depth 11, leaf width 1) eval vs the fastfeedforward package."""
    try:
        import fastfeedforward
    except ImportError:
        return []
    torch.manual_seed(0)
    pkg = fastfeedforward.FFF(WIDTH, 1, WIDTH, DEPTH, activation=torch.nn.GELU()).to(device).eval()
    ours = fastlayers.FastFeedForward.from_fastfeedforward(pkg).eval()
    rows = []
    for tokens in [1024] if quick else [1, 1024]:
        inputs = [(torch.randn(tokens, WIDTH, device=device),) for _ in range(2)]
        with torch.no_grad():
            t_ours, t_pkg = time_interleaved([(ours, inputs, reps), (pkg, inputs, 3)], device)
            # the package's hard-decision training form evaluates every leaf for every token
            # (17 s for 1024 tokens here): a quick run checks the first 128 tokens
            x0 = inputs[0][0][:128] if quick else inputs[0][0]
            pkg.train()
            expected = pkg.training_forward(x0, use_hard_decisions=True)
            pkg.eval()
            err = (ours(x0) - expected).abs().max().item()
        rows.append(
            Row(
                f"FastFeedForward d{DEPTH} w1",
                f"{tokens}x{WIDTH}",
                "float32",
                backend,
                t_ours.median_s * 1e6,
                "fastfeedforward 0.2.1 eval",
                t_pkg.median_s * 1e6,
                float("nan"),
                float("nan"),
                err,
            )
        )
    return rows
