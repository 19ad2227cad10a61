#!/usr/bin/env python3
"""Checks an exported model through the C++ llama2.c host: its logits against this PyTorch
model's (within --tolerance), and its greedy accuracy on freshly generated in-distribution
prompts (make_retrieval_prompts.py, seeds 1-N, 4 needles, 256 tokens), by the host's --passkey
mode over a prompt set (exact match of the 5 answer digits).

  /usr/bin/python3 tools/eval_models/check_host.py --model tools/eval_models/retrieval-256.bin \
      --host build/examples/longheads_llama2c
Exit status 1 if the logits differ by more than the tolerance.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from model import load_llama2c  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="build/examples/longheads_llama2c")
    ap.add_argument("--shared-models", default=os.path.join(HERE, "..", "..", "..", "shared", "models"))
    ap.add_argument("--prompts", type=int, default=100, help="prompts per task")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.shared_models))
    import make_retrieval_prompts as R

    vocab = os.path.join(os.path.abspath(a.shared_models), "passkey-256.vocab.txt")
    model = load_llama2c(a.model).eval()
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Logits: one mk4 prompt with its answer, through the host's --eval (dense attention: the
        #    model inside its trained context).
        prompt, answer, _ = R.make_prompt("mk", 256, 4, 0.5, 1)
        tokens = np.array(prompt + answer, dtype="<i4")
        path = os.path.join(tmp, "tokens.bin")
        tokens.tofile(path)
        dump = os.path.join(tmp, "logits.f32")
        subprocess.run([a.host, "--model", a.model, "--eval", path, "--dump-logits", dump, "--attention", "dense", "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        host = np.fromfile(dump, dtype="<f4").reshape(len(tokens), -1)
        with torch.no_grad():
            ref = model(torch.tensor(tokens[None, :], dtype=torch.long))[0].numpy()
        worst = float(np.abs(host[: ref.shape[0]] - ref).max())
        print(f"logits: largest |host - PyTorch| {worst:.3g} over {ref.shape[0]} x {ref.shape[1]} (tolerance {a.tolerance:g})")
        if not worst <= a.tolerance:
            status = 1
        # 2. Accuracy through the host, on prompts generated here (seeds 1..N, depths spread).
        for task in ("mk", "hop"):
            out = os.path.join(tmp, task)
            for d in range(10):
                depth = (d + 0.5) / 10
                chosen = ",".join(str(s) for s in range(d + 1, a.prompts + 1, 10))
                subprocess.run([sys.executable, os.path.join(a.shared_models, "make_retrieval_prompts.py"), "--task", task, "--needles", "4",
                                "--length", "256", "--depths", str(depth), "--seeds", chosen, "--outdir", out], check=True,
                               stdout=subprocess.DEVNULL)
            run = subprocess.run([a.host, "--model", a.model, "--vocab", vocab, "--passkey", "--prompt-set", out, "--lengths", "256",
                                  "--methods", "dense", "--quiet"], check=True, capture_output=True, text=True)
            line = next((l for l in run.stdout.splitlines() if l.startswith("dense")), "")
            found = re.search(r"(\d+)/(\d+)", line)
            if not found:
                sys.exit("check_host: no accuracy line in the host's output:\n" + run.stdout)
            print(f"{task}4 through the host (dense, 256 tokens): {found.group(1)}/{found.group(2)} right")
    return status


if __name__ == "__main__":
    sys.exit(main())
