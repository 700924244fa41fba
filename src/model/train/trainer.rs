//! The training loop: batches from the sampler, gradients of the ranking loss (directly, or by
//! GradCache when a batch is larger than what fits in one pass), clipping, AdamW, the schedule,
//! per-step records and checkpoints in a journal for resuming.
//!
//! GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
//! Setup"; sentence-transformers' CachedMultipleNegativesRankingLoss): embed every mini-batch
//! without keeping its graph, compute the loss and its gradient with respect to the embeddings,
//! then run each mini-batch again with its graph and backpropagate `sum(embedding * gradient)`.
//! The parameter gradients are those of the whole batch; memory holds one mini-batch's graph.
//! Both passes of a mini-batch draw the same dropout masks (the model's stream is reseeded).

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::error::TrainError;
use super::journal::{self, Loaded, Snapshot};
use super::loss::{BatchLabels, TeacherMargins};
use super::optim::{self, AdamW, Param, Schedule};
use super::sampler::{self, SamplerConfig};
use super::{TokenizedExample, TrainConfig};
use crate::model::bert::Bert;
use crate::model::error::{CandleContext, ModelError};
use crate::model::pooling::Pooling;

/// Clips `grads` to `max_grad_norm` (if any), then takes one `optimizer` step at `lr`; returns
/// the norm before clipping, which must be finite.
pub(crate) fn clip_and_step(
    optimizer: &mut AdamW,
    grads: Vec<Tensor>,
    (lr, max_grad_norm): (f64, Option<f64>),
    step: u64,
) -> Result<f64, TrainError> {
    let norm = optim::global_norm(&grads).during(|| "the gradient norm".to_owned())?;
    if !norm.is_finite() {
        return Err(TrainError::NotFinite {
            step,
            what: "gradient norm",
            value: norm,
        });
    }
    let grads = match max_grad_norm {
        Some(max) => optim::clip(grads, norm, max).during(|| "clipping".to_owned())?,
        None => grads,
    };
    optimizer
        .step(&grads, lr)
        .during(|| "the optimiser step".to_owned())?;
    Ok(norm)
}

/// What one optimiser step did; one line of the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based.
    pub step: u64,
    /// 0-based.
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    pub examples_per_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Every step's record, those before a resume included.
    pub log: Vec<StepRecord>,
    pub total_steps: u64,
    /// The checkpoint step this run resumed from.
    pub resumed_from: Option<u64>,
    /// Wall time of the steps, summed over resumed runs.
    pub train_seconds: f64,
    /// The process's peak resident memory (`getrusage`), if the platform reports it.
    pub peak_rss_bytes: Option<u64>,
}

impl TrainOutcome {
    pub fn final_loss(&self) -> Option<f64> {
        self.log.last().map(|r| r.loss)
    }
}

/// The model being trained: its transformer and pooling (those of a
/// [`crate::model::encoder::SentenceEncoder`]).
#[derive(Debug, Clone, Copy)]
pub struct TrainModel<'a> {
    pub bert: &'a Bert,
    pub pooling: &'a Pooling,
}

/// Trains one model with one configuration.
#[derive(Debug)]
pub struct Trainer<'a> {
    model: TrainModel<'a>,
    config: TrainConfig,
    optimizer: AdamW,
    /// GISTEmbed's guide (see [`super::loss::guide_mask`]), when `loss.guide_margin` is set.
    guide: Option<TrainModel<'a>>,
}

