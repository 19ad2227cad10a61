#!/bin/sh
# Runs a --check command that must find a difference: passes when it exits non-zero, says FAILED
# and reports differing selections (a check that cannot fail is not a check). 77 (skip) passes through.
out=$("$@" 2>&1)
status=$?
printf '%s\n' "$out"
[ "$status" -eq 77 ] && exit 77
if [ "$status" -ne 0 ] && printf '%s\n' "$out" | grep -q "FAILED" && printf '%s\n' "$out" | grep -q "selections differing [1-9]"; then
  echo "the check failed on the difference, as it must"
  exit 0
fi
echo "the check did not fail on a difference (exit $status)"
exit 1
