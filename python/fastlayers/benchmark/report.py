# SPDX-License-Identifier: Apache-2.0
"""Runs the family benchmarks; writes the report (markdown + CSV) with device, commit, versions."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

import torch

import fastlayers
from fastlayers.benchmark import fff, harness, int4_fp8, kv_int4, peer, rmsnorm, skip

# Every family that has a benchmark; `python -m fastlayers bench` runs them all.
FAMILIES = {
    "rmsnorm": rmsnorm,
    "fff": fff,
    "peer": peer,
    "int4_fp8": int4_fp8,
    "skip": skip,
    "kv_int4": kv_int4,
}


def git_commit() -> str:
    """The commit of the code that ran: ``FASTLAYERS_COMMIT`` when set (a copied tree whose git
    metadata is stale, as on the lent GPU machine), else the package's own checkout (editable
    install), else the checkout the command runs in."""
    if os.environ.get("FASTLAYERS_COMMIT"):
        return os.environ["FASTLAYERS_COMMIT"]
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=where,
                timeout=10,
            )
            if out.returncode != 0:
                continue
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=where,
                timeout=10,
            )
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def metadata(device: torch.device) -> dict:
    return {
        "device": harness.describe_device(device),
        "commit": git_commit(),
        "fastlayers": fastlayers.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }


def run(device: torch.device, quick: bool, reps: int, families=None) -> tuple[dict, list]:
    rows = []
    for name in families or FAMILIES:
        rows += FAMILIES[name].run(device, quick=quick, reps=reps)
    return metadata(device), rows


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def write(out_dir: Path, meta: dict, rows, quick: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(meta["device"].split(",")[0]) + ("-quick" if quick else "")
    md = out_dir / f"{stem}.md"
    lines = [f"# Benchmark: {meta['device']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [
        "",
        "Times are medians of per-call timings on inputs rotated past the last-level cache; "
        "'of copy BW' is the op's bytes/s over `dst.copy_(src)` measured in the same run.",
        "",
        harness.format_table(rows, markdown=True),
        "",
    ]
    md.write_text("\n".join(lines))
    harness.write_csv(rows, out_dir / f"{stem}.csv", meta)
    return md
