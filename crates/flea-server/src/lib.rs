//! An OpenAI-compatible HTTP server over a continuous-batching engine.
//!
//! Concurrent requests share every weight pass: the [`engine`] runs one scheduler loop that
//! owns the model and, each step, evaluates the next token of every running sequence plus
//! the prompts of newly admitted ones in a single pass over the (possibly streamed) layers.
//! The [`api`] module is the axum router: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`, `/metrics`.

pub mod api;
pub mod engine;
pub mod template;

pub use api::{serve, ServeOptions};
pub use engine::{
    Engine, EngineHandle, EngineOptions, Event, FinishReason, GenRequest, Prompt, StepModel,
    SAMPLE_THREADS_MAX,
};

/// Why a request or the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the request queue is full; retry later")]
    QueueFull,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("this model's context is {n_ctx} tokens; the prompt ({prompt} tokens) and max_tokens ({max_tokens}) exceed it")]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        n_ctx: usize,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("generation failed: {0}")]
    Engine(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}
