#!/usr/bin/env python3
"""Two builds of the library, same benchmarks: each benchmark's time in B over its time in A.

    python3 bench/compare_runs.py a1.json,a2.json b1.json,b2.json

A and B are each one or more longheads_bench JSON outputs (comma-separated), best run
alternately (a1, b1, a2, b2) so that the machine's drift falls on both sides. Per benchmark:
the median time of each side and B / A; a line per benchmark, then the median and range of
the ratios. Uses ratios.py's reading of the files.
"""
import statistics
import sys

from ratios import load, seconds


def times(paths):
    out = {}
    for path in paths.split(","):
        for name, runs in load(path)[1].items():
            out.setdefault(name, []).extend(seconds(b) for b in runs)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = times(sys.argv[1]), times(sys.argv[2])
    ratios = []
    for name in sorted(set(a) & set(b)):
        ta, tb = statistics.median(a[name]), statistics.median(b[name])
        ratios.append(tb / ta)
        print(f"{name:55s} A {ta * 1e3:10.3f} ms  B {tb * 1e3:10.3f} ms  B/A {tb / ta:.3f}  (A {len(a[name])}, B {len(b[name])} runs)")
    if ratios:
        print(f"B/A over {len(ratios)} benchmarks: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
