//! The plan's cost on this machine: each stage that will run asked for its estimate, in order,
//! with the sizes upstream hands it — counted from the artifact where a stage is cached, guessed
//! by the upstream stage's own estimate where it is not.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::Plan;
use crate::cache::store::Store;
use crate::error_chain;
use crate::stages::estimate::{Basis, Estimate, EstimateInput, Sizes, Speeds};
use crate::stages::io::{CHUNKS_FILE, QUERIES_FILE, SECOND_ROUND_FILE, TRAIN_FILE, count_lines};
use crate::stages::{Artifact, StageEnv};

/// One stage's line of the estimate.
#[derive(Debug, Clone, Serialize)]
pub struct StageEstimate {
    pub stage: String,
    /// `None` for a cached stage, or one whose estimate failed (`problem` says why).
    pub estimate: Option<Estimate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The whole plan's estimate.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEstimate {
    pub stages: Vec<StageEstimate>,
    /// Stages run one after the other: their seconds add up, their memory does not.
    pub seconds: f64,
    pub peak_bytes: u64,
    /// The weakest basis among the stages that make up a tenth or more of the time.
    pub basis: Basis,
}

impl PlanEstimate {
    /// Estimates every stage of `plan` that will run. A stage whose estimate fails (a model
    /// that cannot be loaded) is reported with its problem; the others are still estimated.
    pub fn of(
        plan: &Plan,
        store: &Store,
        env_for: &dyn Fn(&'static str) -> StageEnv,
        speeds: &Speeds,
    ) -> Self {
        let mut after: Vec<Sizes> = Vec::with_capacity(plan.stages.len());
        let mut stages = Vec::with_capacity(plan.stages.len());
        for planned in &plan.stages {
            let sizes = planned
                .inputs
                .values()
                .fold(Sizes::default(), |sizes, &p| merged(sizes, after[p]));
            let (estimate, problem, out) = if planned.status.is_cached() {
                let dir = store.artifact_dir(&planned.key);
                let out = counted(sizes, planned.spec.produces, &dir);
                (None, None, out)
            } else {
                let env = env_for(planned.spec.kind);
                let input = EstimateInput {
                    env: &env,
                    speeds,
                    sizes,
                };
                match planned.stage.estimate(&input) {
                    Ok(estimate) => {
                        let out = estimate.sizes;
                        (Some(estimate), None, out)
                    }
                    Err(error) => (None, Some(error_chain(&error)), sizes),
                }
            };
            after.push(out);
            stages.push(StageEstimate {
                stage: planned.spec.kind.to_owned(),
                estimate,
                problem,
            });
        }
        let estimates = || stages.iter().filter_map(|s| s.estimate.as_ref());
        let seconds: f64 = estimates().map(|e| e.seconds).sum();
        let peak_bytes = estimates().map(|e| e.peak_bytes).max().unwrap_or(0);
        let basis = estimates()
            .filter(|e| e.seconds >= seconds / 10.)
            .map(|e| e.basis)
            .max()
            .unwrap_or(Basis::Measured);
        Self {
            stages,
            seconds,
            peak_bytes,
            basis,
        }
    }
}

/// Sizes from two upstream stages: what one knows fills what the other does not.
fn merged(a: Sizes, b: Sizes) -> Sizes {
    Sizes {
        chunks: a.chunks.or(b.chunks),
        chunk_tokens: a.chunk_tokens.or(b.chunk_tokens),
        queries: a.queries.or(b.queries),
        examples: a.examples.or(b.examples),
        negatives: a.negatives.or(b.negatives),
        rounds: a.rounds.or(b.rounds),
    }
}

/// `sizes` with what a cached artifact of kind `artifact` in `dir` holds, counted.
fn counted(sizes: Sizes, artifact: Artifact, dir: &Path) -> Sizes {
    match artifact {
        Artifact::Chunks => {
            let (chunks, chunk_tokens) = chunk_counts(&dir.join(CHUNKS_FILE));
            Sizes {
                chunks: Some(chunks),
                chunk_tokens,
                ..sizes
            }
        }
        Artifact::Queries => Sizes {
            queries: Some(count_lines(&dir.join(QUERIES_FILE))),
            ..sizes
        },
        Artifact::TrainingData => {
            let train = dir.join(TRAIN_FILE);
            Sizes {
                examples: Some(count_lines(&train)),
                negatives: Some(first_negatives(&train)),
                rounds: Some(if dir.join(SECOND_ROUND_FILE).is_file() {
                    2
                } else {
                    1
                }),
                ..sizes
            }
        }
        _ => sizes,
    }
}

/// Chunks in a chunks file, and their mean tokens.
fn chunk_counts(path: &Path) -> (u64, Option<u64>) {
    #[derive(serde::Deserialize)]
    struct Counted {
        n_tokens: u64,
    }
    let Ok(text) = fs_err::read_to_string(path) else {
        return (0, None);
    };
    let tokens: Vec<u64> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Counted>(line).ok())
        .map(|c| c.n_tokens)
        .collect();
    let mean = (!tokens.is_empty()).then(|| tokens.iter().sum::<u64>() / tokens.len() as u64);
    (tokens.len() as u64, mean)
}

/// Negatives of the first training example in `path` (mine gives each the same number).
fn first_negatives(path: &Path) -> u64 {
    use std::io::BufRead;
    let Ok(file) = fs_err::File::open(path) else {
        return 0;
    };
    std::io::BufReader::new(file)
        .lines()
        .next()
        .and_then(Result::ok)
        .and_then(|line| serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&line).ok())
        .and_then(|record| record.get("negatives")?.as_array().map(Vec::len))
        .unwrap_or(0) as u64
}
