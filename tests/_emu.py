# SPDX-License-Identifier: Apache-2.0
"""Helpers for tests that run the CUDA kernels in the CPU emulation build."""

from fastlayers import _ext


def emulated_launches(kernel: str, blocks: bool = False) -> int | None:
    """Launches so far, in a CUDA emulation build, from launch sites whose kernel expression starts
    with ``kernel`` (None on a GPU: not counted); with ``blocks``, their blocks (every launch's
    grid). Kernels launched through ``cuda::tc::launch`` are counted under that helper's
    expression, ``kernel``."""
    c = _ext.C
    if c is None or not hasattr(c, "cuda_emu_launches"):
        return None
    launches = c.cuda_emu_launches(blocks).items()
    return sum(n for site, n in launches if site.split(" ")[1].startswith(kernel))


def launches_since(
    kernels: tuple[str, ...], before: list[int | None] | None = None, blocks: bool = False
):
    """The launches (with ``blocks``: their blocks) of each of ``kernels`` (emulated_launches'
    prefixes) so far, or, given ``before`` (an earlier call's answer), since then; None on a GPU
    (not counted)."""
    now = [emulated_launches(k, blocks) for k in kernels]
    if now[0] is None:
        return None
    return now if before is None else [n - b for n, b in zip(now, before, strict=True)]
