#!/usr/bin/env python3
"""llama.cpp side of `flea bench` (llama-cpp-python), one run per process, JSON on stdout.

`flea bench` embeds this file and runs it with the configured Python; it can also be run by hand:

  python3 scripts/bench_llama.py info
      -> {"importable": true, "llama_cpp_python": "0.3.36", "llama_cpp_commit": "...",
          "gpu_offload": false, "system_info": "..."} (importable false + "error" otherwise)
  python3 scripts/bench_llama.py run --model M --prompt-ids FILE --threads T --gen N \
          --n-ctx C --n-gpu-layers L [--batch B]
      -> prompt and decode speed of greedy generation, like `flea run -n N --temp 0`: the prompt
         in one pass of up to B tokens per llama_decode, the first token from the prompt's
         logits, then N-1 single-token decode steps (what decode tok/s measures)
  python3 scripts/bench_llama.py check --model M --prompt-ids FILE --gen-ids FILE --threads T \
          --n-ctx C --n-gpu-layers L
      -> teacher-forced check of another engine's greedy tokens: evaluates the prompt, then the
         tokens one at a time, and counts where llama.cpp's argmax is the same token

Token ids come from files (JSON lists) so both engines see the very same prompt tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# llama-cpp-python release -> the llama.cpp commit it vendors (the wheel does not record it).
KNOWN_COMMITS = {"0.3.36": "0c1e57098"}


def info() -> dict:
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return {"importable": False, "error": f"{type(e).__name__}: {e}"}
    v = getattr(llama_cpp, "__version__", "unknown")
    out = {
        "importable": True,
        "llama_cpp_python": v,
        "llama_cpp_commit": KNOWN_COMMITS.get(v, "unknown"),
    }
    try:
        out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001
        out["gpu_offload"] = None
    try:
        out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # noqa: BLE001
        pass
    return out


def load(args, logits_all: bool):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        args.model,
        n_ctx=args.n_ctx,
        n_batch=args.batch,
        n_ubatch=args.batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=False,
        type_k=1,  # F16 KV cache, as flea
        type_v=1,
        logits_all=logits_all,
        seed=1234,
        verbose=False,
    )
    return llm, time.perf_counter() - t0


def ids_from(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise SystemExit(f"{path}: expected a JSON list of token ids")
    return ids


def run(args) -> dict:
    import llama_cpp
    import numpy as np

    llm, load_s = load(args, logits_all=False)
    ids = ids_from(args.prompt_ids)
    if not ids or len(ids) + args.gen > args.n_ctx:
        raise SystemExit(f"prompt {len(ids)} + gen {args.gen} tokens do not fit n_ctx {args.n_ctx}")
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(row))

    t0 = time.perf_counter()
    llm.eval(ids)
    gen = [argmax_last()]
    prompt_s = time.perf_counter() - t0
    steps = max(args.gen - 1, 0)
    t1 = time.perf_counter()
    for _ in range(steps):
        llm.eval([gen[-1]])
        gen.append(argmax_last())
    decode_s = time.perf_counter() - t1
    return {
        "prompt_tokens": len(ids),
        "prompt_seconds": prompt_s,
        "prompt_tokens_per_sec": len(ids) / prompt_s if prompt_s > 0 else None,
        "decode_tokens": steps,
        "decode_seconds": decode_s,
        "decode_tokens_per_sec": steps / decode_s if decode_s > 0 and steps > 0 else None,
        "generated_ids": gen,
        "load_seconds": load_s,
        "n_gpu_layers": args.n_gpu_layers,
    }


def check(args) -> dict:
    # llama_cpp before numpy, as in run(): on the GPU machine the other order segfaults.
    import llama_cpp  # noqa: F401
    import numpy as np

    # Without logits_all: llama-cpp-python 0.3.36's CUDA build segfaults with it (seen on the
    # GPU machine even at n_gpu_layers=0). The last position's logits after each eval are all
    # the check needs: the prompt once, then the other engine's tokens one at a time.
    llm, _ = load(args, logits_all=False)
    prompt = ids_from(args.prompt_ids)
    gen = ids_from(args.gen_ids)
    if not prompt or not gen:
        raise SystemExit("check needs a prompt and at least one generated token")
    if len(prompt) + len(gen) > args.n_ctx:
        raise SystemExit("prompt + generated tokens do not fit n_ctx")
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32, copy=True)

    # Position p's logits predict token p+1: the last prompt position predicts gen[0], and so on.
    llm.eval(prompt)
    rows = [last_logits()]
    for tok in gen[:-1]:
        llm.eval([tok])
        rows.append(last_logits())
    scores = np.stack(rows)
    agree = 0
    worst_margin = 0.0
    first_disagreement = None
    for k, tok in enumerate(gen):
        row = scores[k]
        top = int(np.argmax(row))
        if top == tok:
            agree += 1
        else:
            # How far below llama.cpp's top logit the other engine's choice was: a near-tie
            # (tiny margin) is float noise, a large one is a real difference.
            margin = float(row[top] - row[tok])
            worst_margin = max(worst_margin, margin)
            if first_disagreement is None:
                first_disagreement = k
    return {
        "positions": len(gen),
        "top1_agree": agree,
        "first_disagreement": first_disagreement,
        "worst_margin": worst_margin,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["info", "run", "check"])
    ap.add_argument("--model")
    ap.add_argument("--prompt-ids")
    ap.add_argument("--gen-ids")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    if args.mode == "info":
        out = info()
    elif args.mode == "run":
        out = run(args)
    else:
        out = check(args)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
