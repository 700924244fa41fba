//! The evaluation report: the data behind `report.json`, how the evaluate stage assembles it,
//! and writing it out with its renderings ([`super::render`]).
//!
//! # `report.json`, format 1
//!
//! ```text
//! Report
//! ├── format: 1, title
//! ├── regression: bool          true when fine-tuned is worse than base beyond noise anywhere
//! ├── regressions: [sentence]   each such comparison in plain words, prefixed by its dataset
//! ├── reranker_regression: bool a retrieve+rerank system is worse than its retriever alone
//! ├── reranker_regressions: [sentence]
//! ├── settings                  bootstrap resamples, permutations, confidence, alpha, seed
//! ├── training?                 {points: [{step, loss, lr}]} from the train log
//! └── datasets: [Dataset]
//!     ├── name, documents, query_ids
//!     ├── systems: [System]     bm25, base, fine-tuned, each at each Matryoshka dimension, and
//!     │   │                     each full-size dense system reranked by the cross-encoder
//!     │   ├── label, kind ("bm25" | "base" | "fine-tuned" | "reranked"), model?, dimension?
//!     │   ├── reranker?         {model, top_k, seconds_per_query} for a reranked system
//!     │   ├── metrics: {"ndcg@10": {mean, interval: {low, high, level}}, …}
//!     │   └── per_query: {"ndcg@10": [value per query, aligned with query_ids], …}
//!     └── comparisons: [Comparison]
//!         └── metric, baseline, candidate, result (means, difference, interval,
//!             permutation and sign tests, verdict), sentence, regression,
//!             reranker_regression
//! ```
//!
//! The reranker fields are absent from reports written before they existed and read as "no
//! reranker".
//!
//! Metric keys are sentence-transformers' (`accuracy@1`, `ndcg@10`, …). Per-query values are
//! kept so a later run, or a person, can recompute any comparison.

use std::collections::BTreeMap;
use std::path::Path;

use fs_err as fs;
use serde::{Deserialize, Serialize};

use super::metrics::{Metric, RunScores};
use super::stats::{Interval, PairedComparison, PairedTestConfig, Verdict};
use super::training::TrainingCurve;
use super::{EvalError, render, stats};

/// The `report.json` format this build writes.
pub const REPORT_FORMAT: u32 = 1;

/// The metrics tables and charts show, in order; the first is the primary metric.
pub const HEADLINE_METRICS: [Metric; 5] = [
    Metric::NDCG_10,
    Metric::MRR_10,
    Metric::RECALL_10,
    Metric::RECALL_100,
    Metric::MAP_100,
];

/// What kind of retriever a system is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SystemKind {
    /// Lexical BM25: the floor a dense model should clear.
    Bm25,
    /// The embedding model before fine-tuning.
    Base,
    /// The embedding model after fine-tuning.
    FineTuned,
    /// A dense system's top results reordered by a cross-encoder.
    Reranked,
}

impl SystemKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bm25 => "BM25",
            Self::Base => "base",
            Self::FineTuned => "fine-tuned",
            Self::Reranked => "retrieve+rerank",
        }
    }
}

/// How the evaluate stage describes a system it scored.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemSpec {
    /// Unique within a dataset, used in tables and verdicts: `base`, `fine-tuned@128`.
    pub label: String,
    pub kind: SystemKind,
    /// The model reference or path, for dense systems.
    pub model: Option<String>,
    /// Embedding dimension used (a Matryoshka truncation when below the model's own).
    pub dimension: Option<usize>,
    /// For a reranked system: the cross-encoder and what reranking cost.
    pub reranker: Option<RerankerRun>,
}

/// How a retrieve+rerank system reranked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankerRun {
    /// The cross-encoder's path or reference.
    pub model: String,
    /// How many of the retriever's top results were reordered.
    pub top_k: usize,
    /// Wall time of scoring one query's `top_k` pairs, on this machine.
    pub seconds_per_query: f64,
}

/// A metric's mean over queries with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    pub mean: f64,
    pub interval: Interval,
}

/// One system's results on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct System {
    pub label: String,
    pub kind: SystemKind,
    pub model: Option<String>,
    pub dimension: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reranker: Option<RerankerRun>,
    pub metrics: BTreeMap<Metric, MetricSummary>,
    /// Each metric's value per query, aligned with the dataset's `query_ids`.
    pub per_query: BTreeMap<Metric, Vec<f64>>,
}

