#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A short hash of everything the compiled extension is built from (csrc/, cmake/, CMakeLists.txt,
# pyproject.toml), the same on any machine: names a prebuilt module's sources (scripts/prebuild_gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc cmake CMakeLists.txt pyproject.toml -type f -print0 | LC_ALL=C sort -z |
  xargs -0 sha256sum | sha256sum | cut -c1-16
