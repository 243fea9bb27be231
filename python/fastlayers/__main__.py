# SPDX-License-Identifier: Apache-2.0
"""Command line: ``python -m fastlayers info | bench [--quick] | demo [--quick]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    import json

    from fastlayers._info import format_info, info

    print(json.dumps(info(), indent=2) if args.json else format_info())
    return 0


def _cmd_bench(args) -> int:
    import torch

    from fastlayers._info import format_info
    from fastlayers.benchmark import harness, report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    print(format_info())
    print(
        f"\nbenchmarking on {harness.describe_device(device)}"
        f"{' (quick)' if args.quick else ''} ...",
        flush=True,
    )
    harness.COMPILE_BASELINES = not args.no_compile
    meta, rows = report.run(device, quick=args.quick, reps=args.reps, families=args.family)
    print()
    print(harness.format_table(rows))
    if args.out:
        path = report.write(Path(args.out), meta, rows, args.quick)
        print(f"\nwrote {path} and its .csv")
    return 0


def _cmd_demo(args) -> int:
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("demo: needs transformers (pip install '.[hf]')", file=sys.stderr)
        return 2
    from fastlayers import demo

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(demo.run(device, quick=args.quick))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fastlayers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what this installation can run")
    p_info.add_argument("--json", action="store_true")
    p_info.set_defaults(fn=_cmd_info)
    p_bench = sub.add_parser("bench", help="run every family's benchmark and print one table")
    p_bench.add_argument(
        "--quick", action="store_true", help="one shape, two dtypes (< 1 min on CPU)"
    )
    p_bench.add_argument("--device", choices=["cpu", "cuda"], help="default: the GPU when present")
    p_bench.add_argument("--reps", type=int, default=20, help="timed calls per measurement")
    p_bench.add_argument("--family", action="append", help="only this family (repeatable)")
    p_bench.add_argument("--out", help="also write <device>.md and .csv into this folder")
    p_bench.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the torch.compile baselines (seconds of compilation per shape)",
    )
    p_bench.add_argument(
        "--no-thp",
        action="store_true",
        help="do not turn on torch's huge-page CPU allocator (see README)",
    )
    p_bench.set_defaults(fn=_cmd_bench)
    p_demo = sub.add_parser("demo", help="patch a small Llama with every family and compare")
    p_demo.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens")
    p_demo.add_argument("--device", choices=["cpu", "cuda"], help="default: the GPU when present")
    p_demo.set_defaults(fn=_cmd_demo)
    args = parser.parse_args(argv)
    if (
        args.command == "bench"
        and not args.no_thp
        and os.environ.get("THP_MEM_ALLOC_ENABLE") is None
    ):
        # NOTE(thp): torch reads THP_MEM_ALLOC_ENABLE when it is imported, so it has to be set for a
        # fresh process. Without it every fresh multi-MB CPU output is mmap'ed and page-faulted in
        # 4 KiB pages, which at 4096x4096 costs several times the kernel itself, for fastlayers and
        # the baselines alike.
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
        os.execve(sys.executable, [sys.executable, "-m", "fastlayers", *argv], env)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
