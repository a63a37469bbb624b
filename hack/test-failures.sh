#!/usr/bin/env bash
# Prints what each failed test logged, from a `go test -v` log (make test
# keeps only the RUN/PASS/FAIL lines on the terminal; CI shows only that).
# Usage: hack/test-failures.sh .cache/test.log
set -euo pipefail
log=${1:?usage: $0 go-test-v.log}
grep -oE -- '--- FAIL: [^ ]+' "$log" | awk '{print $3}' | grep -v / | sort -u | while read -r name; do
	echo "----- $name: what it logged (at most 60 lines) -----"
	awk -v n="$name" '
		$0 == "=== RUN   " n { on = 1 }
		on && /^ +[^ ]+\.go:[0-9]+: / { print; c++ }
		on && index($0, "--- FAIL: " n " ") { exit }
		c >= 60 { exit }
	' "$log"
done
