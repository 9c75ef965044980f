//! The operations a compute backend provides to the forward pass.
//!
//! The forward pass (`forward.rs`) is written once against this trait. A backend owns its
//! activation buffers and KV cache; weights arrive as [`Weight`] views whose bytes the
//! backend can read directly (the CPU reads them in place, a GPU backend from its own
//! memory).

use crate::config::{FfnActivation, ModelConfig, RopeStyle};
use crate::weights::{LayerWeights, Weight};
use crate::Result;

/// Geometry of the attention cache: `n_seq` independent sequence slots of `n_ctx` positions.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_ctx: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Sequences the cache holds at once (batched decoding of several requests).
    pub n_seq: usize,
}

impl KvShape {
    /// Bytes the F16 cache takes (K and V, every sequence slot).
    pub fn bytes(&self) -> usize {
        2 * self.n_seq * self.n_layers * self.n_ctx * self.n_head_kv * self.head_dim * 2
    }

    /// Bytes one sequence slot takes.
    pub fn bytes_per_seq(&self) -> usize {
        2 * self.n_layers * self.n_ctx * self.n_head_kv * self.head_dim * 2
    }
}

/// One row of a batch: the sequence (KV cache slot) its token belongs to and its position
/// in that sequence. A batch may mix sequences and lengths; each row attends only to its own
/// sequence's cached positions ≤ its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub seq: usize,
    pub pos: usize,
}

impl Row {
    /// Rows of `n` consecutive tokens of sequence `seq` from position `pos0`.
    pub fn consecutive(seq: usize, pos0: usize, n: usize) -> Vec<Row> {
        (pos0..pos0 + n).map(|pos| Row { seq, pos }).collect()
    }
}

/// Parameters of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams<'a> {
    pub layer: usize,
    /// Sequence slot and position of each row of the batch.
    pub rows: &'a [Row],
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Keys at distance ≥ window from the query are masked.
    pub window: Option<usize>,
    pub scale: f32,
}

impl AttnParams<'_> {
    /// The check every backend makes before attending: the batch has `n` rows and each
    /// row's sequence slot and position fit the cache.
    pub fn check_fits(&self, n: usize, shape: &KvShape) -> Result<()> {
        check_rows(self.rows, n, shape)
    }
}

/// `rows` describes a batch of `n` rows that fit a cache of `shape`.
pub fn check_rows(rows: &[Row], n: usize, shape: &KvShape) -> Result<()> {
    if rows.len() != n {
        return Err(crate::ModelError::Backend(format!(
            "batch of {n} rows described by {} positions",
            rows.len()
        )));
    }
    for r in rows {
        if r.pos >= shape.n_ctx {
            return Err(crate::ModelError::Input(format!(
                "context full: {} tokens exceed the context size {}",
                r.pos + 1,
                shape.n_ctx
            )));
        }
        if r.seq >= shape.n_seq {
            return Err(crate::ModelError::Input(format!(
                "sequence slot {} out of range (the cache holds {})",
                r.seq, shape.n_seq
            )));
        }
    }
    Ok(())
}

/// The biases of q, k and v (Qwen2), each as wide as its projection.
#[derive(Clone, Copy)]
pub struct QkvBias<'a> {
    pub q: &'a Weight<'a>,
    pub k: &'a Weight<'a>,
    pub v: &'a Weight<'a>,
}

/// Parameters of a RoPE call.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams<'a> {
    /// Each row's position (the sequence slot is not used).
    pub rows: &'a [Row],
    pub n_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub base: f32,
    pub style: RopeStyle,
}

/// The activation buffers one token's pass through every layer uses (the forward pass's
/// scratch), for [`Backend::decode_layers`].
pub struct LayerActs<'a, A> {
    /// The residual stream: the embedding on entry, the last layer's output on return.
    pub x: &'a mut A,
    pub q: &'a mut A,
    pub k: &'a mut A,
    pub v: &'a mut A,
    pub attn: &'a mut A,
    pub gate: &'a mut A,
    pub up: &'a mut A,
}

