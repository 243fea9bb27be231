# SPDX-License-Identifier: Apache-2.0
"""Random bad input, several arguments at once: the sweep of test_bad_input_sweep.py replaces one
argument at a time by a canned wrong value; here hypothesis changes one to three arguments of a
valid call together (new sizes of the same rank, a rank more or less, other dtypes, other strides,
integer tensors of out-of-range or negative values, non-finite floats, odd scalars), so that
arguments which agree with each other but not with the rest (a q and a cache both resized, a
block table and its lengths both changed) reach the checks too.

The call must work or raise ValueError/TypeError; nothing else may escape, and nothing may read or
write out of bounds (CI runs this file under AddressSanitizer, the CUDA kernels emulated too).
Whether a working call computes the right thing is the family and property tests' business.
``FASTLAYERS_PROPERTY_EXAMPLES=N``: N random examples per op instead of the derandomized ones.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
from conftest import property_settings
from hypothesis import given
from hypothesis import strategies as st
from test_bad_input_sweep import API, CASES, TRAINING

import fastlayers
from _tolerances import ATOL
from fastlayers.ops import _common

pytestmark = pytest.mark.usefixtures("kernels")  # (conftest: CPU, and emulated CUDA kernels)
FUZZ = property_settings(40)


_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
]
_SCALARS = [0, 1, -1, 2, 3, 7, 64, 4097, 10**6, 0.5, -0.5, 1e-30, 1e30, float("nan"), float("inf")]
# (sizes of a constructor or a plan: none that allocates gigabytes, as torch.nn.Linear would)
_SMALL_SCALARS = [0, 1, -1, 2, 3, 7, 0.5, -0.5, float("nan"), float("inf")]


def _fresh(a: torch.Tensor, shape, dtype, data) -> torch.Tensor:
    """A new tensor of ``shape`` and ``dtype`` with values like ``a``'s: random floats, random
    bytes, integers around ``a``'s range (negatives and values past it included)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="values"))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype in (torch.int32, torch.int64):
        top = int(a.max()) if a.numel() and not a.is_floating_point() else 16
        lo, hi = data.draw(st.sampled_from([(0, top + 1), (-3, top + 4), (top, 2 * top + 9)]))
        return torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def _mutate_tensor(a: torch.Tensor, data) -> torch.Tensor:
    how = data.draw(
        st.sampled_from(["sizes", "rank", "dtype", "values", "strides", "non-finite"]), label="how"
    )
    if how == "sizes":
        shape = [
            data.draw(st.sampled_from(sorted({n, 0, 1, max(n - 1, 0), n + 1, 2 * n, 7})))
            for n in a.shape
        ]
        return _fresh(a, shape, a.dtype, data)
    if how == "rank":
        shape = list(a.shape)
        if shape and data.draw(st.booleans(), label="drop a dim"):
            shape.pop(data.draw(st.integers(0, len(shape) - 1)))
        else:
            shape.insert(data.draw(st.integers(0, len(shape))), data.draw(st.sampled_from([1, 2])))
        return _fresh(a, shape, a.dtype, data)
    if how == "dtype":
        return _fresh(a, a.shape, data.draw(st.sampled_from(_DTYPES), label="dtype"), data)
    if how == "values":
        return _fresh(a, a.shape, a.dtype, data)
    if how == "strides":  # the same values in a non-contiguous view
        if a.dim() == 0:
            return a
        buf = torch.zeros(*a.shape[:-1], 2 * a.shape[-1] + 1, dtype=a.dtype)
        view = buf[..., 1::2]
        view.copy_(a)
        return view
    if not a.is_floating_point():  # non-finite: floats only
        return a
    out = a.clone()
    if out.numel():
        flat = out.view(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30])
        )
    return out


def _mutate(arg, data, small: bool):
    if isinstance(arg, torch.Tensor):
        return _mutate_tensor(arg, data)
    if isinstance(arg, bool):
        return data.draw(st.sampled_from([None, 0, 2]))
    if isinstance(arg, (int, float)):
        return data.draw(st.sampled_from(_SMALL_SCALARS if small else _SCALARS), label="scalar")
    if arg is None:
        return data.draw(st.sampled_from([0.5, 3, "x"]))
    return data.draw(st.sampled_from([None, 3, "x"]))