impl<'a> Trainer<'a> {
    pub fn new(model: TrainModel<'a>, config: TrainConfig) -> Result<Self, TrainError> {
        config.check()?;
        let dim = model.pooling.output_dim(model.bert.config().hidden_size);
        if let Some(dims) = &config.loss.matryoshka_dims
            && let Some(&bad) = dims.iter().find(|&&d| d > dim)
        {
            return Err(TrainError::InvalidConfig {
                name: "matryoshka_dims",
                why: format!("{bad} is above the model's embedding dimension {dim}"),
            });
        }
        let vars = model.bert.named_vars();
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = config.decay_all || optim::decays(&name);
                Param::new(name.clone(), var, decay)
                    .during(|| format!("allocating the optimiser state of `{name}`"))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            model,
            optimizer: AdamW::new(config.adamw, params),
            config,
            guide: None,
        })
    }

    /// Trains with `guide`, a frozen model that masks likely false negatives out of the loss;
    /// the configuration's `loss.guide_margin` must be set.
    pub fn with_guide(mut self, guide: TrainModel<'a>) -> Result<Self, TrainError> {
        if self.config.loss.guide_margin.is_none() {
            return Err(TrainError::InvalidConfig {
                name: "guide",
                why: "a guide needs `loss.guide_margin`".to_owned(),
            });
        }
        self.guide = Some(guide);
        Ok(self)
    }

    /// The guide's mask of `groups` (anchors, candidates; `extra` the anchors' other right
    /// answers), or `None` without a guide.
    fn guide_mask(
        &self,
        groups: &[Vec<&[u32]>; 2],
        extra: &[Vec<usize>],
    ) -> Result<Option<Tensor>, TrainError> {
        let (Some(guide), Some(margin)) = (&self.guide, self.config.loss.guide_margin) else {
            return Ok(None);
        };
        let mini = self.config.mini_batch_size;
        let mut embedded = Vec::with_capacity(2);
        for rows in groups {
            let mut parts = Vec::new();
            for chunk in rows.chunks(mini) {
                let bert = guide.bert;
                let (ids, mask) = pad(chunk, bert.config().pad_token_id, bert.device())?;
                let hidden = bert.forward_no_grad(&ids, &mask)?;
                parts.push(guide.pooling.forward(&hidden, &mask)?);
            }
            embedded.push(
                Tensor::cat(&parts, 0).during(|| "joining the guide's embeddings".to_owned())?,
            );
        }
        let mask = super::loss::guide_mask(&embedded[0], &embedded[1], margin, extra)
            .and_then(|m| m.to_device(self.model.bert.device()))
            .during(|| "the guide's mask".to_owned())?;
        Ok(Some(mask))
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The parameters with their optimiser state, by name.
    pub fn params(&self) -> &[Param] {
        &self.optimizer.params
    }

    /// Runs training to the end (or to `config.max_steps`), resuming from the newest usable
    /// checkpoint in `journal`, and saving one there every `config.checkpoint_every` steps.
    /// `on_step` sees each step's record; `ControlFlow::Break` stops the run with
    /// [`TrainError::Stopped`] (the journal keeps the last checkpoint).
    pub fn run(
        &mut self,
        examples: &[TokenizedExample],
        journal_dir: Option<&Path>,
        on_step: &mut dyn FnMut(&StepRecord) -> ControlFlow<()>,
    ) -> Result<TrainOutcome, TrainError> {
        let total_steps = self.total_steps(examples)?;
        let schedule = Schedule::new(
            self.config.learning_rate,
            self.config.warmup_ratio,
            total_steps,
        );
        let fingerprint = fingerprint(&self.config, examples)?;

        let mut log = Vec::new();
        let mut resumed_from = None;
        let mut train_seconds = 0.;
        if let Some(dir) = journal_dir
            && let Some(snapshot) = journal::latest(dir, &fingerprint)?
        {
            self.restore(&snapshot)?;
            resumed_from = Some(snapshot.state.step);
            train_seconds = snapshot.state.train_seconds;
            log = snapshot.state.log;
        }
        let start = resumed_from.unwrap_or(0);
        let mut plan = self.batches(examples).skip(start as usize);
        for step in start + 1..=total_steps {
            let started = Instant::now();
            let Some((epoch, indices)) = plan.next() else {
                break;
            };
            let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
            let (loss, grads) = self.gradients(&batch, step)?;
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
            let record = StepRecord {
                step,
                epoch,
                loss,
                lr,
                grad_norm,
                examples_per_s: batch.len() as f64 / seconds.max(1e-9),
            };
            log.push(record.clone());
            if let (Some(dir), Some(every)) = (journal_dir, self.config.checkpoint_every)
                && step % every == 0
                && step < total_steps
            {
                journal::save(dir, &self.snapshot(&fingerprint, step, train_seconds, &log))?;
            }
            if on_step(&record).is_break() {
                return Err(TrainError::Stopped { step });
            }
        }
        Ok(TrainOutcome {
            log,
            total_steps,
            resumed_from,
            train_seconds,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }

    /// The number of optimiser steps a run over `examples` takes: the batches are drawn and
    /// counted, one epoch in memory at a time, up to `max_steps`.
    pub fn total_steps(&self, examples: &[TokenizedExample]) -> Result<u64, TrainError> {
        let total = self.batches(examples).count() as u64;
        if total == 0 {
            let positives: std::collections::HashSet<&str> =
                examples.iter().map(|e| e.positive_id.as_str()).collect();
            return Err(TrainError::NoBatches {
                why: format!(
                    "{} examples with {} distinct positives; a batch needs two examples with different positives",
                    examples.len(),
                    positives.len()
                ),
            });
        }
        Ok(total)
    }

    /// The batches of every step with their epoch, drawn lazily: one epoch's batches exist at a
    /// time and nothing is drawn past `max_steps`, so `epochs: 100000000` with `max_steps: 1`
    /// costs one epoch. Building the whole plan first was the rejected alternative: its memory
    /// grows with `epochs`, which nothing bounds.
    fn batches<'e>(&self, examples: &'e [TokenizedExample]) -> Batches<'e> {
        Batches {
            positives: examples.iter().map(|e| e.positive_id.as_str()).collect(),
            lengths: examples.iter().map(|e| e.positive.len()).collect(),
            sampler: SamplerConfig {
                batch_size: self.config.batch_size,
                seed: self.config.seed,
                length_pool_batches: self.config.length_pool_batches,
            },
            epochs: self.config.epochs,
            remaining: self.config.max_steps.unwrap_or(u64::MAX),
            next_epoch: 0,
            current: (0, Vec::new().into_iter()),
        }
    }

    /// The loss of `batch` and the gradient of every parameter (in [`Self::params`] order).
    /// `step` seeds the dropout masks.
    pub fn gradients(
        &self,
        batch: &[&TokenizedExample],
        step: u64,
    ) -> Result<(f64, Vec<Tensor>), TrainError> {
        let rows = batch_rows(batch);
        let groups = [rows.anchors, rows.candidates];
        let targets = if rows.extra.iter().any(|more| !more.is_empty()) {
            let device = self.model.bert.device();
            Some(
                super::loss::targets(&rows.extra, groups[1].len(), device)
                    .during(|| "the batch's right answers".to_owned())?,
            )
        } else {
            None
        };
        let margins = match self.config.loss.distill_weight {
            Some(_) if !rows.margins.is_empty() => Some(
                TeacherMargins::new(&rows.margins, groups[1].len(), self.model.bert.device())
                    .during(|| "the teacher's margins".to_owned())?,
            ),
            _ => None,
        };
        let labels = BatchLabels {
            mask: self.guide_mask(&groups, &rows.extra)?,
            targets,
            margins,
        };
        let mini = self.config.mini_batch_size;
        let plans = [0, 1].map(|g| LengthPlan::new(&groups[g], mini));
        let mut sums: Vec<Option<Tensor>> = vec![None; self.optimizer.params.len()];
        let loss = if batch.len() <= mini {
            let [a, c] = [0, 1].map(|g| self.embed_passes(&groups[g], &plans[g], step, g, true));
            let loss = self
                .config
                .loss
                .labelled_loss(&a?, &c?, &labels)
                .during(|| "the loss".to_owned())?;
            let store = loss.backward().during(|| "the backward pass".to_owned())?;
            self.accumulate(&store, &mut sums)?;
            scalar(&loss)?
        } else {
            // Pass 1: every mini-batch's embeddings, no graph kept.
            let mut embedded = Vec::new();
            for (g, rows) in groups.iter().enumerate() {
                let all = self.embed_passes(rows, &plans[g], step, g, false)?;
                embedded.push(Var::from_tensor(&all).during(|| "caching embeddings".to_owned())?);
            }
            let loss = self
                .config
                .loss
                .labelled_loss(embedded[0].as_tensor(), embedded[1].as_tensor(), &labels)
                .during(|| "the loss".to_owned())?;
            let store = loss
                .backward()
                .during(|| "the loss's backward pass".to_owned())?;
            // Pass 2: each mini-batch again with its graph, weighted by its embeddings' gradient.
            for (g, rows) in groups.iter().enumerate() {
                let grad = store
                    .get(embedded[g].as_tensor())
                    .ok_or_else(|| TrainError::NoGradient {
                        name: "the cached embeddings".to_owned(),
                    })?
                    .detach();
                for (k, chunk) in plans[g].chunks.iter().enumerate() {
                    let embeddings =
                        self.embed(&LengthPlan::rows(rows, chunk), self.seed(step, g, k))?;
                    let weight = LengthPlan::select(&grad, chunk, self.model.bert.device())
                        .during(|| "slicing the embeddings' gradient".to_owned())?;
                    let surrogate = (embeddings * weight)
                        .and_then(|t| t.sum_all())
                        .during(|| "the GradCache surrogate".to_owned())?;
                    let store = surrogate
                        .backward()
                        .during(|| "a mini-batch's backward pass".to_owned())?;
                    self.accumulate(&store, &mut sums)?;
                }
            }
            scalar(&loss)?
        };
        let grads = sums
            .into_iter()
            .zip(&self.optimizer.params)
            .map(|(sum, param)| {
                sum.ok_or_else(|| TrainError::NoGradient {
                    name: param.name.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((loss, grads))
    }

    /// Clips `grads`, then takes one AdamW step at `lr`; returns the norm before clipping.
    pub fn apply(&mut self, grads: Vec<Tensor>, lr: f64, step: u64) -> Result<f64, TrainError> {
        clip_and_step(
            &mut self.optimizer,
            grads,
            (lr, self.config.max_grad_norm),
            step,
        )
    }

    /// Embeddings of group `g`'s `rows`, pass by pass as `plan` cuts them (pass `k` seeded
    /// `seed(step, g, k)`, as GradCache's second pass redraws), in row order; `with_graph: false`
    /// drops each pass's graph as soon as it is embedded (GradCache's first pass).
    fn embed_passes(
        &self,
        rows: &[&[u32]],
        plan: &LengthPlan,
        step: u64,
        g: usize,
        with_graph: bool,
    ) -> Result<Tensor, TrainError> {
        let parts = plan
            .chunks
            .iter()
            .enumerate()
            .map(|(k, chunk)| {
                let embedded = self.embed(&LengthPlan::rows(rows, chunk), self.seed(step, g, k))?;
                Ok(if with_graph {
                    embedded
                } else {
                    embedded.detach()
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        plan.in_row_order(&parts, self.model.bert.device())
    }

    /// Sentence embeddings of `rows` with the graph recorded, dropout (if on) seeded by `seed`.
    fn embed(&self, rows: &[&[u32]], seed: u64) -> Result<Tensor, TrainError> {
        let bert = self.model.bert;
        let (ids, mask) = pad(rows, bert.config().pad_token_id, bert.device())?;
        if self.config.dropout {
            bert.reseed_dropout(seed);
        }
        let hidden = bert.forward(&ids, &mask, self.config.dropout)?;
        Ok(self.model.pooling.forward(&hidden, &mask)?)
    }

    /// The dropout seed of mini-batch `chunk` of group `group` (anchors 0, candidates 1) at
    /// `step`: both GradCache passes of a mini-batch get the same masks.
    fn seed(&self, step: u64, group: usize, chunk: usize) -> u64 {
        let mut hasher = blake3::Hasher::new();
        for part in [self.config.seed, step, group as u64, chunk as u64] {
            hasher.update(&part.to_le_bytes());
        }
        let bytes = hasher.finalize();
        u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
    }

    fn accumulate(
        &self,
        store: &candle_core::backprop::GradStore,
        sums: &mut [Option<Tensor>],
    ) -> Result<(), TrainError> {
        for (param, sum) in self.optimizer.params.iter().zip(sums.iter_mut()) {
            if let Some(grad) = store.get(param.var.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(previous) => {
                        (previous + grad).during(|| "summing gradients".to_owned())?
                    }
                    None => grad.clone(),
                });
            }
        }
        Ok(())
    }

    fn snapshot(
        &self,
        fingerprint: &str,
        step: u64,
        train_seconds: f64,
        log: &[StepRecord],
    ) -> Snapshot {
        Snapshot {
            state: journal::State {
                fingerprint: fingerprint.to_owned(),
                step,
                optimizer_steps: self.optimizer.steps,
                train_seconds,
                log: log.to_vec(),
            },
            tensors: self
                .optimizer
                .params
                .iter()
                .flat_map(|p| {
                    [
                        (format!("param.{}", p.name), p.var.as_detached_tensor()),
                        (format!("m.{}", p.name), p.m.clone()),
                        (format!("v.{}", p.name), p.v.clone()),
                    ]
                })
                .collect(),
        }
    }

    fn restore(&mut self, snapshot: &Loaded) -> Result<(), TrainError> {
        let device = self.model.bert.device().clone();
        let get = |key: String, like: &Tensor| -> Result<Tensor, TrainError> {
            let tensor = snapshot
                .tensors
                .get(&key)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: snapshot.path.clone(),
                    message: format!("`{key}` is missing"),
                })?;
            if tensor.dims() != like.dims() {
                return Err(TrainError::Checkpoint {
                    path: snapshot.path.clone(),
                    message: format!(
                        "`{key}` has shape {:?}, not {:?}",
                        tensor.dims(),
                        like.dims()
                    ),
                });
            }
            Ok(tensor
                .to_device(&device)
                .and_then(|t| t.to_dtype(like.dtype()))
                .during(|| format!("restoring `{key}`"))?)
        };
        for param in &mut self.optimizer.params {
            let value = get(format!("param.{}", param.name), param.var.as_tensor())?;
            param
                .var
                .set(&value)
                .during(|| format!("restoring `{}`", param.name))?;
            param.m = get(format!("m.{}", param.name), &param.m)?;
            param.v = get(format!("v.{}", param.name), &param.v)?;
        }
        self.optimizer.steps = snapshot.state.optimizer_steps;
        Ok(())
    }
}

/// The anchors' token ids, and the candidates': every positive, then each distinct hard negative
/// that is not one of the batch's positives (that would mark a right answer wrong).
/// The batches of a run in order, with their epoch (see [`Trainer::batches`]).
struct Batches<'e> {
    positives: Vec<&'e str>,
    lengths: Vec<usize>,
    sampler: SamplerConfig,
    epochs: u64,
    /// Steps still allowed by `max_steps`.
    remaining: u64,
    next_epoch: u64,
    /// The epoch being drawn from and its batches left.
    current: (u64, std::vec::IntoIter<Vec<usize>>),
}

impl Iterator for Batches<'_> {
    type Item = (u64, Vec<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        loop {
            if let Some(batch) = self.current.1.next() {
                self.remaining -= 1;
                return Some((self.current.0, batch));
            }
            if self.next_epoch >= self.epochs {
                return None;
            }
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let batches =
                sampler::epoch_batches(&self.positives, &self.lengths, self.sampler, epoch);
            // Whether an epoch has a batch does not depend on its shuffle (it needs two distinct
            // positives), so an empty epoch means every epoch is empty.
            if batches.is_empty() {
                self.next_epoch = self.epochs;
                return None;
            }
            self.current = (epoch, batches.into_iter());
        }
    }
}

/// A batch as rows to embed: anchors, and candidates (the positives in batch order, then each
/// other passage once); `extra[i]` lists the candidate columns that also answer anchor `i`.
struct BatchRows<'e> {
    anchors: Vec<&'e [u32]>,
    candidates: Vec<&'e [u32]>,
    extra: Vec<Vec<usize>>,
    /// (anchor, its negative's column, the teacher's margin) for examples with margins.
    margins: Vec<(usize, usize, f32)>,
}

fn batch_rows<'e>(batch: &[&'e TokenizedExample]) -> BatchRows<'e> {
    let anchors = batch.iter().map(|e| e.anchor.as_slice()).collect();
    let mut column: std::collections::HashMap<&str, usize> = batch
        .iter()
        .enumerate()
        .map(|(i, e)| (e.positive_id.as_str(), i))
        .collect();
    let mut candidates: Vec<&[u32]> = batch.iter().map(|e| e.positive.as_slice()).collect();
    let mut place = |text: &'e super::TokenizedText| {
        *column.entry(text.id.as_str()).or_insert_with(|| {
            candidates.push(text.ids.as_slice());
            candidates.len() - 1
        })
    };
    let mut margins = Vec::new();
    let extra = batch
        .iter()
        .enumerate()
        .map(|(i, example)| {
            for (k, negative) in example.negatives.iter().enumerate() {
                let column = place(negative);
                if let Some(&margin) = example.teacher_margins.get(k) {
                    margins.push((i, column, margin));
                }
            }
            example.extra_positives.iter().map(&mut place).collect()
        })
        .collect();
    BatchRows {
        anchors,
        candidates,
        extra,
        margins,
    }
}

