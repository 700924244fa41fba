//! Errors of scoring runs, comparing systems and writing evaluation reports.

use std::path::PathBuf;

/// Why an evaluation could not be computed, read or written.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown metric `{text}`: expected `<accuracy|precision|recall|mrr|ndcg|map>@<k>`")]
    UnknownMetric { text: String },
    #[error(
        "paired comparison needs the same queries: `{baseline}` has {baseline_len} values, `{candidate}` has {candidate_len}"
    )]
    LengthMismatch {
        baseline: String,
        baseline_len: usize,
        candidate: String,
        candidate_len: usize,
    },
    #[error("cannot compare systems over zero queries")]
    NoQueries,
    #[error("value {index} of `{what}` is not finite")]
    NotFinite { what: String, index: usize },
    #[error("invalid statistics setting `{name}` = {value}: {why}")]
    BadSetting {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
    #[error("dataset `{dataset}` has no system `{label}`")]
    UnknownSystem { dataset: String, label: String },
    #[error("dataset `{dataset}` already has a system `{label}`")]
    DuplicateSystem { dataset: String, label: String },
    #[error(
        "system `{label}` of dataset `{dataset}` was scored on other queries than the dataset lists"
    )]
    QueryMismatch { dataset: String, label: String },
    #[error("system `{label}` of dataset `{dataset}` has no `{metric}` values")]
    MissingMetric {
        dataset: String,
        label: String,
        metric: String,
    },
    #[error("`{}` line {line}: {message}", path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("I/O error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("report JSON is invalid")]
    Json(#[source] serde_json::Error),
}
