//! Typed views of a model's weight tensors, wherever their bytes live.
//!
//! The forward pass only sees [`Weight`] views (type, shape, bytes). Whether the bytes are
//! in an mmap of the GGUF file, in a streamed ring slot or in device memory is the business
//! of whoever builds the views: that is the seam the residency executor plugs into.

use crate::config::{Arch, ModelConfig};
use crate::{ModelError, Result};
use flea_gguf::{GgmlType, GgufHeader, TensorInfo};

/// A matrix (or vector) of weights: `rows` rows of `cols` elements of type `ty`.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Weight<'a> {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }
    /// A vector weight (norm, bias) as f32; these are always F32 in the supported models.
    pub fn as_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        // Shapes and types were validated when the layout was built.
        let _ = flea_quant::dequantize(self.ty, self.data, &mut out);
        out
    }
}

/// Where a tensor's bytes are, relative to the start of the layer's extent (or absolute for
/// global tensors), with its validated type and shape.
#[derive(Clone, Debug)]
pub struct TensorSlot {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Absolute offset in the model file.
    pub file_offset: u64,
    pub size: usize,
}

impl TensorSlot {
    /// A view of this tensor in `bytes`, which starts at file offset `base`.
    pub fn view<'a>(&self, bytes: &'a [u8], base: u64) -> Result<Weight<'a>> {
        let start = self
            .file_offset
            .checked_sub(base)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| ModelError::Weights(format!("{}: outside its extent", self.name)))?;
        let data = start
            .checked_add(self.size)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| ModelError::Weights(format!("{}: bytes out of range", self.name)))?;
        Ok(Weight {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data,
        })
    }
}

/// The tensors of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerSlots {
    pub attn_norm: TensorSlot,
    pub wq: TensorSlot,
    pub wk: TensorSlot,
    pub wv: TensorSlot,
    pub wo: TensorSlot,
    pub bq: Option<TensorSlot>,
    pub bk: Option<TensorSlot>,
    pub bv: Option<TensorSlot>,
    pub q_norm: Option<TensorSlot>,
    pub k_norm: Option<TensorSlot>,
    pub attn_post_norm: Option<TensorSlot>,
    pub ffn_norm: TensorSlot,
    pub w_gate: TensorSlot,
    pub w_up: TensorSlot,
    pub w_down: TensorSlot,
    pub ffn_post_norm: Option<TensorSlot>,
    /// The byte extent in the file that covers every tensor of the layer.
    pub extent_start: u64,
    pub extent_end: u64,
}

impl LayerSlots {
    /// The seven projection matrices (what matmuls read): q, k, v, output, gate, up, down.
    pub fn matrices(&self) -> [&TensorSlot; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    fn all(&self) -> impl Iterator<Item = &TensorSlot> {
        [
            Some(&self.attn_norm),
            Some(&self.wq),
            Some(&self.wk),
            Some(&self.wv),
            Some(&self.wo),
            self.bq.as_ref(),
            self.bk.as_ref(),
            self.bv.as_ref(),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
            self.attn_post_norm.as_ref(),
            Some(&self.ffn_norm),
            Some(&self.w_gate),
            Some(&self.w_up),
            Some(&self.w_down),
            self.ffn_post_norm.as_ref(),
        ]
        .into_iter()
        .flatten()
    }

    /// Views of every tensor, given the layer's bytes starting at file offset `base`.
    pub fn views<'a>(&self, bytes: &'a [u8], base: u64) -> Result<LayerWeights<'a>> {
        let v = |s: &TensorSlot| s.view(bytes, base);
        let o = |s: &Option<TensorSlot>| s.as_ref().map(|s| s.view(bytes, base)).transpose();
        Ok(LayerWeights {
            attn_norm: v(&self.attn_norm)?,
            wq: v(&self.wq)?,
            wk: v(&self.wk)?,
            wv: v(&self.wv)?,
            wo: v(&self.wo)?,
            bq: o(&self.bq)?,
            bk: o(&self.bk)?,
            bv: o(&self.bv)?,
            q_norm: o(&self.q_norm)?,
            k_norm: o(&self.k_norm)?,
            attn_post_norm: o(&self.attn_post_norm)?,
            ffn_norm: v(&self.ffn_norm)?,
            w_gate: v(&self.w_gate)?,
            w_up: v(&self.w_up)?,
            w_down: v(&self.w_down)?,
            ffn_post_norm: o(&self.ffn_post_norm)?,
        })
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_end - self.extent_start
    }
}

/// Views of one block's tensors.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    pub attn_norm: Weight<'a>,
    pub wq: Weight<'a>,
    pub wk: Weight<'a>,
    pub wv: Weight<'a>,
    pub wo: Weight<'a>,
    pub bq: Option<Weight<'a>>,
    pub bk: Option<Weight<'a>>,
    pub bv: Option<Weight<'a>>,
    pub q_norm: Option<Weight<'a>>,
    pub k_norm: Option<Weight<'a>>,
    pub attn_post_norm: Option<Weight<'a>>,
    pub ffn_norm: Weight<'a>,
    pub w_gate: Weight<'a>,
    pub w_up: Weight<'a>,
    pub w_down: Weight<'a>,
    pub ffn_post_norm: Option<Weight<'a>>,
}

