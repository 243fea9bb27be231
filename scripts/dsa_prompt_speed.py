# SPDX-License-Identifier: Apache-2.0
"""Prompt time of a DeepSeek V3.2-shaped model (4 layers, width 512, 16 heads, latent 256 + RoPE
part 32, a DSA indexer of 8 heads x 64 channels, random weights, fp32, batch 1) into an
``Int4KVCache``: each query attending over the INT4 rows its indexer picked, gathered
(``_picked_rows``, ``latent_rows_attention``: O(queries x top-k)), against the path taken
before, which expands the cached rows into every head's keys and values and masks the keys the
indexer did not pick (eager attention: O(T^2) scores per head; forced here by switching the
absorption off). Both timed in one process, interleaved, best of 2. Results:
``bench/results/kv_int4/mla-latent-decode-amd-epyc.md``.

    OMP_NUM_THREADS=2 python scripts/dsa_prompt_speed.py [tokens top-k [layers]]
"""

import copy
import sys
import time

import torch
import transformers

import fastlayers
from fastlayers import quant
from fastlayers.quant import rope_kv_hf


def main() -> None:
    tokens, topk = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else (1024, 256)))
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    config = transformers.DeepseekV32Config(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=192,
        kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=8,
        index_topk=topk, index_head_dim=64, index_n_heads=8, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(copy.deepcopy(config)).eval()
    fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 1000, (1, 64))])  # fmt: skip
    ids = torch.randint(3, 1000, (1, tokens))
    absorbable = rope_kv_hf._absorbable
    best, logits = {}, {}
    for _ in range(2):
        for gathered in (True, False):
            rope_kv_hf._absorbable = absorbable if gathered else (lambda module, query: None)
            start = time.perf_counter()
            with torch.no_grad():
                logits[gathered] = model(ids, cache=quant.Int4KVCache.for_model(model)).logits
            took = time.perf_counter() - start
            best[gathered] = min(best.get(gathered, took), took)
    rope_kv_hf._absorbable = absorbable
    diff = (logits[True] - logits[False]).norm() / logits[False].norm()
    print(f"{tokens} tokens, top-{topk}, {layers} layers: gathered {best[True]:.2f} s, expanded "
          f"{best[False]:.2f} s ({best[False] / best[True]:.2f}x); relative logit difference "
          f"{diff.item():.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
