//! Information-retrieval metrics of one ranked list against a set of relevant documents, and
//! their table over a query set.
//!
//! The definitions are those of sentence-transformers' `InformationRetrievalEvaluator`
//! (`compute_metrics` and `compute_dcg_at_k`,
//! <https://github.com/huggingface/sentence-transformers/blob/7591d2eeb9e362b7937ccd19b1e2accb2af8b655/sentence_transformers/evaluation/InformationRetrievalEvaluator.py>),
//! so numbers here compare with numbers people get from Python. With `hits@k` the relevant
//! documents among the first `k` results and `R` the relevant set:
//!
//! | metric | per query |
//! |---|---|
//! | `accuracy@k` (hit rate) | 1 if `hits@k > 0`, else 0 |
//! | `precision@k` | `hits@k / k`, even when fewer than `k` results came back |
//! | `recall@k` | `hits@k / |R|` |
//! | `mrr@k` | `1 / rank` of the first relevant result within `k`, else 0 |
//! | `ndcg@k` | `Σ_{i<k, relevant} 1/log2(i+2)` over the ideal `Σ_{i<min(k,|R|)} 1/log2(i+2)` |
//! | `map@k` | `Σ_{i<k, relevant} precision@(i+1)` over `min(k, |R|)` |
//!
//! Relevance is binary (a qrels score above 0). A query with no relevant document is left out, as
//! upstream does. The aggregate is the mean over queries. The ranking is taken as given: the
//! indexes of [`crate::index`] break score ties by document position, where upstream leaves them
//! to the order of a heap.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::EvalError;

/// What a metric measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    /// Share of queries with at least one relevant result in the top `k` (hit rate).
    Accuracy,
    Precision,
    Recall,
    /// Mean reciprocal rank.
    Mrr,
    /// Normalised discounted cumulative gain.
    Ndcg,
    /// Mean average precision.
    Map,
}

impl MetricKind {
    const ALL: [Self; 6] = [
        Self::Accuracy,
        Self::Precision,
        Self::Recall,
        Self::Mrr,
        Self::Ndcg,
        Self::Map,
    ];

    /// The lowercase name in keys, as sentence-transformers writes it (`ndcg`).
    pub fn key(self) -> &'static str {
        match self {
            Self::Accuracy => "accuracy",
            Self::Precision => "precision",
            Self::Recall => "recall",
            Self::Mrr => "mrr",
            Self::Ndcg => "ndcg",
            Self::Map => "map",
        }
    }

    /// The name people read (`nDCG`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Accuracy => "Accuracy",
            Self::Precision => "Precision",
            Self::Recall => "Recall",
            Self::Mrr => "MRR",
            Self::Ndcg => "nDCG",
            Self::Map => "MAP",
        }
    }
}

/// A metric at a cut-off, written `ndcg@10` in JSON and `nDCG@10` for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Metric {
    pub kind: MetricKind,
    pub k: usize,
}

impl Metric {
    pub const ACCURACY_1: Self = Self::new(MetricKind::Accuracy, 1);
    pub const MRR_10: Self = Self::new(MetricKind::Mrr, 10);
    pub const NDCG_10: Self = Self::new(MetricKind::Ndcg, 10);
    pub const MAP_100: Self = Self::new(MetricKind::Map, 100);
    pub const RECALL_10: Self = Self::new(MetricKind::Recall, 10);
    pub const RECALL_100: Self = Self::new(MetricKind::Recall, 100);

    pub const fn new(kind: MetricKind, k: usize) -> Self {
        Self { kind, k }
    }

    /// The name people read: `nDCG@10`.
    pub fn label(self) -> String {
        format!("{}@{}", self.kind.label(), self.k)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.kind.key(), self.k)
    }
}

impl FromStr for Metric {
    type Err = EvalError;

    /// Parses `ndcg@10`; the name is case-insensitive and `k` must be at least 1.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unknown = || EvalError::UnknownMetric {
            text: text.to_owned(),
        };
        let (name, k) = text.split_once('@').ok_or_else(unknown)?;
        let kind = MetricKind::ALL
            .into_iter()
            .find(|kind| kind.key().eq_ignore_ascii_case(name))
            .ok_or_else(unknown)?;
        let k = k
            .parse::<usize>()
            .ok()
            .filter(|k| *k > 0)
            .ok_or_else(unknown)?;
        Ok(Self::new(kind, k))
    }
}

impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The metrics the evaluate stage reports: accuracy, precision and recall at 1, 3, 5, 10 and
/// 100, MRR@10, nDCG@10 and MAP@100. Upstream's defaults stop at 10 for the first three; recall@100
/// is added because it bounds what a reranker on top could recover.
pub fn default_metrics() -> Vec<Metric> {
    let cutoffs = [1, 3, 5, 10, 100];
    let mut metrics = Vec::new();
    for kind in [
        MetricKind::Accuracy,
        MetricKind::Precision,
        MetricKind::Recall,
    ] {
        metrics.extend(cutoffs.map(|k| Metric::new(kind, k)));
    }
    metrics.extend([Metric::MRR_10, Metric::NDCG_10, Metric::MAP_100]);
    metrics
}

