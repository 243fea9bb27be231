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


def _git(where: Path, *args: str) -> str | None:
    """``git args`` run in ``where``: its output, or None when it fails."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """The commit of the code that ran: ``FASTLAYERS_COMMIT`` when set (a copied tree whose git
    metadata is stale, as on the lent GPU machine), else the package's own checkout (editable
    install), else the checkout the command runs in. Only a fastlayers checkout counts: an
    installed package can sit inside another repository (pyenv's root is a git checkout)."""
    if os.environ.get("FASTLAYERS_COMMIT"):
        return os.environ["FASTLAYERS_COMMIT"]
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        top = _git(where, "rev-parse", "--show-toplevel")
        if top is None or not (Path(top) / "python" / "fastlayers" / "__init__.py").is_file():
            continue
        head = _git(where, "rev-parse", "--short", "HEAD")
        if head is None:
            continue
        dirty = _git(where, "status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
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
    with harness.quick_budget(quick and device.type == "cpu"):
        for name in families or FAMILIES:
            rows += FAMILIES[name].run(device, quick=quick, reps=reps)
    return metadata(device), rows


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def write_markdown(out_dir: Path | str, name: str, lines: list[str]) -> Path:
    """A bench script's report: ``lines`` joined, printed, and written to ``out_dir / name``
    (the folder made if needed). Returns the file's path."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)
    return out / name


def write(out_dir: Path, meta: dict, rows, quick: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(meta["device"].split(",")[0]) + ("-quick" if quick else "")
    md = out_dir / f"{stem}.md"
    lines = [f"# Benchmark: {meta['device']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [
        "",
        "Times are medians of per-call timings on inputs rotated past the last-level cache, the op "
        "and its baselines (and the copy) timed interleaved, call by call; 'of copy BW' is the "
        "op's bytes/s over `dst.copy_(src)` measured in the same run.",
        "",
        harness.format_table(rows, markdown=True),
        "",
    ]
    md.write_text("\n".join(lines))
    harness.write_csv(rows, out_dir / f"{stem}.csv", meta)
    plot(rows, meta, out_dir / f"{stem}.png")
    return md


def plot(rows, meta: dict, path: Path) -> Path | None:
    """A PNG of speed-up over each baseline per shape, one panel per op (needs matplotlib, the
    ``plot`` extra; without it nothing is written and None is returned)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = list(dict.fromkeys(r.op for r in rows))
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        mine = [r for r in rows if r.op == op]
        labels = list(dict.fromkeys(f"{r.shape} {r.dtype}" for r in mine))
        baselines = list(dict.fromkeys(r.baseline for r in mine))
        width = 0.8 / max(len(baselines), 1)
        for i, base in enumerate(baselines):
            xs, ys = [], []
            for r in mine:
                if r.baseline == base:
                    xs.append(labels.index(f"{r.shape} {r.dtype}") + i * width)
                    ys.append(r.speedup)
            ax.bar(xs, ys, width=width, label=base)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up")
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"fastlayers {meta.get('fastlayers')} on {meta.get('device')} "
                 f"(commit {meta.get('commit')})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
