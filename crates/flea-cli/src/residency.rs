//! CLI side of transient residency: the budget and I/O flags, and the runner that evaluates
//! tokens either in place (mmap, no budgets) or through the streaming executor.

use anyhow::{Context, Result};
use clap::Args;
use flea_io::{IoBackend, IoOptions};
use flea_model::{CpuBackend, Logits, Model, Sampler, Session, UnitStaging};
use flea_runtime::{fmt_size, parse_size, Plan, PlanRequest, StreamedModel, Tier};
use std::path::{Path, PathBuf};

/// Whether the CPU computes some host-cached layers beside a GPU (see `--hybrid`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HybridMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Args, Clone, Debug, Default)]
pub struct ResidencyArgs {
    /// Device-tier budget (on the CPU backend: the arena compute reads from), e.g. 8GiB.
    #[arg(long)]
    pub vram_budget: Option<String>,
    /// Host-RAM cache budget, e.g. 512MiB.
    #[arg(long)]
    pub ram_budget: Option<String>,
    /// How streamed layers are read: mmap, pread (O_DIRECT) or io_uring.
    #[arg(long)]
    pub io: Option<IoBackend>,
    /// Read through the page cache instead of O_DIRECT.
    #[arg(long)]
    pub no_direct: bool,
    /// Slots in the streaming ring (default: the planner's choice).
    #[arg(long)]
    pub ring_depth: Option<usize>,
    /// io_uring requests in flight.
    #[arg(long)]
    pub queue_depth: Option<u32>,
    /// io_uring request size, e.g. 1MiB.
    #[arg(long)]
    pub block_size: Option<String>,
    /// Disk read bandwidth for the planner's prediction, GB/s (default: assumed 1.5).
    #[arg(long)]
    pub disk_gbps: Option<f64>,
    /// Memory read bandwidth of the compute device for the prediction, GB/s (default 10;
    /// on a GPU measured at start).
    #[arg(long)]
    pub mem_gbps: Option<f64>,
    /// Host-to-GPU copy bandwidth for the prediction, GB/s (default: measured at start).
    #[arg(long)]
    pub h2d_gbps: Option<f64>,
    /// With a GPU and host-cached layers: let the CPU compute some of them in place while
    /// the copy engine streams the others (decode of one sequence), choosing stream /
    /// cpu-only / split from rates measured at start. auto (default): when it applies;
    /// on (or bare --hybrid): an error when it cannot (several sequences); off: never.
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub hybrid: HybridMode,
    /// Hybrid: split at this CPU rate, GB/s, instead of measuring.
    #[arg(long)]
    pub cpu_gbps: Option<f64>,
    /// Compute straight from the file's mmap, outside the budgets (no arenas, no executor).
    #[arg(long, conflicts_with_all = ["vram_budget", "ram_budget", "io", "ring_depth"])]
    pub in_place: bool,
    /// Write a Chrome/Perfetto trace of the pipeline (disk read, compute, stall lanes), or
    /// an SVG timeline of the last token when FILE ends in .svg.
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

impl ResidencyArgs {
    /// Whether the model runs under the residency executor (the default).
    pub fn streaming(&self) -> bool {
        !self.in_place
    }

    pub fn io_options(&self) -> Result<IoOptions> {
        let mut o = IoOptions::default();
        if let Some(b) = self.io {
            o.backend = b;
        }
        o.direct = !self.no_direct;
        if let Some(q) = self.queue_depth {
            o.queue_depth = q;
        }
        if let Some(b) = &self.block_size {
            o.block_size = parse_size(b)? as usize;
        }
        Ok(o)
    }

    /// The plan for the CPU backend: RAM is both tiers.
    pub fn plan(&self, model: &Model, n_ctx: usize, batch: usize, n_seq: usize) -> Result<Plan> {
        let avail = mem_available().unwrap_or(4 << 30);
        // Defaults from free memory: half for the device tier, a quarter for the host cache.
        self.plan_with(
            model,
            (n_ctx, batch, n_seq),
            avail / 2,
            avail / 4,
            self.links(),
            false,
            0,
        )
    }

    /// Measured link speeds when `flea probe` has saved a profile, else assumed defaults;
    /// flags override either.
    fn links(&self) -> flea_runtime::plan::Links {
        let mut links =
            flea_runtime::profile::Profile::load(&flea_runtime::profile::default_path())
                .map(|p| p.links())
                .unwrap_or_default();
        if let Some(g) = self.disk_gbps {
            links.disk = g * 1e9;
        }
        if let Some(g) = self.mem_gbps {
            links.device_memory = g * 1e9;
        }
        links
    }

