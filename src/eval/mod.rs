//! Retrieval evaluation: IR metrics of ranked lists (`metrics`) and whether two systems differ
//! beyond noise (`stats`).
//!
//! The evaluate stage ranks held-out queries with each system (BM25 as a floor, the base model,
//! the fine-tuned model, each at every Matryoshka dimension), scores the rankings with
//! [`RunScores::evaluate`] and compares fine-tuned with base. Nothing here reads recipes or
//! prints.

pub mod error;
pub mod metrics;
pub mod stats;

pub use error::EvalError;
pub use metrics::{Metric, MetricKind, RunScores, default_metrics, max_k, score_query};
pub use stats::{PairedComparison, PairedTestConfig, Verdict, compare_paired};
