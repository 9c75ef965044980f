//! The residency planner: which layers stay in the device arena, which are cached in host
//! RAM, which stream from disk, and how deep the ring of streaming slots is.

use crate::budget::fmt_size;
use crate::{Result, RuntimeError};
use flea_model::forward::Scratch;
use flea_model::{CpuBackend, Model};

/// Where a unit of weights lives while the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Read once into the device arena and kept.
    Resident,
    /// Read once into the host-RAM cache and kept; on a GPU backend copied each pass.
    HostCache,
    /// Read from the model file on every pass, through the ring.
    Disk,
}

/// What a streamed unit is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    Layer(usize),
    /// Rows `start..end` of the output projection.
    Output {
        start: usize,
        end: usize,
    },
}

/// A contiguous byte range of the model file that is placed in one tier.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Unit {
    pub kind: UnitKind,
    pub offset: u64,
    pub bytes: u64,
    pub tier: Tier,
    /// Hybrid execution: a host-cached layer the CPU computes in place while the GPU's copy
    /// engine streams other units (decode-sized batches only; larger ones go to the GPU).
    pub on_cpu: bool,
}

impl Unit {
    /// Whether this unit is a layer marked in `mask` (by layer index).
    pub fn is_layer_in(&self, mask: &[bool]) -> bool {
        matches!(self.kind, UnitKind::Layer(il) if mask.get(il) == Some(&true))
    }

    /// Bytes a buffer holding this unit takes: the 4 KiB-aligned superset direct I/O reads.
    pub fn held_bytes(&self) -> u64 {
        flea_io::required_capacity(self.offset, self.bytes as usize) as u64
    }
}

/// Link speeds the planner predicts with, in bytes per second.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Links {
    /// Sequential read from the model's disk.
    pub disk: f64,
    /// Host RAM → compute device (for the CPU backend: none, compute reads RAM in place).
    pub host_to_device: Option<f64>,
    /// Compute device reading its own memory (for the CPU backend: RAM read bandwidth).
    pub device_memory: f64,
    /// Hybrid execution beside a GPU: the rate at which the CPU backend computes through
    /// weights in host RAM (bytes of weights per second). None: no hybrid split.
    pub cpu_compute: Option<f64>,
    /// Whether these came from a measurement (a hardware profile) or are assumed defaults.
    pub measured: bool,
    /// Whether the GPU's two links (its memory, host→device) were measured for this plan (or
    /// given), where the rest may still be assumed.
    pub device_measured: bool,
}

impl Default for Links {
    fn default() -> Self {
        // Assumed until `flea probe` measures them: an NVMe-class disk and DDR4/5-class RAM.
        Links {
            disk: 1.5e9,
            host_to_device: None,
            device_memory: 10e9,
            cpu_compute: None,
            measured: false,
            device_measured: false,
        }
    }
}

/// The links [`Plan::floor`] names.
pub const LINK_DEVICE_MEMORY: &str = "device memory";
pub const LINK_DISK: &str = "disk";
pub const LINK_HOST_TO_DEVICE: &str = "host→device";
pub const LINK_CPU: &str = "CPU reading host RAM";