    #[allow(clippy::too_many_arguments)] // the planner's inputs, spelled out
    fn plan_with(
        &self,
        model: &Model,
        (n_ctx, batch, n_seq): (usize, usize, usize),
        default_vram: u64,
        default_ram: u64,
        links: flea_runtime::plan::Links,
        stages_units: bool,
        device_scratch: u64,
    ) -> Result<Plan> {
        let vram = match &self.vram_budget {
            Some(s) => parse_size(s)?,
            None => default_vram,
        };
        let ram = match &self.ram_budget {
            Some(s) => parse_size(s)?,
            None => default_ram,
        };
        let req = PlanRequest {
            vram_budget: vram,
            ram_budget: ram,
            n_ctx,
            batch,
            n_seq,
            ring_depth: self.ring_depth,
            links,
            stages_units,
            device_scratch,
            // The hybrid attaches a CPU for one sequence unless it is off.
            cpu_kv_layers: stages_units && self.hybrid != HybridMode::Off && n_seq == 1,
        };
        Ok(Plan::build(model, &req)?)
    }

    /// The plan for a GPU: the device tier is VRAM (default: free VRAM less 1 GiB), the host
    /// cache is RAM (default: half of what is available); link speeds measured on the spot
    /// unless given.
    #[cfg(feature = "cuda")]
    pub fn plan_cuda(
        &self,
        model: &Model,
        cuda: &flea_cuda::CudaBackend,
        n_ctx: usize,
        batch: usize,
        n_seq: usize,
    ) -> Result<Plan> {
        let (free, _) = cuda.mem_info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let avail = mem_available().unwrap_or(4 << 30);
        let mut links = self.links();
        links.device_memory = match self.mem_gbps {
            Some(g) => g * 1e9,
            None => cuda.measure_copy_bandwidth(256 << 20, 3)?,
        };
        links.host_to_device = Some(match self.h2d_gbps {
            Some(g) => g * 1e9,
            None => cuda.measure_h2d_bandwidth(256 << 20, 3)?,
        });
        links.device_measured = true;
        let scratch = cuda.scratch_bytes(model, batch);
        let default_vram = (free as u64).saturating_sub(1 << 30);
        let plan_for = |r: &ResidencyArgs| {
            r.plan_with(
                model,
                (n_ctx, batch, n_seq),
                default_vram,
                avail / 2,
                links,
                true,
                scratch,
            )
        };
        let plan = plan_for(self)?;
        // Hybrid decode (one sequence, host-cached layers) needs only two ring slots: its
        // copies are staged ahead while the CPU computes, across the pass boundary too, so
        // a third slot's VRAM is better spent on one more resident layer (13b at 4979 MiB on
        // the H200: 17 → 18 resident units, decode 21.7 → 23.8 tok/s, 2026-11-27).
        let hybrid_may_run = self.hybrid != HybridMode::Off && n_seq == 1;
        let host_cached = plan.units.iter().any(|u| u.tier == Tier::HostCache);
        if self.ring_depth.is_none() && hybrid_may_run && host_cached && plan.ring_depth > 2 {
            return plan_for(&ResidencyArgs {
                ring_depth: Some(2),
                ..self.clone()
            });
        }
        Ok(plan)
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Evaluates tokens with or without streaming.
pub enum Runner<'m> {
    InPlace(Box<Session<'m, CpuBackend>>),
    Streamed(Box<StreamedModel<'m>>),
    /// On a GPU under the residency executor.
    #[cfg(feature = "cuda")]
    Cuda(Box<StreamedModel<'m, flea_cuda::CudaBackend>>),
    /// On a GPU, weights uploaded on first use outside any budget (`--in-place`).
    #[cfg(feature = "cuda")]
    CudaInPlace(Box<Session<'m, flea_cuda::CudaBackend>>),
}

/// Runs `$body` with `$s` bound to whichever streamed model the runner holds.
macro_rules! with_streamed {
    ($runner:expr, $s:ident => $body:expr, else $other:expr) => {
        match $runner {
            Runner::Streamed($s) => $body,
            #[cfg(feature = "cuda")]
            Runner::Cuda($s) => $body,
            #[allow(unreachable_patterns)]
            _ => $other,
        }
    };
}

impl<'m> Runner<'m> {
    /// A runner whose KV cache holds `n_seq` sequences of `n_ctx` positions (the server's
    /// slots; 1 for a single run). `batch`: rows per weight pass.
    pub fn new(
        model: &'m Model,
        backend: &'m CpuBackend,
        path: &Path,
        r: &ResidencyArgs,
        n_ctx: usize,
        batch: usize,
        n_seq: usize,
    ) -> Result<Runner<'m>> {
        if !r.streaming() {
            return Ok(Runner::InPlace(Box::new(Session::with_seqs(
                model, backend, n_ctx, batch, n_seq,
            )?)));
        }
        let plan = r.plan(model, n_ctx, batch, n_seq)?;
        // The executor's scratch holds the plan's rows per pass (at least one per sequence).
        let batch = batch.max(n_seq);
        Ok(Runner::Streamed(Box::new(start_streaming(
            model, backend, plan, path, r, n_ctx, batch,
        )?)))
    }

    #[allow(clippy::too_many_arguments)] // the model, both backends and the run's shape
    #[cfg(feature = "cuda")]
    pub fn new_cuda(
        model: &'m Model,
        cuda: &'m flea_cuda::CudaBackend,
        cpu: &'m CpuBackend,
        path: &Path,
        r: &ResidencyArgs,
        n_ctx: usize,
        batch: usize,
        n_seq: usize,
    ) -> Result<Runner<'m>> {
        // cuBLAS chooses and loads its kernels before the plan reads the free memory (its
        // workspace is then already counted) and before the first prompt is timed.
        cuda.warm_up_gemms(model, batch.max(n_seq))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !r.streaming() {
            return Ok(Runner::CudaInPlace(Box::new(Session::with_seqs(
                model, cuda, n_ctx, batch, n_seq,
            )?)));
        }
        let plan = r.plan_cuda(model, cuda, n_ctx, batch, n_seq)?;
        let batch = batch.max(n_seq);
        let mut s = start_streaming(model, cuda, plan, path, r, n_ctx, batch)?;
        if r.hybrid == HybridMode::On && n_seq > 1 {
            anyhow::bail!("--hybrid runs one sequence at a time (drop --hybrid to serve several)");
        }
        if r.hybrid == HybridMode::Off && r.cpu_gbps.is_some() {
            anyhow::bail!("--cpu-gbps sets the hybrid split: it needs --hybrid on or auto");
        }
        let host_cached = s.plan.units.iter().any(|u| u.tier == Tier::HostCache);
        if r.hybrid != HybridMode::Off && n_seq == 1 && host_cached {
            // FLEA_KV_SHARE=0 keeps a device KV cache for every layer (for comparisons).
            s.set_kv_sharing(std::env::var("FLEA_KV_SHARE").as_deref() != Ok("0"));
            if let Some(h) = s.attach_cpu(cpu, r.cpu_gbps.map(|g| g * 1e9))? {
                eprintln!(
                    "hybrid: {:?} (CPU {:.1} GB/s alone, {:.1} GB/s while copying; copy engine {:.1} GB/s meanwhile; predicted host-cached part {:.1} / {:.1} / {:.1} ms for stream / cpu-only / split)",
                    h.choice,
                    h.cpu_alone / 1e9,
                    h.cpu_contended / 1e9,
                    h.copy_contended / 1e9,
                    h.predicted_seconds[0] * 1e3,
                    h.predicted_seconds[1] * 1e3,
                    h.predicted_seconds[2] * 1e3
                );
                if h.kv_shared_layers > 0 {
                    eprintln!(
                        "hybrid: the device KV caches of {} CPU layers share one layer's room (KV now {}); {} more units resident",
                        h.kv_shared_layers,
                        flea_runtime::budget::fmt_size(s.plan.kv_bytes),
                        h.promoted_units
                    );
                }
            }
        }
        Ok(Runner::Cuda(Box::new(s)))
    }

    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        Ok(match self {
            Runner::InPlace(s) => s.eval(tokens, which)?,
            Runner::Streamed(s) => s.eval(tokens, which)?,
            #[cfg(feature = "cuda")]
            Runner::Cuda(s) => s.eval(tokens, which)?,
            #[cfg(feature = "cuda")]
            Runner::CudaInPlace(s) => s.eval(tokens, which)?,
        })
    }

    /// Whether this runner computes on a GPU.
    pub fn on_gpu(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Runner::Cuda(_) | Runner::CudaInPlace(_) => true,
            _ => false,
        }
    }

    /// Whether decode may run chained on this runner's device: a CUDA runner under the
    /// residency executor, unless FLEA_CHAIN=0. (On the CPU each token is computed by the
    /// host anyway, so it samples there as before.)
    pub fn may_chain(&self) -> bool {
        if std::env::var_os("FLEA_CHAIN").is_some_and(|v| v == "0") {
            return false;
        }
        match self {
            #[cfg(feature = "cuda")]
            Runner::Cuda(_) => true,
            _ => false,
        }
    }

    /// Whether decode with `sampler` runs chained on the GPU (`StreamedModel::decode_sampled`:
    /// greedy, or top-k or whole-vocabulary sampling the GPU can do): `may_chain`, and a plan
    /// that holds everything in device memory.
    pub fn prepare_chain(&mut self, sampler: &Sampler) -> Result<bool> {
        if !self.may_chain() {
            return Ok(false);
        }
        match self {
            #[cfg(feature = "cuda")]
            Runner::Cuda(s) => Ok(s.samples_on_backend(sampler) && s.prepare_chain()?),
            _ => {
                let _ = sampler;
                Ok(false)
            }
        }
    }

    /// See `StreamedModel::decode_sampled` (after `prepare_chain` said yes).
    pub fn decode_chained(
        &mut self,
        first: u32,
        max: usize,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        with_streamed!(self, s => Ok(s.decode_sampled(first, max, sampler, on_token)?),
            else anyhow::bail!("decode chains only under the residency executor"))
    }

    /// The model behind the runner, as the server's engine drives it.
    pub fn step_model(&mut self) -> &mut dyn flea_server::StepModel {
        match self {
            Runner::InPlace(s) => s.as_mut(),
            Runner::Streamed(s) => s.as_mut(),
            #[cfg(feature = "cuda")]
            Runner::Cuda(s) => s.as_mut(),
            #[cfg(feature = "cuda")]
            Runner::CudaInPlace(s) => s.as_mut(),
        }
    }

    /// One line about the plan (units per tier, arena use), or None when not streaming.
    pub fn plan_line(&self) -> Option<String> {
        let p = with_streamed!(self, s => &s.plan, else return None);
        let count = |t: Tier| p.units.iter().filter(|u| u.tier == t).count();
        Some(format!(
            "plan: {} resident, {} host-cached, {} streamed units; device arena {} of {} (KV {} for {} sequences, activations {}, ring {} x {})",
            count(Tier::Resident),
            count(Tier::HostCache),
            count(Tier::Disk),
            fmt_size(p.device_bytes),
            fmt_size(p.vram_budget),
            fmt_size(p.kv_bytes),
            p.n_seq,
            fmt_size(p.act_bytes),
            p.ring_depth,
            fmt_size(p.slot_bytes)
        ))
    }

    /// One line about where the weights were, or None when not streaming.
    pub fn summary(&self, decode_seconds: f64, decode_passes: u64) -> Option<String> {
        with_streamed!(self, s => Some(summary_line(s, decode_seconds, decode_passes)), else None)
    }

    /// Stats and trace files, when asked for.
    pub fn stats_json(&self) -> Option<serde_json::Value> {
        with_streamed!(self, s => Some(stats_of(s)), else None)
    }

    pub fn write_trace(&self, path: &Path) -> Result<()> {
        with_streamed!(self, s => write_trace_of(s, path), else Ok(()))
    }
}

fn start_streaming<'m, B: UnitStaging>(
    model: &'m Model,
    backend: &'m B,
    plan: Plan,
    path: &Path,
    r: &ResidencyArgs,
    n_ctx: usize,
    batch: usize,
) -> Result<StreamedModel<'m, B>> {
    let mut s = StreamedModel::new(model, backend, plan, path, &r.io_options()?, n_ctx, batch)
        .with_context(|| format!("starting the streaming executor on {}", path.display()))?;
    if r.trace.is_some() {
        s.trace.enable(1 << 20);
    }
    Ok(s)
}

