#!/usr/bin/env python3
"""Trains retrieval-256: a tiny Llama (llama2.c format) that answers the multi-key (mk) and
two-hop (hop) prompts of ../shared/models/make_retrieval_prompts.py inside its 256-token context.

Why this recipe (earlier attempts, ../shared/reference/training/README.md, fell into copying a
random needle's digits): every training row is dense in what the task needs and every row asks
several questions. A row holds 2-6 needles with distinct names (hop rows add an alias needle
"the pass key of A the pass key of B") and, after them, as many questions with their answers
as fit, each about a different name; the loss weighs the answer digits (the rest of the row at
a small weight). Copying a random needle's digits then earns 1/n of the answers in every row,
never more, so the gradient points at matching the name from the first step. Rows start short
(128 tokens) and grow to the trained 256.

Reproducible and resumable: the row stream is seeded, a checkpoint (model, optimiser, rng
states, step) is written every --checkpoint-every steps and at the end, and --resume goes on
from it. The in-distribution evaluation (100 mk4 and 100 hop4 prompts at 256 tokens, from
make_retrieval_prompts' own seeds 1-100, which the training stream never draws) runs every
--eval-every steps; the model is exported as retrieval-256.bin (llama2.c format) each time.

  OMP_NUM_THREADS=1 /usr/bin/python3 tools/eval_models/train_retrieval.py --out runs/retrieval --minutes 90
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from model import Llama, Shape, export_llama2c  # noqa: E402


def find_shared_models(explicit: str) -> str:
    for path in [explicit, os.environ.get("LONGHEADS_MODELS", ""), os.path.join(HERE, "..", "..", "..", "shared", "models")]:
        if path and os.path.exists(os.path.join(path, "make_retrieval_prompts.py")):
            return os.path.abspath(path)
    sys.exit("train_retrieval: make_retrieval_prompts.py not found (give --shared-models, or set LONGHEADS_MODELS)")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/retrieval", help="directory for checkpoints, logs and the exported model")
    ap.add_argument("--shared-models", default="", help="directory holding make_retrieval_prompts.py (default ../shared/models)")
    ap.add_argument("--steps", type=int, default=8000, help="the schedule's length (learning rate, curriculum)")
    ap.add_argument("--minutes", type=float, default=0, help="stop (with a checkpoint) after this long; 0: run to --steps")
    ap.add_argument("--stop-at", type=int, default=0, help="stop (with a checkpoint) at this step, inside the --steps schedule; 0: run to --steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--other-weight", type=float, default=0.05, help="loss weight of the tokens that are not answer digits")
    ap.add_argument("--hop-share", type=float, default=0.4, help="share of rows with an alias needle")
    ap.add_argument("--induction-share", type=float, default=0.5,
                    help="share of rows, in the first --induction-until of the schedule, that are a random sequence repeated")
    ap.add_argument("--induction-until", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="go on from --out/checkpoint.pt")
    ap.add_argument("--grow-from", default="",
                    help="stage 2: start from this checkpoint.pt (fewer layers), the added layers appended with zero "
                         "output weights so the model computes exactly what it did; rows at full length from the start")
    ap.add_argument("--hop-weight", type=float, default=1.0, help="factor on the loss weight of the alias question's answer")
    return ap.parse_args()


args = parse()
sys.path.insert(0, find_shared_models(args.shared_models))
import make_retrieval_prompts as R  # noqa: E402

T = R.T
HEAD = [R.P.BOS] + R.P.TASK_IDS
QUESTION_LEN = len(R.question_ids(R.NAMES[0]))
NEEDLE_LEN = len(R.needle_ids(R.NAMES[0], [T["0"]] * 5))
ALIAS_LEN = len(R.alias_ids(R.NAMES[0], R.NAMES[1]))


def build_row(rng: random.Random, length: int, hop_share: float):
    """`length` + 1 tokens and the loss weight of predicting each token from the ones before."""
    hop = rng.random() < hop_share
    n = rng.randint(3, 6) if hop else rng.randint(2, 6)  # value needles (hop: + one alias)
    names = rng.sample(R.NAMES, n + (1 if hop else 0))
    keys = rng.sample(range(10000, 100000), n)
    digits = [[T[c] for c in str(k)] for k in keys]
    pieces = [R.needle_ids(names[j], digits[j]) for j in range(n)]
    questions = []  # (name asked, answer digits, weight factor)
    if hop:
        alias, target = names[n], rng.randrange(n)  # alias -> names[target]
        pieces.append(R.alias_ids(alias, names[target]))
        questions.append((alias, digits[target], args.hop_weight))
    direct = list(range(n))
    rng.shuffle(direct)
    questions += [(names[j], digits[j], 1.0) for j in direct]
    rng.shuffle(pieces)
    fixed = len(HEAD) + sum(len(p) for p in pieces)
    room = length + 1 - fixed
    asked = []
    for q in questions:  # as many questions as fit, at least one
        if room - (QUESTION_LEN + 5) < 8 * len(pieces) and asked:
            break
        asked.append(q)
        room -= QUESTION_LEN + 5
    if room < 0:
        return None
    fill = R.filler_stream(rng, room)
    cuts = sorted(rng.randrange(room + 1) for _ in pieces)
    tokens, at = list(HEAD), 0
    for cut, piece in zip(cuts, pieces):
        tokens += fill[at:cut] + piece
        at = cut
    tokens += fill[at:]
    weights = [args.other_weight] * len(tokens)
    for name, answer, factor in asked:
        tokens += R.question_ids(name)
        weights += [args.other_weight] * QUESTION_LEN
        tokens += answer
        weights += [2.0 * factor] + [1.0 * factor] * 4  # the first digit is where the name is matched
    assert len(tokens) == length + 1, (len(tokens), length)
    return tokens, weights[1:]


INDUCTION_POOL = R.FILLER_POOL + [T[str(i)] for i in range(10)] + R.NAMES


def induction_row(rng: random.Random, length: int):
    """A random sequence, then the same again: the second copy is predictable only by finding
    the current token earlier and copying what followed it (an induction head, which the
    retrieval task needs twice: for the name, then for the digits)."""
    half = length // 2 + 1
    first = [rng.choice(INDUCTION_POOL) for _ in range(half)]
    tokens = ([R.P.BOS] + first + first)[: length + 1]
    weights = [args.other_weight] * half + [1.0] * (length - half)
    return tokens, weights


def batch(rng: random.Random, size: int, length: int, induction_share: float):
    rows, task = [], []
    while len(rows) < size:
        if rng.random() < induction_share:
            rows.append(induction_row(rng, length))
            task.append(False)
            continue
        row = build_row(rng, length, args.hop_share)
        if row is not None:
            rows.append(row)
            task.append(True)
    tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)
    weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return tokens[:, :-1], tokens[:, 1:], weights, torch.tensor(task)


def row_length(step: int) -> int:
    """128 tokens for the first 20% of the schedule, 192 to 40%, then the trained 256 (a grown
    model: 256 throughout)."""
    if args.grow_from:
        return 256
    f = step / max(1, args.steps)
    return 128 if f < 0.2 else 192 if f < 0.4 else 256


def learning_rate(step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    f = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * f))


def held_out(task: str):
    """make_retrieval_prompts' prompts for seeds 1-100 (4 needles, 256 tokens), depths spread."""
    prompts, answers = [], []
    for seed in range(1, 101):
        depth = ((seed - 1) % 10 + 0.5) / 10
        prompt, answer, _ = R.make_prompt(task, 256, 4, depth, seed)
        prompts.append(prompt + answer[:-1])
        answers.append(answer)
    return torch.tensor(prompts, dtype=torch.long), torch.tensor(answers, dtype=torch.long)


