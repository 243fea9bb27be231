#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Compiler launcher for the Hopper CUTLASS objects (CMakeLists.txt, fastlayers_cuda_sm90): runs the
# compile, passes its output through, and fails the build when ptxas reports a serialised wgmma
# pipeline (C7510, e.g. a build without -DNDEBUG; C7515). ptxas prints these as "info", so
# -Xptxas --warning-as-error does not catch them, and such a kernel runs several times slower.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$@" >"$log" 2>&1
rc=$?
cat "$log" >&2
if grep -Eq '\(C75(10|15)\)' "$log"; then
  echo "error: ptxas serialised the wgmma pipeline (C7510/C7515) in the object above; this kernel" \
       "would run far below its speed. Is -DNDEBUG set?" >&2
  exit 1
fi
exit $rc
