"""Throughput of a running `flea serve` under N concurrent requests (standard library only).

usage: python3 scripts/serve_batch_rate.py http://HOST:PORT N [MAX_TOKENS]

For each case (greedy; OpenAI-style sampling: temperature 0.8 and a seed, the whole
vocabulary; top-k sampling: top_k 40, min_p 0.05, top_p 0.95) sends N requests at once, each
with its own short prompt and seed, and prints the completion tokens of all of them over the
wall time from the first request to the last answer (prompts included), after one
warm-up round. Prints flea_steps_total and flea_generated_tokens_total from /metrics.
"""
import json, sys, threading, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
def get(path):
    return urllib.request.urlopen(base + path, timeout=60).read().decode()
for _ in range(600):
    try:
        get("/health"); break
    except Exception:
        time.sleep(0.2)
model = json.loads(get("/v1/models"))["data"][0]["id"]
def complete(i, extra, out):
    body = {"model": model, "prompt": f"Story number {i}: once upon a time, in a town by the sea,",
            "max_tokens": max_tokens, "seed": 100 + i}
    body.update(extra)
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=600).read())
    out[i] = r["usage"]["completion_tokens"]
def round_of(extra):
    out = [0] * n
    ts = [threading.Thread(target=complete, args=(i, extra, out)) for i in range(n)]
    t = time.time()
    for th in ts: th.start()
    for th in ts: th.join()
    return sum(out), time.time() - t
round_of({"temperature": 0.0})
for name, extra in [("greedy", {"temperature": 0.0}), ("openai-sampled", {"temperature": 0.8}),
                    ("top-k", {"temperature": 0.8, "top_k": 40, "min_p": 0.05, "top_p": 0.95})]:
    toks, secs = round_of(extra)
    print(f"{name}: {n} requests, {toks} tokens in {secs:.2f} s: {toks / secs:.1f} tok/s")
m = [l for l in get("/metrics").splitlines() if l.startswith("flea_steps_total") or l.startswith("flea_generated_tokens_total")]
print(" ".join(m))
