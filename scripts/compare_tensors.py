#!/usr/bin/env python3
"""Compare flea's intermediate activations (FLEA_DUMP) with llama.cpp's
(scripts/llama_cpp_tensors.py), bit for bit, op by op.

  python3 scripts/compare_tensors.py LLAMA_DIR FLEA_DIR [--layers 0,1]
  python3 scripts/compare_tensors.py LLAMA_DIR FEED_DIR --feed NAME-LAYER ...

The first form prints, for each tap, how many values differ from llama.cpp and the largest
relative difference. `--feed` writes llama.cpp's tensors as FLEA_FEED files instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# flea tap name -> llama.cpp tensor name (per layer; {l} is the layer)
TAPS = [
    ("inp", None),
    ("attn_norm", "attn_norm-{l}"),
    ("Qcur", "Qcur-{l}"),
    ("Kcur", "Kcur-{l}"),
    ("Vcur", "Vcur-{l}"),
    ("Qrope", "Qcur-{l}#2"),
    ("Krope", "Kcur-{l}#2"),
    ("kqv_out", "kqv_out-{l}"),
    ("attn_out", "attn_out-{l}"),
    ("attn_post_norm", "attn_post_norm-{l}"),
    ("ffn_inp", "ffn_inp-{l}"),
    ("ffn_norm", "ffn_norm-{l}"),
    ("ffn_gate", "ffn_gate-{l}"),
    ("ffn_up", "ffn_up-{l}"),
    ("ffn_swiglu", "ffn_swiglu-{l}"),
    ("ffn_geglu", "ffn_geglu-{l}"),
    ("ffn_out", "ffn_out-{l}"),
    ("ffn_post_norm", "ffn_post_norm-{l}"),
    ("l_out", "l_out-{l}"),
]


def llama_name(flea: str, layer: int) -> str | None:
    if flea == "inp":
        return "inp_embd" if layer == 0 else f"l_out-{layer - 1}"
    if flea == "result_norm":
        return "result_norm"
    for f, l in TAPS:
        if f == flea:
            return l.format(l=layer) if l else None
    return None


def load_llama(d: Path, name: str) -> np.ndarray | None:
    p = d / f"{name}.npy"
    if not p.exists():
        return None
    a = np.load(p)
    return a.astype(np.float32).reshape(-1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("llama", type=Path)
    ap.add_argument("flea", type=Path)
    ap.add_argument("--layers", default="0")
    ap.add_argument("--feed", nargs="*", help="NAME-LAYER taps to write as FLEA_FEED files")
    args = ap.parse_args()

    if args.feed:
        args.flea.mkdir(parents=True, exist_ok=True)
        for item in args.feed:
            flea, layer = item.rsplit("-", 1)
            ln = llama_name(flea, int(layer))
            a = load_llama(args.llama, ln) if ln else None
            if a is None:
                print(f"{item}: no llama.cpp tensor {ln}")
                return 1
            a.astype("<f4").tofile(args.flea / f"{item}.f32")
        return 0

    layers = [int(x) for x in args.layers.split(",")]
    for layer in layers:
        names = [f for f, _ in TAPS] + (["result_norm"] if layer == 0 else [])
        for flea in names:
            p = args.flea / f"{flea}-{layer}.f32"
            ln = llama_name(flea, layer)
            a = load_llama(args.llama, ln) if ln else None
            if not p.exists() or a is None:
                continue
            b = np.fromfile(p, dtype="<f4")
            if a.size != b.size:
                print(f"{flea}-{layer}: size {b.size} vs llama.cpp {a.size}")
                continue
            diff = a.view(np.uint32) != b.view(np.uint32)
            nd = int(diff.sum())
            rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-30)
            print(
                f"{flea + '-' + str(layer):<16} {nd:>7} / {a.size:<7} differ"
                f"  max rel {rel.max():.2e}  max abs {np.abs(a - b).max():.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