/// How many results a search must return for `metrics`: the largest `k`.
pub fn max_k(metrics: &[Metric]) -> usize {
    metrics.iter().map(|metric| metric.k).max().unwrap_or(0)
}

/// Scores one query: the value of each of `metrics`, in order, for the ranked result ids
/// (best first, distinct) against the relevant ids. `None` when nothing is relevant, a query
/// upstream leaves out.
pub fn score_query<T: Eq + Hash>(
    ranked: &[T],
    relevant: &HashSet<T>,
    metrics: &[Metric],
) -> Option<Vec<f64>> {
    if relevant.is_empty() {
        return None;
    }
    let depth = ranked.len().min(max_k(metrics));
    let is_relevant: Vec<bool> = ranked[..depth]
        .iter()
        .map(|id| relevant.contains(id))
        .collect();
    let num_relevant = relevant.len() as f64;
    let values = metrics
        .iter()
        .map(|metric| {
            let top = &is_relevant[..depth.min(metric.k)];
            let hits = top.iter().filter(|hit| **hit).count() as f64;
            match metric.kind {
                MetricKind::Accuracy => f64::from(u8::from(hits > 0.0)),
                MetricKind::Precision => hits / metric.k as f64,
                MetricKind::Recall => hits / num_relevant,
                MetricKind::Mrr => top
                    .iter()
                    .position(|hit| *hit)
                    .map_or(0.0, |rank| 1.0 / (rank + 1) as f64),
                MetricKind::Ndcg => {
                    let dcg: f64 = top
                        .iter()
                        .enumerate()
                        .filter(|(_, hit)| **hit)
                        .map(|(rank, _)| discount(rank))
                        .sum();
                    let ideal: f64 = (0..relevant.len().min(metric.k)).map(discount).sum();
                    dcg / ideal
                }
                MetricKind::Map => {
                    let mut found = 0.0;
                    let mut sum_precision = 0.0;
                    for (rank, hit) in top.iter().enumerate() {
                        if *hit {
                            found += 1.0;
                            sum_precision += found / (rank + 1) as f64;
                        }
                    }
                    sum_precision / relevant.len().min(metric.k) as f64
                }
            }
        })
        .collect();
    Some(values)
}

/// The DCG discount of 0-based `rank`.
fn discount(rank: usize) -> f64 {
    1.0 / ((rank + 2) as f64).log2()
}

/// One system's metric values on each query of a query set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunScores {
    /// The queries scored, in order; those without a relevant document are not among them.
    pub query_ids: Vec<String>,
    /// Each metric's value per query, aligned with `query_ids`.
    pub values: BTreeMap<Metric, Vec<f64>>,
}

