# SPDX-License-Identifier: Apache-2.0
"""Test builds only: turns a .cu file into host C++ for the CPU emulation (``emu.h``).

Three rewrites, nothing else changes (line numbers are kept, so compiler messages point into the
.cu file through ``#line``):

* ``kernel<<<grid, block[, smem[, stream]]>>>(args)``
  -> ``::emu::launch(kernel, "file:line kernel", grid, block, ...)(args)`` (the launch site names
  the kernel in error messages and in ``FASTLAYERS_EMU_TRACE=1``'s list at exit)
* ``extern __shared__ [__align__(n)] T name[];``
  -> ``T* name = reinterpret_cast<T*>(::emu::dynamic_smem());``
* ``__shared__ [__align__(n)] T name[dims];``
  -> ``static T name[dims]; ::emu::shared_array(name, sizeof(name));``
  (blocks run one after another, so a function-local static is the block's shared memory; it is
  poisoned when the first thread of each block reaches it); any other ``__shared__`` (e.g. two
  arrays in one statement) is refused: it would compile as a per-thread local
* ``__launch_bounds__(n[, m]) kernel(...) {`` -> ``kernel(...) { ::emu::launch_bounds(n);`` (a
  launch with more threads per block than ``n`` fails, as it does on a GPU)

Usage: ``python translate.py in.cu out.cpp``
"""

from __future__ import annotations

import json
import os
import re
import sys

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;"
)
_SHARED = re.compile(
    r"__shared__\s+((?:__align__\(\s*\d+\s*\)\s+)?[A-Za-z_][\w:\s]*?)\s+(\w+)\s*((?:\[[^\]]*\])+)\s*;"
)


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (``name``, ``ns::name<T, 4>``)."""
    i = end
    while True:
        if i > 0 and text[i - 1] == ">":  # template arguments: skip to the matching '<'
            depth = 0
            while i > 0:
                i -= 1
                c = text[i]
                if c == ">":
                    depth += 1
                elif c == "<":
                    depth -= 1
                    if depth == 0:
                        break
        j = i
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] == "_"):
            j -= 1
        if j == i:
            raise ValueError(f"no kernel name before <<< at offset {end}")
        i = j
        if text[i - 2 : i] == "::":
            i -= 2
            continue
        return i


def _rewrite(text: str, token: str, edit) -> str:
    """Each occurrence of ``token``, left to right: ``edit(text, at) -> (start, end, new)`` replaces
    ``text[start:end]`` (``start <= at``) and the search goes on at ``end``."""
    out, pos = [], 0
    while (k := text.find(token, pos)) >= 0:
        start, end, new = edit(text, k)
        out += [text[pos:start], new]
        pos = end
    return "".join([*out, text[pos:]])


def _launch_bounds(text: str, k: int):
    i, depth = k + len("__launch_bounds__("), 1
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    bound = text[k + len("__launch_bounds__(") : i - 1].split(",")[0]
    body = text.index("{", i)  # the kernel's body (parameter lists hold no braces)
    return k, body + 1, text[i : body + 1] + f" ::emu::launch_bounds({bound});"


def _launch(text: str, k: int, path: str):
    e = text.find(">>>", k)
    start = _kernel_start(text, k)
    kernel, config = text[start:k], text[k + 3 : e]
    site = f"{path}:{text.count(chr(10), 0, k) + 1} {' '.join(kernel.split())}"
    return start, e + 3, f"::emu::launch({kernel}, {json.dumps(site)}, {config})"


def translate(text: str, path: str = "?") -> str:
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::emu::dynamic_smem());", text
    )
    text = _SHARED.sub(
        lambda m: f"static {m[1]} {m[2]}{m[3]}; ::emu::shared_array({m[2]}, sizeof({m[2]}));", text
    )
    # A declaration the patterns above did not take (two arrays in one statement, say) would
    # compile as a per-thread local array here: refused instead.
    for number, line in enumerate(text.split("\n"), 1):
        if "__shared__" in line.split("//")[0]:
            raise ValueError(
                f"{path}:{number}: a __shared__ declaration the emulation cannot take "
                "(one array or variable per statement)"
            )
    text = _rewrite(text, "__launch_bounds__(", _launch_bounds)
    return _rewrite(text, "<<<", lambda t, k: _launch(t, k, path))


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n')
        name = src.replace(os.sep, "/")
        f.write(translate(text, name[name.rfind("csrc/") :] if "csrc/" in name else name))


if __name__ == "__main__":
    main()