/// Two systems compared on one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: Metric,
    /// Label of the system compared against.
    pub baseline: String,
    /// Label of the system under test.
    pub candidate: String,
    pub result: PairedComparison,
    /// The result in plain words.
    pub sentence: String,
    /// The candidate is fine-tuned, the baseline is base, and it is worse beyond noise.
    pub regression: bool,
    /// The candidate is reranked and worse beyond noise than its baseline.
    #[serde(default)]
    pub reranker_regression: bool,
}

/// The systems evaluated on one query set and how they compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    /// Documents searched.
    pub documents: usize,
    /// Queries scored (those with a relevant document), in the order of every per-query list.
    pub query_ids: Vec<String>,
    pub systems: Vec<System>,
    pub comparisons: Vec<Comparison>,
}

impl Dataset {
    pub fn new(name: impl Into<String>, documents: usize, query_ids: Vec<String>) -> Self {
        Self {
            name: name.into(),
            documents,
            query_ids,
            systems: Vec::new(),
            comparisons: Vec::new(),
        }
    }

    /// Adds a system's scores, which must cover exactly this dataset's queries, and computes
    /// the bootstrap interval of each metric's mean.
    pub fn add_system(
        &mut self,
        spec: SystemSpec,
        scores: RunScores,
        settings: &PairedTestConfig,
    ) -> Result<(), EvalError> {
        if self.system(&spec.label).is_some() {
            return Err(EvalError::DuplicateSystem {
                dataset: self.name.clone(),
                label: spec.label,
            });
        }
        if scores.query_ids != self.query_ids {
            return Err(EvalError::QueryMismatch {
                dataset: self.name.clone(),
                label: spec.label,
            });
        }
        let metrics = scores
            .values
            .iter()
            .map(|(metric, values)| {
                let interval = stats::bootstrap_mean_interval(values, settings)?;
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                Ok((*metric, MetricSummary { mean, interval }))
            })
            .collect::<Result<_, EvalError>>()?;
        self.systems.push(System {
            label: spec.label,
            kind: spec.kind,
            model: spec.model,
            dimension: spec.dimension,
            reranker: spec.reranker,
            metrics,
            per_query: scores.values,
        });
        Ok(())
    }

    pub fn system(&self, label: &str) -> Option<&System> {
        self.systems.iter().find(|system| system.label == label)
    }

    /// Compares the system labelled `candidate` with `baseline` on each of `metrics`.
    pub fn compare(
        &mut self,
        baseline: &str,
        candidate: &str,
        metrics: &[Metric],
        settings: &PairedTestConfig,
    ) -> Result<(), EvalError> {
        let lookup = |label: &str| {
            self.system(label).ok_or_else(|| EvalError::UnknownSystem {
                dataset: self.name.clone(),
                label: label.to_owned(),
            })
        };
        let (base, cand) = (lookup(baseline)?, lookup(candidate)?);
        let mut comparisons = Vec::with_capacity(metrics.len());
        for metric in metrics {
            let result = stats::compare_paired(
                per_query(&self.name, base, *metric)?,
                per_query(&self.name, cand, *metric)?,
                settings,
            )?;
            comparisons.push(Comparison {
                metric: *metric,
                baseline: base.label.clone(),
                candidate: cand.label.clone(),
                sentence: result.sentence(&cand.label, &base.label, &metric.label()),
                regression: base.kind == SystemKind::Base
                    && cand.kind == SystemKind::FineTuned
                    && result.verdict == Verdict::Worse,
                reranker_regression: cand.kind == SystemKind::Reranked
                    && result.verdict == Verdict::Worse,
                result,
            });
        }
        self.comparisons.extend(comparisons);
        Ok(())
    }

