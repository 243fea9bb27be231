# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8 reference (FireQ): the formats every backend matches, and the GEMM they define.

Weights ``W [N, K]`` -> INT4, symmetric, groups of ``g`` along K (default 128):

* group max ``a[n, j] = max_{k in group j} |W[n, k]|`` (floored at 1e-12);
* channel scale ``c[n]`` (fp32). ``per_channel``: ``max_j(a[n, j] / 7) / 56``, so every group
  scale is at most 56 and every look-up-table entry ``q * s8`` (|q| <= 8) at most 448, the FP8
  maximum. ``per_tensor_pow2``: ``1 / t`` for FireQ's power-of-two search over
  ``t = 2^0 .. 2^14`` (the least FP8 underflow with no group scale above 56). ``none``: 1 (shows
  the underflow the others prevent);
* group scale ``s8[n, j] = fp8(a[n, j] / 7 / c[n])``, at least ``2^-9`` (the smallest FP8 value);
* ``q[n, k] = clamp(round(W[n, k] / (c[n] * s8[n, j])), -8, 7)``, packed two per byte, the even k in
  the low nibble (two's complement: the byte image of CUTLASS ``int4b_t`` arrays).

Activations -> FP8-E4M3 per token (row): ``xs[m] = max_k |x[m, k]| / 448`` (1 for an all-zero row),
``xq = fp8(clamp(x / xs))``; the same as :func:`fastlayers.reference.rms_norm_fp8`'s output, so
norm -> GEMM can pass FP8.

GEMM, fp32 accumulation:
``Y[m, n] = out_dtype(xs[m] * c[n] * sum_k xq[m, k] * fp8(q[n, k] * s8[n, k // g]) + bias[n])``.
``round_lut=False`` drops the FP8 rounding of ``q * s8`` (FireQ's pseudo-quantised evaluation), to
measure what that rounding costs.

FP8 casts here clamp to +-448 first: torch's cast does not saturate (it gives NaN), CUTLASS's does.
"""

from __future__ import annotations

import math

import torch

from fastlayers._dtypes import FP8_E4M3_MAX
from fastlayers.reference.fp8 import FP8, div_rn, quantize_fp8_per_token, to_fp8

__all__ = [
    "quantize_int4",
    "dequantize_int4",
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "pack_int4",
    "unpack_int4",
    "pow2_tensor_scale",
]
CHANNEL_SCALES = ("per_channel", "per_tensor_pow2", "none")
GROUP_SCALE_MIN = 2.0**-9  # smallest positive E4M3 value
LUT_SCALE_MAX = FP8_E4M3_MAX / 8  # 56: |q| <= 8, so q * s8 stays within FP8 range
FORMAT_VERSION = 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` integers in [-8, 7] (K even) -> ``uint8 [N, K / 2]``, even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    n = q.to(torch.int16) & 0xF
    return (n[..., 0::2] | (n[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K / 2]`` -> ``int8 [N, K]`` in [-8, 7] (inverse of :func:`pack_int4`)."""
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return (nibbles - 16 * (nibbles >= 8)).to(torch.int8)


def _group_max(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, ceil(K / g)]`` max |w| per group (a partial last group counts its own columns)."""
    n, k = w.shape
    g = min(group_size, k)  # a group wider than the row is one group of the row
    groups = -(-k // g)
    padded = torch.nn.functional.pad(w.abs(), (0, groups * g - k))
    return padded.reshape(n, groups, g).amax(-1).clamp_min(1e-12)


def pow2_tensor_scale(group_max: torch.Tensor) -> float:
    """FireQ's per-tensor power of two ``t`` (``apply_pseudo_quantize``): among ``t = 2^0 .. 2^14``,
    up to the first that would push a scaled group max past the FP8-safe bound, the one with the
    least underflow slack ``sum max(0, w_min - t * a) / w_min`` (``w_min = 7 * 2^-9``, the smallest
    group max whose scale ``max / 7`` is representable); ties go to the smaller ``t``. The bound
    is ``7 * 56 = 392`` (every LUT entry <= 448) where FireQ checks 448."""
    w_min = 7 * GROUP_SCALE_MIN
    best_t, best_slack = 1.0, math.inf
    for i in range(15):
        t = 2.0**i
        a = group_max * t
        if bool((a > 7 * LUT_SCALE_MAX).any()):
            break
        slack = float(((w_min - a).clamp_min(0) / w_min).sum())
        if slack < best_slack:
            best_t, best_slack = t, slack
    return best_t


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, channel_scale: str = "per_channel"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight, group_scale, channel_scale)`` for ``weight [N, K]`` (K even): ``uint8 [N, K/2]``,
    ``float8_e4m3fn [N, ceil(K/g)]`` and fp32 ``[N]``; the formulas are in the module docstring."""
    if weight.dim() != 2 or weight.shape[1] % 2 or 0 in weight.shape:
        raise ValueError(f"weight must be [N, K] with an even K > 0, got {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    if channel_scale not in CHANNEL_SCALES:
        raise ValueError(f"channel_scale must be one of {CHANNEL_SCALES}, got {channel_scale!r}")
    w = weight.float()
    n, k = w.shape
    a = _group_max(w, group_size)
    raw = div_rn(a, 7)
    if channel_scale == "per_channel":
        c = div_rn(raw.amax(-1), LUT_SCALE_MAX)
    elif channel_scale == "per_tensor_pow2":
        c = torch.full((n,), 1.0 / pow2_tensor_scale(a), device=w.device)
    else:
        c = torch.ones(n, device=w.device)
    s8 = to_fp8(raw / c[:, None]).float().clamp_min(GROUP_SCALE_MIN)
    step = (c[:, None] * s8).repeat_interleave(min(group_size, k), dim=1)[:, :k]
    q = torch.round(w / step).clamp(-8, 7)
    return pack_int4(q), s8.to(FP8), c


def _lut_weight(qweight, group_scale, group_size: int, round_lut: bool) -> torch.Tensor:
    """``fp8(q * s8)`` as fp32 ``[N, K]``: the values the kernels' look-up tables hold."""
    q = unpack_int4(qweight).float()
    k = q.shape[1]
    lut = q * group_scale.float().repeat_interleave(min(group_size, k), dim=1)[:, :k]
    return to_fp8(lut).float() if round_lut else lut


def dequantize_int4(
    qweight: torch.Tensor,
    group_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    group_size: int = 128,
    round_lut: bool = True,
) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` the GEMM multiplies by: ``c[n] * fp8(q * s8)`` (or ``c * q * s8``
    without the look-up-table rounding)."""
    lut = _lut_weight(qweight, group_scale, group_size, round_lut)
    return channel_scale.float()[:, None] * lut


def int4_fp8_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    qweight: torch.Tensor,
    group_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    round_lut: bool = True,
) -> torch.Tensor:
    """``Y [..., N] = out_dtype(xs * c * (xq @ fp8(q * s8).T) + bias)`` with fp32 accumulation."""
    acc = xq.float() @ _lut_weight(qweight, group_scale, group_size, round_lut).t()
    y = acc * xs.float() * channel_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# The Hopper (sm90a) GEMM's prepacked layouts (csrc/int4_fp8/sm90/layout_sm90.cuh): the
# specification the kernels' prepack (device and host) is tested against.
# ----------------------------------------------------------------------------------------------
def sm90_weight_offsets(n: int, k: int) -> torch.Tensor:
    """int64 ``[n, k]``: where INT4 element ``(row, col)`` of an ``[n, k]`` weight lands (in
    nibbles) in the sm90 layout. Blocks of 16 rows x 32 columns (one warp's FP8 wgmma A fragment)
    hold each thread's 16 values contiguously:
    ``64 (row % 8) + 4 ((row / 8) % 2) + (col % 4) + 16 ((col / 4) % 4) + 8 ((col / 16) % 2)``;
    the blocks are laid out row-block fastest (``512 (row / 16) + 32 n (col / 32)``)."""
    if n % 16 or k % 32:
        raise ValueError(f"the sm90 layout needs n % 16 == 0 and k % 32 == 0, got {n} x {k}")
    r = torch.arange(n, dtype=torch.int64)[:, None]
    c = torch.arange(k, dtype=torch.int64)[None, :]
    inner = 64 * (r % 8) + 4 * ((r // 8) % 2) + (c % 4) + 16 * ((c // 4) % 4) + 8 * ((c // 16) % 2)
    return inner + 512 * (r // 16) + 32 * n * (c // 32)


def _lut_encode(nib: torch.Tensor) -> torch.Tensor:
    """CUTLASS's LUT encoding of two's-complement nibbles: 1..7 -> 8 - v, others unchanged."""
    return torch.where((nib == 0) | (nib >= 8), nib, 8 - nib)


def prepack_sm90(
    qweight: torch.Tensor, group_scale: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed_weight uint8 [n, k / 2], lut_scale uint8 [groups, n, 8])`` for the sm90 GEMM.

    ``packed_weight``: the nibbles LUT-encoded and placed by :func:`sm90_weight_offsets` (even
    offsets in the low nibble). ``lut_scale[j, n]``: the FP8 codes of
    ``fp8(-8 s), fp8(-7 s), ..., fp8(-2 s), -s`` for ``s = group_scale[n, j]`` (the mainloop derives
    the positive half by negation)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    q = unpack_int4(qweight.cpu()).to(torch.int64) & 0xF
    enc = _lut_encode(q)
    flat = torch.zeros(n * k, dtype=torch.int64)
    flat[sm90_weight_offsets(n, k).reshape(-1)] = enc.reshape(-1)
    packed = (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8).reshape(n, k // 2)
    s = group_scale.cpu().float().t()  # [groups, n]
    mult = torch.tensor([-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0])
    lut = to_fp8(s[..., None] * mult).view(torch.uint8)
    neg = (group_scale.cpu().t().contiguous().view(torch.uint8) ^ 0x80)[..., None]
    lut = torch.cat([lut, neg], dim=-1)
    return packed.to(qweight.device), lut.contiguous().to(qweight.device)


def unprepack_sm90(
    packed_weight: torch.Tensor, lut_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`prepack_sm90`: ``(qweight, group_scale)`` in the stored format."""
    n, k = packed_weight.shape[0], 2 * packed_weight.shape[1]
    p = packed_weight.cpu().reshape(-1).to(torch.int64)
    flat = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(-1)
    q = _lut_encode(flat[sm90_weight_offsets(n, k).reshape(-1)]).reshape(n, k)  # self-inverse
    qweight = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    group_scale = (lut_scale.cpu()[..., 7] ^ 0x80).t().contiguous().view(FP8)
    return qweight.to(packed_weight.device), group_scale.to(packed_weight.device)
