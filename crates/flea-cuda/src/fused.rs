//! Fused resident decode: every layer of one decode token in one launch (`fd_decode` in
//! kernels.cu, which says how it works).
//!
//! A token of a fully resident model otherwise takes ~7 launches per layer; between them the
//! device's memory idles (each launch's start and tail, the small kernels). `fd_decode` keeps
//! one block per SM for the whole token: a producer warp per block streams that block's share
//! of every weight matrix through a shared-memory ring while the consumer warps work through
//! the layers, with grid barriers where a phase needs what other blocks wrote.
//!
//! Taken when every layer is in device memory (the executor's resident tier), the batch is
//! one row, and the model is one the kernel covers: Llama-style blocks (no biases, no q/k or
//! post norms, no sliding window, full-width RoPE), Q4_K matrices or resident (repacked)
//! Q6_K ones, head size 64 or 128, widths in whole 256-blocks (residual stream up to 8192,
//! FFN up to 16384), positions below 3840, sm_90 or later; anything else runs layer by layer.
//!
//! **Off by default** (`FLEA_CUDA_FUSED_DECODE=1` turns it on): measured on an H200 it is
//! still slower than layer-by-layer decode (13B: 190 vs 233–242 tok/s). Its mat-vec phases
//! stream at ~3.3 TB/s, but every phase between them — attention, norms, GLU, the grid
//! barriers — waits on loads that queue behind the weight stream (~2 µs a round trip), ~60 µs
//! a layer in all (`FLEA_CUDA_FUSED_TRACE=1` prints the split; docs/BENCHMARKS.md).
//! Sums come in another order than the per-layer kernels', so logits differ from theirs in
//! the last bits (tests/streaming.rs bounds the difference).

use crate::{be, dptr, CudaAct, CudaBackend, CudaKv};
use cudarc::driver::CudaSlice;
use flea_gguf::GgmlType;
use flea_model::backend::{Backend, LayerActs, Row};
use flea_model::config::{Arch, FfnActivation};
use flea_model::weights::{LayerWeights, Weight};
use flea_model::{ModelConfig, Result};
use std::sync::atomic::Ordering;

/// Constants shared with kernels.cu (FD_*).
const FD_NW: u32 = 16;
pub(crate) const FD_THREADS: u32 = (FD_NW + 1) * 32;
const FD_STAGES: usize = 4;
const FD_STAGE_BYTES: usize = 46 * 1024;
const FD_XMAX: usize = 16384;
/// Widest residual stream the norm keeps in registers (FD_NORM_MAX).
const FD_NORM_MAX: usize = 8192;
const FD_MAXC: usize = 16;
const FD_MAXW: usize = 8;
/// Most positions the kernel attends over (its scores stay in shared memory); later decode
/// steps run layer by layer.
const FD_ATT_KEYS: usize = 3840;
const FD_ATT_FLOATS: usize = 320 + FD_ATT_KEYS;
/// Dynamic shared memory per block (FD_SMEM).
pub(crate) const FD_SMEM: usize = FD_STAGES * FD_STAGE_BYTES
    + FD_XMAX
    + FD_XMAX / 256 * 4
    + FD_XMAX / 16 * 4
    + FD_STAGES * FD_MAXC * FD_MAXW * 4
    + FD_STAGES * FD_MAXC * 4
    + 32 * 4
    + FD_ATT_FLOATS * 4
    + 2 * FD_STAGES * 8;

/// One matrix of the token, in streaming order (FdMat).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FdMat {
    w: u64,
    y: u64,
    ty: i32,
    rows: i32,
    cols: i32,
    crows: i32,
    lwpr: i32,
    chunk0: i32,
    nch: i32,
    accumulate: i32,
}

/// One layer's vectors, cache and first matrix (FdLayer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FdLayer {
    attn_norm: u64,
    ffn_norm: u64,
    kc: u64,
    vc: u64,
    mat0: i32,
    _pad: i32,
}

