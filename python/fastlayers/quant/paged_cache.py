# SPDX-License-Identifier: Apache-2.0
"""A paged INT4 KV cache for serving loops: many sequences of their own lengths (continuous
batching), forks that share their parent's tokens (beam search, parallel sampling), rollback
(speculative decoding), over one pool of pages per layer.

The kernels are :func:`fastlayers.ops.int4_kv_decode_paged` and
:func:`fastlayers.ops.kv_cache_write_paged`; this class is the bookkeeping around them, as a
serving engine's block manager (vLLM's) keeps it: a free list of pages, one block table per
sequence (shared by the layers), and a reference count per page. A page that two sequences share
is copied before either writes into it (copy on write), so a fork costs nothing until the forks
diverge inside a page. The bookkeeping lives on the host (Python lists); the device holds the
pages and, per step, the block table and lengths the decode reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fastlayers.ops._common import check_int
from fastlayers.quant.rope_kv import FP8


@dataclasses.dataclass(frozen=True)
class DecodeSplit:
    """A mixed step's one-token rows apart from its rows of several tokens (``PagedStep.split``),
    for two kernel calls on CUDA (vLLM's FlashInfer backend splits its batches likewise): the
    decode rows through the split-KV decode kernel, which reads each kv head's tokens once for
    the whole GQA group, the others through the ragged prefill, whose 64-row tiles a decode
    row fills only its GQA group's rows of (the group's heads packed), without splitting its
    keys.
    ``decode_tokens`` / ``prefill_tokens``: the step's tokens (rows of q) of each part, a
    ``slice`` where the decode rows come first or last (views; the outputs joined by one
    ``torch.cat``), else int64 indices; then each part's block table and lengths (tables as
    wide as the part's longest row: the decode plans its key splits over that width) and the
    prefill part's query starts and most tokens."""

    decode_tokens: slice | torch.Tensor
    prefill_tokens: slice | torch.Tensor
    decode_table: torch.Tensor
    decode_lens: torch.Tensor
    prefill_table: torch.Tensor
    prefill_lens: torch.Tensor
    prefill_cu: torch.Tensor
    prefill_max: int


@dataclasses.dataclass(frozen=True)
class PagedStep:
    """One serving step's metadata (FlashInfer's plan), from :meth:`Int4PagedKVCache.plan` (or
    :func:`plan_paged_step` for a block manager of the caller's): the step's sequences (rows)
    and their new tokens, and on the device (one host-to-device copy) the new tokens' ``slots``
    (int64 ``[N]``, each sequence's in turn), the sequences' ``block_table`` (int32
    ``[S, max_pages]``) and ``seq_lens`` (int32 ``[S]``, the new tokens included),
    ``cu_seqlens_q`` (int32 ``[S + 1]``: where each sequence's tokens start among the step's N,
    then N) and ``max_seqlen_q`` (the most new tokens of one sequence). Valid by construction
    (built from the cache's own bookkeeping, or checked once by the plan): the layers' writes and
    attention calls that take it skip the host-side range checks (no device-to-host read per
    layer); they check only that the pages they get are a pool of ``page_size`` and at least
    ``num_pages`` pages, the one it was planned for. ``split``: on CUDA, a step of one-token
    rows beside longer ones also carries a :class:`DecodeSplit` (the attention then makes two
    kernel calls), else None."""

    seqs: tuple[int, ...]
    counts: tuple[int, ...]
    slots: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    split: DecodeSplit | None = None
    page_size: int = 0  # (the pool the step was planned for: its page size, its pages)
    num_pages: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])


