//! Hyper-parameters of the supported architectures, read from GGUF metadata.

use crate::{ModelError, Result};
use flea_gguf::GgufHeader;

/// The transformer families flea runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, SmolLM2, Mistral-style: GQA, SwiGLU, "normal" (adjacent-pair) RoPE.
    Llama,
    /// Qwen2: Llama plus Q/K/V biases and NeoX (half-split) RoPE.
    Qwen2,
    /// Gemma 3: sliding-window and global layers, q/k norms, pre+post norms, GELU FFN,
    /// embedding scaled by sqrt(n_embd), two RoPE bases.
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1) — llama.cpp's LLAMA_ROPE_TYPE_NORM (GGUF llama weights are permuted for it).
    Interleaved,
    /// Pairs (i, i + d/2) — llama.cpp's LLAMA_ROPE_TYPE_NEOX.
    Neox,
}

/// Feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// silu(gate) * up
    SwiGlu,
    /// gelu_tanh(gate) * up
    GeGlu,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    /// Number of dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3), if different from `rope_base`.
    pub rope_base_swa: f32,
    /// Sliding window length for local layers (None: every layer is global).
    pub sliding_window: Option<usize>,
    /// Layer `i` uses the sliding window when `i % swa_period < swa_period - 1` (Gemma 3: 6).
    pub swa_period: usize,
    /// Multiplier applied to the token embeddings (Gemma: sqrt(n_embd)).
    pub embd_scale: f32,
    /// Scale applied to q·k before softmax.
    pub attn_scale: f32,
    pub ffn: FfnActivation,
}

impl ModelConfig {
    pub fn from_gguf(h: &GgufHeader) -> Result<ModelConfig> {
        let arch_name = h
            .get_str("general.architecture")?
            .ok_or_else(|| ModelError::Config("missing general.architecture".into()))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => return Err(ModelError::UnsupportedArch(other.to_string())),
        };
        let a = arch_name;
        let req = |key: &str| -> Result<usize> {
            let k = format!("{a}.{key}");
            match h.get_u32(&k)? {
                Some(v) if v > 0 => Ok(v as usize),
                Some(_) => Err(ModelError::Config(format!("{k} is zero"))),
                None => Err(ModelError::Config(format!("missing {k}"))),
            }
        };
        let opt_u = |key: &str| -> Result<Option<usize>> {
            Ok(h.get_u32(&format!("{a}.{key}"))?.map(|v| v as usize))
        };
        let opt_f = |key: &str| -> Result<Option<f32>> { Ok(h.get_f32(&format!("{a}.{key}"))?) };

        let n_layers = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt_u("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ff = req("feed_forward_length")?;
        let n_ctx_train = opt_u("context_length")?.unwrap_or(4096);
        let head_dim = match opt_u("attention.key_length")? {
            Some(d) => d,
            None => n_embd / n_head,
        };
        if head_dim == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Config(format!(
                "bad attention shape: {n_head} heads, {n_head_kv} kv heads, head size {head_dim}"
            )));
        }
        if let Some(vl) = opt_u("attention.value_length")? {
            if vl != head_dim {
                return Err(ModelError::Config(format!(
                    "value_length {vl} differs from key_length {head_dim} (not supported)"
                )));
            }
        }
        let rope_dims = opt_u("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(ModelError::Config(format!(
                "bad rope.dimension_count {rope_dims}"
            )));
        }
        let rms_eps = opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let rope_base = opt_f("rope.freq_base")?.unwrap_or(10000.0);
        // Vocabulary size: from metadata, else the token list.
        let n_vocab = match opt_u("vocab_size")? {
            Some(v) => v,
            None => h
                .get_array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .ok_or_else(|| {
                    ModelError::Config("no vocab_size and no tokenizer.ggml.tokens".into())
                })?,
        };

        let mut cfg = ModelConfig {
            arch,
            n_layers,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_style: RopeStyle::Interleaved,
            rope_dims,
            rope_base,
            rope_base_swa: rope_base,
            sliding_window: None,
            swa_period: 1,
            embd_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            ffn: FfnActivation::SwiGlu,
        };
        match arch {
            Arch::Llama => {}
            Arch::Qwen2 => cfg.rope_style = RopeStyle::Neox,
            Arch::Gemma3 => {
                cfg.rope_style = RopeStyle::Neox;
                cfg.ffn = FfnActivation::GeGlu;
                cfg.embd_scale = (n_embd as f32).sqrt();
                // Not stored in the file; llama.cpp hard-codes these for Gemma 3: local layers use
                // RoPE base 10000, and every 6th layer is global.
                cfg.rope_base_swa = 10000.0;
                cfg.swa_period = 6;
                cfg.sliding_window = Some(opt_u("attention.sliding_window")?.unwrap_or(4096));
                // The 27B model scales by n_embd / n_head; the others by the head size.
                cfg.attn_scale = 1.0 / (head_dim as f32).sqrt();
            }
        }
        Ok(cfg)
    }

    /// Whether layer `il` attends through the sliding window.
    pub fn is_swa_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some() && il % self.swa_period < self.swa_period - 1
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
