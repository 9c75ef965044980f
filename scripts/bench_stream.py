#!/usr/bin/env python3
"""Streamed decode of a synthetic model under a small device budget, beside a plain
sequential O_DIRECT read of the same file measured in the same run (issue: transient
residency benchmark).

  python3 scripts/bench_stream.py [--preset 7b] [--budget 1GiB] [--tokens 8] [--out DIR]

Steps: build flea (release), write the synthetic model if missing (flea synth), measure the
file's sequential O_DIRECT read bandwidth (flea probe, which also saves the profile the
planner uses), then for each I/O backend run `flea run` with --vram-budget, no host cache,
and --stats-json/--trace. Reports: bytes streamed per token, seconds per decode token,
achieved GB/s = streamed bytes per token / seconds per token, and its ratio to the plain
read. The floor is streamed bytes / plain read bandwidth.
"""
import argparse, json, os, subprocess, sys, datetime, platform

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="7b")
ap.add_argument("--budget", default="1GiB")
ap.add_argument("--tokens", type=int, default=8)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--dir", default=os.environ.get("FLEA_SYNTH_DIR", os.path.expanduser("~/.cache/flea/synth")))
ap.add_argument("--out", default="bench-out")
ap.add_argument("--io", action="append", default=None)
a = ap.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flea = os.path.join(root, "target/release/flea")
subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "flea-cli"], cwd=root, check=True)
os.makedirs(a.dir, exist_ok=True)
os.makedirs(a.out, exist_ok=True)
model = os.path.join(a.dir, f"{a.preset}.gguf")
if not os.path.exists(model):
    subprocess.run([flea, "synth", "--preset", a.preset, model], check=True)
def run_probe():
    return json.loads(subprocess.run([flea, "probe", "--file", model], check=True, capture_output=True, text=True).stdout)
# The plain read is measured before and after the streamed runs; the faster one is the
# reference, so a disk that speeds up or slows down mid-run can't flatter the ratio.
probe = run_probe()
probes = [probe["disk_read_bps"]]
rows = []
for io in a.io or ["pread", "io_uring"]:
    stats = os.path.join(a.out, f"stream-{a.preset}-{io}.json")
    trace = os.path.join(a.out, f"stream-{a.preset}-{io}.svg")
    cmd = [flea, "run", "-m", model, "-p", "The streaming benchmark prompt", "-n", str(a.tokens), "--temp", "0",
           "--ignore-eos", "-t", str(a.threads), "--ctx", "256", "--batch", "32", "--vram-budget", a.budget,
           "--ram-budget", "0", "--io", io, "--stats-json", stats, "--trace", trace]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"flea run failed: {r.stderr}")
    s = json.load(open(stats))
    res = s["residency"]
    per_token_bytes = res["plan"]["pass_bytes"]["disk"]
    spt = s["decode_seconds"] / max(s["decode_tokens"], 1)
    achieved = per_token_bytes / spt
    rows.append({
        "io": io, "budget": a.budget, "streamed_bytes_per_token": per_token_bytes, "seconds_per_token": spt,
        "decode_tok_s": s["decode_tokens_per_sec"], "achieved_gbps": achieved / 1e9,
        "device_peak": res["arenas"]["device"]["peak"], "device_budget": res["arenas"]["device"]["budget"],
        "read_lane_gbps": res["read_gbps"], "stall_seconds": res["stream"]["stall_seconds"],
        "compute_seconds": res["stream"]["compute_seconds"], "io_slot_wait_seconds": res["stream"]["io_slot_wait_seconds"],
        "peak_rss_bytes": s["peak_rss_bytes"], "trace": trace,
    })
probe_after = run_probe()
probes.append(probe_after["disk_read_bps"])
plain = max(probes)
for r in rows:
    r["plain_odirect_gbps"] = plain / 1e9
    r["ratio_to_plain_read"] = r["achieved_gbps"] * 1e9 / plain
    r["floor_seconds_per_token"] = r["streamed_bytes_per_token"] / plain
meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": probe["cpu"],
        "host": platform.node(), "model": model, "preset": a.preset, "probe_before": probe, "probe_after": probe_after, "command": " ".join(sys.argv)}
json.dump({"meta": meta, "rows": rows}, open(os.path.join(a.out, f"stream-{a.preset}.json"), "w"), indent=2)
print(f"# {meta['date']} {probe['cpu']}, plain sequential O_DIRECT read of the same file: {plain/1e9:.2f} GB/s "
      f"(best of before/after: {', '.join(f'{p/1e9:.2f}' for p in probes)})")
print("| io | device budget | streamed/token | s/token | achieved GB/s | ratio to plain read | floor s/token | device peak |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['io']} | {r['budget']} | {r['streamed_bytes_per_token']/2**30:.2f} GiB | {r['seconds_per_token']:.2f} | "
          f"{r['achieved_gbps']:.2f} | {r['ratio_to_plain_read']:.2f} | {r['floor_seconds_per_token']:.2f} | "
          f"{r['device_peak']/2**20:.0f} / {r['device_budget']/2**20:.0f} MiB |")
