#!/usr/bin/env python3
"""Dump llama.cpp's named intermediate tensors of one prompt to .npy files.

Runs the model through llama-cpp-python with the same context parameters as
scripts/gen_logit_fixtures.py (CPU, F16 KV cache, flash attention off, whole prompt in one
llama_decode) and an eval callback (`cb_eval`) that copies every tensor of the chosen layers
to OUT/<name>.npy (e.g. attn_norm-0.npy, Qcur-0.npy, kq_soft_max-0.npy, l_out-0.npy), in
numpy's row-major order (shape = ggml's ne reversed, so rows are tokens). F32 tensors stay
F32, F16 tensors stay F16 (bit-exact). Used to compare flea op by op (FLEA_DUMP, see
crates/flea-model/src/debug.rs).

Usage:
  python3 scripts/llama_cpp_tensors.py smollm2 plain OUT [--layers 0,1,29] [--all-layers]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_logit_fixtures as fx  # noqa: E402

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of ggml 0.25.3 (include/ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}


def tensor_to_numpy(t: GgmlTensor) -> np.ndarray | None:
    dt = DTYPES.get(t.type)
    if dt is None or not t.data:
        return None
    ne = [t.ne[i] for i in range(GGML_MAX_DIMS)]
    nb = [t.nb[i] for i in range(GGML_MAX_DIMS)]
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dt).itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    base = np.frombuffer(buf, dtype=np.uint8)
    flat = np.ndarray(
        shape=tuple(reversed(ne)), dtype=dt, buffer=base, strides=tuple(reversed(nb))
    )
    return np.array(flat, copy=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(fx.MODELS))
    ap.add_argument("prompt", help="fixture prompt name (chat, plain, code, unicode, long)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", default="0", help="comma-separated layer indices")
    ap.add_argument("--all-layers", action="store_true")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    layers = None if args.all_layers else {int(x) for x in args.layers.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}

    def wanted(name: str) -> bool:
        m = re.match(r"^[^ ]*-(\d+)", name)
        if m is None:
            return True  # global tensors (inp_embd, result_norm, result_output, ...)
        return layers is None or int(m.group(1)) in layers

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(tp, ask, _user):
        t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode("utf-8", "replace")
        if ask:
            return wanted(name)
        arr = tensor_to_numpy(t)
        if arr is not None and wanted(name):
            # A name can repeat (e.g. views); keep each occurrence.
            k = seen.get(name, 0)
            seen[name] = k + 1
            fname = name if k == 0 else f"{name}#{k}"
            np.save(args.out / f"{fname.replace('/', '_')}.npy", arr)
        return True

    orig_init = llama_cpp.llama_init_from_model

    def init_with_cb(model, params):
        params.cb_eval = cb
        params.cb_eval_user_data = None
        return orig_init(model, params)

    llama_cpp.llama_cpp.llama_init_from_model = init_with_cb
    import llama_cpp._internals as internals

    internals.llama_cpp.llama_init_from_model = init_with_cb

    spec = fx.MODELS[args.model]
    P = fx.PARAMS
    llm = Llama(
        str(fx.MODELS_DIR / spec["file"]),
        n_ctx=P["n_ctx"],
        n_batch=P["n_batch"],
        n_ubatch=P["n_ubatch"],
        n_threads=P["n_threads"],
        n_threads_batch=P["n_threads_batch"],
        n_gpu_layers=P["n_gpu_layers"],
        flash_attn=P["flash_attn"],
        type_k=P["type_k"],
        type_v=P["type_v"],
        seed=P["seed"],
        logits_all=P["logits_all"],
        use_mmap=P["use_mmap"],
        offload_kqv=P["offload_kqv"],
        verbose=False,
    )
    fixture = json.loads((fx.OUT_DIR / f"{args.model}.json").read_text())
    prompt = next(p for p in fixture["prompts"] if p["name"] == args.prompt)
    ids = prompt["ids"]
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids), :], dtype=np.float32, copy=True)
    np.save(args.out / "logits.npy", logits)
    np.save(args.out / "ids.npy", np.array(ids, dtype=np.int32))
    print(f"{len(seen)} tensors, {len(ids)} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
