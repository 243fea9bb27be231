# SPDX-License-Identifier: Apache-2.0
"""GPUs whose blocks may have 99 KiB of shared memory (sm86 / sm89: RTX 30xx / 40xx, A10, L4,
L40S), against the 227 KiB of an H100: the tensor-core attention kernels that need more than that
fall back to their CUDA-core kernels and those that fit stay on tensor cores, both matching the
float64 references. These tests run on such a GPU, or in the CUDA emulation told it has 99 KiB
(``FASTLAYERS_CUDA_EMU_OPTIN_SMEM=101376``: ``.ci/run`` runs this file so), and skip elsewhere.
In the emulation the launches are counted."""

import os

import pytest
import torch

from _emu import launches_since
from _tolerances import rand
from fastlayers import quant
from fastlayers.ops.kvint4 import _attention_reference, int4_kv_attention
from test_skip import VARLEN_KERNELS, _check, _check_backward, _routed

SMALL = 99 * 1024  # sm86 / sm89's cudaDevAttrMaxSharedMemoryPerBlockOptin
KV = ("kernel", "prefill_kernel", "prefill_latent_tc_kernel")  # ("kernel": cuda::tc::launch's)


def _optin_smem(device) -> int:
    if device == "cpu":  # cuda_device's emulation
        return int(os.environ.get("FASTLAYERS_CUDA_EMU_OPTIN_SMEM") or 232448)
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0)


@pytest.fixture
def small_smem_device(cuda_device):
    if _optin_smem(cuda_device) != SMALL:
        pytest.skip("needs a GPU (or the emulation) whose blocks may have 99 KiB of shared memory")
    return cuda_device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_head_dim_256_on_cuda_cores(small_smem_device, dtype):
    """Head dim 256: the tensor-core forward (~100 KiB) and backward (134 KiB) do not fit; the
    CUDA-core kernels (80 KiB opted in) run both, causal and windowed + soft-capped."""
    q, k, v, cu, pos = _routed(3, 150, 0.5, 4, 2, 256, dtype, small_smem_device)
    before = launches_since(VARLEN_KERNELS)
    _check(q, k, v, cu, cu, pos, pos)
    _check_backward(q, k, v, cu, pos, causal=False, window=(3, 5), softcap=2.0)
    added = launches_since(VARLEN_KERNELS, before)
    assert added is None or added == [0, 2, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_tensor_cores_where_they_fit(small_smem_device, dtype):
    """Keys of 192 with values of 128 (forward 67 KiB, backward 86 KiB) and head dim 128 (52 and
    70 KiB) stay on tensor cores: forward, dK/dV and dQ launches, no CUDA-core kernel."""
    before = launches_since(VARLEN_KERNELS)
    for d, dv in ((192, 128), (128, 128)):
        q, k, v, cu, pos = _routed(2, 140, 0.5, 4, 2, d, dtype, small_smem_device, dv=dv)
        _check(q, k, v, cu, cu, pos, pos, causal=False, window=(7, 3), softcap=2.0)
        _check_backward(q, k, v, cu, pos)
    added = launches_since(VARLEN_KERNELS, before)
    assert added is None or added == [8, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kv_prefill_head_dim_256(small_smem_device, dtype):
    """INT4 KV prefill at head dim 256: the shared tile for 16-bit queries takes exactly 99 KiB
    (Q, K and V tiles of 64 rows) and runs on tensor cores; fp32 queries' (+ Q's lo part) do not
    fit and go to the warp-per-row kernel. Both against the float64 reference."""
    b, hq, hkv, t, tq, d, group = 1, 4, 2, 150, 70, 256, 32
    dev = small_smem_device
    q = rand(b, hq, tq, d, dtype=dtype, device=dev)
    k, ks = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=dev), group)
    v, vs = quant.quantize_kv_int4(rand(b, hkv, t, d, dtype=torch.float32, device=dev), group)
    before = launches_since(KV)
    out, lse = int4_kv_attention(q, k, ks, v, vs)
    added = launches_since(KV, before)
    assert added is None or added == ([1, 0, 0] if dtype == torch.bfloat16 else [0, 1, 0])
    ref, ref_lse = _attention_reference(q.double(), k, ks, v, vs, t, d**-0.5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kv_prefill_latent_on_cuda_cores(small_smem_device, dtype):
    """Multi-head latent attention's prefill (576-channel key rows, values read in place): the
    tensor-core kernel's 110 KiB (146 with fp32 queries) do not fit; the warp-per-row kernel
    runs it, against the float64 reference."""
    b, hq, t, tq, d, dv, group = 1, 2, 100, 40, 576, 512, 64
    dev = small_smem_device
    k, ks = quant.quantize_kv_int4(rand(b, 1, t, d, dtype=torch.float32, device=dev), group)
    v, vs = k[..., : dv // 2], ks[..., : dv // group]  # the key rows' first 512 channels
    q = rand(b, hq, tq, d, dtype=dtype, device=dev)
    before = launches_since(KV)
    out, lse = int4_kv_attention(q, k, ks, v, vs)
    added = launches_since(KV, before)
    assert added is None or added == [0, 1, 0]
    ref, ref_lse = _attention_reference(q.double(), k, ks, v.contiguous(), vs.contiguous(), t,
                                        d**-0.5)  # fmt: skip
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
