#!/usr/bin/env python3
"""Dump llama.cpp logits of synthetic models for flea-synth's cross-check test.

For every X.gguf in DIR, evaluates the fixed token ids below with llama-cpp-python (CPU,
all logits) and writes raw little-endian f32 logits [tokens][n_vocab] to X.gguf.llama.f32.
Then: FLEA_SYNTH_LLAMA_DIR=DIR cargo test -p flea-synth --test synth agrees -- --ignored --nocapture

Usage: python3 crates/flea-synth/scripts/llama_dump.py DIR
"""
import glob
import sys

import numpy as np
from llama_cpp import Llama

# Must match `agrees_with_llama_cpp_dumps` in tests/synth.rs (bos + "the quick brown fox").
TOKENS = [1022, 316, 101, 280, 117, 397, 107, 275, 114, 377, 110, 270, 382]

for path in sorted(glob.glob(f"{sys.argv[1]}/*.gguf")):
    m = Llama(model_path=path, n_ctx=64, n_batch=32, logits_all=True, verbose=False,
              flash_attn=False)
    m.eval(TOKENS)
    np.asarray(m.scores[: len(TOKENS)], dtype=np.float32).tofile(path + ".llama.f32")
    print(path)
