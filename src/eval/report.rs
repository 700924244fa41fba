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
use super::stats::{Interval, PairedComparison, PairedTestConfig};
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
    /// The first round's model of a two-round fine-tune (`mine.rounds: 2`): reported beside
    /// the final one, never the one the verdict or the regression guard reads.
    FirstRound,
    /// A dense system's top results reordered by a cross-encoder.
    Reranked,
}

impl SystemKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bm25 => "BM25",
            Self::Base => "base",
            Self::FineTuned => "fine-tuned",
            Self::FirstRound => "fine-tuned (round 1)",
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
    /// Tokens a text was truncated at, for dense systems.
    pub max_seq_length: Option<usize>,
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
    /// Tokens a text was truncated at; absent from reports written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_length: Option<usize>,
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

/// What a query set measures, which decides how it weighs in the [`Verdict`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetRole {
    /// The user's own labelled questions: real queries, the verdict's first witness.
    #[default]
    User,
    /// Synthetic queries of documents training never saw.
    HeldOut,
    /// The general-domain set shipped with the tool: does the fine-tune forget what the base
    /// knew?
    General,
}

/// The systems evaluated on one query set and how they compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    /// Absent from reports written before roles existed, which read as `user`.
    #[serde(default)]
    pub role: DatasetRole,
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
            role: DatasetRole::User,
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
            max_seq_length: spec.max_seq_length,
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
                    && result.verdict == stats::Verdict::Worse,
                reranker_regression: cand.kind == SystemKind::Reranked
                    && result.verdict == stats::Verdict::Worse,
                result,
            });
        }
        self.comparisons.extend(comparisons);
        Ok(())
    }

    /// Compares every fine-tuned system (a first round's too) with the base system of the same
    /// dimension, the comparison the regression guard watches. When the base was scored at several lengths,
    /// the one with the best mean of the first of `metrics` is the baseline: a gain is then the
    /// fine-tune's, not a truncation's.
    pub fn compare_fine_tuned_with_base(
        &mut self,
        metrics: &[Metric],
        settings: &PairedTestConfig,
    ) -> Result<(), EvalError> {
        let mean = |system: &System| {
            metrics
                .first()
                .and_then(|metric| system.metrics.get(metric))
                .map_or(f64::NEG_INFINITY, |summary| summary.mean)
        };
        let pairs: Vec<(String, String)> = self
            .systems
            .iter()
            .filter(|system| matches!(system.kind, SystemKind::FineTuned | SystemKind::FirstRound))
            .filter_map(|tuned| {
                self.systems
                    .iter()
                    .filter(|base| {
                        base.kind == SystemKind::Base && base.dimension == tuned.dimension
                    })
                    .fold(None::<&System>, |best, base| match best {
                        Some(best) if mean(best) >= mean(base) => Some(best),
                        _ => Some(base),
                    })
                    .map(|base| (base.label.clone(), tuned.label.clone()))
            })
            .collect();
        for (base, tuned) in pairs {
            self.compare(&base, &tuned, metrics, settings)?;
        }
        Ok(())
    }

    /// The comparison of the full-size fine-tuned model with its base on nDCG@10: the one the
    /// verdict reads.
    pub fn headline_comparison(&self) -> Option<&Comparison> {
        self.comparisons.iter().find(|comparison| {
            comparison.metric == Metric::NDCG_10
                && comparison.candidate == SystemKind::FineTuned.name()
        })
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

/// How the train stage chose the weight of the fine-tuned model in its merge with the base
/// (`train.merge`): `merge.json` in the model's artifact, copied into the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeSearch {
    /// The `α` registered: `α·fine-tuned + (1−α)·base`.
    pub alpha: f64,
    /// `auto` (the best of the trials), or `fixed` (the recipe's `α`).
    pub mode: String,
    /// What the choice rested on.
    pub why: String,
    /// Every `α` tried, in the order tried.
    pub trials: Vec<MergeTrial>,
}

