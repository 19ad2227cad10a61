#!/usr/bin/env bash
# Trains retrieval-256 from nothing, as the committed model was made (README.md in this
# directory): stage 1, a 4-layer model on multi-key and two-hop rows with induction warm-up
# rows; stage 2, the same model grown to 6 layers (the new layers start as the identity) and
# trained on rows with more, and more heavily weighted, two-hop questions. Each stage resumes
# from its checkpoint when run again, so the script can be stopped and restarted.
#
#   tools/eval_models/reproduce.sh [OUT]      # OUT: runs/retrieval-reproduced by default
#
# One thread per stage (OMP/OpenBLAS), as measured; needs python3-torch and libopenblas0-pthread.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/retrieval-reproduced}"
train() { OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 /usr/bin/python3 tools/eval_models/train_retrieval.py "$@"; }
if [ ! -f "$out/stage1/done" ]; then
  train --out "$out/stage1" --steps 4000 --resume
  touch "$out/stage1/done"
fi
stage2() { train --out "$out/stage2" --resume --layers 6 --grow-from "$out/stage1/checkpoint.pt" \
  --hop-share 0.8 --hop-weight 3 --lr 5e-4 --min-lr 5e-5 --warmup 50 --induction-share 0 "$@"; }
# Stage 2 as it ran: a 2000-step schedule, then the same run resumed on a 3000-step schedule
# (its learning rate back up to 1.5e-4, decaying again) and stopped at step 2500.
if [ ! -f "$out/stage2/done-2000" ]; then
  stage2 --steps 2000
  touch "$out/stage2/done-2000"
fi
stage2 --steps 3000 --stop-at 2500
echo "model: $out/stage2/retrieval-256.bin"
