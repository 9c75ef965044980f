//! Synthetic GGUF models and a layer-aligned repacker.
//!
//! * [`write_synthetic`] writes a random-weight model of a preset shape (tiny test models of
//!   each architecture, Llama shapes from 1B to 70B) with a valid gpt2 BPE tokenizer, in a
//!   chosen quantization mix, at disk speed. flea and llama.cpp load and run the files.
//!   The weights are random but scaled like a trained model's (element std ≈
//!   1/sqrt(row length), norms ≈ 1), so activations stay finite and logits varied through
//!   any number of layers.
//! * [`repack`] rewrites a GGUF so that each layer's tensors are contiguous and start on a
//!   4 KiB boundary (see [`repack`] for how), then verifies the copy.
//!
//! CLI entry points: [`SynthArgs`] / [`run_synth`] and [`RepackArgs`] / [`run_repack`].
//!
//! ## Quantization mixes and the 32-element fallback
//!
//! `q4_k_m` follows llama.cpp's Q4_K_M in simplified form: `attn_v` and `ffn_down` Q6_K, the
//! output matrix Q6_K (or `token_embd` when the output is tied), every other matrix Q4_K.
//! The uniform mixes put every matrix in one type. Norms and biases are always F32.
//! (llama.cpp gives Q6_K to only about half of the attn_v/ffn_down layers, so our Q4_K_M
//! files are ~6% larger: 4.34 GB for the 7B vs ~4.08 GB.)
//!
//! K-quants need rows that are a whole number of 256-element super-blocks. A matrix whose
//! row length is not falls back like llama.cpp does: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, and
//! Q2_K/Q3_K→Q4_0 (llama.cpp uses IQ4_NL, which flea does not implement). A row length
//! that is not a multiple of 32 either falls back to F16. The fallback applies to the
//! `smollm2-135m` and `qwen2.5-0.5b` presets (576- and 896-wide rows) and to custom shapes;
//! the other presets' rows are multiples of 256.

use std::path::{Path, PathBuf};
use std::time::Instant;

use flea_gguf::{GgmlType, GgufError, GgufWriter, MetaValue};

mod gen;
mod repack;
mod sink;
mod vocab;

pub use repack::{repack, run_repack, LayerExtent, RepackArgs, RepackReport, REPACK_ALIGNMENT};

/// Everything that can go wrong synthesizing or repacking.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Reading or writing GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The output would not fit on its filesystem.
    #[error(
        "{path}: not enough disk space: the file needs {:.2} GB, {:.2} GB available",
        *need as f64 / 1e9,
        *avail as f64 / 1e9
    )]
    NoSpace {
        /// The output file.
        path: String,
        /// Bytes the file needs.
        need: u64,
        /// Bytes available.
        avail: u64,
    },
    /// Options that cannot make a model (bad shape, ...).
    #[error("invalid options: {0}")]
    Invalid(String),
    /// A repacked file does not match its source.
    #[error("verification failed: {0}")]
    Verify(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, SynthError>;

/// The architectures a synthetic model can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthArch {
    /// Llama: SwiGLU, adjacent-pair RoPE, no biases.
    Llama,
    /// Qwen2: Llama plus q/k/v biases, NeoX RoPE.
    Qwen2,
    /// Gemma 3: q/k norms, post-attention and post-FFN norms, sliding-window layers.
    Gemma3,
}

impl SynthArch {
    /// The GGUF `general.architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::Gemma3 => "gemma3",
        }
    }
}

/// Hyper-parameters of a synthetic model. Start from [`Preset::shape`] and edit fields to
/// make other shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    /// Architecture.
    pub arch: SynthArch,
    /// `general.name`.
    pub name: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when fewer than `n_head`).
    pub n_head_kv: usize,
    /// Head size; written as `attention.key_length`/`value_length` when it differs from
    /// `n_embd / n_head` or for Gemma 3.
    pub head_dim: usize,
    /// Feed-forward hidden width.
    pub n_ff: usize,
    /// Vocabulary size (at least 259).
    pub n_vocab: usize,
    /// `context_length`.
    pub n_ctx: usize,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// RoPE base (global layers).
    pub rope_base: f32,
    /// Sliding window (Gemma 3 only).
    pub sliding_window: Option<usize>,
}

