# SPDX-License-Identifier: Apache-2.0
"""FireQ RoPE-aware INT4 KV: the scalings keep Q K^T exact, the INT4 KV format, the Hugging Face
integration (Int4KVCache in generate(), crop, reorder) and the key error the scalings remove."""

import copy
import math

import pytest
import torch

from _emu import launches_since
from _tolerances import opcheck_with_fp8_inputs, rand
from fastlayers import quant
from fastlayers.ops.kvint4 import (
    _attention_reference,
    _reference,
    int4_kv_attention,
    int4_kv_decode,
)

transformers = pytest.importorskip("transformers")


def test_scales_commute_with_rope_and_keep_qk():
    k = rand(50, 2, 16, dtype=torch.float32, device="cpu")
    k[:, 0, 3] *= 20
    for pairing in ("half", "interleaved"):
        n = quant.compute_pre_rope_scales(k, 8.0, pairing)
        partner = (torch.arange(16) + 8) % 16 if pairing == "half" else torch.arange(16) ^ 1
        assert torch.equal(n, n[:, partner])  # equal within each rotation pair
        s = quant.compute_post_rope_scales(k, 8.0, top_k=2, pairing=pairing)
        chosen = s != 1
        assert torch.equal(chosen, chosen[:, partner]) and int(chosen[0].sum()) in (2, 4)
    q_proj, k_proj = torch.nn.Linear(32, 4 * 16), torch.nn.Linear(32, 2 * 16)
    x = rand(7, 32, dtype=torch.float32, device="cpu")

    def qk():  # query heads 0 and 1 (kv head 0's group) against kv head 0
        return q_proj(x).view(7, 4, 16)[:, [0, 1]] @ k_proj(x).view(7, 2, 16)[:, 0].t()[None]

    want = qk()
    quant.fold_pre_rope(q_proj, k_proj, quant.compute_pre_rope_scales(k))
    got = qk()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", ["concat", "per_head", "conv1d"])
def test_fold_on_the_rows_of_a_fused_qkv_projection(fused):
    """A fused projection (Phi-3's ``[q | k | v]`` rows, Persimmon's heads of ``[q, k, v]``, GPT-2's
    ``Conv1D`` ``c_attn``: ``x @ W + b`` with ``W [in, out]``, its columns the output rows): the
    fold scales the key rows by n and the query rows by 1/n (bias too), ``Q K^T`` is unchanged and
    the value rows are left as they were."""
    from fastlayers._decoder import QKVProjections

    heads, kv_heads, d = (4, 2, 16) if fused == "concat" else (2, 2, 16)
    if fused == "conv1d":
        lin = pytest.importorskip("transformers").pytorch_utils.Conv1D(3 * heads * d, 32)
        torch.nn.init.normal_(lin.bias)
    else:
        lin = torch.nn.Linear(32, (heads + 2 * kv_heads) * d)
    by_row = (lambda w: w.t()) if fused == "conv1d" else (lambda w: w)  # noqa: E731
    qkv = QKVProjections(lin, lin, lin, "concat" if fused == "conv1d" else fused, heads,
                         kv_heads, d)  # fmt: skip
    x = rand(7, 32, dtype=torch.float32, device="cpu")
    k = rand(50, kv_heads, d, dtype=torch.float32, device="cpu")
    k[:, 0, 3] *= 20

    def scores():
        q, kk, v, gate = qkv.project(x)
        assert gate is None
        q, kk = q.view(7, heads, d), kk.view(7, kv_heads, d).repeat_interleave(heads // kv_heads, 1)
        return torch.einsum("thd,shd->hts", q, kk), v

    want, v_before = scores()
    n = quant.compute_pre_rope_scales(k)
    assert not torch.allclose(n, torch.ones_like(n))
    weight = by_row(lin.weight.detach().clone())
    quant.fold_pre_rope(lin, lin, n, q_rows=qkv.rows("q"), k_rows=qkv.rows("k"))
    got, v_after = scores()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_after, v_before)
    k_rows, rows = qkv.rows("k"), by_row(lin.weight).shape[0]
    torch.testing.assert_close(by_row(lin.weight)[k_rows], weight[k_rows] * n.reshape(-1, 1))
    with pytest.raises(ValueError, match="k_rows must index rows of a layer of"):
        quant.fold_pre_rope(lin, lin, n, k_rows=k_rows + rows)
    with pytest.raises(TypeError, match="q_rows must be a 1-D int64 tensor"):
        quant.fold_pre_rope(lin, lin, n, q_rows=[0, 1])
    with pytest.raises(ValueError, match="does not fit the 32 key rows"):
        quant.fold_pre_rope(lin, lin, torch.ones(3, d), k_rows=k_rows)
    with pytest.raises(TypeError, match="torch.nn.Linear or a transformers Conv1D"):
        quant.fold_pre_rope(torch.nn.Conv1d(2, 2, 1), lin, n)


def test_scales_with_partial_rope():
    """With ``rotary_dim`` < head_dim (StableLM, GLM), pairs are formed among the rotated channels
    only; a channel past them is its own pair (``alpha / max |k_c|``, not over sqrt(2) |k_c|), and
    only partners among the rotated channels join a post-RoPE pick. The pre-RoPE scale then
    commutes with the partial rotation."""
    k = rand(40, 2, 16, dtype=torch.float32, device="cpu")
    k[:, 1, 13] *= 30  # an outlier past the rotated channels
    partners = {"half": [4, 5, 6, 7, 0, 1, 2, 3], "interleaved": [1, 0, 3, 2, 5, 4, 7, 6]}
    for pairing, partner in partners.items():
        n = quant.compute_pre_rope_scales(k, 8.0, pairing, rotary_dim=8)
        assert torch.equal(n[:, :8], n[:, partner])
        torch.testing.assert_close(n[:, 8:], 8.0 / k[..., 8:].abs().amax(0), rtol=1e-6, atol=0)
        s = quant.compute_post_rope_scales(k, 8.0, top_k=1, pairing=pairing, rotary_dim=8)
        assert int((s[1] != 1).sum()) == 1 and s[1, 13] != 1  # no partner for channel 13
        angle = torch.rand(40, 4) * 6  # RoPE of the first 8 channels, in the pairing's layout
        half = pairing == "half"
        angle = torch.cat([angle, angle], -1) if half else angle.repeat_interleave(2, -1)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]

        def rope(x, cos=cos, sin=sin, pairing=pairing):
            r = x[..., :8] * cos + quant.rotate_pairs(x[..., :8], pairing) * sin
            return torch.cat([r, x[..., 8:]], -1)

        torch.testing.assert_close(rope(k * n) / n, rope(k), rtol=1e-5, atol=1e-6)
    for bad in (0, 3, 18):
        with pytest.raises(ValueError, match="rotary_dim must be even and in"):
            quant.compute_pre_rope_scales(k, rotary_dim=bad)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotate_pairs_every_float_dtype(pairing):
    """rotate_pairs is exact in every float dtype, FP8 included (torch negates no FP8 tensor:
    it goes through fp32, which loses nothing)."""
    x = torch.randn(3, 5, 16) * 4
    want = quant.rotate_pairs(x.double(), pairing)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        got = quant.rotate_pairs(x.to(dtype), pairing)
        assert got.dtype == dtype
        assert torch.equal(got.double(), quant.rotate_pairs(x.to(dtype).double(), pairing))
    x = x.double()
    if pairing == "half":  # [-x2, x1]
        assert torch.equal(want, torch.cat([-x[..., 8:], x[..., :8]], -1))
    else:  # each pair (a, b) -> (-b, a)
        assert torch.equal(want[..., 0::2], -x[..., 1::2])
        assert torch.equal(want[..., 1::2], x[..., 0::2])


def test_kv_int4_round_trip():
    x = rand(2, 3, 9, 64, dtype=torch.bfloat16, device="cpu")
    packed, scales = quant.quantize_kv_int4(x, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 9, 32)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (2, 3, 9, 2)
    back = quant.dequantize_kv_int4(packed, scales)
    step = x.float().reshape(2, 3, 9, 2, 32).abs().amax(-1, keepdim=True) / 7
    err = (back - x.float()).reshape(2, 3, 9, 2, 32).abs()
    assert bool((err <= 0.5 * step * 1.07 + 1e-6).all())  # half a step (+ the FP8 scale rounding)


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier key channel pairs, as trained models have
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            for h in range(2):
                for c in (3, 7):
                    w[h * 32 + c] *= 15
                    w[h * 32 + c + 16] *= 15
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_scalings_keep_the_float_model_and_reduce_key_error():
    model = _model()
    ids = torch.randint(1, 256, (2, 64))
    calib = [torch.randint(1, 256, (2, 64)) for _ in range(3)]
    ref = model(ids).logits
    scaled = copy.deepcopy(model)
    post = quant.calibrate_rope_aware_kv(scaled, calib)
    assert _rel(scaled(ids).logits, ref) < 1e-5  # pre-RoPE folding is exact in float
    quant.apply_rope_aware_kv(scaled, post, q_fp8=False, quantize_keys=False,
                              quantize_values=False)  # fmt: skip
    assert _rel(scaled(ids).logits, ref) < 1e-5  # so is the post-RoPE scale pair
    # keys in INT4 (values and queries exact): the scalings remove much of the error
    plain = copy.deepcopy(model)
    quant.apply_rope_aware_kv(plain, None, quantize_values=False, q_fp8=False)
    quant.apply_rope_aware_kv(scaled, post, quantize_values=False, q_fp8=False)
    e_plain, e_scaled = _rel(plain(ids).logits, ref), _rel(scaled(ids).logits, ref)
    assert e_scaled < 0.8 * e_plain, (e_scaled, e_plain)


@torch.no_grad()
def test_int4_cache_in_generate_crop_and_reorder():
    model = _model()
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(1, 256, (1, 48))])
    quant.apply_rope_aware_kv(model, post)
    ids = torch.randint(1, 256, (1, 20))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    cache = quant.Int4KVCache.for_model(model)
    with_cache = model.generate(ids, cache=cache, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.scores, without.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    t = 20 + 8 - 1
    assert layer.kq.dtype == torch.uint8 and layer.kq.shape == (1, 2, t, 16)
    dense = 2 * 3 * 2 * t * 32 * 4  # K and V, 3 layers, fp32
    assert cache.nbytes() < dense / 6
    cache.crop(-5)
    assert cache.get_seq_length() == t - 5
    before = layer.kq.clone()
    cache.reorder_cache(torch.tensor([0]))
    assert torch.equal(layer.kq, before)
    quant.remove_rope_aware_kv(model)
    assert model.config._attn_implementation != "fastlayers_int4kv"


def test_a_new_cache_does_not_run_the_modules_again():
    """apply_rope_aware_kv and Int4KVCache.for_model check each attention module by running it
    (attention_mismatch), with RoPE tables and without (a model may give some layers none).
    Llama's module cannot run without, and that failed check ran again for every new cache (2 ms
    a layer of the demo's model, each generate). Both outcomes are remembered: each module runs
    twice in all, a new cache runs none, and it decodes as the first."""
    model = _model()
    runs = []  # (the probe's runs: it gives the module the answer its attention returns)
    hooks = [layer.self_attn.register_forward_pre_hook(
                 lambda m, a, k: runs.append(m) if "_fl_probe_answer" in m.__dict__ else None,
                 with_kwargs=True)
             for layer in model.model.layers]  # fmt: skip
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(1, 256, (1, 32))])
    try:
        quant.apply_rope_aware_kv(model, post)
        first = quant.Int4KVCache.for_model(model)
        for layer in model.model.layers:
            assert sum(m is layer.self_attn for m in runs) == 2
        del runs[:]
        second = quant.Int4KVCache.for_model(model)
        assert runs == []
    finally:
        for h in hooks:
            h.remove()
    ids = torch.randint(1, 256, (1, 12))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, cache=first, **kw),
                           model.generate(ids, cache=second, **kw))  # fmt: skip


def test_a_model_sharing_its_config_with_a_patched_one_is_refused():
    """apply_rope_aware_kv sets the attention implementation on the config object: a second model
    built from the same config then runs the INT4 attention without its settings (no scales, no
    group); it is refused by name instead of quantizing with defaults."""
    cfg = _model().config
    patched, other = (transformers.LlamaForCausalLM(cfg).eval() for _ in range(2))
    quant.apply_rope_aware_kv(patched)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        patched(ids)
        with pytest.raises(ValueError, match="without apply_rope_aware_kv's settings"):
            other(ids)


DECODE_SHAPES = [(2, 8, 2, 128, 128, 300), (1, 4, 4, 64, 32, 17), (3, 6, 3, 40, 8, 50)]


