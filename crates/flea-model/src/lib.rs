//! Models, the backend trait, the forward pass, the CPU backend and sampling.

pub mod backend;
pub mod config;
pub mod cpu;
pub mod debug;
pub mod forward;
pub mod model;
pub mod pool;
pub mod sampling;
pub mod weights;

pub use backend::{Backend, UnitStaging};
pub use config::{Arch, ModelConfig};
pub use cpu::CpuBackend;
pub use forward::Logits;
pub use model::{Model, Session};
pub use sampling::{Sampler, SamplerConfig};

use flea_gguf::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] flea_gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] flea_quant::QuantError),
    #[error(transparent)]
    Tokenizer(#[from] flea_tokenizer::TokenizerError),
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, gemma3)")]
    UnsupportedArch(String),
    #[error("tensor '{tensor}' has type {ty}, which flea does not support")]
    UnsupportedType { tensor: String, ty: GgmlType },
    #[error("model config: {0}")]
    Config(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{tensor}' has shape {got:?}, expected {want:?}")]
    Shape {
        tensor: String,
        want: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("weights: {0}")]
    Weights(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
