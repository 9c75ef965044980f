//! The streaming executor: the one place where the layer streaming loop lives.
//!
//! Units (layers, slices of the output matrix) that the plan keeps resident or in the host
//! cache are read once at start. The rest stream through a ring of `depth` slots:
//!
//! ```text
//!   I/O thread:  wait for a free slot ─ read the next unit of the cycle into it ─ hand it over
//!   compute:     take the filled slot (must be the unit it expects) ─ compute ─ give the slot back
//! ```
//!
//! Every pass visits the units in the same order, so the I/O thread simply walks that order
//! in a cycle, as far ahead as free slots allow; reads of the next token's first layers
//! overlap the current token's last ones. Ordering is strict by construction: a slot is
//! filled only after compute returned it, and compute uses a slot only after it arrived.

use crate::budget::{Arena, Reservation};
use crate::plan::{Plan, Tier, UnitKind};
use crate::trace::{Lane, Trace};
use crate::{Result, RuntimeError};
use flea_io::{AlignedBuf, IoOptions, RangeReader};
use flea_model::backend::{Backend, KvShape, Row, UnitStaging, UnitWeight};
use flea_model::forward::{self, HeadWeights, Logits, Scratch};
use flea_model::sampling::{Sampler, SlotPick};
use flea_model::weights::Weight;
use flea_model::{CpuBackend, Model};
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// The embedding table a chained greedy decode embeds from (see `decode_greedy`).
enum ChainTable {
    /// It is the resident output unit (tied embeddings): nothing more held.
    SharedWithOutput,
    /// Placed in the backend's memory for the chain, charged to the device budget.
    Placed { _budget: Reservation },
    /// Read in place from the file mapping (a backend computing from host memory).
    Mapped,
    /// The plan or the budget leaves no way to chain (found once, not retried).
    Unavailable,
}

impl ChainTable {
    fn usable(&self) -> bool {
        !matches!(self, ChainTable::Unavailable)
    }
}

/// A unit's bytes held for the whole run.
struct Held {
    buf: AlignedBuf,
    range: Range<usize>,
    _reservation: Reservation,
}

/// Where a unit that is not streamed lives for the run.
enum Holding {
    /// In a host buffer: the CPU's device tier, or any backend's host cache.
    Host(Held),
    /// In the backend's own memory (a GPU's resident weights); only the budget is held here.
    Device { _budget: Reservation },
}

/// A slot coming back from the I/O thread.
struct Filled {
    /// Position in the endless cycle of streamed units.
    seq: u64,
    buf: AlignedBuf,
    result: std::result::Result<Range<usize>, flea_io::IoError>,
    read_start: Instant,
    read_end: Instant,
    /// How long the I/O thread waited for this free slot.
    slot_wait: std::time::Duration,
}

struct Ring {
    free: Option<SyncSender<AlignedBuf>>,
    filled: Receiver<Filled>,
    thread: Option<JoinHandle<()>>,
    /// Indices (into `plan.units`) of the streamed units, in pass order.
    order: Vec<usize>,
    next_seq: u64,
    _slots: Vec<Reservation>,
}

/// Counters for `--stats-json` and the one-line summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    pub passes: u64,
    pub bytes_streamed: u64,
    pub bytes_host_cache: u64,
    pub bytes_resident: u64,
    /// Host-cached bytes the CPU computed in place beside the GPU (hybrid).
    pub bytes_host_cpu: u64,
    /// Time compute spent waiting for a slot to arrive.
    pub stall_seconds: f64,
    pub compute_seconds: f64,
    pub read_seconds: f64,
    /// Time the I/O thread waited for a free slot (the ring was full).
    pub io_slot_wait_seconds: f64,
    /// Hybrid: time the CPU's layers spent before their arithmetic (queueing the GPU's next
    /// copies, waiting for the GPU's hidden state, bringing KV rows over).
    pub cpu_handover_seconds: f64,
    /// Hybrid: time the CPU's layers spent in their arithmetic.
    pub cpu_block_seconds: f64,
    /// Hybrid: units staged during one decode pass for the next and used there; and
    /// staged so but let go (the next pass was a prompt, or the split had moved).
    pub units_carried_over: u64,
    pub units_carried_dropped: u64,
    /// Chained decode passes recorded and launched as one unit (a CUDA graph), and the host's
    /// time doing so: where it passes the device's time a pass, the host bounds the decode.
    pub recorded_passes: u64,
    pub record_seconds: f64,
}

/// How a decode step treats the host-cached layers beside a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HybridChoice {
    /// Every one copied to the GPU.
    Stream,
    /// Every one computed by the CPU in place.
    CpuOnly,
    /// A balanced share computed by the CPU while the copy engine streams the rest.
    Split,
}

/// What `attach_cpu` measured and chose (rates in bytes per second).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HybridReport {
    pub choice: HybridChoice,
    pub cpu_alone: f64,
    /// The CPU's rate while the copy engine streams.
    pub cpu_contended: f64,
    /// The copy engine's rate while the CPU computes.
    pub copy_contended: f64,
    /// Predicted seconds per token of the host-cached part for stream, cpu-only, split.
    pub predicted_seconds: [f64; 3],
    /// Whether decode re-balances the split to the CPU's observed rate (a measured split;
    /// a rate given by the caller is kept).
    pub adaptive: bool,
    /// The CPU's rate (bytes of weights per second) last observed in the token loop once
    /// it was off the split's, and how many times re-splitting moved layers.
    pub rebalanced: Option<(f64, u32)>,
    /// Layers the CPU computes in decode whose device KV caches share one layer's room
    /// (their rows live on the host; prompts copy them in and out), and the host-cached
    /// units made resident in the room that freed.
    pub kv_shared_layers: usize,
    pub promoted_units: usize,
}

/// Decode passes between comparisons of the hybrid split with the CPU's observed rate.
const REBALANCE_PASSES: u32 = 8;
/// The CPU's speed, as a share of the measured one, down to which a layer whose device
/// cache is shared still stays on the CPU (the token loop has run 0.66-0.92 of the start-up
/// measurement on the lent H200 host: docs/BENCHMARKS.md).
const KV_SHARE_RATE: f64 = 0.6;

/// `KV_SHARE_RATE`, or `FLEA_KV_SHARE_RATE` (in (0, 1]; for comparisons).
fn kv_share_rate() -> f64 {
    std::env::var("FLEA_KV_SHARE_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| *r > 0.0 && *r <= 1.0)
        .unwrap_or(KV_SHARE_RATE)
}
/// Times the start-up CPU (and CPU-while-copying) measurement runs; the fastest counts.
const START_MEASUREMENTS: usize = 2;
/// Re-split when the CPU's observed rate is further than this from the split's.
const REBALANCE_TOLERANCE: f64 = 0.08;

/// Batches of at most this many tokens run the plan's CPU layers on the CPU (hybrid decode);
/// larger ones (prompts) are compute-bound and stream every layer to the GPU instead.
pub const HYBRID_MAX_BATCH: usize = 4;

/// The CPU side of hybrid execution beside a GPU: its own activations and the KV cache of
/// the layers it computes.
struct CpuSide<'m> {
    cpu: &'m CpuBackend,
    kv: <CpuBackend as Backend>::Kv,
    scratch: Scratch<CpuBackend>,
    _reservations: Vec<Reservation>,
    /// Layers whose KV cache the CPU holds page-locked.
    pinned_kv: Vec<bool>,
    /// Layers a re-balanced split may give the CPU (its KV reservation covers them).
    may_take: Vec<bool>,
    /// Decode passes since the last re-balancing check: (CPU bytes, CPU arithmetic
    /// seconds, passes).
    window: (u64, f64, u32),
}

/// A model run under a residency plan, on any backend (the CPU by default).
pub struct StreamedModel<'m, B: UnitStaging = CpuBackend> {
    pub model: &'m Model,
    pub backend: &'m B,
    pub plan: Plan,
    pub device: Arc<Arena>,
    pub host: Arc<Arena>,
    held: Vec<Option<Holding>>,
    /// Hybrid execution: the CPU computing the plan's `on_cpu` layers.
    cpu_side: Option<CpuSide<'m>>,
    /// What the hybrid measurement found and chose.
    pub hybrid: Option<HybridReport>,
    /// Per layer, how many positions of its KV cache are valid on [the device, the CPU]
    /// (a layer computed on both sides copies the missing rows before it runs).
    kv_valid: Vec<[usize; 2]>,
    /// Layers whose device cache is the one they share (`Backend::share_kv_layers`): their
    /// rows are kept by the CPU, copied in before the device computes them and out after.
    shared_kv: Vec<bool>,
    /// Whether `attach_cpu` may share the device caches of the CPU's layers (on by default).
    kv_sharing: bool,
    /// The device budget held for the KV cache (shrinks when caches are shared).
    kv_budget: Reservation,
    /// Units staged ahead (in pass order) while the CPU computes.
    ahead: StagedAhead<B::Staged>,
    /// Host buffers page-locked for the backend's copies: (address, length).
    pinned: Vec<(usize, usize)>,
    ring: Option<Ring>,
    embed_reader: Box<dyn RangeReader>,
    embed_buf: AlignedBuf,
    embed_rows: Vec<u8>,
    /// The whole embedding table, held where the backend embeds from its token slots:
    /// set up by the first chained greedy decode (None before, or when it cannot chain).
    chain_table: Option<ChainTable>,
    /// The tokens the backend picked in the last `step_picks`.
    picked: Vec<u32>,
    output_norm: Vec<u8>,
    kv: B::Kv,
    scratch: Scratch<B>,
    batch: usize,
    pub n_ctx: usize,
    pub pos: usize,
    pub stats: StreamStats,
    pub trace: Trace,
    poisoned: Option<String>,
    /// Device memory in use by the driver's count before the executor allocated anything,
    /// and the most seen above that after a pass (cross-checks the device arena).
    driver_base: Option<u64>,
    driver_peak: Option<u64>,
    _fixed: Vec<Reservation>,
}