/// A compute backend. Every activation buffer holds up to `capacity` rows of a fixed width;
/// an operation on `n` tokens uses the first `n` rows.
pub trait Backend {
    /// An activation matrix in backend memory: rows × width f32.
    type Act;
    /// The attention cache.
    type Kv;

    fn name(&self) -> String;
    fn alloc_act(&self, rows: usize, width: usize) -> Result<Self::Act>;
    fn alloc_kv(&self, shape: KvShape) -> Result<Self::Kv>;

    /// out[t] = table[tokens[t]] * scale
    fn embed(&self, table: &Weight, tokens: &[u32], scale: f32, out: &mut Self::Act) -> Result<()>;
    /// RMS-normalise each consecutive group of `w.cols` values of the first `n` rows of `x`
    /// and multiply by `w` (per-head norms use a head-sized `w`).
    fn rms_norm(
        &self,
        n: usize,
        x: &Self::Act,
        w: &Weight,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out = rms_norm(y) · w`, then `x += out` (Gemma 3's norm of a block's output before
    /// its residual add). A backend may do both in one step (the same arithmetic).
    fn rms_norm_add(
        &self,
        n: usize,
        y: &Self::Act,
        w: &Weight,
        eps: f32,
        x: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.rms_norm(n, y, w, eps, out)?;
        self.add(n, x, out)
    }
    /// out[t] = W · x[t] for the first `n` rows (W has `w.rows` rows of `w.cols`).
    fn matmul(&self, n: usize, w: &Weight, x: &Self::Act, out: &mut Self::Act) -> Result<()>;
    /// Several matmuls of the same input (q/k/v, gate/up): the input is prepared once and
    /// all the work is spread over the device in one go.
    fn matmuls(
        &self,
        n: usize,
        x: &Self::Act,
        jobs: &mut [(&Weight, &mut Self::Act)],
    ) -> Result<()> {
        for (w, out) in jobs.iter_mut() {
            self.matmul(n, w, x, out)?;
        }
        Ok(())
    }
    /// As `matmuls`, for a batch made of independent segments (`segments`: row counts, in
    /// order, e.g. each sequence's consecutive rows). A backend whose kernels group rows
    /// computes each segment as if it were alone, so that a sequence's results do not depend
    /// on what it is batched with. The default treats the batch as one.
    fn matmuls_segmented(
        &self,
        segments: &[usize],
        x: &Self::Act,
        jobs: &mut [(&Weight, &mut Self::Act)],
    ) -> Result<()> {
        self.matmuls(segments.iter().sum(), x, jobs)
    }
    /// x[t] += b
    fn add_bias(&self, n: usize, x: &mut Self::Act, b: &Weight) -> Result<()>;
    /// Rotate the first `rope_dims` dims of every head of the first `n` rows.
    fn rope(&self, n: usize, x: &mut Self::Act, p: &RopeParams) -> Result<()>;
    /// RoPE of q and k of the same rows (a backend may do both in one go).
    fn rope_qk(
        &self,
        n: usize,
        q: &mut Self::Act,
        k: &mut Self::Act,
        pq: &RopeParams,
        pk: &RopeParams,
    ) -> Result<()> {
        self.rope(n, q, pq)?;
        self.rope(n, k, pk)
    }
    /// Store k and v of the `n` rows into the cache (each at its sequence slot and
    /// position), then attend: each row sees its own sequence's cached keys at positions ≤
    /// its own (within the window).
    #[allow(clippy::too_many_arguments)] // q, k, v, cache, out: all distinct buffers
    fn attention(
        &self,
        n: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        kv: &mut Self::Kv,
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// RoPE of q and k (`rope_qk`), then `attention`. A backend may rotate k and store it
    /// in the cache in one pass, or rotate inside its attention: q and k hold unspecified
    /// values afterwards (the forward pass's taps, which read them, call `rope_qk` and
    /// `attention` instead).
    #[allow(clippy::too_many_arguments)] // rope_qk's and attention's arguments together
    fn rope_attention(
        &self,
        n: usize,
        q: &mut Self::Act,
        k: &mut Self::Act,
        v: &Self::Act,
        kv: &mut Self::Kv,
        (pq, pk): (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.rope_qk(n, q, k, pq, pk)?;
        self.attention(n, q, k, v, kv, p, out)
    }
    /// Gemma 3's `rope_attention`: RoPE, then q times `p.scale` where the backend scales rows
    /// (`scale_rows`, in f32 before the attention's f16 rounding, as llama.cpp does; the
    /// attention then scales by 1), then the attention. A backend that does not scale rows
    /// may do it all as `rope_attention` with `p.scale` (the same arithmetic as these steps).
    #[allow(clippy::too_many_arguments)] // rope_attention's arguments
    fn rope_attention_scaled(
        &self,
        n: usize,
        q: &mut Self::Act,
        k: &mut Self::Act,
        v: &Self::Act,
        kv: &mut Self::Kv,
        (pq, pk): (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.rope_qk(n, q, k, pq, pk)?;
        if self.scale_rows(n, q, p.scale)? {
            let unscaled = AttnParams { scale: 1.0, ..*p };
            self.attention(n, q, k, v, kv, &unscaled, out)
        } else {
            self.attention(n, q, k, v, kv, p, out)
        }
    }
    /// Gemma 3's per-head RMS norms of q and k (`norms`: the head-sized q and k norm weights
    /// and eps), then `rope_attention_scaled`. Afterwards q and k hold the normalised rows
    /// (rotated or not, as `rope_attention` leaves them), `out` the attention's output; `out`
    /// and `k_spare` (as wide as k) may serve as scratch on the way.
    #[allow(clippy::too_many_arguments)] // rope_attention's arguments and the norms
    fn head_norm_rope_attention(
        &self,
        n: usize,
        (q, k, k_spare): (&mut Self::Act, &mut Self::Act, &mut Self::Act),
        v: &Self::Act,
        kv: &mut Self::Kv,
        norms: (&Weight, &Weight, f32),
        ropes: (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()> {
        head_norm_rope_attention_steps(self, n, (q, k, k_spare), v, kv, norms, ropes, p, out)
    }
    /// Q/K/V biases (Qwen2) added to q, k and v, then `rope_attention`. A backend may add
    /// them inside its attention instead (v then holds unspecified values too).
    #[allow(clippy::too_many_arguments)] // rope_attention's arguments and the biases
    fn rope_attention_biased(
        &self,
        n: usize,
        q: &mut Self::Act,
        k: &mut Self::Act,
        v: &mut Self::Act,
        kv: &mut Self::Kv,
        ropes: (&RopeParams, &RopeParams),
        p: &AttnParams,
        bias: QkvBias<'_>,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.add_bias(n, q, bias.q)?;
        self.add_bias(n, k, bias.k)?;
        self.add_bias(n, v, bias.v)?;
        self.rope_attention(n, q, k, v, kv, ropes, p, out)
    }
    /// out = act(gate) * up
    fn glu(
        &self,
        n: usize,
        gate: &Self::Act,
        up: &Self::Act,
        act: FfnActivation,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// x += y
    fn add(&self, n: usize, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// `x *= s` on the first `n` rows, where the backend implements it (returns whether it
    /// did). llama.cpp scales Gemma 3's q before its KQ product instead of scaling the
    /// scores; a backend that matches llama.cpp bit for bit (the CPU one) does the same.
    fn scale_rows(&self, _n: usize, _x: &mut Self::Act, _s: f32) -> Result<bool> {
        Ok(false)
    }
    /// `residual += w · x` over the rows of `segments` (as `matmuls_segmented`); `scratch`
    /// (as wide as `residual`) may hold `w · x` on the way. A backend may add in place.
    fn matmul_residual(
        &self,
        segments: &[usize],
        w: &Weight,
        x: &Self::Act,
        residual: &mut Self::Act,
        scratch: &mut Self::Act,
    ) -> Result<()> {
        self.matmuls_segmented(segments, x, &mut [(w, scratch)])?;
        self.add(segments.iter().sum(), residual, scratch)
    }
    /// Copy rows `src_row..src_row + n` of `src` into the first `n` rows of `dst`.
    fn copy_rows(
        &self,
        src: &Self::Act,
        src_row: usize,
        n: usize,
        dst: &mut Self::Act,
    ) -> Result<()>;
    /// Copy rows `rows[i]` of `src` into row `i` of `dst` (the rows whose logits are wanted).
    fn gather_rows(&self, src: &Self::Act, rows: &[usize], dst: &mut Self::Act) -> Result<()> {
        for (i, &r) in rows.iter().enumerate() {
            self.copy_rows_to(src, r, 1, dst, i)?;
        }
        Ok(())
    }
    /// Copy rows `src_row..src_row + n` of `src` into rows `dst_row..dst_row + n` of `dst`.
    fn copy_rows_to(
        &self,
        src: &Self::Act,
        src_row: usize,
        n: usize,
        dst: &mut Self::Act,
        dst_row: usize,
    ) -> Result<()>;
    /// The first `n` rows back on the host.
    fn read(&self, n: usize, x: &Self::Act) -> Result<Vec<f32>>;
    /// The first `n` rows into `out` (exactly as many values), without a buffer of its own
    /// where the backend can (the logits of a decode token, read back while the GPU waits).
    fn read_into(&self, n: usize, x: &Self::Act, out: &mut [f32]) -> Result<()> {
        let v = self.read(n, x)?;
        if v.len() != out.len() {
            return Err(crate::ModelError::Backend(format!(
                "read_into: {} values for a slice of {}",
                v.len(),
                out.len()
            )));
        }
        out.copy_from_slice(&v);
        Ok(())
    }
    /// Host values into the first rows of `x` (`data.len()` a multiple of its width).
    fn write(&self, data: &[f32], x: &mut Self::Act) -> Result<()>;

    /// Decode chained on the backend: how many token slots it keeps (0: none; the host then
    /// samples every token from logits it reads back). A slot holds a token that
    /// [`Backend::pick_to_slot`] chose and [`Backend::embed_from_slot`] embeds without the
    /// host in between, so the next token's pass can be queued before the host has seen
    /// this one (a GPU then never idles between decode tokens).
    fn token_slots(&self) -> usize {
        0
    }
    /// Most candidates [`Backend::pick_to_slot`] keeps for top-k sampling (0: it does not
    /// sample; chained decode then takes greedy tokens only).
    fn slot_top_k_max(&self) -> usize {
        0
    }
    /// Whether [`Backend::pick_to_slot`] takes whole-vocabulary sampling `how`
    /// ([`crate::sampling::sample_vocab`]).
    fn slot_samples_vocab(&self, _how: &crate::sampling::VocabSampling) -> bool {
        false
    }
    /// A token chosen on the backend: `logits` row 0 holds the logits `col0..col0 + width`
    /// of a vocabulary of `n_vocab`; the calls of one token come in order (`col0` 0 first,
    /// the last ending at `n_vocab`) and what `pick` needs is kept between them — the
    /// largest so far (greedy), or the `top_k` best in [`crate::sampling::candidate_key`]'s
    /// order (sampled). The last call puts the token in `slot` and starts its way to the
    /// host: the first index of the largest (NaNs and -inf never win, as
    /// [`crate::sampling::argmax`]), or what [`crate::sampling::choose_from_top`] picks with
    /// the host's draw, or what [`crate::sampling::sample_vocab`] picks (whole vocabulary).
    fn pick_to_slot(
        &self,
        _logits: &Self::Act,
        _col0: usize,
        _width: usize,
        _n_vocab: usize,
        _slot: usize,
        _pick: &crate::sampling::SlotPick,
    ) -> Result<()> {
        Err(crate::ModelError::Backend(
            "this backend keeps no token slots".into(),
        ))
    }
    /// The token of each of the first `picks.len()` rows of `logits` (each row a whole
    /// vocabulary's logits), chosen as [`crate::sampling::SlotPick::pick_on_host`] chooses
    /// it. The default reads the logits back and picks on the host; a backend with token
    /// slots picks on the device and sends back only the tokens (a batched decode step then
    /// reads 4 bytes a sequence instead of its vocabulary's logits, and the host does not
    /// sample while the device waits).
    fn pick_rows(
        &self,
        logits: &Self::Act,
        picks: &[crate::sampling::SlotPick],
    ) -> Result<Vec<u32>> {
        if picks.is_empty() {
            return Ok(Vec::new());
        }
        let all = self.read(picks.len(), logits)?;
        let width = all.len() / picks.len();
        Ok(picks
            .iter()
            .zip(all.chunks_exact(width.max(1)))
            .map(|(p, row)| p.pick_on_host(row))
            .collect())
    }
    /// out[0] = table[the token in `slot`] * scale.
    fn embed_from_slot(
        &self,
        _table: &Weight,
        _slot: usize,
        _scale: f32,
        _out: &mut Self::Act,
    ) -> Result<()> {
        Err(crate::ModelError::Backend(
            "this backend keeps no token slots".into(),
        ))
    }
    /// The token in `slot`, once it has reached the host (waits for it).
    fn slot_token(&self, _slot: usize) -> Result<u32> {
        Err(crate::ModelError::Backend(
            "this backend keeps no token slots".into(),
        ))
    }
    /// Record the device work of the pass that follows instead of running it, to replay it
    /// as one unit in [`Backend::end_pass_recording`] (a CUDA graph). Ok(false): this
    /// backend does not record, and the pass runs as usual.
    fn begin_pass_recording(&self) -> Result<bool> {
        Ok(false)
    }
    /// End a recording begun by [`Backend::begin_pass_recording`]. With `run` (the pass was
    /// recorded without error) the recorded work is queued: Ok(true). Ok(false): nothing
    /// of the pass ran (not `run`, or the recording failed), and the caller runs it again
    /// without recording.
    fn end_pass_recording(&self, _run: bool) -> Result<bool> {
        Ok(false)
    }
    /// Cached K and V rows `pos0 .. pos0 + n` of `layer`, as F16 bits (hands a layer's
    /// cache over to another backend).
    fn kv_rows(
        &self,
        kv: &Self::Kv,
        layer: usize,
        pos0: usize,
        n: usize,
    ) -> Result<(Vec<u16>, Vec<u16>)>;
    /// `kv_rows` into the caller's buffers (`k.len() / kv_dim` rows from `pos0`): a GPU
    /// copies straight into them, at the link's full speed when they are pinned.
    fn kv_rows_into(
        &self,
        kv: &Self::Kv,
        layer: usize,
        pos0: usize,
        k: &mut [u16],
        v: &mut [u16],
    ) -> Result<()> {
        let kvd = self.kv_dim(kv).max(1);
        if k.len() != v.len() || !k.len().is_multiple_of(kvd) {
            return Err(crate::ModelError::Backend(
                "kv_rows_into: buffers are not whole rows".into(),
            ));
        }
        let (kr, vr) = self.kv_rows(kv, layer, pos0, k.len() / kvd)?;
        k.copy_from_slice(&kr);
        v.copy_from_slice(&vr);
        Ok(())
    }
    /// `kv_rows_into` without waiting for the copy: it is queued behind the work queued so
    /// far and ahead of any queued later. Default: `kv_rows_into`.
    ///
    /// # Safety
    /// `k` and `v` must stay allocated, and nothing may read or write them, until the
    /// backend's next synchronising call (reading activations back, `wait_idle`) has
    /// returned.
    unsafe fn kv_rows_into_queued(
        &self,
        kv: &Self::Kv,
        layer: usize,
        pos0: usize,
        k: &mut [u16],
        v: &mut [u16],
    ) -> Result<()> {
        self.kv_rows_into(kv, layer, pos0, k, v)
    }
    /// `set_kv_rows` without waiting for the copy where the source allows it (page-locked
    /// host memory). Default: `set_kv_rows`.
    ///
    /// # Safety
    /// `k` and `v` must stay allocated and unchanged until the backend's next synchronising
    /// call has returned.
    unsafe fn set_kv_rows_queued(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        pos0: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()> {
        self.set_kv_rows(kv, layer, pos0, k, v)
    }
    /// Give the memory of the caches of the layers marked in `shared` back, all but one
    /// layer's worth, which they then share: at most one of them holds rows at a time, and
    /// the caller copies a layer's rows in before it runs and out after (hybrid decode, where
    /// the CPU keeps those layers' rows and the GPU needs them only for prompts).
    /// Ok(false): the backend keeps every layer's cache (nothing changed).
    fn share_kv_layers(&self, _kv: &mut Self::Kv, _shared: &[bool]) -> Result<bool> {
        Ok(false)
    }
    /// `alloc_kv` with the caches of the layers marked in `shared` sharing one layer's room
    /// from the start (as `share_kv_layers` leaves them), for a budget that never holds them
    /// all; Ok(None) where the backend keeps every layer's cache. The default allocates every
    /// layer first: a backend whose memory is budgeted overrides it.
    fn alloc_kv_shared(&self, shape: KvShape, shared: &[bool]) -> Result<Option<Self::Kv>> {
        let mut kv = self.alloc_kv(shape)?;
        Ok(self.share_kv_layers(&mut kv, shared)?.then_some(kv))
    }
    /// A hint: the output of the next step (a norm, the attention, the GLU) is the input of
    /// a matmul with `w`, so a backend may also leave it in the form `w`'s kernels read
    /// (quantised for an int8 dot product). Changes no result.
    fn output_feeds(&self, _w: &Weight) {}
    /// Values per cached row (KV heads × head dim).
    fn kv_dim(&self, kv: &Self::Kv) -> usize;
    /// Store K and V rows (F16 bits) of `layer` at positions `pos0 ..`.
    fn set_kv_rows(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        pos0: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()>;

    /// Whether `decode_layers` may run at all (cheap: callers skip preparing its arguments
    /// otherwise).
    fn fuses_decode(&self) -> bool {
        false
    }

    /// Every layer of one decode token (`row`) at once, where the backend has a fused path
    /// for this model (the CUDA backend: all layers' weights resident, shapes it supports).
    /// Returns false, having done nothing, where it has none; the caller then runs the
    /// layers one by one with [`crate::forward::block`].
    fn decode_layers(
        &self,
        _cfg: &ModelConfig,
        _layers: &[LayerWeights],
        _row: Row,
        _kv: &mut Self::Kv,
        _acts: LayerActs<'_, Self::Act>,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// How a backend gets at a unit of weights (a layer, a slice of the output matrix) that the
/// streaming executor holds in host memory.
///
/// The CPU computes from host memory in place: weight views point at the host buffer and
/// every method is a no-op. A GPU backend computes from its own memory: the executor builds
/// weight views over the unit's bytes in the *file mapping* (never read, only used as the
/// unit's address) and the backend maps that address range to wherever the bytes are on
/// the device — a resident copy, or a ring slot filled by an asynchronous copy.
/// A matmul weight inside a unit: its bytes at `offset..offset + bytes` of the unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitWeight {
    pub offset: usize,
    pub bytes: usize,
    pub ty: flea_gguf::GgmlType,
    pub rows: usize,
    pub cols: usize,
}

pub trait UnitStaging: Backend {
    /// A unit in flight between `stage` and `finish`.
    type Staged;

    /// True when compute reads host buffers directly (no staging, no pinning).
    fn computes_in_place(&self) -> bool;

    /// Page-lock a host buffer that units will be copied from (ring slots, the host cache),
    /// so copies are DMA from the buffer itself. Undone by `unpin`.
    fn pin(&self, _buf: &mut [u8]) -> Result<()> {
        Ok(())
    }
    /// Undo `pin` of the buffer at `addr` (`len` bytes). Waits for pending copies first;
    /// the buffer must still be allocated.
    fn unpin(&self, _addr: usize, _len: usize) {}

    /// Allocate the device side of the ring: `depth` slots of `slot_bytes` each (the
    /// executor has charged them to the device budget).
    fn prepare_slots(&self, _depth: usize, _slot_bytes: usize) -> Result<()> {
        Ok(())
    }

    /// Keep the unit whose views address `key` in device memory for the rest of the run,
    /// copied from `host`.
    fn make_resident(&self, _key: &[u8], _host: &[u8]) -> Result<()> {
        Ok(())
    }

    /// `make_resident`, told where the unit's matmul weights lie (only ever multiplied,
    /// never gathered as embeddings), so a backend may store them in a layout its kernels
    /// read faster; `host` is a scratch copy it may rearrange in place. By default the bytes
    /// are kept as they are.
    fn make_resident_weights(
        &self,
        key: &[u8],
        host: &mut [u8],
        _matmul_weights: &[UnitWeight],
    ) -> Result<()> {
        self.make_resident(key, host)
    }

    /// Start moving a unit's bytes from `host` to where compute will read them. Nothing
    /// queued for compute waits on this copy yet: a unit staged ahead (hybrid decode stages
    /// the GPU's next units while the CPU computes) must not hold back the work before it.
    fn stage(&self, key: &[u8], host: &[u8]) -> Result<Self::Staged>;

    /// The staged unit's compute is issued next: order it after the unit's copy. From here
    /// until `finish`, weight views over the unit's `key` resolve to the copy.
    fn begin(&self, staged: &Self::Staged) -> Result<()>;

    /// The unit's compute has been issued. Its device slot becomes reusable once that compute
    /// has run; when `release_host` is set, returns only after `host` may be overwritten.
    fn finish(&self, staged: Self::Staged, release_host: bool) -> Result<()>;

    /// Forget every unit placed so far (resident copies, device slots, mappings): the
    /// executor that placed them is gone, and a later one — perhaps over another model
    /// whose file is mapped at the same addresses — must not find them.
    fn release_units(&self) {}

    /// Wait until every copy and computation queued so far has finished.
    fn wait_idle(&self) -> Result<()> {
        Ok(())
    }

    /// (used, total) device memory as the driver reports it, where the backend has a driver.
    fn driver_memory(&self) -> Option<(u64, u64)> {
        None
    }
}

/// [`Backend::head_norm_rope_attention`] as separate steps (its default; a backend that fuses
/// them falls back to this where its fused step does not apply).
#[allow(clippy::too_many_arguments)] // head_norm_rope_attention's arguments
pub fn head_norm_rope_attention_steps<B: Backend + ?Sized>(
    b: &B,
    n: usize,
    (q, k, k_spare): (&mut B::Act, &mut B::Act, &mut B::Act),
    v: &B::Act,
    kv: &mut B::Kv,
    (qn, kn, eps): (&Weight, &Weight, f32),
    ropes: (&RopeParams, &RopeParams),
    p: &AttnParams,
    out: &mut B::Act,
) -> Result<()> {
    b.rms_norm(n, q, qn, eps, out)?;
    std::mem::swap(q, out);
    b.rms_norm(n, k, kn, eps, k_spare)?;
    std::mem::swap(k, k_spare);
    b.rope_attention_scaled(n, q, k, v, kv, ropes, p, out)
}
