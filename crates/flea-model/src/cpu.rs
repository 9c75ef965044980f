//! The CPU backend: quantized matmuls through `flea-quant`, split over a thread pool.
//!
//! Numerics follow llama.cpp's CPU backend on purpose, so that results can be compared
//! position by position: activations are rounded to the weight type's vec-dot format before
//! each quantized matmul, the KV cache is F16, q is rounded to F16 before q·k, attention
//! probabilities are rounded to F16 before they weight V, and GELU goes through an F16 table.

use crate::backend::{AttnParams, Backend, KvShape, RopeParams};
use crate::config::{FfnActivation, RopeStyle};
use crate::pool::{Disjoint, ThreadPool};
use crate::weights::Weight;
use crate::{ModelError, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::cell::RefCell;
use std::sync::OnceLock;

/// An activation matrix: `rows` × `width` f32, row-major.
pub struct CpuAct {
    pub data: Vec<f32>,
    pub width: usize,
}

impl CpuAct {
    fn rows(&self, n: usize) -> Result<&[f32]> {
        self.data.get(..n * self.width).ok_or_else(|| {
            ModelError::Backend(format!("activation buffer holds fewer than {n} rows"))
        })
    }
    fn rows_mut(&mut self, n: usize) -> Result<&mut [f32]> {
        let w = self.width;
        self.data.get_mut(..n * w).ok_or_else(|| {
            ModelError::Backend(format!("activation buffer holds fewer than {n} rows"))
        })
    }
}

/// F16 K and V per layer, [sequence slot][position][kv_dim].
pub struct CpuKv {
    pub shape: KvShape,
    /// Per layer; a layer's cache is allocated when first written (a CPU that computes
    /// only some layers, beside a GPU, holds only theirs).
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl CpuKv {
    /// K and V rows `pos0 .. pos0 + n` of sequence 0 in `layer`, as F16 bits to write into
    /// (another backend's cache copied over in place).
    pub fn rows_bits_mut(
        &mut self,
        layer: usize,
        pos0: usize,
        n: usize,
    ) -> Result<(&mut [u16], &mut [u16])> {
        use half::slice::HalfFloatSliceExt;
        let kvd = self.shape.n_head_kv * self.shape.head_dim;
        let (k, v) = self.layer_mut(layer)?;
        let range = pos0 * kvd..(pos0 + n) * kvd;
        match (k.get_mut(range.clone()), v.get_mut(range)) {
            (Some(k), Some(v)) => Ok((k.reinterpret_cast_mut(), v.reinterpret_cast_mut())),
            _ => Err(ModelError::Backend(format!(
                "kv rows {pos0}+{n} of layer {layer} out of range"
            ))),
        }
    }

    /// Layer `layer`'s whole K and V caches as bytes (allocated now if not yet), e.g. to
    /// page-lock them for copies. They never move afterwards.
    pub fn layer_bytes_mut(&mut self, layer: usize) -> Result<(&mut [u8], &mut [u8])> {
        let (k, v) = self.layer_mut(layer)?;
        let bytes = |x: &mut Vec<f16>| {
            // SAFETY: f16 is two plain bytes with no invalid bit patterns; the byte view
            // covers exactly the vector's initialised elements and borrows it mutably.
            unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), x.len() * 2) }
        };
        Ok((bytes(k), bytes(v)))
    }

    fn per_layer(&self) -> usize {
        self.shape.n_seq * self.shape.n_ctx * self.shape.n_head_kv * self.shape.head_dim
    }

    /// Layer `layer`'s K and V caches, allocated on first use.
    fn layer_mut(&mut self, layer: usize) -> Result<(&mut Vec<f16>, &mut Vec<f16>)> {
        let per_layer = self.per_layer();
        match (self.k.get_mut(layer), self.v.get_mut(layer)) {
            (Some(k), Some(v)) => {
                if k.len() != per_layer {
                    k.resize(per_layer, f16::ZERO);
                    v.resize(per_layer, f16::ZERO);
                }
                Ok((k, v))
            }
            _ => Err(ModelError::Backend(format!(
                "no KV cache for layer {layer}"
            ))),
        }
    }
}

pub struct CpuBackend {
    pool: ThreadPool,
    threads: usize,
    /// Per-operation wall time (`FLEA_CPU_PROFILE=1`), None when off.
    profile: Option<OpProfile>,
    /// Greedy tokens of a chained decode (`Backend::token_slots`): the same contract as a
    /// GPU's, so the executor's chaining is tested where no GPU is.
    token_slots: std::sync::Mutex<TokenSlots>,
}

