#!/usr/bin/env python3
"""Weight passes of a kernel trace (scripts/gpu_ktrace.c's CSV), e.g. of `flea serve`'s steps.

usage: ktrace_passes.py TRACE.csv [MIN_MS MAX_MS [GAPS]]

A pass starts at an embedding kernel (`embed_*`). For the passes whose span (first start to
last end) lies within [MIN_MS, MAX_MS] (default: all), prints their count, median span, the
GPU's idle time inside them (span less the union of kernel intervals), the median gap before
the next pass (host work between passes: sampling, the engine's loop), and per kernel name its
calls a pass and its increment a pass: how far it moved the latest kernel end (the increments
and the idle time add up to the span). With GAPS (a number), also the GAPS largest kinds of
idle time inside the passes: the kernel before and the one after each gap, with the gap's
total a pass and its count.
"""
import collections
import statistics as st
import sys

lo = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
hi = float(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
n_gaps = int(sys.argv[4]) if len(sys.argv) > 4 else 0
ks = []
for line in open(sys.argv[1]):
    if line.startswith("#"):
        print(line.strip())
        continue
    f = line.strip().split(",")
    ks.append((int(f[0]), int(f[1]), f[2]))
ks.sort()
starts = [i for i, k in enumerate(ks) if k[2].startswith("embed_")]
passes = [(starts[j], starts[j + 1] if j + 1 < len(starts) else len(ks)) for j in range(len(starts))]
spans, idles, gaps = [], [], []
inc = collections.defaultdict(float)
calls = collections.Counter()
idle_at = collections.defaultdict(float)
idle_n = collections.Counter()
kept = 0
for j, (a, b) in enumerate(passes):
    p = ks[a:b]
    t0, t1 = p[0][0], max(k[1] for k in p)
    span = (t1 - t0) / 1e6
    if not lo <= span <= hi:
        continue
    kept += 1
    latest, last_name = t0, p[0][2]
    busy = 0.0
    for s, e, name in p:
        if s > latest:
            idle_at[(last_name, name)] += (s - latest) / 1e6
            idle_n[(last_name, name)] += 1
        d = max(0, e - max(s, latest))
        busy += d
        inc[name] += d / 1e6
        calls[name] += 1
        if e >= latest:
            last_name = name
        latest = max(latest, e)
    spans.append(span)
    idles.append(span - busy / 1e6)
    if b < len(ks):
        gaps.append((ks[b][0] - t1) / 1e6)
print(f"passes: {len(passes)}, within [{lo}, {hi}] ms: {kept}")
if not kept:
    sys.exit(0)
print(f"span median {st.median(spans):.3f} ms, idle inside median {st.median(idles):.3f} ms, "
      f"gap to the next pass median {st.median(gaps) if gaps else 0:.3f} ms")
print("kernel, calls a pass, increment ms a pass")
for name, v in sorted(inc.items(), key=lambda x: -x[1])[:30]:
    print(f"  {name[:60]:60s} {calls[name] / kept:7.1f} {v / kept:8.3f}")
if n_gaps:
    print("idle inside the passes: before -> after, ms a pass, gaps a pass")
    for (a, b), v in sorted(idle_at.items(), key=lambda x: -x[1])[:n_gaps]:
        print(f"  {a[:40]:40s} -> {b[:40]:40s} {v / kept:8.3f} {idle_n[(a, b)] / kept:6.1f}")
