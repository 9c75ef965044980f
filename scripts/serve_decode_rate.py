"""Decode rate of a running `flea serve` for one request at a time (standard library only).

usage: python3 scripts/serve_decode_rate.py http://HOST:PORT OUT.json

Sends the 504-token benchmark prompt (24 x "the quick brown fox jumps over the lazy dog
and") with max_tokens 1 and then 65 for each case below, and prints 64 / (t65 - t1) as the
decode rate (the prompt is evaluated in both requests). Cases: greedy, OpenAI-style sampling
(temperature 0.8, seed 5: the whole vocabulary; chained on a GPU when the request runs alone),
the same with top_p 0.9 (the nucleus; chained on a GPU too since 9a584fa) and top-k sampling (top_k 40, min_p 0.05,
top_p 0.95: chained on a GPU when the request runs alone). Prints
flea_generated_tokens_total and flea_chained_tokens_total from /metrics; writes each case's
text to OUT.json (compare two servers' files for the same text).
"""
import json, sys, time, urllib.request
base = sys.argv[1]
prompt = " ".join(["the quick brown fox jumps over the lazy dog and"] * 24)
def get(path):
    return urllib.request.urlopen(base + path, timeout=60).read().decode()
for _ in range(600):
    try:
        get("/health"); break
    except Exception:
        time.sleep(0.2)
model = json.loads(get("/v1/models"))["data"][0]["id"]
def complete(temp, seed, n, extra=None):
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": temp, "seed": seed}
    body.update(extra or {})
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    return out["choices"][0]["text"], time.time() - t, out.get("usage")
res = {}
TOPK = {"top_k": 40, "min_p": 0.05, "top_p": 0.95}
for name, temp, seed, extra in [("warm", 0.0, 0, None), ("greedy", 0.0, 0, None), ("sampled", 0.8, 5, None), ("nucleus", 0.8, 5, {"top_p": 0.9}), ("topk", 0.8, 5, TOPK), ("greedy2", 0.0, 0, None), ("topk2", 0.8, 6, TOPK)]:
    # a 1-token request first: its time is the prompt's; the 65-token one's minus it is 64 decode tokens
    _, t1, _ = complete(temp, seed, 1, extra)
    text, t, usage = complete(temp, seed, 65, extra)
    res[name] = text
    print(f"{name}: 64 decode tokens in {t - t1:.3f} s ({64 / (t - t1):.1f} tok/s), request {t:.3f} s, usage {usage}")
m = [l for l in get("/metrics").splitlines() if l.startswith("flea_chained_tokens_total") or l.startswith("flea_generated_tokens_total")]
print(" ".join(m))
json.dump(res, open(sys.argv[2], "w"))