/// Every tensor the model needs, validated against the config: names, types, shapes.
#[derive(Clone, Debug)]
pub struct ModelLayout {
    pub token_embd: TensorSlot,
    pub output_norm: TensorSlot,
    /// The output projection; `token_embd` itself when the model ties them.
    pub output: TensorSlot,
    pub output_is_tied: bool,
    pub layers: Vec<LayerSlots>,
}

impl ModelLayout {
    pub fn from_gguf(h: &GgufHeader, cfg: &ModelConfig) -> Result<ModelLayout> {
        let d = cfg.n_embd;
        let find = |name: &str| -> Option<&TensorInfo> { h.tensor(name) };
        let slot = |name: &str, cols: usize, rows: usize| -> Result<TensorSlot> {
            let t = find(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            check(t, cols, rows)
        };
        let opt = |name: &str, cols: usize, rows: usize| -> Result<Option<TensorSlot>> {
            find(name).map(|t| check(t, cols, rows)).transpose()
        };

        let token_embd = slot("token_embd.weight", d, cfg.n_vocab)?;
        let output_norm = slot("output_norm.weight", d, 1)?;
        let (output, output_is_tied) = match opt("output.weight", d, cfg.n_vocab)? {
            Some(o) => (o, false),
            None => (token_embd.clone(), true),
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for il in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{il}.{s}");
            let qd = cfg.q_dim();
            let kvd = cfg.kv_dim();
            let hd = cfg.head_dim;
            let gemma = cfg.arch == Arch::Gemma3;
            let mut l = LayerSlots {
                attn_norm: slot(&n("attn_norm.weight"), d, 1)?,
                wq: slot(&n("attn_q.weight"), d, qd)?,
                wk: slot(&n("attn_k.weight"), d, kvd)?,
                wv: slot(&n("attn_v.weight"), d, kvd)?,
                wo: slot(&n("attn_output.weight"), qd, d)?,
                bq: opt(&n("attn_q.bias"), qd, 1)?,
                bk: opt(&n("attn_k.bias"), kvd, 1)?,
                bv: opt(&n("attn_v.bias"), kvd, 1)?,
                q_norm: opt(&n("attn_q_norm.weight"), hd, 1)?,
                k_norm: opt(&n("attn_k_norm.weight"), hd, 1)?,
                attn_post_norm: opt(&n("post_attention_norm.weight"), d, 1)?,
                ffn_norm: slot(&n("ffn_norm.weight"), d, 1)?,
                w_gate: slot(&n("ffn_gate.weight"), d, cfg.n_ff)?,
                w_up: slot(&n("ffn_up.weight"), d, cfg.n_ff)?,
                w_down: slot(&n("ffn_down.weight"), cfg.n_ff, d)?,
                ffn_post_norm: opt(&n("post_ffw_norm.weight"), d, 1)?,
                extent_start: 0,
                extent_end: 0,
            };
            if gemma {
                for (name, present) in [
                    ("attn_q_norm.weight", l.q_norm.is_some()),
                    ("attn_k_norm.weight", l.k_norm.is_some()),
                    ("post_attention_norm.weight", l.attn_post_norm.is_some()),
                    ("post_ffw_norm.weight", l.ffn_post_norm.is_some()),
                ] {
                    if !present {
                        return Err(ModelError::MissingTensor(n(name)));
                    }
                }
            }
            if cfg.arch == Arch::Qwen2 && (l.bq.is_none() || l.bk.is_none() || l.bv.is_none()) {
                return Err(ModelError::MissingTensor(n("attn_{q,k,v}.bias")));
            }
            let start = l.all().map(|s| s.file_offset).min().unwrap_or(0);
            let end = l
                .all()
                .map(|s| s.file_offset + s.size as u64)
                .max()
                .unwrap_or(0);
            l.extent_start = start;
            l.extent_end = end;
            layers.push(l);
        }
        Ok(ModelLayout {
            token_embd,
            output_norm,
            output,
            output_is_tied,
            layers,
        })
    }
}

/// Validate one tensor: supported type, expected shape (ggml order: `cols` is dims[0]).
fn check(t: &TensorInfo, cols: usize, rows: usize) -> Result<TensorSlot> {
    if !flea_quant::is_supported(t.ty) {
        return Err(ModelError::UnsupportedType {
            tensor: t.name.clone(),
            ty: t.ty,
        });
    }
    let want: &[u64] = &[cols as u64, rows as u64];
    let dims: Vec<u64> = {
        // Trailing dimensions of 1 do not change the shape.
        let mut d = t.dims.clone();
        while d.len() > 1 && d.last() == Some(&1) {
            d.pop();
        }
        d
    };
    let ok = if rows == 1 {
        dims == [cols as u64]
    } else {
        dims == want
    };
    if !ok {
        return Err(ModelError::Shape {
            tensor: t.name.clone(),
            want: want.to_vec(),
            got: t.dims.clone(),
        });
    }
    let size = usize::try_from(t.size)
        .map_err(|_| ModelError::Weights(format!("{}: too large for this platform", t.name)))?;
    Ok(TensorSlot {
        name: t.name.clone(),
        ty: t.ty,
        rows,
        cols,
        file_offset: t.offset,
        size,
    })
}