/// A group's rows cut into the forward passes that embed them: by length, longest first, so
/// each pass pads to its own longest row. One pass over passages of which a third are half as
/// long as the rest spends a sixth of its work on padding.
///
/// A pass holds at most `max_rows` rows (GradCache's mini-batch). A new pass starts where a row
/// is shorter than `SHORTER` of the pass's longest and the pass already has `MIN_ROWS` rows, so
/// no pass is too small for its products to run at speed.
#[derive(Debug, Clone, PartialEq)]
struct LengthPlan {
    /// Each pass's row indices into the group, longest row first.
    chunks: Vec<Vec<usize>>,
}

impl LengthPlan {
    /// A row shorter than this share of its pass's longest starts another pass.
    const SHORTER: f64 = 0.75;
    /// Rows a pass gets before a shorter row may start another.
    const MIN_ROWS: usize = 8;

    fn new(rows: &[&[u32]], max_rows: usize) -> Self {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        for i in order {
            let starts_new = match chunks.last() {
                None => true,
                Some(chunk) => {
                    let longest = rows[chunk[0]].len() as f64;
                    chunk.len() >= max_rows.max(1)
                        || (chunk.len() >= Self::MIN_ROWS
                            && (rows[i].len() as f64) < Self::SHORTER * longest)
                }
            };
            if starts_new {
                chunks.push(vec![i]);
            } else if let Some(chunk) = chunks.last_mut() {
                chunk.push(i);
            }
        }
        Self { chunks }
    }

