//! Retrieval evaluation: IR metrics of ranked lists (`metrics`), whether two systems differ
//! beyond noise (`stats`), the training curve (`training`), and the evaluation report
//! (`report`) with its renderings (`render`).
//!
//! The evaluate stage ranks held-out queries with each system (BM25 as a floor, the base model,
//! the fine-tuned model, each at every Matryoshka dimension), scores the rankings with
//! [`RunScores::evaluate`], adds them to a [`Dataset`], compares fine-tuned with base, and writes
//! `report.json`, `report.md` and `report.html` with [`Report::write`]. Nothing here reads
//! recipes or prints: the stage decides what to evaluate and the CLI prints [`text_table`].

pub mod beir;
pub mod error;
pub mod general;
pub mod metrics;
pub mod render;
pub mod report;
pub mod stats;
pub mod training;

pub use beir::{BeirDataset, BeirDocument};
pub use error::EvalError;
pub use metrics::{Metric, MetricKind, RunScores, default_metrics, max_k, score_query};
pub use render::{html, markdown, text_table};
pub use report::{Comparison, Dataset, HEADLINE_METRICS, Report, System, SystemKind, SystemSpec};
pub use stats::{PairedComparison, PairedTestConfig, Verdict, compare_paired};
pub use training::{TrainPoint, TrainingCurve};
