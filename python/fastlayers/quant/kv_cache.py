# SPDX-License-Identifier: Apache-2.0
"""Storage of one layer's INT4 KV cache (FireQ format, :mod:`fastlayers.quant.rope_kv`): packed keys
and values ``uint8 [B, H_kv, T, d/2]`` with FP8 scales ``[B, H_kv, T, d/g]``, in buffers with spare
capacity along the tokens (doubled when full), so a decode step writes its token in place instead
of copying the cache (``torch.cat`` per step moves O(context) bytes per layer and token).

Plain PyTorch; the Hugging Face cache (:class:`fastlayers.quant.Int4KVCache`) and
:class:`fastlayers.RopeAwareQuantAttention` both keep their tokens in it.
"""

from __future__ import annotations

import torch

from fastlayers.quant.rope_kv import dequantize_kv_int4


class Int4KVStore:
    """``append`` quantized tokens, read the filled part as ``kq``/``ks``/``vq``/``vs`` views, or
    the capacity-sized ``buffers`` with ``length`` (what the decode kernel takes). ``truncate``
    only moves the length (speculative rollback), ``reorder`` selects batch rows (beam search)."""

    MIN_CAPACITY = 64

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, ...] | None = None  # kq, ks, vq, vs: [B, H, capacity, .]
        self.length = 0

    def _filled(self, i: int):
        return None if self.buffers is None else self.buffers[i][..., : self.length, :]

    kq = property(lambda self: self._filled(0))
    ks = property(lambda self: self._filled(1))
    vq = property(lambda self: self._filled(2))
    vs = property(lambda self: self._filled(3))

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0].shape[-2]

    def append(self, kq, ks, vq, vs) -> None:
        """Adds ``kq [B, H, t, d/2]`` (and its scales, and the values) after the cached tokens."""
        parts = (kq, ks, vq, vs)
        if self.buffers is not None:
            for new, old in zip(parts, self.buffers, strict=True):
                same = new.shape[:-2] == old.shape[:-2] and new.shape[-1] == old.shape[-1]
                if not same or new.dtype != old.dtype or new.device != old.device:
                    raise ValueError(
                        f"appended {new.dtype} {tuple(new.shape)} does not match the cache's "
                        f"{old.dtype} {tuple(old.shape)} (batch, heads, width)"
                    )
        need = self.length + kq.shape[-2]
        if need > self.capacity:
            capacity = max(need, self.MIN_CAPACITY, 2 * self.capacity)
            grown = []
            for i, t in enumerate(parts):
                buf = t.new_empty((*t.shape[:-2], capacity, t.shape[-1]))
                if self.length:
                    buf[..., : self.length, :] = self.buffers[i][..., : self.length, :]
                grown.append(buf)
            self.buffers = tuple(grown)
        for buf, t in zip(self.buffers, parts, strict=True):
            buf[..., self.length : need, :] = t
        self.length = need

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
        """The cached keys and values ``[B, H, length, d]`` in ``dtype``."""
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