def _random_call(name: str, data) -> tuple[list, bool]:
    """Case ``name``'s valid arguments with one to three of them changed at random, and whether
    to run the backward too: always for the training cases; at random for the ops and modules,
    with their float arguments then requiring grad (not for the ops that write into an argument,
    which autograd refuses for a leaf that requires grad)."""
    args = {**CASES, **API, **TRAINING}[name][1]
    which = data.draw(
        st.lists(st.integers(0, len(args) - 1), min_size=1, max_size=min(3, len(args)),
                 unique=True),
        label="arguments changed",
    )  # fmt: skip
    call = list(args)
    for i in which:
        call[i] = _mutate(args[i], data, small=name in API)
    in_place = name.endswith("_") or "out=" in name or name.startswith("kv_cache_write")
    grad = name in TRAINING or (
        name in CASES and not in_place and data.draw(st.booleans(), label="backward")
    )
    if grad and name in CASES:
        call = [
            a.detach().requires_grad_()
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype.itemsize > 1
            else a
            for a in call
        ]
    return call, grad


@pytest.mark.parametrize("name", sorted(CASES) + sorted(API) + sorted(TRAINING))
@FUZZ
@given(data=st.data())
def test_random_bad_input_raises_value_or_type_error(name, data):
    fn = {**CASES, **API, **TRAINING}[name][0]
    call, grad = _random_call(name, data)
    try:
        with warnings.catch_warnings(), torch.set_grad_enabled(grad):
            warnings.simplefilter("ignore")
            out = fn(*call)
            outs = out if isinstance(out, (tuple, list)) else [out]
            loss = [o.float().sum() for o in outs if torch.is_tensor(o) and o.requires_grad]
            if loss:
                torch.autograd.backward(loss)
    except (ValueError, TypeError):
        pass
    except RuntimeError as e:  # (the inference ops' one documented error: autograd's type)
        if "has no backward" not in str(e):
            raise


