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
use flea_model::backend::{Backend, KvShape, Row};
use flea_model::forward::{self, HeadWeights, Logits, Scratch};
use flea_model::weights::Weight;
use flea_model::{CpuBackend, Model};
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// A unit's bytes held for the whole run.
struct Held {
    buf: AlignedBuf,
    range: Range<usize>,
    _reservation: Reservation,
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
    /// Time compute spent waiting for a slot to arrive.
    pub stall_seconds: f64,
    pub compute_seconds: f64,
    pub read_seconds: f64,
    /// Time the I/O thread waited for a free slot (the ring was full).
    pub io_slot_wait_seconds: f64,
}

/// A model run under a residency plan.
pub struct StreamedModel<'m> {
    pub model: &'m Model,
    pub backend: &'m CpuBackend,
    pub plan: Plan,
    pub device: Arc<Arena>,
    pub host: Arc<Arena>,
    held: Vec<Option<Held>>,
    ring: Option<Ring>,
    embed_reader: Box<dyn RangeReader>,
    embed_buf: AlignedBuf,
    embed_rows: Vec<u8>,
    output_norm: Vec<u8>,
    kv: <CpuBackend as Backend>::Kv,
    scratch: Scratch<CpuBackend>,
    batch: usize,
    pub n_ctx: usize,
    pub pos: usize,
    pub stats: StreamStats,
    pub trace: Trace,
    poisoned: Option<String>,
    _fixed: Vec<Reservation>,
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