fn summary_line<B: UnitStaging>(
    s: &StreamedModel<'_, B>,
    decode_seconds: f64,
    decode_passes: u64,
) -> String {
    let count = |t: Tier| s.plan.units.iter().filter(|u| u.tier == t).count();
    let st = &s.stats;
    let passes = st.passes.max(1);
    let per_pass = st.bytes_streamed / passes;
    let rate = if st.read_seconds > 0.0 {
        st.bytes_streamed as f64 / st.read_seconds / 1e9
    } else {
        0.0
    };
    let (floor, link) = s.plan.floor();
    let eff = if decode_passes > 0 && decode_seconds > 0.0 {
        floor / (decode_seconds / decode_passes as f64)
    } else {
        0.0
    };
    // An assumed rate is no floor: say so, beside what the read lane saw.
    let assumed = match s.plan.links.rate_of(link) {
        (false, r) => format!(
            " ({link} rate assumed: {:.2} GB/s; `flea probe` measures it)",
            r / 1e9
        ),
        _ => String::new(),
    };
    let rebalanced = match s.hybrid.and_then(|h| h.rebalanced) {
        Some((rate, n)) => format!(
            "; hybrid split re-balanced {n}x (the CPU's rate in the token loop: {:.1} GB/s)",
            rate / 1e9
        ),
        None => String::new(),
    };
    let driver = match s.driver_peak() {
        Some(p) => format!(" (driver saw {} more in use at peak)", fmt_size(p)),
        None => String::new(),
    };
    let recorded = if st.recorded_passes > 0 {
        format!(
            "; {} passes recorded as graphs, {:.0} us of host time each",
            st.recorded_passes,
            st.record_seconds / st.recorded_passes as f64 * 1e6
        )
    } else {
        String::new()
    };
    format!(
        "residency: {} resident, {} host-cached ({} computed by the CPU), {} streamed units; ring {} x {}; streamed {}/pass at {:.2} GB/s (read lane); compute stalled {:.1}% ; device peak {} of {}{driver}, host peak {} of {}; decode efficiency {:.2} of the {link} floor{assumed}{rebalanced}{recorded}",
        count(Tier::Resident),
        count(Tier::HostCache),
        s.plan.units.iter().filter(|u| u.on_cpu).count(),
        count(Tier::Disk),
        s.plan.ring_depth,
        fmt_size(s.plan.slot_bytes),
        fmt_size(per_pass),
        rate,
        100.0 * st.stall_seconds / (st.stall_seconds + st.compute_seconds).max(1e-9),
        fmt_size(s.device.peak()),
        fmt_size(s.device.budget),
        fmt_size(s.host.peak()),
        fmt_size(s.host.budget),
        eff
    )
}

