# SPDX-License-Identifier: Apache-2.0
"""FireQ's RoPE-aware KV quantization, the pure-PyTorch part (formulas:
``../shared/research/int4_fp8.md`` section 1.4).

Keys quantized to INT4 lose accuracy to per-channel outliers, which RoPE rotates between the two
members of each rotation pair. Two scalings flatten them, both exact for the unquantized ``Q K^T``:

* pre-RoPE ``n[h, c] = alpha / max_t ||(k_c, k_partner)||``, equal for both pair members so it
  commutes with the rotation, folded into the rows of ``W_k`` (times n) and ``W_q`` (divided by n,
  for each query head of the GQA group);
* post-RoPE ``s[h, c] = beta / max_t |RoPE(k)_c|`` on the ``top_k`` channels with the largest
  post-RoPE maxima and their partners (1 elsewhere): keys are multiplied by s before the INT4
  quantization and queries divided by s, and the queries, in FP8, carry that range.

Pairings: ``"half"`` (Hugging Face rotate_half: c with c + d/2) or ``"interleaved"`` (2i, 2i+1).
INT4 KV format: per (token, kv head, group of ``group_size`` channels), an FP8-E4M3 scale
``s8 = fp8(max|x| / 7)`` (at least 2^-9) and ``q = clamp(round(x / s8), -8, 7)``, packed two per
byte (even channel in the low nibble). Queries: FP8-E4M3 per (token, head), scale max|q| / 448.
"""

from __future__ import annotations

import torch

from fastlayers.ops._common import check_int, check_tensor, no_dispatch_modes, tensor_version
from fastlayers.reference.fp8 import FP8, div_rn, quantize_fp8_per_token, to_fp8
from fastlayers.reference.int4_fp8 import GROUP_SCALE_MIN, pack_int4, unpack_int4

PAIRINGS = ("half", "interleaved")