def test_found_by_the_fuzz():
    """What the random search found, kept as plain cases: a cache of no kv heads (the check's
    ``hq % hkv`` divided by zero) and a RoPE fold with head_dim 0."""
    from fastlayers import quant
    from fastlayers.ops.kvint4 import int4_kv_decode
    from fastlayers.ops.kvint4_paged import int4_kv_attention_paged

    fn, args = CASES["int4_kv_attention_paged"]
    no_heads = torch.zeros(args[1].shape[0], 0, *args[1].shape[2:], dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of kv heads \\(0"):
        int4_kv_attention_paged(args[0], no_heads, *args[2:])
    _, args = CASES["int4_kv_decode"]
    with pytest.raises(ValueError, match="multiple of kv heads \\(0"):
        int4_kv_decode(args[0], *(t[:, :0] for t in args[1:5]), *args[5:])
    q, k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="does not fit"):
        quant.fold_pre_rope(q, k, torch.ones(1, 0))


@pytest.mark.parametrize("route", ["kernels", "reference"])
def test_found_by_the_differential_fuzz(route, monkeypatch):
    """Calls the kernels took but the reference refused (the differential test below): a KV
    write of head_dim 0 (the reference's quantize_kv_int4 wants an even head_dim > 0), and an FP8
    query (whose output would be FP8; the reference's gathers have no FP8 kernel): ValueError on
    both routes now."""
    from fastlayers.ops.kvint4 import kv_quantize

    if route == "reference":
        monkeypatch.setattr(fastlayers._ext, "C", None)
    with pytest.raises(ValueError, match="head_dim > 0"):
        kv_quantize(torch.randn(1, 2, 3, 0), 16)
    for name in ("int4_kv_decode", "int4_kv_attention", "int4_kv_decode_paged",
                 "int4_kv_attention_paged", "int4_kv_attention_paged_varlen",
                 "int4_kv_attention_paged_planned"):  # fmt: skip
        fn, args = CASES[name]
        with pytest.raises(ValueError, match="q must be a float32/float16/bfloat16/float64"):
            fn(args[0].to(torch.float8_e4m3fn), *args[1:])


def test_a_float64_query_runs_the_float64_reference(monkeypatch):
    """A float64 query to the INT4-KV attention ops: the kernels' route ran the fp32 kernels (a
    float64 output of fp32 precision), the route without kernels the float64 reference (found by
    the differential fuzz, 3e-6 apart); both run the reference now, bit for bit the same."""
    names = ("int4_kv_decode", "int4_kv_decode(softcap)", "int4_kv_attention",
             "int4_kv_decode_paged", "int4_kv_attention_paged", "int4_kv_attention_paged_varlen",
             "int4_kv_attention_paged_planned")  # fmt: skip
    got = {}
    for route in ("kernels", "reference"):
        with monkeypatch.context() as m:
            if route == "reference":
                m.setattr(fastlayers._ext, "C", None)
            for name in names:
                fn, args = CASES[name]
                got[route, name] = fn(args[0].double(), *args[1:])
    for name in names:
        for a, b in zip(got["kernels", name], got["reference", name], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert got["kernels", name][0].dtype == torch.float64


@pytest.mark.parametrize(
    "name,index,bad,error",
    [
        ("peer_retrieve", 2, 0.5, ValueError),  # topk
        ("peer_retrieve", 3, None, ValueError),  # score
        ("ultrafast_ff", 4, None, ValueError),  # activation
        ("int4_fp8_gemm", 4, None, TypeError),  # out_dtype
    ],
)
def test_bad_scalars_with_inputs_that_require_grad(name, index, bad, error):
    """Inputs that require grad take the op through the dispatcher, whose schema raised
    RuntimeError for a scalar of the wrong type before the library's own check (found by the
    fuzz): the checks now come first on that path too."""
    fn, args = CASES[name]
    call = [a.detach().requires_grad_() if torch.is_tensor(a) and a.dtype == torch.float32 else a
            for a in args]  # fmt: skip
    call[index] = bad
    with pytest.raises(error):
        fn(*call)


# ----------------------------------------------------------------------------------------------
# A working call's result: the kernels against the op's own reference route
# ----------------------------------------------------------------------------------------------
def _copy(a):
    """``a`` again, same values and strides, its own memory (requires_grad kept); an object that
    holds state (a paged cache, a plan) deep-copied."""
    if not isinstance(a, torch.Tensor):
        return a if isinstance(a, (int, float, str, torch.dtype, type(None))) else copy.deepcopy(a)
    c = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a.detach())
    return c.requires_grad_(a.requires_grad)


def _run(fn, call, grad):
    """``(outputs, the tensor arguments after the call, their gradients and those of a module's
    parameters)`` of ``fn`` on a copy of ``call``, or the error it raised."""
    call = [_copy(a) for a in call]
    try:
        with warnings.catch_warnings(), torch.set_grad_enabled(grad):
            warnings.simplefilter("ignore")
            out = fn(*call)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            loss = [o.float().sum() for o in outs if torch.is_tensor(o) and o.requires_grad]
            if loss:
                torch.autograd.backward(loss)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        return e
    tensors = [a for a in call if torch.is_tensor(a)]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return (
        [o.detach() if torch.is_tensor(o) else o for o in outs],
        [a.detach() for a in tensors],
        [a.grad for a in tensors + params if a.requires_grad],
    )


# An ill-conditioned call (scores of 1e6, whose fp32 ulp moves the softmax) may differ by this many
# times the reference's own error (the fp32 reference against the float64 one): one sample of
# that error can fall a few times below its usual size (the reference normalized by its computed
# sum, c46ac0d, is the more accurate one), and the kernels' scores may carry a few more roundings
# than torch's (at softcap saturation, 2.4 against 1.0 units of the dot's condition). 4 failed
# once in 57,000 calls, at 7.2 (int4_kv_decode at scale and softcap 1e6: 4.4e-2 against 6.1e-3).
# It still catches a defect of the kind found here: the CPU soft-cap's cancellation (3f75bb3) was
# 2.6e-4 off where the reference's own error was about 1e-7.
_OWN = 16

# the largest difference allowed, relative to the largest finite value of the reference's result:
# a few roundings of the result's dtype (the kernels sum in another order), one FP8 step
_RTOL = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
    torch.float8_e4m3fn: 0.13,
}


def _fields(obj):
    """A result that is neither a tensor nor a sequence (a dataclass of tensors) as a list."""
    if dataclasses.is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return None