/// Built-in model shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Llama, 4 layers, n_embd 256, 4 heads / 2 kv heads, n_ff 768, vocab 1024.
    Tiny,
    /// As `tiny`, Qwen2 architecture (q/k/v biases, NeoX RoPE).
    TinyQwen2,
    /// Gemma 3, 8 layers (sliding-window 0-4 and 6-7, global 5), head size 128, window 16.
    TinyGemma3,
    /// SmolLM2-135M's shape: Llama, 30 layers, 576, 9/3 heads, n_ff 1536, vocab 49152.
    #[value(name = "smollm2-135m")]
    SmolLm2,
    /// Qwen2.5-0.5B's shape: Qwen2, 24 layers, 896, 14/2 heads, n_ff 4864, vocab 151936.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25,
    /// Gemma-3-270M's shape: Gemma 3, 18 layers, 640, 4/1 heads of 256, n_ff 2048, vocab
    /// 262144, window 512 (every 6th layer global); the shipped file is tied (`--tied`).
    #[value(name = "gemma3-270m")]
    Gemma3,
    /// Llama-3.2-1B-like: 16 layers, 2048, 32/8 heads, n_ff 8192, vocab 32000.
    #[value(name = "1b")]
    B1,
    /// Llama-2-7B: 32 layers, 4096, 32 heads, n_ff 11008, vocab 32000.
    #[value(name = "7b")]
    B7,
    /// Llama-2-13B: 40 layers, 5120, 40 heads, n_ff 13824, vocab 32000.
    #[value(name = "13b")]
    B13,
    /// CodeLlama-34B: 48 layers, 8192, 64/8 heads, n_ff 22016, vocab 32000.
    #[value(name = "34b")]
    B34,
    /// Llama-2-70B: 80 layers, 8192, 64/8 heads, n_ff 28672, vocab 32000.
    #[value(name = "70b")]
    B70,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 11] = [
        Preset::Tiny,
        Preset::TinyQwen2,
        Preset::TinyGemma3,
        Preset::SmolLm2,
        Preset::Qwen25,
        Preset::Gemma3,
        Preset::B1,
        Preset::B7,
        Preset::B13,
        Preset::B34,
        Preset::B70,
    ];

    /// The preset's CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyQwen2 => "tiny-qwen2",
            Preset::TinyGemma3 => "tiny-gemma3",
            Preset::SmolLm2 => "smollm2-135m",
            Preset::Qwen25 => "qwen2.5-0.5b",
            Preset::Gemma3 => "gemma3-270m",
            Preset::B1 => "1b",
            Preset::B7 => "7b",
            Preset::B13 => "13b",
            Preset::B34 => "34b",
            Preset::B70 => "70b",
        }
    }

    /// The preset's hyper-parameters.
    pub fn shape(self) -> ModelShape {
        #[allow(clippy::too_many_arguments)]
        fn llama(
            name: &str,
            l: usize,
            d: usize,
            h: usize,
            kv: usize,
            ff: usize,
            vocab: usize,
            ctx: usize,
            rope: f32,
        ) -> ModelShape {
            ModelShape {
                arch: SynthArch::Llama,
                name: format!("flea-synth {name}"),
                n_layers: l,
                n_embd: d,
                n_head: h,
                n_head_kv: kv,
                head_dim: d / h,
                n_ff: ff,
                n_vocab: vocab,
                n_ctx: ctx,
                rms_eps: 1e-5,
                rope_base: rope,
                sliding_window: None,
            }
        }
        match self {
            Preset::Tiny => llama("tiny", 4, 256, 4, 2, 768, 1024, 2048, 10000.0),
            Preset::TinyQwen2 => ModelShape {
                arch: SynthArch::Qwen2,
                rms_eps: 1e-6,
                rope_base: 1e6,
                ..llama("tiny-qwen2", 4, 256, 4, 2, 768, 1024, 2048, 0.0)
            },
            Preset::TinyGemma3 => ModelShape {
                arch: SynthArch::Gemma3,
                n_layers: 8,
                head_dim: 128,
                rms_eps: 1e-6,
                rope_base: 1e6,
                sliding_window: Some(16),
                ..llama("tiny-gemma3", 8, 256, 4, 2, 768, 1024, 2048, 0.0)
            },
            Preset::SmolLm2 => llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 100000.0),
            Preset::Qwen25 => ModelShape {
                arch: SynthArch::Qwen2,
                rms_eps: 1e-6,
                ..llama("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, 32768, 1e6)
            },
            Preset::Gemma3 => ModelShape {
                arch: SynthArch::Gemma3,
                head_dim: 256,
                rms_eps: 1e-6,
                sliding_window: Some(512),
                ..llama("gemma3-270m", 18, 640, 4, 1, 2048, 262144, 32768, 1e6)
            },
            Preset::B1 => llama("1b", 16, 2048, 32, 8, 8192, 32000, 4096, 500000.0),
            Preset::B7 => llama("7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0),
            Preset::B13 => llama("13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10000.0),
            Preset::B34 => llama("34b", 48, 8192, 64, 8, 22016, 32000, 4096, 1e6),
            Preset::B70 => llama("70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10000.0),
        }
    }
}

/// Which tensor types the matrices get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
#[allow(non_camel_case_types)]
pub enum QuantMix {
    /// llama.cpp-like Q4_K_M: attn_v, ffn_down and output Q6_K, other matrices Q4_K.
    Q4_K_M,
    /// Every matrix Q4_0.
    Q4_0,
    /// Every matrix Q4_1.
    Q4_1,
    /// Every matrix Q5_0.
    Q5_0,
    /// Every matrix Q5_1.
    Q5_1,
    /// Every matrix Q8_0.
    Q8_0,
    /// Every matrix Q2_K.
    Q2_K,
    /// Every matrix Q3_K.
    Q3_K,
    /// Every matrix Q4_K.
    Q4_K,
    /// Every matrix Q5_K.
    Q5_K,
    /// Every matrix Q6_K.
    Q6_K,
    /// Every matrix F16.
    F16,
    /// Every matrix BF16.
    BF16,
    /// Every matrix F32.
    F32,
}

impl QuantMix {
    /// Every mix.
    pub const ALL: [QuantMix; 14] = [
        QuantMix::Q4_K_M,
        QuantMix::Q4_0,
        QuantMix::Q4_1,
        QuantMix::Q5_0,
        QuantMix::Q5_1,
        QuantMix::Q8_0,
        QuantMix::Q2_K,
        QuantMix::Q3_K,
        QuantMix::Q4_K,
        QuantMix::Q5_K,
        QuantMix::Q6_K,
        QuantMix::F16,
        QuantMix::BF16,
        QuantMix::F32,
    ];

    /// The single type of a uniform mix (None for `q4_k_m`).
    pub fn uniform_type(self) -> Option<GgmlType> {
        use GgmlType as T;
        Some(match self {
            QuantMix::Q4_K_M => return None,
            QuantMix::Q4_0 => T::Q4_0,
            QuantMix::Q4_1 => T::Q4_1,
            QuantMix::Q5_0 => T::Q5_0,
            QuantMix::Q5_1 => T::Q5_1,
            QuantMix::Q8_0 => T::Q8_0,
            QuantMix::Q2_K => T::Q2_K,
            QuantMix::Q3_K => T::Q3_K,
            QuantMix::Q4_K => T::Q4_K,
            QuantMix::Q5_K => T::Q5_K,
            QuantMix::Q6_K => T::Q6_K,
            QuantMix::F16 => T::F16,
            QuantMix::BF16 => T::BF16,
            QuantMix::F32 => T::F32,
        })
    }

    /// llama.cpp's `llama_ftype` for `general.file_type` (uniform K mixes map to the
    /// `_S` variants, which are the closest).
    pub fn file_type(self) -> u32 {
        match self {
            QuantMix::F32 => 0,
            QuantMix::F16 => 1,
            QuantMix::Q4_0 => 2,
            QuantMix::Q4_1 => 3,
            QuantMix::Q8_0 => 7,
            QuantMix::Q5_0 => 8,
            QuantMix::Q5_1 => 9,
            QuantMix::Q2_K => 10,
            QuantMix::Q3_K => 11,
            QuantMix::Q4_K => 14,
            QuantMix::Q4_K_M => 15,
            QuantMix::Q5_K => 16,
            QuantMix::Q6_K => 18,
            QuantMix::BF16 => 32,
        }
    }

    /// The type for a matrix of `role` with rows of `cols` elements, after the fallback for
    /// row lengths the type's block size does not divide.
    fn matrix_type(self, role: Role, tied: bool, cols: usize) -> GgmlType {
        use GgmlType as T;
        let ty = self.uniform_type().unwrap_or(match role {
            Role::Output | Role::AttnV | Role::FfnDown => T::Q6_K,
            // A tied embedding is also the output projection: llama.cpp gives it Q6_K.
            Role::TokenEmbd if tied => T::Q6_K,
            _ => T::Q4_K,
        });
        let ty = if cols.is_multiple_of(ty.block_size()) {
            ty
        } else {
            match ty {
                T::Q2_K | T::Q3_K => T::Q4_0,
                T::Q4_K => T::Q5_0,
                T::Q5_K => T::Q5_1,
                T::Q6_K => T::Q8_0,
                other => other,
            }
        };
        if cols.is_multiple_of(ty.block_size()) {
            ty
        } else {
            T::F16
        }
    }
}

/// What a tensor is, for choosing its type and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    AttnV,
    FfnDown,
    Matrix,
    Norm,
    Bias,
}

/// Options of [`write_synthetic`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// The model's hyper-parameters (usually `Preset::X.shape()`).
    pub shape: ModelShape,
    /// Tensor types.
    pub quant: QuantMix,
    /// Seed of every random byte: same seed and options → identical files.
    pub seed: u64,
    /// Omit `output.weight` (the output projection reuses `token_embd`).
    pub tied: bool,
    /// Generator threads (0: all cores). Output bytes do not depend on it.
    pub threads: usize,
    /// Print progress lines and the achieved speed to stderr.
    pub progress: bool,
}

