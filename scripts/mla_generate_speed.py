# SPDX-License-Identifier: Apache-2.0
"""Generation speed of a DeepSeek V3-shaped model (8 layers, width 512, 16 heads, latent 256 + RoPE
part 32, random weights, fp32, batch 1, 32 new tokens) with fastlayers' INT4 latent cache
(``patch_model(kv_cache="int4_rope_aware")``: decode steps attend over the INT4 rows in place with
``kv_b_proj`` absorbed) against the float model with its own cache (which expands the whole cache
into heads every step). Median of 3 generates each, after a 64- and a 1024-token prompt. Results:
``bench/results/kv_int4/mla-latent-decode-amd-epyc.md``.

    OMP_NUM_THREADS=2 python scripts/mla_generate_speed.py
"""

import copy
import time

import torch
import transformers

import fastlayers
from fastlayers import quant

CONFIG = transformers.DeepseekV3Config(
    vocab_size=1000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=192,
    kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=8,
    max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _seconds(model, ids, cache_fn) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           **cache_fn())  # fmt: skip
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main() -> None:
    torch.manual_seed(0)
    for prompt in (64, 1024):
        ids = torch.randint(3, 1000, (1, prompt))
        # (a config object each: patching sets the attention implementation on the config)
        plain = transformers.DeepseekV3ForCausalLM(copy.deepcopy(CONFIG)).eval()
        t_float = _seconds(plain, ids, dict)
        model = transformers.DeepseekV3ForCausalLM(copy.deepcopy(CONFIG)).eval()
        model.load_state_dict(plain.state_dict())
        fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                               calibration=[torch.randint(3, 1000, (1, 64))])  # fmt: skip
        t_int4 = _seconds(model, ids, lambda m=model: {"cache": quant.Int4KVCache.for_model(m)})
        print(f"prompt {prompt}: float {32 / t_float:.1f} tok/s, INT4 latent "
              f"{32 / t_int4:.1f} tok/s ({t_float / t_int4:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
