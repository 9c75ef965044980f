"""Throughput of a running `flea serve` under N concurrent requests (standard library only).

usage: python3 scripts/serve_batch_rate.py http://HOST:PORT N [MAX_TOKENS [FILLER [CASES]]]

For each case (greedy; OpenAI-style sampling: temperature 0.8 and a seed, the whole
vocabulary; top-k sampling: top_k 40, min_p 0.05, top_p 0.95; CASES, comma-separated, picks
some of them) sends N requests at once, each with its own short prompt and seed (FILLER > 0
puts that many copies of a ten-word sentence, ~21 tokens each with the synthetic models' vocabulary, between the request's number
and the rest, so that decode steps attend over longer contexts), and prints the completion tokens of all of them over the
wall time from the first request to the last answer (prompts included), after one
warm-up round; an md5 of the texts (requests in order: two builds can be compared); and
from /metrics, the round's passes, their mean rows, and its wall time split into the passes,
the host's sampling and the rest (HTTP, admission, the engine's loop).
"""
import hashlib, json, sys, threading, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
filler = " the quick brown fox jumps over the lazy dog and" * (int(sys.argv[4]) if len(sys.argv) > 4 else 0)
wanted = sys.argv[5].split(",") if len(sys.argv) > 5 else None
def get(path):
    return urllib.request.urlopen(base + path, timeout=60).read().decode()
for _ in range(600):
    try:
        get("/health"); break
    except Exception:
        time.sleep(0.2)
model = json.loads(get("/v1/models"))["data"][0]["id"]
def complete(i, extra, out, texts):
    body = {"model": model, "prompt": f"Story number {i}:{filler} once upon a time, in a town by the sea,",
            "max_tokens": max_tokens, "seed": 100 + i}
    body.update(extra)
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=600).read())
    out[i] = r["usage"]["completion_tokens"]
    texts[i] = r["choices"][0]["text"]
def round_of(extra):
    out, texts = [0] * n, [""] * n
    ts = [threading.Thread(target=complete, args=(i, extra, out, texts)) for i in range(n)]
    t = time.time()
    for th in ts: th.start()
    for th in ts: th.join()
    digest = hashlib.md5("\x00".join(texts).encode()).hexdigest()[:8]
    return sum(out), time.time() - t, digest
KEYS = ("flea_steps_total", "flea_step_rows_total", "flea_forward_seconds_total",
        "flea_sampling_seconds_total")
def counters():
    out = {}
    for line in get("/metrics").splitlines():
        name, _, value = line.partition(" ")
        if name in KEYS:
            out[name] = float(value)
    return out
round_of({"temperature": 0.0})
for name, extra in [("greedy", {"temperature": 0.0}), ("openai-sampled", {"temperature": 0.8}),
                    ("top-k", {"temperature": 0.8, "top_k": 40, "min_p": 0.05, "top_p": 0.95})]:
    if wanted is not None and name not in wanted:
        continue
    before = counters()
    toks, secs, digest = round_of(extra)
    d = {k: v - before.get(k, 0.0) for k, v in counters().items()}
    steps = d.get("flea_steps_total", 0.0)
    fwd, smp = d.get("flea_forward_seconds_total", 0.0), d.get("flea_sampling_seconds_total", 0.0)
    print(f"{name}: {n} requests, {toks} tokens in {secs:.2f} s: {toks / secs:.1f} tok/s; "
          f"{steps:.0f} passes of {d.get('flea_step_rows_total', 0.0) / max(steps, 1):.1f} rows, "
          f"passes {fwd:.2f} s, host sampling {smp:.2f} s, the rest {secs - fwd - smp:.2f} s; "
          f"texts md5 {digest}")
