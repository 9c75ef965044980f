//! The transformer forward pass, written once for every backend and every weight location.
//!
//! Read top to bottom: embed the tokens, run each block (attention, then feed-forward, each
//! with a residual connection), normalise, project to logits. Where the architectures differ
//! the code says so inline.

use crate::backend::{AttnParams, Backend, LayerActs, QkvBias, RopeParams, Row};
use crate::config::ModelConfig;
use crate::debug::tap;
use crate::weights::{LayerWeights, Weight};
use crate::Result;

/// Activation buffers for batches of up to `capacity` tokens, allocated once.
pub struct Scratch<B: Backend> {
    pub capacity: usize,
    /// The residual stream.
    x: B::Act,
    xn: B::Act,
    q: B::Act,
    k: B::Act,
    v: B::Act,
    k_normed: B::Act,
    attn: B::Act,
    proj: B::Act,
    gate: B::Act,
    up: B::Act,
    ffn: B::Act,
    /// The normalised rows whose logits are wanted.
    head_norm: B::Act,
    /// Up to LOGIT_CHUNK of them at a time, and their logits.
    head_in: B::Act,
    logits: B::Act,
    logits_width: usize,
    /// The logits buffer of the other width output slices come in (a streamed or placed
    /// output matrix: the planner's slices and the last one's rest), kept so that passes
    /// after the first allocate nothing (a recorded pass may not).
    logits_spare: Option<(usize, B::Act)>,
    /// The head's rows belong to different sequences (set by `head_norm_rows`).
    head_rows_independent: bool,
}

/// Rows projected to logits per output matmul when every position's logits are wanted.
pub const LOGIT_CHUNK: usize = 32;

/// Segments of one row each, for a head of independent rows.
const ONES: [usize; LOGIT_CHUNK] = [1; LOGIT_CHUNK];

impl<B: Backend> Scratch<B> {
    /// Bytes of f32 activations a scratch of `capacity` rows takes (the planner's estimate
    /// of the activation arena), with logits buffers at most `logits_width` wide (the
    /// slices' and, where the last slice is narrower, its rest's).
    pub fn bytes(cfg: &ModelConfig, capacity: usize, logits_width: usize) -> u64 {
        let (d, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let per_row = 4 * d + 2 * qd + 3 * kvd + 3 * ff;
        let fixed = LOGIT_CHUNK * (d + 2 * logits_width);
        4 * (capacity * per_row + fixed) as u64
    }
}

impl<B: Backend> Scratch<B> {
    pub fn new(b: &B, cfg: &ModelConfig, capacity: usize) -> Result<Scratch<B>> {
        Self::with_logits_width(b, cfg, capacity, cfg.n_vocab)
    }

    /// As `new`, with the logits buffer sized for output slices of `logits_width` rows (a
    /// streamed output matrix arrives in slices).
    pub fn with_logits_width(
        b: &B,
        cfg: &ModelConfig,
        capacity: usize,
        logits_width: usize,
    ) -> Result<Scratch<B>> {
        let (d, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        Ok(Scratch {
            capacity,
            x: b.alloc_act(capacity, d)?,
            xn: b.alloc_act(capacity, d)?,
            q: b.alloc_act(capacity, qd)?,
            k: b.alloc_act(capacity, kvd)?,
            v: b.alloc_act(capacity, kvd)?,
            k_normed: b.alloc_act(capacity, kvd)?,
            attn: b.alloc_act(capacity, qd)?,
            proj: b.alloc_act(capacity, d)?,
            gate: b.alloc_act(capacity, ff)?,
            up: b.alloc_act(capacity, ff)?,
            ffn: b.alloc_act(capacity, ff)?,
            head_norm: b.alloc_act(capacity, d)?,
            head_in: b.alloc_act(LOGIT_CHUNK, d)?,
            logits: b.alloc_act(LOGIT_CHUNK, logits_width)?,
            logits_width,
            logits_spare: None,
            head_rows_independent: false,
        })
    }
}

/// The global (non-block) weights.
#[derive(Clone, Copy)]
pub struct HeadWeights<'a> {
    pub token_embd: Weight<'a>,
    pub output_norm: Weight<'a>,
    pub output: Weight<'a>,
}

/// Step 1: token embeddings into the residual stream.
pub fn embed<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    w: &HeadWeights,
    tokens: &[u32],
    s: &mut Scratch<B>,
) -> Result<()> {
    check_batch(tokens.len(), s)?;
    b.embed(&w.token_embd, tokens, cfg.embd_scale, &mut s.x)
}