/// Number of token slots the CPU keeps.
const CPU_TOKEN_SLOTS: usize = 4;

#[derive(Default)]
struct TokenSlots {
    /// Largest logit and its index so far among the calls of one token.
    best: Option<(f32, usize)>,
    /// The best candidates so far of a sampled token, as `sampling::candidate_key`s.
    candidates: Vec<u64>,
    /// The logits of a whole-vocabulary sampled token, gathered from its calls.
    vocab: Vec<f32>,
    tokens: [u32; CPU_TOKEN_SLOTS],
}

/// Calls and wall time per backend operation since the last report: where a CPU pass goes
/// besides the matmuls (the single-threaded element-wise operations, attention over the
/// context), with the same names on every run.
#[derive(Default)]
struct OpProfile {
    ops: std::sync::Mutex<Vec<(&'static str, u64, f64)>>,
}

/// Adds its lifetime to `name`'s entry when dropped (a no-op without a profile).
struct OpTimer<'a> {
    /// The profile and when the operation began; None when profiling is off (no clock read).
    started: Option<(&'a OpProfile, std::time::Instant)>,
    name: &'static str,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let Some((p, start)) = self.started else {
            return;
        };
        let dt = start.elapsed().as_secs_f64();
        // A poisoned lock only loses profile entries.
        if let Ok(mut ops) = p.ops.lock() {
            match ops.iter_mut().find(|e| e.0 == self.name) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += dt;
                }
                None => ops.push((self.name, 1, dt)),
            }
        }
    }
}

/// Weight bytes per row tile when a matmul runs several segments (fits L2 with room).
const SEGMENT_TILE_BYTES: usize = 128 * 1024;

thread_local! {
    /// Per-thread output block for batched matmuls, reused across calls.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One matrix of a (possibly fused) matmul call, split into row chunks.
struct MatmulPart<'a> {
    w: &'a Weight<'a>,
    acts: &'a [u8],
    out: Disjoint<f32>,
    chunk_rows: usize,
    first_task: usize,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Result<CpuBackend> {
        let threads = threads.max(1);
        let pool = ThreadPool::new(threads)
            .map_err(|e| ModelError::Backend(format!("thread pool: {e}")))?;
        let profile = std::env::var_os("FLEA_CPU_PROFILE")
            .is_some_and(|v| v != "0")
            .then(OpProfile::default);
        Ok(CpuBackend {
            pool,
            threads,
            profile,
            token_slots: Default::default(),
        })
    }

    fn timer(&self, name: &'static str) -> OpTimer<'_> {
        OpTimer {
            started: self
                .profile
                .as_ref()
                .map(|p| (p, std::time::Instant::now())),
            name,
        }
    }

    /// With `FLEA_CPU_PROFILE` set: calls and wall time per operation since the last report,
    /// as a table (largest first); None when profiling is off or nothing ran.
    pub fn profile_report(&self) -> Option<String> {
        let p = self.profile.as_ref()?;
        let mut ops = std::mem::take(&mut *p.ops.lock().ok()?);
        if ops.is_empty() {
            return None;
        }
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = ops.iter().map(|e| e.2).sum();
        let mut out = format!(
            "CPU profile: {:.3} ms in operations ({} threads)\n  operation            calls    total ms    mean us      %\n",
            total * 1e3,
            self.threads
        );
        for (name, calls, secs) in ops {
            out += &format!(
                "  {name:<18} {calls:>7} {:>11.3} {:>10.2} {:>6.1}\n",
                secs * 1e3,
                secs * 1e6 / calls.max(1) as f64,
                100.0 * secs / total.max(1e-12)
            );
        }
        Some(out)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn check_weight(w: &Weight) -> Result<()> {
    let want = w.rows * w.row_bytes();
    if w.data.len() != want {
        return Err(ModelError::Backend(format!(
            "weight {}x{} {} has {} bytes, expected {want}",
            w.rows,
            w.cols,
            w.ty,
            w.data.len()
        )));
    }
    Ok(())
}

/// llama.cpp's GELU (tanh approximation) evaluated through an F16 lookup table.
fn gelu_f16_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                const GELU_COEF_A: f32 = 0.044715;
                // gcc fuses ggml's `1.0f + GELU_COEF_A*x*x` (checked against its table).
                let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
                let g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh());
                f16::from_f32(g)
            })
            .collect()
    })
}

fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let t = gelu_f16_table();
        t.get(f16::from_f32(x).to_bits() as usize)
            .map_or(0.0, |g| g.to_f32())
    }
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Kv = CpuKv;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {:?})",
            self.threads,
            flea_quant::best_isa()
        )
    }

    fn alloc_act(&self, rows: usize, width: usize) -> Result<CpuAct> {
        Ok(CpuAct {
            data: vec![0.0; rows * width],
            width,
        })
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CpuKv> {
        let mk = || (0..shape.n_layers).map(|_| Vec::new()).collect();
        Ok(CpuKv {
            shape,
            k: mk(),
            v: mk(),
        })
    }

    fn embed(&self, table: &Weight, tokens: &[u32], scale: f32, out: &mut CpuAct) -> Result<()> {
        let _t = self.timer("embed");
        check_weight(table)?;
        let rb = table.row_bytes();
        let d = table.cols;
        let o = out.rows_mut(tokens.len())?;
        for (t, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= table.rows {
                return Err(ModelError::Input(format!(
                    "token id {tok} out of range (vocab {})",
                    table.rows
                )));
            }
            let row = &table.data[tok * rb..(tok + 1) * rb];
            let dst = &mut o[t * d..(t + 1) * d];
            flea_quant::dequantize(table.ty, row, dst)?;
            if scale != 1.0 {
                dst.iter_mut().for_each(|x| *x *= scale);
            }
        }
        Ok(())
    }

    fn rms_norm(&self, n: usize, x: &CpuAct, w: &Weight, eps: f32, out: &mut CpuAct) -> Result<()> {
        let _t = self.timer("rms_norm");
        let wv = w.as_f32();
        let g = wv.len();
        let src = x.rows(n)?;
        let dst = out.rows_mut(n)?;
        if g == 0 || src.len() % g != 0 || dst.len() != src.len() {
            return Err(ModelError::Backend("rms_norm: width mismatch".into()));
        }
        for (s, d) in src.chunks_exact(g).zip(dst.chunks_exact_mut(g)) {
            // Sum in f64 like ggml does, of the squares rounded to f32 (ggml squares in
            // float, then widens).
            let ss: f64 = s.iter().map(|&v| (v * v) as f64).sum();
            let mean = (ss / g as f64) as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for ((d, &s), &wi) in d.iter_mut().zip(s).zip(&wv) {
                *d = s * inv * wi;
            }
        }
        Ok(())
    }

    fn matmul(&self, n: usize, w: &Weight, x: &CpuAct, out: &mut CpuAct) -> Result<()> {
        self.matmuls(n, x, &mut [(w, out)])
    }

    fn matmuls(&self, n: usize, x: &CpuAct, jobs: &mut [(&Weight, &mut CpuAct)]) -> Result<()> {
        self.matmuls_segmented(&[n], x, jobs)
    }

    /// Each segment goes through the kernels on its own (one row: the one-row kernel, as a
    /// single-sequence decode does; more: tiles of 4 from the segment's first row, as that
    /// sequence's own prompt pass does), so its results are bit-identical to an unbatched
    /// pass. The weight chunk a task owns is read from memory once and reused from cache
    /// for every segment.
    fn matmuls_segmented(
        &self,
        segments: &[usize],
        x: &CpuAct,
        jobs: &mut [(&Weight, &mut CpuAct)],
    ) -> Result<()> {
        let quantize_timer = self.timer("matmul_quantize");
        let n: usize = segments.iter().sum();
        if n == 0 || segments.contains(&0) {
            return Err(ModelError::Backend("matmul: empty segment".into()));
        }
        let xs = x.rows(n)?;
        // Quantize the input once per activation format (q/k/v usually share one).
        let mut quantized: Vec<(flea_quant::GgmlType, Vec<u8>)> = Vec::new();
        for (w, out) in jobs.iter() {
            check_weight(w)?;
            if x.width != w.cols || out.width != w.rows {
                return Err(ModelError::Backend(format!(
                    "matmul: {}x{} weight with input width {} and output width {}",
                    w.rows, w.cols, x.width, out.width
                )));
            }
            let fmt = flea_quant::vec_dot_type(w.ty)?;
            if !quantized.iter().any(|(f, _)| *f == fmt) {
                let act_rb = flea_quant::act_row_bytes(fmt, w.cols);
                let mut acts = Vec::with_capacity(n * act_rb);
                let mut row_q = Vec::with_capacity(act_rb);
                for r in xs.chunks_exact(w.cols) {
                    flea_quant::quantize_activations(fmt, r, &mut row_q)?;
                    acts.extend_from_slice(&row_q);
                }
                quantized.push((fmt, acts));
            }
        }
        drop(quantize_timer);
        let _t = self.timer("matmul");
        let mut parts = Vec::with_capacity(jobs.len());
        let mut n_tasks = 0;
        for (w, out) in jobs.iter_mut() {
            let fmt = flea_quant::vec_dot_type(w.ty)?;
            let acts = quantized
                .iter()
                .find(|(f, _)| *f == fmt)
                .map(|(_, a)| a.as_slice())
                .unwrap_or(&[]);
            // Enough chunks per matrix for load balance, each big enough to amortise the
            // hand-out; a multiple of 8 rows keeps SIMD-friendly blocks.
            let chunk_rows = w
                .rows
                .div_ceil(self.threads * 4)
                .max(16)
                .next_multiple_of(8)
                .min(w.rows.max(1));
            let first_task = n_tasks;
            n_tasks += w.rows.div_ceil(chunk_rows);
            parts.push(MatmulPart {
                w,
                acts,
                out: Disjoint::new(out.rows_mut(n)?),
                chunk_rows,
                first_task,
            });
        }
        let task = |t: usize| {
            let Some(p) = parts.iter().rev().find(|p| p.first_task <= t) else {
                return;
            };
            let w = p.w;
            let rb = w.row_bytes();
            let r0 = (t - p.first_task) * p.chunk_rows;
            let r1 = (r0 + p.chunk_rows).min(w.rows);
            let wr = &w.data[r0 * rb..r1 * rb];
            let act_rb = p.acts.len() / n;
            // With several segments, walk the task's rows in L2-sized tiles and run every
            // segment over a tile before the next: each weight byte comes from memory once
            // per pass, not once per sequence. Tiles start at even offsets from r0, so the
            // kernels pair rows exactly as over the whole chunk (same bits).
            let tile_rows = if segments.len() > 1 {
                ((SEGMENT_TILE_BYTES / rb.max(1)) & !7).max(8)
            } else {
                r1 - r0
            };
            let mut a = r0;
            while a < r1 {
                let b_end = (a + tile_rows).min(r1);
                let wt = &wr[(a - r0) * rb..(b_end - r0) * rb];
                let m = b_end - a;
                let mut t0 = 0;
                for &len in segments {
                    let acts = &p.acts[t0 * act_rb..(t0 + len) * act_rb];
                    if len == 1 {
                        // SAFETY: each task owns columns r0..r1 of every token's output row.
                        let dst = unsafe { p.out.range(t0 * w.rows + a, m) };
                        flea_quant::matvec(w.ty, w.cols, wt, acts, dst);
                    } else {
                        BLOCK.with(|blk| {
                            let mut blk = blk.borrow_mut();
                            blk.resize(len * m, 0.0);
                            flea_quant::matmul(w.ty, w.cols, wt, acts, len, &mut blk);
                            for (tok, src) in blk.chunks_exact(m).enumerate() {
                                // SAFETY: each task owns columns r0..r1 of every token's
                                // output row.
                                let dst = unsafe { p.out.range((t0 + tok) * w.rows + a, m) };
                                dst.copy_from_slice(src);
                            }
                        });
                    }
                    t0 += len;
                }
                a = b_end;
            }
        };
        self.pool.run(n_tasks, &task);
        Ok(())
    }

    fn add_bias(&self, n: usize, x: &mut CpuAct, b: &Weight) -> Result<()> {
        let _t = self.timer("add_bias");
        let bv = b.as_f32();
        if bv.len() != x.width {
            return Err(ModelError::Backend("add_bias: width mismatch".into()));
        }
        for r in x.rows_mut(n)?.chunks_exact_mut(bv.len()) {
            r.iter_mut().zip(&bv).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn rope(&self, n: usize, x: &mut CpuAct, p: &RopeParams) -> Result<()> {
        let _t = self.timer("rope");
        let hd = p.head_dim;
        let nd = p.rope_dims;
        if x.width != p.n_heads * hd || nd > hd || !nd.is_multiple_of(2) {
            return Err(ModelError::Backend("rope: shape mismatch".into()));
        }
        // cos/sin per position, computed like ggml: theta_i = pos * base^(-2i/nd) by repeated
        // multiplication in f32.
        let theta_scale = p.base.powf(-2.0 / nd as f32);
        let mut cs = vec![(0.0f32, 0.0f32); nd / 2];
        if p.rows.len() != n {
            return Err(ModelError::Backend("rope: row count mismatch".into()));
        }
        for (row, r) in x.rows_mut(n)?.chunks_exact_mut(p.n_heads * hd).zip(p.rows) {
            let mut theta = r.pos as f32;
            for c in cs.iter_mut() {
                *c = (theta.cos(), theta.sin());
                theta *= theta_scale;
            }
            // The fused multiply-adds of ggml's compiled rope (gcc contracts its
            // `x0*cos - x1*sin` and `x0*sin + x1*cos`; checked bit for bit on its output).
            for head in row.chunks_exact_mut(hd) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = match p.style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + nd / 2),
                    };
                    let x0 = head[a];
                    let x1 = head[b];
                    head[a] = x0.mul_add(c, -(x1 * s));
                    head[b] = x0.mul_add(s, x1 * c);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        n: usize,
        q: &CpuAct,
        k: &CpuAct,
        v: &CpuAct,
        kv: &mut CpuKv,
        p: &AttnParams,
        out: &mut CpuAct,
    ) -> Result<()> {
        let _t = self.timer("attention");
        let hd = p.head_dim;
        let kvd = p.n_head_kv * hd;
        let shape = kv.shape;
        p.check_fits(n, &shape)?;
        if k.width != kvd || v.width != kvd || q.width != p.n_head * hd || out.width != q.width {
            return Err(ModelError::Backend("attention: shape mismatch".into()));
        }
        let (kc, vc) = kv.layer_mut(p.layer)?;
        // Row r's slot: sequence r.seq's block of n_ctx positions (check_fits bounds both).
        let slot = |r: &crate::backend::Row| (r.seq * shape.n_ctx + r.pos) * kvd;
        let (ks, vs) = (k.rows(n)?, v.rows(n)?);
        for (t, r) in p.rows.iter().enumerate() {
            let o = slot(r);
            kc[o..o + kvd].convert_from_f32_slice(&ks[t * kvd..(t + 1) * kvd]);
            vc[o..o + kvd].convert_from_f32_slice(&vs[t * kvd..(t + 1) * kvd]);
        }
        let kc: &[f16] = kc;
        let vc: &[f16] = vc;
        let group = p.n_head / p.n_head_kv;
        let qd = p.n_head * hd;
        let qs = q.rows(n)?;
        let o = Disjoint::new(out.rows_mut(n)?);
        // llama.cpp's F16 matmuls take another kernel (another order) for a batch of one
        // token. Per sequence: a row batched with other sequences' rows sums as its own
        // pass would (check_fits bounds every row's seq by n_seq).
        let mut rows_of_seq = vec![0usize; shape.n_seq];
        for r in p.rows {
            if let Some(c) = rows_of_seq.get_mut(r.seq) {
                *c += 1;
            }
        }
        self.pool.run(n * p.n_head, &|idx| {
            {
                // SAFETY: task idx owns head h of token t: elements idx*hd .. (idx+1)*hd.
                let dst = unsafe { o.range(idx * hd, hd) };
                let t = idx / p.n_head;
                let h = idx % p.n_head;
                let kh = h / group;
                let Some(row) = p.rows.get(t) else { return };
                let single = rows_of_seq.get(row.seq) == Some(&1);
                let pos = row.pos;
                // Positions of this row's own sequence: its slot of the cache.
                let base = row.seq * shape.n_ctx * kvd;
                let (kc, vc) = (&kc[base..], &vc[base..]);
                let lo = match p.window {
                    Some(w) => (pos + 1).saturating_sub(w),
                    None => 0,
                };
                // q rounded to f16, as llama.cpp's F16 K x F32 Q matmul does.
                let qrow: Vec<f16> = qs[t * qd + h * hd..t * qd + (h + 1) * hd]
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
                let qbits: &[u16] = qrow.reinterpret_cast();
                let mut scores = vec![0.0f32; pos + 1 - lo];
                // This head's keys / values: position j at j * kvd (cache rows are kvd wide).
                let (keys, vals): (&[u16], &[u16]) = (
                    kc[kh * hd..].reinterpret_cast(),
                    vc[kh * hd..].reinterpret_cast(),
                );
                // In the order of llama.cpp's F16 matmul: ggml_vec_dot_f16 for a batch of
                // one token, tinyBLAS for more (where the head size is a multiple of 16:
                // every model here; else in plain order).
                if !(single
                    && flea_quant::ggml_math::scores_f16_vec(
                        qbits,
                        keys,
                        vals,
                        kvd,
                        lo,
                        &mut scores,
                    ))
                {
                    // A prompt's rows: four keys a call, the same bits as one at a time.
                    let mut done = 0;
                    if !single {
                        let key = |j: usize| -> &[u16] {
                            kc[j * kvd + kh * hd..j * kvd + (kh + 1) * hd].reinterpret_cast()
                        };
                        for (i, quad) in scores.chunks_exact_mut(4).enumerate() {
                            let j = lo + 4 * i;
                            let rows = [key(j), key(j + 1), key(j + 2), key(j + 3)];
                            let Some(d) = flea_quant::dot_f16_x4(qbits, rows) else {
                                break;
                            };
                            quad.copy_from_slice(&d);
                            done += 4;
                        }
                    }
                    let mut kf = vec![0.0f32; hd];
                    for (j, s) in (lo + done..=pos).zip(scores[done..].iter_mut()) {
                        let key = &kc[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
                        let d = if single {
                            flea_quant::ggml_math::dot_f16_vec(key.reinterpret_cast(), qbits)
                        } else {
                            flea_quant::dot_f16(key.reinterpret_cast(), qbits)
                        };
                        *s = match d {
                            Some(d) => d,
                            None => {
                                key.convert_to_f32_slice(&mut kf);
                                qrow.iter().zip(&kf).map(|(a, b)| a.to_f32() * b).sum()
                            }
                        };
                    }
                }
                scores.iter_mut().for_each(|s| *s *= p.scale);
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // ggml's exp and its order of the sum (ggml_vec_soft_max_f32).
                let sum = flea_quant::ggml_math::softmax_exp(&mut scores, lo, max);
                let inv = (1.0 / sum) as f32;
                // V x probabilities as llama.cpp's F16 matmul sums it over the cache
                // positions (a multiple of 64 of them, the unused ones adding exact zeros):
                // lanes by position, fused multiply-adds, then the lanes' tree sum — 16
                // lanes in tinyBLAS, 64 in ggml_vec_dot_f16 (a batch of one token).
                let nl = if single { 64 } else { 16 };
                // Probabilities rounded to f16, as in llama.cpp's V x KQ matmul.
                flea_quant::ggml_math::round_to_f16_scaled(&mut scores, inv);
                let mut lanes = vec![0.0f32; nl * hd];
                let summed =
                    flea_quant::ggml_math::pv_lanes_f16(&scores, vals, kvd, lo, nl, &mut lanes);
                debug_assert!(
                    summed,
                    "every cache row of the window lies inside the layer"
                );
                // The lanes' tree sum per output element (reduce64 / reduce16), all of the
                // head's elements at once.
                let folded = flea_quant::ggml_math::fold_lanes(&mut lanes, hd, nl);
                debug_assert!(folded, "lanes sized nl * hd above");
                dst.copy_from_slice(&lanes[..hd]);
            }
        });
        Ok(())
    }

    fn glu(
        &self,
        n: usize,
        gate: &CpuAct,
        up: &CpuAct,
        act: FfnActivation,
        out: &mut CpuAct,
    ) -> Result<()> {
        let _t = self.timer("glu");
        let g = gate.rows(n)?;
        let u = up.rows(n)?;
        let o = out.rows_mut(n)?;
        if g.len() != u.len() || g.len() != o.len() {
            return Err(ModelError::Backend("glu: shape mismatch".into()));
        }
        let w = gate.width;
        if w == 0 || g.len() % w != 0 {
            return Err(ModelError::Backend("glu: width mismatch".into()));
        }
        // Pieces of whole 16-element chunks from each row's start (ggml's SwiGLU chunks
        // restart at each row, and a row's tail goes through libm's exp: it stays with the
        // row's last piece), so spreading a wide FFN over the pool keeps every bit. Small
        // ones stay on this thread.
        let chunks = w / 16;
        let piece = if n * w >= 8192 {
            chunks.div_ceil(self.threads).max(64)
        } else {
            chunks.max(1)
        };
        let per_row = chunks.div_ceil(piece).max(1);
        let out = Disjoint::new(o);
        self.pool.run(n * per_row, &|t| {
            let (r, k) = (t / per_row, t % per_row);
            let a = r * w + k * piece * 16;
            let b = if k + 1 == per_row {
                (r + 1) * w
            } else {
                a + piece * 16
            };
            let (Some(g), Some(u)) = (g.get(a..b), u.get(a..b)) else {
                return;
            };
            // SAFETY: task t alone owns elements a..b of the output (rows r, piece k).
            let o = unsafe { out.range(a, b - a) };
            match act {
                FfnActivation::SwiGlu => flea_quant::ggml_math::swiglu(g, u, o),
                FfnActivation::GeGlu => {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        // ggml writes a plain +0 below -10 (no product, so no -0).
                        *o = if g <= -10.0 { 0.0 } else { gelu(g) * u };
                    }
                }
            }
        });
        Ok(())
    }

    fn scale_rows(&self, n: usize, x: &mut CpuAct, s: f32) -> Result<bool> {
        let _t = self.timer("scale_rows");
        x.rows_mut(n)?.iter_mut().for_each(|v| *v *= s);
        Ok(true)
    }

    fn add(&self, n: usize, x: &mut CpuAct, y: &CpuAct) -> Result<()> {
        let _t = self.timer("add");
        let ys = y.rows(n)?;
        let xs = x.rows_mut(n)?;
        if xs.len() != ys.len() {
            return Err(ModelError::Backend("add: shape mismatch".into()));
        }
        xs.iter_mut().zip(ys).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn copy_rows(&self, src: &CpuAct, src_row: usize, n: usize, dst: &mut CpuAct) -> Result<()> {
        let _t = self.timer("copy_rows");
        let w = src.width;
        if dst.width != w {
            return Err(ModelError::Backend("copy_rows: width mismatch".into()));
        }
        let s = src.rows(src_row + n)?;
        dst.rows_mut(n)?.copy_from_slice(&s[src_row * w..]);
        Ok(())
    }

    fn copy_rows_to(
        &self,
        src: &CpuAct,
        src_row: usize,
        n: usize,
        dst: &mut CpuAct,
        dst_row: usize,
    ) -> Result<()> {
        let _t = self.timer("copy_rows_to");
        let w = src.width;
        if dst.width != w {
            return Err(ModelError::Backend("copy_rows_to: width mismatch".into()));
        }
        let s = src.rows(src_row + n)?;
        dst.rows_mut(dst_row + n)?[dst_row * w..].copy_from_slice(&s[src_row * w..]);
        Ok(())
    }

    fn read(&self, n: usize, x: &CpuAct) -> Result<Vec<f32>> {
        Ok(x.rows(n)?.to_vec())
    }

    fn write(&self, data: &[f32], x: &mut CpuAct) -> Result<()> {
        let n = data.len() / x.width.max(1);
        if n * x.width != data.len() {
            return Err(ModelError::Backend("write: not whole rows".into()));
        }
        x.rows_mut(n)?.copy_from_slice(data);
        Ok(())
    }

    fn token_slots(&self) -> usize {
        CPU_TOKEN_SLOTS
    }

    fn slot_top_k_max(&self) -> usize {
        crate::sampling::SLOT_TOP_K_MAX
    }

    fn slot_samples_vocab(&self, _how: &crate::sampling::VocabSampling) -> bool {
        true
    }

    fn pick_to_slot(
        &self,
        logits: &CpuAct,
        col0: usize,
        width: usize,
        n_vocab: usize,
        slot: usize,
        pick: &crate::sampling::SlotPick,
    ) -> Result<()> {
        use crate::sampling::{self, SlotPick};
        let row = logits
            .rows(1)?
            .get(..width)
            .ok_or_else(|| ModelError::Backend("pick_to_slot: row narrower than width".into()))?;
        let top_k_fits = match pick {
            SlotPick::Greedy => true,
            SlotPick::Sample(how, _) => (1..=sampling::SLOT_TOP_K_MAX).contains(&how.top_k),
            SlotPick::Vocab(..) => true,
        };
        if slot >= CPU_TOKEN_SLOTS || col0 + width > n_vocab || !top_k_fits {
            return Err(ModelError::Backend(format!(
                "pick_to_slot: slot {slot}, columns {col0}+{width} of {n_vocab}, {pick:?}"
            )));
        }
        let mut s = self
            .token_slots
            .lock()
            .map_err(|_| ModelError::Backend("token slots lock poisoned".into()))?;
        let last = col0 + width == n_vocab;
        match pick {
            SlotPick::Greedy => {
                if col0 == 0 {
                    s.best = None;
                }
                let i = sampling::argmax(row);
                let v = row.get(i).copied().unwrap_or(f32::NAN);
                // (argmax gives 0 when nothing beats -inf: then this chunk adds nothing.)
                if v > f32::NEG_INFINITY && s.best.is_none_or(|(bv, _)| v > bv) {
                    s.best = Some((v, col0 + i));
                }
                if last {
                    s.tokens[slot] = s.best.map_or(0, |(_, i)| i as u32);
                }
            }
            SlotPick::Sample(how, r) => {
                if col0 == 0 {
                    s.candidates.clear();
                }
                sampling::add_candidates(&mut s.candidates, row, col0 as u32, how.top_k);
                if last {
                    let cand = sampling::candidates_of(&s.candidates);
                    s.tokens[slot] = sampling::choose_from_top(&cand, how, *r);
                }
            }
            SlotPick::Vocab(how, r) => {
                if col0 == 0 {
                    s.vocab.clear();
                    s.vocab.resize(n_vocab, f32::NAN);
                }
                let dst = s.vocab.get_mut(col0..col0 + width).ok_or_else(|| {
                    ModelError::Backend("pick_to_slot: vocabulary changed between calls".into())
                })?;
                dst.copy_from_slice(row);
                if last {
                    s.tokens[slot] = sampling::sample_vocab(&s.vocab, how, *r);
                }
            }
        }
        Ok(())
    }

    fn embed_from_slot(
        &self,
        table: &Weight,
        slot: usize,
        scale: f32,
        out: &mut CpuAct,
    ) -> Result<()> {
        let token = self.slot_token(slot)?;
        self.embed(table, &[token], scale, out)
    }

    fn slot_token(&self, slot: usize) -> Result<u32> {
        let s = self
            .token_slots
            .lock()
            .map_err(|_| ModelError::Backend("token slots lock poisoned".into()))?;
        s.tokens
            .get(slot)
            .copied()
            .ok_or_else(|| ModelError::Backend(format!("no token slot {slot}")))
    }

    fn kv_rows(
        &self,
        kv: &CpuKv,
        layer: usize,
        pos0: usize,
        n: usize,
    ) -> Result<(Vec<u16>, Vec<u16>)> {
        let _t = self.timer("kv_rows");
        let kvd = kv.shape.n_head_kv * kv.shape.head_dim;
        let range = pos0 * kvd..(pos0 + n) * kvd;
        match (kv.k.get(layer), kv.v.get(layer)) {
            (Some(k), Some(v)) if k.len() >= range.end => Ok((
                k[range.clone()].iter().map(|h| h.to_bits()).collect(),
                v[range].iter().map(|h| h.to_bits()).collect(),
            )),
            _ => Err(ModelError::Backend(format!(
                "kv_rows: layer {layer} positions {pos0}..{} not cached",
                pos0 + n
            ))),
        }
    }

    fn kv_dim(&self, kv: &CpuKv) -> usize {
        kv.shape.n_head_kv * kv.shape.head_dim
    }

    fn set_kv_rows(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        pos0: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()> {
        let _t = self.timer("set_kv_rows");
        let kvd = kv.shape.n_head_kv * kv.shape.head_dim;
        let (kc, vc) = kv.layer_mut(layer)?;
        let end = pos0 * kvd + k.len();
        if k.len() != v.len() || end > kc.len() {
            return Err(ModelError::Backend("set_kv_rows: rows out of range".into()));
        }
        for (d, s) in kc[pos0 * kvd..end].iter_mut().zip(k) {
            *d = f16::from_bits(*s);
        }
        for (d, s) in vc[pos0 * kvd..end].iter_mut().zip(v) {
            *d = f16::from_bits(*s);
        }
        Ok(())
    }
}

/// The CPU reads every unit where the executor put it.
impl crate::backend::UnitStaging for CpuBackend {
    type Staged = ();

    fn computes_in_place(&self) -> bool {
        true
    }

    fn stage(&self, _key: &[u8], _host: &[u8]) -> Result<()> {
        Ok(())
    }

    fn begin(&self, _staged: &()) -> Result<()> {
        Ok(())
    }

    fn finish(&self, _staged: (), _release_host: bool) -> Result<()> {
        Ok(())
    }
}