def _agree(got, want, where: str, loose: bool | str = False, exact=None) -> None:
    """``got`` is ``want`` up to rounding: the same type, shape and dtype; integers and bytes
    equal; floats non-finite where ``want`` is (infinities of the same sign), the finite values
    within ``_RTOL`` of the largest (plus the dtype's ``ATOL``), or within ``_OWN`` x the
    reference's own error where ``exact`` (the reference in float64) says how large that is.
    ``loose`` (a call with non-finite or huge input): non-finite at most where ``want`` is, values
    not compared (``"gradient"``: nothing compared)."""
    if not torch.is_tensor(want):
        if isinstance(want, (list, tuple)) or _fields(want) is not None:
            g = got if isinstance(got, (list, tuple)) else _fields(got)
            w = want if isinstance(want, (list, tuple)) else _fields(want)
            e = exact if isinstance(exact, (list, tuple)) else _fields(exact)
            assert g is not None and len(g) == len(w), where
            for i in range(len(w)):
                sub = e[i] if e is not None and len(e) == len(w) else None
                _agree(g[i], w[i], f"{where}[{i}]", loose, sub)
        else:
            assert not torch.is_tensor(got) and got == want, f"{where}: {got!r} != {want!r}"
        return
    assert torch.is_tensor(got), where
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (
        f"{where}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
    )
    if not want.is_floating_point():
        bad = int((got != want).sum())
        assert bad == 0, f"{where}: {bad} of {want.numel()} values differ"
        return
    g, w = got.double(), want.double()
    fin = torch.isfinite(w)
    if loose:  # non-finite at most where the reference is (gradients: not checked); no values
        assert loose == "gradient" or not bool((~torch.isfinite(g) & fin).any()), where
        return
    # (NaN for inf allowed: inf - inf in a running softmax is NaN where logsumexp is inf)
    assert torch.equal(torch.isfinite(g), fin), f"{where}: non-finite values differ"
    inf = w.isinf() & g.isinf()
    assert torch.equal(g[inf], w[inf]), f"{where}: infinities of the other sign"
    if bool(fin.any()):
        scale = w[fin].abs().max().item()
        err = (g[fin] - w[fin]).abs().max().item()
        allowed = _RTOL[want.dtype] * scale + ATOL.get(want.dtype, 1e-6)
        if torch.is_tensor(exact) and exact.shape == want.shape and exact.is_floating_point():
            own = (w - exact.double()).abs()[fin]
            own = own[torch.isfinite(own)]  # (float64 may stay finite where the dtype overflowed)
            allowed = max(allowed, _OWN * own.max().item() if own.numel() else 0.0)
        assert err <= allowed, (
            f"{where}: max difference {err:.3e} (allowed {allowed:.3e}), the reference's values "
            f"up to {scale:.3e}"
        )


def _own(fn):
    """A module's copy, or a copy of the module whose method ``fn`` is (each run gets its own
    parameter gradients, and a module keeps plans for its kernels, which the reference route must
    not find); ``fn`` itself otherwise."""
    if isinstance(fn, torch.nn.Module):
        return copy.deepcopy(fn)
    if isinstance(getattr(fn, "__self__", None), torch.nn.Module):
        return getattr(copy.deepcopy(fn.__self__), fn.__name__)
    return fn


def _float64(a):
    """``a`` in float64 if it is a 16- or 32-bit float tensor (or a module of them)."""
    if isinstance(a, torch.nn.Module):
        return copy.deepcopy(a).double()
    if torch.is_tensor(a) and a.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def _extreme(call) -> bool:
    """Whether a float argument holds a NaN, an infinity or a value of 1e29 or more."""
    return any(
        torch.is_tensor(a) and a.is_floating_point() and a.numel() > 0
        and not bool((a.detach().double().abs() < 1e29).all())
        for a in call
    )  # fmt: skip


# Ops that select by score (the top-k experts): with a NaN, an infinity or a huge value in the
# input the scores may be NaN or tie (a query normalized to zeros), and which experts win is not
# specified: their results are not compared then.
_SELECTING = {"peer_retrieve", "PEER", "PEER (train)"}


# the API entries that reach the kernels: the attention module's forwards, contiguous and paged
# (a cache and a plan deep-copied for each run); the quantization helpers, plans and constructors
# are pure PyTorch, the same code on both routes
_KERNEL_API = ["RopeAwareQuantAttention", "RopeAwareQuantAttention.forward_paged"]


@pytest.mark.parametrize("name", sorted(CASES) + _KERNEL_API + sorted(TRAINING))
@FUZZ
@given(data=st.data())
def test_random_valid_variants_match_the_reference(name, data, monkeypatch):
    """The random calls of the test above that work: the kernels' results (outputs, arguments
    written in place, gradients) are the reference route's for the same call (the op with the
    compiled kernels switched off), up to rounding; where the kernels run, the reference must run
    too. Non-finite values where the reference has them.

    A call with a NaN, an infinity or a value of 1e29 or more in its input is checked for less
    (its outputs non-finite at most where the reference's are, its gradients not at all; the
    non-finite property tests check how NaN and inf propagate exactly, on their own inputs): how
    far a NaN spreads is the formulation's (the dense reference multiplies the masked entries too,
    0 x NaN, so a NaN value row reaches every query of its sequence there, only the queries that
    see it in the kernels; a row of scores [inf, -inf] has lse NaN in the kernels, inf in the
    reference), and scores of 1e29 turn one ulp into a different softmax (two keys that tie in the
    reference's sums differ by an ulp in the kernels' group-scaled ones)."""
    fn = {**CASES, **API, **TRAINING}[name][0]
    call, grad = _random_call(name, data)
    got = _run(_own(fn), call, grad)
    if isinstance(got, Exception):
        return
    with monkeypatch.context() as m:
        m.setattr(fastlayers._ext, "C", None)
        want = _run(_own(fn), call, grad)
        # the reference in float64, where it takes that: its own rounding error is the yardstick
        # of an ill-conditioned call (scores of 1e6, whose fp32 ulp changes the softmax)
        exact = _run(_float64(fn), [_float64(a) for a in call], grad)
    if isinstance(want, ValueError) and _common.on_cuda(torch.device("cpu")):
        return  # (the CUDA route checks no values on the host, which would synchronize)
    assert not isinstance(want, Exception), f"the kernels ran, the reference raised {want!r}"
    extreme = _extreme(call)
    if name in _SELECTING and extreme:
        return
    exact = (None, None, None) if isinstance(exact, Exception) else exact
    for part, g, w, e in zip(("output", "argument", "gradient"), got, want, exact, strict=True):
        assert len(g) == len(w), part
        for i in range(len(w)):
            sub = e[i] if e is not None and len(e) == len(w) else None
            _agree(g[i], w[i], f"{part} {i}", loose=extreme and part, exact=sub)