/// The kernel's one parameter (FdArgs), passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FdArgs {
    mats: u64,
    layers: u64,
    n_layers: i32,
    n_mats: i32,
    x: u64,
    q: u64,
    k: u64,
    v: u64,
    att: u64,
    gate: u64,
    up: u64,
    gbar: u64,
    trace: u64,
    n_embd: i32,
    n_ff: i32,
    n_head: i32,
    n_head_kv: i32,
    hd: i32,
    act: i32,
    kv_base: i32,
    pos: i32,
    theta_scale: f32,
    eps: f32,
    attn_scale: f32,
    neox: i32,
}

/// How a matrix of `cols` columns is cut for the ring: rows per chunk (the most of 16, 8,
/// .. 1 whose bytes fit a stage) and log2 of the slices each row is split into (so that a
/// chunk holds at least 16 tasks for the 16 consumer warps, a slice at least 8 blocks).
/// None if one row does not fit a stage.
fn chunking(q6: bool, cols: usize) -> Option<(usize, u32)> {
    let nb = cols / 256;
    let row_bytes = nb * if q6 { 208 } else { 144 };
    let mut c = FD_MAXC;
    while c > 1 && c * row_bytes > FD_STAGE_BYTES {
        c /= 2;
    }
    if c * row_bytes > FD_STAGE_BYTES {
        return None;
    }
    let mut lw = 0u32;
    while (c << lw) < 16 && (1usize << lw) < FD_MAXW && (8usize << lw) <= nb {
        lw += 1;
    }
    Some((c, lw))
}

/// A matrix as the table builder sees it.
#[derive(Clone, Copy, Debug)]
struct MatSpec {
    w: u64,
    y: u64,
    q6: bool,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

/// The token's matrices, numbered chunk by chunk in order (None if one does not fit).
fn mat_table(specs: &[MatSpec]) -> Option<Vec<FdMat>> {
    let mut out = Vec::with_capacity(specs.len());
    let mut chunk0 = 0usize;
    for m in specs {
        let (c, lw) = chunking(m.q6, m.cols)?;
        let nch = m.rows.div_ceil(c);
        out.push(FdMat {
            w: m.w,
            y: m.y,
            ty: i32::from(m.q6),
            rows: i32::try_from(m.rows).ok()?,
            cols: i32::try_from(m.cols).ok()?,
            crows: c as i32,
            lwpr: lw as i32,
            chunk0: i32::try_from(chunk0).ok()?,
            nch: i32::try_from(nch).ok()?,
            accumulate: i32::from(m.accumulate),
        });
        chunk0 += nch;
    }
    i32::try_from(chunk0).ok()?;
    Some(out)
}

/// Whether the model's shapes are ones `fd_decode` covers (weights are checked per call).
fn shapes_supported(cfg: &ModelConfig, kv: &CudaKv) -> bool {
    let hd = cfg.head_dim;
    let qd = cfg.n_head * hd;
    cfg.arch != Arch::Gemma3
        && cfg.sliding_window.is_none()
        && (hd == 64 || hd == 128)
        && cfg.rope_dims == hd
        && cfg.n_head_kv > 0
        && cfg.n_head.is_multiple_of(cfg.n_head_kv)
        && qd.is_multiple_of(256)
        && qd <= FD_XMAX
        && cfg.n_embd.is_multiple_of(256)
        && cfg.n_embd <= FD_NORM_MAX
        && cfg.n_ff.is_multiple_of(256)
        && cfg.n_ff <= FD_XMAX
        && kv.shape.head_dim == hd
        && kv.shape.n_head_kv == cfg.n_head_kv
        && kv.kp.len() == cfg.n_layers
}

/// The device tables and scratch of one model's fused decode, kept while the weights,
/// cache and activation buffers stay where they are (`key`).
pub(crate) struct FusedDecode {
    key: Vec<u64>,
    mats: CudaSlice<u8>,
    layers: CudaSlice<u8>,
    n_mats: usize,
    gbar: CudaSlice<u32>,
    /// FLEA_CUDA_FUSED_TRACE: block 0's timestamps, FD_TRACE per layer.
    trace: Option<CudaSlice<u64>>,
}

/// Phases `fd_decode` stamps (FLEA_CUDA_FUSED_TRACE): what each took, summed over layers
/// and tokens, and the tokens traced.
#[derive(Default)]
pub(crate) struct FusedTrace {
    tokens: u64,
    phase_ns: [u64; FD_TRACE - 1],
}

/// Stamps per layer (FD_TRACE) and what lies between consecutive ones.
const FD_TRACE: usize = 15;
const PHASES: [&str; FD_TRACE - 1] = [
    "attn norm + Q8_K",
    "q/k/v mat-vecs",
    "barrier",
    "attention",
    "barrier",
    "attn output Q8_K",
    "output mat-vec",
    "barrier",
    "ffn norm + Q8_K",
    "gate/up mat-vecs",
    "barrier",
    "GLU + Q8_K",
    "down mat-vec",
    "barrier",
];

impl FusedTrace {
    fn add(&mut self, stamps: &[u64]) {
        self.tokens += 1;
        for l in stamps.chunks_exact(FD_TRACE) {
            for (p, ns) in self.phase_ns.iter_mut().enumerate() {
                *ns += l[p + 1].saturating_sub(l[p]);
            }
        }
    }