/// One `α`'s figures, nDCG@10 on the held-out split and on the general check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeTrial {
    pub alpha: f64,
    /// Absent when there was no held-out split to score.
    pub heldout_ndcg10: Option<f64>,
    pub general_ndcg10: f64,
    /// The general check lost no more than allowed against the base (`α = 0`).
    pub within_general_guard: bool,
}

/// What the verdict's labels are.
pub const VERDICT_BETTER: &str = "better";
pub const VERDICT_NO_CLEAR_DIFFERENCE: &str = "no clear difference";
pub const VERDICT_WORSE: &str = "worse";

/// Whether the fine-tuned model is worth using, in plain words: the first thing a report says
/// and the last thing a run prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// [`VERDICT_BETTER`], [`VERDICT_NO_CLEAR_DIFFERENCE`] or [`VERDICT_WORSE`].
    pub label: String,
    /// One sentence of evidence.
    pub why: String,
    /// What to try next, and at which length to run each model.
    pub next: String,
}

/// How much the general check may lose before the verdict calls a fine-tune worse, and what
/// the advice may take for granted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerdictRules {
    /// Largest drop of nDCG@10 (base minus fine-tuned) on the general check that is tolerated.
    pub general_max_drop: f64,
    /// An LLM wrote the training queries already: the advice does not suggest one.
    pub queries_by_llm: bool,
}

/// What a result rests on that the evaluation's own figures do not show: the training data's
/// size and what the filters threw away on the way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingFacts {
    pub examples: Option<usize>,
    /// The trained model's parameters: bigger models need more examples.
    pub parameters: Option<u64>,
    pub steps: Option<u64>,
    pub filters: Vec<FilterShare>,
}

/// Queries one filter of one stage dropped, of those it saw.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterShare {
    pub stage: String,
    pub filter: String,
    pub dropped: usize,
    pub of: usize,
}

/// Fewer training examples than this rarely move a model of `parameters` beyond noise: 500 for
/// all-MiniLM-L6-v2's 22.7 M (the quickstart's 96 did not move it; pyfaq's 3,243 did), growing
/// with the square root of the size (about 1,100 for all-mpnet-base-v2's 110 M).
fn few_examples(parameters: Option<u64>) -> usize {
    let ratio = parameters.map_or(1.0, |p| (p as f64 / 22.7e6).max(1.0));
    (500.0 * ratio.sqrt()).round() as usize
}
/// Fewer optimiser steps than this are too few for the learning-rate schedule to matter.
const FEW_STEPS: u64 = 30;
/// Fewer queries than this make an interval too wide to see a gain of a few points.
const FEW_QUERIES: usize = 50;
/// BM25 this far above the fine-tuned model is worth a word, even within noise.
const BM25_MARGIN: f64 = 0.01;