fn stats_of<B: UnitStaging>(s: &StreamedModel<'_, B>) -> serde_json::Value {
    let (floor, link) = s.plan.floor();
    serde_json::json!({
        "plan": {
            "ring_depth": s.plan.ring_depth,
            "slot_bytes": s.plan.slot_bytes,
            "pass_bytes": s.plan.pass_bytes(),
            "floor_seconds_per_token": floor,
            "floor_link": link,
            "links": s.plan.links,
        },
        "arenas": {
            "device": {"budget": s.device.budget, "peak": s.device.peak(), "driver_peak": s.driver_peak()},
            "host_cache": {"budget": s.host.budget, "peak": s.host.peak()},
        },
        "stream": s.stats,
        "hybrid": s.hybrid,
        "read_gbps": if s.stats.read_seconds > 0.0 { s.stats.bytes_streamed as f64 / s.stats.read_seconds / 1e9 } else { 0.0 },
    })
}

fn write_trace_of<B: UnitStaging>(s: &StreamedModel<'_, B>, path: &Path) -> Result<()> {
    let label = |u: usize| match s.plan.units.get(u).map(|u| &u.kind) {
        Some(flea_runtime::plan::UnitKind::Layer(i)) => format!("blk.{i}"),
        Some(flea_runtime::plan::UnitKind::Output { start, end }) => {
            format!("output {start}..{end}")
        }
        None => format!("unit {u}"),
    };
    if path.extension().is_some_and(|e| e == "svg") {
        let first = s
            .plan
            .units
            .iter()
            .position(|u| u.tier == Tier::Disk)
            .unwrap_or(0);
        let title = format!(
            "one token through the ring: {} streamed units, ring {} x {}, {}",
            s.plan.units.iter().filter(|u| u.tier == Tier::Disk).count(),
            s.plan.ring_depth,
            fmt_size(s.plan.slot_bytes),
            s.model.cfg.arch.name()
        );
        std::fs::write(path, s.trace.to_svg(&label, first, &title))
            .with_context(|| format!("writing {}", path.display()))?;
    } else {
        let j = s.trace.to_chrome_json(&label);
        std::fs::write(path, serde_json::to_string(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