impl SynthOptions {
    /// Defaults for a preset: Q4_K_M, seed 0, untied, all cores, quiet.
    pub fn new(preset: Preset) -> SynthOptions {
        SynthOptions {
            shape: preset.shape(),
            quant: QuantMix::Q4_K_M,
            seed: 0,
            tied: false,
            threads: 0,
            progress: false,
        }
    }
}

/// What [`write_synthetic`] wrote.
#[derive(Clone, Debug)]
pub struct SynthReport {
    /// The output file.
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Wall time of the write, in seconds.
    pub seconds: f64,
    /// bytes / seconds / 1e9.
    pub gb_per_s: f64,
}

/// A tensor to generate.
struct Plan {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    role: Role,
    /// Element std of a matrix.
    sigma: f32,
}

fn check_shape(s: &ModelShape) -> Result<()> {
    let bad = |m: String| Err(SynthError::Invalid(m));
    if s.n_layers == 0 || s.n_embd == 0 || s.n_head == 0 || s.n_head_kv == 0 || s.n_ff == 0 {
        return bad(format!("zero-sized shape: {s:?}"));
    }
    if !s.n_head.is_multiple_of(s.n_head_kv) {
        return bad(format!(
            "{} heads is not a multiple of {} kv heads",
            s.n_head, s.n_head_kv
        ));
    }
    if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) {
        return bad(format!(
            "head size {} must be even and non-zero",
            s.head_dim
        ));
    }
    if s.n_vocab < 259 {
        return bad(format!(
            "vocab {} is too small: 256 byte tokens, a merge, bos and eos need 259",
            s.n_vocab
        ));
    }
    if s.n_vocab > u32::MAX as usize || s.n_ctx == 0 || s.n_ctx > u32::MAX as usize {
        return bad(format!(
            "vocab {} / context {} out of range",
            s.n_vocab, s.n_ctx
        ));
    }
    Ok(())
}

