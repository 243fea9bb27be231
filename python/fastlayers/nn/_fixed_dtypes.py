# SPDX-License-Identifier: Apache-2.0
"""``Module._apply`` for buffers whose dtype is part of a format (FP8 scales, fp32 scale vectors):
``model.to(torch.bfloat16)`` / ``.half()`` must move them to the new device but never cast them.
Module.to casts every floating-point buffer, and FP8 counts as floating point."""

from __future__ import annotations

import torch


def apply_keeping_dtypes(module: torch.nn.Module, super_apply, fn, names, *args, **kwargs) -> None:
    """Runs ``super_apply(fn, ...)`` (the parent class's ``_apply``) with the buffers ``names``
    only moved: ``fn`` is applied to their bytes (a uint8 view, which no cast applies to), so a
    device move copies them and ``to_empty`` allocates them (from the meta device too)."""
    fixed = {}
    for name in names:
        t = module._buffers.get(name)
        if t is not None:
            fixed[name] = t
            module._buffers[name] = None
    try:
        super_apply(fn, *args, **kwargs)
    finally:
        for name, t in fixed.items():
            moved = fn(t.contiguous().reshape(-1).view(torch.uint8))
            module._buffers[name] = moved.view(t.dtype).reshape(t.shape)


def float_cast_of(fn, device) -> torch.dtype | None:
    """The floating-point dtype ``fn`` casts to (``.to(torch.bfloat16)``, ``.half()``,
    ``.float()``), or None for a plain device move: a float64 probe tells them apart."""
    cast = fn(torch.empty(0, dtype=torch.float64, device=device)).dtype
    return None if cast == torch.float64 else cast
