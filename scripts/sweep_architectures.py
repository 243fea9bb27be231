# SPDX-License-Identifier: Apache-2.0
"""Runs fastlayers' drop-in paths on every causal LM of the installed ``transformers``, each built
from its default config shrunk to a tiny random model (no download), and writes a table of what
happened: ``ok`` (compared with the unpatched model), ``refused`` (a ValueError / TypeError naming
what fastlayers does not support), ``CRASH`` (any other exception: a bug) or ``WRONG`` (ran, but
did not match: a bug).

    python scripts/sweep_architectures.py [--out bench/results/architectures.md] [model_type ...]

Checks per model (tolerances: float32 model, relative logit error):
  full    apply_skip_plan(SkipPlan.full) equals the model (1e-5)
  skip    the last layer's attention skipped equals the model with that attention answering zeros
  routed  the last layer's attention routed with every token and no gate equals the model (1e-4)
  gen     layer 0's attention routed (a random router) and the last layer's skipped: generate()
          with its own cache and with a LayerSkipCache scores every step as recomputing the whole
          sequence without a cache does (1e-3), and picks the same tokens
  rms     patch_model() (RMSNorm swaps) equals the model (1e-5)
  kv      the calibrated scalings with quantization off equal the model (1e-4), and
          patch_model(kv_cache="int4_rope_aware"): generate() with the INT4 cache equals generate()
          without a cache (the INT4 error itself, random weights, is printed)
  int4    patch_model(linear="int4_fp8") runs (its logit error, random weights, is printed)
  spec    self_speculative_generate equals greedy generate()
Models whose tiny config fails to build or run unpatched, or with more than 40M parameters
(multimodal towers), are listed as not built.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import traceback
import warnings

import torch

SMALL = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, moe_intermediate_size=64,
             num_experts=4, num_experts_per_tok=2, n_routed_experts=4, num_local_experts=4,
             first_k_dense_replace=0, n_group=1, topk_group=1)  # fmt: skip
# Multi-head latent attention (DeepSeek V2, ...): its head sizes (values of another size than the
# keys), RoPE on a 16-channel part, as many key/value heads as query heads.
MLA = dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=32,
           q_lora_rank=64, qk_head_dim=32, head_dim=16, num_key_value_heads=4)  # fmt: skip
# Hybrids whose default layer pattern has no softmax attention in the first layers, or Mamba
# sizes that do not follow the hidden size: one Mamba layer, then an attention layer.
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=64, mamba_d_state=16)
HYBRID = {
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], **_MAMBA),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_d_state=16),
    "bamba": dict(attn_layer_indices=[1], **_MAMBA),
}  # fmt: skip
CHECKS = ("full", "skip", "routed", "gen", "rms", "kv", "int4", "spec")


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout


def build(model_type: str):
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = AutoConfig.for_model(model_type)
    small = dict(SMALL)
    if hasattr(cfg, "qk_rope_head_dim"):
        small.update(MLA)
    if hasattr(cfg, "rotary_dim"):  # (GPT-J, CodeGen: RoPE on a part of each 32-channel head)
        small["rotary_dim"] = 16
    for key, value in small.items():
        if hasattr(cfg, key) or key == "head_dim":
            try:
                setattr(cfg, key, value)
            except Exception:  # noqa: BLE001 (a computed property: leave it)
                pass
    for key, value in HYBRID.get(model_type, {}).items():
        setattr(cfg, key, value)
    types = getattr(cfg, "layer_types", None)
    if types is not None:  # enough layers to hold one of each type (hybrids: an attention layer)
        types = list(types)
        n = max(SMALL["num_hidden_layers"], *(types.index(t) + 1 for t in set(types)))
        try:
            cfg.num_hidden_layers, cfg.layer_types = n, types[:n]
        except AttributeError:  # (a property computed from other settings: HYBRID)
            pass
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = 6
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > 4e7:
        raise RuntimeError(f"{n / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from their initial values, so that their placement matters
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _verdict(err: float, tol: float) -> str:
    return "ok" if err <= tol else f"WRONG (rel {err:.2g})"


class _ZeroAttention(torch.nn.Module):
    """Zeros, answered as an attention does (a tuple) or a linear attention (a tensor)."""

    def __init__(self, bare: bool = False):
        super().__init__()
        self.bare = bare

    def forward(self, hidden_states, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return zeros if self.bare else (zeros, None)


def run_checks(model_type: str) -> dict[str, str]:
    import fastlayers
    from fastlayers import quant
    from fastlayers._decoder import block_kind, decoder_layers, linear_mixer, mixer_name
    from fastlayers.skip_plan import LayerPlan, LayerSkipCache, SkipPlan, self_speculative_generate

    model = build(model_type)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)

    def layers():
        try:
            return len(decoder_layers(model))
        except TypeError:  # (not a decoder fastlayers reads: the path under test says so)
            return model.config.num_hidden_layers

    def full():
        planned = fastlayers.apply_skip_plan(build(model_type), SkipPlan.full(layers()))
        return _verdict(_rel(_logits(planned, ids), want), 1e-5)

    def last_mixer():  # (the last layer with an attention or linear mixer: not an MLP block)
        try:
            found = [i for i, x in enumerate(decoder_layers(model)) if block_kind(x) != "ffn"]
        except TypeError:
            found = []
        return found[-1] if found else layers() - 1

    def skip():
        n, i = layers(), last_mixer()
        plan = SkipPlan([LayerPlan("skip" if j == i else "full") for j in range(n)])
        planned = fastlayers.apply_skip_plan(build(model_type), plan)
        got = _logits(planned, ids)
        zeroed = build(model_type)
        last = decoder_layers(zeroed)[i]
        setattr(last, mixer_name(last), _ZeroAttention(bare=linear_mixer(last) is not None))
        return _verdict(_rel(got, _logits(zeroed, ids)), 1e-5)

    def attention_layers():  # (a hybrid's softmax attention layers; all layers elsewhere)
        try:
            found = [i for i, x in enumerate(decoder_layers(model)) if linear_mixer(x) is None]
        except TypeError:
            found = []
        return found or list(range(layers()))

    def routed():
        every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
        n, last = layers(), attention_layers()[-1]
        plan = SkipPlan([every if i == last else LayerPlan() for i in range(n)])
        planned = fastlayers.apply_skip_plan(build(model_type), plan)
        return _verdict(_rel(_logits(planned, ids), want), 1e-4)

    def gen():
        n, first = layers(), attention_layers()[0]
        plan = [LayerPlan("routed") if i == first else LayerPlan() for i in range(n)]
        if last_mixer() != first:  # (one layer: routed only)
            plan[last_mixer()] = LayerPlan("skip")
        planned = fastlayers.apply_skip_plan(build(model_type), SkipPlan(plan))
        with torch.no_grad():
            router = decoder_layers(planned)[first].fastlayers_router
            router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
            router.bias.zero_()
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
        hybrid = any(linear_mixer(layer) is not None for layer in decoder_layers(planned))
        skip_cache = LayerSkipCache(config=planned.config) if hybrid else LayerSkipCache()
        for cache in (None, skip_cache):
            with torch.no_grad():
                out = planned.generate(ids[:1], **kw, **({} if cache is None else {"cache": cache}))
                seq = ids[:1]
                for scores in out.scores:
                    logits = planned(seq, use_cache=False).logits[:, -1]
                    logits = logits.masked_fill(~torch.isfinite(scores), -math.inf)
                    if not torch.allclose(scores, logits, rtol=1e-3, atol=1e-3):
                        return f"WRONG ({'own' if cache is None else 'LayerSkipCache'} cache)"
                    seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            if not torch.equal(out.sequences, seq):
                return "WRONG (tokens)"
        return "ok"

    def rms():
        patched = build(model_type)
        report = fastlayers.patch_model(patched)
        verdict = _verdict(_rel(_logits(patched, ids), want), 1e-5)
        return f"{verdict} ({len(report.swapped)} swapped, {len(report.left)} left)"

    def kv():
        calib = [torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(2))]
        exact = build(model_type)  # the scalings and the INT4 attention, nothing quantized
        post = quant.calibrate_rope_aware_kv(exact, calib)
        quant.apply_rope_aware_kv(exact, post, q_fp8=False, quantize_keys=False,
                                  quantize_values=False)  # fmt: skip
        float_err = _rel(_logits(exact, ids), want)
        if float_err > 1e-4:
            return f"WRONG (not the float model with quantization off: {float_err:.2g})"
        patched = build(model_type)
        fastlayers.patch_model(patched, rms_norm=False, kv_cache="int4_rope_aware",
                               calibration=calib)  # fmt: skip
        kw = dict(max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
        with torch.no_grad():
            a = patched.generate(ids, cache=quant.Int4KVCache.for_model(patched), **kw)
            b = patched.generate(ids, use_cache=False, **kw)
        same = torch.equal(a.sequences, b.sequences) and all(
            torch.allclose(x, y, rtol=1e-3, atol=1e-3)
            for x, y in zip(a.scores, b.scores, strict=True)
        )
        err = _rel(_logits(patched, ids), want)
        return ("ok" if same else "WRONG (cache)") + f" (INT4 logit error {err:.2g})"

    def int4():
        patched = build(model_type)
        report = fastlayers.patch_model(patched, rms_norm=False, linear="int4_fp8")
        err = _rel(_logits(patched, ids), want)
        swapped = f"{len(report.swapped)} swapped"
        return f"ok ({swapped}, logit error {err:.2g})" if err == err else "WRONG (NaN)"

    def spec():
        got, _ = self_speculative_generate(model, ids[:1], 1, 6, num_draft=2)
        try:
            with torch.no_grad():
                greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False,
                                        eos_token_id=None)  # fmt: skip
        except Exception as e:  # noqa: BLE001 (the unpatched model's own generate())
            return f"not compared (generate() of the model itself: {type(e).__name__})"
        return "ok" if torch.equal(got, greedy) else "WRONG (tokens)"

    results = {}
    for name, check in zip(CHECKS, (full, skip, routed, gen, rms, kv, int4, spec), strict=True):
        signal.alarm(120)
        try:
            results[name] = check()
        except (TypeError, ValueError) as e:  # (a refusal is raised by fastlayers itself)
            where = traceback.extract_tb(e.__traceback__)[-1]
            said = "refused" if "fastlayers" in where.filename else "CRASH"
            results[name] = f"{said}: {type(e).__name__}: {e}" + (
                "" if said == "refused" else f" ({where.name})"
            )
        except _Timeout:
            results[name] = "CRASH: timed out (120 s)"
        except Exception as e:  # noqa: BLE001 (what the sweep is for)
            where = traceback.extract_tb(e.__traceback__)[-1]
            results[name] = f"CRASH: {type(e).__name__}: {e} ({where.name})"
        finally:
            signal.alarm(0)
    return results


def _cell(text: str) -> str:
    short = text.split(":")[0] if text.startswith(("refused", "CRASH")) else text
    return short.replace("|", "/")


def main() -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model types (default: every causal LM)")
    parser.add_argument("--out", default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    results, not_built = {}, {}
    for model_type in args.models or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        signal.alarm(120)
        try:
            results[model_type] = run_checks(model_type)
        except Exception as e:  # noqa: BLE001 (the unpatched tiny model did not build or run)
            not_built[model_type] = f"{type(e).__name__}: {str(e)[:100]}"
        finally:
            signal.alarm(0)
        line = results.get(model_type) or {"not built": not_built.get(model_type)}
        print(model_type, json.dumps(line), flush=True)
    bad = {
        m: r
        for m, r in results.items()
        if any(v.startswith(("CRASH", "WRONG")) for v in r.values())
    }
    lines = [
        f"# Drop-in sweep over transformers {transformers.__version__}'s causal LMs",
        "",
        f"`python scripts/sweep_architectures.py` (fastlayers {_version()}; what each column "
        "checks: the script's docstring). `refused` is a ValueError / TypeError naming what is "
        "not supported; `CRASH` and `WRONG` are bugs.",
        "",
        f"{len(results)} models built, {len(not_built)} not built; "
        f"{len(bad)} with a CRASH or WRONG: {', '.join(sorted(bad)) or 'none'}.",
        "",
        "Per check, models that pass / are refused: "
        + "; ".join(
            f"{c} {sum(r[c].startswith('ok') for r in results.values())}"
            f" / {sum(r[c].startswith('refused') for r in results.values())}"
            for c in CHECKS
        )
        + ".",
        "",
        "| model | " + " | ".join(CHECKS) + " |",
        "|---" * (len(CHECKS) + 1) + "|",
    ]
    for model_type, r in results.items():
        lines.append(f"| {model_type} | " + " | ".join(_cell(r[c]) for c in CHECKS) + " |")
    lines += ["", "## Refusals and failures, in full", ""]
    for model_type, r in results.items():
        for c in CHECKS:
            if not r[c].startswith("ok"):
                lines.append(f"- {model_type} / {c}: {r[c]}")
    lines += ["", "## Not built (the tiny config does not build or run unpatched)", ""]
    lines += [f"- {m}: {why}" for m, why in not_built.items()]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 1 if bad else 0


def _version() -> str:
    import fastlayers

    return fastlayers.__version__


if __name__ == "__main__":
    sys.exit(main())