/// The tensor list in file order: token_embd, the blocks, output_norm, output.
fn plan_tensors(o: &SynthOptions) -> Vec<Plan> {
    let s = &o.shape;
    let (d, qd, kvd, ff, hd) = (
        s.n_embd,
        s.n_head * s.head_dim,
        s.n_head_kv * s.head_dim,
        s.n_ff,
        s.head_dim,
    );
    let mut v = Vec::new();
    let mut add = |name: String, cols: usize, rows: usize, role: Role| {
        let (ty, dims) = match role {
            Role::Norm | Role::Bias => (GgmlType::F32, vec![cols as u64]),
            _ => (
                o.quant.matrix_type(role, o.tied, cols),
                vec![cols as u64, rows as u64],
            ),
        };
        v.push(Plan {
            name,
            dims,
            ty,
            role,
            sigma: 1.0 / (cols as f32).sqrt(),
        });
    };
    add("token_embd.weight".into(), d, s.n_vocab, Role::TokenEmbd);
    let gemma = s.arch == SynthArch::Gemma3;
    let qwen = s.arch == SynthArch::Qwen2;
    for il in 0..s.n_layers {
        let n = |t: &str| format!("blk.{il}.{t}");
        add(n("attn_norm.weight"), d, 1, Role::Norm);
        add(n("attn_q.weight"), d, qd, Role::Matrix);
        if qwen {
            add(n("attn_q.bias"), qd, 1, Role::Bias);
        }
        add(n("attn_k.weight"), d, kvd, Role::Matrix);
        if qwen {
            add(n("attn_k.bias"), kvd, 1, Role::Bias);
        }
        add(n("attn_v.weight"), d, kvd, Role::AttnV);
        if qwen {
            add(n("attn_v.bias"), kvd, 1, Role::Bias);
        }
        if gemma {
            add(n("attn_q_norm.weight"), hd, 1, Role::Norm);
            add(n("attn_k_norm.weight"), hd, 1, Role::Norm);
        }
        add(n("attn_output.weight"), qd, d, Role::Matrix);
        if gemma {
            add(n("post_attention_norm.weight"), d, 1, Role::Norm);
        }
        add(n("ffn_norm.weight"), d, 1, Role::Norm);
        add(n("ffn_gate.weight"), d, ff, Role::Matrix);
        add(n("ffn_up.weight"), d, ff, Role::Matrix);
        add(n("ffn_down.weight"), ff, d, Role::FfnDown);
        if gemma {
            add(n("post_ffw_norm.weight"), d, 1, Role::Norm);
        }
    }
    add("output_norm.weight".into(), d, 1, Role::Norm);
    if !o.tied {
        add("output.weight".into(), d, s.n_vocab, Role::Output);
    }
    v
}