/// Step 1 of a chained decode: the residual stream's row 0 from the token the
/// backend holds in `slot` (put there by the previous token's [`head_to_slot`]); `table` is the
/// whole embedding table.
pub fn embed_from_slot<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    table: &Weight,
    slot: usize,
    s: &mut Scratch<B>,
) -> Result<()> {
    check_batch(1, s)?;
    b.embed_from_slot(table, slot, cfg.embd_scale, &mut s.x)
}

/// Step 2, once per layer: one transformer block over a batch of rows (each row one token
/// of some sequence at some position; see [`Row`]), updating the residual stream in place.
/// The matmuls run over all rows at once; RoPE and attention use each row's own position
/// and sequence.
pub fn block<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    il: usize,
    w: &LayerWeights,
    rows: &[Row],
    kv: &mut B::Kv,
    s: &mut Scratch<B>,
) -> Result<()> {
    let n = rows.len();
    check_batch(n, s)?;
    let eps = cfg.rms_eps;
    // Each sequence's consecutive rows form one segment of the matmuls.
    let segments = segments(rows);
    let segs: &[usize] = &segments;

    // --- attention ---
    tap(b, "inp", il, n, &mut s.x)?;
    b.output_feeds(&w.wq);
    b.rms_norm(n, &s.x, &w.attn_norm, eps, &mut s.xn)?;
    tap(b, "attn_norm", il, n, &mut s.xn)?;
    b.matmuls_segmented(
        segs,
        &s.xn,
        &mut [(&w.wq, &mut s.q), (&w.wk, &mut s.k), (&w.wv, &mut s.v)],
    )?;
    tap(b, "Qcur", il, n, &mut s.q)?;
    tap(b, "Kcur", il, n, &mut s.k)?;
    tap(b, "Vcur", il, n, &mut s.v)?;
    // Qwen2: Q/K/V biases, added here or (with neither taps nor per-head norms between)
    // inside the attention step below.
    let gemma3 = cfg.arch == crate::config::Arch::Gemma3;
    let taps = crate::debug::taps_active();
    let separate_steps = gemma3 || taps;
    let mut late_bias = None;
    if let (Some(bq), Some(bk), Some(bv)) = (&w.bq, &w.bk, &w.bv) {
        if separate_steps || w.q_norm.is_some() {
            b.add_bias(n, &mut s.q, bq)?;
            b.add_bias(n, &mut s.k, bk)?;
            b.add_bias(n, &mut s.v, bv)?;
        } else {
            late_bias = Some(QkvBias {
                q: bq,
                k: bk,
                v: bv,
            });
        }
    }
    // Gemma 3: RMS norm of each head of q and k before RoPE (below with the RoPE and the
    // attention where no taps read the steps between).
    let head_norms = match (&w.q_norm, &w.k_norm) {
        (Some(qn), Some(kn)) => Some((qn, kn)),
        _ => None,
    };
    if let (Some((qn, kn)), true) = (head_norms, taps || !gemma3) {
        b.rms_norm(n, &s.q, qn, eps, &mut s.attn)?;
        std::mem::swap(&mut s.q, &mut s.attn);
        b.rms_norm(n, &s.k, kn, eps, &mut s.k_normed)?;
        std::mem::swap(&mut s.k, &mut s.k_normed);
    }
    let swa = cfg.is_swa_layer(il);
    let rope = RopeParams {
        rows,
        n_heads: cfg.n_head,
        head_dim: cfg.head_dim,
        rope_dims: cfg.rope_dims,
        base: if swa {
            cfg.rope_base_swa
        } else {
            cfg.rope_base
        },
        style: cfg.rope_style,
    };
    let rope_k = RopeParams {
        n_heads: cfg.n_head_kv,
        ..rope
    };
    let mut attn = AttnParams {
        layer: il,
        rows,
        n_head: cfg.n_head,
        n_head_kv: cfg.n_head_kv,
        head_dim: cfg.head_dim,
        window: if swa { cfg.sliding_window } else { None },
        scale: cfg.attn_scale,
    };
    // Gemma 3 scales q between RoPE and attention, and taps may replace q and k there;
    // otherwise the backend may store the rotated k into the cache as it rotates it.
    b.output_feeds(&w.wo);
    if gemma3 && !taps {
        let ropes = (&rope, &rope_k);
        match head_norms {
            Some((qn, kn)) => {
                let qkk = (&mut s.q, &mut s.k, &mut s.k_normed);
                let norms = (qn, kn, eps);
                b.head_norm_rope_attention(n, qkk, &s.v, kv, norms, ropes, &attn, &mut s.attn)?
            }
            None => {
                b.rope_attention_scaled(n, &mut s.q, &mut s.k, &s.v, kv, ropes, &attn, &mut s.attn)?
            }
        }
    } else if separate_steps {
        b.rope_qk(n, &mut s.q, &mut s.k, &rope, &rope_k)?;
        tap(b, "Qrope", il, n, &mut s.q)?;
        tap(b, "Krope", il, n, &mut s.k)?;
        // Gemma 3: llama.cpp scales q (in f32, before its F16 rounding) rather than q·k.
        if gemma3 && b.scale_rows(n, &mut s.q, attn.scale)? {
            attn.scale = 1.0;
        }
        b.attention(n, &s.q, &s.k, &s.v, kv, &attn, &mut s.attn)?;
    } else {
        let ropes = (&rope, &rope_k);
        let (q, k, v) = (&mut s.q, &mut s.k, &mut s.v);
        match late_bias {
            Some(bias) => {
                b.rope_attention_biased(n, q, k, v, kv, ropes, &attn, bias, &mut s.attn)?
            }
            None => b.rope_attention(n, q, k, v, kv, ropes, &attn, &mut s.attn)?,
        }
    }
    tap(b, "kqv_out", il, n, &mut s.attn)?;
    // Gemma 3: norm of the attention output before the residual add.
    if let Some(pn) = &w.attn_post_norm {
        b.matmuls_segmented(segs, &s.attn, &mut [(&w.wo, &mut s.proj)])?;
        tap(b, "attn_out", il, n, &mut s.proj)?;
        post_norm_add(b, (il, "attn_post_norm"), n, pn, eps, s)?;
    } else {
        b.matmul_residual(segs, &w.wo, &s.attn, &mut s.x, &mut s.proj)?;
        tap(b, "attn_out", il, n, &mut s.proj)?;
    }
    tap(b, "ffn_inp", il, n, &mut s.x)?;

    // --- feed-forward ---
    b.output_feeds(&w.w_gate);
    b.rms_norm(n, &s.x, &w.ffn_norm, eps, &mut s.xn)?;
    tap(b, "ffn_norm", il, n, &mut s.xn)?;
    b.matmuls_segmented(
        segs,
        &s.xn,
        &mut [(&w.w_gate, &mut s.gate), (&w.w_up, &mut s.up)],
    )?;
    tap(b, "ffn_gate", il, n, &mut s.gate)?;
    tap(b, "ffn_up", il, n, &mut s.up)?;
    b.output_feeds(&w.w_down);
    b.glu(n, &s.gate, &s.up, cfg.ffn, &mut s.ffn)?;
    let glu_name = match cfg.ffn {
        crate::config::FfnActivation::SwiGlu => "ffn_swiglu",
        crate::config::FfnActivation::GeGlu => "ffn_geglu",
    };
    tap(b, glu_name, il, n, &mut s.ffn)?;
    // Gemma 3: norm of the FFN output before the residual add.
    if let Some(pn) = &w.ffn_post_norm {
        b.matmuls_segmented(segs, &s.ffn, &mut [(&w.w_down, &mut s.proj)])?;
        tap(b, "ffn_out", il, n, &mut s.proj)?;
        post_norm_add(b, (il, "ffn_post_norm"), n, pn, eps, s)?;
    } else {
        b.matmul_residual(segs, &w.w_down, &s.ffn, &mut s.x, &mut s.proj)?;
        tap(b, "ffn_out", il, n, &mut s.proj)?;
    }
    tap(b, "l_out", il, n, &mut s.x)?;
    Ok(())
}

