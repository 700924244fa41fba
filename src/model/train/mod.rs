//! Fine-tuning a sentence encoder: the ranking losses (`loss`), AdamW, the learning-rate
//! schedule and clipping (`optim`), the batch sampler (`sampler`), the training loop with
//! GradCache and checkpoints (`trainer`, `journal`), and writing the result as a
//! sentence-transformers folder (`save`); and the cross-encoder reranker's losses (`rerank_loss`)
//! and training loop with early stopping (`rerank`). It works on token ids and knows nothing of recipes,
//! stages or the terminal: the train stage tokenizes its data and reports progress.

pub mod error;
pub mod journal;
pub mod loss;
pub mod optim;
pub mod rerank;
pub mod rerank_loss;
pub mod sampler;
pub mod save;
pub mod trainer;

use serde::{Deserialize, Serialize};

pub use error::TrainError;
pub use loss::LossConfig;
pub use optim::AdamWConfig;
pub use trainer::{StepRecord, TrainModel, TrainOutcome, Trainer, peak_rss_bytes};

/// A training example as token ids (special tokens included, truncated, unpadded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub anchor: Vec<u32>,
    pub positive: Vec<u32>,
    /// Identifies the positive passage: no batch holds two examples with the same one.
    pub positive_id: String,
    pub negatives: Vec<TokenizedText>,
    /// Other passages that answer the anchor: right answers in its loss, wrong ones in the
    /// other anchors'.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_positives: Vec<TokenizedText>,
    /// A teacher's margin (positive's score minus the negative's) for each of `negatives`, in
    /// order, for MarginMSE ([`LossConfig::distill_weight`]); empty without a teacher.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teacher_margins: Vec<f32>,
}

/// A passage as token ids, with its identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizedText {
    pub id: String,
    pub ids: Vec<u32>,
}

/// The largest batch (and mini-batch) accepted: far above the 32 to 256+ that train well, and
/// small enough that a batch's index lists and similarity matrix stay allocatable. A typo of a
/// few extra zeros is refused when the recipe is checked instead of aborting on allocation.
pub const MAX_BATCH_SIZE: usize = 1 << 16;

/// Everything that decides what a run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Examples embedded with a graph at once: a larger batch is computed by GradCache in
    /// mini-batches of this size (same gradients, bounded memory).
    pub mini_batch_size: usize,
    /// The peak learning rate.
    pub learning_rate: f64,
    /// The share of steps spent warming the learning rate up from zero.
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// Decay biases and LayerNorm parameters too (PyTorch's plain `AdamW(model.parameters())`).
    pub decay_all: bool,
    /// Gradients are scaled down to this global norm; `None` never clips.
    pub max_grad_norm: Option<f64>,
    pub loss: LossConfig,
    /// Seeds the batch order and the dropout masks.
    pub seed: u64,
    /// Train with the model's dropout (off: deterministic forward passes, as in evaluation).
    pub dropout: bool,
    /// Stop after this many steps.
    pub max_steps: Option<u64>,
    /// Save a checkpoint every this many steps (when a journal folder is given).
    pub checkpoint_every: Option<u64>,
    /// Batch examples of similar length (see [`sampler::SamplerConfig::length_pool_batches`]).
    pub length_pool_batches: Option<usize>,
}

impl Default for TrainConfig {
    /// sentence-transformers' fine-tuning defaults.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            mini_batch_size: 16,
            learning_rate: 2e-5,
            warmup_ratio: 0.1,
            adamw: AdamWConfig::default(),
            decay_all: false,
            max_grad_norm: Some(1.0),
            loss: LossConfig::default(),
            seed: 42,
            dropout: true,
            max_steps: None,
            checkpoint_every: Some(50),
            length_pool_batches: None,
        }
    }
}

impl TrainConfig {
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
        if self.batch_size < 2 {
            return invalid("batch_size", "must be at least 2 (in-batch negatives)");
        }
        if self.batch_size > MAX_BATCH_SIZE {
            return invalid("batch_size", "must be at most 65536");
        }
        if self.mini_batch_size == 0 {
            return invalid("mini_batch_size", "must be at least 1");
        }
        if self.mini_batch_size > MAX_BATCH_SIZE {
            return invalid("mini_batch_size", "must be at most 65536");
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
        if !(self.loss.scale.is_finite() && self.loss.scale > 0.) {
            return invalid("scale", "must be a positive number");
        }
        if let Some(dims) = &self.loss.matryoshka_dims
            && (dims.is_empty() || dims.contains(&0))
        {
            return invalid("matryoshka_dims", "must list dimensions of at least 1");
        }
        if self.checkpoint_every == Some(0) {
            return invalid("checkpoint_every", "must be at least 1 step");
        }
        if self.max_steps == Some(0) {
            return invalid("max_steps", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