fn add_metadata(w: &mut GgufWriter, o: &SynthOptions) {
    let s = &o.shape;
    let a = s.arch.name();
    let u = |x: usize| MetaValue::U32(x as u32);
    w.add_meta("general.architecture", a.into());
    w.add_meta("general.name", s.name.as_str().into());
    w.add_meta("general.file_type", MetaValue::U32(o.quant.file_type()));
    w.add_meta("general.quantization_version", MetaValue::U32(2));
    let k = |key: &str| format!("{a}.{key}");
    w.add_meta(&k("vocab_size"), u(s.n_vocab));
    w.add_meta(&k("context_length"), u(s.n_ctx));
    w.add_meta(&k("embedding_length"), u(s.n_embd));
    w.add_meta(&k("block_count"), u(s.n_layers));
    w.add_meta(&k("feed_forward_length"), u(s.n_ff));
    w.add_meta(&k("attention.head_count"), u(s.n_head));
    w.add_meta(&k("attention.head_count_kv"), u(s.n_head_kv));
    w.add_meta(&k("attention.layer_norm_rms_epsilon"), s.rms_eps.into());
    w.add_meta(&k("rope.freq_base"), s.rope_base.into());
    w.add_meta(&k("rope.dimension_count"), u(s.head_dim));
    if s.arch == SynthArch::Gemma3 || s.head_dim * s.n_head != s.n_embd {
        w.add_meta(&k("attention.key_length"), u(s.head_dim));
        w.add_meta(&k("attention.value_length"), u(s.head_dim));
    }
    if s.arch == SynthArch::Gemma3 {
        w.add_meta(
            &k("attention.sliding_window"),
            u(s.sliding_window.unwrap_or(4096)),
        );
    }
    let v = vocab::build(s.n_vocab);
    w.add_meta("tokenizer.ggml.model", "gpt2".into());
    w.add_meta("tokenizer.ggml.pre", "default".into());
    w.add_meta("tokenizer.ggml.tokens", v.tokens.into());
    w.add_meta("tokenizer.ggml.token_type", v.token_type.into());
    w.add_meta("tokenizer.ggml.merges", v.merges.into());
    w.add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(v.bos));
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(v.eos));
    w.add_meta("tokenizer.ggml.add_bos_token", true.into());
    w.add_meta("tokenizer.ggml.add_eos_token", false.into());
}

/// Bytes generated per independently seeded chunk: big enough to amortize the per-chunk
/// setup, small enough to spread a tensor over the threads.
const CHUNK: usize = 1 << 20;