    /// The rows of `chunk`, in its order.
    fn rows<'r>(rows: &[&'r [u32]], chunk: &[usize]) -> Vec<&'r [u32]> {
        chunk.iter().map(|&i| rows[i]).collect()
    }

    /// Rows `indices` of `t`, in that order.
    fn select(t: &Tensor, indices: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let indices: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        t.index_select(&Tensor::new(indices, device)?, 0)
    }

    /// The passes' embeddings (`parts`, one per chunk) joined and put back in the group's row
    /// order, differentiably.
    fn in_row_order(&self, parts: &[Tensor], device: &Device) -> Result<Tensor, TrainError> {
        let joined = Tensor::cat(parts, 0).during(|| "joining embeddings".to_owned())?;
        let order: Vec<usize> = self.chunks.iter().flatten().copied().collect();
        if order.iter().enumerate().all(|(at, &i)| at == i) {
            return Ok(joined);
        }
        let mut position = vec![0; order.len()];
        for (at, &i) in order.iter().enumerate() {
            position[i] = at;
        }
        Ok(Self::select(&joined, &position, device)
            .during(|| "putting embeddings back in batch order".to_owned())?)
    }
}

/// Token ids padded on the right to the longest row, and the attention mask.
fn pad(rows: &[&[u32]], pad_id: u32, device: &Device) -> Result<(Tensor, Tensor), TrainError> {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; rows.len() * seq];
    let mut mask = vec![0u32; rows.len() * seq];
    for (i, row) in rows.iter().enumerate() {
        ids[i * seq..i * seq + row.len()].copy_from_slice(row);
        mask[i * seq..i * seq + row.len()].fill(1);
    }
    let shape = (rows.len(), seq);
    let ids = Tensor::from_vec(ids, shape, device).during(|| "a batch's token ids".to_owned())?;
    let mask = Tensor::from_vec(mask, shape, device).during(|| "a batch's mask".to_owned())?;
    Ok((ids, mask))
}