/// Gemma 3's norm of a block's output (in `s.proj`) and its add into the residual `s.x`: one
/// backend step, or two with the debug taps on (they read the norm's output between them).
fn post_norm_add<B: Backend>(
    b: &B,
    (il, name): (usize, &str),
    n: usize,
    pn: &Weight,
    eps: f32,
    s: &mut Scratch<B>,
) -> Result<()> {
    if crate::debug::taps_active() {
        b.rms_norm(n, &s.proj, pn, eps, &mut s.xn)?;
        tap(b, name, il, n, &mut s.xn)?;
        b.add(n, &mut s.x, &s.xn)
    } else {
        b.rms_norm_add(n, &s.proj, pn, eps, &mut s.x, &mut s.xn)
    }
}

/// Step 2 for every layer at once, for a batch of one decode row, where the backend fuses
/// the layers (see [`Backend::decode_layers`]); not while debug taps are on (they read
/// every layer's intermediates). Returns false, having done nothing, otherwise.
pub fn blocks_fused<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    layers: &[LayerWeights],
    rows: &[Row],
    kv: &mut B::Kv,
    s: &mut Scratch<B>,
) -> Result<bool> {
    let [row] = rows else { return Ok(false) };
    if layers.len() != cfg.n_layers || crate::debug::taps_active() {
        return Ok(false);
    }
    check_batch(1, s)?;
    let acts = LayerActs {
        x: &mut s.x,
        q: &mut s.q,
        k: &mut s.k,
        v: &mut s.v,
        attn: &mut s.attn,
        gate: &mut s.gate,
        up: &mut s.up,
    };
    b.decode_layers(cfg, layers, *row, kv, acts)
}