impl Links {
    /// Whether the rate of `link` (a name [`Plan::floor`] returns) was measured or given,
    /// rather than assumed; with the rate in bytes per second.
    pub fn rate_of(&self, link: &str) -> (bool, f64) {
        let device = self.measured || self.device_measured;
        match link {
            LINK_DISK => (self.measured, self.disk),
            LINK_DEVICE_MEMORY => (device, self.device_memory),
            LINK_HOST_TO_DEVICE => (device, self.host_to_device.unwrap_or(0.0)),
            LINK_CPU => (true, self.cpu_compute.unwrap_or(0.0)),
            _ => (true, 0.0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub vram_budget: u64,
    pub ram_budget: u64,
    pub n_ctx: usize,
    /// Most tokens per forward pass (prompt batch; with several sequences, all their rows).
    pub batch: usize,
    /// Sequences whose KV cache is held at once (1 for a single run; the server's slots).
    pub n_seq: usize,
    /// Ring depth; None lets the planner choose.
    pub ring_depth: Option<usize>,
    pub links: Links,
    /// The backend computes from its own memory (a GPU): streamed units pass through pinned
    /// host slots charged to the RAM budget, and every non-resident unit through a device slot.
    pub stages_units: bool,
    /// Device memory the backend needs beside activations (a GPU's GEMM scratch).
    pub device_scratch: u64,
    /// A CPU will compute some host-cached layers in decode (the hybrid, one sequence): a
    /// budget too small for every layer's device KV cache may then plan the last layers'
    /// caches as one shared room, those layers on the CPU in decode (`Plan::kv_shared`).
    pub cpu_kv_layers: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub units: Vec<Unit>,
    pub ring_depth: usize,
    /// Capacity of each ring slot (aligned superset of the largest streamed unit).
    pub slot_bytes: u64,
    pub kv_bytes: u64,
    /// Sequence slots the KV cache holds (`kv_bytes` covers all of them).
    pub n_seq: usize,
    pub act_bytes: u64,
    /// Small always-resident pieces: output norm, embedding rows of a batch.
    pub misc_bytes: u64,
    pub vram_budget: u64,
    pub ram_budget: u64,
    pub device_bytes: u64,
    pub host_bytes: u64,
    /// Rows of the output matrix per streamed slice.
    pub output_rows_per_unit: usize,
    pub links: Links,
    /// Layers whose device KV caches share one layer's room from the start (empty: none),
    /// because the budget holds no more: host-cached, computed by the CPU in decode, their
    /// rows copied in and out around a prompt pass (`PlanRequest::cpu_kv_layers`).
    pub kv_shared: Vec<bool>,
}

/// Bytes one forward pass moves per tier.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PassBytes {
    pub resident: u64,
    /// Host-cached bytes copied to the compute device.
    pub host_cache: u64,
    /// Host-cached bytes the CPU computes in place (hybrid).
    pub host_cpu: u64,
    pub disk: u64,
}

impl Plan {
    pub fn build(model: &Model, req: &PlanRequest) -> Result<Plan> {
        let cfg = &model.cfg;
        let layout = &model.layout;
        let n_seq = req.n_seq.max(1);
        // Rows per pass: up to n_ctx per sequence (prompt chunks), at least one per sequence.
        let batch = req.batch.clamp(1, (req.n_ctx * n_seq).max(1)).max(n_seq);
        let mut kv_bytes = flea_model::backend::KvShape {
            n_layers: cfg.n_layers,
            n_ctx: req.n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            n_seq,
        }
        .bytes() as u64;
        let emb = &layout.token_embd;
        let emb_row = (emb.size / emb.rows.max(1)) as u64;
        let out = &layout.output;
        let out_row = (out.size / out.rows.max(1)) as u64;
        let max_layer = layout
            .layers
            .iter()
            .map(|l| l.extent_bytes())
            .max()
            .unwrap_or(0);
        // Output slices no bigger than the largest layer, so one slot size serves both.
        // Slices start on multiples of OUTPUT_ROW_ALIGN rows, so the CPU kernels pair and
        // tile rows exactly as they do for the whole matrix: logits stay bit-identical.
        let rows_per_unit = ((max_layer / out_row.max(1)) as usize / OUTPUT_ROW_ALIGN
            * OUTPUT_ROW_ALIGN)
            .max(OUTPUT_ROW_ALIGN)
            .min(out.rows.max(1));
        let act_bytes = Scratch::<CpuBackend>::bytes(cfg, batch, rows_per_unit.min(out.rows));
        let misc_bytes =
            layout.output_norm.size as u64 + emb_row * batch as u64 + req.device_scratch;
        let mut fixed = kv_bytes + act_bytes + misc_bytes;
        let mut kv_shared: Vec<bool> = Vec::new();

        let mut units: Vec<Unit> = layout
            .layers
            .iter()
            .enumerate()
            .map(|(il, l)| Unit {
                kind: UnitKind::Layer(il),
                offset: l.extent_start,
                bytes: l.extent_bytes(),
                tier: Tier::Disk,
                on_cpu: false,
            })
            .collect();
        let mut r = 0;
        while r < out.rows {
            let end = (r + rows_per_unit).min(out.rows);
            units.push(Unit {
                kind: UnitKind::Output { start: r, end },
                offset: out.file_offset + r as u64 * out_row,
                bytes: (end - r) as u64 * out_row,
                tier: Tier::Disk,
                on_cpu: false,
            });
            r = end;
        }
        let slot_bytes = units
            .iter()
            .map(|u| flea_io::required_capacity(u.offset, u.bytes as usize) as u64)
            .max()
            .unwrap_or(0);
        let all_weights: u64 = units.iter().map(|u| u.held_bytes()).sum();

        let ring_depth;
        let mut device = fixed;
        let mut act_bytes = act_bytes;
        let mut rows_per_unit = rows_per_unit;
        if fixed + all_weights <= req.vram_budget && req.ring_depth.is_none() {
            // Everything fits: no streaming at all. Nor any slot to fit, so the output matrix
            // is one unit again where its wider logits buffer fits too (one mat-vec and one
            // pick a token instead of one per slice: a Qwen2.5-0.5B's 151936 rows were 14).
            ring_depth = 0;
            let act_whole = Scratch::<CpuBackend>::bytes(cfg, batch, out.rows);
            if rows_per_unit < out.rows
                && fixed - act_bytes + act_whole + all_weights <= req.vram_budget
            {
                units.retain(|u| matches!(u.kind, UnitKind::Layer(_)));
                units.push(Unit {
                    kind: UnitKind::Output {
                        start: 0,
                        end: out.rows,
                    },
                    offset: out.file_offset,
                    bytes: out.rows as u64 * out_row,
                    tier: Tier::Disk,
                    on_cpu: false,
                });
                device += act_whole - act_bytes;
                act_bytes = act_whole;
                rows_per_unit = out.rows;
            }
            for u in units.iter_mut() {
                u.tier = Tier::Resident;
                device += u.held_bytes();
            }
        } else {
            // Too small for every layer's device cache: the last k host-cached layers share
            // one (the CPU keeps their rows), the fewest k that fit.
            let kv_layer = kv_bytes / cfg.n_layers.max(1) as u64;
            let (others, n_layers) = (fixed - kv_bytes, cfg.n_layers);
            let kv_with = |k: usize| kv_layer * (n_layers - k + 1) as u64;
            if req.vram_budget < fixed + slot_bytes && req.cpu_kv_layers && req.stages_units {
                if let Some(k) =
                    (2..=n_layers).find(|&k| others + kv_with(k) + slot_bytes <= req.vram_budget)
                {
                    kv_shared = (0..n_layers).map(|il| il >= n_layers - k).collect();
                    kv_bytes = kv_with(k);
                    fixed = others + kv_bytes;
                    device = fixed;
                }
            }
            let min = fixed + slot_bytes;
            if req.vram_budget < min {
                return Err(RuntimeError::BudgetTooSmall {
                    budget: req.vram_budget,
                    minimum: min,
                    detail: format!(
                        "KV cache {} ({n_seq} sequences) + activations {} + other {} + one ring slot {}; \
                         a smaller --ctx shrinks the KV cache, a smaller --batch the activations",
                        fmt_size(kv_bytes),
                        fmt_size(act_bytes),
                        fmt_size(misc_bytes),
                        fmt_size(slot_bytes)
                    ),
                });
            }
            let max_depth = ((req.vram_budget - fixed) / slot_bytes.max(1)) as usize;
            // Two slots let one read while one computes; a third absorbs jitter.
            ring_depth = req
                .ring_depth
                .unwrap_or(3)
                .clamp(1, max_depth.max(1))
                .min(units.len().max(1));
            device += ring_depth as u64 * slot_bytes;
            for u in units.iter_mut() {
                if !u.is_layer_in(&kv_shared) && device + u.held_bytes() <= req.vram_budget {
                    u.tier = Tier::Resident;
                    device += u.held_bytes();
                }
            }
        }
        let mut host = 0u64;
        let non_resident: u64 = units
            .iter()
            .filter(|u| u.tier == Tier::Disk)
            .map(|u| u.held_bytes())
            .sum();
        // A staging backend reads streamed units into pinned host slots: if anything will
        // still stream after the host cache is filled, those slots come out of RAM first.
        if req.stages_units && ring_depth > 0 && non_resident > req.ram_budget {
            host = ring_depth as u64 * slot_bytes;
            if host > req.ram_budget {
                return Err(RuntimeError::BudgetTooSmall {
                    budget: req.ram_budget,
                    minimum: host,
                    detail: format!(
                        "{ring_depth} pinned host staging slots of {} (RAM budget)",
                        fmt_size(slot_bytes)
                    ),
                });
            }
        }
        // The layers with shared caches are computed by the CPU from the host cache: first.
        for first in [true, false] {
            for u in units
                .iter_mut()
                .filter(|u| u.tier == Tier::Disk && u.is_layer_in(&kv_shared) == first)
            {
                if host + u.held_bytes() <= req.ram_budget {
                    u.tier = Tier::HostCache;
                    host += u.held_bytes();
                } else if first {
                    return Err(RuntimeError::BudgetTooSmall {
                        budget: req.ram_budget,
                        minimum: host + u.held_bytes(),
                        detail: "the layers the CPU computes because the VRAM budget holds \
                                 no device KV cache for them (RAM budget)"
                            .into(),
                    });
                }
            }
        }
        if let (true, Some(cpu), Some(h2d)) = (
            req.stages_units,
            req.links.cpu_compute,
            req.links.host_to_device,
        ) {
            split_for_cpu_keeping(&mut units, cpu, h2d, hybrid_run(ring_depth), &kv_shared);
        }
        Ok(Plan {
            units,
            ring_depth,
            slot_bytes,
            kv_bytes,
            n_seq,
            act_bytes,
            misc_bytes,
            vram_budget: req.vram_budget,
            ram_budget: req.ram_budget,
            device_bytes: device,
            host_bytes: host,
            output_rows_per_unit: rows_per_unit,
            links: req.links,
            kv_shared,
        })
    }

    /// Bytes each decode pass reads from each tier.
    pub fn pass_bytes(&self) -> PassBytes {
        let mut p = PassBytes::default();
        for u in &self.units {
            match u.tier {
                Tier::Resident => p.resident += u.bytes,
                Tier::HostCache if u.on_cpu => p.host_cpu += u.bytes,
                Tier::HostCache => p.host_cache += u.bytes,
                Tier::Disk => p.disk += u.bytes,
            }
        }
        p
    }

    /// Whether any unit streams through the ring.
    pub fn streams(&self) -> bool {
        self.units.iter().any(|u| u.tier == Tier::Disk)
    }

    /// The physical floor of one decode pass: every link's bytes over its bandwidth; the
    /// slowest link bounds the pipelined time. Returns (seconds, name of the limiting link).
    pub fn floor(&self) -> (f64, &'static str) {
        let p = self.pass_bytes();
        let l = &self.links;
        let mut links = vec![
            (
                (p.resident + p.host_cache + p.disk) as f64 / l.device_memory,
                LINK_DEVICE_MEMORY,
            ),
            (p.disk as f64 / l.disk, LINK_DISK),
        ];
        if let Some(h2d) = l.host_to_device {
            links.push(((p.host_cache + p.disk) as f64 / h2d, LINK_HOST_TO_DEVICE));
        }
        if let (Some(cpu), true) = (l.cpu_compute, p.host_cpu > 0) {
            links.push((p.host_cpu as f64 / cpu, LINK_CPU));
        }
        links
            .into_iter()
            .fold((0.0, "none"), |a, b| if b.0 > a.0 { b } else { a })
    }

    /// A human-readable table: unit → tier, bytes per pass per link, predicted time.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<22} {:>12} {:>14}  tier",
            "unit", "bytes", "file offset"
        );
        for u in &self.units {
            let name = match &u.kind {
                UnitKind::Layer(i) => format!("blk.{i}"),
                UnitKind::Output { start, end } => format!("output rows {start}..{end}"),
            };
            let tier = match u.tier {
                Tier::Resident => "resident (device arena)",
                Tier::HostCache if u.is_layer_in(&self.kv_shared) => {
                    "host cache (RAM), computed by the CPU in decode (no device KV cache of its own)"
                }
                Tier::HostCache if u.on_cpu => "host cache (RAM), computed by the CPU",
                Tier::HostCache => "host cache (RAM)",
                Tier::Disk => "disk (streamed)",
            };
            let _ = writeln!(
                s,
                "{name:<22} {:>12} {:>14}  {tier}",
                fmt_size(u.bytes),
                u.offset
            );
        }
        let p = self.pass_bytes();
        let _ = writeln!(
            s,
            "device arena: {} of {} budget = KV {} + activations {} + other {} + ring {} x {} + resident {}",
            fmt_size(self.device_bytes),
            fmt_size(self.vram_budget),
            fmt_size(self.kv_bytes),
            fmt_size(self.act_bytes),
            fmt_size(self.misc_bytes),
            self.ring_depth,
            fmt_size(self.slot_bytes),
            fmt_size(p.resident)
        );
        let _ = writeln!(
            s,
            "host cache: {} of {} budget",
            fmt_size(self.host_bytes),
            fmt_size(self.ram_budget)
        );
        let _ = writeln!(
            s,
            "per token: {} from device memory, {} from host cache, {} computed by the CPU from host cache, {} from disk",
            fmt_size(p.resident),
            fmt_size(p.host_cache),
            fmt_size(p.host_cpu),
            fmt_size(p.disk)
        );
        let (t, link) = self.floor();
        let _ = writeln!(
            s,
            "predicted decode: {:.1} ms/token ({:.2} tok/s), the floor set by {link} (links {}: disk {:.2} GB/s, device memory {:.1} GB/s{})",
            t * 1e3,
            if t > 0.0 { 1.0 / t } else { f64::INFINITY },
            if self.links.measured {
                "measured"
            } else if self.links.device_measured {
                "the GPU's measured, the disk's assumed; run `flea probe` or pass --disk-gbps"
            } else {
                "assumed; run `flea probe` or pass --disk-gbps/--mem-gbps"
            },
            self.links.disk / 1e9,
            self.links.device_memory / 1e9,
            self.links.host_to_device.map_or(String::new(), |h| format!(", host→device {:.1} GB/s", h / 1e9))
        );
        s
    }
}