impl<'m> StreamedModel<'m> {
    pub fn new(
        model: &'m Model,
        backend: &'m CpuBackend,
        plan: Plan,
        path: &Path,
        io: &IoOptions,
        n_ctx: usize,
        batch: usize,
    ) -> Result<Self> {
        let device = Arena::new("device", plan.vram_budget);
        let host = Arena::new("host cache", plan.ram_budget);
        let cfg = &model.cfg;
        let mut fixed = Vec::new();
        fixed.push(device.reserve(plan.kv_bytes, "KV cache")?);
        let kv = backend.alloc_kv(KvShape {
            n_layers: cfg.n_layers,
            n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            n_seq: plan.n_seq.max(1),
        })?;
        fixed.push(device.reserve(plan.act_bytes, "activations")?);
        let out_rows = plan.output_rows_per_unit.min(model.layout.output.rows);
        let scratch = Scratch::with_logits_width(backend, cfg, batch, out_rows)?;
        fixed.push(device.reserve(plan.misc_bytes, "embedding rows and output norm")?);

        let mut reader = flea_io::open_reader(path, io)?;
        let embed_reader = flea_io::open_reader(
            path,
            &IoOptions {
                backend: flea_io::IoBackend::Pread,
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

        // Resident and cached units: read once, now.
        let mut held = Vec::with_capacity(plan.units.len());
        for u in &plan.units {
            held.push(match u.tier {
                Tier::Resident => Some(read_unit(
                    reader.as_mut(),
                    u.offset,
                    u.bytes,
                    &device,
                    "resident weights",
                )?),
                Tier::HostCache => Some(read_unit(
                    reader.as_mut(),
                    u.offset,
                    u.bytes,
                    &host,
                    "host-cached weights",
                )?),
                Tier::Disk => None,
            });
        }
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
            let mut slots = Vec::new();
            for _ in 0..depth {
                slots.push(device.reserve(plan.slot_bytes, "ring slot")?);
                let cap = usize::try_from(plan.slot_bytes)
                    .map_err(|_| RuntimeError::Config("slot too large".into()))?;
                free_tx
                    .send(AlignedBuf::new(cap)?)
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
        Ok(StreamedModel {
            model,
            backend,
            plan,
            device,
            host,
            held,
            ring,
            embed_reader,
            embed_buf,
            embed_rows: Vec::new(),
            output_norm,
            kv,
            scratch,
            batch: batch.max(1),
            n_ctx,
            pos: 0,
            stats: StreamStats::default(),
            trace: Trace::default(),
            poisoned: None,
            _fixed: fixed,
        })
    }

    /// Evaluate `tokens` after the cached ones; one pass over the weights per batch.
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if let Some(p) = &self.poisoned {
            return Err(RuntimeError::Stream(format!(
                "an earlier streaming error left the ring unusable: {p}"
            )));
        }
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
            match self.pass(chunk, &rows, want) {
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
        if let Some(p) = &self.poisoned {
            return Err(RuntimeError::Stream(format!(
                "an earlier streaming error left the ring unusable: {p}"
            )));
        }
        if tokens.is_empty() || tokens.len() != rows.len() || tokens.len() > self.batch {
            return Err(RuntimeError::Input(format!(
                "a step of {} tokens with {} rows (capacity {})",
                tokens.len(),
                rows.len(),
                self.batch
            )));
        }
        let want = if logit_rows.is_empty() {
            Want::Nothing
        } else {
            Want::Rows(logit_rows)
        };
        self.pass(tokens, rows, want)
            .inspect_err(|e| self.poisoned = Some(e.to_string()))
    }

    /// One forward pass over all units for a batch of tokens.
    fn pass(&mut self, tokens: &[u32], batch_rows: &[Row], want: Want) -> Result<Vec<f32>> {
        let m = self.model;
        let cfg = &m.cfg;
        let b = self.backend;
        let n = tokens.len();

        // Embedding rows of this batch, read straight from the file.
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
        let norm = Weight {
            ty: m.layout.output_norm.ty,
            rows: 1,
            cols: cfg.n_embd,
            data: &self.output_norm,
        };
        let head = HeadWeights {
            token_embd: table,
            output_norm: norm,
            output: table,
        };
        forward::embed(b, cfg, &head, &local, &mut self.scratch)?;

        let mut logits = Vec::new();
        let mut rows = 0;
        for ui in 0..self.plan.units.len() {
            let unit = &self.plan.units[ui];
            let (kind, tier, offset) = (unit.kind.clone(), unit.tier, unit.offset);
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
            let bytes: &[u8] = match (&self.held[ui], &slot) {
                (Some(h), _) => &h.buf.as_slice()[h.range.clone()],
                (None, Some((buf, range))) => &buf.as_slice()[range.clone()],
                (None, None) => {
                    return Err(RuntimeError::Stream(format!("unit {ui} has no bytes")))
                }
            };
            match tier {
                Tier::Resident => self.stats.bytes_resident += bytes.len() as u64,
                Tier::HostCache => self.stats.bytes_host_cache += bytes.len() as u64,
                Tier::Disk => self.stats.bytes_streamed += bytes.len() as u64,
            }
            let t0 = Instant::now();
            match kind {
                UnitKind::Layer(il) => {
                    let w = m.layout.layers[il].views(bytes, offset)?;
                    forward::block(b, cfg, il, &w, batch_rows, &mut self.kv, &mut self.scratch)?;
                }
                UnitKind::Output { start, end } => {
                    if !matches!(want, Want::Nothing) {
                        if start == 0 {
                            let sc = &mut self.scratch;
                            rows = match want {
                                Want::Which(which) => {
                                    forward::head_norm(b, cfg, &norm, n, which, sc)?
                                }
                                Want::Rows(r) => forward::head_norm_rows(b, cfg, &norm, n, r, sc)?,
                                Want::Nothing => 0,
                            };
                            logits = vec![0.0f32; rows * cfg.n_vocab];
                        }
                        let out = &m.layout.output;
                        let w = Weight {
                            ty: out.ty,
                            rows: end - start,
                            cols: out.cols,
                            data: bytes,
                        };
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
        Ok(logits)
    }

    /// Forget the sequence.
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

impl Drop for StreamedModel<'_> {
    fn drop(&mut self) {
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

/// Which logits a pass computes.
#[derive(Clone, Copy)]
enum Want<'a> {
    Nothing,
    /// The last row's or every row's (one sequence).
    Which(Logits),
    /// These rows' (several sequences).
    Rows(&'a [usize]),
}

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
