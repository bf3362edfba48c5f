#!/usr/bin/env bash
# Runs a GoogleTest binary and ends with one line "N passed, N failed, N skipped" (CI reads it);
# exits non-zero when anything failed.
set -o pipefail
bin=$1; shift
log=$(mktemp)
"$bin" "$@" 2>&1 | tee "$log"
rc=$?
passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
failed=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*, listed below.*/\1/p' "$log" | tail -1)
skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*, listed below.*/\1/p' "$log" | tail -1)
rm -f "$log"
passed=${passed:-0} failed=${failed:-0} skipped=${skipped:-0}
[ "$rc" -ne 0 ] && [ "$failed" -eq 0 ] && failed=1  # a crash before gtest's summary still fails
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
exit $rc