/// A unit's bytes in the model's file mapping: the address weight views use on a backend
/// that stages units into its own memory (the bytes themselves are not read there).
fn unit_key(model: &Model, offset: u64, bytes: u64) -> Result<&[u8]> {
    usize::try_from(offset)
        .ok()
        .zip(usize::try_from(bytes).ok())
        .and_then(|(o, n)| model.file.bytes().get(o..o.checked_add(n)?))
        .ok_or_else(|| {
            RuntimeError::Stream(format!(
                "unit at {offset}+{bytes} lies outside the model file mapping"
            ))
        })
}

/// The matmul weights (layer projections, an untied output head) lying wholly inside the
/// unit at file offset `offset` (`bytes` long), as offsets into the unit. The token
/// embedding is left out: it is also gathered row by row.
fn unit_matmul_weights(model: &Model, offset: u64, bytes: u64) -> Vec<UnitWeight> {
    let layout = &model.layout;
    let mut slots: Vec<&flea_model::weights::TensorSlot> = Vec::new();
    for l in &layout.layers {
        slots.extend(l.matrices());
    }
    if !layout.output_is_tied {
        slots.push(&layout.output);
    }
    slots
        .into_iter()
        .filter(|t| t.file_offset >= offset && t.file_offset + t.size as u64 <= offset + bytes)
        .filter_map(|t| {
            Some(UnitWeight {
                offset: usize::try_from(t.file_offset - offset).ok()?,
                bytes: t.size,
                ty: t.ty,
                rows: t.rows,
                cols: t.cols,
            })
        })
        .collect()
}

fn read_unit(
    reader: &mut dyn RangeReader,
    offset: u64,
    bytes: u64,
    arena: &Arc<Arena>,
    what: &str,
) -> Result<Held> {
    let len =
        usize::try_from(bytes).map_err(|_| RuntimeError::Config(format!("{what}: too large")))?;
    let cap = flea_io::required_capacity(offset, len);
    let reservation = arena.reserve(cap as u64, what)?;
    let mut buf = AlignedBuf::new(cap)?;
    let range = reader.read(offset, len, &mut buf)?;
    Ok(Held {
        buf,
        range,
        _reservation: reservation,
    })
}

/// Per layer, whether a unit of it satisfies `keep` (output slices count for no layer).
fn layers_where(
    units: &[crate::plan::Unit],
    n_layers: usize,
    keep: impl Fn(&crate::plan::Unit) -> bool,
) -> Vec<bool> {
    let mut v = vec![false; n_layers];
    for u in units.iter().filter(|u| keep(u)) {
        if let UnitKind::Layer(il) = u.kind {
            if let Some(x) = v.get_mut(il) {
                *x = true;
            }
        }
    }
    v
}

fn count(v: &[bool]) -> u64 {
    v.iter().filter(|&&x| x).count() as u64
}

/// Unit `u` into the backend's own memory from `bytes` (its host copy, which the backend may
/// rearrange in place), under `reservation` (its device budget, taken before the bytes were).
fn place_resident<B: UnitStaging>(
    backend: &B,
    model: &Model,
    u: &crate::plan::Unit,
    bytes: &mut [u8],
    reservation: Reservation,
) -> Result<Holding> {
    let key = unit_key(model, u.offset, u.bytes)?;
    let weights = unit_matmul_weights(model, u.offset, u.bytes);
    backend.make_resident_weights(key, bytes, &weights)?;
    Ok(Holding::Device {
        _budget: reservation,
    })
}