def _check_float(x, name: str, layout: str, dims: int | None = None, even: bool = False) -> None:
    """A floating-point tensor ``x`` (``dims`` dimensions when given, at least one; a non-empty,
    even last dimension with ``even``): TypeError / ValueError naming it."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    bad = x.dim() == 0 or (dims is not None and x.dim() != dims)
    if bad or (even and (x.shape[-1] == 0 or x.shape[-1] % 2)):
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def _check_calibration_keys(k, name: str) -> None:
    _check_float(k, name, "[tokens > 0, kv_heads, even head_dim]", dims=3, even=True)
    if k.shape[0] == 0:
        raise ValueError(f"{name} has no tokens to calibrate on")


def _partner(d: int, pairing: str, device=None, rotary_dim: int | None = None) -> torch.Tensor:
    """Each channel's rotation partner among the first ``rotary_dim`` (default ``d``) channels;
    channels RoPE does not rotate (partial RoPE) are their own."""
    r = d if rotary_dim is None else check_int(rotary_dim, "rotary_dim")
    if not 0 < r <= d or r % 2:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim = {d}], got {r}")
    c = torch.arange(d, device=device)
    if pairing == "half":
        rotated = (c + r // 2) % r
    elif pairing == "interleaved":
        rotated = c ^ 1
    else:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return torch.where(c < r, rotated, c)


def compute_pre_rope_scales(
    k_pre: torch.Tensor, alpha: float = 8.0, pairing: str = "half", exclude=None,
    rotary_dim: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """``n [H_kv, d]`` from pre-RoPE keys ``k_pre [T, H_kv, d]``: ``alpha / max_t`` of each
    rotation pair's L2 norm, the same for both members (with partial RoPE, ``rotary_dim`` < d
    rotated channels, a channel past them is its own pair: ``alpha / max_t |k_c|``); channels in
    ``exclude`` (a bool ``[H_kv, d]``, e.g. those post-RoPE scaling picks) get 1."""
    _check_calibration_keys(k_pre, "k_pre")
    k = k_pre.float()
    partner = _partner(k.shape[-1], pairing, k.device, rotary_dim)
    paired = partner != torch.arange(k.shape[-1], device=k.device)
    other = torch.where(paired, k[..., partner] ** 2, 0.0)
    pair_norm = torch.sqrt(k**2 + other).amax(0)  # [H_kv, d], the same for partners
    n = alpha / pair_norm.clamp_min(1e-12)
    if exclude is not None:
        n = torch.where(exclude, torch.ones_like(n), n)
    return n


def compute_post_rope_scales(
    k_rot: torch.Tensor, beta: float = 8.0, top_k: int = 8, pairing: str = "half",
    rotary_dim: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """``s [H_kv, d]`` from post-RoPE keys ``k_rot [T, H_kv, d]``: per kv head, the ``top_k``
    channels by ``max_t |k|`` and their partners (among the first ``rotary_dim`` channels, all by
    default) get ``beta / max_t |k|``; the others 1."""
    _check_calibration_keys(k_rot, "k_rot")
    if check_int(top_k, "top_k") < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    m = k_rot.float().abs().amax(0)  # [H_kv, d]
    d = m.shape[-1]
    chosen = torch.zeros_like(m, dtype=torch.bool)
    top = m.topk(min(top_k, d), dim=-1).indices
    chosen.scatter_(1, top, True)
    chosen |= chosen[:, _partner(d, pairing, m.device, rotary_dim)]
    return torch.where(chosen, beta / m.clamp_min(1e-12), torch.ones_like(m))


def fold_pre_rope(
    q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, n: torch.Tensor, *,
    q_rows: torch.Tensor | None = None, k_rows: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """In place: ``W_k`` rows (and bias) times ``n``, ``W_q`` rows (and bias) divided by ``n``
    repeated over each kv head's query heads (``repeat_kv`` order). ``Q K^T`` is unchanged.
    ``q_rows`` / ``k_rows``: the output rows of the queries / keys in their layer, in head-major
    order (a fused qkv projection: ``q_proj`` and ``k_proj`` the same layer); None: all rows.
    The layers are ``torch.nn.Linear`` or GPT-2's ``Conv1D`` (weight ``[in, out]``: its columns
    are the output rows)."""
    for lin, name in ((q_proj, "q_proj"), (k_proj, "k_proj")):
        if not isinstance(lin, torch.nn.Linear) and not _is_conv1d(lin):
            raise TypeError(
                f"{name} must be a torch.nn.Linear or a transformers Conv1D, got "
                f"{type(lin).__name__}"
            )
    _check_float(n, "n", "[kv_heads, head_dim]", dims=2)
    rows = []
    for lin, r, name in ((q_proj, q_rows, "q_rows"), (k_proj, k_rows, "k_rows")):
        out = _by_output(lin.weight, lin).shape[0]
        if r is None:
            r = torch.arange(out)
        elif not isinstance(r, torch.Tensor) or r.dtype != torch.int64 or r.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 tensor or None, got {r!r}")
        elif r.numel() and (int(r.min()) < 0 or int(r.max()) >= out):
            raise ValueError(f"{name} must index rows of a layer of {out} outputs")
        rows.append(r.to(lin.weight.device))
    h_kv, d = n.shape
    h_q = rows[0].numel() // max(d, 1)
    if not h_kv or not d or rows[1].numel() != h_kv * d or rows[0].numel() != h_q * d \
            or h_q % h_kv:  # fmt: skip
        raise ValueError(
            f"n {tuple(n.shape)} does not fit the {rows[1].numel()} key rows / "
            f"{rows[0].numel()} query rows of k_proj / q_proj"
        )
    nk = n.reshape(-1).float()
    nq = n.repeat_interleave(h_q // h_kv, dim=0).reshape(-1).float()
    with torch.no_grad():
        for lin, r, f in ((k_proj, rows[1], nk), (q_proj, rows[0], 1.0 / nq)):
            f = f.to(lin.weight.device)
            w = _by_output(lin.weight, lin)  # (Conv1D: a transposed view, written through)
            w[r] = (w[r].float() * f[:, None]).to(w.dtype)
            if lin.bias is not None:
                lin.bias[r] = (lin.bias[r].float() * f).to(lin.bias.dtype)


def _is_conv1d(module) -> bool:
    """GPT-2's ``Conv1D``: ``y = x @ weight + bias`` with ``weight [nx = in, nf = out]``."""
    w = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Module) and isinstance(w, torch.Tensor)
            and w.shape == (getattr(module, "nx", None), getattr(module, "nf", None)))  # fmt: skip


def _by_output(weight: torch.Tensor, module) -> torch.Tensor:
    """``weight`` as ``[out, in]``: a Linear's own, a Conv1D's transposed (a view)."""
    return weight.t() if _is_conv1d(module) else weight


def rotate_pairs(x: torch.Tensor, pairing: str = "half") -> torch.Tensor:
    """RoPE's partner term: ``"half"`` is Hugging Face's ``rotate_half`` (``[-x2, x1]``),
    ``"interleaved"`` maps each pair ``(a, b)`` to ``(-b, a)``."""
    _check_float(x, "x", "[..., even head_dim]", even=True)
    if x.dtype.itemsize == 1:  # (FP8: torch has no negation for it; through fp32, exactly)
        return rotate_pairs(x.float(), pairing).to(x.dtype)
    if pairing == "half":
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)
    if pairing == "interleaved":
        return torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")