fn scalar(loss: &Tensor) -> Result<f64, TrainError> {
    Ok(loss
        .to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .during(|| "reading the loss".to_owned())?)
}

/// Identifies a run's settings and data, so a checkpoint of another run is never resumed.
fn fingerprint(config: &TrainConfig, examples: &[TokenizedExample]) -> Result<String, TrainError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&serde_json::to_vec(config)?);
    for example in examples {
        hasher.update(&serde_json::to_vec(example)?);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The peak resident set size of this process.
pub fn peak_rss_bytes() -> Option<u64> {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return None;
        }
        usage
    };
    let max = u64::try_from(usage.ru_maxrss).ok()?;
    // Linux reports kilobytes, macOS bytes.
    Some(if cfg!(target_os = "macos") {
        max
    } else {
        max * 1024
    })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::bert::tests::tiny_bert;
    use crate::model::mpnet::tests::tiny_mpnet;
    use crate::model::pooling::PoolingMode;
    use crate::model::train::TokenizedText;

    /// Random examples over the tiny model's 50-token vocabulary: `[CLS]`-like 1 first, lengths
    /// 3 to 9, two hard negatives each (one shared with the next example); every third example
    /// has a second positive of its own, and the one after it the next example's positive.
    fn tiny_examples(n: usize, seed: u64) -> Vec<TokenizedExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let text = |rng: &mut ChaCha8Rng| {
            let len = rng.random_range(3..10);
            std::iter::once(1)
                .chain((1..len).map(|_| rng.random_range(2..50)))
                .collect::<Vec<u32>>()
        };
        (0..n)
            .map(|i| TokenizedExample {
                anchor: text(&mut rng),
                positive: text(&mut rng),
                positive_id: format!("p{i}"),
                extra_positives: match i % 3 {
                    0 => vec![TokenizedText {
                        id: format!("x{i}"),
                        ids: text(&mut rng),
                    }],
                    1 => vec![TokenizedText {
                        id: format!("p{}", (i + 1) % n),
                        ids: text(&mut rng),
                    }],
                    _ => Vec::new(),
                },
                teacher_margins: Vec::new(),
                negatives: vec![
                    TokenizedText {
                        id: format!("n{i}"),
                        ids: text(&mut rng),
                    },
                    TokenizedText {
                        id: format!("n{}", (i + 1) % n),
                        ids: text(&mut rng),
                    },
                ],
            })
            .collect()
    }

    #[test]
    fn a_second_positive_shares_the_column_of_the_same_passage() {
        let examples = tiny_examples(4, 3);
        let batch: Vec<&TokenizedExample> = examples.iter().collect();
        let rows = batch_rows(&batch);
        // Four positives, then each other passage once: n0..n3 and x0, x3.
        assert_eq!(rows.candidates.len(), 4 + 4 + 2);
        // Example 0's own second positive got a column of its own; example 1's is example 2's
        // positive, column 2; example 3's own again.
        assert_eq!(rows.extra[1], vec![2]);
        assert!(rows.extra[0][0] >= 4 && rows.extra[3][0] >= 4);
        assert!(rows.extra[2].is_empty());
    }

    fn tiny_config(batch_size: usize, mini_batch_size: usize) -> TrainConfig {
        TrainConfig {
            batch_size,
            mini_batch_size,
            learning_rate: 1e-3,
            checkpoint_every: None,
            ..TrainConfig::default()
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values")
    }

    #[test]
    fn r18_3_many_epochs_with_max_steps_draw_only_what_runs() {
        let bert = tiny_bert(DType::F32);
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let examples = tiny_examples(6, 3);
        let config = TrainConfig {
            epochs: 100_000_000,
            max_steps: Some(2),
            ..tiny_config(2, 2)
        };
        let mut trainer = Trainer::new(model, config).expect("trainer");
        assert_eq!(trainer.total_steps(&examples).expect("steps"), 2);
        let outcome = trainer
            .run(&examples, None, &mut |_| ControlFlow::Continue(()))
            .expect("runs");
        assert_eq!(outcome.log.len(), 2);

        let three_epochs = Trainer::new(
            model,
            TrainConfig {
                epochs: 3,
                ..tiny_config(2, 2)
            },
        )
        .expect("trainer");
        assert_eq!(three_epochs.total_steps(&examples).expect("steps"), 9);
        let epochs: Vec<u64> = three_epochs.batches(&examples).map(|(e, _)| e).collect();
        assert_eq!(epochs, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }

    /// Same seed, same run: every weight bit for bit, with dropout and GradCache on.
    #[test]
    fn r18_12_the_same_seed_trains_the_same_weights() {
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let examples = tiny_examples(24, 5);
        let config = TrainConfig {
            epochs: 2,
            ..tiny_config(8, 4)
        };
        let train = || {
            let bert = tiny_bert(DType::F32);
            let model = TrainModel {
                bert: &bert,
                pooling: &pooling,
            };
            let mut trainer = Trainer::new(model, config.clone()).expect("trainer");
            trainer
                .run(&examples, None, &mut |_| ControlFlow::Continue(()))
                .expect("run");
            trainer
                .params()
                .iter()
                .map(|p| values(p.var.as_tensor()))
                .collect::<Vec<Vec<f64>>>()
        };
        let first = train();
        for _ in 0..2 {
            assert!(train() == first, "a second run with the same seed differs");
        }
    }

    /// Passes take rows longest first, at most `max_rows` each, and a row shorter than 3/4 of
    /// its pass's longest starts another once the pass has 8 rows; every row once.
    #[test]
    fn length_plans_cut_passes_by_length_and_size() {
        let lengths = [
            128, 40, 128, 90, 128, 128, 20, 128, 128, 128, 100, 128, 96, 30,
        ];
        let texts: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![1; n]).collect();
        let rows: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let plan = LengthPlan::new(&rows, 32);
        let passes: Vec<Vec<usize>> = plan
            .chunks
            .iter()
            .map(|c| c.iter().map(|&i| lengths[i]).collect())
            .collect();
        // 8 rows of 128 and 100 (no split before 8 rows), 96 (3/4 of 128 is 96: not shorter),
        // then 90 starts a pass that 40 (under 3/4 of 90) would leave, were it 8 rows long.
        assert_eq!(
            passes,
            vec![
                vec![128, 128, 128, 128, 128, 128, 128, 128, 100, 96],
                vec![90, 40, 30, 20],
            ]
        );
        let mut seen: Vec<usize> = plan.chunks.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());

        let small = LengthPlan::new(&rows, 4);
        assert!(small.chunks.iter().all(|c| c.len() <= 4));
        assert_eq!(
            small.chunks.iter().map(Vec::len).sum::<usize>(),
            lengths.len()
        );
        assert_eq!(LengthPlan::new(&rows[..1], 4).chunks, vec![vec![0]]);
    }

    /// Embedding a group pass by pass, each padded to its own longest row, and putting the rows
    /// back gives what one pass padded to the longest gives (in f64: rounding only), and so do
    /// the gradients through the reordering.
    #[test]
    fn passes_by_length_embed_as_one_padded_pass() {
        let bert = tiny_bert(DType::F64);
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let trainer = Trainer::new(
            model,
            TrainConfig {
                dropout: false,
                ..tiny_config(4, 4)
            },
        )
        .expect("trainer");
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let texts: Vec<Vec<u32>> = (0..20)
            .map(|i| {
                let len = if i % 3 == 0 {
                    3
                } else {
                    rng.random_range(3..20)
                };
                std::iter::once(1)
                    .chain((1..len).map(|_| rng.random_range(2..50)))
                    .collect()
            })
            .collect();
        let rows: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let plan = LengthPlan::new(&rows, 12);
        assert!(plan.chunks.len() >= 2, "{:?}", plan.chunks);
        let parts: Vec<Tensor> = plan
            .chunks
            .iter()
            .map(|c| {
                trainer
                    .embed(&LengthPlan::rows(&rows, c), 0)
                    .expect("a pass")
            })
            .collect();
        let by_passes = plan.in_row_order(&parts, bert.device()).expect("row order");
        let at_once = trainer.embed(&rows, 0).expect("one pass");
        let worst = values(&by_passes)
            .iter()
            .zip(values(&at_once))
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-12, "off by {worst}");

        // The reordering's backward puts each row's gradient on its pass.
        let weights = Tensor::arange(
            0f64,
            (20 * by_passes.dim(1).expect("dim")) as f64,
            bert.device(),
        )
        .and_then(|t| t.reshape(by_passes.shape()))
        .expect("weights");
        let grads = |e: &Tensor| {
            let store = (e * &weights)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward");
            trainer
                .params()
                .iter()
                .map(|p| values(store.get(p.var.as_tensor()).expect("gradient")))
                .collect::<Vec<_>>()
        };
        let (a, b) = (grads(&by_passes), grads(&at_once));
        for (a, b) in a.iter().zip(&b) {
            let worst = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst < 1e-9, "gradients off by {worst}");
        }
    }

    /// For BERT and for MPNet (whose relative-position bias is one more parameter).
    #[test]
    fn gradcache_gives_the_plain_gradients() {
        for (bert, parameters) in [
            (tiny_bert(DType::F64), 5 + 2 * 16),
            (tiny_mpnet(DType::F64), 4 + 2 * 16 + 1),
        ] {
            check_gradcache(&bert, parameters);
        }
    }

    fn check_gradcache(bert: &Bert, parameters: usize) {
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let model = TrainModel {
            bert,
            pooling: &pooling,
        };
        let examples = tiny_examples(6, 3);
        let batch: Vec<&TokenizedExample> = examples.iter().collect();
        let config = |mini| TrainConfig {
            dropout: false,
            ..tiny_config(6, mini)
        };
        let plain = Trainer::new(model, config(6)).expect("trainer");
        let cached = Trainer::new(model, config(4)).expect("trainer");
        let (plain_loss, plain_grads) = plain.gradients(&batch, 1).expect("plain");
        let (cached_loss, cached_grads) = cached.gradients(&batch, 1).expect("cached");
        assert!((plain_loss - cached_loss).abs() < 1e-12);
        assert_eq!(plain_grads.len(), parameters);
        // Compared against the largest gradient anywhere: the key biases' exact gradient is zero
        // (softmax ignores a shift of a whole row), so theirs is rounding noise in both.
        let largest = plain_grads
            .iter()
            .flat_map(values)
            .fold(0f64, |m, v| m.max(v.abs()));
        for ((p, c), param) in plain_grads.iter().zip(&cached_grads).zip(plain.params()) {
            let worst = values(p)
                .iter()
                .zip(values(c))
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-10 * largest,
                "`{}`: off by {worst} (largest gradient {largest})",
                param.name
            );
        }
    }

    /// A run stopped at step 6, resumed from its step-4 checkpoint, ends with exactly the
    /// weights, moments and log of a run that was never stopped (dropout on, GradCache on).
    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let examples = tiny_examples(24, 5);
        let config = TrainConfig {
            epochs: 2,
            checkpoint_every: Some(4),
            ..tiny_config(4, 2)
        };
        let journal = tempfile::tempdir().expect("temp dir");

        let bert = tiny_bert(DType::F32);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let mut trainer = Trainer::new(model, config.clone()).expect("trainer");
        let whole = trainer
            .run(&examples, None, &mut |_| ControlFlow::Continue(()))
            .expect("run");
        assert_eq!(whole.total_steps, 12);
        assert_eq!(whole.log.len(), 12);
        let want: Vec<Vec<f64>> = trainer
            .params()
            .iter()
            .map(|p| values(p.var.as_tensor()))
            .collect();
        let want_m: Vec<Vec<f64>> = trainer.params().iter().map(|p| values(&p.m)).collect();

        let bert = tiny_bert(DType::F32);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let mut trainer = Trainer::new(model, config.clone()).expect("trainer");
        let stopped = trainer.run(&examples, Some(journal.path()), &mut |record| {
            if record.step == 6 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(
            matches!(stopped, Err(TrainError::Stopped { step: 6 })),
            "{stopped:?}"
        );

        let bert = tiny_bert(DType::F32);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let mut trainer = Trainer::new(model, config).expect("trainer");
        let mut seen = Vec::new();
        let resumed = trainer
            .run(&examples, Some(journal.path()), &mut |record| {
                seen.push(record.step);
                ControlFlow::Continue(())
            })
            .expect("resumed run");
        assert_eq!(resumed.resumed_from, Some(4));
        assert_eq!(seen, (5..=12).collect::<Vec<u64>>());
        let losses = |log: &[StepRecord]| {
            log.iter()
                .map(|r| (r.step, r.loss, r.lr))
                .collect::<Vec<_>>()
        };
        assert_eq!(losses(&resumed.log), losses(&whole.log));
        for (i, param) in trainer.params().iter().enumerate() {
            assert_eq!(
                values(param.var.as_tensor()),
                want[i],
                "`{}` differs",
                param.name
            );
            assert_eq!(
                values(&param.m),
                want_m[i],
                "moment of `{}` differs",
                param.name
            );
        }
    }

    #[test]
    fn matryoshka_dims_above_the_model_dimension_are_refused() {
        let bert = tiny_bert(DType::F32);
        let pooling = Pooling::new(vec![PoolingMode::Mean], true);
        let model = TrainModel {
            bert: &bert,
            pooling: &pooling,
        };
        let mut config = tiny_config(4, 4);
        config.loss.matryoshka_dims = Some(vec![16, 32]);
        let error = Trainer::new(model, config).expect_err("32 > 16");
        assert!(error.to_string().contains("matryoshka_dims"), "{error}");
        let too_few = Trainer::new(model, tiny_config(4, 4))
            .expect("trainer")
            .run(&tiny_examples(1, 1), None, &mut |_| {
                ControlFlow::Continue(())
            })
            .expect_err("one example makes no batch");
        assert!(matches!(too_few, TrainError::NoBatches { .. }), "{too_few}");
    }
}