@torch.no_grad()
def accuracy(model, prompts, answers) -> float:
    """Greedy exact match: with the true digits before it, every answer digit is the argmax
    (the same as decoding greedily, one forward pass)."""
    model.eval()
    logits = model(prompts)[:, -5:, :]
    model.train()
    return (logits.argmax(-1) == answers).all(dim=1).float().mean().item()


def grow(model, smaller: dict):
    """Loads a checkpoint with fewer layers into `model`; the layers it lacks are appended with
    their attention and feed-forward output weights zero, so each adds nothing to the residual
    stream and the grown model's logits are the smaller one's until training moves them."""
    own = model.state_dict()
    for name, value in smaller.items():
        own[name].copy_(value)
    depth = 1 + max(int(name.split(".")[1]) for name in smaller if name.startswith("layers."))
    for index in range(depth, len(model.layers)):
        own[f"layers.{index}.wo.weight"].zero_()
        own[f"layers.{index}.w2.weight"].zero_()
    print(f"grown from {depth} to {len(model.layers)} layers", flush=True)


def main():
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    shape = Shape(n_layers=args.layers)
    torch.manual_seed(args.seed)
    model = Llama(shape)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(f"train-retrieval:{args.seed}")
    step = 0
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    if args.resume and os.path.exists(checkpoint):
        state = torch.load(checkpoint)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    elif args.grow_from:
        grow(model, torch.load(args.grow_from)["model"])
    tests = {task: held_out(task) for task in ("mk", "hop")}
    log = open(log_path, "a")

    def save():
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "step": step, "args": vars(args)}, checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)

    start = time.time()
    recent = []
    while step < args.steps:
        if args.minutes and time.time() - start > 60 * args.minutes:
            break
        if args.stop_at and step >= args.stop_at:
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step)
        induction = args.induction_share if step < args.induction_until * args.steps else 0.0
        inputs, targets, weights, task = batch(rng, args.batch, row_length(step), induction)
        logits = model(inputs)
        losses = F.cross_entropy(logits.reshape(-1, shape.vocab_size), targets.reshape(-1), reduction="none").view_as(weights)
        loss = (losses * weights).sum() / weights.sum()
        answers = (weights >= 1.0) & task[:, None]
        copies = (weights >= 1.0) & ~task[:, None]
        answer_loss = (losses * answers).sum() / answers.sum().clamp(min=1)
        copy_loss = (losses * copies).sum() / copies.sum().clamp(min=1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        recent.append((answer_loss.item(), copy_loss.item()))
        if step % 50 == 0:
            print(f"step {step} len {row_length(step - 1)} lr {learning_rate(step - 1):.2e} answer loss {sum(r[0] for r in recent) / len(recent):.3f} "
                  f"repeat loss {sum(r[1] for r in recent) / len(recent):.3f} ({time.time() - start:.0f} s)", flush=True)
            recent = []
        if step % args.eval_every == 0 or step == args.steps:
            mk, hop = (accuracy(model, *tests[t]) for t in ("mk", "hop"))
            entry = {"step": step, "seconds": round(time.time() - start), "mk4": mk, "hop4": hop, "answer_loss": answer_loss.item()}
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            export_llama2c(model, os.path.join(args.out, "retrieval-256.bin"))
        if step % args.checkpoint_every == 0:
            save()
    save()
    export_llama2c(model, os.path.join(args.out, "retrieval-256.bin"))
    print(f"stopped at step {step} after {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
