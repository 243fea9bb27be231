#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Puts the CUTLASS headers in third_party/cutlass (gitignored) from the nvidia-cutlass wheel.

CMake's FindCUTLASS looks here after $CUTLASS_DIR and an installed nvidia-cutlass wheel, and runs
this script itself when a 90a build finds neither. The wheel is downloaded with --no-deps: its
dependencies (cuda-python, scipy, ...) are not needed for headers.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "4.2.0.0"
DEST = Path(__file__).resolve().parent / "cutlass"
PREFIX = "cutlass_library/source/"
KEEP = ("include/", "tools/util/include/")
LICENSE = "nvidia_cutlass-{v}.dist-info/licenses/LICENSE.txt"


def _pip() -> tuple[list[str], dict]:
    """A pip command and its environment. Inside pip's isolated build environment (a PYTHONPATH
    sitecustomize hides the interpreter's site-packages, pip included), pip runs with that
    isolation removed."""
    env = dict(os.environ)
    if importlib.util.find_spec("pip") is None:
        for var in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSAFEPATH"):
            env.pop(var, None)
    return [sys.executable, "-m", "pip"], env


def main() -> int:
    if (DEST / "include" / "cutlass" / "cutlass.h").exists():
        print(f"CUTLASS headers already in {DEST}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pip, env = _pip()
        subprocess.run([*pip, "download", "--no-deps", "--quiet", "--retries", "2", "--timeout",
                        "20", "-d", tmp, f"nvidia-cutlass=={VERSION}"], check=True, env=env)
        wheel = next(Path(tmp).glob("nvidia_cutlass-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                rel = name[len(PREFIX):] if name.startswith(PREFIX) else None
                if rel and rel.startswith(KEEP) and not name.endswith("/"):
                    target = DEST / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            with zf.open(LICENSE.format(v=VERSION)) as src, open(DEST / "LICENSE.txt", "wb") as dst:
                shutil.copyfileobj(src, dst)
    print(f"CUTLASS {VERSION} headers in {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