    /// One line per phase: microseconds per token.
    pub(crate) fn report(&self) -> String {
        let t = self.tokens.max(1) as f64;
        let total: u64 = self.phase_ns.iter().sum();
        let mut out = format!(
            "cuda: fused decode, {} tokens traced, {:.1} us per token in the layers:\n",
            self.tokens,
            total as f64 / t / 1e3
        );
        for (name, ns) in PHASES.iter().zip(self.phase_ns) {
            out += &format!("  {name:<18} {:8.1} us\n", ns as f64 / t / 1e3);
        }
        out
    }
}

/// Opts `fd_decode` into FD_SMEM of shared memory and checks that one block of it fits an
/// SM (the cooperative launch needs every block resident). False: never used.
pub(crate) fn opt_in(ctx: &cudarc::driver::CudaContext, f: &cudarc::driver::CudaFunction) -> bool {
    use cudarc::driver::sys::CUfunction_attribute;
    if (crate::dynamic_smem_room(ctx, f) as usize) < FD_SMEM {
        return false;
    }
    let set = f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        FD_SMEM as i32,
    );
    set.is_ok()
        && f.occupancy_max_active_blocks_per_multiprocessor(FD_THREADS, FD_SMEM, None)
            .is_ok_and(|n| n >= 1)
}

fn bytes_of<T: Copy>(items: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(items);
    let mut out = vec![0u8; n];
    // SAFETY: T is a repr(C) struct of plain integers and floats (FdMat, FdLayer): every byte
    // of `items` is initialised (explicit padding fields), and `out` holds exactly n bytes.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr() as *const u8, out.as_mut_ptr(), n) };
    out
}

impl CudaBackend {
    /// Turn the fused decode on or off (tests compare both; off at start unless
    /// FLEA_CUDA_FUSED_DECODE=1).
    pub fn set_fused_decode(&self, on: bool) {
        self.fused_decode.store(on, Ordering::Relaxed);
    }

    /// Decode steps this backend ran through the fused decode so far.
    pub fn fused_decode_steps(&self) -> u64 {
        self.fused_steps.load(Ordering::Relaxed)
    }

    /// Device pointer of a resident matrix the kernel reads, and whether it is repacked
    /// Q6_K; None if it is not resident, not Q4_K / repacked Q6_K, or misaligned.
    fn fused_matrix(&self, w: &Weight) -> Option<(u64, bool)> {
        let p = self.mapped(w.data.as_ptr() as usize, w.data.len())?;
        let q6 = match w.ty {
            GgmlType::Q4_K => false,
            GgmlType::Q6_K if self.is_repacked(p) => true,
            _ => return None,
        };
        (p.is_multiple_of(16)
            && w.cols.is_multiple_of(256)
            && w.data.len() == w.rows * w.row_bytes())
        .then_some((p, q6))
    }

