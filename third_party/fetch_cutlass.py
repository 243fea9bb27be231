#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Puts the CUTLASS headers in third_party/cutlass (gitignored) from the nvidia-cutlass wheel.

CMake's FindCUTLASS looks here after $CUTLASS_DIR and an installed nvidia-cutlass wheel, and runs
this script itself when a 90a build finds neither. The wheel is downloaded with --no-deps: its
dependencies (cuda-python, scipy, ...) are not needed for headers.
"""

import importlib.util
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


def _pip() -> list[str]:
    """This interpreter's pip, or (inside pip's isolated build environment, which hides it) the
    pip on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    exe = shutil.which("pip3") or shutil.which("pip")
    if exe is None:
        raise SystemExit("fetch_cutlass: no pip to download nvidia-cutlass with")
    return [exe]


def main() -> int:
    if (DEST / "include" / "cutlass" / "cutlass.h").exists():
        print(f"CUTLASS headers already in {DEST}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*_pip(), "download", "--no-deps", "--quiet", "-d", tmp,
                        f"nvidia-cutlass=={VERSION}"], check=True)
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
