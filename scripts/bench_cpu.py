#!/usr/bin/env python3
"""CPU side-by-side benchmark: flea vs llama.cpp (llama-cpp-python), same prompt, same threads.

For each model: build a prompt TEXT of ~--prompt-tokens tokens (a word-prefix of a fixed prose
passage, sized with the model's llama.cpp tokenizer, no chat template, no special tokens), then
--reps times, interleaving the engines, run in a FRESH PROCESS each:

  llama.cpp  this script in worker mode: load model (n_threads = n_threads_batch = T, F16 KV,
             flash attention off, n_batch 512), evaluate the prompt in one llama_decode
             (timed with perf_counter -> prompt tok/s), then greedy generation of --gen tokens
             like `flea run -n GEN`: the first from the prompt logits, then GEN-1 single-token
             llama_decode steps (timed around eval + argmax -> decode tok/s). llama.cpp's own
             llama_perf_context counters are recorded too.
  flea       target/release/flea run -m MODEL -p PROMPT -n GEN --threads T --temp 0
             [--stats-json FILE], parsing the stderr summary line
             "prompt: N tokens in X s (R tok/s) | decode: M tokens in Y s (S tok/s) | peak RSS Z MiB"
             (or the --stats-json file when flea supports it).

Peak RSS of each engine is the child's own ru_maxrss (os.wait4), so the numbers are
comparable (the llama.cpp child includes the Python interpreter + numpy, ~30-40 MiB).
Medians over the repetitions are reported; ratio = flea / llama.cpp (>1: flea faster).

Shared machines: llama.cpp's CPU threads sync with spinning barriers, so with T threads on a
machine whose other load leaves fewer than T free cores, multi-threaded numbers collapse (on a
2-core box llama.cpp's SmolLM2 2-thread decode went from ~80 tok/s when quiet to 2-7 tok/s at
load ~4). Each run records the load average before it and cpu_s/wall_s (a warning is printed when
a run got < 0.75 x T CPUs); use --wait-idle LOAD to wait for a quiet machine, and compare engines
only from the same invocation (runs are interleaved so both see similar load).

  python3 scripts/bench_cpu.py                          # smollm2 qwen2, 2 threads, 3 reps
  python3 scripts/bench_cpu.py -m smollm2 -t 1 -t 2 --reps 5 --json bench.json
  python3 scripts/bench_cpu.py --no-flea                # llama.cpp half only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("FLEA_MODELS", os.path.expanduser("~/.cache/flea/models")))
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2": "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    "gemma3": "gemma-3-270m.Q4_K_M.gguf",
}

# Prose (no special tokens, no chat template); a word-prefix of it is used as the prompt.
PASSAGE = (
    "The lighthouse stood at the end of a long spit of sand, and for nearly a century its keepers "
    "had written down the weather every evening in a heavy leather book. The entries were short: "
    "the direction of the wind, the height of the swell, the number of ships that had passed, and "
    "sometimes a line about the birds. In the winter of the great storm the keeper noted that the "
    "sea had come over the sea wall three times before midnight, that the lamp had been trimmed "
    "twice, and that a fishing boat from the northern harbour had sheltered in the lee of the "
    "rocks until dawn. Nobody in the village remembered his name any more, but the book was kept "
    "in the small museum near the church, open at that page, under a sheet of glass. Visitors "
    "would lean over it and try to read the careful handwriting, which slanted a little more to "
    "the right as the night went on. Years later a student from the university came to copy the "
    "whole book, page by page, because she wanted to compare the old observations with modern "
    "measurements of the coast. She found that the storms had grown neither more frequent nor "
    "more violent, but that the sand had moved: the spit was now forty metres shorter than it had "
    "been when the lighthouse was built, and the sea wall stood where the keeper's garden had "
    "once been. She wrote this down in her own notebook, in pencil, in the same short style, and "
    "added a line about the birds."
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def model_path(name: str) -> Path:
    if name in MODELS:
        return MODELS_DIR / MODELS[name]
    p = Path(name).expanduser()
    if p.exists():
        return p
    raise SystemExit(f"unknown model {name!r}: use one of {list(MODELS)} or a .gguf path")


def short_name(name: str) -> str:
    return name if name in MODELS else Path(name).stem


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                fl = line.split(":", 1)[1].split()
                keep = [f for f in fl if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "bmi2"))]
                return " ".join(sorted(keep))
    except OSError:
        pass
    return ""


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def _vmhwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(cmd: list[str], timeout: float, env: dict | None = None):
    """Run cmd in a fresh process; return (rc, stdout, stderr, wall_s, peak_rss_mib, cpu_s, ru_maxrss_mib)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        rusage = None
        hwm_kib = 0
        while True:
            hwm_kib = max(hwm_kib, _vmhwm_kib(p.pid))
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                rusage = ru
                rc = os.waitstatus_to_exitcode(status)
                p.returncode = rc
                break
            if time.monotonic() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                p.returncode = rc = -9
                rusage = ru
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode("utf-8", "replace")
        err = fe.read().decode("utf-8", "replace")
    # Peak RSS: VmHWM of the exec'd image, polled (ru_maxrss of a child also counts the parent's
    # pages it carried before exec, so it is only a fallback / upper bound).
    maxrss_mib = rusage.ru_maxrss / 1024.0 if rusage else float("nan")  # Linux: KiB
    rss_mib = hwm_kib / 1024.0 if hwm_kib >= 1024 else maxrss_mib  # tiny: caught mid-exec
    cpu_s = rusage.ru_utime + rusage.ru_stime if rusage else float("nan")
    return rc, out, err, wall, rss_mib, cpu_s, maxrss_mib


