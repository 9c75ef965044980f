#!/usr/bin/env python3
"""Load test for `flea serve`, bounded in time, loopback only (standard library only).

Starts `flea serve` on 127.0.0.1 (a free port), runs CLIENTS concurrent clients for DURATION
seconds, each sending one request after another (alternating streamed and whole
completions and chat, varied prompts, seeded sampling), then stops the server with SIGTERM.
Reports valid requests that failed (must be zero), generated tokens per second, latencies,
and the server's resident memory over time (VmRSS every few seconds: flat means no growth
after warm-up). Prints a JSON summary on stdout; progress on stderr.

    scripts/load_test.py --flea target/release/flea --model M.gguf --clients 64 \
        --duration 600 [--max-tokens 32] [-- extra flea serve flags, e.g. --vram-budget 256MiB]

The server gets --parallel CLIENTS (one KV slot per client) unless extra flags set it.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "1, 2, 3, 4, 5,",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Monday, Tuesday,",
    "The quick brown fox",
    "Explain why the sky is blue.",
]


def post(base, path, body, timeout):
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def one_request(base, model, i, max_tokens, timeout):
    """One valid request; returns generated tokens, or raises with the reason it failed."""
    chat = i % 2 == 1
    stream = (i // 2) % 2 == 1
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    with post(base, path, body, timeout) as r:
        if r.status != 200:
            raise RuntimeError("status %d" % r.status)
        if not stream:
            j = json.loads(r.read())
            if not j["choices"][0]["finish_reason"]:
                raise RuntimeError("no finish_reason")
            return j["usage"]["completion_tokens"]
        finish, usage, done = None, None, False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            j = json.loads(data)
            if "error" in j:
                raise RuntimeError("stream error: %s" % j["error"]["message"])
            if j.get("usage"):
                usage = j["usage"]
            for c in j.get("choices", []):
                finish = c.get("finish_reason") or finish
        if not done or not finish or not usage:
            raise RuntimeError("stream ended early (done=%s finish=%s)" % (done, finish))
        return usage["completion_tokens"]


def rss_bytes(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flea", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (bounded)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout, seconds")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("serve_args", nargs="*", help="extra flea serve flags (after --)")
    a = ap.parse_args()
    if a.duration <= 0 or a.duration > 24 * 3600:
        sys.exit("--duration must be in (0, 86400] seconds")

    cmd = [a.flea, "serve", "-m", a.model, "--host", "127.0.0.1", "--port", "0"]
    if "--parallel" not in a.serve_args:
        cmd += ["--parallel", str(a.clients)]
    cmd += ["--queue", str(max(256, 2 * a.clients))] + a.serve_args
    print("starting:", " ".join(cmd), file=sys.stderr)
    srv = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    base = None
    t_start = time.time()
    for line in srv.stderr:
        print("[serve]", line.rstrip(), file=sys.stderr)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            base = m.group(1)
            break
        if time.time() - t_start > 300:
            break
    if not base:
        srv.kill()
        sys.exit("flea serve did not start")
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
    model = os.path.basename(a.model)
    model = model[:-5] if model.endswith(".gguf") else model

    # Warm-up (not counted): one request end to end.
    one_request(base, model, 0, 4, a.timeout)

    lock = threading.Lock()
    stats = {"ok": 0, "failed": 0, "tokens": 0, "latencies": [], "errors": []}
    t0 = time.time()
    deadline = t0 + a.duration

    def client(k):
        i = k
        while time.time() < deadline:
            t = time.time()
            try:
                n = one_request(base, model, i, a.max_tokens, a.timeout)
                with lock:
                    stats["ok"] += 1
                    stats["tokens"] += n
                    stats["latencies"].append(time.time() - t)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    stats["failed"] += 1
                    if len(stats["errors"]) < 20:
                        stats["errors"].append(repr(e))
            i += a.clients

    rss = []
    stop_sampling = threading.Event()

    def sampler():
        while not stop_sampling.wait(a.sample_every):
            r = rss_bytes(srv.pid)
            if r is not None:
                rss.append((round(time.time() - t0, 1), r))
                with lock:
                    ok, tok = stats["ok"], stats["tokens"]
                print("t=%6.0fs rss=%6.1f MiB ok=%d failed=%d tokens=%d" %
                      (time.time() - t0, r / 2**20, ok, stats["failed"], tok), file=sys.stderr)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    st = threading.Thread(target=sampler, daemon=True)
    st.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    stop_sampling.set()
    metrics = ""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
    except urllib.error.URLError:
        pass
    srv.send_signal(signal.SIGTERM)
    try:
        code = srv.wait(120)
    except subprocess.TimeoutExpired:
        srv.kill()
        code = "killed after 120 s"

    lat = sorted(stats["latencies"])
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
    # Memory after warm-up: the first fifth of the samples is excluded.
    steady = [r for _, r in rss[len(rss) // 5:]] or [r for _, r in rss]
    out = {
        "clients": a.clients,
        "duration_s": round(wall, 1),
        "max_tokens": a.max_tokens,
        "requests_ok": stats["ok"],
        "requests_failed": stats["failed"],
        "errors": stats["errors"],
        "generated_tokens": stats["tokens"],
        "generated_tokens_per_s": round(stats["tokens"] / wall, 2),
        "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lat[-1] if lat else None},
        "rss_mib_steady": {
            "min": round(min(steady) / 2**20, 1) if steady else None,
            "max": round(max(steady) / 2**20, 1) if steady else None,
        },
        "rss_samples": [(t, round(r / 2**20, 1)) for t, r in rss],
        "server_exit": code,
        "metrics": {
            k: float(v)
            for k, v in re.findall(r"^(flea_\w+(?:\{[^}]*\})?) (\S+)$", metrics, re.M)
        },
        "command": " ".join(cmd),
    }
    print(json.dumps(out, indent=1))
    sys.exit(0 if stats["failed"] == 0 and code == 0 else 1)


if __name__ == "__main__":
    main()
