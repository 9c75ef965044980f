#!/usr/bin/env python3
"""Generate reference dequantization fixtures for flea-quant.

For each weight type, builds a few random blocks (random bytes for the quants, sane f16
scale fields so no NaN/inf/denormal surprises), dequantizes them with the `gguf` Python
package (llama.cpp's own reference implementation in numpy) and writes
crates/flea-quant/tests/fixtures/dequant.json with the block bytes and the expected
float32 values, both as hex (exact, compact).

Usage: python3 scripts/gen_quant_fixtures.py
"""
import json
import os
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

SEED = 20261126
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "flea-quant", "tests", "fixtures", "dequant.json")

# Byte offsets of f16 scale fields (d, dmin / m) inside each block.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def sane_halves(rng, k):
    """k random f16 values with magnitudes in [2^-12, 2) and random sign."""
    mag = 2.0 ** rng.uniform(-12, 1, size=k)
    sign = rng.choice([-1.0, 1.0], size=k)
    return (mag * sign).astype(np.float16)


def make_blocks(rng, qt):
    block, size = GGML_QUANT_SIZES[qt]
    if qt == T.F32:
        vals = rng.standard_normal(64).astype(np.float32)
        return vals.view(np.uint8)
    if qt == T.F16:
        return rng.standard_normal(64).astype(np.float16).view(np.uint8)
    if qt == T.BF16:
        f = rng.standard_normal(64).astype(np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8)
    n_blocks = 8 if block == 32 else 4
    data = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        h = sane_halves(rng, n_blocks)
        data[:, off:off + 2] = h.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(-1)


def main():
    rng = np.random.default_rng(SEED)
    cases = []
    for qt in TYPES:
        data = make_blocks(rng, qt)
        expected = np.asarray(gguf.quants.dequantize(data, qt), dtype=np.float32).reshape(-1)
        assert np.all(np.isfinite(expected)), qt.name
        cases.append({
            "type": qt.name,
            "n": int(expected.size),
            "data": data.tobytes().hex(),
            "expected_f32le": expected.astype("<f4").tobytes().hex(),
        })
    doc = {
        "generator": "scripts/gen_quant_fixtures.py",
        "gguf_version": version("gguf"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
