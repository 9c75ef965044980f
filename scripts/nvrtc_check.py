#!/usr/bin/env python3
"""Compile crates/flea-cuda/src/kernels.cu with NVRTC (no GPU needed) and print the log.

Uses the same options as lib.rs (`--gpu-architecture=sm_90 --std=c++17 -lineinfo`) plus
`--ptxas-options=-v` (per-kernel registers / spills / shared memory) unless --quiet.

Setup: python3 -m venv /tmp/nvrtc-venv && /tmp/nvrtc-venv/bin/pip install nvidia-cuda-nvrtc-cu12
Usage: /tmp/nvrtc-venv/bin/python scripts/nvrtc_check.py [--arch sm_90] [--quiet] [--filter SUBSTR]
Exit status: 0 when the source compiles, 1 otherwise.
"""
import argparse
import ctypes
import glob
import os
import sys


def load_nvrtc():
    import nvidia.cuda_nvrtc  # type: ignore

    base = os.path.dirname(nvidia.cuda_nvrtc.__path__[0] + "/")
    libs = sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))
    libs = [p for p in libs if "builtins" not in p and ".alt." not in p]
    if not libs:
        sys.exit(f"no libnvrtc.so under {base}/lib")
    return ctypes.CDLL(libs[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--quiet", action="store_true", help="no ptxas resource report")
    ap.add_argument("--filter", default="", help="only print ptxas lines for kernels matching")
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
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    print(f"nvrtc rc={rc} ({'ok' if rc == 0 else 'FAILED'}), arch={args.arch}, cubin={cubin} bytes")
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
