# SPDX-License-Identifier: Apache-2.0
"""The CUDA emulation (tests/cuda_emu) catches what it claims to: kernels with a missing barrier,
a block reading another block's output of the same launch, an undefined shuffle, a deadlock,
barriers at divergent call sites, a launch over its bounds or over the shared memory it opted into
(tests/cuda_emu/selftest.cu), next to their correct twins; multiply-adds are fused as nvcc fuses
them; a shuffle of a type CUDA's cannot move does not compile. Emulation builds only."""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastlayers import _ext

pytestmark = pytest.mark.cuda_emu


def _run(which: int, out: torch.Tensor | None = None):
    out = torch.full((64,), float("nan")) if out is None else out
    return _ext.C.cuda_emu_selftest(which, out.data_ptr()), out


def test_a_missing_barrier_shows_in_one_of_the_two_thread_orders():
    expected = torch.full((64,), 63.0)
    for _ in range(2):  # consecutive blocks run their threads first to last, then last to first
        message, out = _run(0)
        assert message == "ok" and torch.equal(out, expected)
    results = [_run(1) for _ in range(2)]
    assert all(message == "ok" for message, _ in results)
    assert any(not torch.equal(out, expected) for _, out in results)


def test_a_missing_barrier_shows_with_a_warp_collective_between_write_and_read():
    # the warps run one at a time between block barriers, so a shuffle (a warp's own barrier)
    # does not hide the race with the other warp
    i = torch.arange(64)
    expected = ((i ^ 1) + (63 - i)).float()
    for _ in range(2):
        message, out = _run(14)
        assert message == "ok" and torch.equal(out, expected)
    results = [_run(15) for _ in range(2)]
    assert all(message == "ok" for message, _ in results)
    assert all(not torch.equal(out, expected) for _, out in results)  # (each order: one warp first)


def test_a_block_reading_another_blocks_output_shows_in_one_of_the_two_block_orders():
    # consecutive launches of a kernel run their blocks first to last, then last to first
    results = [_run(9) for _ in range(2)]
    assert all(message == "ok" for message, _ in results)
    assert all(torch.equal(out[:32], torch.ones(32)) for _, out in results)
    copies = [out[32:] for _, out in results]
    assert any(torch.equal(c, torch.ones(32)) for c in copies)
    assert any(c.isnan().all() for c in copies)


def test_a_full_mask_shuffle_needs_every_lane():
    message, out = _run(2)
    assert message == "ok"
    lanes = torch.arange(64.0)
    assert torch.equal(out, lanes + (torch.arange(64) ^ 1).float())
    message, _ = _run(3)  # 48 threads: the second warp has 16 lanes
    assert "mask 0xffffffff" in message and "undefined on a GPU" in message


def test_a_deadlock_fails_the_launch():
    message, _ = _run(4)
    assert "deadlock" in message


def test_divergent_block_barriers_fail_the_launch():
    # warp 0 and warp 1 at two different __syncthreads() call sites (one barrier on a GPU, or a
    # hang: undefined either way); the kernels' own barriers pass this check in every test
    message, _ = _run(16)
    assert "different __syncthreads() call sites" in message
    message, out = _run(0)  # one call site, reached by every thread
    assert message == "ok" and torch.equal(out, torch.full((64,), 63.0))


def test_launch_bounds_and_dynamic_shared_memory_limits():
    assert _run(5)[0] == "ok"
    assert "__launch_bounds__" in _run(6)[0]
    assert "opt-in" in _run(7)[0]
    message, out = _run(8)
    assert message == "ok" and torch.equal(out, torch.ones(64))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="FMA contraction: x86-64")
def test_multiply_adds_are_fused_as_nvcc_fuses_them():
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11: a separate multiply and add give 0,
    # a fused multiply-add the 2^-24 it kept
    a = 1.0 + 2.0**-12
    out = torch.zeros(64)
    out[:3] = torch.tensor([a, a, -(1.0 + 2.0**-11)])
    message, out = _run(10, out)
    assert message == "ok"
    assert out[3].item() == 2.0**-24  # contracted, as nvcc's default --fmad=true does
    assert out[4].item() == 0.0  # __fmul_rn: never contracted


def _cuda_include():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(
    shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and CUDA's headers"
)
@pytest.mark.parametrize("value_type, compiles", [("double", True), ("Pair", False)])
def test_a_shuffle_moves_at_most_eight_bytes(tmp_path, value_type, compiles):
    emu = Path(__file__).parent / "cuda_emu"
    source = tmp_path / "shuffle.cpp"
    source.write_text(
        '#include "cuda_runtime.h"\n'
        "struct Pair { double a, b; };\n"
        f"{value_type} f({value_type} v) {{ return __shfl_sync(0xffffffffu, v, 0); }}\n"
    )
    include = ["-I", str(emu / "include"), "-I", str(emu), "-I", str(_cuda_include())]
    result = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", *include, str(source)],
        capture_output=True,
        text=True,
    )
    assert (result.returncode == 0) == compiles, result.stderr
    if not compiles:
        assert "at most 8 bytes" in result.stderr


def test_cp_async_lands_only_when_waited_for():
    """cp.async (common/ptx.cuh): the destination is written when cp_async_wait retires the copy;
    read before that (in flight on a GPU) it is the shared memory's poison."""
    src = torch.arange(32.0)
    message, out = _run(11, torch.cat([src, torch.full((32,), float("nan"))]))
    assert message == "ok" and torch.equal(out[32:], src)
    message, out = _run(12, torch.cat([src, torch.full((32,), float("nan"))]))
    assert message == "ok" and bool(out[32:].isnan().all())


def test_ldmatrix_and_mma_follow_the_ptx_fragment_layouts():
    """A 16x16 by 16x8 product through ldmatrix (plain, on B's transpose, and transposing, on B)
    and mma.sync m16n8k16 equals the plain sum: the emulated instructions agree with the PTX ISA's
    fragment layouts as the attention kernels use them."""
    message, out = _run(13)
    assert message == "ok"
    assert out[0].item() == 0.0 and out[1].item() == 0.0
    assert out[2].item() > 10.0