/// Lengths of the runs of consecutive positions of one sequence in `rows`.
fn segments(rows: &[Row]) -> Vec<usize> {
    let mut segs: Vec<usize> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let continues = i > 0 && {
            let p = rows[i - 1];
            p.seq == r.seq && p.pos + 1 == r.pos
        };
        match segs.last_mut() {
            Some(last) if continues => *last += 1,
            _ => segs.push(1),
        }
    }
    segs
}

/// Which positions of a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, fixtures).
    All,
}

/// Step 3: final norm and output projection. Returns `[rows][n_vocab]` logits on the host.
pub fn head<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    w: &HeadWeights,
    n: usize,
    which: Logits,
    s: &mut Scratch<B>,
) -> Result<Vec<f32>> {
    let rows = head_norm(b, cfg, &w.output_norm, n, which, s)?;
    let mut logits = vec![0.0f32; rows * cfg.n_vocab];
    head_project(b, cfg, rows, &w.output, 0, &mut logits, s)?;
    Ok(logits)
}

/// Step 3a: normalise the rows whose logits are wanted (the last, or all `n`) into the
/// head's input buffer. Returns how many rows.
pub fn head_norm<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    norm: &Weight,
    n: usize,
    which: Logits,
    s: &mut Scratch<B>,
) -> Result<usize> {
    check_batch(n, s)?;
    let (first, rows) = match which {
        Logits::Last => (n - 1, 1),
        Logits::All => (0, n),
    };
    b.copy_rows(&s.x, first, rows, &mut s.proj)?;
    b.rms_norm(rows, &s.proj, norm, cfg.rms_eps, &mut s.head_norm)?;
    tap(b, "result_norm", 0, rows, &mut s.head_norm)?;
    s.head_rows_independent = false;
    Ok(rows)
}

/// Step 3a for a batch of several sequences: normalise rows `rows` (indices into the batch,
/// e.g. each sequence's last row) into the head's input buffer. None wanted: returns 0.
pub fn head_norm_rows<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    norm: &Weight,
    n: usize,
    rows: &[usize],
    s: &mut Scratch<B>,
) -> Result<usize> {
    check_batch(n, s)?;
    if rows.is_empty() {
        return Ok(0);
    }
    if rows.len() > n || rows.iter().any(|&r| r >= n) {
        return Err(crate::ModelError::Input(format!(
            "logits wanted for rows {rows:?} of a batch of {n}"
        )));
    }
    b.gather_rows(&s.x, rows, &mut s.proj)?;
    b.rms_norm(rows.len(), &s.proj, norm, cfg.rms_eps, &mut s.head_norm)?;
    // Each row is a different sequence's: project them one by one (as its own pass would).
    s.head_rows_independent = true;
    Ok(rows.len())
}

/// Step 3b: logits of output rows `row0 .. row0 + w.rows` (the whole output matrix, or one
/// streamed slice of it) for the `rows` normalised rows, into `logits` (`[rows][n_vocab]`).
pub fn head_project<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    rows: usize,
    w: &Weight,
    row0: usize,
    logits: &mut [f32],
    s: &mut Scratch<B>,
) -> Result<()> {
    let vocab = cfg.n_vocab;
    if row0 + w.rows > vocab || logits.len() != rows * vocab {
        return Err(crate::ModelError::Backend(
            "head_project: output slice out of range".into(),
        ));
    }
    fit_logits(b, w.rows, s)?;
    // A few rows at a time keeps the logits buffer small for large vocabularies.
    let mut t = 0;
    while t < rows {
        let m = (rows - t).min(LOGIT_CHUNK);
        b.copy_rows(&s.head_norm, t, m, &mut s.head_in)?;
        if s.head_rows_independent {
            b.matmuls_segmented(&ONES[..m], &s.head_in, &mut [(w, &mut s.logits)])?;
        } else {
            b.matmul(m, w, &s.head_in, &mut s.logits)?;
        }
        if w.rows == vocab {
            // The whole vocabulary: the rows land in place.
            b.read_into(m, &s.logits, &mut logits[t * vocab..(t + m) * vocab])?;
        } else {
            let part = b.read(m, &s.logits)?;
            for (i, src) in part.chunks_exact(w.rows).enumerate() {
                let dst = (t + i) * vocab + row0;
                logits[dst..dst + w.rows].copy_from_slice(src);
            }
        }
        t += m;
    }
    Ok(())
}

