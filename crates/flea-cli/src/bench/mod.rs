//! `flea bench --config FILE`: runs a benchmark matrix from YAML and writes one JSON line per
//! case in the seed's schema (`gpu`, `nvme`, `model`, `baseline_tokens_per_sec`,
//! `optimized_tokens_per_sec`, `vram_peak_mb`, `correctness`) plus the rest of the story:
//! prompt speed, host RSS, the floor and its link, efficiency, thermal flags, commit and
//! config hash.
//!
//! Each flea run is this same binary as a child (`flea run ... --stats-json`), so runs are
//! isolated; llama.cpp runs through `scripts/bench_llama.py` (embedded in the binary) under
//! the configured Python. A missing llama-cpp-python leaves the baseline fields null with the
//! reason, never a made-up number.

pub mod chart;
pub mod config;

use crate::hw::{self, Hardware, ThermalReport, Watch};
use anyhow::{anyhow, bail, Context, Result};
use config::{Baseline, Case, Config, ModelSource};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LLAMA_SCRIPT: &str = include_str!("../../../../scripts/bench_llama.py");

/// Prose used for prompts (a word-prefix of it, repeated if a tokenizer is very efficient).
const PASSAGE: &str = "The lighthouse stood at the end of a long spit of sand, and for nearly a century its keepers \
had written down the weather every evening in a heavy leather book. The entries were short: the direction of the \
wind, the height of the swell, the number of ships that had passed, and sometimes a line about the birds. In the \
winter of the great storm the keeper noted that the sea had come over the sea wall three times before midnight, \
that the lamp had been trimmed twice, and that a fishing boat from the northern harbour had sheltered in the lee \
of the rocks until dawn.";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The YAML benchmark matrix (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory: results.jsonl, summary.md, SVG pictures (default: bench-out/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only parse and check the config, print the cases, run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// FNV-1a 64 of the config file's bytes: results name the exact config they came from.
pub fn config_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fnv1a64:{h:016x}")
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Synthetic models are cached between runs (and kept out of result directories):
/// `$XDG_CACHE_HOME/flea/bench-models`, else `~/.cache/flea/bench-models`.
fn default_synth_dir() -> PathBuf {
    match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x).join("flea/bench-models"),
        (_, Some(h)) => PathBuf::from(h).join(".cache/flea/bench-models"),
        _ => std::env::temp_dir().join("flea-bench-models"),
    }
}

