#!/usr/bin/env python3
"""Generate llama.cpp reference logit fixtures for flea.

For each model (smollm2, qwen2, gemma3) and each of several prompts this records, using
llama.cpp through llama-cpp-python (CPU, F16 KV cache, flash attention off):

  * the prompt token ids, as tokenized by llama.cpp (add_special=True, parse_special=True:
    llama.cpp adds BOS only when the GGUF vocab says so: gemma3 yes, smollm2/qwen2 no);
  * teacher-forced logits of the prompt, evaluated in ONE batch with logits for every
    position, summarised per position as: the top-64 token ids (by logit, ties -> lower id
    first), their log-probabilities (log-softmax over the FULL vocab, computed in float64),
    the full-vocab logsumexp and the raw max logit;
  * a 32-token greedy continuation (pure argmax over the float32 logits, first index wins a
    tie; no sampler, no penalties), computed by evaluating one token at a time after the
    prompt, with the same per-position summary for each decode step ("greedy_positions")
    and the top1-top2 logit margin of each greedy choice ("greedy_margins").

KL approximation (for consumers). With P = llama.cpp, Q = flea and S = the 64 stored ids:
    KL_S(P||Q) = sum_{i in S} p_i log(p_i/q_i) + p_r log(p_r/q_r),
    p_r = 1 - sum_S p_i,  q_r = 1 - sum_S q_i      (one "rest" bucket)
By the log-sum inequality KL_S <= KL(P||Q) (a lower bound), tight when p_r ~ 0. Each file
records min_top64_mass (the smallest sum_S p_i over all positions) so you know how tight.

Usage:
  python3 scripts/gen_logit_fixtures.py                 # (re)write all fixtures
  python3 scripts/gen_logit_fixtures.py smollm2 qwen2   # only some models
  python3 scripts/gen_logit_fixtures.py --check         # regenerate in memory, compare
The output is deterministic; a re-run whose content equals the existing file (ignoring
"date") leaves the file untouched.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "logits"
MODELS_DIR = Path(os.environ.get("FLEA_MODELS", os.path.expanduser("~/.cache/flea/models")))
LLAMA_CPP_COMMIT = "0c1e57098"
TOPK = 64
N_GREEDY = 32
SEED = 1234

# llama.cpp parameters used for every model (recorded in the fixture too).
PARAMS = dict(
    n_ctx=1024,
    n_batch=512,  # >= every prompt length: the prompt is one llama_decode call
    n_ubatch=512,
    n_threads=2,
    n_threads_batch=2,
    n_gpu_layers=0,
    flash_attn=False,
    type_k=1,  # GGML_TYPE_F16
    type_v=1,  # GGML_TYPE_F16
    seed=SEED,
    logits_all=True,
    use_mmap=True,
    offload_kqv=True,
)

MODELS = {
    "smollm2": dict(file="SmolLM2-135M-Instruct.Q4_1.gguf", chat="template"),
    "qwen2": dict(file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", chat="template"),
    "gemma3": dict(file="gemma-3-270m.Q4_K_M.gguf", chat="gemma"),
}

CHAT_USER = "Explain in two sentences why the sky is blue."

PLAIN = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, "
    "the fishermen were preparing their boats for the morning tide."
)

CODE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    print([fibonacci(i) for i in range(10)])
'''

UNICODE = (
    "Unicode test: café, naïve, Zürich, 東京タワー, Привет мир, emoji 🦀🚀, "
    "math ∑ x² ≤ 10³, tabs\tand  double  spaces,\nnumbers 3.14159 and 1,000,000!"
)

LONG = '''Large language models are neural networks trained to predict the next token of a text. \
During inference, the model reads a prompt, builds a key-value cache for every layer, and then \
generates new tokens one at a time. Each step multiplies the current hidden state by large weight \
matrices, which is why memory bandwidth, rather than raw arithmetic, usually limits the speed of \
decoding on a CPU.

Quantization reduces the size of those matrices. Formats such as Q4_0, Q4_1 and Q4_K store blocks \
of weights as small integers together with a scale and sometimes a minimum, so a 500 million \
parameter model fits in a few hundred megabytes. The dot products are computed directly on the \
packed blocks, and the activations are quantized to eight bits on the fly.

A careful implementation must reproduce the reference exactly: the same tokenizer merges, the same \
rotary position embedding, the same normalization epsilon, and the same order of operations in \
the attention softmax. Small differences are visible in the logits long before they change the \
generated text.

Here is a tiny example of a numerically stable softmax in Rust:

```rust
fn softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in xs.iter_mut() {
        *x /= sum;
    }
}
```

The function first subtracts the maximum so that the exponentials cannot overflow, then divides \
by their sum. In summary, the'''


def sig(x: float, digits: int = 6) -> float:
    """Round to `digits` significant digits (JSON-friendly float)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits}g}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def render_chat_template(template: str, bos: str, eos: str, user: str) -> str:
    """Render the GGUF's own chat template exactly like HF / llama-cpp-python do."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RuntimeError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}],
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
        raise_exception=raise_exception,
    )


def prompts_for(short: str, llm) -> list[dict]:
    spec = MODELS[short]
    if spec["chat"] == "template":
        tmpl = llm.metadata["tokenizer.chat_template"]
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        chat = render_chat_template(tmpl, bos, eos, CHAT_USER)
        chat_note = "GGUF tokenizer.chat_template rendered with jinja2 (add_generation_prompt=True)"
    else:  # gemma3-270m has no chat template in its GGUF; Gemma turn format, BOS added by llama.cpp
        chat = f"<start_of_turn>user\n{CHAT_USER}<end_of_turn>\n<start_of_turn>model\n"
        chat_note = "Gemma turn format (the GGUF has no chat template); BOS is added by the tokenizer"
    return [
        dict(name="chat", text=chat, note=chat_note, user_message=CHAT_USER),
        dict(name="plain", text=PLAIN),
        dict(name="code", text=CODE),
        dict(name="unicode", text=UNICODE),
        dict(name="long", text=LONG),
    ]


def summarize(row: np.ndarray) -> tuple[dict, float]:
    """Top-k summary of one logits row (float32, full vocab). Returns (dict, top-k mass)."""
    x = row.astype(np.float64)
    m = float(x.max())
    lse = m + math.log(float(np.exp(x - m).sum()))
    cand = np.argpartition(-x, TOPK)[: TOPK + 0]
    # exact ordering: logit desc, id asc; make sure ties at the k-th boundary are resolved
    # toward lower ids by including everything >= the k-th value before sorting.
    kth = np.sort(x[cand])[0]
    cand = np.nonzero(x >= kth)[0]
    order = np.lexsort((cand, -x[cand]))
    top = cand[order][:TOPK]
    lp = x[top] - lse
    mass = float(np.exp(lp).sum())
    d = {
        "top_ids": [int(i) for i in top],
        "top_logprobs": [sig(v) for v in lp],
        "logsumexp": sig(lse, 7),
        "max_logit": sig(m, 7),
    }
    return d, mass


def generate_model(short: str, verbose: bool = False) -> tuple[dict, dict]:
    import llama_cpp
    from llama_cpp import Llama

    spec = MODELS[short]
    path = MODELS_DIR / spec["file"]
    if not path.exists():
        raise SystemExit(f"model not found: {path} (run scripts/fetch_models.sh {short})")
    llm = Llama(
        str(path),
        n_ctx=PARAMS["n_ctx"],
        n_batch=PARAMS["n_batch"],
        n_ubatch=PARAMS["n_ubatch"],
        n_threads=PARAMS["n_threads"],
        n_threads_batch=PARAMS["n_threads_batch"],
        n_gpu_layers=PARAMS["n_gpu_layers"],
        flash_attn=PARAMS["flash_attn"],
        type_k=PARAMS["type_k"],
        type_v=PARAMS["type_v"],
        seed=PARAMS["seed"],
        logits_all=PARAMS["logits_all"],
        use_mmap=PARAMS["use_mmap"],
        offload_kqv=PARAMS["offload_kqv"],
        verbose=verbose,
    )
    n_vocab = llm.n_vocab()
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)

    # every llama_context_params field that is a plain number (what llama.cpp actually used)
    cparams = {}
    for name, _ in llama_cpp.llama_context_params._fields_:
        v = getattr(llm.context_params, name)
        if isinstance(v, (bool, int, float)):
            cparams[name] = v
    mparams = {}
    for name, _ in llama_cpp.llama_model_params._fields_:
        v = getattr(llm.model_params, name)
        if isinstance(v, (bool, int, float)):
            mparams[name] = v

    out_prompts = []
    stats = dict(min_mass=1.0, n_positions=0, counts=[])
    for p in prompts_for(short, llm):
        ids = llm.tokenize(p["text"].encode("utf-8"), add_bos=True, special=True)
        assert len(ids) <= PARAMS["n_batch"], "prompt longer than n_batch"
        assert len(ids) + N_GREEDY <= PARAMS["n_ctx"]
        llm.reset()
        llm.eval(ids)  # one llama_decode call, logits for every position
        logits = np.array(llm.scores[: len(ids), :], dtype=np.float32, copy=True)
        positions = []
        pmin = 1.0
        for i in range(len(ids)):
            d, mass = summarize(logits[i])
            pmin = min(pmin, mass)
            positions.append(d)
        # greedy continuation: pure argmax, one token per llama_decode
        greedy, gpos, margins = [], [], []
        row = logits[-1]
        for step in range(N_GREEDY):
            tok = int(np.argmax(row))  # first index on ties
            srt = np.partition(row, -2)[-2:]
            margins.append(sig(float(srt[1]) - float(srt[0])))
            greedy.append(tok)
            if step < N_GREEDY - 1:
                llm.eval([tok])
                row = np.array(llm.scores[llm.n_tokens - 1, :], dtype=np.float32, copy=True)
                d, mass = summarize(row)
                pmin = min(pmin, mass)
                gpos.append(d)
        stats["min_mass"] = min(stats["min_mass"], pmin)
        first_eog = next(
            (k for k, t in enumerate(greedy) if llama_cpp.llama_vocab_is_eog(vocab, t)), None
        )
        text_out = llm.detokenize(greedy, prev_tokens=ids, special=True).decode("utf-8", "replace")
        stats["n_positions"] += len(ids) + len(gpos)
        stats["counts"].append((p["name"], len(ids)))
        entry = {"name": p["name"], "text": p["text"]}
        for k in ("note", "user_message"):
            if k in p:
                entry[k] = p[k]
        entry.update(
            {
                "n_tokens": len(ids),
                "min_top64_mass": sig(pmin),
                "ids": [int(t) for t in ids],
                "positions": positions,
                "greedy": greedy,
                "greedy_text": text_out,
                "greedy_first_eog": first_eog,
                "greedy_margins": margins,
                "greedy_positions": gpos,
            }
        )
        out_prompts.append(entry)

    doc = {
        "model": spec["file"],
        "model_sha256": sha256_file(path),
        "architecture": llm.metadata.get("general.architecture"),
        "n_vocab": n_vocab,
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "add_bos": llm.metadata.get("tokenizer.ggml.add_bos_token"),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "params": dict(PARAMS),
        "context_params": cparams,
        "model_params": mparams,
        "tokenize": "Llama.tokenize(text.encode('utf-8'), add_bos=True, special=True) "
        "(= llama_tokenize add_special=true, parse_special=true)",
        "generated_by": "scripts/gen_logit_fixtures.py",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "topk": TOPK,
        "logprob_digits": 6,
        "min_top64_mass": sig(stats["min_mass"]),
        "kl_note": "KL over the stored top-64 ids + one 'rest' bucket is a LOWER BOUND of the "
        "full-vocab KL(llama.cpp||flea) (log-sum inequality); tight when the top-64 mass ~ 1 "
        "(see min_top64_mass).",
        "greedy_note": "greedy = argmax of float32 logits (first index on ties), 32 tokens, "
        "generated past EOS if any (greedy_first_eog = index of the first EOG token or null); "
        "prompt evaluated in one batch, then one token per decode; greedy_positions[k] is the "
        "summary of the logits after feeding greedy[k] (so it predicts greedy[k+1]); "
        "greedy_margins[k] = top1 - top2 logit when greedy[k] was chosen.",
        "prompts": out_prompts,
    }
    del llm
    return doc, stats


def dumps(doc: dict) -> str:
    """JSON with one line per position (diff-friendly, compact)."""
    lines = ["{"]
    keys = list(doc.keys())
    for ki, k in enumerate(keys):
        comma = "," if ki < len(keys) - 1 else ""
        if k != "prompts":
            lines.append(f"  {json.dumps(k)}: {json.dumps(doc[k], ensure_ascii=False)}{comma}")
            continue
        lines.append('  "prompts": [')
        for pi, p in enumerate(doc["prompts"]):
            lines.append("    {")
            pkeys = list(p.keys())
            for qi, q in enumerate(pkeys):
                c2 = "," if qi < len(pkeys) - 1 else ""
                v = p[q]
                if q in ("positions", "greedy_positions"):
                    lines.append(f"      {json.dumps(q)}: [")
                    for j, pos in enumerate(v):
                        c3 = "," if j < len(v) - 1 else ""
                        lines.append("        " + json.dumps(pos, separators=(",", ":")) + c3)
                    lines.append("      ]" + c2)
                else:
                    sep = (",", ":") if q in ("ids", "greedy", "greedy_margins") else None
                    lines.append(
                        f"      {json.dumps(q)}: {json.dumps(v, ensure_ascii=False, separators=sep)}{c2}"
                    )
            lines.append("    }" + ("," if pi < len(doc["prompts"]) - 1 else ""))
        lines.append("  ]" + comma)
    lines.append("}")
    return "\n".join(lines) + "\n"


def strip_date(doc: dict) -> dict:
    d = dict(doc)
    d.pop("date", None)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(MODELS), help="subset of: " + " ".join(MODELS))
    ap.add_argument("--check", action="store_true", help="regenerate and compare with the committed files; write nothing")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--verbose", action="store_true", help="llama.cpp logging")
    args = ap.parse_args()
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for short in args.models:
        doc, st = generate_model(short, args.verbose)
        out = args.out_dir / f"{short}.json"
        counts = ", ".join(f"{n}={c}" for n, c in st["counts"])
        summary = (
            f"{short}: {len(doc['prompts'])} prompts ({counts} tokens), "
            f"{st['n_positions']} positions, min top-{TOPK} mass {st['min_mass']:.6f}"
        )
        old = None
        if out.exists():
            try:
                old = json.loads(out.read_text())
            except json.JSONDecodeError:
                old = None
        # compare through a JSON round-trip so both sides have identical types
        same = old is not None and strip_date(old) == strip_date(json.loads(dumps(doc)))
        if args.check:
            status = "OK (identical)" if same else "DIFFERS" if old is not None else "MISSING"
            if not same:
                failures += 1
            print(f"{summary} -> {out.relative_to(REPO) if out.is_relative_to(REPO) else out}: {status}")
            continue
        if same:
            print(f"{summary} -> unchanged {out}")
        else:
            out.write_text(dumps(doc), encoding="utf-8")
            print(f"{summary} -> wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