/// Hybrid split: give the CPU the share of the host-cached layers that balances its time
/// against the copy engine's (C / B_cpu = G / B_h2d, so C = N · B_cpu / (B_cpu + B_h2d)),
/// spread evenly through the pass so the CPU's layers alternate with streamed ones and each
/// copy hides behind CPU work. The choice is made per run of `run` consecutive host-cached
/// layers: every switch between CPU and GPU waits for the other side once (the GPU's layer
/// must finish before the CPU can take the hidden state), so longer runs switch less, and
/// a run of streamed layers can be copied ahead while the CPU computes as long as the ring
/// has a slot for each (`run` ≤ ring depth − 1). Output slices stay on the GPU.
pub(crate) fn split_for_cpu(units: &mut [Unit], cpu: f64, h2d: f64, run: usize) {
    split_for_cpu_keeping(units, cpu, h2d, run, &[]);
}

/// `split_for_cpu` with the host-cached layers marked in `keep` (by layer index) on the
/// CPU whatever the share: their bytes count toward the CPU's, and the other layers make up
/// the rest of the balance.
pub(crate) fn split_for_cpu_keeping(
    units: &mut [Unit],
    cpu: f64,
    h2d: f64,
    run: usize,
    keep: &[bool],
) {
    let kept = |u: &Unit| u.tier == Tier::HostCache && u.is_layer_in(keep);
    units.iter_mut().for_each(|u| u.on_cpu = kept(u));
    let share = cpu / (cpu + h2d);
    let run = run.max(1);
    // Runs of up to `run` consecutive host-cached layers, in pass order; any other unit ends
    // a run (a host-cached output slice still counts toward the bytes seen).
    let mut runs: Vec<(Vec<usize>, u64)> = Vec::new();
    let mut open = false;
    for (i, u) in units.iter().enumerate() {
        let cached = u.tier == Tier::HostCache;
        if cached && matches!(u.kind, UnitKind::Layer(_)) {
            match runs.last_mut() {
                Some((layers, _)) if open && layers.len() < run => layers.push(i),
                _ => runs.push((vec![i], 0)),
            }
            open = true;
        } else {
            if cached {
                runs.push((Vec::new(), u.bytes));
            }
            open = false;
        }
    }
    let (mut seen, mut on_cpu) = (0u64, 0u64);
    for (layers, other) in runs {
        let bytes_of = |free: bool| -> u64 {
            layers
                .iter()
                .filter(|&&i| units[i].on_cpu != free)
                .map(|&i| units[i].bytes)
                .sum()
        };
        let (bytes, kept_bytes) = (bytes_of(true), bytes_of(false));
        seen += bytes + kept_bytes + other;
        on_cpu += kept_bytes;
        if bytes > 0 && (on_cpu + bytes) as f64 <= share * seen as f64 + 0.5 * bytes as f64 {
            layers.iter().for_each(|&i| units[i].on_cpu = true);
            on_cpu += bytes;
        }
    }
}

