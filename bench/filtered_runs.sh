#!/bin/sh
# ctest bench_filtered: the smoke suite run through several --benchmark_filter values, each of
# which must exit 0 (a filtered run used to crash at exit, freeing caches into a resource that
# was already gone), and the LongHeads decode rows must time chunk-completion steps.
set -eu
bench="$1"
for filter in 'decode/batch/' 'decode/separate/' 'shard/' 'decode/longheads/' 'decode/longheads-bf16-at-completion/' 'decode/dense-bf16/llama3_8b' 'prefill/' 'component/' 'probe/' 'no-such-benchmark'; do
  echo "== --benchmark_filter=$filter"
  "$bench" --smoke --benchmark_filter="$filter" --benchmark_format=json > filtered.json
done
"$bench" --smoke --benchmark_filter='^decode/longheads/llama2_7b/2048/threads:1/' --benchmark_format=json > filtered.json
if ! grep -Eq '"completion_steps": [1-9]' filtered.json; then
  echo "decode/longheads timed no chunk-completion step:" >&2
  cat filtered.json >&2
  exit 1
fi
echo "every filter exited 0; LongHeads decode timed $(grep -Eo '"completion_steps": [0-9.e+]+' filtered.json)"
