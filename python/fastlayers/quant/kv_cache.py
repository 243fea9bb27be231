# SPDX-License-Identifier: Apache-2.0
"""Storage of one layer's INT4 KV cache (FireQ format, :mod:`fastlayers.quant.rope_kv`): packed keys
and values ``uint8 [B, H_kv, T, d/2]`` with FP8 scales ``[B, H_kv, T, d/g]`` (values may have a
width ``d_v`` of their own: MiMo-V2-Flash's; or none, 0: a multi-head latent attention's layer
keeps its latent in the key rows, which the decode kernel reads as values), in buffers with spare
capacity along the tokens (doubled when full), so a decode step writes its token in place instead
of copying the cache (``torch.cat`` per step moves O(context) bytes per layer and token).

Plain PyTorch; the Hugging Face cache (:class:`fastlayers.quant.Int4KVCache`) and
:class:`fastlayers.RopeAwareQuantAttention` both keep their tokens in it.
"""

from __future__ import annotations

import torch

from fastlayers.ops._common import check_int, check_tensor
from fastlayers.quant.rope_kv import FP8, dequantize_kv_int4


def buffers_layout_ok(buffers) -> bool:
    """Whether ``buffers`` are four contiguous tensors on one device, uint8 / float8_e4m3fn /
    uint8 / float8_e4m3fn ``[B, H, capacity, .]`` of one batch, heads and capacity (an
    :class:`Int4KVStore`'s keys, their scales, values, their scales)."""
    b = buffers
    return (
        len(b) == 4 and all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in b)
        and b[0].dtype == b[2].dtype == torch.uint8 and b[1].dtype == b[3].dtype == FP8
        and all(x.shape[:3] == b[0].shape[:3] and x.device == b[0].device
                and x.is_contiguous() for x in b)
    )  # fmt: skip