@pytest.mark.parametrize("route", ["kernels", "reference"])
def test_tied_large_scores_share_the_weight(route, monkeypatch):
    """Keys whose scores tie at 39375 (exact in fp32, whatever the summation order): each query's
    output is the mean of the values it sees. The references' ``exp(s - lse)`` was off by the
    lse's rounding (ulp 4e-3 here: outputs 2e-3 relative off; two tied keys beyond 1e7 each got
    weight 1); the kernels' online softmax was right. Found reviewing the differential fuzz."""
    from fastlayers.ops import kvint4
    from fastlayers.quant.rope_kv import dequantize_kv_int4, quantize_kv_int4

    if route == "reference":
        monkeypatch.setattr(fastlayers._ext, "C", None)
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, t, d, tq = 2, 4, 2, 7, 32, 3
    # int4 7 x fp8 scale 9/64 = 63/64; q . k = 32 x 1250 x 63/64: every partial sum exact
    k, ks = quantize_kv_int4(torch.ones(b, hkv, t, d), 32)
    v, vs = quantize_kv_int4(torch.randn(b, hkv, t, d, generator=g), 32)
    values = dequantize_kv_int4(v, vs, torch.float64).repeat_interleave(hq // hkv, 1)
    assert torch.equal(dequantize_kv_int4(k, ks), torch.full((b, hkv, t, d), 63 / 64))
    seen = torch.arange(1, t + 1, dtype=torch.float64)  # key 0 .. i: the mean of a prefix
    prefix_mean = values.cumsum(2) / seen[:, None]

    def close(got, want):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    q = torch.full((b, hq, d), 1250.0)
    sinks = torch.zeros(hq)  # (exp(0 - 39375) = 0: the same outputs)
    close(kvint4.int4_kv_decode(q, k, ks, v, vs, t, 1.0)[0], prefix_mean[:, :, -1])
    close(kvint4.int4_kv_decode(q, k, ks, v, vs, t, 1.0, sinks=sinks)[0], prefix_mean[:, :, -1])
    close(kvint4._reference(q, k, ks, v, vs, t, 1.0, sinks=sinks)[0], prefix_mean[:, :, -1])
    qt = torch.full((b, hq, tq, d), 1250.0)
    close(kvint4.int4_kv_attention(qt, k, ks, v, vs, t, 1.0)[0], prefix_mean[:, :, -tq:])
    close(kvint4._attention_reference(qt, k, ks, v, vs, t, 1.0, sinks=sinks)[0],
          prefix_mean[:, :, -tq:])  # fmt: skip

    # varlen: two sequences of t tokens, causal by position
    qv = torch.full((2 * t, hq, d), 1250.0)
    kv = torch.full((2 * t, hkv, d), 63 / 64)
    vv = values[:, ::2].permute(0, 2, 1, 3).reshape(2 * t, hkv, d).float()
    cu = torch.tensor([0, t, 2 * t], dtype=torch.int32)
    pos = torch.arange(t, dtype=torch.int32).repeat(2)
    want = prefix_mean.permute(0, 2, 1, 3).reshape(2 * t, hq, d)
    close(fastlayers.varlen_attention(qv, kv, vv, cu, cu, pos, pos, scale=1.0), want)
    close(fastlayers.varlen_attention(qv, kv, vv, cu, cu, pos, pos, scale=1.0, sinks=sinks), want)
    close(fastlayers.reference.varlen_attention(qv, kv, vv, cu, cu, pos, pos, scale=1.0), want)
