"""The official `openai` client against a running `flea serve` (started by serve_openai.rs).

    python3 openai_client.py BASE_URL API_KEY MODEL_ID EXPECTED_JSON SERVER_PID

EXPECTED_JSON maps each prompt to `flea run --temp 0` output for it (max 16 tokens). Every
check raises on failure; the exit status is what the Rust test looks at. Loopback only.
"""

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

BASE, KEY, MODEL, EXPECTED, PID = sys.argv[1:6]
EXPECTED = json.loads(EXPECTED)
PID = int(PID)
N = 16  # tokens per greedy request, as in the `flea run -n 16` references

client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what, flush=True)


def raw(path, body=None, key=KEY, method=None):
    """(status, parsed JSON or text) of a request made without the client library."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = "Bearer " + key
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(name):
    _, text = raw("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("metric %s missing" % name)


def is_error_body(b):
    return isinstance(b, dict) and isinstance(b.get("error"), dict) and b["error"].get("message")


# --- models, health ---
check(raw("/health", key=None)[0] == 200, "GET /health is 200")
ids = [m.id for m in client.models.list().data]
check(ids == [MODEL], "GET /v1/models lists the model")

prompts = list(EXPECTED)
p0 = prompts[0]

# --- completions, whole and streamed: greedy output equals `flea run` ---
r = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0)
check(r.choices[0].text == EXPECTED[p0], "completion equals flea run: %r" % r.choices[0].text)
check(r.choices[0].finish_reason in ("length", "stop"), "completion finish_reason")
u = r.usage
check(u.prompt_tokens > 0 and 0 < u.completion_tokens <= N, "completion usage counts")
check(u.total_tokens == u.prompt_tokens + u.completion_tokens, "usage total")

chunks = list(
    client.completions.create(
        model=MODEL,
        prompt=p0,
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == EXPECTED[p0], "streamed completion equals flea run")
check(any(c.choices and c.choices[0].finish_reason for c in chunks), "stream ends with a finish_reason")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == u.completion_tokens,
      "stream usage chunk")

# --- chat, whole and streamed ---
msgs = [{"role": "user", "content": "What is the capital of France?"}]
c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0)
whole = c.choices[0].message.content
check(c.choices[0].message.role == "assistant" and len(whole) > 0, "chat reply: %r" % whole)
check(c.usage.prompt_tokens > 5 and c.usage.completion_tokens > 0, "chat usage counts")
streamed = "".join(
    ch.choices[0].delta.content or ""
    for ch in client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=N, temperature=0, stream=True
    )
    if ch.choices
)
check(streamed == whole, "streamed chat equals whole chat")

# Sampling with a seed is reproducible; stop strings cut the text.
a = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0.9, top_p=0.9, seed=7)
b = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0.9, top_p=0.9, seed=7)
check(a.choices[0].text == b.choices[0].text, "same seed, same sample")
# top_k and min_p (extensions beside OpenAI's parameters) pass through: top_k=1 is greedy.
g = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0)
k1 = client.completions.create(
    model=MODEL, prompt=p0, max_tokens=N, temperature=0.9, seed=3, extra_body={"top_k": 1, "min_p": 0.05}
)
check(k1.choices[0].text == g.choices[0].text, "top_k=1 samples the greedy text")
full = EXPECTED[p0]
cut = full.strip()[:3]
if cut and cut in full:
    s = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0, stop=[cut])
    check(s.choices[0].text == full[: full.index(cut)] and s.choices[0].finish_reason == "stop",
          "stop string cuts the output")

# --- 16 concurrent streaming clients: each gets its own prompt's output ---
results = {}
errors = []


def worker(i):
    p = prompts[i % len(prompts)]
    try:
        out = ""
        for ch in client.completions.create(model=MODEL, prompt=p, max_tokens=N, temperature=0, stream=True):
            if ch.choices:
                out += ch.choices[0].text
        results[i] = (p, out)
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(repr(e))


threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join(300)
check(not errors, "16 concurrent streams without errors %s" % errors)
bad = [(p, out, EXPECTED[p]) for p, out in results.values() if out != EXPECTED[p]]
check(len(results) == 16 and not bad, "16 concurrent streams each equal their own flea run output %s" % bad)

# --- bad requests: OpenAI-style error bodies ---
st, body = raw("/v1/completions", b"{not json")
check(st == 400 and is_error_body(body), "malformed JSON is 400")
st, body = raw("/v1/completions", {"model": "no-such-model", "prompt": "x"})
check(st == 404 and body["error"]["code"] == "model_not_found", "unknown model is 404")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": "x" * (2 << 20)})
check(st == 413 and is_error_body(body), "oversize body is 413")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": p0, "max_tokens": 10**6})
check(st == 400 and body["error"]["code"] == "context_length_exceeded", "context overflow is 400")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 1})
check(st == 400 and body["error"]["code"] == "context_length_exceeded", "overlong prompt is 400")
st, body = raw("/v1/chat/completions", {"model": MODEL, "messages": []})
check(st == 400 and is_error_body(body), "empty messages is 400")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": p0, "n": 2})
check(st == 400 and is_error_body(body), "n=2 is 400")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": p0, "temperature": 5})
check(st == 400 and is_error_body(body), "temperature out of range is 400")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": p0, "min_p": 1.5})
check(st == 400 and is_error_body(body), "min_p out of range is 400")
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError:
    check(True, "the client sees NotFoundError for an unknown model")

# --- the API key is enforced ---
st, body = raw("/v1/models", key=None)
check(st == 401 and body["error"]["code"] == "invalid_api_key", "missing key is 401")
st, body = raw("/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong")
check(st == 401, "wrong key is 401")
try:
    openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("wrong key accepted")
except openai.AuthenticationError:
    check(True, "the client sees AuthenticationError for a wrong key")

# The server still serves after all that.
r = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0)
check(r.choices[0].text == EXPECTED[p0], "still serving correctly after bad requests")

# --- a client that disconnects mid-stream frees its slot ---
cancelled0 = metric("flea_requests_cancelled_total")
stream = client.completions.create(model=MODEL, prompt=p0, max_tokens=200, temperature=0.8, stream=True)
got = 0
for ch in stream:
    got += 1
    if got == 3:
        break
stream.close()
deadline = time.time() + 30
while time.time() < deadline:
    if metric("flea_active_sequences") == 0 and metric("flea_requests_cancelled_total") > cancelled0:
        break
    time.sleep(0.1)
check(metric("flea_active_sequences") == 0, "the dropped stream's slot is free")
check(metric("flea_requests_cancelled_total") > cancelled0, "the dropped stream counts as cancelled")
check(metric("flea_generated_tokens_total") > 0 and metric("flea_steps_total") > 0, "metrics count")

# --- graceful shutdown: SIGTERM mid-stream lets the stream finish ---
stream = client.completions.create(model=MODEL, prompt=p0, max_tokens=N, temperature=0, stream=True)
out, finish = "", None
for i, ch in enumerate(stream):
    if i == 1:
        os.kill(PID, signal.SIGTERM)
    if ch.choices:
        out += ch.choices[0].text
        finish = ch.choices[0].finish_reason or finish
check(out == EXPECTED[p0] and finish in ("length", "stop"), "an in-flight stream completes across SIGTERM")
print("all checks passed", flush=True)