    /// Compares every fine-tuned system with the base system of the same dimension, the
    /// comparison the regression guard watches.
    pub fn compare_fine_tuned_with_base(
        &mut self,
        metrics: &[Metric],
        settings: &PairedTestConfig,
    ) -> Result<(), EvalError> {
        let pairs: Vec<(String, String)> = self
            .systems
            .iter()
            .filter(|system| system.kind == SystemKind::FineTuned)
            .filter_map(|tuned| {
                self.systems
                    .iter()
                    .find(|base| base.kind == SystemKind::Base && base.dimension == tuned.dimension)
                    .map(|base| (base.label.clone(), tuned.label.clone()))
            })
            .collect();
        for (base, tuned) in pairs {
            self.compare(&base, &tuned, metrics, settings)?;
        }
        Ok(())
    }
}

/// `system`'s per-query values of `metric`.
fn per_query<'a>(
    dataset: &str,
    system: &'a System,
    metric: Metric,
) -> Result<&'a [f64], EvalError> {
    system
        .per_query
        .get(&metric)
        .map(Vec::as_slice)
        .ok_or_else(|| EvalError::MissingMetric {
            dataset: dataset.to_owned(),
            label: system.label.clone(),
            metric: metric.to_string(),
        })
}

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    pub title: String,
    /// Fine-tuned is worse than base beyond noise in at least one comparison.
    pub regression: bool,
    /// Those comparisons, as `dataset: sentence`.
    pub regressions: Vec<String>,
    /// A retrieve+rerank system is worse than its retriever alone beyond noise somewhere: the
    /// reranker must not become ragd's default.
    #[serde(default)]
    pub reranker_regression: bool,
    #[serde(default)]
    pub reranker_regressions: Vec<String>,
    pub settings: PairedTestConfig,
    pub datasets: Vec<Dataset>,
    pub training: Option<TrainingCurve>,
}

impl Report {
    /// Assembles the report and raises the regression flag from the datasets' comparisons.
    pub fn new(
        title: impl Into<String>,
        settings: PairedTestConfig,
        datasets: Vec<Dataset>,
        training: Option<TrainingCurve>,
    ) -> Self {
        let sentences = |flagged: fn(&Comparison) -> bool| -> Vec<String> {
            datasets
                .iter()
                .flat_map(|dataset| {
                    dataset
                        .comparisons
                        .iter()
                        .filter(move |comparison| flagged(comparison))
                        .map(|comparison| format!("{}: {}", dataset.name, comparison.sentence))
                })
                .collect()
        };
        let regressions = sentences(|c| c.regression);
        let reranker_regressions = sentences(|c| c.reranker_regression);
        Self {
            format: REPORT_FORMAT,
            title: title.into(),
            regression: !regressions.is_empty(),
            regressions,
            reranker_regression: !reranker_regressions.is_empty(),
            reranker_regressions,
            settings,
            datasets,
            training,
        }
    }

    /// `{dataset: {system: {metric: mean}}}` over [`HEADLINE_METRICS`]: the figures a registry
    /// entry and a run summary carry.
    pub fn headline_means(&self) -> serde_json::Map<String, serde_json::Value> {
        self.datasets
            .iter()
            .map(|dataset| {
                let systems: serde_json::Map<String, serde_json::Value> = dataset
                    .systems
                    .iter()
                    .map(|system| {
                        let metrics: serde_json::Map<String, serde_json::Value> = HEADLINE_METRICS
                            .iter()
                            .filter_map(|metric| {
                                let mean = system.metrics.get(metric)?.mean;
                                Some((metric.to_string(), mean.into()))
                            })
                            .collect();
                        (system.label.clone(), metrics.into())
                    })
                    .collect();
                (dataset.name.clone(), systems.into())
            })
            .collect()
    }

    pub fn to_json(&self) -> Result<String, EvalError> {
        serde_json::to_string_pretty(self).map_err(EvalError::Json)
    }

    pub fn from_json(text: &str) -> Result<Self, EvalError> {
        serde_json::from_str(text).map_err(EvalError::Json)
    }

    /// Writes `report.json`, `report.md` and `report.html` into `dir`, which must exist.
    pub fn write(&self, dir: &Path) -> Result<(), EvalError> {
        let files = [
            ("report.json", self.to_json()?),
            ("report.md", render::markdown(self)),
            ("report.html", render::html(self)),
        ];
        for (name, contents) in files {
            let path = dir.join(name);
            fs::write(&path, contents).map_err(|source| EvalError::Io { path, source })?;
        }
        Ok(())
    }
}
