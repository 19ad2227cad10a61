#!/usr/bin/env bash
# Builds the examples and runs the main demo: the passkey benchmark on the passkey-256 model
# (trained at 256 tokens) from 256 to 16384 tokens, dense vs sink+window vs LongHeads, then one
# 262,144-token prompt with the recommended policy (answer, time, tokens/s), then the two-hop
# retrieval task at 4,096 tokens on tools/eval_models/retrieval-256.bin (dense vs LongHeads).
# Without the model it says where to get it and runs the synthetic 128k-token needle demo.
# Extra arguments go to the demo program.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
models="${LONGHEADS_MODELS:-../shared/models}"
if [ -f "$models/passkey-256.bin" ]; then
  cmake --build build -j "$(nproc)" --target longheads_llama2c
  mkdir -p out
  ./build/examples/longheads_llama2c --model "$models/passkey-256.bin" --passkey \
    --lengths 256,1024,4096,16384 --depths 3 --chunk-size 32 --chunks 8 --threads "$(nproc)" \
    --methods dense,sink-window,paper,recommended --policy recommended \
    --plot out/passkey.png --heatmap out/heatmap.png "$@"
  echo
  echo "Long context: one 262,144-token passkey prompt, 1024x the context passkey-256 was trained at"
  echo "(about a minute on 2 cores; the recommended policy reads the same number of chunk summaries per token at any length):"
  ./build/examples/longheads_llama2c --model "$models/passkey-256.bin" --passkey --lengths 262144 --depths 1 \
    --chunk-size 32 --chunks 8 --threads "$(nproc)" --methods recommended --policy recommended --quiet --answers
  retrieval="${LONGHEADS_DATA:-../shared/data}/retrieval"
  if [ -f "$retrieval/manifest.jsonl" ]; then
    echo
    echo "A harder task: two-hop retrieval (the question names an alias; its needle names the needle that holds the"
    echo "answer) at 4,096 tokens, 16x the context tools/eval_models/retrieval-256.bin was trained at (10 prompts):"
    ./build/examples/longheads_llama2c --model tools/eval_models/retrieval-256.bin --passkey --prompt-set "$retrieval" --task hop \
      --lengths 4096 --chunk-size 32 --chunks 8 --threads "$(nproc)" --methods dense,recommended --policy recommended --quiet
  fi
else
  echo "longheads: no passkey-256.bin in $models." >&2
  echo "  The models ship in the project's shared/ directory (beside this checkout: ../shared/models);" >&2
  echo "  point LONGHEADS_MODELS at a directory that holds passkey-256.bin and its .vocab.txt." >&2
  echo "  Running the self-contained synthetic demo instead." >&2
  cmake --build build -j "$(nproc)" --target needle_demo
  ./build/examples/needle_demo "$@"
fi
