#!/usr/bin/env bash
# longheads_chat end to end (ctest gguf_chat_smoke): passkey-256 written as GGUF (F32 and Q8_0,
# its vocabulary's words), a public 1,024-token passkey prompt (4x its context) fed as ids with
# LongHeads, greedy: the answer printed must be the prompt's passkey. Exit 77 without ../shared.
#   tests/gguf_chat_smoke.sh CHAT_BINARY PYTHON3 WORK_DIR
set -euo pipefail
chat=$1 python=$2 work=$3
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${LONGHEADS_SHARED:-$here/../shared}
model=$shared/models/passkey-256.bin
prompt=$shared/data/passkey/L1024_s1.bin
if [ ! -f "$model" ] || [ ! -f "$prompt" ]; then echo "skipped: $shared has no passkey-256 model or prompt set"; exit 77; fi
expected=$(grep '"L1024_s1.bin"' "$shared/data/passkey/manifest.jsonl" | sed 's/.*"passkey": \([0-9]*\).*/\1/' | sed 's/./& /g; s/ $//')
mkdir -p "$work"
for type in f32 q8_0; do
  "$python" "$here/tools/gguf/llama2c_to_gguf.py" "$model" "$work/passkey-256-$type.gguf" --type $type --vocab "$shared/models/passkey-256.vocab.txt" >/dev/null
  out=$("$chat" --model "$work/passkey-256-$type.gguf" --prompt-ids "$prompt" --steps 6 --chunk-size 32 --chunks 8 --quiet)
  echo "$type: answer \"$out\", expected \"$expected\""
  [[ "$out" == *"$expected"* ]] || { echo "FAILED: $type"; exit 1; }
done
echo "passkey answered through GGUF (F32, Q8_0)"
