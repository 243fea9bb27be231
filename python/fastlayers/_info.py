# SPDX-License-Identifier: Apache-2.0
"""``fastlayers.info()``: what this installation can run."""

from __future__ import annotations

import torch

from fastlayers import _ext
from fastlayers.version import __version__

# op -> the public function that runs it (one row per op in the report).
OPS = (
    "rms_norm",
    "fused_add_rms_norm",
    "rms_norm_fp8",
    "rms_norm_backward",
    "ultrafast_ff",
    "ultrafast_ff_backward",
    "fff_hard",
    "peer_retrieve",
    "peer_experts",
    "peer_experts_backward",
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "int4_fp8_gemm_sm90",
    "varlen_attention",
    "gather_rows",
    "scatter_add_gated",
    "int4_kv_decode",
    "int4_kv_decode_paged",
    "int4_kv_attention",
    "int4_kv_attention_paged",
    "int4_kv_attention_paged_varlen",
    "kv_quantize",
    "kv_cache_write",
    "kv_cache_write_paged",
    "q_quantize",
)


def info() -> dict:
    """A dict describing this installation.

    Keys: ``version``, ``extension_loaded`` (bool), ``extension_error`` (why not, or None),
    ``cpu_isa`` (the kernel variant in use: amx_bf16 / avx512_bf16 / avx512 / avx2 / scalar,
    or None),
    ``cpu_isa_detected``,
    ``avx512_emulated`` (a test build whose AVX-512 kernels run through SIMDe),
    ``cuda_emulated`` (a test build whose CUDA kernels run on the CPU, tests/cuda_emu),
    ``cuda_compiled`` (bool), ``cuda_archs`` (list of str), ``cuda_sm90_gemm`` (the Hopper
    CUTLASS GEMM was compiled), ``gpu`` (name of GPU 0, or None),
    ``torch`` (version), and ``ops``: for each op, the backend each device runs
    (``"kernel"`` or ``"reference"``).
    """
    C = _ext.C
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cuda_kernels = _ext.has_cuda_kernels()
    cpu_kernels = _ext.has_cpu_kernels()
    return {
        "version": __version__,
        "extension_loaded": C is not None,
        "extension_error": _ext.LOAD_ERROR,
        "cpu_isa": C.cpu_isa() if C is not None else None,
        "cpu_isa_detected": C.detected_cpu_isa() if C is not None else None,
        "avx512_emulated": C is not None and C.avx512_emulated(),
        "cuda_emulated": C is not None and hasattr(C, "cuda_emulated") and C.cuda_emulated(),
        "cuda_compiled": cuda_kernels,
        "cuda_sm90_gemm": _ext.has_sm90_gemm(),
        "cuda_archs": [a for a in C.cuda_archs().split(",") if a] if C is not None else [],
        "gpu": gpu,
        "torch": torch.__version__,
        "ops": {
            op: {
                "cpu": "kernel" if cpu_kernels and op not in _ext.SM90_OPS else "reference",
                "cuda": "kernel" if _ext.has_cuda_kernel(op) else "reference",
            }
            for op in OPS
        },
    }


def format_info(d: dict | None = None) -> str:
    d = info() if d is None else d
    loaded = "loaded" if d["extension_loaded"] else f"NOT loaded: {d['extension_error']}"
    cuda = "yes, archs " + ",".join(d["cuda_archs"]) if d["cuda_compiled"] else "no"
    if d.get("cuda_emulated"):
        cuda = "no [CUDA kernels emulated on the CPU: a test build for the tests' cuda_emu device]"
    isa = f"{d['cpu_isa'] or '-'} (detected: {d['cpu_isa_detected'] or '-'})"
    if d.get("avx512_emulated"):
        isa += " [AVX-512 emulated through SIMDe: a slow test build]"
    lines = [
        f"fastlayers {d['version']} (torch {d['torch']})",
        f"  compiled kernels (_C): {loaded}",
        f"  CPU ISA in use:        {isa}",
        f"  CUDA compiled:         {cuda}",
        f"  Hopper CUTLASS GEMM:   {'yes (90a)' if d['cuda_sm90_gemm'] else 'no'}",
        f"  GPU present:           {d['gpu'] or 'no'}",
        "  ops (backend per device):",
    ]
    for op, backends in d["ops"].items():
        lines.append(f"    {op:<22} cpu={backends['cpu']:<9} cuda={backends['cuda']}")
    return "\n".join(lines)