    /// A resident f32 vector of `n` values, 16-byte aligned.
    fn fused_vector(&self, w: &Weight, n: usize) -> Option<u64> {
        if w.ty != GgmlType::F32 || w.rows * w.cols != n {
            return None;
        }
        let p = self.mapped(w.data.as_ptr() as usize, w.data.len())?;
        p.is_multiple_of(16).then_some(p)
    }

    /// Builds (or finds) the tables for these layers, cache and buffers; None if the model
    /// is not one the kernel covers.
    fn fused_tables(
        &self,
        cfg: &ModelConfig,
        layers: &[LayerWeights],
        kv: &CudaKv,
        acts: &LayerActs<'_, CudaAct>,
        key: Vec<u64>,
    ) -> Result<Option<FusedDecode>> {
        let (d, qd, kvd, ff) = (
            cfg.n_embd,
            cfg.n_head * cfg.head_dim,
            cfg.kv_dim(),
            cfg.n_ff,
        );
        let mut specs = Vec::with_capacity(7 * layers.len());
        let mut fl = Vec::with_capacity(layers.len());
        for (il, w) in layers.iter().enumerate() {
            if w.bq.is_some()
                || w.bk.is_some()
                || w.bv.is_some()
                || w.q_norm.is_some()
                || w.k_norm.is_some()
                || w.attn_post_norm.is_some()
                || w.ffn_post_norm.is_some()
            {
                return Ok(None);
            }
            let (Some(an), Some(fnorm)) = (
                self.fused_vector(&w.attn_norm, d),
                self.fused_vector(&w.ffn_norm, d),
            ) else {
                return Ok(None);
            };
            let mat0 = specs.len() as i32;
            let jobs: [(&Weight, &CudaAct, usize, usize, bool); 7] = [
                (&w.wq, &*acts.q, qd, d, false),
                (&w.wk, &*acts.k, kvd, d, false),
                (&w.wv, &*acts.v, kvd, d, false),
                (&w.wo, &*acts.x, d, qd, true),
                (&w.w_gate, &*acts.gate, ff, d, false),
                (&w.w_up, &*acts.up, ff, d, false),
                (&w.w_down, &*acts.x, d, ff, true),
            ];
            for (m, y, rows, cols, accumulate) in jobs {
                if m.rows != rows || m.cols != cols || y.width != rows {
                    return Ok(None);
                }
                let Some((p, q6)) = self.fused_matrix(m) else {
                    return Ok(None);
                };
                specs.push(MatSpec {
                    w: p,
                    y: y.ptr,
                    q6,
                    rows,
                    cols,
                    accumulate,
                });
            }
            let (Some(&kc), Some(&vc)) = (kv.kp.get(il), kv.vp.get(il)) else {
                return Ok(None);
            };
            fl.push(FdLayer {
                attn_norm: an,
                ffn_norm: fnorm,
                kc,
                vc,
                mat0,
                _pad: 0,
            });
        }
        let Some(mats) = mat_table(&specs) else {
            return Ok(None);
        };
        let st = &self.stream;
        let err = |e| be(format!("fused decode scratch: {e:?}"));
        Ok(Some(FusedDecode {
            key,
            mats: st.clone_htod(&bytes_of(&mats)).map_err(err)?,
            layers: st.clone_htod(&bytes_of(&fl)).map_err(err)?,
            n_mats: mats.len(),
            gbar: st.alloc_zeros::<u32>(1).map_err(err)?,
            trace: if self.fused_trace.is_some() {
                Some(
                    st.alloc_zeros::<u64>(FD_TRACE * layers.len())
                        .map_err(err)?,
                )
            } else {
                None
            },
        }))
    }