impl<'m, B: UnitStaging> StreamedModel<'m, B> {
    pub fn new(
        model: &'m Model,
        backend: &'m B,
        plan: Plan,
        path: &Path,
        io: &IoOptions,
        n_ctx: usize,
        batch: usize,
    ) -> Result<Self> {
        let driver_base = backend.driver_memory().map(|(used, _)| used);
        let device = Arena::new("device", plan.vram_budget);
        let host = Arena::new("host cache", plan.ram_budget);
        let cfg = &model.cfg;
        let mut fixed = Vec::new();
        let kv_budget = device.reserve(plan.kv_bytes, "KV cache")?;
        let kv_shape = KvShape {
            n_layers: cfg.n_layers,
            n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            n_seq: plan.n_seq.max(1),
        };
        let shared_kv: Vec<bool> = (0..cfg.n_layers)
            .map(|il| plan.kv_shared.get(il) == Some(&true))
            .collect();
        // Layers the budget holds no device cache for share one from the start.
        let kv = if plan.kv_shared.contains(&true) {
            backend
                .alloc_kv_shared(kv_shape, &plan.kv_shared)?
                .ok_or_else(|| {
                    RuntimeError::Config(
                        "the plan shares device KV caches the backend cannot share".into(),
                    )
                })?
        } else {
            backend.alloc_kv(kv_shape)?
        };
        fixed.push(device.reserve(plan.act_bytes, "activations")?);
        let out_rows = plan.output_rows_per_unit.min(model.layout.output.rows);
        let scratch = Scratch::with_logits_width(backend, cfg, batch, out_rows)?;
        fixed.push(device.reserve(plan.misc_bytes, "embedding rows and output norm")?);

        let mut reader = flea_io::open_reader(path, io)?;
        // Embedding rows are a few KB a token, and the same tokens come back: read them
        // through the page cache. (With O_DIRECT each decode token waited on the disk for
        // them, 40-45 us on the dev VM, before its first kernel: docs/BENCHMARKS.md.)
        let embed_reader = flea_io::open_reader(
            path,
            &IoOptions {
                backend: flea_io::IoBackend::Pread,
                direct: false,
                drop_cache: false,
                ..io.clone()
            },
        )?;
        let emb = &model.layout.token_embd;
        let emb_row = emb.size / emb.rows.max(1);
        let embed_buf = AlignedBuf::new(emb_row + 2 * flea_io::ALIGN)?;
        let on = &model.layout.output_norm;
        let mut norm_buf = AlignedBuf::new(flea_io::required_capacity(on.file_offset, on.size))?;
        let r = reader.read(on.file_offset, on.size, &mut norm_buf)?;
        let output_norm = norm_buf.as_slice()[r].to_vec();

        // Resident and cached units: read once, now. A backend with its own memory takes
        // resident units into it (the host copy is dropped); host-cached units are pinned so
        // each pass copies them by DMA.
        let in_place = backend.computes_in_place();
        let mut pinned = Vec::new();
        let mut held = Vec::with_capacity(plan.units.len());
        for u in &plan.units {
            held.push(match u.tier {
                Tier::Resident if in_place => Some(Holding::Host(read_unit(
                    reader.as_mut(),
                    u.offset,
                    u.bytes,
                    &device,
                    "resident weights",
                )?)),
                Tier::Resident => {
                    let reservation = device.reserve(u.held_bytes(), "resident weights")?;
                    let mut tmp =
                        AlignedBuf::new(flea_io::required_capacity(u.offset, u.bytes as usize))?;
                    let r = reader.read(u.offset, u.bytes as usize, &mut tmp)?;
                    let bytes = &mut tmp.as_mut_slice()[r];
                    Some(place_resident(backend, model, u, bytes, reservation)?)
                }
                Tier::HostCache => {
                    let mut h = read_unit(
                        reader.as_mut(),
                        u.offset,
                        u.bytes,
                        &host,
                        "host-cached weights",
                    )?;
                    if !in_place {
                        backend.pin(h.buf.as_mut_slice())?;
                        pinned.push((h.buf.as_ptr() as usize, h.buf.capacity()));
                    }
                    Some(Holding::Host(h))
                }
                Tier::Disk => None,
            });
        }
        // A staging backend copies every non-resident unit into one of `ring_depth` device
        // slots, and reads streamed units into pinned host slots charged to host RAM.
        let mut device_slots = Vec::new();
        let non_resident = plan.units.iter().any(|u| u.tier != Tier::Resident);
        if !in_place && non_resident {
            let depth = plan.ring_depth.max(1);
            for _ in 0..depth {
                device_slots.push(device.reserve(plan.slot_bytes, "device ring slot")?);
            }
            let cap = usize::try_from(plan.slot_bytes)
                .map_err(|_| RuntimeError::Config("slot too large".into()))?;
            backend.prepare_slots(depth, cap)?;
        }
        let slot_arena = if in_place { &device } else { &host };
        let order: Vec<usize> = plan
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.tier == Tier::Disk)
            .map(|(i, _)| i)
            .collect();
        let ring = if order.is_empty() {
            None
        } else {
            let depth = plan.ring_depth.max(1);
            let (free_tx, free_rx) = sync_channel::<AlignedBuf>(depth);
            let (filled_tx, filled_rx) = sync_channel::<Filled>(depth);
            let mut slots = std::mem::take(&mut device_slots);
            for _ in 0..depth {
                slots.push(slot_arena.reserve(plan.slot_bytes, "ring slot")?);
                let cap = usize::try_from(plan.slot_bytes)
                    .map_err(|_| RuntimeError::Config("slot too large".into()))?;
                let mut buf = AlignedBuf::new(cap)?;
                if !in_place {
                    backend.pin(buf.as_mut_slice())?;
                    pinned.push((buf.as_ptr() as usize, buf.capacity()));
                }
                free_tx
                    .send(buf)
                    .map_err(|_| RuntimeError::Stream("ring closed".into()))?;
            }
            let ranges: Vec<(u64, usize)> = order
                .iter()
                .map(|&i| (plan.units[i].offset, plan.units[i].bytes as usize))
                .collect();
            let thread = std::thread::Builder::new()
                .name("flea-io".into())
                .spawn(move || io_loop(reader, ranges, free_rx, filled_tx))
                .map_err(|e| RuntimeError::Stream(format!("starting the I/O thread: {e}")))?;
            Some(Ring {
                free: Some(free_tx),
                filled: filled_rx,
                thread: Some(thread),
                order,
                next_seq: 0,
                _slots: slots,
            })
        };
        fixed.extend(device_slots);
        Ok(StreamedModel {
            model,
            backend,
            plan,
            device,
            host,
            held,
            cpu_side: None,
            hybrid: None,
            kv_valid: vec![[0, 0]; cfg.n_layers],
            shared_kv,
            kv_sharing: true,
            kv_budget,
            ahead: StagedAhead {
                units: std::collections::VecDeque::new(),
                next: 0,
                depth: 0,
            },
            pinned,
            ring,
            embed_reader,
            embed_buf,
            embed_rows: Vec::new(),
            chain_table: None,
            picked: Vec::new(),
            output_norm,
            kv,
            scratch,
            batch: batch.max(1),
            n_ctx,
            pos: 0,
            stats: StreamStats::default(),
            trace: Trace::default(),
            poisoned: None,
            driver_base,
            driver_peak: None,
            _fixed: fixed,
        })
    }

    /// Hybrid execution: let `cpu` compute host-cached layers in place (decode-sized
    /// batches) while the GPU takes the rest. Which layers is measured, not assumed: the
    /// CPU's rate through those layers alone and while the copy engine streams (both read
    /// host RAM, and on some machines they slow each other down), and the copy engine's rate
    /// meanwhile. Of "every non-resident layer copied to the GPU", "every one computed by the
    /// CPU" and "a balanced split computed concurrently", the fastest predicted is taken.
    /// `cpu_rate` (bytes of weights per second) skips the measurement and forces a split at
    /// that rate. The CPU's KV cache and activations are charged to the host budget.
    pub fn attach_cpu(
        &mut self,
        cpu: &'m CpuBackend,
        cpu_rate: Option<f64>,
    ) -> Result<Option<HybridReport>> {
        if self.backend.computes_in_place() {
            return Err(RuntimeError::Config(
                "hybrid execution needs a backend with its own memory".into(),
            ));
        }
        if self.plan.n_seq > 1 {
            return Err(RuntimeError::Config(
                "hybrid execution runs one sequence at a time".into(),
            ));
        }
        if self.cpu_side.is_some() {
            return Err(RuntimeError::Config("a CPU is attached already".into()));
        }
        // Layers planned without a device cache of their own (the budget holds none) must be
        // computed by the CPU in decode, whatever the measurement prefers.
        let forced = self.shared_kv.contains(&true);
        let Some(h2d) = self.plan.links.host_to_device else {
            if forced {
                return Err(RuntimeError::Config(
                    "layers without a device KV cache need the hybrid, which needs a host→device link".into(),
                ));
            }
            return Ok(None);
        };
        let report = match cpu_rate {
            Some(r) => HybridReport {
                choice: HybridChoice::Split,
                cpu_alone: r,
                cpu_contended: r,
                copy_contended: h2d,
                predicted_seconds: [0.0; 3],
                adaptive: false,
                rebalanced: None,
                kv_shared_layers: 0,
                promoted_units: 0,
            },
            None => {
                // Each measured twice, the faster kept: a short slowdown elsewhere on the
                // machine during one measurement (seen on the lent GPU host: both rates at a
                // fifth of normal) would otherwise decide the split for the whole run.
                let mut alone = 0.0f64;
                let mut best: Option<(f64, f64)> = None;
                for _ in 0..START_MEASUREMENTS {
                    let Some((a, _)) = self.measure_cpu(cpu, false)? else {
                        return Ok(None);
                    };
                    alone = alone.max(a);
                    let Some((c, copy)) = self.measure_cpu(cpu, true)? else {
                        return Ok(None);
                    };
                    let copy = copy.unwrap_or(h2d);
                    if best.is_none_or(|(bc, bk)| c + copy > bc + bk) {
                        best = Some((c, copy));
                    }
                }
                let Some((contended, copy)) = best else {
                    return Ok(None);
                };
                let (mut layers, mut other) = (0u64, 0u64);
                for u in self.plan.units.iter().filter(|u| u.tier == Tier::HostCache) {
                    match u.kind {
                        UnitKind::Layer(_) => layers += u.bytes,
                        UnitKind::Output { .. } => other += u.bytes,
                    }
                }
                let (l, o) = (layers as f64, other as f64);
                let predicted = [
                    (l + o) / h2d,
                    l / alone + o / h2d,
                    (l + o) / (contended + copy),
                ];
                let best = (0..3)
                    .min_by(|&a, &b| predicted[a].total_cmp(&predicted[b]))
                    .unwrap_or(0);
                // Streaming everything cannot hold the forced layers' rows: split instead.
                let best = if forced && best == 0 { 2 } else { best };
                HybridReport {
                    choice: [
                        HybridChoice::Stream,
                        HybridChoice::CpuOnly,
                        HybridChoice::Split,
                    ][best],
                    cpu_alone: alone,
                    cpu_contended: contended,
                    copy_contended: copy,
                    predicted_seconds: predicted,
                    adaptive: true,
                    rebalanced: None,
                    kv_shared_layers: 0,
                    promoted_units: 0,
                }
            }
        };
        match report.choice {
            HybridChoice::Stream => {
                self.plan.units.iter_mut().for_each(|u| u.on_cpu = false);
                self.hybrid = Some(report);
                return Ok(self.hybrid);
            }
            HybridChoice::CpuOnly => {
                // Every host-cached layer on the CPU (outputs stay on the GPU).
                crate::plan::split_for_cpu(&mut self.plan.units, f64::MAX / 4.0, h2d, 1);
                self.plan.links.cpu_compute = Some(report.cpu_alone);
            }
            HybridChoice::Split => {
                crate::plan::split_for_cpu_keeping(
                    &mut self.plan.units,
                    report.cpu_contended,
                    report.copy_contended,
                    crate::plan::hybrid_run(self.plan.ring_depth),
                    &self.shared_kv,
                );
                self.plan.links.cpu_compute = Some(report.cpu_contended);
            }
        }
        self.hybrid = Some(report);
        self.ahead.depth = match std::env::var("FLEA_PRESTAGE").as_deref() {
            Ok("0") => 0,
            _ => self.plan.ring_depth.max(1),
        };
        let cfg = &self.model.cfg;
        let cpu_layers = self.plan.units.iter().filter(|u| u.on_cpu).count();
        if cpu_layers == 0 {
            return Ok(self.hybrid);
        }
        let shape = KvShape {
            n_layers: cfg.n_layers,
            n_seq: 1,
            n_ctx: self.n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
        };
        let per_layer = (shape.bytes() / cfg.n_layers.max(1)) as u64;
        let units = &self.plan.units;
        // KV room for every host-cached layer if the budget allows (so decode may re-balance
        // the split), else for the layers the CPU has now.
        let cached = layers_where(units, cfg.n_layers, |u| u.tier == Tier::HostCache);
        let on_cpu = layers_where(units, cfg.n_layers, |u| u.on_cpu);
        let (kv_res, may_take) = match self
            .host
            .reserve(per_layer * count(&cached), "CPU layers' KV cache")
        {
            Ok(r) => (r, cached),
            Err(_) => {
                if let Some(h) = self.hybrid.as_mut() {
                    h.adaptive = false;
                }
                let r = self
                    .host
                    .reserve(per_layer * count(&on_cpu), "CPU layers' KV cache")?;
                (r, on_cpu)
            }
        };
        let reservations = vec![
            kv_res,
            self.host.reserve(
                Scratch::<CpuBackend>::bytes(cfg, HYBRID_MAX_BATCH, 1),
                "CPU activations",
            )?,
        ];
        self.cpu_side = Some(CpuSide {
            cpu,
            kv: cpu.alloc_kv(shape)?,
            scratch: Scratch::with_logits_width(cpu, cfg, HYBRID_MAX_BATCH, 1)?,
            _reservations: reservations,
            pinned_kv: vec![false; cfg.n_layers],
            may_take,
            window: (0, 0.0, 0),
        });
        self.pin_cpu_kv()?;
        self.share_device_kv()?;
        Ok(self.hybrid)
    }

    /// Whether `attach_cpu` may share the device caches of the layers the CPU computes in
    /// decode (on by default; set before `attach_cpu`). Sharing frees device memory for more
    /// resident units, and costs each prompt a copy of those layers' rows in and out.
    pub fn set_kv_sharing(&mut self, on: bool) {
        self.kv_sharing = on;
    }

    /// Hybrid: a layer the CPU computes in decode needs no device cache of its own — the
    /// CPU keeps its rows, and a prompt, which runs it on the device, copies them in before
    /// and out after. The layers a split at `KV_SHARE_RATE` of the CPU's measured speed
    /// gives it share one layer's device room and stay on the CPU from then on (decode's
    /// re-balancing moves only the others); the room that frees holds host-cached units,
    /// the first in pass order while they fit, whose bytes then no longer cross from host
    /// memory every token; the split is made again over the rest. Nothing changes unless
    /// a unit becomes resident.
    fn share_device_kv(&mut self) -> Result<()> {
        let (Some(report), Some(cs)) = (self.hybrid, self.cpu_side.as_ref()) else {
            return Ok(());
        };
        if !self.kv_sharing || self.pos != 0 || report.choice == HybridChoice::Stream {
            return Ok(());
        }
        let m = self.model;
        let n_layers = m.cfg.n_layers;
        // One layer's device cache (the plan's total may already share some).
        let kv_layer = KvShape {
            n_layers: 1,
            n_ctx: self.n_ctx,
            n_head_kv: m.cfg.n_head_kv,
            head_dim: m.cfg.head_dim,
            n_seq: self.plan.n_seq.max(1),
        }
        .bytes() as u64;
        let (rate, run) = match report.choice {
            HybridChoice::CpuOnly => (f64::MAX / 4.0, 1),
            _ => (
                report.cpu_contended,
                crate::plan::hybrid_run(self.plan.ring_depth),
            ),
        };
        let copy = report.copy_contended;
        let on_cpu = |units: &[crate::plan::Unit]| layers_where(units, n_layers, |u| u.on_cpu);
        // The CPU's layers in a split for a slower CPU: kept on the CPU whatever decode
        // finds.
        let shared_of = |units: &[crate::plan::Unit]| {
            let mut slower = units.to_vec();
            crate::plan::split_for_cpu(&mut slower, rate * kv_share_rate(), copy, run);
            on_cpu(&slower)
        };
        let kv_need = |shared: &[bool]| {
            let c = count(shared);
            kv_layer * (n_layers as u64 - c + u64::from(c > 0))
        };
        let others = self.device.used().saturating_sub(self.kv_budget.bytes());
        let mut units = self.plan.units.clone();
        let (mut promote, mut promoted_bytes) = (Vec::new(), 0u64);
        // Layers planned with shared caches stay shared.
        let forced = self.shared_kv.clone();
        let mut shared = forced.clone();
        // Each round makes one more host-cached unit resident (at most one per unit).
        // (Never a forced layer: the CPU computes it, its rows are not on the device.)
        while let Some(c) = units
            .iter()
            .position(|u| u.tier == Tier::HostCache && !u.is_layer_in(&forced))
        {
            let mut trial = units.clone();
            trial[c].tier = Tier::Resident;
            let s: Vec<bool> = shared_of(&trial)
                .iter()
                .zip(&forced)
                .map(|(&a, &b)| a || b)
                .collect();
            crate::plan::split_for_cpu_keeping(&mut trial, rate, copy, run, &s);
            let cpu_room = on_cpu(&trial)
                .iter()
                .zip(&cs.may_take)
                .all(|(&on, &room)| !on || room);
            let held = trial[c].held_bytes();
            if !cpu_room || others + kv_need(&s) + promoted_bytes + held > self.device.budget {
                break;
            }
            promoted_bytes += held;
            promote.push(c);
            units = trial;
            shared = s;
        }
        if promote.is_empty() || !self.backend.share_kv_layers(&mut self.kv, &shared)? {
            return Ok(());
        }
        let kv_bytes = kv_need(&shared);
        self.kv_budget.shrink_to(kv_bytes);
        for &c in &promote {
            let reservation = self
                .device
                .reserve(units[c].held_bytes(), "resident weights")?;
            let Some(Holding::Host(h)) = self.held[c].as_mut() else {
                return Err(RuntimeError::Stream(format!(
                    "unit {c} is not in the host cache"
                )));
            };
            let range = h.range.clone();
            let placed = place_resident(
                self.backend,
                m,
                &units[c],
                &mut h.buf.as_mut_slice()[range],
                reservation,
            )?;
            let addr = h.buf.as_ptr() as usize;
            if let Some(i) = self.pinned.iter().position(|&(a, _)| a == addr) {
                let (a, len) = self.pinned.swap_remove(i);
                self.backend.unpin(a, len);
            }
            // The host copy (and its host budget) goes.
            self.held[c] = Some(placed);
        }
        self.plan.device_bytes =
            self.plan.device_bytes - self.plan.kv_bytes + kv_bytes + promoted_bytes;
        self.plan.kv_bytes = kv_bytes;
        self.plan.units = units;
        self.shared_kv = shared;
        if let Some(h) = self.hybrid.as_mut() {
            h.kv_shared_layers = count(&self.shared_kv) as usize;
            h.promoted_units = promote.len();
        }
        self.pin_cpu_kv()
    }

    /// Let decode re-balance a hybrid split (on by default for a measured one, off for a
    /// rate the caller gave) to the CPU's observed rate. No effect without a split.
    pub fn adapt_hybrid(&mut self, on: bool) {
        if let Some(h) = self.hybrid.as_mut() {
            h.adaptive = on && h.choice == HybridChoice::Split;
        }
    }

    /// Allocate and page-lock the KV caches of the layers the CPU computes, where not done
    /// yet: the first decode step after a prompt copies the prompt's rows of each one over
    /// from the GPU straight into them. Best effort: unpinned they are only slower to fill.
    fn pin_cpu_kv(&mut self) -> Result<()> {
        let Some(cs) = self.cpu_side.as_mut() else {
            return Ok(());
        };
        for u in self.plan.units.iter().filter(|u| u.on_cpu) {
            let UnitKind::Layer(il) = u.kind else {
                continue;
            };
            if cs.pinned_kv.get(il) != Some(&false) {
                continue;
            }
            let (k, v) = cs.kv.layer_bytes_mut(il)?;
            for buf in [k, v] {
                if self.backend.pin(buf).is_ok() {
                    self.pinned.push((buf.as_ptr() as usize, buf.len()));
                }
            }
            cs.pinned_kv[il] = true;
        }
        Ok(())
    }

    /// Hybrid decode: every `REBALANCE_PASSES` passes, compare the rate the CPU actually
    /// computed its layers at (in the token loop: beside the copies, with attention over
    /// the growing context) with the rate the split assumed, and re-split if they differ by
    /// more than `REBALANCE_TOLERANCE`. The start-up measurement times matmuls alone.
    fn rebalance_hybrid(&mut self, cpu_bytes: u64, cpu_seconds: f64) -> Result<()> {
        let (Some(report), Some(cs)) = (self.hybrid.as_mut(), self.cpu_side.as_mut()) else {
            return Ok(());
        };
        if !report.adaptive || report.choice != HybridChoice::Split || cpu_bytes == 0 {
            return Ok(());
        }
        cs.window.0 += cpu_bytes;
        cs.window.1 += cpu_seconds;
        cs.window.2 += 1;
        if cs.window.2 < REBALANCE_PASSES {
            return Ok(());
        }
        let (bytes, seconds, _) = std::mem::take(&mut cs.window);
        let observed = bytes as f64 / seconds.max(1e-9);
        // The plan's links keep the start-up measurement (the floor is computed from it).
        let assumed = report.rebalanced.map_or(report.cpu_contended, |(r, _)| r);
        if (observed / assumed - 1.0).abs() <= REBALANCE_TOLERANCE {
            return Ok(());
        }
        let mut units = self.plan.units.clone();
        // A layer whose device cache is shared stays on the CPU.
        crate::plan::split_for_cpu_keeping(
            &mut units,
            observed,
            report.copy_contended,
            crate::plan::hybrid_run(self.plan.ring_depth),
            &self.shared_kv,
        );
        // Only layers whose KV cache the CPU side has room for.
        let fits = units.iter().all(|u| match (u.on_cpu, &u.kind) {
            (true, UnitKind::Layer(il)) => cs.may_take.get(*il) == Some(&true),
            _ => true,
        });
        if !fits {
            report.adaptive = false;
            return Ok(());
        }
        // Counted only when layers change sides; the rate is remembered either way.
        let moved = units
            .iter()
            .zip(&self.plan.units)
            .any(|(a, b)| a.on_cpu != b.on_cpu);
        let n = report.rebalanced.map_or(0, |(_, n)| n) + u32::from(moved);
        report.rebalanced = Some((observed, n));
        self.plan.units = units;
        self.pin_cpu_kv()
    }

    /// Bytes of weights per second the CPU multiplies through at batch 1, timed on the
    /// host-cached layers as they lie in RAM (up to 2 GiB of them, so caches don't flatter
    /// it), after one warm-up layer. With `with_copies`, the copy engine meanwhile streams
    /// host-cached units into the device slots, and its rate is returned too. None when no
    /// layer is host-cached.
    fn measure_cpu(
        &self,
        cpu: &CpuBackend,
        with_copies: bool,
    ) -> Result<Option<(f64, Option<f64>)>> {
        let m = self.model;
        let b = self.backend;
        let mut copied = 0u64;
        let copy_start = Instant::now();
        if with_copies {
            let cached: Vec<usize> = (0..self.plan.units.len())
                .filter(|&i| self.plan.units[i].tier == Tier::HostCache)
                .collect();
            // About 4 GiB of copies (bounded count), queued before the CPU starts.
            for &i in cached.iter().cycle().take(64) {
                if copied >= 4 << 30 {
                    break;
                }
                let u = &self.plan.units[i];
                if let Some(Holding::Host(h)) = &self.held[i] {
                    let key = unit_key(m, u.offset, u.bytes)?;
                    let st = b.stage(key, &h.buf.as_slice()[h.range.clone()])?;
                    b.finish(st, false)?;
                    copied += u.bytes;
                }
            }
        }
        let mut layers = Vec::new();
        for (u, h) in self.plan.units.iter().zip(&self.held) {
            if let (UnitKind::Layer(il), Tier::HostCache, Some(Holding::Host(h))) =
                (&u.kind, u.tier, h)
            {
                layers.push((*il, h, u.offset));
            }
        }
        if layers.is_empty() {
            return Ok(None);
        }
        let mut bytes = 0usize;
        let mut seconds = 0.0f64;
        for (i, &(il, h, offset)) in layers.iter().enumerate() {
            let w = m.layout.layers[il].views(&h.buf.as_slice()[h.range.clone()], offset)?;
            let mats = [&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down];
            let mut io = Vec::with_capacity(mats.len());
            for w in mats {
                let mut x = cpu.alloc_act(1, w.cols)?;
                let vals: Vec<f32> = (0..w.cols)
                    .map(|j| ((j * 7919) % 113) as f32 / 113.0 - 0.5)
                    .collect();
                cpu.write(&vals, &mut x)?;
                io.push((x, cpu.alloc_act(1, w.rows)?));
            }
            let t = Instant::now();
            for (w, (x, out)) in mats.iter().zip(io.iter_mut()) {
                cpu.matmul(1, w, x, out)?;
            }
            if i > 0 || layers.len() == 1 {
                seconds += t.elapsed().as_secs_f64();
                bytes += mats.iter().map(|w| w.data.len()).sum::<usize>();
            }
            if bytes >= 2 << 30 {
                break;
            }
        }
        let copy_rate = if with_copies && copied > 0 {
            b.wait_idle()?;
            Some(copied as f64 / copy_start.elapsed().as_secs_f64().max(1e-9))
        } else {
            None
        };
        Ok((seconds > 0.0).then(|| (bytes as f64 / seconds, copy_rate)))
    }

    /// An error if an earlier streaming failure left the executor unusable.
    fn check_not_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(p) => Err(RuntimeError::Stream(format!(
                "an earlier streaming error left the ring unusable: {p}"
            ))),
            None => Ok(()),
        }
    }

    /// Evaluate `tokens` after the cached ones; one pass over the weights per batch.
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.check_not_poisoned()?;
        if tokens.is_empty() {
            return Err(RuntimeError::Input(
                "nothing to evaluate (empty token list)".into(),
            ));
        }
        if self.pos + tokens.len() > self.n_ctx {
            return Err(RuntimeError::Input(format!(
                "context full: {} + {} tokens exceed the context size {}",
                self.pos,
                tokens.len(),
                self.n_ctx
            )));
        }
        let n_chunks = tokens.len().div_ceil(self.batch);
        let mut out = Vec::new();
        for (ci, chunk) in tokens.chunks(self.batch).enumerate() {
            let want = match which {
                Logits::All => Some(Logits::All),
                Logits::Last if ci + 1 == n_chunks => Some(Logits::Last),
                Logits::Last => None,
            };
            let rows = Row::consecutive(0, self.pos, chunk.len());
            let want = match want {
                Some(w) => Want::Which(w),
                None => Want::Nothing,
            };
            match self.pass(PassInput::Tokens(chunk), &rows, want) {
                Ok(l) => {
                    self.pos += chunk.len();
                    out.extend(l)
                }
                Err(e) => {
                    self.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Rows a single `step` may hold.
    pub fn capacity(&self) -> usize {
        self.batch
    }

    /// One weight pass for a batch that may mix sequences (continuous batching): `tokens[i]`
    /// goes to `rows[i]` (KV sequence slot and position). Every streamed unit is read once
    /// and applied to all rows. Returns the logits of the rows `logit_rows` (indices into the
    /// batch), `[logit_rows.len()][n_vocab]`. Does not move `pos`.
    pub fn step(&mut self, tokens: &[u32], rows: &[Row], logit_rows: &[usize]) -> Result<Vec<f32>> {
        self.check_step(tokens, rows)?;
        let want = if logit_rows.is_empty() {
            Want::Nothing
        } else {
            Want::Rows(logit_rows)
        };
        self.pass(PassInput::Tokens(tokens), rows, want)
            .inspect_err(|e| self.poisoned = Some(e.to_string()))
    }

    /// As [`Self::step`], with each wanted row's token picked on the backend instead of its
    /// logits read back: `picks[i]` (with its draw) chooses the token of row
    /// `logit_rows[i]`, as [`SlotPick::pick_on_host`] would from its logits. Needs
    /// [`Self::picks_rows`]. Returns the tokens in `logit_rows`' order.
    pub fn step_picks(
        &mut self,
        tokens: &[u32],
        rows: &[Row],
        logit_rows: &[usize],
        picks: &[SlotPick],
    ) -> Result<Vec<u32>> {
        self.check_step(tokens, rows)?;
        if picks.len() != logit_rows.len() || !self.picks_rows() {
            return Err(RuntimeError::Input(format!(
                "{} picks for {} rows, or this plan cannot pick on the backend",
                picks.len(),
                logit_rows.len()
            )));
        }
        self.picked.clear();
        let want = if logit_rows.is_empty() {
            Want::Nothing
        } else {
            Want::Picks(logit_rows, picks)
        };
        self.pass(PassInput::Tokens(tokens), rows, want)
            .inspect_err(|e| self.poisoned = Some(e.to_string()))?;
        let picked = std::mem::take(&mut self.picked);
        if picked.len() != logit_rows.len() {
            return Err(RuntimeError::Stream(format!(
                "{} tokens picked for {} rows",
                picked.len(),
                logit_rows.len()
            )));
        }
        Ok(picked)
    }

    /// A step's tokens and rows fit this executor, and no earlier failure poisoned it.
    fn check_step(&self, tokens: &[u32], rows: &[Row]) -> Result<()> {
        self.check_not_poisoned()?;
        if tokens.is_empty() || tokens.len() != rows.len() || tokens.len() > self.batch {
            return Err(RuntimeError::Input(format!(
                "a step of {} tokens with {} rows (capacity {})",
                tokens.len(),
                rows.len(),
                self.batch
            )));
        }
        Ok(())
    }

    /// Whether [`Self::step_picks`] can run: the output matrix is one unit (the backend
    /// picks from whole rows of logits).
    pub fn picks_rows(&self) -> bool {
        let vocab = self.model.cfg.n_vocab;
        let mut outputs = self.plan.units.iter().filter_map(|u| match u.kind {
            UnitKind::Output { start, end } => Some((start, end)),
            _ => None,
        });
        outputs.next() == Some((0, vocab)) && outputs.next().is_none()
    }

    /// How the backend picks what `sampler` would sample next, its draw still to be filled
    /// in ([`SlotPick::with_draw`]): greedy, or sampling the backend takes; None where it
    /// cannot (a repetition penalty; top-k above its limit).
    pub fn slot_pick_for(&self, sampler: &Sampler) -> Option<SlotPick> {
        if sampler.cfg.is_plain_greedy() {
            Some(SlotPick::Greedy)
        } else {
            self.backend_sampling(sampler)
        }
    }

    /// Whether greedy decode can run chained on the backend (`decode_greedy`): the backend
    /// keeps token slots, no CPU side computes layers, every unit is held in device memory,
    /// and the whole embedding table is there too — shared with a tied output unit, or
    /// placed now if the device budget has room for it. Found once; later calls are free.
    pub fn prepare_chain(&mut self) -> Result<bool> {
        if self.chain_table.is_none() {
            self.chain_table = Some(self.place_chain_table()?);
        }
        Ok(self.chain_table.as_ref().is_some_and(ChainTable::usable))
    }

    /// Greedy decode chained on the backend: evaluates `first` (sampled by the caller, not
    /// yet evaluated) and then each token it yields, up to `max` passes, handing every new
    /// token to `on_token` in order until it returns false. Each pass's token goes from the
    /// backend's argmax straight into the next pass's embedding; the host reads tokens
    /// [`CHAIN_AHEAD`] − 1 passes behind the queue, so the device never waits for the host
    /// between tokens. Returns how many tokens went to `on_token` (each one a pass). A pass
    /// queued past the stop is waited for and its cache position forgotten.
    /// Needs `prepare_chain` to have said yes.
    pub fn decode_greedy(
        &mut self,
        first: u32,
        max: usize,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        self.decode_chained_here(first, max, None, on_token)
    }

    /// As [`Self::decode_greedy`], each token sampled on the backend as `sampler` would
    /// sample it on the host (without a repetition penalty: top-k sampling of at most
    /// `Backend::slot_top_k_max` candidates, or whole-vocabulary sampling where
    /// `Backend::slot_samples_vocab` takes it): the host draws each pass's uniform number
    /// when it queues the pass, and puts back the draws of passes queued past the stop, so
    /// the sampler continues as if it had sampled exactly the tokens delivered.
    pub fn decode_sampled(
        &mut self,
        first: u32,
        max: usize,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        self.decode_chained_here(first, max, Some(sampler), on_token)
    }

    /// `decode_sampled` for a caller of [`Self::step`] (the server): sequence slot `seq`,
    /// `first` fed at `pos0`. Leaves `pos` (the `eval` sequence's position) alone; a pass
    /// queued past the stop wrote the cache row at `pos0` + the returned count, which the
    /// caller's next token overwrites.
    pub fn decode_chained_at(
        &mut self,
        seq: usize,
        pos0: usize,
        first: u32,
        max: usize,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        if seq >= self.plan.n_seq {
            return Err(RuntimeError::Input(format!(
                "sequence slot {seq} of {}",
                self.plan.n_seq
            )));
        }
        self.decode_chained(seq, pos0, first, max, Some(sampler), on_token)
    }

    /// A chained decode of the `eval` sequence at its position.
    fn decode_chained_here(
        &mut self,
        first: u32,
        max: usize,
        sampler: Option<&mut Sampler>,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        let pos0 = self.pos;
        let delivered = self.decode_chained(0, pos0, first, max, sampler, on_token)?;
        // A pass queued past the stop: its cache row (at the new position) is overwritten
        // by whatever comes next.
        self.pos = pos0 + delivered;
        self.rewind(self.pos);
        Ok(delivered)
    }

    /// Whether `sampler` can sample on the backend in a chained decode.
    pub fn samples_on_backend(&self, sampler: &Sampler) -> bool {
        sampler.cfg.is_plain_greedy() || self.backend_sampling(sampler).is_some()
    }

    /// How the backend samples what `sampler` samples (top-k with at most
    /// `Backend::slot_top_k_max` candidates, or the whole vocabulary where the backend takes
    /// it), the draw to be filled in per pass; None if it cannot.
    fn backend_sampling(&self, sampler: &Sampler) -> Option<SlotPick> {
        let max_k = self.backend.slot_top_k_max();
        if let Some(how) = sampler.cfg.top_k_sampling(max_k) {
            return Some(SlotPick::Sample(how, 0.0));
        }
        sampler
            .cfg
            .vocab_sampling()
            .filter(|how| self.backend.slot_samples_vocab(how))
            .map(|how| SlotPick::Vocab(how, 0.0))
    }

    fn decode_chained(
        &mut self,
        seq: usize,
        pos0: usize,
        first: u32,
        max: usize,
        mut sampler: Option<&mut Sampler>,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        if !self.prepare_chain()? {
            return Err(RuntimeError::Input(
                "decode cannot be chained on this plan".into(),
            ));
        }
        let how = match sampler.as_deref() {
            None => None,
            Some(s) if s.cfg.is_plain_greedy() => None,
            Some(s) => Some(self.backend_sampling(s).ok_or_else(|| {
                RuntimeError::Input(format!(
                    "this sampling cannot run on the backend (top-k {} of at most {}, top-p \
                     {}, repetition penalty {})",
                    s.cfg.top_k,
                    self.backend.slot_top_k_max(),
                    s.cfg.top_p,
                    s.cfg.repeat_penalty
                ))
            })?),
        };
        self.check_not_poisoned()?;
        if pos0 + max > self.n_ctx {
            return Err(RuntimeError::Input(format!(
                "context full: {pos0} + {max} tokens exceed the context size {}",
                self.n_ctx
            )));
        }
        let slots = self.backend.token_slots();
        // A slot is rewritten CHAIN_AHEAD passes later at the soonest: only after the host
        // has read it, and after the pass that embeds from it (queued in order before).
        debug_assert!(slots >= CHAIN_AHEAD);
        let (mut queued, mut delivered) = (0usize, 0usize);
        // The sampler's random state before each queued, undelivered pass drew (sampled).
        let mut rng_before = std::collections::VecDeque::with_capacity(CHAIN_AHEAD);
        let result: Result<()> = (|| {
            while delivered < max {
                while queued < max && queued < delivered + CHAIN_AHEAD {
                    let input = match queued {
                        0 => PassInput::Tokens(std::slice::from_ref(&first)),
                        k => PassInput::Slot((k - 1) % slots),
                    };
                    let pick = match (how, sampler.as_deref_mut()) {
                        (Some(how), Some(s)) => {
                            rng_before.push_back(s.rng().clone());
                            how.with_draw(s.draw())
                        }
                        _ => SlotPick::Greedy,
                    };
                    let rows = Row::consecutive(seq, pos0 + queued, 1);
                    // The first passes run as usual: they size the backend's scratch, which
                    // a recorded pass may not grow.
                    let record = queued >= RECORD_AFTER_PASSES;
                    self.chained_pass(input, &rows, queued % slots, pick, record)?;
                    queued += 1;
                }
                let token = self.backend.slot_token(delivered % slots)?;
                delivered += 1;
                rng_before.pop_front();
                if !on_token(token) {
                    break;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        // Invariants on the way out: every delivered token was a queued pass, and at most
        // CHAIN_AHEAD - 1 passes ran past the stop.
        debug_assert!(delivered <= queued && queued - delivered < CHAIN_AHEAD);
        if queued > delivered {
            // Its work counts against the decode that queued it.
            self.backend.wait_idle()?;
            // Its draw too: the sampler goes on as if it had sampled the delivered tokens.
            if let (Some(rng), Some(s)) = (rng_before.pop_front(), sampler) {
                s.set_rng(rng);
            }
        }
        Ok(delivered)
    }

    /// One pass of a chained decode, recorded by the backend and replayed as one unit where
    /// it can (`record`; a CUDA graph: its launches leave the host once, not one by one).
    /// A recording that fails runs nothing, so the pass then runs again without one.
    fn chained_pass(
        &mut self,
        input: PassInput,
        rows: &[Row],
        slot: usize,
        pick: SlotPick,
        record: bool,
    ) -> Result<()> {
        let b = self.backend;
        let t = Instant::now();
        if record && b.begin_pass_recording()? {
            let stats = self.stats.clone();
            let recorded = self.pass(input, rows, Want::Slot(slot, pick));
            if b.end_pass_recording(recorded.is_ok())? {
                self.stats.recorded_passes += 1;
                self.stats.record_seconds += t.elapsed().as_secs_f64();
                return recorded.map(drop);
            }
            // The pass runs again directly below; why it could not be recorded is said once.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if let Err(e) = &recorded {
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("flea: a decode pass could not be recorded ({e}); it ran directly");
                }
            }
            // Nothing of it ran: count it once, when it does.
            self.stats = stats;
        }
        self.pass(input, rows, Want::Slot(slot, pick)).map(drop)
    }

    fn place_chain_table(&mut self) -> Result<ChainTable> {
        let m = self.model;
        let b = self.backend;
        let emb = &m.layout.token_embd;
        let every_unit_held = self.plan.units.iter().all(|u| u.tier == Tier::Resident);
        if b.token_slots() < CHAIN_AHEAD
            || self.cpu_side.is_some()
            || !every_unit_held
            || emb.rows < m.cfg.n_vocab
            || m.layout.output.rows != m.cfg.n_vocab
        {
            return Ok(ChainTable::Unavailable);
        }
        let whole_table_is_output_unit = m.layout.output_is_tied
            && self.plan.units.iter().any(|u| {
                matches!(u.kind, UnitKind::Output { start: 0, end } if end == m.cfg.n_vocab)
                    && u.offset == emb.file_offset
                    && u.bytes == emb.size as u64
            });
        if whole_table_is_output_unit {
            return Ok(ChainTable::SharedWithOutput);
        }
        if b.computes_in_place() {
            return Ok(ChainTable::Mapped);
        }
        let what = "embedding table (chained greedy decode)";
        let held_bytes = flea_io::required_capacity(emb.file_offset, emb.size) as u64;
        let reservation = match self.device.reserve(held_bytes, what) {
            Ok(r) => r,
            // No room beside the plan: decode samples on the host as before.
            Err(RuntimeError::Budget { .. }) => return Ok(ChainTable::Unavailable),
            Err(e) => return Err(e),
        };
        let mut buf = AlignedBuf::new(held_bytes as usize)?;
        let range = self
            .embed_reader
            .read(emb.file_offset, emb.size, &mut buf)?;
        let key = unit_key(m, emb.file_offset, emb.size as u64)?;
        b.make_resident(key, &buf.as_slice()[range])?;
        Ok(ChainTable::Placed {
            _budget: reservation,
        })
    }

    /// The whole embedding table as the backend embeds from it in a chained decode.
    fn chain_table_weight(&self) -> Result<Weight<'m>> {
        let m = self.model;
        let emb = &m.layout.token_embd;
        // (The weight's bytes are the table's address in the file mapping: read there in
        // place, or resolved by the backend to its own copy.)
        if !self.chain_table.as_ref().is_some_and(ChainTable::usable) {
            return Err(RuntimeError::Stream("no table to chain from".into()));
        }
        Ok(Weight {
            ty: emb.ty,
            rows: emb.rows,
            cols: emb.cols,
            data: unit_key(m, emb.file_offset, emb.size as u64)?,
        })
    }

    /// At the start of a pass: keep the units the previous decode pass staged for this one
    /// (hybrid decode stages past the end of a pass, so the copy engine works through the
    /// pass's tail, the sampling and the resident layers too) when this pass uses the CPU
    /// and they are still, in order, the first units it copies to the GPU; else let them go
    /// (their slots are reused; the copies were wasted, as after a prompt or a re-split).
    fn take_carried_prestage(&mut self, use_cpu: bool) -> Result<()> {
        let n = self.plan.units.len();
        let carried = self.ahead.next.checked_sub(n);
        // Units this pass hands to the GPU that are not resident, in pass order: staged
        // ones must be exactly the first of them (a disk-streamed one ends staging).
        let mut gpu_copied = self
            .plan
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.tier != Tier::Resident && !(use_cpu && u.on_cpu))
            .map(|(i, _)| i);
        let keep = use_cpu
            && carried.is_some()
            && self
                .ahead
                .units
                .iter()
                .all(|(j, _)| gpu_copied.next() == Some(*j));
        if keep {
            self.stats.units_carried_over += self.ahead.units.len() as u64;
            self.ahead.next = carried.unwrap_or(0);
            return Ok(());
        }
        self.stats.units_carried_dropped += self.ahead.let_go(self.backend)?;
        Ok(())
    }

    /// Every layer of this one-row pass through the backend's fused decode, if each layer is
    /// held in device memory and the backend takes the model (false: nothing ran).
    fn fused_decode(&mut self, batch_rows: &[Row]) -> Result<bool> {
        let m = self.model;
        let mut layers = Vec::with_capacity(m.cfg.n_layers);
        for (ui, unit) in self.plan.units.iter().enumerate() {
            let UnitKind::Layer(il) = unit.kind else {
                continue;
            };
            if !matches!(self.held[ui], Some(Holding::Device { .. })) || il != layers.len() {
                return Ok(false);
            }
            let key = unit_key(m, unit.offset, unit.bytes)?;
            layers.push(m.layout.layers[il].views(key, unit.offset)?);
        }
        let t0 = Instant::now();
        let b = self.backend;
        let done = forward::blocks_fused(
            b,
            &m.cfg,
            &layers,
            batch_rows,
            &mut self.kv,
            &mut self.scratch,
        )?;
        if done {
            let t1 = Instant::now();
            self.stats.compute_seconds += (t1 - t0).as_secs_f64();
        }
        Ok(done)
    }

    /// One forward pass over all units for a batch of tokens.
    fn pass(&mut self, input: PassInput, batch_rows: &[Row], want: Want) -> Result<Vec<f32>> {
        let m = self.model;
        let cfg = &m.cfg;
        let b = self.backend;
        let n = batch_rows.len();
        let use_cpu = self.cpu_side.is_some()
            && n <= HYBRID_MAX_BATCH
            && batch_rows.iter().all(|r| r.seq == 0);
        self.take_carried_prestage(use_cpu)?;
        match input {
            PassInput::Tokens(tokens) if tokens.len() == n => self.embed_tokens(tokens)?,
            PassInput::Slot(slot) if n == 1 => {
                let table = self.chain_table_weight()?;
                forward::embed_from_slot(b, cfg, &table, slot, &mut self.scratch)?;
            }
            _ => {
                return Err(RuntimeError::Input(format!(
                    "a pass of {n} rows given another number of tokens"
                )))
            }
        }

        // One decode row with every layer in device memory: the backend may run all layers
        // in one go (the CUDA backend's fused decode); the loop below then skips them.
        let fused_layers = n == 1
            && self.cpu_side.is_none()
            && b.fuses_decode()
            && self.fused_decode(batch_rows)?;
        self.pass_units(n, batch_rows, want, use_cpu, fused_layers)
    }

    /// A pass's embedding rows, read straight from the file.
    fn embed_tokens(&mut self, tokens: &[u32]) -> Result<()> {
        let m = self.model;
        let n = tokens.len();
        let emb = &m.layout.token_embd;
        let row_bytes = emb.size / emb.rows.max(1);
        self.embed_rows.clear();
        for &t in tokens {
            if t as usize >= emb.rows {
                return Err(RuntimeError::Input(format!(
                    "token id {t} out of range (vocab {})",
                    emb.rows
                )));
            }
            let off = emb.file_offset + t as u64 * row_bytes as u64;
            let r = self
                .embed_reader
                .read(off, row_bytes, &mut self.embed_buf)?;
            self.embed_rows
                .extend_from_slice(&self.embed_buf.as_slice()[r]);
        }
        let table = Weight {
            ty: emb.ty,
            rows: n,
            cols: emb.cols,
            data: &self.embed_rows,
        };
        let local: Vec<u32> = (0..n as u32).collect();
        {
            // (embed reads only the table)
            let head = HeadWeights {
                token_embd: table,
                output_norm: table,
                output: table,
            };
            forward::embed(self.backend, &m.cfg, &head, &local, &mut self.scratch)?;
        }
        Ok(())
    }

    /// The units of a pass after its embedding: the streaming loop.
    fn pass_units(
        &mut self,
        n: usize,
        batch_rows: &[Row],
        want: Want,
        use_cpu: bool,
        fused_layers: bool,
    ) -> Result<Vec<f32>> {
        let m = self.model;
        let cfg = &m.cfg;
        let b = self.backend;
        let norm = Weight {
            ty: m.layout.output_norm.ty,
            rows: 1,
            cols: cfg.n_embd,
            data: &self.output_norm,
        };

        let mut logits = Vec::new();
        let mut rows = 0;
        // Hybrid: the CPU takes its layers for decode-sized batches; `x_on_cpu` says which
        // side holds the residual stream.
        // (One sequence only: the hand-over of KV rows assumes slot 0, consecutive positions.)
        let pos0 = batch_rows.first().map_or(0, |r| r.pos);
        let mut x_on_cpu = false;
        let cpu_before = (self.stats.bytes_host_cpu, self.stats.cpu_block_seconds);
        for ui in 0..self.plan.units.len() {
            let unit = &self.plan.units[ui];
            let (kind, tier, offset) = (unit.kind.clone(), unit.tier, unit.offset);
            if fused_layers && matches!(kind, UnitKind::Layer(_)) {
                self.stats.bytes_resident += unit.bytes;
                continue;
            }
            if let (true, true, UnitKind::Layer(il), Some(cs)) =
                (use_cpu, unit.on_cpu, &kind, self.cpu_side.as_mut())
            {
                let il = *il;
                let t0 = Instant::now();
                // Start the copies of the GPU units that follow, so they run while the CPU
                // computes this layer.
                self.ahead.stage_after(b, m, &self.plan, &self.held, ui)?;
                if !x_on_cpu {
                    let x = forward::residual(b, n, &self.scratch)?;
                    forward::set_residual(cs.cpu, &x, &mut cs.scratch)?;
                    x_on_cpu = true;
                }
                let valid = &mut self.kv_valid[il];
                if valid[1] < pos0 && self.shared_kv.get(il) == Some(&true) {
                    return Err(RuntimeError::Stream(format!(
                        "layer {il}: KV rows {}..{pos0} were not copied out of the shared cache",
                        valid[1]
                    )));
                }
                if valid[1] < pos0 {
                    // Straight into the CPU's (pinned) cache rows.
                    let (k, v) = cs.kv.rows_bits_mut(il, valid[1], pos0 - valid[1])?;
                    b.kv_rows_into(&self.kv, il, valid[1], k, v)?;
                }
                let Some(Holding::Host(h)) = &self.held[ui] else {
                    return Err(RuntimeError::Stream(format!(
                        "CPU layer {il} is not in the host cache"
                    )));
                };
                let w = m.layout.layers[il].views(&h.buf.as_slice()[h.range.clone()], offset)?;
                let t_block = Instant::now();
                forward::block(cs.cpu, cfg, il, &w, batch_rows, &mut cs.kv, &mut cs.scratch)?;
                valid[1] = pos0 + n;
                self.stats.bytes_host_cpu += self.plan.units[ui].bytes;
                let t1 = Instant::now();
                self.stats.cpu_handover_seconds += (t_block - t0).as_secs_f64();
                self.stats.cpu_block_seconds += (t1 - t_block).as_secs_f64();
                self.stats.compute_seconds += (t1 - t0).as_secs_f64();
                self.trace.span(Lane::Compute, ui, t0, t1);
                continue;
            }
            if x_on_cpu {
                if let Some(cs) = self.cpu_side.as_ref() {
                    let x = forward::residual(cs.cpu, n, &cs.scratch)?;
                    forward::set_residual(b, &x, &mut self.scratch)?;
                }
                x_on_cpu = false;
            }
            // A layer of a shared device cache: its rows go out to the CPU after it runs.
            let mut copy_out = None;
            if let UnitKind::Layer(il) = &kind {
                if self.shared_kv.get(*il) == Some(&true) && self.cpu_side.is_none() {
                    return Err(RuntimeError::Config(format!(
                        "layer {il} has no device KV cache of its own (the VRAM budget holds \
                         none): it needs the hybrid's CPU attached"
                    )));
                }
            }
            if let (UnitKind::Layer(il), Some(cs)) = (&kind, self.cpu_side.as_mut()) {
                // A layer the CPU computed before (decode) now runs here (a prompt): bring
                // its KV cache up to date; a shared cache holds no rows of it.
                let il = *il;
                let shared = self.shared_kv.get(il) == Some(&true);
                let valid = &mut self.kv_valid[il];
                if shared {
                    valid[0] = 0;
                    copy_out = Some(il);
                }
                if valid[0] < pos0 {
                    if valid[1] < pos0 {
                        return Err(RuntimeError::Stream(format!(
                            "layer {il}: KV rows {}..{pos0} are on neither side",
                            valid[1]
                        )));
                    }
                    let (k, v) = cs.kv.rows_bits_mut(il, valid[0], pos0 - valid[0])?;
                    // SAFETY: the CPU's cache lives as long as the executor, whose drop
                    // waits for the backend, and its rows below pos0 are written again
                    // only by a decode pass, after reading the residual back, which waits
                    // for this copy.
                    unsafe { b.set_kv_rows_queued(&mut self.kv, il, valid[0], k, v) }?;
                }
                valid[0] = pos0 + n;
            }
            // Get the unit's bytes: held, or the next slot from the ring.
            // A streamed unit's bytes arrive in the next ring slot; held units are read in place.
            let slot = if self.held[ui].is_some() {
                None
            } else {
                let ring = self
                    .ring
                    .as_mut()
                    .ok_or_else(|| RuntimeError::Stream("no ring for a streamed unit".into()))?;
                let t0 = Instant::now();
                let f = ring
                    .filled
                    .recv()
                    .map_err(|_| RuntimeError::Stream("the I/O thread stopped".into()))?;
                let t1 = Instant::now();
                self.stats.stall_seconds += (t1 - t0).as_secs_f64();
                let expected = ring.order[(ring.next_seq % ring.order.len() as u64) as usize];
                // Invariant: slots arrive in exactly the order compute consumes them.
                if f.seq != ring.next_seq || expected != ui {
                    return Err(RuntimeError::Stream(format!(
                        "ring out of order: got #{} for unit {ui}",
                        f.seq
                    )));
                }
                ring.next_seq += 1;
                let range = f.result?;
                self.stats.read_seconds += (f.read_end - f.read_start).as_secs_f64();
                self.stats.io_slot_wait_seconds += f.slot_wait.as_secs_f64();
                self.trace.span(Lane::Read, ui, f.read_start, f.read_end);
                if (t1 - t0).as_secs_f64() > 1e-5 {
                    self.trace.span(Lane::Stall, ui, t0, t1);
                }
                Some((f.buf, range))
            };
            let host: Option<&[u8]> = match (&self.held[ui], &slot) {
                (Some(Holding::Host(h)), _) => Some(&h.buf.as_slice()[h.range.clone()]),
                (Some(Holding::Device { .. }), _) => None,
                (None, Some((buf, range))) => Some(&buf.as_slice()[range.clone()]),
                (None, None) => {
                    return Err(RuntimeError::Stream(format!("unit {ui} has no bytes")))
                }
            };
            let unit_bytes = self.plan.units[ui].bytes;
            match tier {
                Tier::Resident => self.stats.bytes_resident += unit_bytes,
                Tier::HostCache => self.stats.bytes_host_cache += unit_bytes,
                Tier::Disk => self.stats.bytes_streamed += unit_bytes,
            }
            let t0 = Instant::now();
            // The bytes the weight views cover: the host copy where compute reads in place,
            // else the unit's address in the file mapping, which the backend resolves to its
            // resident copy or to the slot `stage` copies the host bytes into.
            let (bytes, staged) = if b.computes_in_place() {
                let h = host
                    .ok_or_else(|| RuntimeError::Stream(format!("unit {ui} has no host bytes")))?;
                (h, None)
            } else {
                let key = unit_key(m, offset, unit_bytes)?;
                match (host, self.ahead.units.front()) {
                    // Resident: read in place (units staged ahead wait for their turn).
                    (None, _) => (key, None),
                    (_, Some((j, _))) if *j == ui => {
                        (key, self.ahead.units.pop_front().map(|(_, st)| st))
                    }
                    (_, Some((j, _))) => {
                        return Err(RuntimeError::Stream(format!(
                            "unit {j} staged ahead but unit {ui} comes first"
                        )))
                    }
                    (Some(h), None) => (key, Some(b.stage(key, h)?)),
                }
            };
            if let Some(st) = &staged {
                b.begin(st)?;
            }
            match kind {
                UnitKind::Layer(il) => {
                    let w = m.layout.layers[il].views(bytes, offset)?;
                    forward::block(b, cfg, il, &w, batch_rows, &mut self.kv, &mut self.scratch)?;
                    if let (Some(il), Some(cs)) = (copy_out, self.cpu_side.as_mut()) {
                        let (k, v) = cs.kv.rows_bits_mut(il, pos0, n)?;
                        // SAFETY: as for the copy in above; the CPU reads these rows only
                        // in a decode pass, after reading the residual back (which waits
                        // for this copy).
                        unsafe { b.kv_rows_into_queued(&self.kv, il, pos0, k, v) }?;
                        self.kv_valid[il] = [0, pos0 + n];
                    }
                }
                UnitKind::Output { start, end } => {
                    if !matches!(want, Want::Nothing) {
                        if start == 0 {
                            let sc = &mut self.scratch;
                            rows = match want {
                                Want::Which(which) => {
                                    forward::head_norm(b, cfg, &norm, n, which, sc)?
                                }
                                Want::Rows(r) | Want::Picks(r, _) => {
                                    forward::head_norm_rows(b, cfg, &norm, n, r, sc)?
                                }
                                Want::Slot(..) => {
                                    forward::head_norm(b, cfg, &norm, n, Logits::Last, sc)?
                                }
                                Want::Nothing => 0,
                            };
                            if !matches!(want, Want::Slot(..) | Want::Picks(..)) {
                                logits = vec![0.0f32; rows * cfg.n_vocab];
                            }
                        }
                        let out = &m.layout.output;
                        let w = Weight {
                            ty: out.ty,
                            rows: end - start,
                            cols: out.cols,
                            data: bytes,
                        };
                        if let Want::Slot(slot, pick) = want {
                            let sc = &mut self.scratch;
                            forward::head_to_slot(b, cfg, &w, start, slot, &pick, sc)?;
                        } else if let Want::Picks(_, picks) = want {
                            // (step_picks made sure the whole output is this one unit, and
                            // cleared `picked`.)
                            let sc = &mut self.scratch;
                            forward::head_pick_rows(b, cfg, &w, picks, &mut self.picked, sc)?;
                        } else {
                            forward::head_project(
                                b,
                                cfg,
                                rows,
                                &w,
                                start,
                                &mut logits,
                                &mut self.scratch,
                            )?;
                        }
                    }
                }
            }
            if let Some(st) = staged {
                // A ring slot goes back to the I/O thread only once its copy is done.
                b.finish(st, slot.is_some())?;
            }
            let t1 = Instant::now();
            self.stats.compute_seconds += (t1 - t0).as_secs_f64();
            self.trace.span(Lane::Compute, ui, t0, t1);
            if let (Some((buf, _)), Some(ring)) = (slot, self.ring.as_ref()) {
                if let Some(free) = &ring.free {
                    // If the I/O thread has stopped (after a failed read) the slot is simply
                    // dropped; the failure itself arrives with the next filled slot.
                    let _ = free.send(buf);
                }
            }
        }
        self.stats.passes += 1;
        if use_cpu {
            self.rebalance_hybrid(
                self.stats.bytes_host_cpu - cpu_before.0,
                self.stats.cpu_block_seconds - cpu_before.1,
            )?;
            // The next decode pass's first GPU units, copied while this token is sampled and
            // the next one's resident layers run (the next pass keeps them only if it is a
            // decode pass with this split).
            let last = self.plan.units.len().saturating_sub(1);
            self.ahead.stage_after(b, m, &self.plan, &self.held, last)?;
        }
        // The driver's reading costs tens of microseconds, which a decode token spends with
        // the GPU idle: take it after every prompt, the first decode passes (where scratch
        // buffers grow) and every 32nd after them; `driver_peak` takes one more.
        let passes = self.stats.passes;
        if n > 1 || passes <= 8 || passes.is_multiple_of(32) {
            self.driver_peak = self.driver_above_base();
        }
        Ok(logits)
    }

    /// The most of `driver_peak` so far and the driver's reading now.
    fn driver_above_base(&self) -> Option<u64> {
        match (self.driver_base, self.backend.driver_memory()) {
            (Some(base), Some((used, _))) => {
                Some(self.driver_peak.unwrap_or(0).max(used.saturating_sub(base)))
            }
            _ => self.driver_peak,
        }
    }

    /// Most device memory the driver reported in use above what was in use before this
    /// executor started (None on the CPU), read after passes (see `pass`) and now.
    pub fn driver_peak(&self) -> Option<u64> {
        self.driver_above_base()
    }

    /// Forget the sequence.
    pub fn reset(&mut self) {
        self.rewind(0);
    }

    /// Continue from position `pos` (≤ the current one): later cached positions are
    /// forgotten on both sides of a hybrid split.
    pub fn rewind(&mut self, pos: usize) {
        self.pos = pos.min(self.pos);
        for v in &mut self.kv_valid {
            v[0] = v[0].min(self.pos);
            v[1] = v[1].min(self.pos);
        }
    }
}

impl<B: UnitStaging> Drop for StreamedModel<'_, B> {
    fn drop(&mut self) {
        // Copies queued into host buffers (the CPU's KV rows) land before those go.
        let _ = self.backend.wait_idle();
        // Units staged for a pass that never came: their slots go back first.
        let _ = self.ahead.let_go(self.backend);
        self.backend.release_units();
        // Unlock pinned buffers while they are all still allocated (in the ring or held).
        for &(addr, len) in &self.pinned {
            self.backend.unpin(addr, len);
        }
        if let Some(ring) = self.ring.as_mut() {
            // Closing the free-slot channel stops the I/O thread at its next wait; drain
            // filled slots so it is never blocked on a full channel.
            ring.free = None;
            while ring.filled.recv().is_ok() {}
            if let Some(t) = ring.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Units staged ahead of their turn (each holds a device slot until its compute is issued).
struct StagedAhead<S> {
    /// In pass order: (unit index, staged unit).
    units: std::collections::VecDeque<(usize, S)>,
    /// Where staging resumes: a position in this pass (`0..n`) or the next (`n..2n`).
    next: usize,
    /// Most units staged at once: the ring depth, or 0 with FLEA_PRESTAGE=0 (a diagnostic:
    /// copies then never overlap the CPU's layers). Set in `attach_cpu`.
    depth: usize,
}

impl<S> StagedAhead<S> {
    /// Stage the host-cached GPU units after unit `after`, in pass order, while fewer than
    /// `depth` are staged. Stops at a unit streamed from disk: its bytes arrive at its turn.
    /// Past the last unit it goes on with the next pass's units (unit indices as they are),
    /// which that pass keeps or lets go ([`StreamedModel::take_carried_prestage`]).
    fn stage_after<B: UnitStaging<Staged = S>>(
        &mut self,
        b: &B,
        m: &Model,
        plan: &Plan,
        held: &[Option<Holding>],
        after: usize,
    ) -> Result<()> {
        let n = plan.units.len();
        let mut j = self.next.max(after + 1);
        while self.units.len() < self.depth && j < 2 * n {
            let k = j % n;
            let u = &plan.units[k];
            match (u.tier, &held[k]) {
                (Tier::Resident, _) => {}
                (Tier::HostCache, _) if u.on_cpu => {}
                (Tier::HostCache, Some(Holding::Host(h))) => {
                    let key = unit_key(m, u.offset, u.bytes)?;
                    let st = b.stage(key, &h.buf.as_slice()[h.range.clone()])?;
                    self.units.push_back((k, st));
                }
                _ => break,
            }
            j += 1;
        }
        self.next = j;
        Ok(())
    }

    /// Give back every unit staged ahead (never begun: its slot is simply reusable) and
    /// start the next staging from the pass's beginning; how many there were.
    fn let_go<B: UnitStaging<Staged = S>>(&mut self, b: &B) -> Result<u64> {
        self.next = 0;
        let mut n = 0;
        while let Some((_, st)) = self.units.pop_front() {
            b.finish(st, false)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Which logits a pass computes.
#[derive(Clone, Copy)]
enum Want<'a> {
    Nothing,
    /// The last row's or every row's (one sequence).
    Which(Logits),
    /// These rows' (several sequences).
    Rows(&'a [usize]),
    /// None on the host: the backend picks each of these rows' tokens (several sequences),
    /// into `StreamedModel::picked`.
    Picks(&'a [usize], &'a [SlotPick]),
    /// None on the host: the backend picks the last row's token into this slot.
    Slot(usize, SlotPick),
}

/// Where a pass's tokens come from.
#[derive(Clone, Copy)]
enum PassInput<'a> {
    /// Token ids the host has.
    Tokens(&'a [u32]),
    /// One token the backend holds in this slot (a chained greedy decode).
    Slot(usize),
}

/// Decode passes a chained greedy decode keeps queued ahead of the token the host reads:
/// two, so the GPU has the next pass while the host takes this one's token.
const CHAIN_AHEAD: usize = 2;

/// Passes of a chained decode that run before the backend may record them (the first
/// embeds a token the host has; the second is the first from a slot).
const RECORD_AFTER_PASSES: usize = 2;

/// The I/O thread: walk the streamed units in a cycle, one free slot at a time.
fn io_loop(
    mut reader: Box<dyn RangeReader>,
    units: Vec<(u64, usize)>,
    free: Receiver<AlignedBuf>,
    filled: SyncSender<Filled>,
) {
    let mut seq = 0u64;
    loop {
        let t0 = Instant::now();
        let Ok(mut buf) = free.recv() else { return };
        let slot_wait = t0.elapsed();
        let (offset, len) = units[(seq % units.len() as u64) as usize];
        let read_start = Instant::now();
        let result = reader.read(offset, len, &mut buf);
        let read_end = Instant::now();
        let failed = result.is_err();
        if filled
            .send(Filled {
                seq,
                buf,
                result,
                read_start,
                read_end,
                slot_wait,
            })
            .is_err()
            || failed
        {
            return;
        }
        seq += 1;
    }
}
