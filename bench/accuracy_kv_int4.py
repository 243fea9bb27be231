#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""RoPE-aware INT4 KV accuracy: logits error of a Llama-architecture model (random weights from a
config, Llama RoPE settings, with outlier key channel pairs injected into k_proj as trained models
have them) with INT4 keys/values and FP8 queries, with and without FireQ's pre-/post-RoPE scalings;
each quantization also alone, to show where the error comes from.

    python bench/accuracy_kv_int4.py [--out bench/results/kv_int4]
"""

import argparse
import copy
import datetime
from pathlib import Path

import torch
import transformers

import fastlayers
from fastlayers import quant
from fastlayers.benchmark.report import git_commit


def model_with_outliers(layers=4, hidden=512, heads=8, kv_heads=2, factor=15.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=0, rope_theta=500000.0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = hidden // heads
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            for h in range(kv_heads):
                for c in (3, 11):
                    w[h * d + c] *= factor
                    w[h * d + c + d // 2] *= factor
    return model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent / "results" / "kv_int4"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    model = model_with_outliers()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (4, 256), generator=gen)
    calib = [torch.randint(1, 1000, (4, 256), generator=gen) for _ in range(4)]
    ref = model(ids).logits
    scaled = copy.deepcopy(model)
    post = quant.calibrate_rope_aware_kv(scaled, calib)

    def err(m):
        out = m(ids).logits
        return ((out - ref).norm() / ref.norm()).item()

    rows = []
    for label, kw in (
        ("keys INT4 only", dict(quantize_values=False, q_fp8=False)),
        ("values INT4 only", dict(quantize_keys=False, q_fp8=False)),
        ("queries FP8 only", dict(quantize_keys=False, quantize_values=False)),
        ("all (INT4 K/V, FP8 Q)", {}),
    ):
        plain = quant.apply_rope_aware_kv(copy.deepcopy(model), None, **kw)
        fireq = quant.apply_rope_aware_kv(copy.deepcopy(scaled), post, **kw)
        rows.append((label, err(plain), err(fireq)))
    lines = [
        "# RoPE-aware INT4 KV: relative logits error vs the float32 model",
        "",
        f"fastlayers {fastlayers.__version__}, commit {git_commit()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {datetime.date.today()}. Llama architecture, "
        "4 layers, width 512, 8 heads / 2 KV heads, head dim 64, rope_theta 5e5, random weights "
        "with two key channel pairs per KV head scaled 15x (outliers); 4 x 256 tokens; scales "
        "from 4 other batches (alpha = beta = 8, top-8 post-RoPE channels); KV group = head dim.",
        "",
        "| quantized | no scaling | FireQ pre- + post-RoPE scaling | error removed |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {a:.4f} | {b:.4f} | {1 - b / a:.0%} |" for label, a, b in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy-llama-outliers.md").write_text(text)


if __name__ == "__main__":
    main()
