//! Transient residency: memory budgets, the layer planner and the streaming executor.

pub mod batch_bench;
pub mod budget;
pub mod executor;
pub mod plan;
pub mod profile;
pub mod trace;

pub use budget::{fmt_size, parse_size, Arena};
pub use executor::{HybridChoice, HybridReport, StreamStats, StreamedModel};
pub use plan::{Links, Plan, PlanRequest, Tier};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Model(#[from] flea_model::ModelError),
    #[error(transparent)]
    Io(#[from] flea_io::IoError),
    #[error("{arena} budget exceeded by {what}: need {need} bytes with {used} of {budget} in use")]
    Budget {
        arena: &'static str,
        what: String,
        need: u64,
        used: u64,
        budget: u64,
    },
    #[error("--vram-budget {} is below the minimum {} ({detail})", budget::fmt_size(*budget), budget::fmt_size(*minimum))]
    BudgetTooSmall {
        budget: u64,
        minimum: u64,
        detail: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("streaming: {0}")]
    Stream(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
