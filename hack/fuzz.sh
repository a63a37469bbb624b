#!/usr/bin/env bash
# Runs one fuzz target for a time, as make test does: hack/fuzz.sh NAME PACKAGE TIME.
#
# A failing input fails the run, with the fuzzer's whole report. So does any
# other failure, except one: Go's fuzzing engine sometimes ends a run that
# found nothing with "context deadline exceeded" as -fuzztime runs out
# (golang/go#51484, #56238). When it writes no failing input and reports
# nothing else, that is the engine's, not the code's, and the run goes on
# with a warning. The seed corpus itself runs in go test ./... regardless.
set -uo pipefail
name=$1 pkg=$2 fuzztime=$3
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "fuzz $name ($pkg) for $fuzztime"
"${GO:-go}" test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg" >"$out" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
  grep -E 'elapsed|^ok' "$out" | tail -2
  exit 0
fi
# The engine's deadline: nothing in the report but progress lines, the
# FAIL lines and "context deadline exceeded".
others=$(grep -cvE '^(fuzz: elapsed: |--- FAIL: Fuzz|FAIL$|FAIL\s|exit status |\s*context deadline exceeded$)' "$out")
if grep -q 'context deadline exceeded' "$out" && ! grep -q 'Failing input written' "$out" && [ "$others" -eq 0 ]; then
  tail -4 "$out"
  echo "fuzz $name: the engine's deadline at the end of -fuzztime (golang/go#51484), no failing input: not a failure"
  exit 0
fi
cat "$out"
exit $rc