    /// `Backend::decode_layers` for CUDA: see the module docs.
    pub(crate) fn decode_layers_fused(
        &self,
        cfg: &ModelConfig,
        layers: &[LayerWeights],
        row: Row,
        kv: &mut CudaKv,
        acts: LayerActs<'_, CudaAct>,
    ) -> Result<bool> {
        if !self.fuses_decode()
            || layers.len() != cfg.n_layers
            || row.seq >= kv.shape.n_seq
            || row.pos >= kv.shape.n_ctx
            || row.pos >= FD_ATT_KEYS
            || !shapes_supported(cfg, kv)
        {
            return Ok(false);
        }
        // The tables depend on where every weight, cache and buffer is: rebuilt when any moves.
        let mut key = Vec::with_capacity(layers.len() * 18 + 16);
        for w in layers {
            let tensors = [
                &w.attn_norm,
                &w.wq,
                &w.wk,
                &w.wv,
                &w.wo,
                &w.ffn_norm,
                &w.w_gate,
                &w.w_up,
                &w.w_down,
            ];
            for t in tensors {
                key.push(t.data.as_ptr() as u64);
                key.push(t.data.len() as u64);
            }
        }
        key.extend(kv.kp.iter().chain(kv.vp.iter()).copied());
        for a in [
            &acts.x, &acts.q, &acts.k, &acts.v, &acts.attn, &acts.gate, &acts.up,
        ] {
            key.push(a.ptr);
        }
        key.push(kv.shape.n_ctx as u64);
        // Device addresses come from the mappings: any change to them rebuilds the tables.
        key.push(self.map_generation.load(Ordering::Relaxed));
        let mut slot = self
            .fused
            .lock()
            .map_err(|_| be("fused decode lock poisoned"))?;
        if slot.as_ref().is_none_or(|f| f.key != key) {
            *slot = None;
            match self.fused_tables(cfg, layers, kv, &acts, key)? {
                Some(f) => *slot = Some(f),
                None => return Ok(false),
            }
        }
        let Some(f) = slot.as_ref() else {
            return Ok(false);
        };
        for a in [
            &acts.x, &acts.q, &acts.k, &acts.v, &acts.attn, &acts.gate, &acts.up,
        ] {
            if a.rows == 0 {
                return Err(be("fused decode: empty activation buffer"));
            }
        }
        if acts.attn.width != cfg.n_head * cfg.head_dim || acts.x.width != cfg.n_embd {
            return Err(be("fused decode: activation widths do not match the model"));
        }
        let st = &self.stream;
        let args = FdArgs {
            mats: dptr(&f.mats, st),
            layers: dptr(&f.layers, st),
            n_layers: cfg.n_layers as i32,
            n_mats: f.n_mats as i32,
            x: acts.x.ptr,
            q: acts.q.ptr,
            k: acts.k.ptr,
            v: acts.v.ptr,
            att: acts.attn.ptr,
            gate: acts.gate.ptr,
            up: acts.up.ptr,
            gbar: dptr(&f.gbar, st),
            trace: f.trace.as_ref().map_or(0, |t| dptr(t, st)),
            n_embd: cfg.n_embd as i32,
            n_ff: cfg.n_ff as i32,
            n_head: cfg.n_head as i32,
            n_head_kv: cfg.n_head_kv as i32,
            hd: cfg.head_dim as i32,
            act: match cfg.ffn {
                FfnActivation::SwiGlu => 0,
                FfnActivation::GeGlu => 1,
            },
            kv_base: (row.seq * kv.shape.n_ctx) as i32,
            pos: row.pos as i32,
            theta_scale: cfg.rope_base.powf(-2.0 / cfg.rope_dims as f32),
            eps: cfg.rms_eps,
            attn_scale: cfg.attn_scale,
            neox: matches!(cfg.rope_style, flea_model::config::RopeStyle::Neox) as i32,
        };
        self.launch_fused(&args, dptr(&f.gbar, st))?;
        self.fused_steps.fetch_add(1, Ordering::Relaxed);
        if let (Some(t), Some(acc)) = (&f.trace, &self.fused_trace) {
            let stamps = st
                .clone_dtoh(t)
                .map_err(|e| be(format!("fused decode trace: {e:?}")))?;
            acc.lock()
                .map_err(|_| be("fused trace lock poisoned"))?
                .add(&stamps);
        }
        Ok(true)
    }