def wait_idle(max_load: float | None, max_wait: float) -> str:
    """Sleep until the 1-minute load average is <= max_load (or max_wait s passed). Returns loadavg."""
    if max_load is not None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < max_wait:
            try:
                if float(open("/proc/loadavg").read().split()[0]) <= max_load:
                    break
            except (OSError, ValueError):
                break
            time.sleep(2)
    return loadavg()


def tail(s: str, n: int = 15) -> str:
    return "\n".join(s.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# prompt construction (llama.cpp tokenizer), shared by both engines
# ---------------------------------------------------------------------------------------------

def helper_worker(args) -> int:
    """Subprocess: prompt construction + llama.cpp versions (keeps the parent process small)."""
    out = {}
    if args.models:
        text, n = build_prompt(model_path(args.models[0]), args.prompt_tokens)
        out.update(text=text, n_tokens=n)
    try:
        import llama_cpp
        out["llama_cpp_python"] = llama_cpp.__version__
        out["llama_cpp_commit"] = "0c1e57098" if llama_cpp.__version__ == "0.3.36" else "unknown"
        out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception as e:  # noqa: BLE001
        out["llama_cpp_python"] = f"unavailable: {e}"
    sys.stdout.write(json.dumps(out))
    return 0


def helper(models: list[str], target: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_helper", "--prompt-tokens", str(target)]
    for m in models:
        cmd += ["-m", m]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"helper failed:\n{tail(r.stderr)}")
    return json.loads(r.stdout)


def build_prompt(path: Path, target: int) -> tuple[str, int]:
    """Longest word-prefix of PASSAGE with <= target tokens (llama.cpp add_special, parse_special)."""
    from llama_cpp import Llama

    voc = Llama(str(path), vocab_only=True, verbose=False)
    words = PASSAGE.split(" ")
    text = PASSAGE
    while len(voc.tokenize(text.encode(), add_bos=True, special=True)) < target:
        text = text + " " + PASSAGE  # repeat the passage if a tokenizer is very efficient
        words = text.split(" ")

    def ntok(k: int) -> int:
        return len(voc.tokenize(" ".join(words[:k]).encode(), add_bos=True, special=True))

    lo, hi = 1, len(words)  # largest k with ntok(k) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ntok(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    n = ntok(lo)
    del voc
    return text, n


# ---------------------------------------------------------------------------------------------
# llama.cpp worker (runs in its own process)
# ---------------------------------------------------------------------------------------------

def llama_worker(args) -> int:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    T = args.threads
    t_load0 = time.perf_counter()
    llm = Llama(
        args.models[0],
        n_ctx=args.n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=T,
        n_threads_batch=T,
        n_gpu_layers=0,
        flash_attn=False,
        type_k=1,  # F16
        type_v=1,
        logits_all=False,
        seed=1234,
        verbose=False,
    )
    t_load = time.perf_counter() - t_load0
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    if len(ids) + args.gen > args.n_ctx:
        raise SystemExit("prompt + gen exceed n_ctx")
    n_vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def argmax_last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        return int(np.argmax(row))

    if args.warmup:
        llm.eval(ids[: min(len(ids), 16)])
        llm.eval([argmax_last()])
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    llama_cpp.llama_perf_context_reset(ctx)

    t0 = time.perf_counter()
    llm.eval(ids)  # one llama_decode (n_batch 512 >= prompt)
    tok = argmax_last()
    t_prompt = time.perf_counter() - t0

    # Like `flea run -n GEN`: GEN generated tokens, the first from the prompt's logits, then
    # GEN-1 single-token decode steps (those are what decode tok/s measures).
    gen = [tok]
    n_dec = max(args.gen - 1, 0)
    t1 = time.perf_counter()
    for _ in range(n_dec):
        llm.eval([gen[-1]])
        gen.append(argmax_last())
    t_decode = time.perf_counter() - t1

    perf = llama_cpp.llama_perf_context(ctx)
    res = {
        "engine": "llama.cpp",
        "prompt_tokens": len(ids),
        "prompt_s": t_prompt,
        "prompt_tok_s": len(ids) / t_prompt,
        "decode_tokens": n_dec,
        "decode_s": t_decode,
        "decode_tok_s": n_dec / t_decode if t_decode > 0 else float("nan"),
        "generated_tokens": len(gen),
        "load_s": t_load,
        "llama_perf": {
            "t_p_eval_ms": perf.t_p_eval_ms,
            "n_p_eval": perf.n_p_eval,
            "t_eval_ms": perf.t_eval_ms,
            "n_eval": perf.n_eval,
            "prompt_tok_s": perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms > 0 else None,
            "decode_tok_s": perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else None,
        },
        "generated_ids": gen,
        "generated_text": llm.detokenize(gen, prev_tokens=ids).decode("utf-8", "replace"),
        "self_vmhwm_mib": _vmhwm_kib(os.getpid()) / 1024,
    }
    Path(args.out).write_text(json.dumps(res))
    return 0


def run_llama(model: Path, prompt_file: Path, threads: int, gen: int, n_ctx: int, warmup: bool,
              timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_llama-worker", "--model", str(model),
               "--prompt-file", str(prompt_file), "-t", str(threads), "--gen", str(gen),
               "--n-ctx", str(n_ctx), "--out", out] + (["--warmup"] if warmup else [])
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        rc, so, se, wall, rss, cpu, maxrss = run_child(cmd, timeout, env)
        if rc != 0:
            raise RuntimeError(f"llama.cpp worker failed (rc={rc}):\n{tail(se)}")
        res = json.loads(Path(out).read_text())
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    res["peak_rss_mib"] = rss
    res["ru_maxrss_mib"] = maxrss
    res["wall_s"] = wall
    res["cpu_s"] = cpu  # user+sys of the whole child; cpu_s/wall_s << threads => it was descheduled
    return res


# ---------------------------------------------------------------------------------------------
# flea
# ---------------------------------------------------------------------------------------------

_NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
_SECS = _NUM + r"\s*(ms|s|sec|secs|seconds)?"
_RATE = _NUM + r"\s*(?:tok(?:ens)?|t)\s*/\s*s"
RE_PROMPT = re.compile(r"prompt(?:\s+eval)?\s*[:=]\s*" + _NUM + r"\s*tok(?:en)?s?\s+in\s+" + _SECS
                       + r"(?:\s*\(\s*" + _RATE + r"\s*\))?", re.I)
RE_DECODE = re.compile(r"(?:decode|eval|gen(?:erate|eration)?)\s*[:=]\s*" + _NUM + r"\s*tok(?:en)?s?\s+in\s+"
                       + _SECS + r"(?:\s*\(\s*" + _RATE + r"\s*\))?", re.I)
RE_RSS = re.compile(r"peak\s*(?:RSS|mem(?:ory)?)\s*[:=]?\s*" + _NUM + r"\s*(B|KiB|KB|kB|MiB|MB|GiB|GB)?", re.I)


def _f(s: str) -> float:
    return float(s.replace(",", ""))


def _secs(v: str, unit: str | None) -> float:
    x = _f(v)
    return x / 1e3 if unit and unit.lower() == "ms" else x


def _mib(v: str, unit: str | None) -> float:
    x = _f(v)
    u = (unit or "MiB").lower()
    return {"b": x / 2**20, "kib": x / 1024, "kb": x / 1024, "mib": x, "mb": x,
            "gib": x * 1024, "gb": x * 1024}.get(u, x)


def parse_flea_summary(stderr: str) -> dict:
    """Parse flea's final stderr stats line. Raises ValueError with context if it is missing."""
    pm = list(RE_PROMPT.finditer(stderr))
    dm = list(RE_DECODE.finditer(stderr))
    if not pm or not dm:
        raise ValueError(
            "flea's summary line was not found on stderr (expected e.g. 'prompt: 123 tokens in "
            "0.41 s (300.0 tok/s) | decode: 64 tokens in 0.58 s (110.3 tok/s) | peak RSS 210 MiB').\n"
            "--- last lines of flea stderr ---\n" + tail(stderr))
    p, d = pm[-1], dm[-1]
    res = {}
    n, s = _f(p.group(1)), _secs(p.group(2), p.group(3))
    res["prompt_tokens"] = int(n)
    res["prompt_s"] = s
    res["prompt_tok_s"] = _f(p.group(4)) if p.group(4) else (n / s if s > 0 else float("nan"))
    n, s = _f(d.group(1)), _secs(d.group(2), d.group(3))
    res["decode_tokens"] = int(n)
    res["decode_s"] = s
    res["decode_tok_s"] = _f(d.group(4)) if d.group(4) else (n / s if s > 0 else float("nan"))
    rm = list(RE_RSS.finditer(stderr))
    if rm:
        res["reported_peak_rss_mib"] = _mib(rm[-1].group(1), rm[-1].group(2))
    return res


def parse_flea_stats_json(path: Path) -> dict:
    """Best-effort reading of flea --stats-json (key names unknown in advance)."""
    try:
        j = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    flat = {}

    def walk(o, pre=""):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{pre}{k}." if isinstance(v, dict) else f"{pre}{k}")
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            flat[pre.lower()] = o

    walk(j)

    def pick(*names):
        for k, v in flat.items():
            kk = k.replace(".", "_")
            if any(kk == n or kk.endswith("_" + n) or kk.endswith(n) for n in names):
                return v
        return None

    out = {
        "prompt_tokens": pick("prompt_tokens", "n_prompt", "prompt_n_tokens", "prompt_n"),
        "prompt_tok_s": pick("prompt_tok_s", "prompt_tokens_per_s", "prompt_tps", "prompt_tokens_per_sec",
                             "prompt_tokens_per_second"),
        "prompt_s": pick("prompt_seconds", "prompt_s", "prompt_secs"),
        "decode_tokens": pick("decode_tokens", "n_decode", "gen_tokens", "decode_n_tokens", "decode_n"),
        "decode_tok_s": pick("decode_tok_s", "decode_tokens_per_s", "decode_tps", "decode_tokens_per_sec",
                             "decode_tokens_per_second"),
        "decode_s": pick("decode_seconds", "decode_s", "decode_secs"),
        "generated_tokens": pick("generated_tokens", "n_generated"),
        "reported_peak_rss_mib": pick("peak_rss_mib", "rss_mib"),
    }
    if out["reported_peak_rss_mib"] is None:
        b = pick("peak_rss_bytes", "rss_bytes")
        if b is not None:
            out["reported_peak_rss_mib"] = b / 2**20
    return {k: v for k, v in out.items() if v is not None} | {"raw": j}


_help_cache: dict[str, str] = {}


def flea_help(flea: Path) -> str:
    key = str(flea)
    if key not in _help_cache:
        try:
            r = subprocess.run([str(flea), "run", "--help"], capture_output=True, text=True, timeout=30)
            _help_cache[key] = r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _help_cache[key] = ""
    return _help_cache[key]


def flea_cmd(flea: Path, model: Path, prompt: str, threads: int, gen: int, stats_json: Path | None,
             extra: list[str], n_ctx: int | None = None) -> list[str]:
    h = flea_help(flea)
    cmd = [str(flea), "run", "-m", str(model), "-p", prompt, "-n", str(gen), "--threads", str(threads),
           "--temp", "0"]
    # Optional flags, added only when `flea run --help` advertises them (keeps both engines on the
    # same raw prompt and a full-length decode).
    for flag in ("--ignore-eos", "--raw", "--no-chat-template", "--no-template"):
        if re.search(re.escape(flag) + r"\b", h) and flag not in extra:
            cmd.append(flag)
    if stats_json is not None and "--stats-json" in h:
        cmd += ["--stats-json", str(stats_json)]
    # same KV-cache size as the llama.cpp side (affects peak RSS)
    if n_ctx and re.search(r"--ctx\b", h) and not any(a in ("-c", "--ctx") for a in extra):
        cmd += ["--ctx", str(n_ctx)]
    return cmd + extra


def run_flea(flea: Path, model: Path, prompt: str, threads: int, gen: int, timeout: float,
             extra: list[str], n_ctx: int | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        sj = Path(f.name)
    sj.unlink()
    try:
        cmd = flea_cmd(flea, model, prompt, threads, gen, sj, extra, n_ctx)
        rc, so, se, wall, rss, cpu, maxrss = run_child(cmd, timeout)
        if rc != 0:
            raise RuntimeError(f"flea failed (rc={rc}): {shlex.join(cmd[:4])} ...\n{tail(se)}")
        res = {"engine": "flea"}
        js = parse_flea_stats_json(sj) if sj.exists() else {}
        try:
            res.update(parse_flea_summary(se))
            res["source"] = "stderr summary line"
        except ValueError:
            if not ("prompt_tok_s" in js and "decode_tok_s" in js):
                raise
        if all(k in js for k in ("prompt_tokens", "prompt_tok_s", "decode_tokens", "decode_tok_s")):
            # the JSON has full precision; prefer it (the stderr line is cross-checked above)
            res.update({k: v for k, v in js.items() if k != "raw"})
            res["source"] = "--stats-json" + (" (+stderr line)" if "source" in res else "")
        if js:
            res["stats_json"] = js.get("raw")
        res["flags"] = [a for a in cmd[1:] if a.startswith("--")]
        res["generated_text"] = so
    finally:
        try:
            sj.unlink()
        except OSError:
            pass
    res["peak_rss_mib"] = rss
    res["ru_maxrss_mib"] = maxrss
    res["wall_s"] = wall
    res["cpu_s"] = cpu  # user+sys of the whole child; cpu_s/wall_s << threads => it was descheduled
    return res


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def versions(flea: Path | None) -> dict:
    v = {"python": platform.python_version()}
    v.update(helper([], 0))
    try:
        v["repo_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    if flea is not None and flea.exists():
        try:
            r = subprocess.run([str(flea), "--version"], capture_output=True, text=True, timeout=10)
            v["flea"] = (r.stdout or r.stderr).strip() or f"rc={r.returncode}"
        except (OSError, subprocess.TimeoutExpired):
            v["flea"] = "unknown"
        st = flea.stat()
        v["flea_binary_mtime"] = _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", dest="models",
                    help=f"model name ({', '.join(MODELS)}) or .gguf path; repeatable (default: smollm2 qwen2)")
    ap.add_argument("-t", "--threads", action="append", type=int, help="thread count; repeatable (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per engine (median reported)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="target prompt length (llama.cpp tokens)")
    ap.add_argument("--gen", type=int, default=64,
                    help="tokens to generate (flea -n); GEN-1 single-token decode steps are timed")
    ap.add_argument("--flea", type=Path, default=REPO / "target" / "release" / "flea", help="flea binary")
    ap.add_argument("--flea-arg", action="append", default=[], help="extra argument for `flea run` (repeatable)")
    ap.add_argument("--no-flea", action="store_true", help="benchmark llama.cpp only")
    ap.add_argument("--no-llama", action="store_true", help="benchmark flea only")
    ap.add_argument("--warmup", action="store_true",
                    help="llama.cpp: a short warm-up decode before timing (flea `run` has none; off by default)")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--wait-idle", type=float, metavar="LOAD",
                    help="before each run, wait until the 1-min load average is <= LOAD (shared machines)")
    ap.add_argument("--wait-idle-max", type=float, default=120, help="max seconds to wait per run (default 120)")
    ap.add_argument("--timeout", type=float, default=600, help="per-run timeout (s)")
    ap.add_argument("--json", type=Path, help="write all results (every run) to this file")
    # worker mode (internal)
    ap.add_argument("--_llama-worker", dest="llama_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_helper", dest="helper", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.helper:
        return helper_worker(args)
    if args.llama_worker:
        args.threads = args.threads[0]
        return llama_worker(args)

    models = args.models or ["smollm2", "qwen2"]
    threads = args.threads or [2]
    use_flea = not args.no_flea
    use_llama = not args.no_llama
    if use_flea and not args.flea.exists():
        print(f"error: flea binary not found at {args.flea} (build with `cargo build --release`, "
              f"or pass --flea PATH, or --no-flea)", file=sys.stderr)
        return 2

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "n_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_start": loadavg(),
        "versions": versions(args.flea if use_flea else None),
        "settings": {"reps": args.reps, "prompt_tokens_target": args.prompt_tokens, "gen": args.gen,
                     "warmup_llama": args.warmup, "n_ctx": args.n_ctx,
                     "llama_params": "n_batch=n_ubatch=512, F16 KV, flash_attn off, CPU, greedy argmax, "
                                     "fresh process per run",
                     "flea_extra_args": args.flea_arg, "wait_idle": args.wait_idle},
    }
    print(f"# flea vs llama.cpp (CPU) — {meta['date']}")
    print(f"# CPU: {meta['cpu']} ({meta['n_cpus']} logical CPUs), load avg {meta['loadavg_start']}")
    print(f"# versions: {json.dumps(meta['versions'])}")

    results = []
    tmpdir = Path(tempfile.mkdtemp(prefix="flea-bench-"))
    rows = []
    for mname in models:
        mpath = model_path(mname)
        if not mpath.exists():
            print(f"error: model file missing: {mpath} (scripts/fetch_models.sh)", file=sys.stderr)
            return 2
        h = helper([str(mpath)], args.prompt_tokens)
        text, n_llama_tok = h["text"], h["n_tokens"]
        pf = tmpdir / f"{short_name(mname)}.prompt.txt"
        pf.write_text(text, encoding="utf-8")
        print(f"# {short_name(mname)}: prompt = {n_llama_tok} llama.cpp tokens, {len(text)} chars")
        for T in threads:
            runs = {"llama.cpp": [], "flea": []}
            for rep in range(args.reps):
                order = ["llama.cpp", "flea"] if rep % 2 == 0 else ["flea", "llama.cpp"]
                for eng in order:
                    if (eng == "llama.cpp" and not use_llama) or (eng == "flea" and not use_flea):
                        continue
                    la = wait_idle(args.wait_idle, args.wait_idle_max)
                    if eng == "llama.cpp" and use_llama:
                        r = run_llama(mpath, pf, T, args.gen, args.n_ctx, args.warmup, args.timeout)
                    elif eng == "flea" and use_flea:
                        r = run_flea(args.flea, mpath, text, T, args.gen, args.timeout, args.flea_arg, args.n_ctx)
                    else:
                        continue
                    r.update(model=short_name(mname), threads=T, rep=rep, loadavg_before=la)
                    runs[eng].append(r)
                    results.append(r)
                    print(f"#   rep {rep} {eng:9s} T={T}: prompt {r['prompt_tokens']} tok "
                          f"{r['prompt_tok_s']:.1f} tok/s | decode {r['decode_tokens']} tok "
                          f"{r['decode_tok_s']:.1f} tok/s | peak RSS {r['peak_rss_mib']:.0f} MiB | "
                          f"cpu/wall {r['cpu_s'] / r['wall_s']:.2f} | load {la}",
                          flush=True)
            L, F = runs["llama.cpp"], runs["flea"]
            row = {
                "model": short_name(mname),
                "threads": T,
                "prompt_tokens_llama": L[0]["prompt_tokens"] if L else None,
                "prompt_tokens_flea": F[0]["prompt_tokens"] if F else None,
                "decode_tokens_llama": L[0]["decode_tokens"] if L else None,
                "decode_tokens_flea": med([r["decode_tokens"] for r in F]),
                "llama_prompt_tok_s": med([r["prompt_tok_s"] for r in L]),
                "flea_prompt_tok_s": med([r["prompt_tok_s"] for r in F]),
                "llama_decode_tok_s": med([r["decode_tok_s"] for r in L]),
                "flea_decode_tok_s": med([r["decode_tok_s"] for r in F]),
                "llama_peak_rss_mib": med([r["peak_rss_mib"] for r in L]),
                "flea_peak_rss_mib": med([r["peak_rss_mib"] for r in F]),
                "flea_reported_peak_rss_mib": med([r.get("reported_peak_rss_mib") for r in F]),
                "llama_perf_prompt_tok_s": med([r["llama_perf"]["prompt_tok_s"] for r in L]),
                "llama_perf_decode_tok_s": med([r["llama_perf"]["decode_tok_s"] for r in L]),
                "llama_best_prompt_tok_s": max([r["prompt_tok_s"] for r in L], default=None),
                "flea_best_prompt_tok_s": max([r["prompt_tok_s"] for r in F], default=None),
                "llama_best_decode_tok_s": max([r["decode_tok_s"] for r in L], default=None),
                "flea_best_decode_tok_s": max([r["decode_tok_s"] for r in F], default=None),
            }
            utils = [x["cpu_s"] / x["wall_s"] for x in L + F if x.get("wall_s")]
            row["cpu_util_min"] = min(utils) if utils else None
            row["prompt_ratio"] = ratio(row["flea_prompt_tok_s"], row["llama_prompt_tok_s"])
            row["decode_ratio"] = ratio(row["flea_decode_tok_s"], row["llama_decode_tok_s"])
            warn = []
            if L and F and row["prompt_tokens_llama"] != row["prompt_tokens_flea"]:
                warn.append(f"prompt token count differs: llama.cpp {row['prompt_tokens_llama']} vs "
                            f"flea {row['prompt_tokens_flea']} (chat template applied? tokenizer mismatch?)")
            if F and row["decode_tokens_flea"] is not None and row["decode_tokens_flea"] < args.gen - 1:
                warn.append(f"flea decoded only {row['decode_tokens_flea']} of {args.gen - 1} steps (EOS?)")
            if L and F and row["decode_tokens_flea"] is not None and \
                    row["decode_tokens_flea"] != L[0]["decode_tokens"]:
                warn.append(f"decode step counts differ: llama.cpp {L[0]['decode_tokens']} vs flea "
                            f"{row['decode_tokens_flea']}")
            if L and F:
                a = " ".join(L[0]["generated_text"].split())
                b = " ".join(F[0]["generated_text"].split())
                k = 0
                while k < min(len(a), len(b)) and a[k] == b[k]:
                    k += 1
                row["greedy_text_equal"] = a == b
                row["greedy_text_common_prefix_chars"] = k
                print(f"# {row['model']} T={T}: greedy text {'identical' if a == b else f'differs after {k} chars'}"
                      f" (llama.cpp {len(a)} chars, flea {len(b)} chars)")
            row["warnings"] = warn
            for w in warn:
                print(f"# WARNING {row['model']} T={T}: {w}")
            rows.append(row)

    meta["loadavg_end"] = loadavg()
    # Contention check: a child that got its cores uses ~T CPU-seconds per wall second (a bit less
    # for the single-threaded model load); much less means it was descheduled.
    for r in rows:
        if r["cpu_util_min"] is not None and r["cpu_util_min"] < 0.75 * r["threads"]:
            print(f"\n# WARNING {r['model']} T={r['threads']}: a run used only {r['cpu_util_min']:.2f} CPUs on "
                  f"average (< 0.75 x {r['threads']} threads): the machine was oversubscribed, these numbers "
                  "are contention-dominated (spinning thread barriers collapse); re-run with --wait-idle.")
    print()
    print(f"CPU: {meta['cpu']}, {meta['n_cpus']} logical CPUs; load avg {meta['loadavg_start']} -> "
          f"{meta['loadavg_end']}; median of {args.reps} runs; ratio = flea / llama.cpp (>1: flea faster); "
          f"llama-cpp-python {meta['versions'].get('llama_cpp_python')} (llama.cpp "
          f"{meta['versions'].get('llama_cpp_commit')}); {args.gen} generated tokens ({args.gen - 1} decode steps)")
    print()
    print("| model | threads | prompt tok (llama.cpp/flea) | llama.cpp prompt tok/s | flea prompt tok/s | ratio "
          "| llama.cpp decode tok/s | flea decode tok/s | ratio | peak RSS llama.cpp MiB | peak RSS flea MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        toks = f"{r['prompt_tokens_llama'] if r['prompt_tokens_llama'] is not None else '—'}/" \
               f"{r['prompt_tokens_flea'] if r['prompt_tokens_flea'] is not None else '—'}"
        if r["warnings"]:
            toks += " ⚠"
        print(f"| {r['model']} | {r['threads']} | {toks} | {fmt(r['llama_prompt_tok_s'])} | "
              f"{fmt(r['flea_prompt_tok_s'])} | {fmt(r['prompt_ratio'], 2)} | {fmt(r['llama_decode_tok_s'])} | "
              f"{fmt(r['flea_decode_tok_s'])} | {fmt(r['decode_ratio'], 2)} | {fmt(r['llama_peak_rss_mib'], 0)} | "
              f"{fmt(r['flea_peak_rss_mib'], 0)} |")

    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1,
                                        ensure_ascii=False) + "\n")
        print(f"\n(wrote {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
