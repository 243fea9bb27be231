# SPDX-License-Identifier: Apache-2.0
"""Layer-skip attention benchmark: one attention layer's core (softmax(QK^T)V) over the tokens a
Mixture-of-Depths router keeps (capacity 12.5 / 25 / 50 / 100 %, selected tokens attend among the
selected, causal by original positions) with ``fastlayers.varlen_attention``, against dense causal
``scaled_dot_product_attention`` over all tokens. Forward, no grad.

GFLOP/s (in the shape column) counts the allowed (query, key) pairs only: ``4 * d`` flops each
(QK^T and PV). Routing is done once outside the timed region (it is part of the router, not of
attention).

Training step, capacity 50 %: forward + backward (the gradients of q, k and v for a random
upstream gradient) against the same for dense causal SDPA over all tokens; GFLOP/s counts
``14 * d`` flops per allowed pair (``4 d`` forward: QK^T and PV; ``10 d`` backward: QK^T again,
dO V^T, dV, dK and dQ, FlashAttention's count).

Then whole-model decode of a small random-weight Hugging Face Llama (16 layers, width 512) with
``generate()`` under ``SkipPlan.uniform`` at 1.25x / 1.5x / 2x targets, against the same model
without a plan (needs ``transformers``).
"""

from __future__ import annotations

import torch

import fastlayers
from fastlayers.benchmark.harness import Row, backend_label, time_interleaved

CAPACITIES = [0.125, 0.25, 0.5, 1.0]
# (batch, tokens, heads, d); CUDA also Gemma 2 9B's 16 heads of 256
SHAPES = {"cpu": [(2, 2048, 16, 64)], "cuda": [(8, 4096, 32, 128), (4, 4096, 16, 256)]}
QUICK = {"cpu": [(1, 1024, 8, 64)], "cuda": [(2, 2048, 32, 128)]}


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _llama_rows(device, quick) -> list[Row]:
    """Whole-model decode speed of a small random-weight Llama under SkipPlan.uniform (full runs:
    generate() takes tens of seconds on a CPU)."""
    try:
        import transformers
    except ImportError:
        return []
    from fastlayers.skip_plan import SkipPlan, apply_skip_plan, remove_skip_plan

    torch.manual_seed(0)
    layers = 8 if quick else 16
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(device).eval()
    ids = torch.randint(1, 1000, (4, 64), device=device)
    new = 16 if quick else 32
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
              do_sample=False)  # fmt: skip

    def generate():
        return model.generate(ids, **kw)

    def generate_with(plan):
        # applying and removing a plan takes < 1 ms, next to the generate call's hundreds
        def run():
            apply_skip_plan(model, plan)
            try:
                return generate()
            finally:
                remove_skip_plan(model)

        return run

    rows = []
    targets = (1.25, 1.5, 2.0)
    plans = [SkipPlan.uniform(layers, target) for target in targets]
    with torch.no_grad():
        t_full, *t_plans = time_interleaved(
            [(generate, [()], 3)] + [(generate_with(plan), [()], 3) for plan in plans],
            device,
            warmup=1,
        )
        for target, plan, t in zip(targets, plans, t_plans, strict=True):
            tok_s = ids.shape[0] * new / t.median_s
            rows.append(
                Row(
                    f"Llama generate, SkipPlan.uniform({target}x)",
                    f"{layers} layers d512, batch 4, 64+{new} tokens ({tok_s:.0f} tok/s, "
                    f"{plan.cost_fraction():.2f} of sublayers)",
                    "float32",
                    "SkipPlan on Hugging Face layers",
                    t.median_s * 1e6,
                    "the same model, no plan",
                    t_full.median_s * 1e6,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                )
            )
    return rows