    /// Zero the grid-barrier counter, then launch `fd_decode` with one block per SM, all
    /// resident at once (cooperative launch: the driver refuses a grid that would not be).
    fn launch_fused(&self, args: &FdArgs, gbar: u64) -> Result<()> {
        use cudarc::driver::sys;
        self.bind()?;
        // SAFETY: gbar is a live 4-byte device allocation of this context; the memset is
        // ordered on the compute stream before the launch that reads it.
        unsafe { sys::cuMemsetD32Async(gbar, 0, 1, self.stream.cu_stream()).result() }
            .map_err(|e| be(format!("fused decode barrier reset: {e:?}")))?;
        let mut attrs = [sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { cooperative: 1 },
        }];
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (self.sms as u32, 1, 1),
            block_dim: (FD_THREADS, 1, 1),
            shared_mem_bytes: FD_SMEM as u32,
        };
        let mut a = *args;
        let mut params = [&mut a as *mut FdArgs as *mut std::ffi::c_void];
        // SAFETY: the kernel takes one FdArgs by value (same repr(C) layout as kernels.cu);
        // every pointer in it addresses a live device buffer sized by `fused_tables` and the
        // checks above; `a` lives through the call.
        unsafe { self.launch_with("fd_decode", cfg, &mut attrs, &mut params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_and_fits_an_sm90_block() {
        // kernels.cu: FD_SMEM = ring + xq + xd + xs + part + rcnt + red + warp scratch + mbarriers.
        assert_eq!(FD_SMEM, 228_288);
        const { assert!(FD_SMEM <= 227 * 1024, "above the sm_90 opt-in limit") };
        assert_eq!(std::mem::size_of::<FdMat>(), 48);
        assert_eq!(std::mem::size_of::<FdLayer>(), 40);
        assert_eq!(std::mem::size_of::<FdArgs>(), 144);
    }

    #[test]
    fn chunks_fit_a_stage_and_give_every_warp_a_task() {
        for q6 in [false, true] {
            for cols in (256..=FD_XMAX).step_by(256) {
                let (c, lw) = chunking(q6, cols).expect("every supported width fits");
                let nb = cols / 256;
                let row = nb * if q6 { 208 } else { 144 };
                assert!(c.is_power_of_two() && c <= FD_MAXC && c * row <= FD_STAGE_BYTES);
                // The next size up would not fit (the most rows that do).
                assert!(c == FD_MAXC || 2 * c * row > FD_STAGE_BYTES);
                let wpr = 1usize << lw;
                assert!(wpr <= FD_MAXW);
                // Slices of at least 4 blocks per lane group; 16 tasks unless rows are few.
                assert!(wpr == 1 || 4 * wpr <= nb);
                assert!(c * wpr >= 16 || wpr == FD_MAXW || 16 * wpr > nb);
            }
        }
    }

    #[test]
    fn every_row_is_in_exactly_one_chunk() {
        let m = |q6, rows, cols| MatSpec {
            w: 0,
            y: 0,
            q6,
            rows,
            cols,
            accumulate: false,
        };
        let specs = [
            m(false, 5120, 5120),
            m(true, 5120, 13824),
            m(false, 13824, 5120),
            m(true, 7, 256),
        ];
        let t = mat_table(&specs).unwrap();
        let mut next = 0;
        for (fm, s) in t.iter().zip(&specs) {
            assert_eq!(fm.chunk0, next, "chunks numbered in order");
            assert!(fm.nch as usize * fm.crows as usize >= s.rows);
            assert!(
                (fm.nch as usize - 1) * (fm.crows as usize) < s.rows,
                "no empty chunk"
            );
            next += fm.nch;
        }
        // Too wide for a stage: refused, not mis-cut.
        assert!(chunking(true, 1 << 20).is_none());
    }
}
