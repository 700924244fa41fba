//! Training a cross-encoder reranker: each step takes a batch of queries, scores each one's
//! positive and mined negatives together ([`CrossEncoder::forward`]), minimises a
//! [`RerankLoss`], clips, and takes an AdamW step on the schedule the bi-encoder uses
//! ([`super::optim`]).
//!
//! Early stopping: rerankers peak mid-training and then overfit the few mined negatives
//! (FlagEmbedding issues #707 and #291), so every `eval_every` steps (and before the first) the
//! held-out queries are scored: the mean reciprocal rank of each positive among its own group.
//! The best weights are kept in memory and restored at the end; `patience` evaluations without
//! improvement end the run early.
//!
//! A batch is computed in parts of `mini_batch_size` queries whose gradients add up to the whole
//! batch's (the losses are sums divided by the batch's count), so memory holds one part's graph.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::TrainError;
use super::optim::{self, AdamW, AdamWConfig, Param, Schedule};
use super::rerank_loss::RerankLoss;
use super::trainer::{clip_and_step, peak_rss_bytes};
use crate::model::cross_encoder::CrossEncoder;
use crate::model::error::{CandleContext, ModelError};
use crate::model::tokenize::PairIds;

/// A query's pairs, tokenized: with its positive passage, then with each negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RerankExample {
    pub positive: PairIds,
    pub negatives: Vec<PairIds>,
}

impl RerankExample {
    fn pairs(&self) -> impl Iterator<Item = &PairIds> {
        std::iter::once(&self.positive).chain(&self.negatives)
    }

    fn group_size(&self) -> usize {
        1 + self.negatives.len()
    }
}

/// Everything that decides what a reranker run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankConfig {
    pub epochs: u64,
    /// Queries per optimiser step (each brings its positive and negatives).
    pub batch_size: usize,
    /// Queries run through the model with a graph at once.
    pub mini_batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    pub loss: RerankLoss,
    /// Seeds the order of queries and the dropout masks.
    pub seed: u64,
    pub dropout: bool,
    pub max_steps: Option<u64>,
    /// Score the held-out queries every this many steps; `None` never (no early stopping).
    pub eval_every: Option<u64>,
    /// Stop after this many evaluations without a better held-out score; `None` never stops early.
    pub patience: Option<u64>,
    /// Pairs per batch when scoring the held-out queries.
    pub eval_batch_size: usize,
}

impl Default for RerankConfig {
    /// sentence-transformers' cross-encoder fine-tuning defaults where it has them.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            mini_batch_size: 8,
            learning_rate: 2e-5,
            warmup_ratio: 0.1,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            loss: RerankLoss::default(),
            seed: 42,
            dropout: true,
            max_steps: None,
            eval_every: Some(50),
            patience: Some(3),
            eval_batch_size: 32,
        }
    }
}

impl RerankConfig {
    /// Refuses values that cannot train.
    pub fn check(&self) -> Result<(), TrainError> {
        let invalid = |name, why: &str| {
            Err(TrainError::InvalidConfig {
                name,
                why: why.to_owned(),
            })
        };
        if self.epochs == 0 {
            return invalid("epochs", "must be at least 1");
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1");
        }
        if self.mini_batch_size == 0 {
            return invalid("mini_batch_size", "must be at least 1");
        }
        if self.eval_batch_size == 0 {
            return invalid("eval_batch_size", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.) {
            return invalid("learning_rate", "must be a positive number");
        }
        if !(0. ..1.).contains(&self.warmup_ratio) {
            return invalid("warmup_ratio", "must be in [0, 1)");
        }
        if self.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.) {
            return invalid("max_grad_norm", "must be positive");
        }
        if self.max_steps == Some(0) {
            return invalid("max_steps", "must be at least 1");
        }
        if self.eval_every == Some(0) {
            return invalid("eval_every", "must be at least 1 step");
        }
        if self.patience == Some(0) {
            return invalid("patience", "must be at least 1 evaluation");
        }
        Ok(())
    }
}

/// One optimiser step; a line of the reranker's training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankStep {
    /// 1-based.
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall time of the step.
    pub seconds: f64,
    pub pairs: usize,
}

/// One scoring of the held-out queries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RerankEval {
    /// The step after which it was taken (0: before training).
    pub step: u64,
    /// Mean reciprocal rank of each positive among its group.
    pub mrr: f64,
}

/// How a reranker run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankOutcome {
    pub log: Vec<RerankStep>,
    pub evals: Vec<RerankEval>,
    /// The evaluation whose weights the model holds now.
    pub best: Option<RerankEval>,
    pub steps_run: u64,
    /// The steps the schedule planned (more than `steps_run` when stopped early).
    pub steps_planned: u64,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl RerankOutcome {
    pub fn final_loss(&self) -> Option<f64> {
        self.log.last().map(|r| r.loss)
    }

    /// Median seconds per optimiser step.
    pub fn median_step_seconds(&self) -> Option<f64> {
        let mut seconds: Vec<f64> = self.log.iter().map(|r| r.seconds).collect();
        seconds.sort_by(f64::total_cmp);
        seconds.get(seconds.len() / 2).copied()
    }
}

