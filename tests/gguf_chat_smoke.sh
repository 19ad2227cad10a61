#!/usr/bin/env bash
# longheads_chat end to end (ctest gguf_chat_smoke). First text in: a random tiny model with a
# byte-level vocabulary (tools/gguf) takes "Hello, world" as its 12 bytes + BOS under each
# attention, and --passkey builds and runs the paper's prompt (a random model answers wrong:
# exit 3, the line printed). Then passkey-256 written as GGUF (F32 and Q8_0, its vocabulary's
# words), a public 1,024-token passkey prompt (4x its context) fed as ids with LongHeads, greedy:
# the answer printed must be the prompt's passkey; that part exits 77 without ../shared.
#   tests/gguf_chat_smoke.sh CHAT_BINARY PYTHON3 WORK_DIR
set -euo pipefail
chat=$1 python=$2 work=$3
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${LONGHEADS_SHARED:-$here/../shared}
mkdir -p "$work"
"$python" "$here/tools/gguf/random_llama2c.py" "$work/tiny.bin" --shape tiny
"$python" "$here/tools/gguf/llama2c_to_gguf.py" "$work/tiny.bin" "$work/tiny.gguf" --byte-vocab >/dev/null
for attention in longheads dense sink-window; do
  "$chat" --model "$work/tiny.gguf" --prompt "Hello, world" --steps 4 --attention $attention --quiet 2> "$work/err.txt" >/dev/null
  grep -q "^13 prompt tokens" "$work/err.txt" || { cat "$work/err.txt"; echo "FAILED: text in ($attention)"; exit 1; }
done
# sampling at its bounds: top-p 0 keeps the top token (it once kept none and read out of range)
"$chat" --model "$work/tiny.gguf" --prompt "Hello, world" --steps 4 --temperature 1 --top-p 0 --quiet 2> "$work/err.txt" >/dev/null ||
  { cat "$work/err.txt"; echo "FAILED: --top-p 0"; exit 1; }
set +e
"$chat" --model "$work/tiny.gguf" --passkey 2000 --steps 6 --quiet > "$work/out.txt" 2>/dev/null
code=$?
set -e
verdict=$(grep -aEo "^passkey [0-9]{5} at [0-9]+ tokens \(depth 0.50\): (right|wrong)" "$work/out.txt" | grep -aEo "(right|wrong)$" || true)
if ! { [ "$verdict" = right ] && [ $code -eq 0 ]; } && ! { [ "$verdict" = wrong ] && [ $code -eq 3 ]; }; then
  cat -v "$work/out.txt"; echo "FAILED: --passkey (exit $code)"; exit 1
fi
echo "text in (3 attentions) and --passkey through a byte-level vocabulary: ran, the random model answered $verdict (exit $code)"
model=$shared/models/passkey-256.bin
prompt=$shared/data/passkey/L1024_s1.bin
if [ ! -f "$model" ] || [ ! -f "$prompt" ]; then echo "skipped: $shared has no passkey-256 model or prompt set"; exit 77; fi
expected=$(grep '"L1024_s1.bin"' "$shared/data/passkey/manifest.jsonl" | sed 's/.*"passkey": \([0-9]*\).*/\1/' | sed 's/./& /g; s/ $//')
for type in f32 q8_0; do
  "$python" "$here/tools/gguf/llama2c_to_gguf.py" "$model" "$work/passkey-256-$type.gguf" --type $type --vocab "$shared/models/passkey-256.vocab.txt" >/dev/null
  out=$("$chat" --model "$work/passkey-256-$type.gguf" --prompt-ids "$prompt" --steps 6 --chunk-size 32 --chunks 8 --quiet)
  echo "$type: answer \"$out\", expected \"$expected\""
  [[ "$out" == *"$expected"* ]] || { echo "FAILED: $type"; exit 1; }
done
echo "passkey answered through GGUF (F32, Q8_0)"