@pytest.mark.parametrize("b,hq,hkv,d,group,t", DECODE_SHAPES)
def test_int4_kv_decode_matches_reference(device, b, hq, hkv, d, group, t):
    from fastlayers.ops.kvint4 import _reference, int4_kv_decode

    q = rand(b, hq, d, dtype=torch.bfloat16, device=device)
    k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=device), group)
    v, vs = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=device), group)
    for length in (t, t - 3, 1):
        out, lse = int4_kv_decode(q, k, ks, v, vs, length)
        ref, ref_lse = _reference(q.double(), k, ks, v, vs, length, d**-0.5)
        assert out.dtype == q.dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
    out, lse = int4_kv_decode(q, k, ks, v, vs, 0)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("b,hq,hkv,d,group,t", DECODE_SHAPES)
def test_int4_kv_decode_starts_skip_left_padding(device, b, hq, hkv, d, group, t):
    """starts[b]: row b attends to the cached tokens starts[b] .. length - 1 only: the same as
    decoding that row over a cache that begins at starts[b] (and the reference); a row that sees
    no token gets zeros and lse -inf; the skipped tokens are not read (NaN scales there change
    nothing)."""
    from fastlayers.ops.kvint4 import _reference, int4_kv_decode

    q = rand(b, hq, d, dtype=torch.bfloat16, device=device)
    k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=device), group)
    v, vs = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=device), group)
    length = t - 2
    for first in ([0, length, 5][:b], [length - 1, 1, 7][:b], [3] * b):
        starts = torch.tensor(first, dtype=torch.int32, device=device)
        kp, vp, ksp, vsp = k.clone(), v.clone(), ks.clone(), vs.clone()
        for i, s0 in enumerate(first):  # poison the skipped tokens' scales
            ksp[i, :, :s0] = float("nan")
            vsp[i, :, :s0] = float("nan")
        out, lse = int4_kv_decode(q, kp, ksp, vp, vsp, length, starts=starts)
        ref, ref_lse = _reference(q.double(), k, ks, v, vs, length, d**-0.5, starts)
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
        for i, s0 in enumerate(first):
            if s0 == length:
                assert bool((out[i] == 0).all()) and bool(torch.isneginf(lse[i]).all())
                continue
            one, one_lse = int4_kv_decode(q[i : i + 1], k[i : i + 1, :, s0:], ks[i : i + 1, :, s0:],
                                          v[i : i + 1, :, s0:], vs[i : i + 1, :, s0:],
                                          length - s0)  # fmt: skip
            torch.testing.assert_close(out[i : i + 1], one, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(lse[i : i + 1], one_lse, rtol=1e-5, atol=1e-5)
    starts = torch.zeros(b, dtype=torch.int32, device=device)  # no padding: the plain decode
    got = int4_kv_decode(q, k, ks, v, vs, length, starts=starts)
    want = int4_kv_decode(q, k, ks, v, vs, length)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "hq,hkv,d,dv,group",
    [(4, 2, 40, 40, 8), (8, 2, 128, 128, 16), (16, 1, 576, 512, 64)],
)
def test_int4_kv_decode_num_splits(device, hq, hkv, d, dv, group):
    """``num_splits`` (FlashAttention's knob): the CUDA decode splits the cached tokens into that
    many CTAs' ranges, clamped to 64 and to the length (the workspace it asks for says so), with
    the float64 reference's result for 1 (no split), 3, 7 (ranges of 43 of 300 tokens: the last
    split short), 64 (5 tokens each: the last 4 splits empty) and 1000 (clamped), and at 5 cached
    tokens for 64 (one token per split); left padding of 37 tokens in batch row 1 (splits inside
    the padding empty). The CUDA-core decode (d 40), the tensor-core one (128) and the latent one
    (576 / 512). The CPU kernel ignores it: the same bits as without."""
    from fastlayers import _ext
    from fastlayers.ops import kvint4 as kv_ops
    from fastlayers.ops.kvint4 import int4_kv_decode

    b, t = 2, 307
    torch.manual_seed(d + hq)
    if d == 576:
        k, ks, v, vs = _values_in_key_rows(b, hkv, t, d, dv, group, device)
    else:
        k, ks, v, vs = _cache_with_values(hkv, t, d, dv, group, device)
    q = rand(b, hq, d, dtype=torch.float32, device=device)
    starts = torch.tensor([0, 37], dtype=torch.int32, device=device)
    cuda = kv_ops.on_cuda(q.device)  # (a GPU, or the emulation: the ops' CUDA path)
    for length, splits in ((300, 1), (300, 3), (300, 7), (300, 64), (300, 1000), (5, 64)):
        st = starts if length == 300 else None
        out, lse = int4_kv_decode(q, k, ks, v, vs, length, starts=st, num_splits=splits)
        if not cuda:  # (CPU: ignored)
            want = int4_kv_decode(q, k, ks, v, vs, length, starts=st)
            assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
            continue
        ref, ref_lse = _reference(
            q.double(), k, ks, v.contiguous(), vs.contiguous(), length, d**-0.5, st
        )
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        used = min(splits, 64, length)
        floats = _ext.C.int4_kv_decode_cuda_workspace(b, hq, hkv, d, length, dv, splits)
        assert floats == b * hq * used * (dv + 1), (length, splits, floats)
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        int4_kv_decode(q, k, ks, v, vs, 300, num_splits=-1)
    with pytest.raises(TypeError, match="num_splits must be an int"):
        int4_kv_decode(q, k, ks, v, vs, 300, num_splits=2.0)


def test_int4_kv_decode_bad_starts_and_opcheck():
    from fastlayers.ops.kvint4 import int4_kv_decode

    q = rand(2, 4, 64, dtype=torch.float32, device="cpu")
    k, ks = quant.quantize_kv_int4(rand(2, 2, 40, 64, dtype=torch.float32, device="cpu"), 32)
    v, vs = quant.quantize_kv_int4(rand(2, 2, 40, 64, dtype=torch.float32, device="cpu"), 32)
    good = torch.tensor([0, 30], dtype=torch.int32)
    for bad, match in (
        (good.long(), "int32"), (good[:1], "int32 \\[2\\]"), ([0, 3], "torch.Tensor"),
        (torch.tensor([0, 34], dtype=torch.int32), "lie in \\[0, 33\\]"),
        (torch.tensor([-1, 3], dtype=torch.int32), "lie in"),
    ):  # fmt: skip
        error = TypeError if isinstance(bad, list) else ValueError
        with pytest.raises(error, match=match):
            int4_kv_decode(q, k, ks, v, vs, 33, starts=bad)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_decode,
                            (q, k, ks, v, vs, 33, 0.125, good))  # fmt: skip


def test_int4_kv_decode_every_cpu_isa_bad_input_and_opcheck(cpu_isa):
    from fastlayers.ops.kvint4 import _reference, int4_kv_decode

    q = rand(2, 4, 64, dtype=torch.float32, device="cpu")
    k, ks = quant.quantize_kv_int4(rand(2, 2, 40, 64, dtype=torch.float32, device="cpu"), 32)
    v, vs = quant.quantize_kv_int4(rand(2, 2, 40, 64, dtype=torch.float32, device="cpu"), 32)
    out, lse = int4_kv_decode(q, k, ks, v, vs)
    ref, ref_lse = _reference(q.double(), k, ks, v, vs, 40, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        int4_kv_decode(q[:, :3], k, ks, v, vs)
    with pytest.raises(ValueError, match="length"):
        int4_kv_decode(q, k, ks, v, vs, 41)
    with pytest.raises(ValueError, match="k_scale"):
        int4_kv_decode(q, k, ks.float(), v, vs)
    # values quantized with another group size than the keys (the kernels take one; the mismatch
    # read past v_scale, found by AddressSanitizer)
    v16, vs16 = quant.quantize_kv_int4(rand(2, 2, 40, 64, dtype=torch.float32, device="cpu"), 16)
    with pytest.raises(ValueError, match="one quantization group"):
        int4_kv_decode(q, k, ks, v16, vs16)
    with pytest.raises(ValueError, match="one quantization group"):
        int4_kv_decode(q, k, ks, v, vs[..., :1])
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_decode, (q, k, ks, v, vs, 33, 0.125))


def _record_decode_kernel_calls(monkeypatch, record) -> None:
    """Calls ``record(starts)`` for each decode step of the HF integration that runs the INT4
    decode kernel: on CPU through ``decode_step_direct`` (when it does not hand back to the ops),
    elsewhere through the ``int4_kv_decode`` op."""
    from fastlayers.quant import rope_kv_hf

    real_direct, real_op = rope_kv_hf.decode_step_direct, rope_kv_hf.int4_kv_decode

    def direct(*args, **kwargs):
        out = real_direct(*args, **kwargs)
        if out is not None:
            record(args[6] if len(args) > 6 else kwargs.get("starts"))
        return out

    def op(*args, **kwargs):
        record(args[7] if len(args) > 7 else kwargs.get("starts"))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(rope_kv_hf, "decode_step_direct", direct)
    monkeypatch.setattr(rope_kv_hf, "int4_kv_decode", op)


@torch.no_grad()
def test_generate_decode_steps_use_the_int4_kernel(monkeypatch):
    calls = []
    _record_decode_kernel_calls(monkeypatch, lambda starts: calls.append(1))
    model = quant.apply_rope_aware_kv(_model())
    ids = torch.randint(1, 256, (1, 12))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   cache=quant.Int4KVCache.for_model(model))  # fmt: skip
    assert len(calls) == 3 * 3  # 3 decode steps x 3 layers (the prefill takes the general path)


