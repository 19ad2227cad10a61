#!/usr/bin/env python3
"""Acceptance ratios of the performance issue from one longheads_bench JSON run.

    build/bench/longheads_bench --rounds=3 --benchmark_out=bench.json --benchmark_out_format=json
    python3 bench/ratios.py bench.json

Every ratio compares benchmarks of the same run (this machine is shared and noisy). A benchmark
run several times (--rounds, or --benchmark_repetitions) gives several measurements: a ratio of
two benchmarks run equally often is the median of the ratios of their k-th measurements (with
--rounds the k-th measurements of one group come from the same round, seconds apart), any
other figure the median of its measurements.
"""
import json
import statistics
import sys


def load(path):
    """Every measurement of each benchmark, in the order run (aggregates are left out)."""
    with open(path) as f:
        data = json.load(f)
    runs = {}
    for b in data["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration":
            continue
        name = b.get("run_name", b["name"]).replace("/real_time", "").replace("/iterations:1", "")
        runs.setdefault(name, []).append(b)
    return data.get("context", {}), runs


def seconds(b):
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def paired(numerators, denominators, value, denominator_value=None):
    """The median of value(n_k) / denominator_value(d_k) (default: value) over measurements k
    when both ran equally often, else the ratio of the medians."""
    denominator_value = denominator_value or value
    if len(numerators) == len(denominators):
        return statistics.median(value(n) / denominator_value(d) for n, d in zip(numerators, denominators))
    return statistics.median(map(value, numerators)) / statistics.median(map(denominator_value, denominators))


def main():
    context, runs = load(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
    rows = []

    def ratio(label, numerator, denominator, target, higher_is_better=True):
        if numerator not in runs or denominator not in runs:
            rows.append((label, "missing", target, ""))
            return
        r = paired(runs[denominator], runs[numerator], seconds) if higher_is_better else paired(runs[numerator], runs[denominator], seconds)
        ok = r >= target if higher_is_better else r <= target
        rows.append((label, f"{r:.2f}x", (">= " if higher_is_better else "<= ") + f"{target}x", "met" if ok else "NOT met"))

    def has(name, key):
        return name in runs and all(key in b for b in runs[name])

    def counter(name, key):
        """The median of a counter over the benchmark's measurements."""
        return statistics.median(b[key] for b in runs[name]) if has(name, key) else None

    def counter_ratio(numerator, numerator_key, denominator, denominator_key):
        """numerator's counter over denominator's, paired by measurement as ratios of times are."""
        if not (has(numerator, numerator_key) and has(denominator, denominator_key)):
            return None
        return paired(runs[numerator], runs[denominator], lambda b: b[numerator_key], lambda b: b[denominator_key])

    for t in (1, 2):
        ratio(f"decode 128k llama2_7b: longheads faster than dense ({t} thread)", f"decode/longheads/llama2_7b/131072/threads:{t}",
              f"decode/dense/llama2_7b/131072/threads:{t}", 20)
        ratio(f"decode 128k llama3_8b: longheads faster than dense ({t} thread)", f"decode/longheads/llama3_8b/131072/threads:{t}",
              f"decode/dense/llama3_8b/131072/threads:{t}", 6)
        for shape in ("llama2_7b", "llama3_8b"):
            ratio(f"decode longheads {shape}: 128k time / 8k time ({t} thread)", f"decode/longheads/{shape}/131072/threads:{t}",
                  f"decode/longheads/{shape}/8192/threads:{t}", 1.5, higher_is_better=False)
        # Not a target: the GQA shape with a group's heads choosing together reads the same bytes
        # at both lengths, which shows how much of the per-head growth above is bytes.
        ratio(f"  the same, llama3_8b with shared group selection (longheads-shared) ({t} thread)",
              f"decode/longheads-shared/llama3_8b/131072/threads:{t}", f"decode/longheads-shared/llama3_8b/8192/threads:{t}", 1.5,
              higher_is_better=False)
        ratio(f"dense decode 128k: llama3_8b time / llama2_7b time ({t} thread)", f"decode/dense/llama3_8b/131072/threads:{t}",
              f"decode/dense/llama2_7b/131072/threads:{t}", 0.35, higher_is_better=False)
        ratio(f"prefill 32k: longheads faster than dense ({t} thread)", f"prefill/longheads/h8_kv8_d128/32768/threads:{t}",
              f"prefill/dense/h8_kv8_d128/32768/threads:{t}", 10)
        for shape in ("llama2_7b", "llama3_8b"):
            for method in ("dense", "longheads"):
                ratio(f"decode 128k {shape} {method}: bf16 faster than fp32 ({t} thread)", f"decode/{method}-bf16/{shape}/131072/threads:{t}",
                      f"decode/{method}/{shape}/131072/threads:{t}", 1.0)
                ratio(f"decode 128k {shape} {method}: int8 faster than bf16 ({t} thread)", f"decode/{method}-int8/{shape}/131072/threads:{t}",
                      f"decode/{method}-bf16/{shape}/131072/threads:{t}", 1.0)
    ratio("decode 128k llama2_7b longheads: 2 threads / 1 thread", "decode/longheads/llama2_7b/131072/threads:2",
          "decode/longheads/llama2_7b/131072/threads:1", 1.6)
    ratio("decode 128k llama2_7b dense: 2 threads / 1 thread", "decode/dense/llama2_7b/131072/threads:2",
          "decode/dense/llama2_7b/131072/threads:1", 1.6)
    # What the machine's memory gave a second reader in the same run, for reference: a
    # memory-bound step gains about that much from a second thread (the probe's buffer is not
    # the cache's memory, so the step can land either side of it).
    probe_scaling = counter_ratio("probe/read_bandwidth/threads:2", "GB/s", "probe/read_bandwidth/threads:1", "GB/s")
    if probe_scaling:
        rows.append(("  for reference: read probe 2 threads / 1 thread", f"{probe_scaling:.2f}x", "", ""))
    ratio("prefill 16k longheads: 2 threads / 1 thread", "prefill/longheads/h8_kv8_d128/16384/threads:2",
          "prefill/longheads/h8_kv8_d128/16384/threads:1", 1.8)
    for t in (1, 2):
        step, probe_name = f"decode/dense/llama2_7b/131072/threads:{t}", f"probe/read_bandwidth/threads:{t}"
        probe, dense = counter(probe_name, "GB/s"), counter(step, "GB/s")
        target = 0.85 if t == 1 else 0.75
        if probe and dense:
            f = counter_ratio(step, "GB/s", probe_name, "GB/s")
            rows.append((f"dense decode 128k llama2_7b K/V read rate / read-bandwidth probe ({t} thread)",
                         f"{f:.0%} ({dense:.1f} of {probe:.1f} GB/s)", f">= {target:.0%}", "met" if f >= target else "NOT met"))
        # The same probe loop over the cache's own K/V, run inside that benchmark: the read rate
        # of exactly the memory the step reads (this VM's read rate differs between buffers).
        same = counter(step, "same_memory_read_GB/s")
        if same and dense:
            f = counter_ratio(step, "GB/s", step, "same_memory_read_GB/s")
            rows.append((f"  the same over the probe read of the cache's own K/V ({t} thread)",
                         f"{f:.0%} ({dense:.1f} of {same:.1f} GB/s)", f">= {target:.0%}", "met" if f >= target else "NOT met"))
    # Not a target: the GQA step's read rate against its own cache's, which tells whether the
    # GQA ratio above missed on memory (both steps near their caches' rates) or on the
    # four-query kernel (this one well below).
    for t in (1, 2):
        step = f"decode/dense/llama3_8b/131072/threads:{t}"
        same, gqa = counter(step, "same_memory_read_GB/s"), counter(step, "GB/s")
        if same and gqa:
            rows.append((f"  for reference: dense decode 128k llama3_8b K/V read rate / its cache's own probe read ({t} thread)",
                         f"{counter_ratio(step, 'GB/s', step, 'same_memory_read_GB/s'):.0%} ({gqa:.1f} of {same:.1f} GB/s)", "", ""))
    # int8 K/V (issue 21): what the cache holds per token, against bf16 (the K/V part, and the
    # whole cache with LongHeads' fp32 chunk summaries, which both storages keep alike).
    for shape in ("llama2_7b", "llama3_8b"):
        for method in ("dense", "longheads"):
            int8, bf16 = f"decode/{method}-int8/{shape}/131072/threads:1", f"decode/{method}-bf16/{shape}/131072/threads:1"
            kv = counter_ratio(int8, "kv_bytes/token", bf16, "kv_bytes/token")
            if kv:
                rows.append((f"int8 K/V bytes per token / bf16's, {shape} {method}", f"{kv:.3f}x ({counter(int8, 'kv_bytes/token'):.0f} B)",
                             "<= 0.55x", "met" if kv <= 0.55 else "NOT met"))
            whole = lambda b: b["kv_bytes/token"] + b["summary_bytes/token"] + b["index_bytes/token"]
            if has(int8, "summary_bytes/token") and has(bf16, "summary_bytes/token") and method == "longheads":
                rows.append((f"  for reference: with the chunk summaries, {shape} {method}",
                             f"{paired(runs[int8], runs[bf16], whole):.3f}x", "", ""))
    # Batches (issue 21): 16 sequences in one call on 2 threads against 1 thread, and against
    # 16 separate calls (per-sequence cost: the step's time, the same 16 tokens either way).
    batch = "decode/batch/h8_kv8_d64/4096/sequences:16/threads:{}"
    ratio("batched decode B=16: 2 threads / 1 thread", batch.format(2), batch.format(1), 1.8)
    for t in (1, 2):
        ratio(f"batched decode B=16: 16 separate calls / one batched call ({t} thread)", batch.format(t),
              f"decode/separate/h8_kv8_d64/4096/sequences:16/threads:{t}", 1.0)
    # Shards (docs/sharding.md): a rank's decode step through shard.hpp's block functions on 2
    # threads against 1, and against attention::decode over the same cache (the split's cost).
    shard = "shard/decode/quest-bf16/llama3_8b/131072/threads:{}"
    ratio("shard step 128k llama3_8b: 2 threads / 1 thread", shard.format(2), shard.format(1), 1.6)
    # On 2 threads the serial choice and merge and one more join of the lanes weigh more.
    for t, target in ((1, 1.15), (2, 1.25)):
        ratio(f"shard step 128k llama3_8b: block functions / attention::decode ({t} thread)", shard.format(t),
              f"decode/longheads-quest-bf16-at-completion/llama3_8b/131072/threads:{t}", target, higher_is_better=False)
    fma = [counter(f"probe/fma_peak/threads:{t}", "GFLOP/s") for t in (1, 2)]
    width = max(len(r[0]) for r in rows)
    print(f"host: {context.get('host_name', '?')}, {context.get('num_cpus', '?')} cpus, {context.get('date', '')}")
    if all(fma):
        print(f"FMA peak probe: {fma[0]:.0f} GFLOP/s (1 thread), {fma[1]:.0f} GFLOP/s (2 threads)")
    for label, value, target, verdict in rows:
        print(f"{label:<{width}}  {value:>28}  {target:>8}  {verdict}")


if __name__ == "__main__":
    main()