def _train_row(device, dtype, shape, rnd, gen, reps, backend) -> Row:
    """Forward + backward at capacity 50 % vs dense causal SDPA's, with the error of the routed
    dq, dk, dv against float64 autograd of the reference on the first sequence's first 256 routed
    tokens (a problem of its own)."""
    batch, tokens, heads, d = shape
    dense = [rnd(batch, heads, tokens, d).requires_grad_() for _ in range(3)]
    dy_dense = rnd(batch, heads, tokens, d)
    idx, cu = fastlayers.route_topk(torch.randn(batch, tokens, generator=gen).to(device), 0.5)
    n = idx.shape[0]
    pos = idx % tokens
    leaves = [rnd(n, heads, d).requires_grad_() for _ in range(3)]
    dy = rnd(n, heads, d)

    def dense_step(q, k, v, g):
        return torch.autograd.grad(_sdpa(q, k, v), (q, k, v), g)

    def routed_step(q, k, v, cu_, pos_, g):
        out = fastlayers.varlen_attention(q, k, v, cu_, cu_, pos_, pos_)
        return torch.autograd.grad(out, (q, k, v), g)

    t_dense, t_routed = time_interleaved(
        [(dense_step, [(*dense, dy_dense)], max(3, reps // 4)),
         (routed_step, [(*leaves, cu, pos, dy)], max(3, reps // 2))],
        device,
    )  # fmt: skip
    m = min(n // batch, 256)
    sub = torch.tensor([0, m], dtype=torch.int32, device=device)
    part = [t[:m].detach().clone().requires_grad_() for t in leaves]
    got = routed_step(*part, sub, pos[:m], dy[:m])
    part64 = [t.detach().double().requires_grad_() for t in part]
    out64 = fastlayers.reference.varlen_attention(*part64, sub, sub, pos[:m], pos[:m])
    want = torch.autograd.grad(out64, part64, dy[:m].double())
    err = max((a.double() - b).abs().max().item() for a, b in zip(got, want, strict=True))
    per_seq = n // batch
    pairs = batch * heads * per_seq * (per_seq + 1) / 2
    gflops = pairs * 14 * d / t_routed.median_s / 1e9
    return Row(
        "varlen_attention forward + backward, capacity 0.5",
        f"{batch}x{tokens} h{heads} d{d} ({n} routed, {gflops:.1f} GFLOP/s)",
        str(dtype).replace("torch.", ""),
        backend,
        t_routed.median_s * 1e6,
        "dense causal SDPA forward + backward, all tokens",
        t_dense.median_s * 1e6,
        float("nan"),
        float("nan"),
        err,
    )


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    rows: list[Row] = []
    backend = backend_label(device, "varlen_attention")
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtypes = [torch.float32] if quick or device.type == "cpu" else [torch.bfloat16]
    for dtype in dtypes:
        for batch, tokens, heads, d in (QUICK if quick else SHAPES)[device.type]:

            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

            dense = (rnd(batch, heads, tokens, d), rnd(batch, heads, tokens, d),
                     rnd(batch, heads, tokens, d))  # fmt: skip
            routed = []
            for capacity in CAPACITIES:
                scores = torch.randn(batch, tokens, generator=gen).to(device)
                idx, cu = fastlayers.route_topk(scores, capacity)
                n = idx.shape[0]
                pos = idx % tokens
                q, k, v = rnd(n, heads, d), rnd(n, heads, d), rnd(n, heads, d)
                routed.append((capacity, n, (q, k, v, cu, cu, pos, pos)))
            with torch.no_grad():
                t_dense, *t_routed = time_interleaved(
                    [(_sdpa, [dense], max(3, reps // 4))]
                    + [(fastlayers.varlen_attention, [args], reps) for _, _, args in routed],
                    device,
                )
            for (capacity, n, args), t in zip(routed, t_routed, strict=True):
                q, k, v, _, _, pos, _ = args
                with torch.no_grad():
                    # error against the float64 reference on the first sequence's 64 queries
                    out = fastlayers.varlen_attention(*args)
                    per_seq = n // batch
                    m = min(per_seq, 64)
                    sub = torch.tensor([0, m], dtype=torch.int32, device=device)
                    want = fastlayers.reference.varlen_attention(
                        q[:m].double(), k[:m].double(), v[:m].double(), sub, sub, pos[:m], pos[:m]
                    )
                    err = (out[:m].double() - want).abs().max().item() if m else 0.0
                pairs = batch * heads * per_seq * (per_seq + 1) / 2
                tflops = pairs * 4 * d / t.median_s / 1e12
                rows.append(
                    Row(
                        f"varlen_attention, capacity {capacity:.3g}",
                        f"{batch}x{tokens} h{heads} d{d} ({n} routed, {tflops * 1e3:.1f} GFLOP/s)",
                        str(dtype).replace("torch.", ""),
                        backend,
                        t.median_s * 1e6,
                        "dense causal SDPA, all tokens",
                        t_dense.median_s * 1e6,
                        float("nan"),  # compute-bound: GFLOP/s is in the shape column
                        float("nan"),
                        err,
                    )
                )
            if not quick:
                shape = (batch, tokens, heads, d)
                rows.append(_train_row(device, dtype, shape, rnd, gen, reps, backend))
    return rows if quick else rows + _llama_rows(device, quick)