def _make_step(seqs, counts, slots, tables, lengths, device, split: bool, page_size: int,
               num_pages: int) -> PagedStep:  # fmt: skip
    """A :class:`PagedStep` from host lists (``tables[i]`` / ``lengths[i]``: sequence ``i``'s
    pages and length, its new tokens included) for a pool of ``num_pages`` pages of ``page_size``
    tokens, in one host-to-device copy; with ``split`` and rows of one token beside rows of
    more, its :class:`DecodeSplit` too."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    pieces = [list(slots)]

    def rows(which):  # block table [len(which), width] and lengths of the sequences `which`
        width = max([len(tables[i]) for i in which] + [1])
        flat = []
        for i in which:
            flat += tables[i] + [0] * (width - len(tables[i]))
        pieces.extend([flat, [lengths[i] for i in which]])
        return width

    widths = [rows(range(len(counts)))]
    pieces.append(starts)
    dec = [i for i, n in enumerate(counts) if n == 1]
    pre = [i for i, n in enumerate(counts) if n > 1]
    split = split and bool(dec) and bool(pre)
    if split:
        widths += [rows(dec), rows(pre)]
        pre_cu = [0]
        for i in pre:
            pre_cu.append(pre_cu[-1] + counts[i])
        pieces.append(pre_cu)
        dec_tokens = [starts[i] for i in dec]
        total, n_dec = starts[-1], len(dec)
        if dec_tokens == list(range(n_dec)):  # decode rows first (vLLM's order) or last: views
            selection = (slice(0, n_dec), slice(n_dec, total))
        elif dec_tokens == list(range(total - n_dec, total)):
            selection = (slice(total - n_dec, total), slice(0, total - n_dec))
        else:
            selection = None
            pieces += [dec_tokens, [t for i in pre for t in range(starts[i], starts[i + 1])]]
    host = torch.tensor([x for piece in pieces for x in piece], dtype=torch.int32)
    dev, views, at = host.to(device), [], 0
    for piece in pieces:
        views.append(dev[at : at + len(piece)])
        at += len(piece)
    n_seqs = len(counts)
    step_split = None
    if split:
        d_table, d_lens, p_table, p_lens, p_cu = views[4:9]
        if selection is None:
            selection = (views[9].long(), views[10].long())
        step_split = DecodeSplit(
            *selection, d_table.view(len(dec), widths[1]), d_lens,
            p_table.view(len(pre), widths[2]), p_lens, p_cu, max(counts[i] for i in pre),
        )  # fmt: skip
    # (slots as int64 once, the writes' index type, rather than at every layer's write)
    return PagedStep(tuple(seqs), tuple(counts), views[0].long(),
                     views[1].view(n_seqs, widths[0]), views[2], views[3], max(list(counts) + [1]),
                     step_split, page_size, num_pages)  # fmt: skip


def _token_slots(pages: list[int], page_size: int, begin: int, end: int) -> list[int]:
    """The slots (``page * page_size + slot``, vLLM's slot mapping) of a sequence's tokens
    ``begin .. end - 1`` in its pages."""
    return [pages[t // page_size] * page_size + t % page_size for t in range(begin, end)]


def _host_ints(x, name: str, dims: int) -> list:
    """``x`` (an integer tensor, read to the host once, or nested lists of ints) as lists."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.dim() != dims:
            raise TypeError(f"{name} must be a {dims}-d integer tensor or list, got {x.dtype} "
                            f"{tuple(x.shape)}")  # fmt: skip
        if x.device.type == "meta":
            raise ValueError(f"{name} must hold values (the plan reads them), got a meta tensor")
        return x.tolist()
    if not isinstance(x, Sequence):
        raise TypeError(f"{name} must be an integer tensor or a list, got {type(x).__name__}")
    if dims == 1:
        return [check_int(v, name) for v in x]
    return [_host_ints(row, name, 1) for row in x]


def plan_paged_step(block_table, seq_lens, cu_seqlens_q, page_size: int, num_pages: int,
                    device=None) -> PagedStep:  # fmt: skip
    """FlashInfer's plan for the metadata of a block manager of the caller's own (vLLM's block
    tables): a :class:`PagedStep` that :func:`fastlayers.ops.int4_kv_attention_paged_planned`
    and :func:`fastlayers.ops.kv_cache_write_paged_planned` take for every layer of the step
    without reading anything back to the host, as :meth:`Int4PagedKVCache.plan`'s.

    ``block_table`` (``[S, max_pages]``), ``seq_lens`` (``[S]``: each row's tokens, its new ones
    included) and ``cu_seqlens_q`` (``[S + 1]``: where each row's new tokens start among the
    step's N, then N; a row's new tokens are its last ones): integer tensors (read to the host
    once, here: pass CPU tensors to avoid a device synchronization) or lists. Checked here, once:
    the pages each row uses in ``[0, num_pages)``, ``seq_lens`` within the table, the counts
    within ``seq_lens``, and the new tokens' slots (computed from the table:
    ``page * page_size + slot``) distinct (a page two rows share must be copied before either
    writes into it). ``device``: where the metadata goes (default: ``block_table``'s device, or
    the CPU for lists)."""
    from fastlayers.ops import kvint4_paged  # (ops import quant)

    page_size, num_pages = check_int(page_size, "page_size"), check_int(num_pages, "num_pages")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if num_pages <= 0:
        raise ValueError(f"num_pages must be > 0, got {num_pages}")
    if device is None:
        device = block_table.device if isinstance(block_table, torch.Tensor) else "cpu"
    device = torch.device(device)
    table = _host_ints(block_table, "block_table", 2)
    lens = _host_ints(seq_lens, "seq_lens", 1)
    cu = _host_ints(cu_seqlens_q, "cu_seqlens_q", 1)
    rows = len(table)
    if len(lens) != rows or len(cu) != rows + 1:
        raise ValueError(
            f"seq_lens must hold {rows} lengths and cu_seqlens_q {rows + 1} starts (block_table's "
            f"rows), got {len(lens)} and {len(cu)}"
        )
    counts = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if cu[0] != 0 or any(n < 0 for n in counts):
        raise ValueError(f"cu_seqlens_q must start at 0 and not decrease, got {cu}")
    tables, slots = [], []
    for row, (pages, length, n) in enumerate(zip(table, lens, counts, strict=True)):
        used = -(-length // page_size)
        if not n <= length <= len(pages) * page_size:
            raise ValueError(
                f"row {row}: seq_lens ({length}) must lie in [its new tokens ({n}), block_table's "
                f"{len(pages)} pages x page_size {page_size}]"
            )
        bad = [p for p in pages[:used] if not 0 <= p < num_pages]
        if bad:
            raise ValueError(f"row {row}: block_table's pages must lie in [0, {num_pages - 1}], "
                             f"got {bad[0]}")  # fmt: skip
        tables.append(pages[:used])
        slots += _token_slots(pages, page_size, length - n, length)
    if len(set(slots)) != len(slots):
        raise ValueError(
            "two new tokens share a slot (a page that rows share must be copied before either "
            "writes into it)"
        )
    return _make_step(range(rows), counts, slots, tables, lens, device,
                      kvint4_paged.split_decode_rows(device), page_size, num_pages)  # fmt: skip


class Int4PagedKVCache:
    """``num_layers`` pools of ``num_pages`` pages of ``page_size`` tokens (a power of two): for
    each layer, keys ``uint8 [num_pages, kv_heads, page_size, head_dim / 2]``, their FP8 scales
    ``[.., head_dim / group_size]``, and values likewise (``value_dim`` channels, ``head_dim`` by
    default).

    A decode step of a batch of sequences::

        slots = cache.reserve(seqs)                  # one new token each: pages as needed
        table, seq_lens = cache.block_table(seqs)    # on the cache's device, for every layer
        for layer in range(num_layers):
            ...                                      # q [S, Hq, d], k / v [S, kv_heads, d]
            cache.write(layer, k, v, slots, post_scale=post, cos=cos, sin=sin)
            out, lse = cache.decode(layer, q, table, seq_lens)

    ``reserve(seqs, tokens)`` takes several tokens per sequence (a prompt, a draft): ``slots``
    then holds each sequence's new tokens in turn, the order of the rows of ``k`` and ``v``;
    ``attention`` is their causal attention over the pages (Tq tokens per sequence). A step of
    prompt chunks beside decode tokens (chunked prefill) keeps that order for q too; ``plan``
    does the step's bookkeeping once (FlashInfer's plan / run), and the layers' calls then read
    nothing back to the host::

        step = cache.plan(seqs, counts)              # e.g. [512, 1, 1, ...]: reserve + metadata
        for layer in range(num_layers):
            cache.write(layer, k, v, step, post_scale=post, cos=cos, sin=sin)  # k, v [N, ...]
            out, lse = cache.attention_step(layer, q, step)                    # q [N, Hq, d]

    (``attention_varlen`` takes the same metadata as tensors of the caller's, checked.)
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int,
                 head_dim: int, group_size: int = 128, value_dim: int | None = None,
                 device=None):  # fmt: skip
        num_layers, num_pages = (
            check_int(num_layers, "num_layers"),
            check_int(num_pages, "num_pages"),
        )
        page_size, kv_heads = check_int(page_size, "page_size"), check_int(kv_heads, "kv_heads")
        head_dim, group_size = check_int(head_dim, "head_dim"), check_int(group_size, "group_size")
        value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim")
        for value, name in ((num_layers, "num_layers"), (num_pages, "num_pages"),
                            (kv_heads, "kv_heads")):  # fmt: skip
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        for width, name in ((head_dim, "head_dim"), (value_dim, "value_dim")):
            if width <= 0 or group_size <= 0 or group_size % 2 or width % group_size:
                raise ValueError(
                    f"{name} ({width}) must be a positive multiple of an even group_size "
                    f"({group_size})"
                )
        self.page_size, self.group_size = page_size, group_size
        self.kv_heads, self.head_dim, self.value_dim = kv_heads, head_dim, value_dim

        def pool(width: int, dtype) -> torch.Tensor:
            return torch.zeros(num_pages, kv_heads, page_size, width, dtype=torch.uint8,
                               device=device).view(dtype)  # fmt: skip

        self.pages = [
            (pool(head_dim // 2, torch.uint8), pool(head_dim // group_size, FP8),
             pool(value_dim // 2, torch.uint8), pool(value_dim // group_size, FP8))
            for _ in range(num_layers)
        ]  # fmt: skip
        self._free = list(range(num_pages - 1, -1, -1))  # (pop() hands out page 0 first)
        self._refs = [0] * num_pages
        self._tables: dict[int, list[int]] = {}  # sequence -> its pages
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    # ---- sequences --------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return len(self._refs)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def device(self) -> torch.device:
        return self.pages[0][0].device

    def sequences(self) -> list[int]:
        return list(self._tables)

    def length(self, seq: int) -> int:
        return self._lengths[self._known(seq)]

    def _known(self, seq) -> int:
        seq = check_int(seq, "seq")
        if seq not in self._tables:
            raise ValueError(f"unknown sequence {seq} (live: {sorted(self._tables)})")
        return seq

    def new_sequence(self) -> int:
        """A new empty sequence's id (no page until it gets tokens)."""
        seq, self._next_id = self._next_id, self._next_id + 1
        self._tables[seq], self._lengths[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence with ``seq``'s tokens, sharing its pages (copied on the first write into
        a shared page)."""
        seq = self._known(seq)
        child = self.new_sequence()
        self._tables[child], self._lengths[child] = list(self._tables[seq]), self._lengths[seq]
        for page in self._tables[seq]:
            self._refs[page] += 1
        return child

    def free(self, seq: int) -> None:
        """Drops the sequence; pages no other sequence holds return to the pool."""
        seq = self._known(seq)
        self.truncate(seq, 0)
        del self._tables[seq], self._lengths[seq]

    def truncate(self, seq: int, length: int) -> None:
        """Keeps the sequence's first ``length`` tokens (speculative rollback); whole pages past
        them go back to the pool."""
        seq, length = self._known(seq), check_int(length, "length")
        if not 0 <= length <= self._lengths[seq]:
            raise ValueError(f"length must be in [0, {self._lengths[seq]}], got {length}")
        table, keep = self._tables[seq], -(-length // self.page_size)
        for page in table[keep:]:
            self._release(page)
        del table[keep:]
        self._lengths[seq] = length

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    # ---- a step -----------------------------------------------------------------------------

    def reserve(self, seqs: Sequence[int], tokens: int | Sequence[int] = 1) -> torch.Tensor:
        """Room for ``tokens`` new tokens of each of ``seqs`` (one count for all, or one each):
        pages from the pool as needed, a shared last page copied first; the lengths grow. Returns
        the new tokens' slots (``page * page_size + slot``; int64 on the cache's device), each
        sequence's in turn. A RuntimeError, with nothing changed, when the pool runs out."""
        slots, _, _ = self._reserve(seqs, tokens)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def plan(self, seqs: Sequence[int], tokens: int | Sequence[int] = 1) -> PagedStep:
        """A serving step: :meth:`reserve` of ``tokens`` new tokens for each of ``seqs`` (one
        count, or one each: prompt chunks and decode tokens mixed), and the step's metadata, a
        :class:`PagedStep`, for every layer's :meth:`write` and :meth:`attention_step` (and
        :meth:`fastlayers.RopeAwareQuantAttention.forward_paged`). One host-to-device copy; the
        per-layer calls then read nothing back to the host."""
        from fastlayers.ops import kvint4_paged  # (ops import quant)

        slots, seqs, counts = self._reserve(seqs, tokens)
        return _make_step(seqs, counts, slots, [self._tables[s] for s in seqs],
                          [self._lengths[s] for s in seqs], self.device,
                          kvint4_paged.split_decode_rows(self.device), self.page_size,
                          self.num_pages)  # fmt: skip

    def _reserve(self, seqs, tokens) -> tuple[list[int], list[int], list[int]]:
        """:meth:`reserve` on the host: ``(slots, seqs, counts)`` as lists."""
        seqs = [self._known(s) for s in seqs]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must not repeat a sequence, got {seqs}")
        counts = [check_int(tokens, "tokens")] * len(seqs) if not isinstance(tokens, Sequence) \
            else [check_int(n, "tokens") for n in tokens]  # fmt: skip
        if len(counts) != len(seqs) or any(n < 0 for n in counts):
            raise ValueError(f"tokens must be one count >= 0 or one per sequence, got {tokens}")
        ps, need, refs = self.page_size, 0, {}  # refs: the tail pages' counts as copies drop them
        for seq, n in zip(seqs, counts, strict=True):
            length, table = self._lengths[seq], self._tables[seq]
            need += -(-(length + n) // ps) - len(table)
            if n > 0 and length % ps:
                tail = table[-1]
                refs.setdefault(tail, self._refs[tail])
                if refs[tail] > 1:  # (a copy on write)
                    need, refs[tail] = need + 1, refs[tail] - 1
        if need > len(self._free):
            raise RuntimeError(
                f"Int4PagedKVCache: out of pages ({need} needed, {len(self._free)} free of "
                f"{self.num_pages}); free or truncate sequences, or make a larger pool"
            )
        slots = []
        for seq, n in zip(seqs, counts, strict=True):
            length, table = self._lengths[seq], self._tables[seq]
            if n > 0 and length % ps and self._refs[table[-1]] > 1:  # copy on write
                table[-1] = self._copy(table[-1])
            while len(table) * ps < length + n:
                page = self._free.pop()
                self._refs[page] = 1
                table.append(page)
            slots += _token_slots(table, ps, length, length + n)
            self._lengths[seq] = length + n
        return slots, seqs, counts

    def _copy(self, page: int) -> int:
        """A fresh page with ``page``'s contents in every layer (the caller's reference moves)."""
        new = self._free.pop()
        self._refs[new] = 1
        self._release(page)
        for layer in self.pages:
            for t in layer:
                t.view(torch.uint8)[new] = t.view(torch.uint8)[page]
        return new

    def block_table(self, seqs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_table int32 [S, max_pages], seq_lens int32 [S])`` of ``seqs`` on the cache's
        device (one host-to-device copy each; every layer's decode of the step takes them).
        Entries past a sequence's last page are 0 (never read)."""
        seqs = [self._known(s) for s in seqs]
        width = max([len(self._tables[s]) for s in seqs] + [1])
        rows = [self._tables[s] + [0] * (width - len(self._tables[s])) for s in seqs]
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width)
        lens = torch.tensor([self._lengths[s] for s in seqs], dtype=torch.int32)
        return table.to(self.device), lens.to(self.device)

    def write(self, layer: int, k, v, slots, post_scale=None, cos=None, sin=None,
              pairing: str = "half") -> None:  # fmt: skip
        """Quantizes ``k [N, kv_heads, head_dim]`` (RoPE with ``cos`` / ``sin [N, head_dim]``
        when given, then ``post_scale [kv_heads, head_dim]``) and ``v [N, kv_heads, value_dim]``
        into layer ``layer``'s pages at ``slots``: ``reserve``'s (checked on the host), or a
        :class:`PagedStep` from :meth:`plan` (its slots, not read back)."""
        from fastlayers.ops import kvint4_paged  # (ops import quant)

        kq, ks, vq, vs = self.pages[self._layer(layer)]
        if isinstance(slots, PagedStep):
            kvint4_paged.kv_cache_write_paged_planned(k, kq, ks, slots, post_scale, cos, sin,
                                                      pairing)  # fmt: skip
            kvint4_paged.kv_cache_write_paged_planned(v, vq, vs, slots)
            return
        kvint4_paged.kv_cache_write_paged(k, kq, ks, slots, post_scale, cos, sin, pairing)
        kvint4_paged.kv_cache_write_paged(v, vq, vs, slots)

    def decode(self, layer: int, q, block_table, seq_lens, **kwargs):
        """:func:`fastlayers.ops.int4_kv_decode_paged` of ``q [S, Hq, head_dim]`` over layer
        ``layer``'s pages (``kwargs``: its ``scale``, ``softcap``, ``sinks``, ``num_splits``)."""
        from fastlayers.ops.kvint4_paged import int4_kv_decode_paged

        return int4_kv_decode_paged(q, *self.pages[self._layer(layer)], block_table, seq_lens,
                                    **kwargs)  # fmt: skip

    def attention(self, layer: int, q, block_table, seq_lens, **kwargs):
        """:func:`fastlayers.ops.int4_kv_attention_paged` of ``q [S, Hq, Tq, head_dim]`` (each
        sequence's last Tq tokens, written) over layer ``layer``'s pages (``kwargs``: its
        ``scale``, ``softcap``, ``sinks``, ``q_lens``: sequences of fewer new tokens, their
        queries first and padding after)."""
        from fastlayers.ops.kvint4_paged import int4_kv_attention_paged

        return int4_kv_attention_paged(q, *self.pages[self._layer(layer)], block_table, seq_lens,
                                       **kwargs)  # fmt: skip

    def attention_step(self, layer: int, q, step: PagedStep, **kwargs):
        """The causal attention of a :class:`PagedStep`'s new tokens, ``q [N, Hq, head_dim]`` in
        the step's order, over layer ``layer``'s pages:
        :func:`fastlayers.ops.int4_kv_attention_paged_varlen` on the step's metadata, not read
        back (``kwargs``: ``scale``, ``softcap``, ``sinks``). Returns ``(out [N, Hq, value_dim],
        lse [N, Hq])``."""
        from fastlayers.ops.kvint4_paged import int4_kv_attention_paged_planned

        return int4_kv_attention_paged_planned(q, *self.pages[self._layer(layer)], step, **kwargs)

    def attention_varlen(self, layer: int, q, block_table, seq_lens, cu_seqlens_q,
                         max_seqlen_q=None, **kwargs):  # fmt: skip
        """:func:`fastlayers.ops.int4_kv_attention_paged_varlen` of ragged ``q [N, Hq, head_dim]``
        (each sequence's new tokens in turn: the order of ``reserve``'s slots; ``cu_seqlens_q``
        int32 ``[S + 1]`` their starts, then N) over layer ``layer``'s pages: a step of prompt
        chunks and decode tokens in one call (``kwargs``: ``scale``, ``softcap``, ``sinks``)."""
        from fastlayers.ops.kvint4_paged import int4_kv_attention_paged_varlen

        return int4_kv_attention_paged_varlen(q, *self.pages[self._layer(layer)], block_table,
                                              seq_lens, cu_seqlens_q, max_seqlen_q,
                                              **kwargs)  # fmt: skip

    def _layer(self, layer) -> int:
        layer = check_int(layer, "layer")
        if not 0 <= layer < len(self.pages):
            raise ValueError(f"layer must be in [0, {len(self.pages) - 1}], got {layer}")
        return layer

    def nbytes(self) -> int:
        """Bytes of the pools (every layer's pages, used or free)."""
        return sum(t.numel() * t.element_size() for layer in self.pages for t in layer)