/// Consecutive host-cached layers the hybrid split keeps on one side: one fewer than the
/// ring's slots (so a run of streamed layers can all be copied ahead), at least 1;
/// `FLEA_HYBRID_RUN` overrides it (for comparisons).
pub(crate) fn hybrid_run(ring_depth: usize) -> usize {
    std::env::var("FLEA_HYBRID_RUN")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(ring_depth.saturating_sub(1))
        .max(1)
}

/// Output-matrix slices are whole multiples of this many rows (kernels work on row pairs and
/// threads on chunks of 8).
const OUTPUT_ROW_ALIGN: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(resident: usize, cached: usize) -> Vec<Unit> {
        (0..resident + cached)
            .map(|i| Unit {
                kind: UnitKind::Layer(i),
                offset: i as u64 * 100,
                bytes: 100,
                tier: if i < resident {
                    Tier::Resident
                } else {
                    Tier::HostCache
                },
                on_cpu: false,
            })
            .chain(std::iter::once(Unit {
                kind: UnitKind::Output { start: 0, end: 10 },
                offset: 1 << 20,
                bytes: 50,
                tier: Tier::HostCache,
                on_cpu: false,
            }))
            .collect()
    }

    fn pattern(units: &[Unit]) -> String {
        units
            .iter()
            .map(|u| match (u.tier, u.on_cpu) {
                (_, true) => 'C',
                (Tier::HostCache, false) => 'G',
                _ => 'r',
            })
            .collect()
    }

    #[test]
    fn assumed_links_are_told_from_measured_ones() {
        let mut l = Links::default();
        assert_eq!(l.rate_of(LINK_DISK), (false, 1.5e9));
        assert!(!l.rate_of(LINK_DEVICE_MEMORY).0);
        l.device_measured = true;
        l.host_to_device = Some(50e9);
        assert_eq!(l.rate_of(LINK_HOST_TO_DEVICE), (true, 50e9));
        assert!(
            !l.rate_of(LINK_DISK).0,
            "the GPU's links measured, the disk's still assumed"
        );
        l.measured = true;
        assert!(l.rate_of(LINK_DISK).0);
    }

    #[test]
    fn hybrid_split_balances_and_switches_per_run() {
        let mut u = layers(2, 8);
        split_for_cpu(&mut u, 1.0, 1.0, 1);
        assert_eq!(pattern(&u), "rrCGCGCGCGG");
        split_for_cpu(&mut u, 1.0, 1.0, 2);
        assert_eq!(pattern(&u), "rrCCGGCCGGG");
        // A CPU three times as fast as the link takes about three quarters.
        split_for_cpu(&mut u, 3.0, 1.0, 1);
        assert_eq!(u.iter().filter(|u| u.on_cpu).count(), 6);
        // Never a resident unit or an output slice.
        assert!(u
            .iter()
            .all(|u| !u.on_cpu
                || (u.tier == Tier::HostCache && matches!(u.kind, UnitKind::Layer(_)))));
        // Layers kept on the CPU stay there, and count toward its share.
        let mut keep = vec![false; 10];
        keep[3] = true;
        keep[4] = true;
        keep[0] = true; // resident: not the CPU's
        split_for_cpu_keeping(&mut u, 1.0, 1.0, 1, &keep);
        assert_eq!(pattern(&u), "rrCCCGGGCGG");
        split_for_cpu_keeping(&mut u, 1.0, 9.0, 1, &keep);
        assert_eq!(pattern(&u), "rrGCCGGGGGG");
        // A run cut short by the end of the layers is still decided.
        let mut u = layers(0, 3);
        split_for_cpu(&mut u, 1.0, 1.0, 2);
        assert_eq!(pattern(&u), "CCGG");
    }
}