/// Step 3b for a batch whose tokens are picked on the backend: the logits of the `picks.len()`
/// normalised rows (each its own sequence's, as [`head_norm_rows`] left them) against the
/// whole output matrix `w`, and the token `picks[i]` chooses from row i's, appended to
/// `tokens` ([`Backend::pick_rows`]; only the tokens come back to the host).
pub fn head_pick_rows<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    w: &Weight,
    picks: &[crate::sampling::SlotPick],
    tokens: &mut Vec<u32>,
    s: &mut Scratch<B>,
) -> Result<()> {
    if w.rows != cfg.n_vocab {
        return Err(crate::ModelError::Backend(format!(
            "head_pick_rows: {} output rows of a vocabulary of {} (picks need all of them)",
            w.rows, cfg.n_vocab
        )));
    }
    fit_logits(b, w.rows, s)?;
    for (t, part) in (0..).step_by(LOGIT_CHUNK).zip(picks.chunks(LOGIT_CHUNK)) {
        let m = part.len();
        b.copy_rows(&s.head_norm, t, m, &mut s.head_in)?;
        b.matmuls_segmented(&ONES[..m], &s.head_in, &mut [(w, &mut s.logits)])?;
        tokens.extend(b.pick_rows(&s.logits, part)?);
    }
    Ok(())
}

/// The logits buffer as wide as an output unit's `rows`: the current one, the spare (the
/// other width slices come in) swapped in, or a new one (the current kept as the spare).
fn fit_logits<B: Backend>(b: &B, rows: usize, s: &mut Scratch<B>) -> Result<()> {
    if s.logits_width == rows {
        return Ok(());
    }
    let fitting = match s.logits_spare.take() {
        Some((width, spare)) if width == rows => spare,
        _ => b.alloc_act(LOGIT_CHUNK, rows)?,
    };
    let old = std::mem::replace(&mut s.logits, fitting);
    s.logits_spare = Some((s.logits_width, old));
    s.logits_width = rows;
    Ok(())
}

/// Step 3b of a chained decode (after [`head_norm`] of one row): the logits of the output
/// rows `row0..row0 + w.rows` stay on the backend, which keeps the largest so far (greedy)
/// or the best candidates (sampled) and, with the vocabulary's last rows, puts the token
/// `pick` says in `slot`.
pub fn head_to_slot<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    w: &Weight,
    row0: usize,
    slot: usize,
    pick: &crate::sampling::SlotPick,
    s: &mut Scratch<B>,
) -> Result<()> {
    let vocab = cfg.n_vocab;
    if row0 + w.rows > vocab {
        return Err(crate::ModelError::Backend(
            "head_to_slot: output rows out of range".into(),
        ));
    }
    fit_logits(b, w.rows, s)?;
    b.copy_rows(&s.head_norm, 0, 1, &mut s.head_in)?;
    b.matmul(1, w, &s.head_in, &mut s.logits)?;
    b.pick_to_slot(&s.logits, row0, w.rows, vocab, slot, pick)
}

/// The residual stream of the first `n` rows, on the host (hands the hidden state from one
/// backend to another between layers).
pub fn residual<B: Backend>(b: &B, n: usize, s: &Scratch<B>) -> Result<Vec<f32>> {
    check_batch(n, s)?;
    b.read(n, &s.x)
}

/// Set the residual stream's first rows from the host.
pub fn set_residual<B: Backend>(b: &B, x: &[f32], s: &mut Scratch<B>) -> Result<()> {
    b.write(x, &mut s.x)
}

fn check_batch<B: Backend>(n: usize, s: &Scratch<B>) -> Result<()> {
    if n == 0 || n > s.capacity {
        return Err(crate::ModelError::Input(format!(
            "batch of {n} tokens (capacity {})",
            s.capacity
        )));
    }
    Ok(())
}
