//! `flea`: run, inspect and score GGUF language models.

mod bench;
mod hw;
mod probe;
mod residency;

use flea_server::template;
use residency::{ResidencyArgs, Runner};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flea_model::{Backend, CpuBackend, Logits, Model, Sampler, SamplerConfig};
use flea_tokenizer::Utf8Stream;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "flea",
    version,
    about = "Run large language models by transient residency"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Chat interactively using the model's chat template.
    Chat(ChatArgs),
    /// Serve the OpenAI API (chat and text completions) with batched decoding.
    Serve(ServeArgs),
    /// Show a model's metadata, tensors and bytes per layer.
    Info {
        /// The GGUF file.
        model: PathBuf,
        /// Print every tensor (default: layer 0 and the global tensors).
        #[arg(long)]
        all_tensors: bool,
    },
    /// Print the token ids of a text as JSON.
    Tokenize {
        #[arg(short, long)]
        model: PathBuf,
        text: String,
        /// Do not add BOS/EOS even if the model asks for them.
        #[arg(long)]
        no_special: bool,
        /// Treat special-token text (e.g. <|im_start|>) as plain text.
        #[arg(long)]
        no_parse_special: bool,
    },
    /// Write float32 logits as .npy of shape [positions, vocab].
    Logits(LogitsArgs),
    /// Show where each layer would live under the given budgets, and the predicted speed.
    Plan(PlanArgs),
    /// Measure disk, memory (and GPU) bandwidth and save the hardware profile the planner uses.
    Probe(probe::ProbeArgs),
    /// Run a benchmark matrix from a YAML config; JSON lines, a summary table and SVG charts.
    Bench(bench::BenchArgs),
    /// Write a synthetic GGUF model (random quantized weights in standard shapes).
    Synth(flea_synth::SynthArgs),
    /// Rewrite a GGUF so that each layer's tensors are contiguous and 4 KiB aligned.
    Repack(flea_synth::RepackArgs),
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// The GGUF model file.
    #[arg(short, long)]
    model: PathBuf,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Context size in tokens (default: min(4096, the model's)).
    #[arg(short = 'c', long)]
    ctx: Option<usize>,
    /// Most prompt tokens per weight pass (default: 512; on a GPU without --vram-budget, 2048:
    /// each pass dequantizes every weight for its matrix products, so long prompts read ~1.4x
    /// faster, for ~0.6 GiB more activations on a 13B).
    #[arg(short = 'b', long)]
    batch: Option<usize>,
    /// Compute device: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    residency: ResidencyArgs,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The prompt (special-token text like <|im_start|> is parsed).
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Write timing statistics as JSON.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long, default_value_t = 512)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to bind (loopback by default; anything else exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences decoded together: KV cache slots, each of --ctx positions (default 2048).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Requests that may wait for a slot; more get 503.
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// Threads that sample a step's sequences (0: on a GPU half the cores, at most 8; on
    /// the CPU 1, whose cores compute the next step).
    #[arg(long, default_value_t = 0)]
    sample_threads: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// The model name clients pass (default: the file name without .gguf).
    #[arg(long)]
    model_id: Option<String>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Text to score (tokenized with special tokens parsed and BOS per the model).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: Option<String>,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
    /// Logits of every position (default: the last).
    #[arg(long)]
    all_positions: bool,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Chat(a) => cmd_chat(a),
        Cmd::Serve(a) => cmd_serve(a),
        Cmd::Info { model, all_tensors } => cmd_info(&model, all_tensors),
        Cmd::Tokenize {
            model,
            text,
            no_special,
            no_parse_special,
        } => cmd_tokenize(&model, &text, !no_special, !no_parse_special),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Plan(a) => cmd_plan(a),
        Cmd::Probe(a) => probe::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Synth(a) => flea_synth::run_synth(a).map_err(anyhow::Error::from),
        Cmd::Repack(a) => flea_synth::run_repack(a).map_err(anyhow::Error::from),
    };
    if let Err(e) = r {
        // One line: the chain of causes.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}

fn load(path: &Path) -> Result<Model> {
    Model::load(path).with_context(|| format!("loading {}", path.display()))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Engine {
    model: Model,
    backend: CpuBackend,
    #[cfg(feature = "cuda")]
    cuda: Option<flea_cuda::CudaBackend>,
    n_ctx: usize,
    batch: usize,
}

/// `cpu` → None, `cuda` → Some(0), `cuda:N` → Some(N).
fn parse_device(d: &str) -> Result<Option<usize>> {
    match d {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => bail!("bad --device '{d}' (cpu, cuda or cuda:N)"),
        },
    }
}

/// `--batch`'s default on the CPU and under a VRAM budget (where activations take room from
/// resident layers), and on a GPU without one (docs/BENCHMARKS.md, "prompt attention on
/// tensor cores": a 13B's 4k-token prompt 10.2k -> 14.4k tok/s on an H200).
const PROMPT_BATCH: usize = 512;
const PROMPT_BATCH_GPU: usize = 2048;

impl EngineArgs {
    /// Most prompt tokens per weight pass: `--batch`, or its default for the device.
    fn prompt_batch(&self) -> usize {
        let gpu = matches!(parse_device(&self.device), Ok(Some(_)));
        let default = if gpu && self.residency.vram_budget.is_none() {
            PROMPT_BATCH_GPU
        } else {
            PROMPT_BATCH
        };
        self.batch.unwrap_or(default).max(1)
    }
}

impl Engine {
    fn new(a: &EngineArgs) -> Result<Engine> {
        let gpu = parse_device(&a.device)?;
        #[cfg(not(feature = "cuda"))]
        if gpu.is_some() {
            bail!("this flea was built without CUDA support (rebuild with `cargo build --release --features cuda`)");
        }
        #[cfg(feature = "cuda")]
        let cuda = match gpu {
            Some(n) => Some(
                flea_cuda::CudaBackend::new(n)
                    .map_err(|e| anyhow!("--device {}: {e}", a.device))?,
            ),
            None => None,
        };
        let model = load(&a.model)?;
        let backend = CpuBackend::new(a.threads.unwrap_or_else(default_threads))?;
        let n_ctx = a.ctx.unwrap_or_else(|| model.cfg.n_ctx_train.min(4096));
        Ok(Engine {
            model,
            backend,
            #[cfg(feature = "cuda")]
            cuda,
            n_ctx,
            batch: a.prompt_batch(),
        })
    }
    /// What computes: the CPU backend or the GPU.
    fn backend_name(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            return c.name();
        }
        self.backend.name()
    }

    /// Per-kernel GPU time (FLEA_CUDA_PROFILE set, a CUDA run) and per-operation CPU time
    /// (FLEA_CPU_PROFILE set: a CPU run, or a hybrid run's CPU layers) since the last call.
    fn print_profiles(&self, phase: &str) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            if let Some(r) = c.profile_report().map_err(|e| anyhow!("{e}"))? {
                eprint!("{phase}: {r}");
            }
        }
        if let Some(r) = self.backend.profile_report() {
            eprint!("{phase}: {r}");
        }
        Ok(())
    }

    /// The model under the residency flags, with a KV cache of `n_seq` sequence slots.
    fn runner(&self, a: &EngineArgs, n_seq: usize) -> Result<Runner<'_>> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return Runner::new_cuda(
                &self.model,
                cuda,
                &self.backend,
                &a.model,
                &a.residency,
                self.n_ctx,
                self.batch,
                n_seq,
            );
        }
        Runner::new(
            &self.model,
            &self.backend,
            &a.model,
            &a.residency,
            self.n_ctx,
            self.batch,
            n_seq,
        )
    }
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let eng = Engine::new(&a.engine)?;
    let tok = &eng.model.tokenizer;
    let prompt = tok.encode(&a.prompt, true, true);
    if prompt.is_empty() {
        bail!("the prompt tokenized to nothing");
    }
    if prompt.len() + a.n_predict > eng.n_ctx {
        bail!(
            "prompt ({} tokens) + {} to generate exceed the context size {} (use --ctx)",
            prompt.len(),
            a.n_predict,
            eng.n_ctx
        );
    }
    let mut sess = eng.runner(&a.engine, 1)?;
    let mut sampler = Sampler::new(a.sampling.config());
    prompt.iter().for_each(|&t| sampler.accept(t));
    // Tokens chosen on the GPU (greedy, top-k or whole-vocabulary sampled), which then never waits for the
    // host between tokens.
    let chained = sess.prepare_chain(&sampler)?;

    let t0 = Instant::now();
    let mut logits = sess.eval(&prompt, Logits::Last)?;
    let prompt_s = t0.elapsed().as_secs_f64();
    eng.print_profiles("prompt")?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut text = Utf8Stream::default();
    let t1 = Instant::now();
    let mut decoded = 0usize;
    let mut generated_ids: Vec<u32> = Vec::with_capacity(a.n_predict);
    // Takes a new token: false when generation stops at it.
    let mut emit = |next: u32, out: &mut std::io::StdoutLock| -> Result<bool> {
        generated_ids.push(next);
        if tok.is_eog(next) && !a.ignore_eos {
            return Ok(false);
        }
        write!(out, "{}", text.push(&tok.token_bytes(next)))?;
        out.flush()?;
        Ok(generated_ids.len() < a.n_predict)
    };
    if a.n_predict > 0 {
        let first = sampler.sample(&mut logits);
        sampler.accept(first);
        if emit(first, &mut out)? {
            if chained {
                let mut failed = None;
                decoded = sess.decode_chained(first, a.n_predict - 1, &mut sampler, &mut |t| {
                    emit(t, &mut out).unwrap_or_else(|e| {
                        failed = Some(e);
                        false
                    })
                })?;
                if let Some(e) = failed {
                    return Err(e);
                }
            } else {
                let mut next = first;
                loop {
                    logits = sess.eval(&[next], Logits::Last)?;
                    decoded += 1;
                    next = sampler.sample(&mut logits);
                    sampler.accept(next);
                    if !emit(next, &mut out)? {
                        break;
                    }
                }
            }
        }
    }
    writeln!(out, "{}", text.finish())?;
    let decode_s = t1.elapsed().as_secs_f64();
    eng.print_profiles("decode")?;
    let rss = peak_rss_bytes().unwrap_or(0);
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tok/s) | decode: {} tokens in {:.3} s ({:.1} tok/s) | peak RSS {} MiB | {}",
        prompt.len(),
        prompt_s,
        rate(prompt.len(), prompt_s),
        decoded,
        decode_s,
        rate(decoded, decode_s),
        rss >> 20,
        eng.backend_name()
    );
    if let Some(line) = sess.summary(decode_s, decoded as u64) {
        eprintln!("{line}");
    }
    if let Some(t) = &a.engine.residency.trace {
        sess.write_trace(t)?;
    }
    if let Some(p) = a.stats_json {
        let j = serde_json::json!({
            "model": a.engine.model.display().to_string(),
            "backend": eng.backend_name(),
            "threads": eng.backend.threads(),
            "prompt_tokens": prompt.len(),
            "prompt_seconds": prompt_s,
            "prompt_tokens_per_sec": rate(prompt.len(), prompt_s),
            "generated_tokens": generated_ids.len(),
            "generated_ids": generated_ids,
            "decode_tokens": decoded,
            "decode_seconds": decode_s,
            "decode_tokens_per_sec": rate(decoded, decode_s),
            "peak_rss_bytes": rss,
            "residency": sess.stats_json().map(|mut r| {
                // Efficiency: the floor's seconds per token over the measured ones.
                let floor = r["plan"]["floor_seconds_per_token"].as_f64().unwrap_or(0.0);
                let per_token = if decoded > 0 { decode_s / decoded as f64 } else { 0.0 };
                r["decode_efficiency"] = serde_json::json!(if per_token > 0.0 { floor / per_token } else { 0.0 });
                r
            }),
        });
        std::fs::write(&p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Interactive chat through the server's batched engine: the engine runs on this thread,
/// the conversation (stdin, stdout) on another.
fn cmd_chat(a: ChatArgs) -> Result<()> {
    let eng = Engine::new(&a.engine)?;
    let tmpl = template::ChatTemplate::from_model(&eng.model)?;
    let mut runner = eng.runner(&a.engine, 1)?;
    eprintln!(
        "flea chat: {} ({}); empty line or Ctrl-D quits",
        a.engine.model.display(),
        eng.backend_name()
    );
    // Alone in the engine, the conversation's tokens are chosen on the GPU.
    let chain_decode = runner.may_chain();
    let (engine, handle) = flea_server::Engine::new(
        runner.step_model(),
        &eng.model.tokenizer,
        Some(tmpl),
        flea_server::EngineOptions {
            chain_decode,
            ..Default::default()
        },
    );
    let sampling = a.sampling.config();
    let (system, n_predict) = (a.system, a.n_predict);
    let conversation = std::thread::Builder::new()
        .name("flea-chat".into())
        .spawn(move || chat_loop(&handle, system, n_predict, sampling))?;
    engine.run();
    conversation
        .join()
        .map_err(|_| anyhow!("the chat thread panicked"))?
}

fn chat_loop(
    engine: &flea_server::EngineHandle,
    system: Option<String>,
    n_predict: usize,
    sampling: SamplerConfig,
) -> Result<()> {
    use flea_server::{Event, GenRequest, Prompt};
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(template::Message {
            role: "system".into(),
            content: s,
        });
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for turn in 0u64.. {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(template::Message {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let req = GenRequest {
            prompt: Prompt::Chat(messages.clone()),
            max_tokens: Some(n_predict),
            sampling: SamplerConfig {
                seed: sampling.seed.wrapping_add(turn),
                ..sampling.clone()
            },
            stop: Vec::new(),
        };
        let mut rx = engine.submit(req)?;
        let mut reply = String::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Started { .. }) => {}
                Some(Event::Text(t)) => {
                    write!(out, "{t}")?;
                    out.flush()?;
                    reply.push_str(&t);
                }
                Some(Event::Done { .. }) => break,
                Some(Event::Error(e)) => {
                    bail!("{e} (restart with a larger --ctx for longer conversations)")
                }
                None => bail!("the engine stopped"),
            }
        }
        writeln!(out)?;
        messages.push(template::Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let mut eng = Engine::new(&a.engine)?;
    if a.engine.ctx.is_none() {
        eng.n_ctx = eng.model.cfg.n_ctx_train.min(2048);
    }
    let n_seq = a.parallel.max(1);
    let tmpl = template::ChatTemplate::from_model(&eng.model)?;
    let model_id = match &a.model_id {
        Some(m) => m.clone(),
        None => a
            .engine
            .model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
    };
    // Rows per pass: a prompt batch beside one decode row per sequence.
    eng.batch = a.engine.prompt_batch() + n_seq;
    let mut runner = eng.runner(&a.engine, n_seq)?;
    if let Some(line) = runner.plan_line() {
        eprintln!("flea serve: {line}");
    }
    let summary = format!(
        "{} as '{model_id}' ({}), {n_seq} sequence slots of {} tokens",
        a.engine.model.display(),
        eng.backend_name(),
        eng.n_ctx
    );
    // A request running alone has its tokens chosen on the GPU.
    let chain_decode = runner.may_chain();
    // On a GPU the device waits while the host samples a step's sequences.
    let sample_threads = match a.sample_threads {
        0 if runner.on_gpu() => std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .clamp(1, 8),
        0 => 1,
        n => n.min(flea_server::SAMPLE_THREADS_MAX),
    };
    let (engine, handle) = flea_server::Engine::new(
        runner.step_model(),
        &eng.model.tokenizer,
        Some(tmpl),
        flea_server::EngineOptions {
            queue_capacity: a.queue.max(1),
            shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
            chain_decode,
            sample_threads,
        },
    );
    let opts = flea_server::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        model_id,
        max_body_bytes: a.max_body,
    };
    flea_server::serve(engine, handle, opts, |addr| {
        eprintln!("flea serve: listening on http://{addr} ; {summary}");
    })?;
    eprintln!("flea serve: stopped");
    Ok(())
}

fn cmd_info(path: &Path, all_tensors: bool) -> Result<()> {
    let f =
        flea_gguf::GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let h = &f.header;
    println!(
        "file: {} ({} bytes, GGUF v{}, alignment {})",
        path.display(),
        h.file_size,
        h.version,
        h.alignment
    );
    println!("metadata ({} keys):", h.metadata.len());
    for (k, v) in &h.metadata {
        println!("  {k} = {}", show_meta(v));
    }
    println!("tensors ({}):", h.tensors.len());
    println!(
        "  {:<36} {:<8} {:<22} {:>14} {:>12}",
        "name", "type", "dims", "offset", "bytes"
    );
    for t in &h.tensors {
        if !all_tensors && t.name.starts_with("blk.") && !t.name.starts_with("blk.0.") {
            continue;
        }
        println!(
            "  {:<36} {:<8} {:<22} {:>14} {:>12}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            t.offset,
            t.size
        );
    }
    if !all_tensors && h.n_layers() > 1 {
        println!(
            "  (layers 1..{} omitted; --all-tensors shows them)",
            h.n_layers() - 1
        );
    }
    println!("bytes per layer:");
    let mut total = 0u64;
    for il in 0..h.n_layers() {
        if let Some(v) = h.layer_view(il) {
            total += v.bytes;
            println!(
                "  blk.{il:<4} {:>3} tensors {:>12} bytes  extent [{}, {})",
                v.tensors.len(),
                v.bytes,
                v.start,
                v.end
            );
        }
    }
    let all: u64 = h.tensors.iter().map(|t| t.size).sum();
    println!(
        "layers total {total} bytes; other tensors {} bytes; all tensors {all} bytes",
        all - total
    );
    match Model::load(path) {
        Ok(m) => println!("model: {:?}", m.cfg),
        Err(e) => println!("model: cannot run: {e}"),
    }
    Ok(())
}

fn show_meta(v: &flea_gguf::MetaValue) -> String {
    use flea_gguf::MetaValue as M;
    match v {
        M::String(s) => {
            let s: String = s.chars().take(80).collect();
            format!("{s:?}")
        }
        M::Array(a) => {
            let head: Vec<String> = a.iter().take(6).map(show_meta).collect();
            format!(
                "[{}{}] ({} items)",
                head.join(", "),
                if a.len() > 6 { ", …" } else { "" },
                a.len()
            )
        }
        other => format!("{other:?}"),
    }
}

fn cmd_tokenize(path: &Path, text: &str, add_special: bool, parse_special: bool) -> Result<()> {
    let f =
        flea_gguf::GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let tok = flea_tokenizer::Tokenizer::from_gguf(&f.header)?;
    let ids = tok.encode(text, add_special, parse_special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let eng = Engine::new(&a.engine)?;
    let ids: Vec<u32> = match (&a.prompt, &a.tokens) {
        (Some(p), None) => eng.model.tokenizer.encode(p, true, true),
        (None, Some(t)) => t
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .map_err(|e| anyhow!("bad token id '{s}': {e}"))
            })
            .collect::<Result<_>>()?,
        _ => bail!("give exactly one of --prompt or --tokens"),
    };
    if ids.is_empty() {
        bail!("no tokens to score");
    }
    let mut sess = eng.runner(&a.engine, 1)?;
    let which = if a.all_positions {
        Logits::All
    } else {
        Logits::Last
    };
    let logits = sess.eval(&ids, which)?;
    let vocab = eng.model.cfg.n_vocab;
    write_npy(&a.out, &logits, logits.len() / vocab, vocab)?;
    eprintln!(
        "wrote {} x {} logits to {}",
        logits.len() / vocab,
        vocab,
        a.out.display()
    );
    Ok(())
}

/// Write a float32 little-endian .npy (format 1.0) of shape [rows, cols].
fn write_npy(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len() * 4);
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    // Write to a temporary name and rename, so a failure never leaves a partial file.
    let tmp = path.with_extension("npy.partial");
    std::fs::write(&tmp, &buf).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn cmd_plan(a: PlanArgs) -> Result<()> {
    let e = &a.engine;
    // The engine `flea run` starts: the same device checks, model, context and batch.
    let engine = Engine::new(e)?;
    let (model, n_ctx, batch) = (&engine.model, engine.n_ctx, engine.batch);
    // On a GPU, the plan `flea run` makes there: free VRAM read after cuBLAS has loaded,
    // links measured, the device's scratch counted, the hybrid's ring depth.
    #[cfg(feature = "cuda")]
    let plan = match &engine.cuda {
        Some(cuda) => {
            cuda.warm_up_gemms(model, batch)
                .map_err(|err| anyhow!("{err}"))?;
            e.residency.plan_cuda(model, cuda, n_ctx, batch, 1)?
        }
        None => e.residency.plan(model, n_ctx, batch, 1)?,
    };
    #[cfg(not(feature = "cuda"))]
    let plan = e.residency.plan(model, n_ctx, batch, 1)?;
    let gpu = parse_device(&e.device)?;
    println!(
        "{} ({} layers, {} weights), context {n_ctx}, batch {}",
        e.model.display(),
        model.cfg.n_layers,
        flea_runtime::fmt_size(plan.units.iter().map(|u| u.bytes).sum()),
        batch
    );
    print!("{}", plan.table());
    let host_cached = plan
        .units
        .iter()
        .any(|u| u.tier == flea_runtime::Tier::HostCache);
    if gpu.is_some() && host_cached && e.residency.hybrid != residency::HybridMode::Off {
        println!(
            "decode: the hybrid (--hybrid auto) measures the CPU at start and may compute some \
             host-cached layers there; their device KV caches then share one layer's room and \
             the room freed holds more units resident than listed above (`flea run` prints both)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine_args(extra: &[&str]) -> EngineArgs {
        let mut argv = vec!["flea", "plan", "-m", "m.gguf"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|c| c.cmd) {
            Ok(Cmd::Plan(p)) => p.engine,
            _ => panic!("flea plan {extra:?} did not parse"),
        }
    }

    #[test]
    fn prompt_batch_defaults_by_device_and_budget() {
        assert_eq!(engine_args(&[]).prompt_batch(), PROMPT_BATCH);
        assert_eq!(
            engine_args(&["--device", "cuda"]).prompt_batch(),
            PROMPT_BATCH_GPU
        );
        assert_eq!(
            engine_args(&["--device", "cuda:1"]).prompt_batch(),
            PROMPT_BATCH_GPU
        );
        let budgeted = engine_args(&["--device", "cuda", "--vram-budget", "4GiB"]);
        assert_eq!(budgeted.prompt_batch(), PROMPT_BATCH);
        assert_eq!(
            engine_args(&["--device", "cuda", "-b", "64"]).prompt_batch(),
            64
        );
        assert_eq!(engine_args(&["-b", "0"]).prompt_batch(), 1);
    }
}