impl Verdict {
    /// The verdict from the datasets' headline comparisons: `worse` when any held-out or user
    /// set is worse beyond noise, or the general check loses more than allowed; else `better`
    /// when the sets that decide (the user's own when there are any, since their questions are
    /// real, else the held-out split) show a gain beyond noise; else `no clear difference`.
    /// `None` without a fine-tuned model.
    pub fn judge(datasets: &[Dataset], rules: VerdictRules) -> Option<Self> {
        let headline = |role: DatasetRole| -> Vec<(&Dataset, &Comparison)> {
            datasets
                .iter()
                .filter(|d| d.role == role)
                .filter_map(|d| Some((d, d.headline_comparison()?)))
                .collect()
        };
        let (user, heldout, general) = (
            headline(DatasetRole::User),
            headline(DatasetRole::HeldOut),
            headline(DatasetRole::General),
        );
        let deciding = if user.is_empty() { &heldout } else { &user };
        if deciding.is_empty() {
            return None;
        }
        let lost_general = general
            .iter()
            .find(|(_, c)| -c.result.mean_difference > rules.general_max_drop);
        let worse = user
            .iter()
            .chain(&heldout)
            .find(|(_, c)| c.result.verdict == stats::Verdict::Worse);
        let better = deciding
            .iter()
            .filter(|(_, c)| c.result.verdict == stats::Verdict::Better)
            .max_by(|a, b| {
                a.1.result
                    .mean_difference
                    .total_cmp(&b.1.result.mean_difference)
            });
        let evidence = |(dataset, comparison): &(&Dataset, &Comparison)| {
            format!("on {}, {}", dataset.name, comparison.sentence)
        };
        let general_note = match general.first() {
            Some((dataset, c)) if lost_general.is_none() => format!(
                "; on the general check ({}) it moves {:+.3}, within the {:.3} allowed",
                dataset.name, c.result.mean_difference, rules.general_max_drop
            ),
            _ => String::new(),
        };
        let no_clear_next = if rules.queries_by_llm {
            "give it more chunks (more documents, a higher `query_gen.max_chunks`), a larger LLM \
             (`query_gen.llm.model`), add labelled questions of your own to `evaluate.datasets` \
             for a tighter interval, or try another `base_model`"
        } else {
            "give it more chunks (more documents, a higher `query_gen.max_chunks`), write queries \
             with an LLM (`query_gen.strategies: [llm]`), add labelled questions of your own to \
             `evaluate.datasets` for a tighter interval, or try another `base_model`"
        };
        let (label, why, next) = if let Some(worse) = worse {
            (
                VERDICT_WORSE,
                evidence(worse),
                "lower `train.learning_rate` or `train.epochs`, keep `train.merge: auto` so the \
                 merge can fall back towards the base, or try another `base_model`",
            )
        } else if let Some((dataset, c)) = lost_general {
            (
                VERDICT_WORSE,
                format!(
                    "it forgets what the base knew: on the general check ({}) nDCG@10 drops by \
                     {:.3}, more than the {:.3} allowed (`evaluate.general_max_drop`)",
                    dataset.name, -c.result.mean_difference, rules.general_max_drop
                ),
                "keep `train.merge: auto` (or set a smaller `train.merge`), lower \
                 `train.learning_rate` or `train.epochs`, or try another `base_model`",
            )
        } else if let Some(better) = better {
            (
                VERDICT_BETTER,
                format!("{}{general_note}", evidence(better)),
                "use it; more chunks or LLM-written queries may widen the gain",
            )
        } else {
            let shown = deciding.iter().map(evidence).collect::<Vec<_>>().join("; ");
            let synthetic_only = !user.is_empty()
                && heldout
                    .iter()
                    .any(|(_, c)| c.result.verdict == stats::Verdict::Better);
            let why = if synthetic_only {
                format!(
                    "the held-out split (synthetic queries) improves, but your own questions do \
                     not show it beyond noise: {shown}{general_note}"
                )
            } else {
                format!("no difference beyond noise: {shown}{general_note}")
            };
            (VERDICT_NO_CLEAR_DIFFERENCE, why, no_clear_next)
        };
        let lengths = deciding
            .first()
            .and_then(|(dataset, _)| length_advice(dataset))
            .map(|advice| format!("; {advice}"))
            .unwrap_or_default();
        Some(Self {
            label: label.to_owned(),
            why: sentence(&why),
            next: sentence(&format!("{next}{lengths}")),
        })
    }
}