@torch.no_grad()
def test_left_padded_batch_decodes_with_the_int4_kernel(monkeypatch):
    """A left-padded batch: each decode step runs the INT4 kernel with the rows' padding lengths
    as starts (the padding is skipped, not dequantized), and generates what the same model does
    without a cache (quantized in the attention, the mask applied by eager attention)."""
    starts_seen = []
    _record_decode_kernel_calls(monkeypatch, starts_seen.append)
    model = _model()
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(1, 256, (1, 48))])
    quant.apply_rope_aware_kv(model, post)
    ids = torch.randint(1, 256, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding of 5, 0 and 2 tokens
    mask[2, :2] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with_cache = model.generate(ids, cache=quant.Int4KVCache.for_model(model), **kw)
    assert len(starts_seen) == 4 * 3  # 4 decode steps x 3 layers, every one on the kernel
    assert all(s is not None and s.tolist() == [5, 0, 2] for s in starts_seen)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.scores, without.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_left_padding_reads_only_prefix_masks():
    from fastlayers.quant.rope_kv_hf import _left_padding

    neg = torch.finfo(torch.float32).min
    m = torch.zeros(2, 1, 1, 6)
    assert _left_padding(None, 2, 6) is None and _left_padding(m, 2, 6) is None
    m[0, ..., :3] = neg
    assert _left_padding(m, 2, 6).tolist() == [3, 0]
    assert _left_padding(m[:1], 4, 6).tolist() == [3, 3, 3, 3]  # one row broadcast over the batch
    assert _left_padding(m > neg / 2, 2, 6).tolist() == [3, 0]  # boolean, True = attend
    m[1, ..., 4] = neg  # a hole: not left padding
    assert _left_padding(m, 2, 6) is False
    assert _left_padding(torch.zeros(2, 1, 1, 5), 2, 6) is False  # another length
    assert _left_padding(torch.zeros(2, 1, 2, 6), 2, 6) is False  # several query rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_quantize_kernel_is_bit_exact(device, dtype):
    from fastlayers.ops.kvint4 import _kv_quantize_reference, kv_quantize

    x = rand(2, 3, 17, 64, dtype=dtype, device=device, scale=3.0)
    x[0, 0, 0, :32] = 0  # an all-zero group: the smallest scale
    post = torch.rand(3, 64, device=device) * 4 + 0.1
    for p in (None, post):
        got = kv_quantize(x, 32, p)
        want = _kv_quantize_reference(x, p, 32)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    opcheck_with_fp8_inputs(torch.ops.fastlayers.kv_quantize, (x, post, 32))
    with pytest.raises(ValueError, match="group_size"):
        kv_quantize(x, 24)
    for empty in (x[:, :, :0], x[:, :0], x[:0]):  # no tokens, heads or batch: empty outputs
        packed, scales = kv_quantize(empty, 32, None if empty.shape[1] == 0 else post)
        assert packed.shape == (*empty.shape[:3], 32) and scales.shape == (*empty.shape[:3], 2)


@pytest.mark.parametrize("d,group,hq,hkv", [(128, 32, 8, 2), (36, 4, 6, 1), (48, 16, 3, 3)])
def test_kv_kernels_every_cpu_isa(cpu_isa, d, group, hq, hkv):
    """Each CPU kernel variant (scalar, AVX2, AVX-512 where the machine has it) against the
    reference: decode (register and buffer paths), causal prefill with a query count and a key
    count that are not multiples of the tiles, the cache write and the query side."""
    from fastlayers.ops.kvint4 import (
        _attention_reference,
        _kv_cache_write_reference,
        _q_quantize_reference,
        _reference,
        int4_kv_attention,
        int4_kv_decode,
        kv_cache_write,
        q_quantize,
    )

    torch.manual_seed(7)
    k, ks = quant.quantize_kv_int4(rand(2, hkv, 77, d, dtype=torch.float32, device="cpu"), group)
    v, vs = quant.quantize_kv_int4(rand(2, hkv, 77, d, dtype=torch.float32, device="cpu"), group)
    q = rand(2, hq, d, dtype=torch.float32, device="cpu")
    for length in (1, 33, 70):
        got, lse = int4_kv_decode(q, k, ks, v, vs, length)
        want, want_lse = _reference(q, k, ks, v, vs, length, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    # 16-bit queries are read and the output written as they are: the same values as the fp32
    # route and a cast (on AMX tiles, where the probabilities of 16-bit queries multiply the values
    # in one bf16 part or two for fp16, as FlashAttention's P: within a 16-bit rounding of it)
    for dtype in (torch.float16, torch.bfloat16):
        q16 = q.to(dtype)
        got, lse = int4_kv_decode(q16, k, ks, v, vs, 70)
        want, want_lse = int4_kv_decode(q16.float(), k, ks, v, vs, 70)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
        assert torch.equal(lse, want_lse)
        q16t = rand(2, 5, hq, d, dtype=dtype, device="cpu").transpose(1, 2)  # strided
        got, lse = int4_kv_attention(q16t, k, ks, v, vs, 40)
        want, want_lse = int4_kv_attention(q16t.float(), k, ks, v, vs, 40)
        assert torch.equal(lse, want_lse)
        if cpu_isa == "amx_bf16" and hq * 5 // hkv >= 8 and d % 32 == 0:  # (prefill on tiles)
            tol = 2 * torch.finfo(dtype).eps
            torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)
        else:
            assert torch.equal(got, want.to(dtype))
    q4 = rand(2, hq, 37, d, dtype=torch.bfloat16, device="cpu")
    got, lse = int4_kv_attention(q4, k, ks, v, vs, 71)
    want, want_lse = _attention_reference(q4, k, ks, v, vs, 71, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    # logit soft-capping (Gemma 2) in both paths, on scores well past the cap (|s| up to ~10):
    # tanh from exp in the vector body and the scalar tail (33 and 70 keys)
    qb = q * 8
    for length in (33, 70):
        got, lse = int4_kv_decode(qb, k, ks, v, vs, length, softcap=2.0)
        want, want_lse = _reference(qb.double(), k, ks, v, vs, length, d**-0.5, None, 2.0)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-5, atol=1e-5)
    q4 = q4.float() * 8
    got, lse = int4_kv_attention(q4, k, ks, v, vs, 71, softcap=2.0)
    want, want_lse = _attention_reference(q4.double(), k, ks, v, vs, 71, d**-0.5, 2.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-5, atol=1e-5)
    x = rand(2, hkv, 5, d, dtype=torch.float16, device="cpu", scale=3.0)
    ang = torch.rand(5, d) * 6
    bufs = [torch.zeros(2, hkv, 9, d // 2, dtype=torch.uint8),
            torch.zeros(2, hkv, 9, d // group, dtype=torch.float8_e4m3fn)]  # fmt: skip
    refs = [t.clone() for t in bufs]
    kv_cache_write(x, *bufs, 3, None, ang.cos(), ang.sin(), "interleaved")
    _kv_cache_write_reference(x, *refs, 3, None, ang.cos(), ang.sin(), "interleaved")
    for a, b in zip(bufs, refs, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    xq = rand(2, hq, 5, d, dtype=torch.bfloat16, device="cpu", scale=3.0)
    scale = torch.rand(hq, d) + 0.5
    got = q_quantize(xq, scale, ang.cos(), ang.sin())
    assert torch.equal(got, _q_quantize_reference(xq, scale, ang.cos(), ang.sin()))


def _random_bytes(*shape, device):
    """A cache buffer full of random bytes (what a write must leave alone outside its tokens)."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairing", ["half", "interleaved", None])
@pytest.mark.parametrize("b,h,t,d,group,cap,start", [
    (2, 3, 5, 64, 16, 11, 4), (3, 5, 7, 48, 16, 13, 6), (1, 2, 1, 128, 128, 64, 0),
    (2, 1, 4, 32, 32, 4, 0),
])  # fmt: skip
def test_kv_cache_write_is_kv_quantize_in_place(device, dtype, pairing, b, h, t, d, group, cap,
                                                 start):  # fmt: skip
    """The in-place cache write == kv_quantize's bytes at tokens start .. start + t - 1 (kernel and
    reference, bit-exact); every other byte of the buffers stays as it was."""
    from fastlayers.ops.kvint4 import _kv_cache_write_reference, kv_cache_write, kv_quantize

    x = rand(b, t, h, d, dtype=dtype, device=device, scale=3.0).transpose(1, 2)  # HF layout
    assert not x.is_contiguous() or t == 1 or h == 1
    x[0, 0, 0, :group] = 0  # an all-zero group
    post = torch.rand(h, d, device=device) * 4 + 0.1
    cos = sin = None
    if pairing is not None:
        ang = torch.rand(b, t, d, device=device) * 6
        cos, sin = ang.cos(), ang.sin()
    want = kv_quantize(x, group, post, cos, sin, pairing or "half")
    packed = _random_bytes(b, h, cap, d // 2, device=device)
    scales = _random_bytes(b, h, cap, d // group, device=device).view(torch.float8_e4m3fn)
    bufs = (packed, scales)
    before = [u.view(torch.uint8).clone() for u in bufs]
    refs = [u.clone() for u in bufs]
    kv_cache_write(x, packed, scales, start, post, cos, sin, pairing or "half")
    _kv_cache_write_reference(x, *refs, start, post, cos, sin, pairing or "half")
    end = start + t
    for buf, ref, old, new in zip(bufs, refs, before, want, strict=True):
        got = buf.view(torch.uint8)
        assert torch.equal(got[:, :, start:end], new.view(torch.uint8))
        assert torch.equal(got, ref.view(torch.uint8))
        assert torch.equal(got[:, :, :start], old[:, :, :start])
        assert torch.equal(got[:, :, end:], old[:, :, end:])


def test_kv_cache_write_bad_arguments_and_opcheck():
    from fastlayers.ops.kvint4 import kv_cache_write

    x = rand(2, 3, 5, 64, dtype=torch.bfloat16, device="cpu")
    packed = torch.zeros(2, 3, 16, 32, dtype=torch.uint8)
    scales = torch.zeros(2, 3, 16, 4, dtype=torch.uint8).view(torch.float8_e4m3fn)
    torch.library.opcheck(
        torch.ops.fastlayers.kv_cache_write, (x, packed, scales, 3, None),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )  # fmt: skip
    cases = [
        ((x, packed.int(), scales, 0), ValueError, "packed must be uint8"),
        ((x, packed[:, :2], scales, 0), ValueError, "packed must be uint8"),
        ((x, packed, scales.view(torch.uint8), 0), ValueError, "scales must be float8"),
        ((x, packed, scales[:, :, :8], 0), ValueError, "scales must be float8"),
        ((x, packed, torch.zeros(2, 3, 16, 3, dtype=torch.float8_e4m3fn), 0), ValueError,
         "scales must be float8"),  # 3 groups do not divide 64
        ((x, packed.transpose(2, 3).contiguous().transpose(2, 3), scales, 0), ValueError,
         "packed must be contiguous"),
        ((x, packed, scales, 12), ValueError, "start must be in \\[0, 11\\]"),
        ((x, packed, scales, -1), ValueError, "start must be in"),
        ((x, packed, scales, 1.5), TypeError, "start must be an int"),
        ((x, packed, scales, 0, torch.ones(2, 64)), ValueError, "post_scale must be float32"),
        ((x.int(), packed, scales, 0), ValueError, "x must be float32/float16/bfloat16"),
        ((x[..., :63], packed, scales, 0), ValueError, "head_dim must be even"),
        ((x, packed, scales, 0, None, torch.ones(5, 64)), ValueError, "together"),
        ((x, packed, packed.view(torch.float8_e4m3fn)[..., :4], 0), ValueError, "contiguous"),
    ]  # fmt: skip
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            kv_cache_write(*args)
    # the buffers must not share memory with the input (or each other)
    raw = torch.zeros(2 * 3 * 16 * 32 * 2, dtype=torch.uint8)
    alias = raw[: packed.numel()].view(packed.shape)
    xa = raw.view(torch.bfloat16)[: x.numel()].view(x.shape)
    with pytest.raises(ValueError, match="packed shares memory with x"):
        kv_cache_write(xa, alias, scales, 0)
    flat = torch.zeros(2 * 3 * 16 * 36, dtype=torch.uint8)
    p2, s2 = flat[: 2 * 3 * 16 * 32].view(2, 3, 16, 32), flat[-2 * 3 * 16 * 4 :]
    with pytest.raises(ValueError, match="packed shares memory with scales"):
        kv_cache_write(x, p2, flat[: 2 * 3 * 16 * 4].view(torch.float8_e4m3fn).view(2, 3, 16, 4),
                       0)  # fmt: skip
    kv_cache_write(x, p2, s2.view(torch.float8_e4m3fn).view(2, 3, 16, 4), 0)  # disjoint: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_q_quantize_matches_the_reference(device, dtype):
    """The query side in one pass == RoPE, times the scale, through FP8 per (token, head),
    bit-exact; strided queries, zero rows (scale 1) and NaN rows included."""
    from fastlayers.ops.kvint4 import _q_quantize_reference, q_quantize

    q = rand(3, 9, 6, 64, dtype=dtype, device=device, scale=5.0).transpose(1, 2)  # [B, H, T, d]
    q[0, 1, 2] = 0
    q[1, 0, 3, 7] = float("nan")
    scale = torch.rand(6, 64, device=device) * 3 + 0.2
    ang = torch.rand(9, 64, device=device) * 6
    for cos, sin in ((None, None), (ang.cos(), ang.sin()), (ang.cos()[None], ang.sin()[None])):
        for pairing in ("half", "interleaved"):
            for s in (None, scale):
                for fp8 in (True, False):
                    got = q_quantize(q, s, cos, sin, pairing, fp8)
                    want = _q_quantize_reference(q, s, cos, sin, pairing, fp8)
                    assert got.dtype == torch.float32 and got.shape == q.shape
                    assert torch.equal(got.isnan(), want.isnan())
                    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got[0, 1, 2], torch.zeros(64, device=device))
    if fp8:  # FP8 values: at most 8 distinct magnitudes per binade survive
        row = got[2, 3, 4].abs() / got[2, 3, 4].abs().max() * 448
        assert torch.equal(row, row.to(torch.float8_e4m3fn).float())


def test_q_quantize_bad_arguments_and_opcheck():
    from fastlayers.ops.kvint4 import q_quantize

    q = rand(2, 4, 3, 32, dtype=torch.float16, device="cpu")
    cos, sin = torch.rand(3, 32), torch.rand(3, 32)
    torch.library.opcheck(torch.ops.fastlayers.q_quantize, (q, torch.rand(4, 32) + 1, cos, sin))
    cases = [
        ((q[..., :31],), ValueError, "head_dim must be even"),
        ((q[0],), ValueError, "q must be float32/float16/bfloat16 \\[batch, heads"),
        ((q, torch.ones(2, 32)), ValueError, "scale must be float32 \\[4, 32\\]"),
        ((q, None, cos[:2], sin[:2]), ValueError, "cos must be"),
        ((q, None, cos, None), ValueError, "together"),
        ((q, None, cos, sin, "other"), ValueError, "pairing"),
        ((q, None, None, None, "half", 1), TypeError, "fp8 must be a bool"),
        (("q",), TypeError, "q must be a torch.Tensor"),
    ]  # fmt: skip
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            q_quantize(*args)


def test_int4_kv_decode_strided_query():
    from fastlayers.ops.kvint4 import int4_kv_decode

    q = rand(2, 8, 64, dtype=torch.float32, device="cpu")
    k, ks = quant.quantize_kv_int4(rand(2, 2, 30, 64, dtype=torch.float32, device="cpu"), 32)
    v, vs = quant.quantize_kv_int4(rand(2, 2, 30, 64, dtype=torch.float32, device="cpu"), 32)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous()
    torch.testing.assert_close(int4_kv_decode(qt, k, ks, v, vs), int4_kv_decode(q, k, ks, v, vs))


@torch.no_grad()
def test_int4_cache_layer_appends_in_place_with_spare_capacity():
    """The layer's buffers grow by doubling; appends write in place; crop only moves the length, so
    the next append overwrites the dropped tokens; the decode path reads the buffers with length."""
    from fastlayers.quant.rope_kv_hf import _Int4Layer

    torch.manual_seed(0)
    post = rand(2, 32, dtype=torch.float32, device="cpu").abs() + 0.5
    layer = _Int4Layer(post, 16)
    chunks = [torch.randn(1, 2, n, 32) for n in (40, 1, 30, 1, 1)]  # crosses 64 -> 128
    for c in chunks:
        layer.update(c, c * 0.5)
    allk = torch.cat(chunks, -2)
    kq, ks = quant.quantize_kv_int4(allk.float() * post[None, :, None, :], 16)
    vq, vs = quant.quantize_kv_int4(allk * 0.5, 16)
    assert layer.get_seq_length() == 73 and layer.buffers[0].shape[-2] == 128
    assert torch.equal(layer.kq, kq) and torch.equal(layer.vq, vq)
    assert torch.equal(layer.ks.view(torch.uint8), ks.view(torch.uint8))
    assert torch.equal(layer.vs.view(torch.uint8), vs.view(torch.uint8))
    assert layer.nbytes() < layer.allocated_nbytes() <= 2 * layer.nbytes()
    buffer = layer.buffers[0]
    layer.crop(-3)
    replacement = torch.randn(1, 2, 2, 32)
    keys, _ = layer.update(replacement[..., :1, :], replacement[..., :1, :])
    layer.update(replacement[..., 1:, :], replacement[..., 1:, :])
    assert keys.numel() == 0 and keys._fl_layer is layer  # decode: no dequantized copy
    assert layer.buffers[0] is buffer and layer.get_seq_length() == 72  # no reallocation
    expected = torch.cat([allk[..., :70, :], replacement], -2)
    kq2, _ = quant.quantize_kv_int4(expected.float() * post[None, :, None, :], 16)
    assert torch.equal(layer.kq, kq2)


def test_int4_store_buffers_are_checked_once_per_tuple(monkeypatch):
    """A decode step's direct kernel calls (write, then decode) check the store's four buffers
    once per tuple the store makes (each allocation; kernel_checked keeps it), not twice a step;
    buffers assigned from outside are a new tuple, checked again, and a wrong one is refused
    (ValueError) by the checked path too, whose in-place write trusted them before and wrote
    past the end of scales shorter than the keys."""
    from fastlayers.ops import kvint4 as ops_kvint4
    from fastlayers.quant.kv_cache import Int4KVStore

    checks = []
    real = ops_kvint4._store_buffers_ok

    def counted(buffers, store=None):
        checks.append(store.kernel_checked is buffers)  # (True: the check is skipped)
        return real(buffers, store)

    monkeypatch.setattr(ops_kvint4, "_store_buffers_ok", counted)
    torch.manual_seed(0)
    store = Int4KVStore()
    k, v = torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    store.write(k, v, 16)  # (the first write allocates: the checked path)
    q = torch.randn(1, 4, 1, 32)
    for _ in range(3):
        x = torch.randn(1, 2, 1, 32)
        store.write(x, x, 16)
        out = ops_kvint4.decode_step_direct(q, None, True, store.buffers, store.length, 0.2,
                                            store=store)  # fmt: skip
        ref, _ = int4_kv_decode(ops_kvint4.q_quantize(q, None, fp8=True)[:, :, 0], *store.buffers,
                                store.length, 0.2)  # fmt: skip
        assert torch.equal(out, ref)
    assert checks == [False] + [True] * 5  # (one full check: the store's first direct call)
    short = store.buffers[1][:, :, :4].contiguous()  # (key scales for 4 tokens)
    store.buffers = (store.buffers[0], short, *store.buffers[2:])
    with pytest.raises(ValueError, match="buffers are not as it makes them"):
        store.write(x, x, 16)
    assert checks[-1] is False
    with pytest.raises(ValueError, match="buffers are not as it makes them"):
        store.append(*(b[:, :, :1] for b in store.buffers))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, "fp8"])
@pytest.mark.parametrize("d,dv", [(64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (192, 128)])
@pytest.mark.parametrize("group", [32, 4])
def test_int4_kv_attention_tensor_core_prefill(cuda_device, dtype, d, dv, group):
    """Queries with head_dim 64/80/96/128/256 (80: Phi-2, 96: Phi-3; groups of 16 at 80), or of
    192 with values of 128 (MiMo-V2-Flash; unabsorbed multi-head latent attention), take the
    tensor-core prefill (beyond 128 Q's fragments read
    from shared memory per use; at 256, and at 192 with fp32 queries, each key tile loaded when
    needed, not prefetched in registers): 130 queries (three 64-row CTAs, the last partial) over
    300 cached tokens (five key tiles, the last partial); the cache is dequantized 8 channels at
    a time (one group scale each, or one per channel pair for groups of 4). fp16/bf16 queries as
    they are (P rounded to their dtype); fp32 ones as hi + lo fp16 parts (Q and P: two products
    each) to the fp32 tolerance, FP8-quantized fp32 ones (q_quantize's, their lo parts
    negligible: one Q K^T product) likewise. In the emulation: no launch of the warp-per-row
    prefill kernel."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention

    b, hq, hkv, t, tq = 2, 4, 2, 300, 130
    group = math.gcd(group, d)
    if dtype == "fp8":
        q = quant.quantize_q_fp8(rand(b, hq, tq, d, dtype=torch.float32, device=cuda_device))
        dtype = torch.float32
    else:
        q = rand(b, hq, tq, d, dtype=dtype, device=cuda_device)
    k, ks = quant.quantize_kv_int4(
        rand(b, hkv, t + 7, d, dtype=torch.float32, device=cuda_device), group
    )
    v, vs = quant.quantize_kv_int4(
        rand(b, hkv, t + 7, dv, dtype=torch.float32, device=cuda_device), group
    )
    kernels = ("prefill_kernel", "kernel")  # the tile's launches: "kernel" (cuda::tc::launch)
    before = launches_since(kernels)
    out, lse = int4_kv_attention(q, k, ks, v, vs, t)
    if before is not None:
        assert launches_since(kernels, before) == [0, 1]
    ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, d**-0.5)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert out.dtype == dtype and out.shape == (b, hq, tq, dv)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hq,hkv,tq,dtype,packed",
    [
        (6, 2, 5, torch.bfloat16, True),  # 3 heads x 5 tokens: one tile per kv head
        (3, 1, 30, torch.float32, True),  # 90 rows: the first tile ends mid-token (64 = 21 x 3 + 1)
        (80, 1, 2, torch.float16, True),  # a group wider than a tile: a token's heads in two
        (4, 2, 64, torch.bfloat16, False),  # as many tiles either way: one head per CTA
    ],
)
def test_int4_kv_attention_tensor_core_prefill_packs_gqa_heads(cuda_device, hq, hkv, tq, dtype,
                                                               packed):  # fmt: skip
    """The tensor-core prefill packs a GQA group's query heads into one CTA's 64 rows (token-major,
    FlashAttention 3's pack_gqa) where that takes fewer CTAs: a few query tokens then fill the
    group's rows of one tile, whose key tiles are dequantized once for them all, instead of a
    tile per head. Each packed row keeps its own causal limit (its token's); groups that do not
    divide 64 (tiles ending inside a token's heads) and wider than a tile; fp32 queries (hi + lo
    parts, the lo products per warp of mixed heads). Against the float64 reference; in the
    emulation, the CTAs launched: ceil(tq x group / 64) per kv head packed, ceil(tq / 64) per
    query head otherwise."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention

    torch.manual_seed(hq + tq)
    b, d, t, group = 2, 64, 100, 32
    q = rand(b, hq, tq, d, dtype=dtype, device=cuda_device)
    k, ks = quant.quantize_kv_int4(
        rand(b, hkv, t, d, dtype=torch.float32, device=cuda_device), group
    )
    v, vs = quant.quantize_kv_int4(
        rand(b, hkv, t, d, dtype=torch.float32, device=cuda_device), group
    )
    before = launches_since(("kernel",), None, blocks=True)
    out, lse = int4_kv_attention(q, k, ks, v, vs, t)
    if before is not None:
        g = hq // hkv
        ctas = b * (hkv * -(-tq * g // 64) if packed else hq * -(-tq // 64))
        assert launches_since(("kernel",), before, blocks=True) == [ctas]
    ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, d**-0.5)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert out.dtype == dtype and out.shape == (b, hq, tq, d)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, "fp8"])
@pytest.mark.parametrize("hq,group,values", [(2, 64, "key rows"), (3, 32, "own rows")])
def test_int4_kv_attention_tensor_core_prefill_latent(cuda_device, dtype, hq, group, values):
    """Multi-head latent attention's prefill on tensor cores: keys of 576 channels (latent + RoPE
    part), values the key rows' first 512 read in place, or rows of their own (here the first 512
    channels of another cache's 576-channel rows: a row stride of their own, other scales); 8
    warps per 32 query tokens, each a quarter of the key channels (Q K^T) and of the value
    channels (P V) of 16 tokens, the quarters of the scores summed through shared memory. 75
    queries (three CTAs, the last partial) over 300 of 307 cached tokens, batch row 1 left-padded
    by 37 (its first queries see nothing: zeros, lse -inf); with and without soft-capping; 16-bit
    queries to their tolerance, fp32 ones (hi + lo parts) and FP8-quantized fp32 ones to fp32's,
    against the float64 reference. In the emulation: the launch is checked, and the warp-per-row
    kernel is not launched."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention

    b, t, length, tq, d, dv = 2, 307, 300, 75, 576, 512
    torch.manual_seed(hq + group)
    k, ks, v, vs = _values_in_key_rows(b, 1, t, d, dv, group, cuda_device)
    if values == "own rows":
        _, _, v, vs = _values_in_key_rows(b, 1, t, d, dv, group, cuda_device)
    starts = torch.tensor([0, 237], dtype=torch.int32, device=cuda_device)
    if dtype == "fp8":
        q = quant.quantize_q_fp8(rand(b, hq, tq, d, dtype=torch.float32, device=cuda_device))
        dtype = torch.float32
    else:
        q = rand(b, hq, tq, d, dtype=dtype, device=cuda_device)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    kernels = ("prefill_kernel", "prefill_latent_tc_kernel")
    before = launches_since(kernels)
    for cap in (0.0, 2.0):
        out, lse = int4_kv_attention(q, k, ks, v, vs, length, None, cap, None, starts)
        ref, ref_lse = _attention_reference(q.double(), k, ks, v.contiguous(), vs.contiguous(),
                                            length, d**-0.5, cap, None, starts)  # fmt: skip
        assert out.dtype == dtype and out.shape == (b, hq, tq, dv)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
    assert bool(torch.isneginf(lse[1, :, :12]).all()) and bool((out[1, :, :12] == 0).all())
    if before is not None:
        assert launches_since(kernels, before) == [0, 2]


@pytest.mark.parametrize("hq,tq,dtype", [(16, 3, torch.bfloat16), (5, 13, torch.float32)])
def test_int4_kv_attention_tensor_core_prefill_latent_packs_heads(cuda_device, hq, tq, dtype):
    """The latent tensor-core prefill packs the query heads of its one latent kv head into a CTA's
    32 rows (token-major, as the other tile does): 16 heads x 3 tokens in 2 CTAs a batch row
    instead of 16, 5 x 13 (a tile ending inside a token's heads; fp32 queries) in 3 instead of 5;
    each row with its own causal limit, batch row 1 left-padded. Against the float64
    reference."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention

    b, t, length, d, dv, group = 2, 90, 80, 576, 512, 64
    torch.manual_seed(hq)
    k, ks, v, vs = _values_in_key_rows(b, 1, t, d, dv, group, cuda_device)
    starts = torch.tensor([0, 30], dtype=torch.int32, device=cuda_device)
    q = rand(b, hq, tq, d, dtype=dtype, device=cuda_device)
    before = launches_since(("prefill_latent_tc_kernel",), None, blocks=True)
    out, lse = int4_kv_attention(q, k, ks, v, vs, length, None, 0.0, None, starts)
    if before is not None:
        ctas = b * -(-hq * tq // 32)
        assert launches_since(("prefill_latent_tc_kernel",), before, blocks=True) == [ctas]
    ref, ref_lse = _attention_reference(q.double(), k, ks, v.contiguous(), vs.contiguous(), length,
                                        d**-0.5, 0.0, None, starts)  # fmt: skip
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, "fp8", torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "d,group,hq,hkv",
    [
        (128, 16, 8, 2),
        (128, 128, 20, 1),
        (64, 32, 4, 4),
        (64, 64, 16, 2),
        (256, 16, 16, 8),
        (256, 256, 3, 1),
        (256, 64, 40, 2),
    ],
)
def test_int4_kv_decode_tensor_core(cuda_device, dtype, d, group, hq, hkv):
    """One query token, head_dim 64/128/256, groups of a multiple of 16 channels: the tensor-core
    decode (fragments built in registers from the cache bytes; at 256 the warps in pairs, each
    warp one half of the channels). GQA groups of 4, 20 (a 16-row slice and a 4-row one), 1, 8, 2,
    3; 300 of 307 cached tokens (two splits of 150: the warps' last 32-key steps partial, and at
    256 a pair of warps idle in the last step); batch row 1 left-padded by 37 tokens; groups of 16
    (two key scale codes per lane), of the whole 256-channel row (both halves' one code), of 64;
    values read in place from rows 16 bytes wider than theirs. fp32 queries (two fp16 products per
    score and output term) to the fp32 tolerance, FP8-quantized fp32 queries (q_quantize's: their
    lo parts negligible, one product per score) to the same, 16-bit queries to theirs (P rounded
    to fp16); also soft-capped. In the emulation the launch itself is checked."""
    b, t, length = 2, 307, 300
    torch.manual_seed(d + group + hq)
    dev = cuda_device
    k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=dev), group)
    vq, vsq = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=dev), group)
    wide = torch.randint(0, 256, (b, hkv, t, d // 2 + 16), dtype=torch.uint8, device=dev)
    wide[..., : d // 2] = vq
    wide_s = torch.randint(0, 120, (b, hkv, t, d // group + 3), dtype=torch.uint8, device=dev)
    wide_s[..., : d // group] = vsq.view(torch.uint8)
    v, vs = wide[..., : d // 2], wide_s.view(torch.float8_e4m3fn)[..., : d // group]
    _check_tensor_core_decode(dtype, hq, (k, ks, v, vs), (vq, vsq), length)


def _check_tensor_core_decode(dtype, hq, cache, ref_values, length):
    """int4_kv_decode of 2 batch rows (row 1 left-padded by 37 tokens) of random queries of `dtype`
    (or "fp8": FP8-quantized fp32 ones) against the float64 reference to the dtype's tolerance,
    without and with soft-capping; `ref_values` the reference's (contiguous) values and scales. In
    the emulation, both calls' launches of the tensor-core decode are checked."""
    k, ks, v, vs = cache
    dev, b, d, dv = k.device, k.shape[0], 2 * k.shape[-1], 2 * v.shape[-1]
    starts = torch.tensor([0, 37], dtype=torch.int32, device=dev)
    if dtype == "fp8":
        q = quant.quantize_q_fp8(rand(b, hq, d, dtype=torch.float32, device=dev, scale=3.0))
        dtype = torch.float32
    else:
        q = rand(b, hq, d, dtype=dtype, device=dev, scale=3.0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    before = launches_since(("decode_tc_kernel",))
    for cap in (0.0, 2.0):
        out, lse = int4_kv_decode(q, k, ks, v, vs, length, None, starts, softcap=cap)
        ref, ref_lse = _reference(q.double(), k, ks, *ref_values, length, d**-0.5, starts, cap)
        assert out.dtype == dtype and out.shape == (b, hq, dv)
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
    if before is not None:
        assert launches_since(("decode_tc_kernel",), before) == [2]


@pytest.mark.parametrize("dtype", [torch.float32, "fp8", torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,group", [(16, 64), (40, 32)])
def test_int4_kv_decode_tensor_core_latent(cuda_device, dtype, hq, group):
    """Multi-head latent attention's decode on tensor cores: keys of 576 channels (latent + RoPE
    part), values the key rows' first 512 read in place; the 4 warps take each key step together,
    each a quarter of the latent channels for Q K^T and P V, the first also the RoPE part, their
    scores summed through shared memory. 16 heads per latent (DeepSeek-V2-Lite) and 40 (slices of
    16, 16 and 8); 300 of 307 cached tokens, batch row 1 left-padded by 37; also soft-capped;
    against the float64 reference to each query dtype's tolerance. In the emulation the launch is
    checked."""
    b, t, length, d, dv = 2, 307, 300, 576, 512
    torch.manual_seed(hq + group)
    k, ks, v, vs = _values_in_key_rows(b, 1, t, d, dv, group, cuda_device)
    _check_tensor_core_decode(dtype, hq, (k, ks, v, vs), (v.contiguous(), vs.contiguous()), length)


@pytest.mark.parametrize("dtype", [torch.float32, "fp8", torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,group", [(16, 4, 64), (20, 1, 16)])
def test_int4_kv_decode_tensor_core_wide_keys(cuda_device, dtype, hq, hkv, group):
    """Keys of 192 channels (128 + a 64-channel RoPE part) with values of 128 of their own rows
    (MiMo-V2-Flash; unabsorbed multi-head latent attention) on tensor cores: one warp per key step,
    the keys' last 64 channels in the 64-channel layout, the values' 128 in the 128-channel one.
    GQA groups of 4 and 20 (slices of 16 and 4), groups of 64 and 16 channels; 300 of 307 cached
    tokens, batch row 1 left-padded by 37; also soft-capped; against the float64 reference to each
    query dtype's tolerance. In the emulation the launch is checked."""
    torch.manual_seed(hq + group)
    k, ks, v, vs = _cache_with_values(hkv, 307, 192, 128, group, cuda_device)
    _check_tensor_core_decode(dtype, hq, (k, ks, v, vs), (v, vs), 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "d,dv,hq,hkv,group,kernel",
    [
        (40, 40, 4, 2, 8, "decode_split_kernel"),
        (64, 64, 16, 1, 16, "decode_tc_kernel"),
        (256, 256, 8, 2, 64, "decode_tc_kernel"),
        (576, 512, 16, 1, 64, "decode_tc_kernel"),
    ],
)
def test_int4_kv_decode_non_finite_rows(cuda_device, dtype, d, dv, hq, hkv, group, kernel):
    """A NaN key scale at one token (cached token 200 of 300: one warp of the second split) makes
    every query row of its kv head NaN, as in the reference: the warps' merge and the splits'
    combine must not skip the NaN partial (fmaxf does). A NaN or an infinite query channel makes
    its own row NaN. Every other row agrees with the float64 reference; lse is NaN on the same
    rows. The CUDA-core decode (d 40), the tensor-core one (64, 256) and the latent one (576 /
    512, values read from the key rows); in the emulation the launch is checked."""
    b, t, length = 2, 307, 300
    torch.manual_seed(d + hq)
    dev = cuda_device
    if d == 576:
        k, ks, v, vs = _values_in_key_rows(b, hkv, t, d, dv, group, dev)
    else:
        k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=dev), group)
        v, vs = quant.quantize_kv_int4(rand(b, hkv, t, dv, dtype=torch.float32, device=dev), group)
    ks.view(torch.uint8)[0, 0, 200, 0] = 0x7F  # E4M3's NaN: batch 0, kv head 0, token 200
    q = rand(b, hq, d, dtype=dtype, device=dev)
    q[1, 1, 3] = float("nan")
    q[1, hq - 1, 5] = float("inf")
    starts = torch.tensor([0, 37], dtype=torch.int32, device=dev)
    before = launches_since((kernel,))
    out, lse = int4_kv_decode(q, k, ks, v, vs, length, None, starts)
    if before is not None:
        assert launches_since((kernel,), before) == [1]
    ref, ref_lse = _reference(
        q.double(), k, ks, v.contiguous(), vs.contiguous(), length, d**-0.5, starts
    )
    nan_rows = torch.zeros(b, hq, dtype=torch.bool)
    nan_rows[0, : hq // hkv] = True
    nan_rows[1, [1, hq - 1]] = True
    assert torch.equal(ref.isnan().all(-1).cpu(), nan_rows)  # (the poison reaches the reference)
    assert torch.equal(out.isnan().cpu(), ref.isnan().cpu())
    assert torch.equal(lse.isnan().cpu(), nan_rows)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    keep = ~nan_rows.to(dev)
    torch.testing.assert_close(out[keep].double(), ref[keep].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse[keep].double(), ref_lse[keep].double(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "b,hq,hkv,d,group,t,tq",
    [
        (2, 8, 2, 128, 32, 70, 17),
        (1, 6, 3, 40, 8, 33, 33),
        (3, 4, 4, 64, 64, 12, 1),
        (1, 8, 1, 64, 16, 100, 9),
    ],
)
def test_int4_kv_attention_is_causal_over_the_cache(device, b, hq, hkv, d, group, t, tq):
    """Several new tokens (the cache's last tq) against the INT4 cache, causally, vs the float64
    reference; tq = 1 equals the decode kernel; odd shapes and the whole cache as queries."""
    from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention, int4_kv_decode

    q = rand(b, hq, tq, d, dtype=torch.bfloat16, device=device)
    k, ks = quant.quantize_kv_int4(
        rand(b, hkv, t + 5, d, dtype=torch.float32, device=device), group
    )
    v, vs = quant.quantize_kv_int4(
        rand(b, hkv, t + 5, d, dtype=torch.float32, device=device), group
    )
    out, lse = int4_kv_attention(q, k, ks, v, vs, t)
    ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, d**-0.5)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (b, hq, tq)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
    last, last_lse = int4_kv_decode(q[:, :, -1], k, ks, v, vs, t)
    torch.testing.assert_close(out[:, :, -1].float(), last.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse[:, :, -1], last_lse, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be cached"):
        int4_kv_attention(q, k, ks, v, vs, tq - 1)
    if tq == 9:
        opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention.default,
                                (q, k, ks, v, vs, t, d**-0.5))  # fmt: skip


def _int4_cache(hkv, t, d, group, device):
    """Random keys and values of 2 sequences through the INT4 cache format: (k, ks, v, vs)."""
    k, ks = quant.quantize_kv_int4(rand(2, hkv, t, d, dtype=torch.float32, device=device), group)
    v, vs = quant.quantize_kv_int4(rand(2, hkv, t, d, dtype=torch.float32, device=device), group)
    return k, ks, v, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,group", [(8, 2, 128, 32), (6, 3, 40, 8)])
def test_int4_kv_sinks_match_reference(device, dtype, hq, hkv, d, group):
    """GPT-OSS's attention sinks (a logit per query head in the softmax's denominator) in the
    decode and prefill ops vs the float64 references, which put the sink into the softmax (the
    ops rescale the kernels' output by sigmoid(lse - sink)); with soft-capping and left padding;
    a row that sees no token keeps zeros and gets lse = sink; bad sinks refused."""
    t = 45
    k, ks, v, vs = _int4_cache(hkv, t, d, group, device)
    q = rand(2, hq, d, dtype=dtype, device=device, scale=3.0)
    q3 = rand(2, hq, 7, d, dtype=dtype, device=device, scale=3.0)
    sinks = torch.randn(hq, device=device) * 2
    starts = torch.tensor([4, t - 2], dtype=torch.int32, device=device)  # row 1 sees no token
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for cap in (None, 1.5):
        out, lse = int4_kv_decode(q, k, ks, v, vs, t - 2, None, starts, cap, sinks)
        ref, ref_lse = _reference(q.double(), k, ks, v, vs, t - 2, d**-0.5, starts, cap or 0.0,
                                  sinks)  # fmt: skip
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        assert bool((out[1] == 0).all()) and torch.equal(lse[1], sinks)
        out, lse = int4_kv_attention(q3, k, ks, v, vs, t, None, cap, sinks)
        ref, ref_lse = _attention_reference(q3.double(), k, ks, v, vs, t, d**-0.5, cap or 0.0,
                                            sinks)  # fmt: skip
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
    plain, plain_lse = int4_kv_decode(q, k, ks, v, vs)
    half, _ = int4_kv_decode(q, k, ks, v, vs, sinks=plain_lse[0])  # a sink as heavy as the keys
    torch.testing.assert_close(half[0].float(), plain[0].float() / 2, rtol=tol, atol=tol)
    for bad, error in ((torch.zeros(hq + 1, device=device), ValueError),
                       (torch.zeros(hq, dtype=torch.int64, device=device), ValueError),
                       ("0", TypeError)):  # fmt: skip
        with pytest.raises(error, match="sinks must be"):
            int4_kv_decode(q, k, ks, v, vs, sinks=bad)
        with pytest.raises(error, match="sinks must be"):
            int4_kv_attention(q3, k, ks, v, vs, sinks=bad)


# (d, dv, group, hq, hkv): the register path (<= 4 query rows per kv head, 16-channel chunks), the
# buffer path (5 heads per kv head), channels not in 16-chunks (group 8), DeepSeek's 192 / 128 and
# 128 / 64 (the CUDA kernels take values no wider than the keys: the last three shapes)
VALUE_DIM_SHAPES = [
    (32, 48, 16, 4, 2),
    (64, 32, 16, 10, 2),
    (24, 40, 8, 6, 3),
    (192, 128, 64, 4, 4),
    (128, 64, 32, 8, 2),
]


def _cache_with_values(hkv, t, d, dv, group, device):
    """An INT4 cache of 2 sequences whose values are dv channels wide (keys d): (k, ks, v, vs)."""
    k, ks = quant.quantize_kv_int4(rand(2, hkv, t, d, dtype=torch.float32, device=device), group)
    v, vs = quant.quantize_kv_int4(rand(2, hkv, t, dv, dtype=torch.float32, device=device), group)
    return k, ks, v, vs


@pytest.mark.parametrize("d,dv,group,hq,hkv", VALUE_DIM_SHAPES)
def test_int4_kv_values_of_their_own_head_size(device, d, dv, group, hq, hkv):
    """Values of another head size than the keys (multi-head latent attention's 128 against 192,
    MiMo-V2-Flash's): decode (left padding, soft-capping, sinks) and causal prefill, 16-bit and
    fp32 queries, vs the float64 references; outputs dv wide; one quantization group for keys and
    values or a ValueError naming both scales. (CUDA: the kernels take dv up to d, the last three
    shapes; the reference runs for the others, warned once.)"""
    t = 45
    k, ks, v, vs = _cache_with_values(hkv, t, d, dv, group, device)
    sinks = torch.randn(hq, device=device)
    starts = torch.tensor([3, 0], dtype=torch.int32, device=device)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        q = rand(2, hq, d, dtype=dtype, device=device, scale=2.0)
        for length, st, cap, sk in (
            (t, None, None, None),
            (t - 4, starts, 1.5, sinks),
            (1, None, None, sinks),
        ):
            out, lse = int4_kv_decode(q, k, ks, v, vs, length, None, st, cap, sk)
            ref, ref_lse = _reference(q.double(), k, ks, v, vs, length, d**-0.5, st, cap or 0.0,
                                      sk)  # fmt: skip
            assert out.shape == (2, hq, dv) and out.dtype == dtype
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        q3 = rand(2, hq, 37, d, dtype=dtype, device=device, scale=2.0)
        out, lse = int4_kv_attention(q3, k, ks, v, vs, 40, None, 2.0, sinks)
        ref, ref_lse = _attention_reference(q3.double(), k, ks, v, vs, 40, d**-0.5, 2.0, sinks)
        assert out.shape == (2, hq, 37, dv) and out.dtype == dtype
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
    out, lse = int4_kv_decode(q, k, ks, v, vs, 0)
    assert out.shape == (2, hq, dv) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    other = quant.quantize_kv_int4(rand(2, hkv, t, dv, dtype=torch.float32, device=device),
                                   group // 2)  # fmt: skip
    with pytest.raises(ValueError, match="one quantization group for keys"):
        int4_kv_decode(q, k, ks, *other)
    with pytest.raises(ValueError, match="v must be uint8"):
        int4_kv_decode(q, k, ks, v[:, :, :5], vs)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_decode.default,
                            (q, k, ks, v, vs, t, d**-0.5))  # fmt: skip
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention.default,
                            (q3, k, ks, v, vs, 40, d**-0.5))  # fmt: skip


def test_int4_kv_values_of_their_own_head_size_every_cpu_isa(cpu_isa):
    """Each CPU kernel variant with values of another head size, register and buffer paths and
    channels outside 16-chunks, against the reference."""
    for d, dv, group, hq, hkv in VALUE_DIM_SHAPES[:3]:
        k, ks, v, vs = _cache_with_values(hkv, 70, d, dv, group, "cpu")
        q = rand(2, hq, d, dtype=torch.float32, device="cpu")
        got, lse = int4_kv_decode(q, k, ks, v, vs, 66)
        want, want_lse = _reference(q, k, ks, v, vs, 66, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
        q3 = rand(2, hq, 33, d, dtype=torch.float32, device="cpu")
        got, lse = int4_kv_attention(q3, k, ks, v, vs, 70)
        want, want_lse = _attention_reference(q3, k, ks, v, vs, 70, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


# (batch, hq, hkv, d, dv, group): multi-head latent attention's one kv head serving every query
# head (16: in slices across threads at batch 1; 3: the register path; 12 at batch 3: the buffer
# path, the values read from the dequantized key rows), DeepSeek V3's 576 / 512, two kv heads,
# channels outside 16-chunks (group 8), 128 / 64 (a CUDA kernel shape)
KEY_ROW_SHAPES = [
    (1, 16, 1, 48, 32, 16),
    (2, 3, 1, 48, 32, 16),
    (3, 12, 1, 48, 32, 16),
    (1, 8, 1, 576, 512, 64),
    (2, 10, 2, 40, 24, 8),
    (2, 4, 1, 128, 64, 32),
]


def _values_in_key_rows(b, hkv, t, d, dv, group, device):
    """INT4 keys ``[b, hkv, t, d]`` and, as views, values that are their first dv channels (a
    multi-head latent attention's latent, read from its cached rows): (k, ks, v, vs)."""
    k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=device), group)
    return k, ks, k[..., : dv // 2], ks[..., : dv // group]


@pytest.mark.parametrize("b,hq,hkv,d,dv,group", KEY_ROW_SHAPES)
def test_int4_kv_values_read_in_place_from_the_key_rows(device, b, hq, hkv, d, dv, group):
    """Values that are the keys' first dv channels, given as views of the key buffers (multi-head
    latent attention: its latent serves as keys and values): decode (left padding, soft-capping,
    sinks, 16-bit queries) and causal prefill equal the same calls on contiguous copies (the CPU
    kernel reads the rows in place; the same bits) and the float64 reference. Views whose tokens
    are not evenly spaced rows are copied first, with the same result. (On CUDA the 576 / 512
    prefill takes the latent tensor-core kernel either way: the same bits too.)"""
    t = 45
    k, ks, v, vs = _values_in_key_rows(b, hkv, t, d, dv, group, device)
    assert not v.is_contiguous() and not vs.is_contiguous()
    vc, vsc = v.contiguous(), vs.contiguous()
    sinks = torch.randn(hq, device=device)
    starts = torch.tensor([3, 0, 7][:b], dtype=torch.int32, device=device)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        q = rand(b, hq, d, dtype=dtype, device=device, scale=2.0)
        for length, st, cap, sk in ((t, None, None, None), (t - 4, starts, 1.5, sinks)):
            out, lse = int4_kv_decode(q, k, ks, v, vs, length, None, st, cap, sk)
            same, same_lse = int4_kv_decode(q, k, ks, vc, vsc, length, None, st, cap, sk)
            assert out.shape == (b, hq, dv) and out.dtype == dtype
            assert torch.equal(out, same) and torch.equal(lse, same_lse)
            ref, ref_lse = _reference(q.double(), k, ks, vc, vsc, length, d**-0.5, st, cap or 0.0,
                                      sk)  # fmt: skip
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        q3 = rand(b, hq, 9, d, dtype=dtype, device=device, scale=2.0)
        out, lse = int4_kv_attention(q3, k, ks, v, vs, 40, None, 2.0, sinks)
        same, _ = int4_kv_attention(q3, k, ks, vc, vsc, 40, None, 2.0, sinks)
        assert torch.equal(out, same)
        ref, _ = _attention_reference(q3.double(), k, ks, vc, vsc, 40, d**-0.5, 2.0, sinks)
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    # tokens not evenly spaced (every other one of a longer cache): copied, the same answer
    k2, ks2 = quant.quantize_kv_int4(rand(b, hkv, 2 * t, d, dtype=torch.float32, device=device),
                                     group)  # fmt: skip
    v2, vs2 = k2[:, :, ::2, : dv // 2], ks2[:, :, ::2, : dv // group]
    q = rand(b, hq, d, dtype=torch.float32, device=device)
    out, _ = int4_kv_decode(q, k, ks, v2, vs2, t)
    want, _ = int4_kv_decode(q, k, ks, v2.contiguous(), vs2.contiguous(), t)
    assert torch.equal(out, want)


@pytest.mark.parametrize(
    "hq,hkv,d,dv,group",
    [(8, 2, 64, 64, 16), (16, 1, 48, 32, 16), (4, 2, 128, 128, 32), (4, 1, 128, 64, 32)],
)
def test_int4_kv_attention_left_padding(device, hq, hkv, d, dv, group):
    """Prefill with per-row ``starts`` (a left-padded prompt): batch row b's tokens before
    starts[b] are hidden from its queries, causal otherwise; queries inside the padding see
    nothing (zeros, lse -inf); against the float64 reference, with sinks, and the values read from
    the key rows (multi-head latent attention); ``starts`` of the wrong shape or range refused.
    (CUDA: the tensor-core prefill for bf16 queries at head_dim 64 / 128 with dv == d, the warp
    per query row otherwise; 48 channels run the reference there.)"""
    t, tq = 40, 24
    if dv == d:
        k, ks, v, vs = _cache_with_values(hkv, t, d, dv, group, device)
        k, ks, v, vs = (x.repeat(2, 1, 1, 1)[:3] for x in (k, ks, v, vs))
    else:
        k, ks, v, vs = _values_in_key_rows(3, hkv, t, d, dv, group, device)
    starts = torch.tensor([5, 0, 30], dtype=torch.int32, device=device)
    sinks = torch.randn(hq, device=device)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        q = rand(3, hq, tq, d, dtype=dtype, device=device, scale=2.0)
        for sk in (None, sinks):
            out, lse = int4_kv_attention(q, k, ks, v, vs, t, None, None, sk, starts)
            ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, d**-0.5, 0.0, sk,
                                                starts)  # fmt: skip
            assert out.shape == (3, hq, tq, dv) and out.dtype == dtype
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        blind = (t - tq + torch.arange(tq, device=device)) < 30  # (row 2's padded queries)
        assert bool((out[2][:, blind] == 0).all()) and bool((out[2][:, ~blind] != 0).any())
    none, _ = int4_kv_attention(q, k, ks, v, vs, t, starts=torch.zeros_like(starts))
    torch.testing.assert_close(none, int4_kv_attention(q, k, ks, v, vs, t)[0])
    with pytest.raises(ValueError, match="starts must be int32"):
        int4_kv_attention(q, k, ks, v, vs, t, starts=starts[:2])
    with pytest.raises(ValueError, match="starts"):
        int4_kv_attention(q, k, ks, v, vs, t, starts=starts + 40)


def _amx_cache(b, hkv, t, d, dv, group, starts):
    """The AMX tests' cache (at most 2 sequences): multi-head latent attention's values read from
    its 576-channel key rows, else values of their own; and ``starts`` as int32 (or None)."""
    if d == 576:
        k, ks, v, vs = _values_in_key_rows(b, hkv, t, d, dv, group, "cpu")
    else:
        k, ks, v, vs = (x[:b] for x in _cache_with_values(hkv, t, d, dv, group, "cpu"))
    return k, ks, v, vs, None if starts is None else torch.tensor(starts, dtype=torch.int32)


# (b, hq, hkv, d, dv, group, t, tq, starts): the tile prefill takes tasks of >= 32 rows (query
# tokens x the group's heads, 32 query tokens a task) with d and dv multiples of 32
AMX_PREFILL_SHAPES = [
    (1, 32, 8, 128, 128, 128, 300, 200, None),  # Llama-class GQA; key blocks of 128, a partial one
    (2, 8, 2, 64, 64, 32, 100, 37, [5, 0]),  # 37 query tokens: a task of 5 (20 rows), left padding
    (1, 12, 1, 96, 64, 32, 77, 50, None),  # values of their own size, 12 heads per kv head
    (2, 4, 4, 32, 32, 16, 40, 40, [0, 33]),  # the whole cache as queries, 16-channel groups
    (1, 16, 1, 576, 512, 64, 70, 9, None),  # multi-head latent attention: values in the key rows
]


@pytest.mark.parametrize("b,hq,hkv,d,dv,group,t,tq,starts", AMX_PREFILL_SHAPES)
def test_int4_kv_attention_amx_tiles(amx_bf16, b, hq, hkv, d, dv, group, t, tq, starts):
    """The AMX prefill (ISA level amx_bf16): keys and values dequantized exactly to bf16, queries
    and probabilities split into three bf16 parts each, so fp32 queries keep fp32 accuracy; the
    online softmax per block of 128 keys; against the float64 reference with the CPU kernels'
    tolerances, with soft-capping, sinks and left padding, a negative softmax scale (the positive
    one is folded into the exponents, the others scale the scores first), fp32 / bf16 / fp16
    queries."""
    k, ks, v, vs, st = _amx_cache(b, hkv, t, d, dv, group, starts)
    sinks = torch.randn(hq)
    # fp32 queries at 4e-6: the three-part splits keep fp32 accuracy (two parts: about 2e-5)
    for dtype, tol in ((torch.float32, 4e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for scale, softcap, sk in ((None, None, None), (None, 20.0, sinks), (-1.0, None, None)):
            q = rand(b, hq, tq, d, dtype=dtype, device="cpu", scale=2.0)
            out, lse = int4_kv_attention(q, k, ks, v, vs, t, scale, softcap, sk, st)
            ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, scale or d**-0.5,
                                                softcap or 0.0, sk, st)  # fmt: skip
            # (the scores' rounding grows with the scale: -1 has scores ~d^0.5 times as large,
            # and without the maximum subtracted their exponents would overflow)
            grow = abs(scale or d**-0.5) / d**-0.5
            assert out.shape == (b, hq, tq, dv) and out.dtype == dtype
            assert out.isfinite().all()
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol * grow)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5 * grow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kv_scores_far_apart_every_cpu_isa(cpu_isa, dtype):
    """Queries of 1e28: scores ~1e28 apart, whose exponents underflow to 0 far below any unguarded
    polynomial's range (the AMX softmax masks exponents below -87.3): every CPU variant's decode
    (register path; 16 heads per kv head: the tiles under amx_bf16) and prefill (tiles under
    amx_bf16) attend to each row's largest score, as the float64 reference does, and stay finite."""
    torch.manual_seed(3)
    k, ks = quant.quantize_kv_int4(rand(1, 2, 100, 64, dtype=torch.float32, device="cpu"), 32)
    v, vs = quant.quantize_kv_int4(rand(1, 2, 100, 64, dtype=torch.float32, device="cpu"), 32)
    for hq in (4, 32):
        q = (rand(1, hq, 64, dtype=torch.float32, device="cpu") * 1e28).to(dtype)
        got, _ = int4_kv_decode(q, k, ks, v, vs, 100)
        want, _ = _reference(q.double(), k, ks, v, vs, 100, 64**-0.5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-2, atol=1e-2)
    q = (rand(1, 8, 40, 64, dtype=torch.float32, device="cpu") * 1e28).to(dtype)
    got, _ = int4_kv_attention(q, k, ks, v, vs, 100)
    want, _ = _attention_reference(q.double(), k, ks, v, vs, 100, 64**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-2, atol=1e-2)


def test_int4_kv_kernels_flush_denormals_only_during_the_call(cpu_isa):
    """Scores that lie more than 87 apart (queries x 20) make denormal probabilities and partial
    sums, which the kernels flush to zero for the call (FTZ / DAZ: x86 computes on denormals
    through microcode assists, 1.3x slower): decode and prefill still match the float64
    reference (within 1e-4: scores of ~100 carry fp32 rounding of ~6e-6 into each probability),
    and the caller's threads compute with denormals again after the call (their MXCSR restored)."""
    torch.manual_seed(5)
    k, ks = quant.quantize_kv_int4(rand(1, 2, 300, 64, dtype=torch.float32, device="cpu"), 32)
    v, vs = quant.quantize_kv_int4(rand(1, 2, 300, 64, dtype=torch.float32, device="cpu"), 32)
    q = rand(1, 8, 64, dtype=torch.float32, device="cpu") * 20
    got, lse = int4_kv_decode(q, k, ks, v, vs, 300)
    want, want_lse = _reference(q.double(), k, ks, v, vs, 300, 64**-0.5)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-4, atol=1e-4)
    qp = rand(1, 8, 40, 64, dtype=torch.float32, device="cpu") * 20
    got, _ = int4_kv_attention(qp, k, ks, v, vs, 300)
    want, _ = _attention_reference(qp.double(), k, ks, v, vs, 300, 64**-0.5)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)
    tiny = torch.full((1 << 16,), 1e-39)  # (a denormal; the product is one too)
    assert bool(((tiny * 2) > 0).all())


def test_int4_kv_attention_amx_query_blocks(amx_bf16):
    """The AMX prefill's tasks take 64 query tokens where each thread still gets two tasks, else 32:
    one thread (64), 64 threads (32) and 6 threads (64 for 300 new tokens, with a partial last
    block of 44) give the float64 reference's result, and each other's within fp32 rounding; fp32
    and bf16 queries, left padding."""
    k, ks, v, vs, st = _amx_cache(2, 4, 400, 64, 64, 32, [0, 37])
    before = torch.get_num_threads()
    try:
        for dtype, tol in ((torch.float32, 4e-6), (torch.bfloat16, 1e-2)):
            q = rand(2, 16, 300, 64, dtype=dtype, device="cpu", scale=2.0)
            ref, _ = _attention_reference(q.double(), k, ks, v, vs, 400, 64**-0.5, 0.0, None, st)
            outs = []
            for threads in (1, 64, 6):
                torch.set_num_threads(threads)
                out, _ = int4_kv_attention(q, k, ks, v, vs, 400, None, None, None, st)
                torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
                outs.append(out)
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(before)


# (b, hq, hkv, d, dv, group, t, starts): decode tasks of >= 8 query heads take the tiles too
AMX_DECODE_SHAPES = [
    (1, 16, 1, 576, 512, 64, 300, None),  # multi-head latent attention: two slices of 8 heads
    (2, 16, 2, 128, 128, 128, 200, [0, 150]),  # GQA groups of 8, left padding
    (2, 8, 1, 64, 64, 32, 77, None),  # a partial key block (batch 2: a task per thread)
]


@pytest.mark.parametrize("b,hq,hkv,d,dv,group,t,starts", AMX_DECODE_SHAPES)
def test_int4_kv_decode_amx_tiles(amx_bf16, b, hq, hkv, d, dv, group, t, starts):
    """Decode on AMX tiles (8 or more query heads per task, in one 16-row block: the one-row-block
    passes), against the float64 reference: fp32 queries at 4e-6, bf16 queries; soft-capping and
    sinks."""
    k, ks, v, vs, st = _amx_cache(b, hkv, t, d, dv, group, starts)
    sinks = torch.randn(hq)
    for dtype, tol in ((torch.float32, 4e-6), (torch.bfloat16, 1e-2)):
        for softcap, sk in ((None, None), (20.0, sinks)):
            q = rand(b, hq, d, dtype=dtype, device="cpu", scale=2.0)
            out, lse = int4_kv_decode(q, k, ks, v, vs, t, None, st, softcap, sk)
            ref, ref_lse = _reference(q.double(), k, ks, v, vs, t, d**-0.5, st, softcap or 0.0, sk)
            assert out.shape == (b, hq, dv) and out.dtype == dtype
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)


# (b, hq, hkv, d, dv, group, t, starts): decode with fewer (batch, kv head) tasks than threads
SPLIT_KV_SHAPES = [
    (2, 8, 2, 128, 128, 64, 1000, [0, 700]),  # GQA groups of 4; a row's ranges from its first token
    (1, 16, 1, 576, 512, 64, 900, None),  # multi-head latent attention, values in the key rows
    (1, 4, 1, 64, 64, 32, 600, [500]),  # 100 tokens to split: the second range is empty
    (2, 4, 1, 64, 64, 32, 600, [600, 0]),  # a row without tokens: every range empty
    (1, 6, 1, 40, 40, 8, 700, None),  # channels outside 16-chunks: the buffer path
]


@pytest.mark.parametrize("b,hq,hkv,d,dv,group,t,starts", SPLIT_KV_SHAPES)
def test_int4_kv_decode_split_kv_every_cpu_isa(cpu_isa, b, hq, hkv, d, dv, group, t, starts):
    """Split-KV decode: with more threads than (batch, kv head) tasks, each task's cached tokens
    are split in ranges of whole 128-token blocks whose partial softmax states merge into one
    (empty ranges add nothing; a row without tokens gets zeros and lse -inf). Against the float64
    reference and the one-thread result (no split), fp32 and bf16 queries, soft-capping."""
    k, ks, v, vs, st = _amx_cache(b, hkv, t, d, dv, group, starts)
    before = torch.get_num_threads()
    try:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            for softcap in (None, 20.0):
                q = rand(b, hq, d, dtype=dtype, device="cpu", scale=2.0)
                ref, ref_lse = _reference(q.double(), k, ks, v, vs, t, d**-0.5, st, softcap or 0.0)
                torch.set_num_threads(1)
                one = int4_kv_decode(q, k, ks, v, vs, t, None, st, softcap)
                for threads in (3, 8):
                    torch.set_num_threads(threads)
                    out, lse = int4_kv_decode(q, k, ks, v, vs, t, None, st, softcap)
                    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
                    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
                    torch.testing.assert_close(out, one[0], rtol=tol, atol=tol)
                    assert torch.equal(torch.isneginf(lse), torch.isneginf(one[1]))
                if starts is not None and t in starts:
                    row = starts.index(t)
                    assert bool((out[row] == 0).all()) and bool(torch.isneginf(lse[row]).all())
    finally:
        torch.set_num_threads(before)


# (hkv, GQA group, d, quantization group): groups of 1 to 8 query heads, d of 3 to 8 chunks
PREFILL_ROW_SHAPES = [
    (2, 1, 64, 32),
    (1, 3, 128, 128),
    (2, 4, 128, 64),
    (1, 5, 48, 16),
    (1, 8, 96, 32),
]


@pytest.mark.parametrize("d,group", [(64, 32), (40, 8)])
def test_int4_kv_attention_small_prefill_same_bits_on_any_threads_every_cpu_isa(cpu_isa, d, group):
    """A short prefill (64 tokens of 8 heads over their own 64: a small model's prompt) runs its
    tasks on threads too; each task's rows are its own sums, so one thread and several give the
    same bits, and they are the reference's (fp32, bf16 and fp16 queries; head dims in and out of
    the 16-channel order the AVX2 / AVX-512 paths permute queries and outputs through)."""
    t, hq, hkv = 64, 8, 2
    k, ks = quant.quantize_kv_int4(rand(1, hkv, t, d, dtype=torch.float32, device="cpu"), group)
    v, vs = quant.quantize_kv_int4(rand(1, hkv, t, d, dtype=torch.float32, device="cpu"), group)
    before = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = rand(1, hq, t, d, dtype=dtype, device="cpu")
        outs = []
        try:
            for threads in (1, max(before, 2)):
                torch.set_num_threads(threads)
                outs.append(int4_kv_attention(q, k, ks, v, vs, t))
        finally:
            torch.set_num_threads(before)
        (one, one_lse), (many, many_lse) = outs
        assert torch.equal(one, many) and torch.equal(one_lse, many_lse)
        ref, ref_lse = _attention_reference(q, k, ks, v, vs, t, d**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(one.float(), ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(one_lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hkv,group_heads,d,group", PREFILL_ROW_SHAPES)
def test_int4_kv_decode_is_the_prefills_last_row_every_cpu_isa(cpu_isa, hkv, group_heads, d, group):
    """A decode step (its GQA group dequantized in registers: up to 4 query heads per kv head on
    AVX2, 8 on AVX-512) and the last query row of a causal prefill over the same cache (2 query
    tokens: twice the rows, through the fp32 buffers) are the same attention: equal bit for bit
    on the scalar variant (the same sums in the same order), and to fp32 rounding on AVX2 /
    AVX-512, whose prefill scores tiles of 4 / 8 rows with one FMA chain per score over the
    channels (the decode sums each score across the vector lanes); fp32 and bf16 queries, with
    and without soft-capping. Under amx_bf16 the prefill multiplies on tiles (bf16 operands): not
    the same arithmetic, skipped."""
    if cpu_isa == "amx_bf16":
        pytest.skip("the AMX prefill rounds its operands to bf16")
    t, hq = 301, hkv * group_heads
    k, ks = quant.quantize_kv_int4(rand(1, hkv, t, d, dtype=torch.float32, device="cpu"), group)
    v, vs = quant.quantize_kv_int4(rand(1, hkv, t, d, dtype=torch.float32, device="cpu"), group)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # (no split-KV: one range per task, as in the prefill)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            q = rand(1, hq, 2, d, dtype=dtype, device="cpu", scale=2.0)
            for softcap in (None, 5.0):
                pre, pre_lse = int4_kv_attention(q, k, ks, v, vs, t, None, softcap)
                q1 = q[:, :, 1].contiguous()
                out, lse = int4_kv_decode(q1, k, ks, v, vs, t, None, None, softcap)
                if cpu_isa == "scalar":
                    assert torch.equal(out, pre[:, :, 1]) and torch.equal(lse, pre_lse[:, :, 1])
                    continue
                # (bf16 outputs: one rounding of nearly equal fp32 values, at most an ulp apart)
                tol = 1e-5 if dtype == torch.float32 else 2**-7
                torch.testing.assert_close(out, pre[:, :, 1], rtol=tol, atol=1e-6)
                torch.testing.assert_close(lse, pre_lse[:, :, 1], rtol=1e-6, atol=1e-6)
                assert not torch.equal(out, torch.zeros_like(out))
    finally:
        torch.set_num_threads(before)


def test_int4_kv_values_read_in_place_every_cpu_isa(cpu_isa):
    """Each CPU kernel variant reading the values from the key rows in place (register path,
    buffer path, head slices, channels outside 16-chunks), against the reference."""
    for b, hq, hkv, d, dv, group in KEY_ROW_SHAPES:
        k, ks, v, vs = _values_in_key_rows(b, hkv, 70, d, dv, group, "cpu")
        q = rand(b, hq, d, dtype=torch.float32, device="cpu")
        got, lse = int4_kv_decode(q, k, ks, v, vs, 66)
        want, want_lse = _reference(q, k, ks, v.contiguous(), vs.contiguous(), 66, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kv_cuda_kernels_take_other_values_and_left_padding(cuda_device, monkeypatch, dtype):
    """On CUDA, values of another head size (192 / 128), values read from the key rows (128 / 64,
    and multi-head latent attention's 576 / 512 with 16 query heads per latent: slices of 4
    heads), 12 query heads per kv head (slices of 8 and 4) and left-padded prefill (tensor-core and
    warp-per-row kernels) run the kernels, not the reference (made to fail here), and match the
    float64 reference computed first."""
    from fastlayers.ops import kvint4 as ops

    starts = torch.tensor([5, 0], dtype=torch.int32, device=cuda_device)
    cases = []
    for d, dv, hq, hkv, in_keys in ((192, 128, 8, 2, False), (128, 64, 4, 1, True),
                                    (128, 128, 8, 2, False), (64, 64, 4, 4, False),
                                    (576, 512, 16, 1, True), (128, 128, 12, 1, False)):  # fmt: skip
        if in_keys:
            k, ks, v, vs = _values_in_key_rows(2, hkv, 70, d, dv, 32, cuda_device)
        else:
            k, ks, v, vs = _cache_with_values(hkv, 70, d, dv, 32, cuda_device)
        q = rand(2, hq, d, dtype=dtype, device=cuda_device, scale=2.0)
        q3 = rand(2, hq, 20, d, dtype=dtype, device=cuda_device, scale=2.0)
        vc, vsc = v.contiguous(), vs.contiguous()
        want = _reference(q.double(), k, ks, vc, vsc, 66, d**-0.5, starts)
        want3 = _attention_reference(q3.double(), k, ks, vc, vsc, 66, d**-0.5, 0.0, None, starts)
        cases.append((k, ks, v, vs, q, q3, want, want3))

    def refused(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of a CUDA kernel")

    monkeypatch.setattr(ops, "_reference", refused)
    monkeypatch.setattr(ops, "_attention_reference", refused)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for k, ks, v, vs, q, q3, want, want3 in cases:
        for (out, lse), (ref, ref_lse) in (
            (int4_kv_decode(q, k, ks, v, vs, 66, None, starts), want),
            (int4_kv_attention(q3, k, ks, v, vs, 66, starts=starts), want3),
        ):
            assert out.dtype == dtype and out.shape[-1] == v.shape[-1] * 2
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)


# (d, dv, group, hq, hkv, values in the key rows): Phi-2's 80 (MHA: one query head per kv head),
# Phi-3's 96 with a GQA group of 3, 80 / 48 read from the key rows, 40 (2 channels on 20 lanes),
# 70 / 38 (the last key lane holding 2 of its 4 channels) and 250 / 96 (8 channels a lane for the
# keys, 4 for the values; 12 query heads: slices of 8 and 4)
CUDA_CORE_SHAPES = [
    (80, 80, 16, 4, 4, False),
    (96, 96, 32, 6, 2, False),
    (80, 48, 16, 4, 2, True),
    (40, 40, 8, 4, 2, False),
    (70, 38, 2, 4, 1, False),
    (250, 96, 2, 12, 1, False),
]


@pytest.mark.parametrize("d,dv,group,hq,hkv,in_keys", CUDA_CORE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kv_cuda_cores_take_any_even_head_dim(cuda_device, monkeypatch, dtype, d, dv, group,
                                                   hq, hkv, in_keys):  # fmt: skip
    """Head sizes that are not a multiple of 64 (Phi-2's 80, Phi-3's 96) run the CUDA-core decode
    and prefill (80 and 96 with values as wide: the tensor-core prefill), not the reference (made
    to fail): where a row is narrower than 32 lanes' worth of channels the lanes at its end reread
    its last ones with zero queries. Decode with left padding and soft-capping and a causal
    prefill over 20 query tokens, vs the float64 references computed first."""
    from fastlayers.ops import kvint4 as ops

    t, length = 70, 66
    starts = torch.tensor([5, 0], dtype=torch.int32, device=cuda_device)
    if in_keys:
        k, ks, v, vs = _values_in_key_rows(2, hkv, t, d, dv, group, cuda_device)
    else:
        k, ks, v, vs = _cache_with_values(hkv, t, d, dv, group, cuda_device)
    q = rand(2, hq, d, dtype=dtype, device=cuda_device, scale=2.0)
    q3 = rand(2, hq, 20, d, dtype=dtype, device=cuda_device, scale=2.0)
    vc, vsc = v.contiguous(), vs.contiguous()
    runs = []
    for cap in (0.0, 1.5):
        want = _reference(q.double(), k, ks, vc, vsc, length, d**-0.5, starts, cap)
        want3 = _attention_reference(q3.double(), k, ks, vc, vsc, length, d**-0.5, cap, None,
                                     starts)  # fmt: skip
        runs.append((cap, want, want3))

    def refused(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of a CUDA kernel")

    monkeypatch.setattr(ops, "_reference", refused)
    monkeypatch.setattr(ops, "_attention_reference", refused)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for cap, want, want3 in runs:
        for (out, lse), (ref, ref_lse) in (
            (int4_kv_decode(q, k, ks, v, vs, length, None, starts, cap), want),
            (int4_kv_attention(q3, k, ks, v, vs, length, starts=starts, softcap=cap), want3),
        ):
            assert out.dtype == dtype and out.shape[-1] == dv
            torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("hq,hkv,d,group", [(8, 2, 128, 32), (6, 3, 40, 8), (4, 4, 64, 64)])
def test_int4_kv_softcap_matches_reference(device, hq, hkv, d, group):
    """Gemma 2's logit soft-capping (``softcap * tanh(s / softcap)`` on the scaled scores) in the
    decode and prefill kernels vs the float64 reference, on scores several times the cap and
    scores far below it (a cap of 1e4 or 1e6: the CPU kernels' tanh, (e - 1) / (e + 1), lost the
    digits of a small argument to cancellation, an error of 1e-7 x cap in a score); a softcap of
    0 or None is none; bad values are refused."""
    t = 45
    k, ks, v, vs = _int4_cache(hkv, t, d, group, device)
    q = rand(2, hq, d, dtype=torch.float32, device=device, scale=10.0)
    q3 = rand(2, hq, 7, d, dtype=torch.float32, device=device, scale=10.0)
    for cap in (1.5, 30.0, 1e4, 1e6):
        out, lse = int4_kv_decode(q, k, ks, v, vs, t - 2, softcap=cap)
        ref, ref_lse = _reference(q.double(), k, ks, v, vs, t - 2, d**-0.5, None, cap)
        torch.testing.assert_close(out.double(), ref.double(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
        out, lse = int4_kv_attention(q3, k, ks, v, vs, t, softcap=cap)
        ref, ref_lse = _attention_reference(q3.double(), k, ks, v, vs, t, d**-0.5, cap)
        torch.testing.assert_close(out.double(), ref.double(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
    capped = int4_kv_decode(q, k, ks, v, vs, softcap=1.5)[1]
    for none in (None, 0.0):
        assert torch.equal(int4_kv_decode(q, k, ks, v, vs, softcap=none)[1],
                           int4_kv_decode(q, k, ks, v, vs)[1])  # fmt: skip
    assert not torch.allclose(capped, int4_kv_decode(q, k, ks, v, vs)[1])
    for bad, error in ((-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                       ("2", TypeError), (True, TypeError)):  # fmt: skip
        with pytest.raises(error, match="softcap"):
            int4_kv_decode(q, k, ks, v, vs, softcap=bad)
        with pytest.raises(error, match="softcap"):
            int4_kv_attention(q3, k, ks, v, vs, softcap=bad)
    if device == "cpu":
        opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_decode.default,
                                (q, k, ks, v, vs, t, d**-0.5, None, 1.5))  # fmt: skip
        opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_kv_attention.default,
                                (q3, k, ks, v, vs, t, d**-0.5, 1.5))  # fmt: skip


def test_hugging_face_query_side_kernel_and_autograd_routes_agree():
    """Without grad the Hugging Face attention quantizes the queries in one kernel pass
    (q_quantize); with a query that needs grad, by the differentiable PyTorch composition: the
    same logits (fp32 model), and the backward reaches every projection."""
    model = _model()
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(1, 256, (1, 48))])
    plain = copy.deepcopy(model)  # the same folded weights, attending in float
    quant.apply_rope_aware_kv(plain, post, q_fp8=False, quantize_keys=False,
                              quantize_values=False)  # fmt: skip
    quant.apply_rope_aware_kv(model, post)
    ids = torch.randint(1, 256, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
    got = model(ids).logits
    assert got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.float().pow(2).mean().backward()
    # every projection trains: the INT4 round trip of keys and values passes the gradient
    # straight through (its byte packing has none), close to the float model's gradient
    plain(ids).logits.float().pow(2).mean().backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        grad = getattr(model.model.layers[0].self_attn, name).weight.grad
        want = getattr(plain.model.layers[0].self_attn, name).weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()), name
        assert _rel(grad, want) < 0.5, (name, _rel(grad, want))


def test_one_token_mask_is_none_when_nothing_is_hidden():
    """The integration's mask: eager attention's additive mask, but None for one query token
    that nothing hides (the decode step then looks at no mask tensor)."""
    from transformers.masking_utils import causal_mask_function, eager_mask

    from fastlayers.quant.rope_kv_hf import _mask

    kw = dict(batch_size=2, q_length=1, kv_length=6, q_offset=5, kv_offset=0,
              mask_function=causal_mask_function, attention_mask=torch.ones(2, 6, dtype=torch.bool),
              allow_is_causal_skip=True, dtype=torch.float32, config=None, use_vmap=False,
              device="cpu")  # fmt: skip
    assert _mask(**kw) is None
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    for change in (
        dict(attention_mask=pad),
        dict(attention_mask=pad, dtype=torch.bfloat16),
        dict(q_length=3, q_offset=3),  # prefill: causal, never None for eager attention
        dict(allow_is_causal_skip=False),  # (HF's custom mask functions)
    ):
        args = {**kw, **change}
        got, want = _mask(**args), eager_mask(**args)
        assert got is not None and got.dtype == want.dtype and torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_runs_the_int4_attention_kernel(monkeypatch, padded):
    """A prompt into an Int4KVCache: with nothing but causality to mask, each layer attends with
    the causal INT4 kernel over the cache just written (int4_kv_attention); a left-padded batch
    too, each row's padding skipped (``starts``; it took the general path before: dequantized
    cache, eager attention with the mask). Both give the logits of the same model without a
    cache (quantized in the attention, eager attention)."""
    from fastlayers.quant import rope_kv_hf

    calls = []
    real = rope_kv_hf.int4_kv_attention

    def counting(*args, **kwargs):
        starts = args[9] if len(args) > 9 else kwargs.get("starts")
        calls.append((tuple(args[0].shape), None if starts is None else starts.tolist()))
        return real(*args, **kwargs)

    monkeypatch.setattr(rope_kv_hf, "int4_kv_attention", counting)
    model = _model()
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(1, 256, (1, 48))])
    quant.apply_rope_aware_kv(model, post)
    ids = torch.randint(1, 256, (2, 17))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
    cache = quant.Int4KVCache.for_model(model)
    got = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert calls == [((2, 8, 17, 32), [4, 0] if padded else None)] * 3
    assert cache.get_seq_length() == 17
    want = model(ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()  # (the padding positions' logits aside)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