/// Generate one tensor's bytes into `buf`, in parallel over `threads` threads. The bytes
/// depend only on (seed, index, plan), not on the thread count.
fn fill_tensor(p: &Plan, index: usize, seed: u64, threads: usize, buf: &mut [u8]) {
    match p.role {
        Role::Norm | Role::Bias => {
            // Norm weights ≈ 1 (Gemma's too: GGUF stores them with the +1 folded in),
            // biases ≈ 0; both small, so one stream suffices.
            let center = if p.role == Role::Norm { 1.0 } else { 0.0 };
            let mut rng = gen::Rng::new(gen::stream_seed(seed, index, 0));
            gen::fill_vector(center, 0.05, &mut rng, buf);
        }
        _ => {
            // Chunks hold whole blocks so each can be generated on its own; chunk i goes to
            // thread i % t (round-robin keeps the threads evenly loaded).
            let per = (CHUNK / p.ty.type_size()).max(1) * p.ty.type_size();
            let n = buf.len().div_ceil(per);
            let t = threads.min(n).max(1);
            let mut parts: Vec<Vec<(usize, &mut [u8])>> = (0..t).map(|_| Vec::new()).collect();
            for (i, c) in buf.chunks_mut(per).enumerate() {
                parts[i % t].push((i, c));
            }
            let work = |part: Vec<(usize, &mut [u8])>| {
                for (i, c) in part {
                    let mut rng = gen::Rng::new(gen::stream_seed(seed, index, i));
                    gen::fill_matrix(p.ty, p.sigma, &mut rng, c);
                }
            };
            std::thread::scope(|s| {
                let mut parts = parts.into_iter();
                let mine = parts.next();
                for part in parts {
                    s.spawn(move || work(part));
                }
                if let Some(part) = mine {
                    work(part);
                }
            });
        }
    }
}

/// Write a synthetic model to `path`. Refuses (before creating anything) if the file would
/// not fit on its filesystem.
pub fn write_synthetic(path: &Path, o: &SynthOptions) -> Result<SynthReport> {
    check_shape(&o.shape)?;
    let plans = plan_tensors(o);
    let mut w = GgufWriter::new(3, flea_gguf::DEFAULT_ALIGNMENT);
    add_metadata(&mut w, o);
    for p in &plans {
        w.add_tensor_deferred(&p.name, &p.dims, p.ty)?;
    }
    let layout = w.layout()?;
    let total = layout.last().map_or(0, |t| {
        t.end().next_multiple_of(flea_gguf::DEFAULT_ALIGNMENT)
    });
    sink::check_space(path, total)?;

    let threads = if o.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        o.threads
    };
    let label = path.display().to_string();
    let start = Instant::now();
    let bytes = sink::write_gguf(&w, path, total, o.progress, |i, buf| {
        if let Some(p) = plans.get(i) {
            fill_tensor(p, i, o.seed, threads, buf);
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let gb_per_s = bytes as f64 / 1e9 / seconds.max(1e-9);
    if o.progress {
        eprintln!(
            "{label}: wrote {:.2} GB, {} tensors in {seconds:.2} s: {gb_per_s:.2} GB/s",
            bytes as f64 / 1e9,
            plans.len()
        );
    }
    Ok(SynthReport {
        path: path.to_path_buf(),
        bytes,
        tensors: plans.len(),
        seconds,
        gb_per_s,
    })
}

/// `flea synth`: write a synthetic GGUF model.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Output GGUF file.
    pub output: PathBuf,
    /// Model shape.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Tensor type mix.
    #[arg(long, value_enum, default_value = "q4_k_m")]
    pub quant: QuantMix,
    /// Random seed (same seed and options → identical file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tie the output projection to token_embd (no output.weight).
    #[arg(long)]
    pub tied: bool,
    /// Override the preset's number of layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the preset's context length.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Generator threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Run `flea synth` (prints progress and the achieved GB/s to stderr).
pub fn run_synth(args: SynthArgs) -> Result<()> {
    let mut o = SynthOptions::new(args.preset);
    o.quant = args.quant;
    o.seed = args.seed;
    o.tied = args.tied;
    o.threads = args.threads;
    o.progress = true;
    if let Some(l) = args.layers {
        o.shape.n_layers = l;
        if o.shape.arch == SynthArch::Gemma3 && l < 6 {
            eprintln!("note: gemma3 with fewer than 6 layers has no global-attention layer");
        }
    }
    if let Some(c) = args.ctx {
        o.shape.n_ctx = c;
    }
    let r = write_synthetic(&args.output, &o)?;
    println!(
        "{}: {} {:?}, {} tensors, {:.2} GB, {:.2} GB/s",
        r.path.display(),
        args.preset.name(),
        args.quant,
        r.tensors,
        r.bytes as f64 / 1e9,
        r.gb_per_s
    );
    Ok(())
}