/// Sleep until the 1-minute load average is at most `max_load` or `max_wait` passed.
fn wait_idle(max_load: Option<f64>, max_wait: Duration) {
    let Some(max_load) = max_load else { return };
    let t0 = Instant::now();
    while t0.elapsed() < max_wait {
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
        match load {
            Some(l) if l > max_load => std::thread::sleep(Duration::from_secs(2)),
            _ => return,
        }
    }
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// A prepared model: its file, its tokenizer-sized prompts, its layer bytes.
struct Prepared {
    path: PathBuf,
    label: String,
    tokenizer: flea_tokenizer::Tokenizer,
    cfg: flea_model::config::ModelConfig,
    /// Bytes of each layer, in order.
    layer_bytes: Vec<u64>,
}

fn prepare_model(spec: &config::ModelSpec, synth_dir: &Path) -> Result<Prepared> {
    let path = match &spec.source {
        ModelSource::Path(p) => expand_home(p),
        ModelSource::Synth {
            preset,
            quant,
            seed,
            layers,
        } => {
            let file = synth_dir.join(format!(
                "{}-{:?}-s{seed}{}.gguf",
                preset.name(),
                quant,
                layers.map(|l| format!("-l{l}")).unwrap_or_default()
            ));
            if !file.exists() {
                std::fs::create_dir_all(synth_dir)
                    .with_context(|| format!("creating {}", synth_dir.display()))?;
                let mut o = flea_synth::SynthOptions::new(*preset);
                o.quant = *quant;
                o.seed = *seed;
                if let Some(l) = layers {
                    o.shape.n_layers = *l;
                }
                eprintln!("bench: writing synthetic model {}", file.display());
                // Write under a temporary name so an interrupted run leaves no half file.
                let tmp = file.with_extension("gguf.partial");
                flea_synth::write_synthetic(&tmp, &o)?;
                std::fs::rename(&tmp, &file)
                    .with_context(|| format!("renaming to {}", file.display()))?;
            }
            file
        }
    };
    let f = flea_gguf::GgufFile::open(&path)
        .with_context(|| format!("model {}: reading {}", spec.name, path.display()))?;
    let tokenizer = flea_tokenizer::Tokenizer::from_gguf(&f.header)
        .with_context(|| format!("model {}: tokenizer", spec.name))?;
    let cfg = flea_model::config::ModelConfig::from_gguf(&f.header)
        .with_context(|| format!("model {}: config", spec.name))?;
    let layer_bytes = (0..f.header.n_layers())
        .map(|il| f.header.layer_view(il).map_or(0, |v| v.bytes))
        .collect();
    let label = format!(
        "{} ({})",
        spec.name,
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    Ok(Prepared {
        path,
        label,
        tokenizer,
        cfg,
        layer_bytes,
    })
}

/// The longest word-prefix of the passage with at most `target` tokens (BOS included), and
/// its ids. Both engines get exactly these ids.
fn prompt_for(tok: &flea_tokenizer::Tokenizer, target: usize) -> (String, Vec<u32>) {
    let mut words: Vec<&str> = Vec::new();
    // Enough repetitions of the passage for any reasonable target (bounded: 64 copies).
    for _ in 0..64 {
        words.extend(PASSAGE.split(' '));
        if tok.encode(&words.join(" "), true, true).len() > target {
            break;
        }
    }
    let ntok = |k: usize| tok.encode(&words[..k].join(" "), true, true).len();
    let (mut lo, mut hi) = (1usize, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if ntok(mid) <= target {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let text = words[..lo].join(" ");
    let ids = tok.encode(&text, true, true);
    (text, ids)
}

/// User + system CPU seconds of every waited-for child so far (getrusage RUSAGE_CHILDREN).
fn children_cpu_seconds() -> Option<f64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which is valid and aligned; the
    // zeroed value is a valid rusage even if it wrote nothing.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised above and filled by a successful getrusage.
    let ru = unsafe { ru.assume_init() };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    Some(t(ru.ru_utime) + t(ru.ru_stime))
}

/// Outcome of one child process.
struct ChildRun {
    ok: bool,
    /// The child's CPU seconds per wall second: well below its thread count means it was
    /// waiting for cores (a shared machine) or for I/O.
    cpu_per_wall: Option<f64>,
    stdout: String,
    stderr_tail: String,
    thermal: ThermalReport,
}

fn run_child(mut cmd: Command, timeout: Duration, watch_gpus: bool) -> Result<ChildRun> {
    let dir = std::env::temp_dir();
    let err_path = dir.join(format!("flea-bench-{}.stderr", std::process::id()));
    let out_path = dir.join(format!("flea-bench-{}.stdout", std::process::id()));
    let err_file = std::fs::File::create(&err_path)?;
    let out_file = std::fs::File::create(&out_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(err_file));
    let watch = Watch::start(Duration::from_millis(500), watch_gpus);
    let cpu0 = children_cpu_seconds();
    let mut child = cmd.spawn().context("starting a benchmark child")?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu_per_wall = match (cpu0, children_cpu_seconds()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
        _ => None,
    };
    let thermal = watch.stop();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    let _ = std::fs::remove_file(&out_path);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    let mut stderr_tail: String = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
    match status {
        None => stderr_tail = format!("killed after {} s; {stderr_tail}", timeout.as_secs()),
        // A child killed by a signal (a crash, the OOM killer) often writes nothing: say how
        // it ended rather than leave the reason empty.
        Some(s) if !s.success() => {
            stderr_tail = if stderr_tail.is_empty() {
                format!("{s}, no output on stderr")
            } else {
                format!("{s}: {stderr_tail}")
            }
        }
        Some(_) => {}
    }
    Ok(ChildRun {
        ok: status.is_some_and(|s| s.success()),
        cpu_per_wall,
        stdout,
        stderr_tail,
        thermal,
    })
}

/// The llama.cpp side: which Python, and what the embedded script says about it.
struct Llama {
    python: String,
    script: PathBuf,
    info: Value,
}

impl Llama {
    fn available(&self) -> bool {
        self.info["importable"].as_bool() == Some(true)
    }
    fn version(&self) -> String {
        format!(
            "llama.cpp {} (llama-cpp-python {})",
            self.info["llama_cpp_commit"].as_str().unwrap_or("unknown"),
            self.info["llama_cpp_python"].as_str().unwrap_or("?")
        )
    }
}

fn llama_setup(cfg: &Config, dir: &Path) -> Result<Option<Llama>> {
    if cfg.baseline != Baseline::LlamaCpp {
        return Ok(None);
    }
    let python = cfg
        .python
        .clone()
        .or_else(|| std::env::var("FLEA_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let script = dir.join("bench_llama.py");
    std::fs::write(&script, LLAMA_SCRIPT)
        .with_context(|| format!("writing {}", script.display()))?;
    let info = match Command::new(&python).arg(&script).arg("info").output() {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_else(
            |e| json!({"importable": false, "error": format!("bad output from {python}: {e}")}),
        ),
        Ok(o) => {
            json!({"importable": false, "error": format!("{python} failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""))})
        }
        Err(e) => json!({"importable": false, "error": format!("cannot run {python}: {e}")}),
    };
    Ok(Some(Llama {
        python,
        script,
        info,
    }))
}

/// llama.cpp's `n_gpu_layers` for a device budget: the most layers (llama.cpp offloads the
/// last ones) whose weights and F16 KV cache fit; -1 (all) without a budget.
fn n_gpu_layers(layer_bytes: &[u64], kv_dim: usize, budget: Option<u64>, n_ctx: usize) -> i64 {
    let Some(b) = budget else { return -1 };
    // K and V, F16, for every position of the context.
    let kv_per_layer = (2 * n_ctx * kv_dim * 2) as u64;
    let mut used = 0u64;
    let mut n = 0i64;
    for bytes in layer_bytes.iter().rev() {
        used += bytes + kv_per_layer;
        if used > b {
            break;
        }
        n += 1;
    }
    n
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!(v))
}

pub fn run(a: BenchArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| anyhow!("{}: not UTF-8", a.config.display()))?;
    let cfg = Config::parse(&text, &a.config.display().to_string())?;
    let hash = config_hash(&bytes);
    let cases = cfg.cases();
    if a.dry_run {
        for c in &cases {
            println!(
                "{} {} threads={} vram={} ram={} io={} prompt={} gen={} batch={}",
                cfg.models[c.model].name,
                c.device.0,
                c.threads.0.map_or("all".into(), |t| t.to_string()),
                c.vram.label(),
                c.ram.label(),
                c.io.label(),
                c.prompt_tokens,
                c.gen_tokens,
                c.batch
            );
        }
        println!("{} cases ({hash})", cases.len());
        return Ok(());
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-out").join(&cfg.name));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let synth_dir = cfg
        .synth_dir
        .as_deref()
        .map(expand_home)
        .unwrap_or_else(default_synth_dir);
    let exe = std::env::current_exe().context("finding the flea binary")?;
    // Scratch files (prompt ids, per-run stats, the llama.cpp script), removed at the end.
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let llama = llama_setup(&cfg, &tmp)?;
    let date = utc_now();
    let commit = env!("FLEA_GIT_COMMIT");
    let uses_gpu = cases.iter().any(|c| c.device.gpu_index().is_some());

    let mut prepared: Vec<Option<Prepared>> = Vec::new();
    for m in &cfg.models {
        prepared.push(Some(prepare_model(m, &synth_dir)?));
    }
    let first_model = prepared.iter().flatten().next().map(|p| p.path.clone());
    let hardware = hw::identify(first_model.as_deref());
    std::fs::write(
        out.join("hardware.json"),
        serde_json::to_string_pretty(&hardware)?,
    )?;

    let runs_per_case = cfg.warmup.0 + cfg.repeats.0;
    let engines = if llama.as_ref().is_some_and(Llama::available) {
        2
    } else {
        1
    };
    let bar = indicatif::ProgressBar::new((cases.len() * runs_per_case * engines) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let jsonl_path = out.join("results.jsonl");
    let mut lines: Vec<Value> = Vec::with_capacity(cases.len());
    for (ci, case) in cases.iter().enumerate() {
        let Some(model) = prepared.get(case.model).and_then(Option::as_ref) else {
            bail!("internal: model {} not prepared", case.model);
        };
        bar.set_message(format!(
            "{} {}",
            cfg.models[case.model].name,
            case_label(case)
        ));
        let line = run_case(
            &cfg,
            case,
            ci,
            model,
            &exe,
            llama.as_ref(),
            &tmp,
            &out,
            &bar,
            &hardware,
        )?;
        let mut line = line;
        let done = format!(
            "case {}/{}: {} {}: flea {} tok/s, llama.cpp {} tok/s{}",
            ci + 1,
            cases.len(),
            cfg.models[case.model].name,
            case_label(case),
            fmt_opt(&line["optimized_tokens_per_sec"], 2),
            fmt_opt(&line["baseline_tokens_per_sec"], 2),
            line["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        if bar.is_hidden() {
            eprintln!("bench: {done}");
        } else {
            bar.println(done);
        }
        line["config"] = json!(cfg.name);
        line["config_hash"] = json!(hash);
        line["flea_commit"] = json!(commit);
        line["date"] = json!(date);
        lines.push(line);
        // Rewrite the whole file after each case so an interrupted matrix keeps its results.
        let body: String = lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap_or_default() + "\n")
            .collect();
        std::fs::write(&jsonl_path, body)
            .with_context(|| format!("writing {}", jsonl_path.display()))?;
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmp);
    let summary = summary_table(
        &cfg,
        &lines,
        &hardware,
        &date,
        llama.as_ref(),
        &hash,
        uses_gpu,
    );
    std::fs::write(out.join("summary.md"), &summary)?;
    write_charts(&cfg, &cases, &lines, &out)?;
    print!("{summary}");
    eprintln!(
        "wrote {} and summary.md in {}",
        jsonl_path.display(),
        out.display()
    );
    Ok(())
}

fn case_label(c: &Case) -> String {
    format!(
        "{} t={} vram={} ram={} io={} p={} g={} b={}",
        c.device.0,
        c.threads.0.map_or("all".into(), |t| t.to_string()),
        c.vram.label(),
        c.ram.label(),
        c.io.label(),
        c.prompt_tokens,
        c.gen_tokens,
        c.batch
    )
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    cfg: &Config,
    case: &Case,
    ci: usize,
    model: &Prepared,
    exe: &Path,
    llama: Option<&Llama>,
    tmp: &Path,
    out: &Path,
    bar: &indicatif::ProgressBar,
    hardware: &Hardware,
) -> Result<Value> {
    let n_ctx = cfg.ctx_for(case);
    let threads = case.threads.0.unwrap_or_else(default_threads);
    let (prompt_text, prompt_ids) = prompt_for(&model.tokenizer, case.prompt_tokens);
    let ids_file = tmp.join(format!("case{ci}-prompt.json"));
    std::fs::write(&ids_file, serde_json::to_string(&prompt_ids)?)?;
    let gpu = case.device.gpu_index();
    let timeout = Duration::from_secs(cfg.timeout_s.get() as u64);
    let idle = cfg.wait_idle.map(|w| w.0);
    let idle_max = Duration::from_secs(cfg.wait_idle_max_s.get() as u64);
    wait_idle(idle, idle_max);
    let loadavg_before = loadavg();

    // flea: warm-ups, then the timed repeats (the last one also traces when asked).
    let mut flea_runs: Vec<Value> = Vec::new();
    let mut thermal: Vec<ThermalReport> = Vec::new();
    let mut flea_cpu: Vec<f64> = Vec::new();
    let mut error: Option<String> = None;
    let trace_svg = out.join(format!("timeline-{ci:03}.svg"));
    let total = cfg.warmup.0 + cfg.repeats.0;
    for r in 0..total {
        let stats = tmp.join(format!("case{ci}-run{r}.json"));
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg("-m")
            .arg(&model.path)
            .arg("-p")
            .arg(&prompt_text)
            .args(["-n", &case.gen_tokens.to_string()])
            .args(["--temp", "0", "--ignore-eos"])
            .args(["-t", &threads.to_string()])
            .args(["-c", &n_ctx.to_string()])
            .args(["-b", &case.batch.to_string()])
            .args(["--device", &case.device.0])
            .args(["--io", &case.io.backend.to_string()])
            .arg("--stats-json")
            .arg(&stats);
        if !case.io.direct {
            cmd.arg("--no-direct");
        }
        if let Some(b) = case.vram.0 {
            cmd.args(["--vram-budget", &b.to_string()]);
        }
        if let Some(b) = case.ram.0 {
            cmd.args(["--ram-budget", &b.to_string()]);
        }
        if cfg.trace && r + 1 == total {
            cmd.arg("--trace").arg(&trace_svg);
        }
        wait_idle(idle, idle_max);
        let run = run_child(cmd, timeout, gpu.is_some())?;
        bar.inc(1);
        if !run.ok {
            error = Some(format!("flea run failed: {}", run.stderr_tail));
            break;
        }
        if r < cfg.warmup.0 {
            continue;
        }
        let Some(j) = std::fs::read_to_string(&stats)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        else {
            // A failure of one case is recorded in its line; the matrix goes on.
            error = Some(format!("flea run wrote no readable {}", stats.display()));
            break;
        };
        flea_runs.push(j);
        thermal.push(run.thermal);
        flea_cpu.extend(run.cpu_per_wall);
    }
    let decode: Vec<f64> = flea_runs
        .iter()
        .filter_map(|j| f(&j["decode_tokens_per_sec"]))
        .collect();
    let prompt: Vec<f64> = flea_runs
        .iter()
        .filter_map(|j| f(&j["prompt_tokens_per_sec"]))
        .collect();
    let rss: Vec<f64> = flea_runs
        .iter()
        .filter_map(|j| f(&j["peak_rss_bytes"]))
        .collect();
    let first = flea_runs.first().cloned().unwrap_or(Value::Null);
    if let Some(n) = first["prompt_tokens"].as_u64() {
        if n as usize != prompt_ids.len() && error.is_none() {
            error = Some(format!(
                "flea tokenized the prompt to {n} tokens, the harness to {}",
                prompt_ids.len()
            ));
        }
    }
    let res = &first["residency"];
    let floor_s = f(&res["plan"]["floor_seconds_per_token"]).filter(|s| *s > 0.0);
    let floor_tps = floor_s.map(|s| 1.0 / s);
    let flea_decode = median(&decode);
    // VRAM: the device-tier arena's peak (on the CPU backend that arena is host RAM); a GPU
    // run without residency stats: the most GPU memory nvidia-smi saw in use.
    let device_peak: Vec<f64> = flea_runs
        .iter()
        .filter_map(|j| f(&j["residency"]["arenas"]["device"]["peak"]))
        .collect();
    let vram_peak_mb = match (median(&device_peak), gpu) {
        (Some(b), _) => Some(b / (1 << 20) as f64),
        (None, Some(g)) => thermal
            .iter()
            .filter_map(|t| t.gpu_memory_used_peak_mib.get(g).map(|m| *m as f64))
            .fold(None, |a: Option<f64>, m| Some(a.map_or(m, |a| a.max(m)))),
        (None, None) => None,
    };

    // llama.cpp: same ids, same threads; n_gpu_layers from the device budget.
    let mut base_decode = Vec::new();
    let mut base_prompt = Vec::new();
    let mut base_ids: Option<Vec<u64>> = None;
    let mut base_cpu: Vec<f64> = Vec::new();
    let ngl = if gpu.is_some() {
        n_gpu_layers(&model.layer_bytes, model.cfg.kv_dim(), case.vram.0, n_ctx)
    } else {
        0
    };
    let mut baseline_note: Option<String> = None;
    match llama {
        None => baseline_note = Some("no baseline in this config".into()),
        Some(l) if !l.available() => {
            baseline_note = Some(format!(
                "llama-cpp-python not importable with {}: {}",
                l.python,
                l.info["error"].as_str().unwrap_or("?")
            ))
        }
        Some(l) if gpu.is_some() && l.info["gpu_offload"].as_bool() != Some(true) => {
            baseline_note = Some(
                "this llama-cpp-python is a CPU build (no GPU offload): no GPU baseline".into(),
            );
            bar.inc(total as u64);
        }
        Some(l) => {
            for r in 0..total {
                let mut cmd = Command::new(&l.python);
                cmd.arg(&l.script)
                    .arg("run")
                    .arg("--model")
                    .arg(&model.path)
                    .arg("--prompt-ids")
                    .arg(&ids_file)
                    .args(["--threads", &threads.to_string()])
                    .args(["--gen", &case.gen_tokens.to_string()])
                    .args(["--n-ctx", &n_ctx.to_string()])
                    .args(["--n-gpu-layers", &ngl.to_string()])
                    .args(["--batch", &case.batch.to_string()]);
                wait_idle(idle, idle_max);
                let run = run_child(cmd, timeout, gpu.is_some())?;
                bar.inc(1);
                if !run.ok {
                    baseline_note = Some(format!("llama.cpp run failed: {}", run.stderr_tail));
                    break;
                }
                if r < cfg.warmup.0 {
                    continue;
                }
                base_cpu.extend(run.cpu_per_wall);
                let j: Value = match serde_json::from_str(run.stdout.trim()) {
                    Ok(j) => j,
                    Err(e) => {
                        baseline_note = Some(format!("unreadable llama.cpp output: {e}"));
                        break;
                    }
                };
                base_decode.extend(f(&j["decode_tokens_per_sec"]));
                base_prompt.extend(f(&j["prompt_tokens_per_sec"]));
                if base_ids.is_none() {
                    base_ids = j["generated_ids"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect());
                }
            }
        }
    }

    if baseline_note.is_some() {
        // A baseline that failed part-way reports nothing rather than a partial median.
        base_decode.clear();
        base_prompt.clear();
    }

    // Correctness: llama.cpp, teacher-forced on flea's greedy tokens.
    let flea_ids: Vec<u64> = first["generated_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let correctness = match (llama, &baseline_note) {
        _ if !cfg.correctness => "not checked (correctness: false)".to_string(),
        _ if flea_ids.is_empty() => "not checked (flea produced no tokens)".to_string(),
        (Some(l), None) => correctness_check(
            l,
            model,
            &ids_file,
            &flea_ids,
            threads,
            n_ctx,
            ngl,
            tmp,
            ci,
            timeout,
            base_ids.as_deref(),
        )?,
        (_, Some(why)) => format!("not checked ({why})"),
        (None, None) => "not checked".to_string(),
    };

    let base = median(&base_decode);
    let base_p = median(&base_prompt);
    let flea_p = median(&prompt);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let flagged = thermal.iter().any(|t| t.flagged);
    let notes: Vec<String> = thermal.iter().flat_map(|t| t.notes.clone()).collect();
    let gpu_name = match gpu {
        Some(g) => hardware.gpus.iter().find(|x| x.index == g).map_or(
            format!("cuda:{g} (not listed by nvidia-smi)"),
            |x| {
                format!(
                    "{}{}",
                    x.name,
                    x.memory_mib
                        .map(|m| format!(" {}GB", (m as f64 / 1024.0).round()))
                        .unwrap_or_default()
                )
            },
        ),
        None => format!("none (CPU run: {}, {threads} threads)", hardware.cpu),
    };
    let efficiency = match (flea_decode, floor_tps) {
        (Some(d), Some(fl)) if fl > 0.0 => Some(d / fl),
        _ => None,
    };
    Ok(json!({
        "gpu": gpu_name,
        "nvme": hw::disk_of(&model.path).map_or("unknown".into(), |d| format!("{} ({})", d.model, d.device)),
        "model": model.label,
        "baseline_tokens_per_sec": opt(base),
        "optimized_tokens_per_sec": opt(flea_decode),
        "vram_peak_mb": opt(vram_peak_mb),
        "correctness": correctness,
        "prompt_tokens_per_sec": opt(flea_p),
        "baseline_prompt_tokens_per_sec": opt(base_p),
        "decode_ratio_vs_baseline": opt(ratio(flea_decode, base)),
        "prompt_ratio_vs_baseline": opt(ratio(flea_p, base_p)),
        "host_rss_peak_mb": opt(median(&rss).map(|b| b / (1 << 20) as f64)),
        "floor_tokens_per_sec": opt(floor_tps),
        "floor_link": res["plan"]["floor_link"].clone(),
        "efficiency": opt(efficiency),
        "thermal": {
            "flagged": flagged,
            "notes": notes,
            "runs": thermal,
        },
        "baseline": {
            "engine": llama.filter(|l| l.available()).map(|l| l.version()),
            "n_gpu_layers": if llama.is_some() { json!(ngl) } else { Value::Null },
            "note": baseline_note,
        },
        "case": {
            "device": case.device.0,
            "threads": threads,
            "vram_budget": case.vram.label(),
            "ram_budget": case.ram.label(),
            "io": case.io.label(),
            "prompt_tokens": prompt_ids.len(),
            "gen_tokens": case.gen_tokens,
            "batch": case.batch,
            "ctx": n_ctx,
        },
        "repeats": cfg.repeats.0,
        "warmup": cfg.warmup.0,
        "runs": {
            "flea_decode_tokens_per_sec": decode,
            "flea_prompt_tokens_per_sec": prompt,
            "baseline_decode_tokens_per_sec": base_decode,
            "baseline_prompt_tokens_per_sec": base_prompt,
        },
        "residency": {
            "read_gbps": res["read_gbps"].clone(),
            "ring_depth": res["plan"]["ring_depth"].clone(),
            "pass_bytes": res["plan"]["pass_bytes"].clone(),
            "stall_seconds": res["stream"]["stall_seconds"].clone(),
            "links": res["plan"]["links"].clone(),
        },
        "timeline_svg": if cfg.trace && trace_svg.exists() { json!(trace_svg.file_name().map(|n| n.to_string_lossy().into_owned())) } else { Value::Null },
        "cpu": hardware.cpu,
        "cpu_per_wall": {"flea": opt(median(&flea_cpu)), "baseline": opt(median(&base_cpu))},
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "error": error,
    }))
}

#[allow(clippy::too_many_arguments)]
fn correctness_check(
    l: &Llama,
    model: &Prepared,
    ids_file: &Path,
    flea_ids: &[u64],
    threads: usize,
    n_ctx: usize,
    ngl: i64,
    tmp: &Path,
    ci: usize,
    timeout: Duration,
    base_ids: Option<&[u64]>,
) -> Result<String> {
    let gen_file = tmp.join(format!("case{ci}-flea-gen.json"));
    std::fs::write(&gen_file, serde_json::to_string(flea_ids)?)?;
    let mut cmd = Command::new(&l.python);
    cmd.arg(&l.script)
        .arg("check")
        .arg("--model")
        .arg(&model.path)
        .arg("--prompt-ids")
        .arg(ids_file)
        .arg("--gen-ids")
        .arg(&gen_file)
        .args(["--threads", &threads.to_string()])
        .args(["--n-ctx", &n_ctx.to_string()])
        .args(["--n-gpu-layers", &ngl.to_string()]);
    let run = run_child(cmd, timeout, false)?;
    if !run.ok {
        return Ok(format!("check failed: {}", run.stderr_tail));
    }
    let j: Value = match serde_json::from_str(run.stdout.trim()) {
        Ok(j) => j,
        Err(e) => return Ok(format!("check failed: unreadable output: {e}")),
    };
    let (agree, n) = (
        j["top1_agree"].as_u64().unwrap_or(0),
        j["positions"].as_u64().unwrap_or(0),
    );
    let greedy = match base_ids {
        Some(b) => {
            let same = b.iter().zip(flea_ids).take_while(|(a, b)| a == b).count();
            if same == flea_ids.len() && b.len() == flea_ids.len() {
                format!("; greedy continuations identical ({same} tokens)")
            } else {
                format!(
                    "; greedy continuations agree for {same} of {} tokens",
                    flea_ids.len()
                )
            }
        }
        None => String::new(),
    };
    let worst = if agree < n {
        format!(
            " (largest llama.cpp logit gap at a disagreement: {:.3})",
            j["worst_margin"].as_f64().unwrap_or(f64::NAN)
        )
    } else {
        String::new()
    };
    Ok(format!(
        "validated vs {}: teacher-forced top-1 agreement {agree}/{n} on flea's greedy tokens{worst}{greedy}",
        l.version()
    ))
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "—".into(),
    }
}

fn summary_table(
    cfg: &Config,
    lines: &[Value],
    hw: &Hardware,
    date: &str,
    llama: Option<&Llama>,
    hash: &str,
    uses_gpu: bool,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# flea bench: {} ({date}, flea {}, config {hash})\n",
        cfg.name,
        env!("FLEA_GIT_COMMIT")
    );
    if !cfg.description.trim().is_empty() {
        let _ = writeln!(s, "{}\n", cfg.description.trim());
    }
    let _ = writeln!(
        s,
        "Machine: {} ({} logical CPUs, {:.1} GiB RAM); GPUs: {}; model disk: {}. Medians of {} runs after {} warm-up.\n",
        hw.cpu,
        hw.logical_cpus,
        hw.ram_bytes as f64 / (1u64 << 30) as f64,
        hw.gpu_line(),
        hw.disk_line(),
        cfg.repeats.0,
        cfg.warmup.0
    );
    match llama {
        Some(l) if l.available() => {
            let _ = writeln!(s, "Baseline: {}.\n", l.version());
        }
        Some(l) => {
            let _ = writeln!(
                s,
                "Baseline: none — llama-cpp-python is not importable with `{}` ({}).\n",
                l.python,
                l.info["error"].as_str().unwrap_or("?")
            );
        }
        None => {
            let _ = writeln!(s, "Baseline: none (baseline: none in the config).\n");
        }
    }
    let _ = writeln!(
        s,
        "| model | device | threads | vram | ram | io | prompt tok | flea prompt tok/s | llama.cpp prompt tok/s | ratio | flea decode tok/s | llama.cpp decode tok/s | ratio | floor tok/s (link) | efficiency | {} peak MiB | RSS MiB | CPUs used flea / llama.cpp | load before | thermal |",
        if uses_gpu { "VRAM" } else { "device arena" }
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for l in lines {
        let c = &l["case"];
        let thermal = if l["thermal"]["flagged"].as_bool() == Some(true) {
            "⚠ clocks dropped"
        } else {
            "ok"
        };
        let err = l["error"]
            .as_str()
            .map(|e| format!(" ⚠ {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} / {} | {} | {}{} |",
            l["model"].as_str().unwrap_or(""),
            c["device"].as_str().unwrap_or(""),
            c["threads"],
            c["vram_budget"].as_str().unwrap_or(""),
            c["ram_budget"].as_str().unwrap_or(""),
            c["io"].as_str().unwrap_or(""),
            c["prompt_tokens"],
            fmt_opt(&l["prompt_tokens_per_sec"], 1),
            fmt_opt(&l["baseline_prompt_tokens_per_sec"], 1),
            fmt_opt(&l["prompt_ratio_vs_baseline"], 2),
            fmt_opt(&l["optimized_tokens_per_sec"], 2),
            fmt_opt(&l["baseline_tokens_per_sec"], 2),
            fmt_opt(&l["decode_ratio_vs_baseline"], 2),
            fmt_opt(&l["floor_tokens_per_sec"], 1),
            l["floor_link"].as_str().unwrap_or("—"),
            fmt_opt(&l["efficiency"], 2),
            fmt_opt(&l["vram_peak_mb"], 0),
            fmt_opt(&l["host_rss_peak_mb"], 0),
            fmt_opt(&l["cpu_per_wall"]["flea"], 2),
            fmt_opt(&l["cpu_per_wall"]["baseline"], 2),
            l["loadavg_before"].as_str().unwrap_or(""),
            thermal,
            err
        );
    }
    let _ = writeln!(
        s,
        "\nflea decode tok/s ÷ floor tok/s = efficiency (the floor: bytes each link carries per token ÷ its speed from the hardware profile, `flea probe`). {} peak: the arena compute reads weights from{}. CPUs used: each child's CPU seconds per wall second, model load included; far below the thread count means it waited for cores (a shared machine) or for I/O.\n",
        if uses_gpu { "VRAM" } else { "Device arena" },
        if uses_gpu { " (or nvidia-smi's peak for runs without residency stats)" } else { " (on the CPU backend, host RAM)" }
    );
    for l in lines {
        let _ = writeln!(
            s,
            "- {} {} vram={}: correctness: {}",
            l["model"].as_str().unwrap_or(""),
            l["case"]["device"].as_str().unwrap_or(""),
            l["case"]["vram_budget"].as_str().unwrap_or(""),
            l["correctness"].as_str().unwrap_or("")
        );
    }
    if !cfg.prices.is_empty() {
        let _ = writeln!(
            s,
            "\nCost per million generated tokens (decode speed above; one stream, the whole machine's price):\n"
        );
        let _ = writeln!(
            s,
            "| model | device | vram | price | flea $/Mtok | llama.cpp $/Mtok |"
        );
        let _ = writeln!(s, "|---|---|---|---|---:|---:|");
        for l in lines {
            for p in &cfg.prices {
                let cost = |v: &Value| {
                    v.as_f64()
                        .filter(|t| *t > 0.0)
                        .map_or("—".to_string(), |t| {
                            format!("{:.2}", p.usd_per_hour.0 / (t * 3600.0) * 1e6)
                        })
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} (${}/h) | {} | {} |",
                    l["model"].as_str().unwrap_or(""),
                    l["case"]["device"].as_str().unwrap_or(""),
                    l["case"]["vram_budget"].as_str().unwrap_or(""),
                    p.label,
                    p.usd_per_hour.0,
                    cost(&l["optimized_tokens_per_sec"]),
                    cost(&l["baseline_tokens_per_sec"])
                );
            }
        }
    }
    s
}

/// One chart per model × device × threads × io × ram × prompt × gen × batch group that has
/// more than one VRAM budget: decode tok/s of flea and llama.cpp against the budget, with
/// the floor.
fn write_charts(cfg: &Config, cases: &[Case], lines: &[Value], out: &Path) -> Result<()> {
    if cfg.vram_budgets.len() < 2 {
        return Ok(());
    }
    let per = cfg.vram_budgets.len();
    let xs: Vec<String> = cfg.vram_budgets.iter().map(|b| b.label()).collect();
    for (g, chunk) in lines.chunks(per).enumerate() {
        let Some(c) = cases.get(g * per) else { break };
        let col =
            |key: &str| -> Vec<Option<f64>> { chunk.iter().map(|l| l[key].as_f64()).collect() };
        let series = vec![
            chart::Series {
                name: "flea".into(),
                color: "#59a14f",
                dashed: false,
                values: col("optimized_tokens_per_sec"),
            },
            chart::Series {
                name: "llama.cpp".into(),
                color: "#4e79a7",
                dashed: false,
                values: col("baseline_tokens_per_sec"),
            },
            chart::Series {
                name: "floor (flea plan)".into(),
                color: "#e15759",
                dashed: true,
                values: col("floor_tokens_per_sec"),
            },
        ];
        let title = format!(
            "{}: decode tok/s vs device budget",
            chunk
                .first()
                .and_then(|l| l["model"].as_str())
                .unwrap_or("")
        );
        let sub = format!(
            "{}, {} threads, ram {}, {}, prompt {}, gen {} | config {} | flea {}",
            c.device.0,
            c.threads.0.map_or("all".into(), |t| t.to_string()),
            c.ram.label(),
            c.io.label(),
            c.prompt_tokens,
            c.gen_tokens,
            cfg.name,
            env!("FLEA_GIT_COMMIT")
        );
        // A series without any value (no baseline) is left out of the chart and its legend.
        let series: Vec<chart::Series> = series
            .into_iter()
            .filter(|s| s.values.iter().any(Option::is_some))
            .collect();
        let svg = chart::tok_s_vs_budget(&title, &sub, &xs, &series);
        let path = out.join(format!("budget-chart-{g:02}.svg"));
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_gpu_layers_fits_weights_and_kv_in_the_budget() {
        // 4 layers of 100 bytes; KV per layer at n_ctx 2, kv_dim 5: 2 * 2 * 5 * 2 = 40 bytes.
        let layers = [100u64; 4];
        assert_eq!(n_gpu_layers(&layers, 5, None, 2), -1);
        assert_eq!(n_gpu_layers(&layers, 5, Some(139), 2), 0);
        assert_eq!(n_gpu_layers(&layers, 5, Some(140), 2), 1);
        assert_eq!(n_gpu_layers(&layers, 5, Some(419), 2), 2);
        assert_eq!(n_gpu_layers(&layers, 5, Some(1 << 30), 2), 4);
    }

    #[test]
    fn prompts_are_the_longest_prefix_within_the_target() {
        let path =
            std::env::temp_dir().join(format!("flea-bench-prompt-{}.gguf", std::process::id()));
        flea_synth::write_synthetic(
            &path,
            &flea_synth::SynthOptions::new(flea_synth::Preset::Tiny),
        )
        .expect("tiny model");
        let f = flea_gguf::GgufFile::open(&path).expect("open");
        let tok = flea_tokenizer::Tokenizer::from_gguf(&f.header).expect("tokenizer");
        for target in [8usize, 33, 200] {
            let (text, ids) = prompt_for(&tok, target);
            assert!(ids.len() <= target, "{} > {target}", ids.len());
            assert_eq!(ids, tok.encode(&text, true, true));
            // One more word would pass the target.
            let n_words = text.split(' ').count();
            let longer: Vec<&str> = PASSAGE.split(' ').cycle().take(n_words + 1).collect();
            assert!(tok.encode(&longer.join(" "), true, true).len() > target);
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn medians_and_hashes() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_ne!(config_hash(b"a: 1"), config_hash(b"a: 2"));
        assert!(config_hash(b"").starts_with("fnv1a64:"));
    }
}