impl RunScores {
    /// Scores each `(query id, ranked ids, relevant ids)` on `metrics`, leaving out queries
    /// with nothing relevant.
    pub fn evaluate<'a, T, I>(queries: I, metrics: &[Metric]) -> Self
    where
        T: Eq + Hash + 'a,
        I: IntoIterator<Item = (&'a str, &'a [T], &'a HashSet<T>)>,
    {
        let mut query_ids = Vec::new();
        let mut columns: Vec<Vec<f64>> = vec![Vec::new(); metrics.len()];
        for (query_id, ranked, relevant) in queries {
            if let Some(values) = score_query(ranked, relevant, metrics) {
                query_ids.push(query_id.to_owned());
                for (column, value) in columns.iter_mut().zip(values) {
                    column.push(value);
                }
            }
        }
        Self {
            query_ids,
            values: metrics.iter().copied().zip(columns).collect(),
        }
    }

    /// The mean of `metric` over the queries; `None` for a metric not scored or no queries.
    pub fn mean(&self, metric: Metric) -> Option<f64> {
        let values = self.values.get(&metric)?;
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::DenseIndex;

    fn set(ids: &[u32]) -> HashSet<u32> {
        ids.iter().copied().collect()
    }

    fn metric(text: &str) -> Metric {
        text.parse().expect("a valid metric name")
    }

    fn assert_values(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn parses_and_prints_metric_names() {
        assert_eq!(metric("ndcg@10"), Metric::NDCG_10);
        assert_eq!(metric("nDCG@10").to_string(), "ndcg@10");
        assert_eq!(Metric::NDCG_10.label(), "nDCG@10");
        for bad in ["ndcg", "ndcg@0", "ndcg@x", "f1@10", "@10"] {
            assert!(bad.parse::<Metric>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&Metric::MAP_100).expect("a metric serialises");
        assert_eq!(json, "\"map@100\"");
        assert_eq!(
            serde_json::from_str::<Metric>(&json).expect("a metric deserialises"),
            Metric::MAP_100
        );
    }

    #[test]
    fn default_metrics_reach_100() {
        let metrics = default_metrics();
        assert_eq!(metrics.len(), 18);
        assert_eq!(max_k(&metrics), 100);
        assert!(metrics.contains(&metric("recall@100")));
    }

    #[test]
    fn two_relevant_documents_in_a_ranking() {
        // Relevant: 7 and 9. Ranked: 3, 7, 5, 9, 1 — hits at ranks 2 and 4.
        let metrics: Vec<Metric> = [
            "accuracy@1",
            "accuracy@3",
            "precision@1",
            "precision@3",
            "precision@10",
            "recall@1",
            "recall@3",
            "recall@5",
            "mrr@1",
            "mrr@10",
            "ndcg@3",
            "ndcg@10",
            "map@3",
            "map@10",
        ]
        .map(metric)
        .to_vec();
        let values = score_query(&[3, 7, 5, 9, 1], &set(&[7, 9]), &metrics).expect("relevant");
        let log2_3 = 3f64.log2();
        let ideal = 1.0 + 1.0 / log2_3;
        assert_values(
            &values,
            &[
                0.0,
                1.0,
                0.0,
                1.0 / 3.0,
                2.0 / 10.0,
                0.0,
                0.5,
                1.0,
                0.0,
                0.5,
                (1.0 / log2_3) / ideal,
                (1.0 / log2_3 + 1.0 / 5f64.log2()) / ideal,
                (1.0 / 2.0) / 2.0,
                (1.0 / 2.0 + 2.0 / 4.0) / 2.0,
            ],
        );
    }

    #[test]
    fn relevant_documents_missing_from_the_results() {
        // Three relevant, only 4 retrieved at rank 1; 5 and 6 never come back.
        let metrics = ["recall@10", "ndcg@10", "map@10", "map@1", "precision@10"].map(metric);
        let values = score_query(&[4, 2, 8], &set(&[4, 5, 6]), &metrics).expect("relevant");
        let ideal = 1.0 + 1.0 / 3f64.log2() + 0.5;
        assert_values(&values, &[1.0 / 3.0, 1.0 / ideal, 1.0 / 3.0, 1.0, 0.1]);
        // Nothing relevant retrieved at all.
        let values = score_query(&[1, 2], &set(&[5]), &metrics).expect("relevant");
        assert_values(&values, &[0.0; 5]);
        // Nothing relevant exists: upstream leaves the query out.
        assert_eq!(score_query(&[1, 2], &set(&[]), &metrics), None);
    }

    #[test]
    fn means_over_queries_leave_out_queries_without_relevance() {
        let metrics = [Metric::MRR_10, metric("accuracy@1")];
        let (r1, r2, r3) = (set(&[1]), set(&[2]), set(&[]));
        let runs: [(&str, &[u32], &HashSet<u32>); 3] = [
            ("q1", &[1, 2, 3], &r1),
            ("q2", &[1, 3, 2], &r2),
            ("q3", &[1], &r3),
        ];
        let scores = RunScores::evaluate(runs, &metrics);
        assert_eq!(scores.query_ids, ["q1", "q2"]);
        assert_eq!(scores.values[&Metric::MRR_10], [1.0, 1.0 / 3.0]);
        assert_eq!(scores.mean(Metric::MRR_10), Some(2.0 / 3.0));
        assert_eq!(scores.mean(metric("accuracy@1")), Some(0.5));
        assert_eq!(scores.mean(Metric::NDCG_10), None);
    }

    #[test]
    fn tied_scores_rank_by_position_before_scoring() {
        // Documents 0, 2 and 4 are the same vector, so they tie for second place behind 1. The
        // index ranks ties by position, so the relevant document 4 comes fourth, not second.
        let docs = vec![
            0.6, 0.8, // 0
            1.0, 0.0, // 1
            0.6, 0.8, // 2
            0.0, 1.0, // 3
            0.6, 0.8, // 4
        ];
        let index = DenseIndex::new(2, docs).expect("unit vectors");
        let hits = index
            .search_batch(&[1.0, 0.0], 5, &|_| {})
            .expect("the search succeeds");
        let ranked: Vec<usize> = hits[0].iter().map(|hit| hit.doc).collect();
        assert_eq!(ranked, [1, 0, 2, 4, 3]);
        let relevant: HashSet<usize> = [4].into();
        let values =
            score_query(&ranked, &relevant, &[Metric::MRR_10, Metric::NDCG_10]).expect("relevant");
        assert_values(&values, &[0.25, 1.0 / 5f64.log2()]);
    }
}