/// Trains one cross-encoder with one configuration.
#[derive(Debug)]
pub struct RerankTrainer<'a> {
    model: &'a CrossEncoder,
    config: RerankConfig,
    optimizer: AdamW,
}

impl<'a> RerankTrainer<'a> {
    pub fn new(model: &'a CrossEncoder, config: RerankConfig) -> Result<Self, TrainError> {
        config.check()?;
        let params = model
            .named_vars()
            .into_iter()
            .map(|(name, var)| {
                let decay = optim::decays(&name);
                Param::new(name.clone(), var, decay)
                    .during(|| format!("allocating the optimiser state of `{name}`"))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            model,
            optimizer: AdamW::new(config.adamw, params),
            config,
        })
    }

    /// The steps a run over `examples` plans (before any early stop).
    pub fn planned_steps(&self, examples: &[RerankExample]) -> u64 {
        let per_epoch = examples.len().div_ceil(self.config.batch_size) as u64;
        let total = per_epoch * self.config.epochs;
        self.config.max_steps.map_or(total, |max| total.min(max))
    }

    /// Trains on `train`, evaluating on `heldout` (early stopping; an empty `heldout` turns it
    /// off). `on_step` sees each step; `ControlFlow::Break` stops with [`TrainError::Stopped`].
    pub fn run(
        &mut self,
        train: &[RerankExample],
        heldout: &[RerankExample],
        on_step: &mut dyn FnMut(&RerankStep, Option<&RerankEval>) -> ControlFlow<()>,
    ) -> Result<RerankOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::NoBatches {
                why: "no training queries".to_owned(),
            });
        }
        let total = self.planned_steps(train);
        let schedule = Schedule::new(self.config.learning_rate, self.config.warmup_ratio, total);
        let eval_every = self.config.eval_every.filter(|_| !heldout.is_empty());
        let mut evals = Vec::new();
        let mut best: Option<(RerankEval, Vec<Tensor>)> = None;
        let mut since_best = 0;
        if eval_every.is_some() {
            let first = self.evaluate(heldout, 0)?;
            evals.push(first);
            best = Some((first, self.snapshot()?));
        }
        let mut log = Vec::new();
        let mut train_seconds = 0.;
        let mut stopped_early = false;
        let mut step = 0;
        'epochs: for epoch in 0..self.config.epochs {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.config.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            for batch in order.chunks(self.config.batch_size) {
                if step >= total {
                    break 'epochs;
                }
                step += 1;
                let started = Instant::now();
                let examples: Vec<&RerankExample> = batch.iter().map(|&i| &train[i]).collect();
                let (loss, grads) = self.gradients(&examples, step)?;
                if !loss.is_finite() {
                    return Err(TrainError::NotFinite {
                        step,
                        what: "loss",
                        value: loss,
                    });
                }
                let lr = schedule.lr(step);
                let grad_norm = self.apply(grads, lr, step)?;
                let seconds = started.elapsed().as_secs_f64();
                train_seconds += seconds;
                let record = RerankStep {
                    step,
                    epoch,
                    loss,
                    lr,
                    grad_norm,
                    seconds,
                    pairs: examples.iter().map(|e| e.group_size()).sum(),
                };
                log.push(record.clone());
                let mut eval = None;
                if let Some(every) = eval_every
                    && (step % every == 0 || step == total)
                {
                    let score = self.evaluate(heldout, step)?;
                    evals.push(score);
                    eval = Some(score);
                    if best.as_ref().is_none_or(|(b, _)| score.mrr > b.mrr) {
                        best = Some((score, self.snapshot()?));
                        since_best = 0;
                    } else {
                        since_best += 1;
                    }
                }
                if on_step(&record, eval.as_ref()).is_break() {
                    return Err(TrainError::Stopped { step });
                }
                if self.config.patience.is_some_and(|p| since_best >= p) {
                    stopped_early = step < total;
                    break 'epochs;
                }
            }
        }
        let best = match best {
            Some((eval, weights)) => {
                self.restore(&weights)?;
                Some(eval)
            }
            None => None,
        };
        Ok(RerankOutcome {
            log,
            evals,
            best,
            steps_run: step,
            steps_planned: total,
            stopped_early,
            train_seconds,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }

    /// The loss of `batch` and every parameter's gradient (in the optimiser's order); `step`
    /// seeds the dropout masks.
    pub fn gradients(
        &self,
        batch: &[&RerankExample],
        step: u64,
    ) -> Result<(f64, Vec<Tensor>), TrainError> {
        let loss_kind = self.config.loss;
        let denominator = loss_kind.denominator(batch.iter().map(|e| e.group_size()));
        if self.config.dropout {
            self.model.bert().reseed_dropout(self.config.seed ^ step);
        }
        let mut sums: Vec<Option<Tensor>> = vec![None; self.optimizer.params.len()];
        let mut loss_value = 0.;
        for part in batch.chunks(self.config.mini_batch_size) {
            let pairs: Vec<&PairIds> = part.iter().flat_map(|e| e.pairs()).collect();
            let input = self.model.batch(&pairs)?;
            let logits = self.model.forward(&input, self.config.dropout)?;
            let mut groups = Vec::with_capacity(part.len());
            let mut offset = 0;
            for example in part {
                let size = example.group_size();
                groups.push(
                    logits
                        .narrow(0, offset, size)
                        .during(|| "splitting the logits".to_owned())?,
                );
                offset += size;
            }
            let loss = loss_kind
                .loss(&groups, denominator)
                .during(|| "the reranker loss".to_owned())?;
            loss_value += f64::from(
                loss.to_scalar::<f32>()
                    .during(|| "reading the loss".to_owned())?,
            );
            let store = loss.backward().during(|| "the backward pass".to_owned())?;
            for (sum, param) in sums.iter_mut().zip(&self.optimizer.params) {
                if let Some(grad) = store.get(param.var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(total) => (total + grad).during(|| "adding gradients".to_owned())?,
                        None => grad.clone(),
                    });
                }
            }
        }
        let grads = sums
            .into_iter()
            .zip(&self.optimizer.params)
            .map(|(sum, param)| {
                sum.ok_or_else(|| TrainError::NoGradient {
                    name: param.name.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((loss_value, grads))
    }

    fn apply(&mut self, grads: Vec<Tensor>, lr: f64, step: u64) -> Result<f64, TrainError> {
        clip_and_step(
            &mut self.optimizer,
            grads,
            (lr, self.config.max_grad_norm),
            step,
        )
    }

    /// The mean reciprocal rank of each held-out positive among its group (ties count against
    /// the positive).
    fn evaluate(&self, heldout: &[RerankExample], step: u64) -> Result<RerankEval, TrainError> {
        Ok(RerankEval {
            step,
            mrr: group_mrr(self.model, heldout, self.config.eval_batch_size)?,
        })
    }

    /// A copy of every parameter's values.
    fn snapshot(&self) -> Result<Vec<Tensor>, TrainError> {
        self.optimizer
            .params
            .iter()
            .map(|p| {
                p.var
                    .as_detached_tensor()
                    .copy()
                    .during(|| format!("keeping `{}`", p.name))
            })
            .collect::<Result<_, ModelError>>()
            .map_err(TrainError::from)
    }

    fn restore(&self, weights: &[Tensor]) -> Result<(), TrainError> {
        for (param, value) in self.optimizer.params.iter().zip(weights) {
            param
                .var
                .set(value)
                .during(|| format!("restoring `{}`", param.name))?;
        }
        Ok(())
    }
}

/// The mean over `examples` of 1 / (rank of the positive among its group by `model`'s scores),
/// a tie ranking the positive below the negative it ties.
pub fn group_mrr(
    model: &CrossEncoder,
    examples: &[RerankExample],
    batch_size: usize,
) -> Result<f64, TrainError> {
    if examples.is_empty() {
        return Ok(0.);
    }
    let pairs: Vec<PairIds> = examples.iter().flat_map(|e| e.pairs().cloned()).collect();
    let scores = model.score_ids(&pairs, batch_size, &mut |_| {})?;
    let mut offset = 0;
    let mut total = 0.;
    for example in examples {
        let group = &scores[offset..offset + example.group_size()];
        let rank = 1 + group[1..].iter().filter(|&&s| s >= group[0]).count();
        total += 1. / rank as f64;
        offset += example.group_size();
    }
    Ok(total / examples.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named() {
        for (config, name) in [
            (
                RerankConfig {
                    epochs: 0,
                    ..RerankConfig::default()
                },
                "epochs",
            ),
            (
                RerankConfig {
                    eval_every: Some(0),
                    ..RerankConfig::default()
                },
                "eval_every",
            ),
            (
                RerankConfig {
                    patience: Some(0),
                    ..RerankConfig::default()
                },
                "patience",
            ),
            (
                RerankConfig {
                    learning_rate: f64::NAN,
                    ..RerankConfig::default()
                },
                "learning_rate",
            ),
        ] {
            match config.check() {
                Err(TrainError::InvalidConfig { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(RerankConfig::default().check().is_ok());
    }
}