def _rope_table(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos/sin ``[T, d]`` or ``[B, T, d]`` as float64 broadcasting against ``x [B, H, T, d]``."""
    t = t.double()
    return t[None, None] if t.dim() == 2 else t[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "half"):
    """RoPE of ``x [B, H, T, d]`` with ``cos``/``sin`` ``[T, d]`` or ``[B, T, d]`` (the Hugging Face
    ``position_embeddings`` layout), returned in fp32: the products are exact in float64 and the
    sum is rounded once, so every backend (and FMA or not) gives the same bits."""
    _check_float(x, "x", "[batch, heads, tokens, even head_dim]", dims=4, even=True)
    b, _, t, d = x.shape
    for table, name in ((cos, "cos"), (sin, "sin")):
        _check_float(table, name, f"[{t}, {d}] or [{b} (or 1), {t}, {d}]")
        ok = table.shape[-2:] == (t, d) and (
            table.dim() == 2 or (table.dim() == 3 and table.shape[0] in (1, b))
        )
        if not ok:
            raise ValueError(
                f"{name} must be [{t}, {d}] or [{b}, {t}, {d}], got {tuple(table.shape)}"
            )
        if table.device != x.device:
            raise ValueError(f"{name} is on {table.device} but x on {x.device}")
    xd = x.double()
    c, s = _rope_table(cos, x), _rope_table(sin, x)
    return (xd * c + rotate_pairs(xd, pairing) * s).float()


def quantize_kv_int4(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., d]`` -> ``(packed uint8 [..., d/2], scales float8_e4m3fn [..., d/g])``."""
    _check_float(x, "x", "[..., even head_dim]", even=True)
    group_size = check_int(group_size, "group_size")
    d = x.shape[-1]
    if group_size <= 0 or d % group_size or group_size % 2:
        raise ValueError(f"head_dim {d} must be a multiple of an even group_size {group_size}")
    g = x.float().reshape(*x.shape[:-1], d // group_size, group_size)
    s8 = to_fp8(div_rn(g.abs().amax(-1), 7)).float().clamp_min(GROUP_SCALE_MIN)
    q = torch.round(g / s8[..., None]).clamp(-8, 7).reshape(x.shape)
    return pack_int4(q), s8.to(FP8)


def dequantize_kv_int4(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32):
    """Inverse of :func:`quantize_kv_int4`: ``q * s8`` in ``dtype``."""
    check_tensor(packed, "packed")
    check_tensor(scales, "scales")
    if packed.dtype != torch.uint8 or scales.dtype != FP8:
        raise TypeError(
            f"packed must be uint8 and scales float8_e4m3fn, got {packed.dtype} and {scales.dtype}"
        )
    d = 2 * packed.shape[-1] if packed.dim() else 0
    groups = scales.shape[-1] if scales.dim() else 0
    if (
        packed.dim() == 0 or scales.shape[:-1] != packed.shape[:-1] or not d or not groups
        or d % groups or (d // groups) % 2
    ):  # fmt: skip
        raise ValueError(
            f"packed [..., head_dim / 2] and scales [..., head_dim / group] (an even group) "
            f"expected, got {tuple(packed.shape)} and {tuple(scales.shape)}"
        )
    if packed.device != scales.device:
        raise ValueError(f"scales is on {scales.device} but packed on {packed.device}")
    q = unpack_int4(packed).float()
    q = q.reshape(*q.shape[:-1], groups, d // groups) * scales.float()[..., None]  # (0 rows too)
    return q.reshape(*packed.shape[:-1], d).to(dtype)


def inverse_query_scale(owner, slot: str, post: torch.Tensor, heads: int, device, dtype):
    """``1 / post`` repeated over the GQA group (``heads // post.shape[0]`` query heads per KV
    head), ``[heads, d]`` in ``dtype`` on ``device``: what the queries are multiplied by. Cached in
    ``owner.__dict__[slot]`` per post-RoPE scale tensor, its version (in-place changes; not those
    made through ``.data``, which bypasses the version counter), heads, device and dtype (a
    decode step would spend ~70 us rebuilding it for every layer); not cached while compiling or
    tracing (no data pointers there) nor for an inference tensor (no version counter)."""
    group = heads // post.shape[0]
    # (compiling: nothing cached, and no version looked at: Dynamo breaks the graph on it)
    version = tensor_version(post) if no_dispatch_modes() else None
    if version is None:
        return (1.0 / post).repeat_interleave(group, dim=0).to(device, dtype)
    # (the tensor itself is part of the key and held by the cache: an id or an address alone could
    # be reused by a later tensor)
    key = (post.data_ptr(), version, heads, device, dtype)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] is not post or cached[1] != key:
        inv = (1.0 / post).repeat_interleave(group, dim=0).to(device, dtype)
        owner.__dict__[slot] = cached = (post, key, inv)
    return cached[2]


def straight_through(rounded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``rounded`` (a quantization round trip of ``x``, same dtype) carrying ``x``'s gradient as
    if the rounding were the identity (the straight-through estimator of quantization-aware
    training); the values are ``rounded``'s exactly (plus a zero)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return rounded + (x - x.detach())
    return rounded


def quantize_q_fp8(q: torch.Tensor) -> torch.Tensor:
    """Queries through FP8-E4M3 and back, one scale per (token, head) vector (the last dim). The
    gradient passes straight through (autograd through the float8 cast would round it to FP8,
    where small gradients vanish)."""
    _check_float(q, "q", "[..., head_dim > 0]")
    if q.shape[-1] == 0:
        raise ValueError(f"q must be [..., head_dim > 0], got shape {tuple(q.shape)}")
    codes, scale = quantize_fp8_per_token(q.detach().float())
    return straight_through((codes.float() * scale).to(q.dtype), q)