/// At which length to run each model, when the base was scored at more than one: the base at
/// its best, the fine-tuned model at the length it was trained and scored at.
fn length_advice(dataset: &Dataset) -> Option<String> {
    let full = |kind: SystemKind| {
        let top = dataset
            .systems
            .iter()
            .filter(|s| s.kind == kind)
            .filter_map(|s| s.dimension)
            .max();
        dataset
            .systems
            .iter()
            .filter(move |s| s.kind == kind && s.dimension == top)
    };
    let ndcg = |s: &System| s.metrics.get(&Metric::NDCG_10).map_or(0.0, |m| m.mean);
    let bases: Vec<&System> = full(SystemKind::Base)
        .filter(|s| s.max_seq_length.is_some())
        .collect();
    if bases.len() < 2 {
        return None;
    }
    let best = bases.iter().max_by(|a, b| ndcg(a).total_cmp(&ndcg(b)))?;
    let others = bases
        .iter()
        .filter(|s| s.label != best.label)
        .map(|s| format!("{:.4} at {}", ndcg(s), s.max_seq_length.unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ");
    let tuned = full(SystemKind::FineTuned)
        .find_map(|s| s.max_seq_length)
        .map(|n| format!(", the fine-tuned model at its {n} tokens"))
        .unwrap_or_default();
    Some(format!(
        "run the base at {} tokens (nDCG@10 {:.4} on {}, against {others}){tuned}",
        best.max_seq_length.unwrap_or_default(),
        ndcg(best),
        dataset.name
    ))
}

/// `text` with a capital first letter and a closing full stop.
fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default();
    if !out.ends_with('.') {
        out.push('.');
    }
    out
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
    /// Whether the fine-tune is worth using; absent without a fine-tuned model, and from
    /// reports written before verdicts existed.
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// How the fine-tuned model was merged with its base, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeSearch>,
    /// Why the result may not be trusted as far as its figures suggest, in plain words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The day the evaluation ran (`YYYY-MM-DD`), for the report's header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
}

impl Report {
    /// Assembles the report and raises the regression flag from the datasets' comparisons; the
    /// general check's flag waits for [`Report::conclude`], which knows the loss it tolerates.
    pub fn new(
        title: impl Into<String>,
        settings: PairedTestConfig,
        datasets: Vec<Dataset>,
        training: Option<TrainingCurve>,
    ) -> Self {
        let sentences = |flagged: fn(&Dataset, &Comparison) -> bool| -> Vec<String> {
            datasets
                .iter()
                .flat_map(|dataset| {
                    dataset
                        .comparisons
                        .iter()
                        .filter(move |comparison| flagged(dataset, comparison))
                        .map(|comparison| format!("{}: {}", dataset.name, comparison.sentence))
                })
                .collect()
        };
        let regressions = sentences(|d, c| d.role != DatasetRole::General && c.regression);
        let reranker_regressions = sentences(|_, c| c.reranker_regression);
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
            verdict: None,
            merge: None,
            warnings: Vec::new(),
            date: None,
        }
    }

    /// Flags a general check that lost more than `rules` allow as a regression, and reaches
    /// the [`Verdict`].
    pub fn conclude(&mut self, rules: VerdictRules) {
        for dataset in self.datasets.iter_mut() {
            if dataset.role != DatasetRole::General {
                continue;
            }
            for comparison in dataset.comparisons.iter_mut() {
                let drop = -comparison.result.mean_difference;
                comparison.regression = comparison.metric == Metric::NDCG_10
                    && comparison.candidate == SystemKind::FineTuned.name()
                    && drop > rules.general_max_drop;
                if comparison.regression {
                    self.regressions.push(format!(
                        "{} (general check): {}; the drop {drop:.3} is more than the {:.3} allowed",
                        dataset.name, comparison.sentence, rules.general_max_drop
                    ));
                }
            }
        }
        self.regression = !self.regressions.is_empty();
        self.verdict = Verdict::judge(&self.datasets, rules);
    }

    /// Warns where the result rests on too little: few training examples or steps, a test set
    /// too small to decide, BM25 above the fine-tuned model, most queries dropped by a filter.
    pub fn warn_where_untrustworthy(&mut self, facts: &TrainingFacts) {
        let mut warnings = Vec::new();
        match (facts.examples, facts.steps) {
            (Some(examples), steps) if examples < few_examples(facts.parameters) => {
                warnings.push(format!(
                    "only {examples} training examples{}{}: too few to change a model \
                     reliably; give it more documents or a higher `query_gen.max_chunks`",
                    steps.map(|s| format!(" ({s} steps)")).unwrap_or_default(),
                    facts
                        .parameters
                        .map(|p| format!(" for a model of {:.0} M parameters", p as f64 / 1e6))
                        .unwrap_or_default()
                ));
            }
            (_, Some(steps)) if steps < FEW_STEPS => warnings.push(format!(
                "only {steps} training steps: too few for training to settle; more data, more \
                 `train.epochs` or a smaller `train.batch_size` give more"
            )),
            _ => {}
        }
        for dataset in &self.datasets {
            if dataset.role == DatasetRole::General {
                continue;
            }
            let queries = dataset.query_ids.len();
            if queries < FEW_QUERIES {
                let width = dataset
                    .headline_comparison()
                    .map(|c| {
                        format!(
                            " (its interval is {:.3} wide)",
                            c.result.interval.high - c.result.interval.low
                        )
                    })
                    .unwrap_or_default();
                let (what, remedy) = if dataset.role == DatasetRole::HeldOut {
                    (
                        "the held-out split".to_owned(),
                        "labelled questions of your own (`evaluate.datasets`) decide best",
                    )
                } else {
                    (
                        format!("`{}`", dataset.name),
                        "more labelled questions narrow the interval",
                    )
                };
                warnings.push(format!(
                    "{what} has only {queries} queries{width}: too few to tell a gain of a few \
                     points from noise; {remedy}"
                ));
            }
            let ndcg = |kind: SystemKind| {
                let top = dataset
                    .systems
                    .iter()
                    .filter(|s| s.kind == kind)
                    .max_by_key(|s| s.dimension)?;
                Some(top.metrics.get(&Metric::NDCG_10)?.mean)
            };
            if let (Some(bm25), Some(tuned)) = (ndcg(SystemKind::Bm25), ndcg(SystemKind::FineTuned))
                && bm25 > tuned + BM25_MARGIN
            {
                warnings.push(format!(
                    "on {}, keyword search (BM25) scores {bm25:.3} against the fine-tuned \
                     model's {tuned:.3}: these queries share words with their passages, which \
                     keywords match exactly. Queries copied from the text favour BM25 and real \
                     questions rarely do; keep keyword search beside the model (ragd's hybrid \
                     search), and prefer queries in other words (an LLM, `query_gen.query_types`)",
                    dataset.name
                ));
            }
        }
        for filter in &facts.filters {
            if filter.of >= 20 && filter.dropped * 2 > filter.of {
                warnings.push(format!(
                    "{}'s `{}` dropped {} of {} queries ({:.0}%): the queries are weak or the \
                     filter strict; its `dropped.jsonl` shows which and why",
                    filter.stage,
                    filter.filter,
                    filter.dropped,
                    filter.of,
                    100. * filter.dropped as f64 / filter.of as f64
                ));
            }
        }
        self.warnings = warnings.iter().map(|w| sentence(w)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PairedTestConfig {
        PairedTestConfig {
            resamples: 500,
            ..PairedTestConfig::default()
        }
    }

    /// A dataset of 30 queries whose base scores `base` and fine-tuned `base + gain` on each
    /// (nDCG@10), with a little per-query noise so the tests have something to weigh; extra
    /// base systems at other lengths come as `(tokens, shift)`.
    fn dataset(name: &str, role: DatasetRole, gain: f64, other_bases: &[(usize, f64)]) -> Dataset {
        let ids: Vec<String> = (0..30).map(|i| format!("q{i}")).collect();
        let base: Vec<f64> = (0..30)
            .map(|i| 0.4 + 0.3 * ((i % 5) as f64) / 4.0)
            .collect();
        let noise = |i: usize| if i.is_multiple_of(2) { 0.01 } else { -0.01 };
        let mut dataset = Dataset::new(name, 100, ids.clone());
        dataset.role = role;
        let mut add = |label: String, kind, values: Vec<f64>, tokens| {
            let spec = SystemSpec {
                label,
                kind,
                model: None,
                dimension: Some(384),
                reranker: None,
                max_seq_length: Some(tokens),
            };
            let scores = RunScores {
                query_ids: ids.clone(),
                values: BTreeMap::from([(Metric::NDCG_10, values)]),
            };
            dataset.add_system(spec, scores, &settings()).expect("adds");
        };
        add("base".to_owned(), SystemKind::Base, base.clone(), 256);
        for &(tokens, shift) in other_bases {
            let values = base.iter().map(|v| v + shift).collect();
            add(
                format!("base ({tokens} tokens)"),
                SystemKind::Base,
                values,
                tokens,
            );
        }
        let tuned = base
            .iter()
            .enumerate()
            .map(|(i, v)| v + gain + noise(i))
            .collect();
        add("fine-tuned".to_owned(), SystemKind::FineTuned, tuned, 128);
        dataset
            .compare_fine_tuned_with_base(&[Metric::NDCG_10], &settings())
            .expect("compares");
        dataset
    }

    fn concluded(datasets: Vec<Dataset>) -> Report {
        let mut report = Report::new("t", settings(), datasets, None);
        report.conclude(VerdictRules {
            general_max_drop: 0.02,
            queries_by_llm: false,
        });
        report
    }

    #[test]
    fn a_result_resting_on_little_says_why_and_the_advice_knows_an_llm_wrote_the_queries() {
        let mut mine = dataset("mine", DatasetRole::User, 0.0, &[]);
        let ids = mine.query_ids.clone();
        let bm25 = RunScores {
            query_ids: ids,
            values: BTreeMap::from([(Metric::NDCG_10, vec![0.9; 30])]),
        };
        let spec = SystemSpec {
            label: "BM25".to_owned(),
            kind: SystemKind::Bm25,
            model: None,
            dimension: None,
            reranker: None,
            max_seq_length: None,
        };
        mine.add_system(spec, bm25, &settings()).expect("adds");
        let mut report = Report::new("t", settings(), vec![mine], None);
        report.conclude(VerdictRules {
            general_max_drop: 0.02,
            queries_by_llm: true,
        });
        let next = &report.verdict.as_ref().expect("a verdict").next;
        assert!(
            !next.contains("strategies: [llm]") && next.contains("larger LLM"),
            "{next}"
        );
        let share = |filter: &str, dropped| FilterShare {
            stage: "judge".to_owned(),
            filter: filter.to_owned(),
            dropped,
            of: 215,
        };
        report.warn_where_untrustworthy(&TrainingFacts {
            examples: Some(96),
            parameters: Some(22_700_000),
            steps: Some(6),
            filters: vec![share("round_trip", 120), share("dedupe", 1)],
        });
        let warnings = report.warnings.join("\n");
        for expected in [
            "Only 96 training examples (6 steps) for a model of 23 M parameters",
            "`mine` has only 30 queries",
            "keyword search (BM25) scores 0.900",
            "Judge's `round_trip` dropped 120 of 215 queries (56%)",
        ] {
            assert!(
                warnings.contains(expected),
                "`{expected}` missing:\n{warnings}"
            );
        }
        assert_eq!(report.warnings.len(), 4, "{warnings}");
        assert!(
            report.warnings.iter().all(|w| w.ends_with('.')),
            "{warnings}"
        );
    }

    fn label(report: &Report) -> &str {
        report.verdict.as_ref().map_or("none", |v| v.label.as_str())
    }

    #[test]
    fn a_gain_on_the_users_questions_is_better() {
        let report = concluded(vec![
            dataset("held-out", DatasetRole::HeldOut, 0.0, &[]),
            dataset("mine", DatasetRole::User, 0.05, &[]),
            dataset("general check", DatasetRole::General, -0.01, &[]),
        ]);
        assert_eq!(label(&report), VERDICT_BETTER, "{:?}", report.verdict);
        let verdict = report.verdict.expect("a verdict");
        assert!(
            verdict.why.starts_with("On mine, fine-tuned beats base"),
            "{}",
            verdict.why
        );
        assert!(verdict.why.contains("general check"), "{}", verdict.why);
        assert!(!report.regression, "{:?}", report.regressions);
    }

    #[test]
    fn a_gain_on_synthetic_queries_alone_is_no_clear_difference() {
        let report = concluded(vec![
            dataset("held-out", DatasetRole::HeldOut, 0.05, &[]),
            dataset("mine", DatasetRole::User, 0.0, &[]),
        ]);
        assert_eq!(label(&report), VERDICT_NO_CLEAR_DIFFERENCE);
        let verdict = report.verdict.expect("a verdict");
        assert!(verdict.why.contains("synthetic"), "{}", verdict.why);
        assert!(verdict.next.contains("more chunks"), "{}", verdict.next);
        // Without a user dataset, the held-out split decides.
        let report = concluded(vec![dataset("held-out", DatasetRole::HeldOut, 0.05, &[])]);
        assert_eq!(label(&report), VERDICT_BETTER);
    }

    #[test]
    fn a_loss_anywhere_or_a_forgetful_general_check_is_worse() {
        let report = concluded(vec![
            dataset("held-out", DatasetRole::HeldOut, -0.05, &[]),
            dataset("mine", DatasetRole::User, 0.05, &[]),
        ]);
        assert_eq!(label(&report), VERDICT_WORSE);
        assert!(report.regression);

        let report = concluded(vec![
            dataset("mine", DatasetRole::User, 0.05, &[]),
            dataset("general check", DatasetRole::General, -0.05, &[]),
        ]);
        assert_eq!(label(&report), VERDICT_WORSE);
        let verdict = report.verdict.as_ref().expect("a verdict");
        assert!(verdict.why.contains("forgets"), "{}", verdict.why);
        assert!(report.regression);
        assert!(
            report
                .regressions
                .iter()
                .any(|r| r.contains("general check")),
            "{:?}",
            report.regressions
        );
        // A loss within the tolerance is no regression even when beyond noise.
        let report = concluded(vec![
            dataset("mine", DatasetRole::User, 0.05, &[]),
            dataset("general check", DatasetRole::General, -0.015, &[]),
        ]);
        assert_eq!(label(&report), VERDICT_BETTER, "{:?}", report.regressions);
        assert!(!report.regression, "{:?}", report.regressions);
        // No fine-tuned model, no verdict.
        let mut base_only = Dataset::new("mine", 1, Vec::new());
        base_only.role = DatasetRole::User;
        assert_eq!(label(&concluded(vec![base_only])), "none");
    }

    #[test]
    fn the_gain_is_counted_against_the_better_base_and_the_lengths_are_said() {
        // Base truncated at 128 tokens loses 0.03; the fine-tuned model gains 0.02 over the
        // base at 256: against the 128-token base it would look like 0.05.
        let report = concluded(vec![dataset(
            "mine",
            DatasetRole::User,
            0.02,
            &[(128, -0.03)],
        )]);
        let headline = report.datasets[0].headline_comparison().expect("compared");
        assert_eq!(headline.baseline, "base");
        assert!((headline.result.mean_difference - 0.02).abs() < 1e-9);
        let verdict = report.verdict.expect("a verdict");
        assert!(
            verdict.next.contains("run the base at 256 tokens")
                && verdict.next.contains("fine-tuned model at its 128 tokens"),
            "{}",
            verdict.next
        );
        // Old reports read without a verdict.
        let mut json: serde_json::Value =
            serde_json::from_str(&concluded(Vec::new()).to_json().expect("json")).expect("parses");
        json.as_object_mut().expect("an object").remove("verdict");
        assert_eq!(
            Report::from_json(&json.to_string()).expect("reads").verdict,
            None
        );
    }
}
