#!/usr/bin/env python3
"""Per-kernel share of a decode token from scripts/gpu_ktrace.c's CSV.

usage: ktrace_report.py TRACE.csv [TOKENS]

Tokens are delimited by the greedy pick (`argmax*` kernels); the last TOKENS (default 20) are
read. Per kernel (name, grid): median duration, median start relative to the latest end before
it (negative: it started early, a dependent launch waiting), and its increment: how far it
moved the latest end, i.e. what it added to the token (the increments sum to the token time).
"""
import sys, statistics as st, collections
last = int(sys.argv[2]) if len(sys.argv) > 2 else 20
rows = []
for line in open(sys.argv[1]):
    if line.startswith('#'):
        print(line.strip()); continue
    f = line.strip().split(',')
    rows.append((int(f[0]), int(f[1]), f[2], int(f[3]), int(f[4]), int(f[5]), int(f[6]), int(f[7]), int(f[8])))
rows.sort()
print("kernels:", len(rows))
# token boundaries: argmax-like kernel
names = collections.Counter(r[2] for r in rows)
print("names:", names.most_common(40))
pick = [i for i, r in enumerate(rows) if r[2].startswith('argmax')]
print("picks:", len(pick))
if len(pick) < last + 2:
    sys.exit(0)
toks = [(pick[j] + 1, pick[j + 1] + 1) for j in range(len(pick) - last - 1, len(pick) - 1)]
inc = collections.defaultdict(list); dur = collections.defaultdict(list); gap = collections.defaultdict(list)
meta = {}
tok_ms = []
for a, b in toks:
    latest = rows[a - 1][1]
    t0 = latest
    seq = 0
    for i in range(a, b):
        s, e, n, gx, gy, gz, bx, reg, sm = rows[i]
        key = (n, gx, gy, gz)
        meta[key] = (bx, reg, sm)
        dur[key].append((e - s) / 1e3)
        gap[key].append((s - latest) / 1e3)
        inc[key].append((max(e, latest) - latest) / 1e3)
        latest = max(latest, e)
    tok_ms.append((latest - t0) / 1e6)
print("token ms: median %.4f min %.4f max %.4f" % (st.median(tok_ms), min(tok_ms), max(tok_ms)))
tot = sum(sum(v) for v in inc.values()) / len(toks)
print("sum of increments per token us %.1f" % tot)
print("%-34s %14s %5s %4s %6s %6s %8s %8s %8s %9s" % ("kernel", "grid", "blk", "reg", "smem", "calls", "dur", "start-gap", "incr", "incr/tok"))
for key in sorted(inc, key=lambda k: -sum(inc[k])):
    n, gx, gy, gz = key
    c = len(inc[key]) / len(toks)
    bx, reg, sm = meta[key]
    print("%-34s %14s %5d %4d %6d %6.1f %8.2f %8.2f %8.2f %9.1f" % (n[:34], f"{gx}x{gy}x{gz}", bx, reg, sm, c,
          st.median(dur[key]), st.median(gap[key]), st.median(inc[key]), sum(inc[key]) / len(toks)))
