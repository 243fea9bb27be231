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

import warnings

import pytest
import torch
from conftest import property_settings
from hypothesis import given
from hypothesis import strategies as st
from test_bad_input_sweep import API, CASES, TRAINING

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


@pytest.mark.parametrize("name", sorted(CASES) + sorted(API) + sorted(TRAINING))
@FUZZ
@given(data=st.data())
def test_random_bad_input_raises_value_or_type_error(name, data):
    fn, args = {**CASES, **API, **TRAINING}[name]
    which = data.draw(
        st.lists(st.integers(0, len(args) - 1), min_size=1, max_size=min(3, len(args)),
                 unique=True),
        label="arguments changed",
    )  # fmt: skip
    call = list(args)
    for i in which:
        call[i] = _mutate(args[i], data, small=name in API)
    # the backward too, where an op has one: float arguments that require grad (not for the ops
    # that write into an argument, which autograd refuses for a leaf that requires grad)
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