class Int4KVStore:
    """``append`` quantized tokens, read the filled part as ``kq``/``ks``/``vq``/``vs`` views, or
    the capacity-sized ``buffers`` with ``length`` (what the decode kernel takes). ``truncate``
    only moves the length (speculative rollback), ``reorder`` selects batch rows (beam search)."""

    MIN_CAPACITY = 64

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, ...] | None = None  # kq, ks, vq, vs: [B, H, capacity, .]
        self.length = 0
        # the buffers tuple layout_ok passed: a new one (each allocation, reorder or assignment)
        # is checked again
        self.kernel_checked: tuple[torch.Tensor, ...] | None = None

    def _filled(self, i: int):
        return None if self.buffers is None else self.buffers[i][..., : self.length, :]

    kq = property(lambda self: self._filled(0))
    ks = property(lambda self: self._filled(1))
    vq = property(lambda self: self._filled(2))
    vs = property(lambda self: self._filled(3))

    def layout_ok(self) -> bool:
        """Whether the buffers are as the store makes them (what the kernels' direct calls and
        the in-place writes rely on, or they would write out of bounds): four contiguous tensors
        on one device, uint8 / float8_e4m3fn / uint8 / float8_e4m3fn ``[B, H, capacity, .]`` of
        one batch, heads and capacity. Checked once per tuple of buffers (``kernel_checked``):
        changed in place (``resize_``, ``set_``) they are not checked again."""
        b = self.buffers
        if b is None or self.kernel_checked is b:
            return b is not None
        ok = isinstance(b, tuple) and buffers_layout_ok(b)
        if ok:
            self.kernel_checked = b
        return ok

    def _check_layout(self) -> None:
        if self.buffers is not None and not self.layout_ok():
            raise ValueError(
                "the store's buffers are not as it makes them (four contiguous tensors on one "
                "device, uint8 / float8_e4m3fn / uint8 / float8_e4m3fn [batch, heads, capacity, .] "
                "of one capacity): were they assigned or changed from outside?"
            )

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0].shape[-2]

    def _make_room(self, parts, tokens: int) -> None:
        """Checks that ``parts`` (tensors shaped like the buffers, any token count) match the
        buffers (batch, heads, width, dtype, device) and grows them to ``length + tokens``."""
        self._check_layout()
        if self.buffers is not None:
            for new, old in zip(parts, self.buffers, strict=True):
                same = new.shape[:-2] == old.shape[:-2] and new.shape[-1] == old.shape[-1]
                if not same or new.dtype != old.dtype or new.device != old.device:
                    raise ValueError(
                        f"appended {new.dtype} {tuple(new.shape)} does not match the cache's "
                        f"{old.dtype} {tuple(old.shape)} (batch, heads, width)"
                    )
        need = self.length + tokens
        if need > self.capacity:
            capacity = max(need, self.MIN_CAPACITY, 2 * self.capacity)
            grown = []
            for i, t in enumerate(parts):
                buf = t.new_empty((*t.shape[:-2], capacity, t.shape[-1]))
                if self.length:
                    buf[..., : self.length, :] = self.buffers[i][..., : self.length, :]
                grown.append(buf)
            self.buffers = tuple(grown)

    def append(self, kq, ks, vq, vs) -> None:
        """Adds ``kq [B, H, t, d/2]`` (and its scales, and the values) after the cached tokens."""
        parts = (kq, ks, vq, vs)
        self._make_room(parts, kq.shape[-2])
        need = self.length + kq.shape[-2]
        for buf, t in zip(self.buffers, parts, strict=True):
            buf[..., self.length : need, :] = t
        self.length = need

    def write(self, k, v, group_size: int, post_scale=None, cos=None, sin=None,
              pairing: str = "half") -> None:  # fmt: skip
        """Quantizes ``k [B, H, t, d]`` and ``v [B, H, t, d_v]`` (``d_v``: ``d``, or a width of its
        own, a multiple of ``group_size`` too) and adds them after the cached tokens, written
        in place (:func:`fastlayers.ops.kv_cache_write`: one pass each, no temporaries): keys
        rotated by RoPE when ``cos``/``sin`` are given and times ``post_scale``, groups of
        ``group_size`` channels. The same cache as ``append(*kv_quantize(k, ...), *kv_quantize(v,
        ...))``. In eager mode on a device with the kernel, the kernel is called directly (no
        dispatcher, the buffers' own checks skipped: they are the store's)."""
        from fastlayers.ops.kvint4 import (  # (ops import this)
            kv_cache_write,
            write_kv_direct,
            write_step_direct,
        )

        if (  # a decode step (room in the buffers, no RoPE here): the kernel, few checks
            self.buffers is not None and cos is None and sin is None
            and write_step_direct(k, v, self.buffers, self.length, group_size, post_scale, self)
        ):  # fmt: skip
            self.length += k.shape[2]
            return
        check_tensor(k, "k")
        check_tensor(v, "v")
        group_size = check_int(group_size, "group_size")
        if k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
            raise ValueError(
                f"k and v must be [batch, heads, tokens, head_dim] with the same batch, heads and "
                f"tokens, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        self.reserve(k, group_size, v.shape[3])
        start = self.length
        if not write_kv_direct(k, v, self.buffers, start, group_size, post_scale, cos, sin,
                               pairing):  # fmt: skip
            kb, ksb, vb, vsb = self.buffers
            kv_cache_write(k, kb, ksb, start, post_scale, cos, sin, pairing)
            kv_cache_write(v, vb, vsb, start)
        self.length = start + k.shape[2]

    def reserve(self, k, group_size: int, value_dim: int | None = None) -> None:
        """Room for the tokens of ``k [B, H, t, d]`` (and of values ``value_dim`` wide, ``d`` by
        default) after the cached ones (quantized with groups of ``group_size`` channels): a
        ValueError when they do not fit the cache's batch, heads or widths."""
        self._check_layout()
        b, h, t, d = k.shape
        dv = d if value_dim is None else value_dim
        for width, what in ((d, "head_dim"), (dv, "the values' head_dim")):
            if group_size <= 0 or group_size % 2 or width % group_size:
                raise ValueError(f"{what} {width} must be a multiple of an even group_size, got "
                                 f"{group_size}")  # fmt: skip
        want = (
            (b, h, d // 2), (b, h, d // group_size), (b, h, dv // 2), (b, h, dv // group_size)
        )  # fmt: skip
        if self.buffers is not None and self.length + t <= self.capacity:  # (a decode step)
            have = tuple((x.shape[0], x.shape[1], x.shape[3]) for x in self.buffers)
            if have == want and self.buffers[0].device == k.device:
                return
        parts = (k.new_empty((*w[:2], 0, w[2]), dtype=torch.uint8 if i % 2 == 0 else FP8)
                 for i, w in enumerate(want))  # fmt: skip
        self._make_room(tuple(parts), t)

    def truncate(self, length: int) -> None:
        """Keeps the first ``length`` tokens (the buffers keep their capacity)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}], got {length}")
        self.length = length

    def reorder(self, batch_index: torch.Tensor) -> None:
        if self.buffers is not None:
            idx = batch_index.to(self.buffers[0].device)
            self.buffers = tuple(t.index_select(0, idx) for t in self.buffers)

    def clear(self) -> None:
        self.buffers, self.length = None, 0

    def dequantized(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys ``[B, H, length, d]`` and values ``[B, H, length, d_v]`` in ``dtype``."""
        return dequantize_kv_int4(self.kq, self.ks, dtype), dequantize_kv_int4(
            self.vq, self.vs, dtype
        )

    def nbytes(self) -> int:
        """Bytes of the cached tokens (keys, values, scales)."""
        if self.buffers is None:
            return 0
        return sum(t.element_size() * t[..., 0, :].numel() for t in self.buffers) * self.length

    def allocated_nbytes(self) -> int:
        """Bytes of the buffers, spare capacity included (at most twice the tokens' beyond 64)."""
        return (
            0 if self.buffers is None else sum(t.numel() * t.element_size() for t in self.buffers)
        )
