#!/usr/bin/env python3
"""Compile crates/flea-cuda/src/kernels.cu with NVRTC (no GPU needed) and print the log.

Uses the same options as lib.rs (`--gpu-architecture=sm_90 --std=c++17 -lineinfo`) plus
`--ptxas-options=-v` (per-kernel registers / spills / shared memory) unless --quiet.

Setup: python3 -m venv /tmp/nvrtc-venv && /tmp/nvrtc-venv/bin/pip install nvidia-cuda-nvrtc-cu12
(or 'nvidia-cuda-nvrtc==13.0.*', the GPU machine's version)
Usage: /tmp/nvrtc-venv/bin/python scripts/nvrtc_check.py [--arch sm_90] [--quiet] [--filter SUBSTR]
       [--cache-dir DIR]
--cache-dir writes the CUBIN under the name flea's on-disk kernel cache looks for
(`{fnv1a64(source):016x}-{arch}.cubin`, lib.rs `kernels_cubin`): carry DIR to the GPU machine and
run flea there with FLEA_CUDA_CACHE=DIR, and its first run loads the kernels instead of
compiling them (~30 s of device time per binary per call).
Exit status: 0 when the source compiles, 1 otherwise.
"""
import argparse
import ctypes
import glob
import os
import sys


def load_nvrtc():
    # The cu12 wheel puts it under nvidia/cuda_nvrtc/lib, the cu13 one under nvidia/cu13/lib.
    import nvidia  # type: ignore

    libs = sorted(
        p
        for base in nvidia.__path__
        for p in glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*"))
        if "builtins" not in p and ".alt." not in p
    )
    if not libs:
        sys.exit(f"no libnvrtc.so under {list(nvidia.__path__)}")
    return ctypes.CDLL(libs[0])


def fnv1a64(data):
    """FNV-1a over the source bytes, as lib.rs `fnv1a` names the kernel cache."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--quiet", action="store_true", help="no ptxas resource report")
    ap.add_argument("--filter", default="", help="only print ptxas lines for kernels matching")
    ap.add_argument("--cache-dir", default="", help="write the CUBIN here under flea's cache name")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    src_path = os.path.join(here, "..", "crates", "flea-cuda", "src", "kernels.cu")
    with open(src_path, "rb") as f:
        src = f.read()
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(
        ctypes.byref(prog), src, b"flea_kernels.cu", 0, None, None
    )
    if rc != 0:
        sys.exit(f"nvrtcCreateProgram failed: {rc}")
    opts = [f"--gpu-architecture={args.arch}", "--std=c++17", "-lineinfo"]
    if not args.quiet:
        opts.append("--ptxas-options=-v")
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    if args.filter:
        # ptxas prints "Compiling entry function 'name'" followed by its resource lines.
        keep, out = False, []
        for line in log.splitlines():
            if "Compiling entry function" in line or "Function properties for" in line:
                keep = args.filter in line
            if keep or "error" in line or "warning" in line:
                out.append(line)
        log = "\n".join(out)
    print(log)
    cubin = 0
    if rc == 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        cubin = n.value
        if args.cache_dir:
            data = ctypes.create_string_buffer(cubin)
            lib.nvrtcGetCUBIN(prog, data)
            os.makedirs(args.cache_dir, exist_ok=True)
            path = os.path.join(args.cache_dir, f"{fnv1a64(src):016x}-{args.arch}.cubin")
            with open(path, "wb") as f:
                f.write(data.raw)
            print(f"cached as {path}")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    print(f"nvrtc rc={rc} ({'ok' if rc == 0 else 'FAILED'}), arch={args.arch}, cubin={cubin} bytes")
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
