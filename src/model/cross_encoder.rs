//! A BERT cross-encoder (reranker): query and passage read together as
//! `[CLS] query [SEP] passage [SEP]` (segments 0 and 1), the `[CLS]` state through BERT's pooler
//! (dense + tanh) and a linear classifier to one relevance logit.
//!
//! Ported from transformers' `BertForSequenceClassification`
//! (<https://github.com/huggingface/transformers/blob/v4.44.2/src/transformers/models/bert/modeling_bert.py#L1584>)
//! with `num_labels = 1`, the shape sentence-transformers' `CrossEncoder` rerankers have. The
//! encoder is [`Bert`], so training runs on the same differentiable kernels as the bi-encoder;
//! this file adds the segments, the pooler and the classifier.
//!
//! Checkpoint names, as `BertForSequenceClassification` saves them (what [`CrossEncoder::tensors`]
//! writes and [`CrossEncoder::load`] reads; a plain `BertModel` has the same names without the
//! `bert.` prefix and no classifier):
//!
//! | tensor                        | shape              |
//! |-------------------------------|--------------------|
//! | `bert.embeddings.…`, `bert.encoder.…` | as [`Bert`] |
//! | `bert.pooler.dense.weight`    | `[hidden, hidden]` |
//! | `bert.pooler.dense.bias`      | `[hidden]`         |
//! | `classifier.weight`           | `[1, hidden]`      |
//! | `classifier.bias`             | `[1]`              |
//!
//! From a plain encoder the missing classifier (and pooler, if the checkpoint has none) is
//! initialised as transformers initialises it: weights from N(0, `initializer_range`²), biases 0,
//! drawn from the caller's seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::model::bert::{Bert, BertConfig, canonical_name};
use crate::model::checkpoint::Checkpoint;
use crate::model::config_file::read_json;
use crate::model::error::{CandleContext, ModelError};
use crate::model::kernels::{self, Dropout};
use crate::model::pooling::SentenceModules;
use crate::model::tokenize::{PairBatch, PairIds, SentenceTokenizer};

/// The pooler's and classifier's names in a `BertForSequenceClassification` checkpoint.
pub const POOLER_WEIGHT: &str = "bert.pooler.dense.weight";
pub const POOLER_BIAS: &str = "bert.pooler.dense.bias";
pub const CLASSIFIER_WEIGHT: &str = "classifier.weight";
pub const CLASSIFIER_BIAS: &str = "classifier.bias";
/// The prefix `BertForSequenceClassification` puts before the encoder's names.
pub const ENCODER_PREFIX: &str = "bert.";

/// The keys of `config.json` the head needs besides [`BertConfig`]'s.
#[derive(Debug, Deserialize)]
struct HeadConfig {
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    /// transformers' dropout before the classifier; `hidden_dropout_prob` when unset.
    #[serde(default)]
    classifier_dropout: Option<f32>,
    /// `tokenizer_config.json`'s limit is read separately; this is only to refuse multi-label
    /// classifiers, which rank nothing.
    #[serde(default)]
    num_labels: Option<usize>,
}

fn default_initializer_range() -> f64 {
    0.02
}

/// Where the head's weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadOrigin {
    /// The checkpoint had a classifier (a cross-encoder).
    Loaded,
    /// A plain encoder: the classifier (and a missing pooler) drawn from this seed.
    Seeded(u64),
}

/// How to load a cross-encoder.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Seeds a head the checkpoint lacks.
    pub seed: u64,
    /// Truncate pairs at this many tokens; default: the folder's own limit.
    pub max_seq_length: Option<usize>,
}

/// The pooler and classifier as trainable parameters.
#[derive(Debug)]
struct Head {
    pooler_weight: Var,
    pooler_bias: Var,
    classifier_weight: Var,
    classifier_bias: Var,
    dropout: f32,
}

/// A cross-encoder: tokenizer, [`Bert`] and the classification head.
#[derive(Debug)]
pub struct CrossEncoder {
    tokenizer: SentenceTokenizer,
    bert: Bert,
    head: Head,
    origin: HeadOrigin,
    transformer_dir: PathBuf,
}

impl CrossEncoder {
    /// Loads a cross-encoder folder (`BertForSequenceClassification` with one label, as
    /// sentence-transformers' `CrossEncoder` saves it), or a plain BERT or sentence-transformers
    /// folder, whose head is then seeded ([`HeadOrigin::Seeded`]). In f32.
    pub fn load(dir: &Path, device: &Device, options: LoadOptions) -> Result<Self, ModelError> {
        let transformer_dir = SentenceModules::read(dir)?.transformer_dir;
        let config_path = transformer_dir.join("config.json");
        let config = BertConfig::from_file(&config_path)?;
        // MPNet's classification head (`classifier.dense` + `classifier.out_proj`) is not
        // BERT's, and its pairs carry no segments: refused rather than built wrong.
        if config.is_mpnet() {
            return Err(ModelError::UnsupportedConfig {
                path: config_path,
                key: "model_type".to_owned(),
                value: "mpnet".to_owned(),
                supported: "`bert` (cross-encoders)".to_owned(),
            });
        }
        let head_config: HeadConfig = read_json(&config_path)?;
        let mut checkpoint = Checkpoint::read_dir(&transformer_dir, device)?;
        let mut head_tensors = BTreeMap::new();
        let names: Vec<String> = checkpoint.tensors.keys().cloned().collect();
        for name in names {
            let canonical = canonical_name(&name);
            if canonical.starts_with("pooler.dense.") || canonical.starts_with("classifier.") {
                let tensor = checkpoint
                    .tensors
                    .remove(&name)
                    .expect("the name was just listed");
                head_tensors.insert(canonical, tensor);
            }
        }
        let path = checkpoint.path.clone();
        let bert = Bert::from_checkpoint(config, checkpoint, DType::F32, device)?;
        let (head, origin) = Head::build(
            bert.config(),
            &head_config,
            head_tensors,
            options.seed,
            &path,
            device,
        )?;

        let config = bert.config();
        let mut tokenizer = SentenceTokenizer::load(
            &transformer_dir,
            config.max_position_embeddings,
            config.pad_token_id,
        )?;
        let own_limit = if transformer_dir.join("sentence_bert_config.json").is_file() {
            None
        } else {
            tokenizer_config_limit(&transformer_dir)
        };
        if let Some(limit) = options.max_seq_length.or(own_limit) {
            tokenizer = tokenizer.with_max_seq_length(limit, config.max_position_embeddings)?;
        }
        Ok(Self {
            tokenizer,
            bert,
            head,
            origin,
            transformer_dir,
        })
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    pub fn tokenizer(&self) -> &SentenceTokenizer {
        &self.tokenizer
    }

    /// Pairs are truncated to this many tokens, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.tokenizer.max_seq_length()
    }

    pub fn origin(&self) -> HeadOrigin {
        self.origin
    }

    /// The folder holding the transformer's config and tokenizer files.
    pub fn transformer_dir(&self) -> &Path {
        &self.transformer_dir
    }

    /// Every trainable parameter under its checkpoint name ([`Self::tensors`]'s names).
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let mut vars: BTreeMap<String, Var> = self
            .bert
            .named_vars()
            .into_iter()
            .map(|(name, var)| (format!("{ENCODER_PREFIX}{name}"), var))
            .collect();
        let head = &self.head;
        for (name, var) in [
            (POOLER_WEIGHT, &head.pooler_weight),
            (POOLER_BIAS, &head.pooler_bias),
            (CLASSIFIER_WEIGHT, &head.classifier_weight),
            (CLASSIFIER_BIAS, &head.classifier_bias),
        ] {
            vars.insert(name.to_owned(), var.clone());
        }
        vars
    }

    /// The weights as `BertForSequenceClassification` names them, to save. The encoder's
    /// non-parameter tensors (a `position_ids` buffer) are left out: transformers rebuilds them.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_detached_tensor()))
            .collect()
    }

    /// Tokenizes (query, passage) pairs ([`SentenceTokenizer::pair_ids`]).
    pub fn pair_ids(&self, pairs: &[(&str, &str)]) -> Result<Vec<PairIds>, ModelError> {
        self.tokenizer.pair_ids(pairs)
    }

    /// Pads tokenized pairs into a batch on the model's device.
    pub fn batch(&self, pairs: &[&PairIds]) -> Result<PairBatch, ModelError> {
        self.tokenizer.batch_pairs(pairs, self.bert.device())
    }

    /// The relevance logits `[batch]` of a batch, recording the graph for `backward()`; `train`
    /// turns dropout on (the encoder's and the classifier's, from the model's seeded stream).
    pub fn forward(&self, batch: &PairBatch, train: bool) -> Result<Tensor, ModelError> {
        let hidden = self.bert.forward_segments(
            &batch.batch.input_ids,
            Some(&batch.token_type_ids),
            &batch.batch.attention_mask,
            train,
        )?;
        let dropout = (train && self.head.dropout > 0.).then(|| Dropout {
            p: self.head.dropout,
            seed: self.bert.next_dropout_seed(),
        });
        let head = &self.head;
        let weights = [
            head.pooler_weight.as_tensor(),
            head.pooler_bias.as_tensor(),
            head.classifier_weight.as_tensor(),
            head.classifier_bias.as_tensor(),
        ];
        classify(&hidden, weights, dropout).during(|| "the classification head".to_owned())
    }

    /// The logits of tokenized pairs, `batch_size` at a time (longest first, so padding stays
    /// small), in input order; no graph is built. `progress` sees the number scored so far.
    pub fn score_ids(
        &self,
        pairs: &[PairIds],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<f32>, ModelError> {
        if batch_size == 0 {
            return Err(ModelError::InvalidArgument {
                name: "batch_size",
                why: "must be at least 1".to_owned(),
            });
        }
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(pairs[i].len()));
        let head = &self.head;
        let weights = [
            head.pooler_weight.as_detached_tensor(),
            head.pooler_bias.as_detached_tensor(),
            head.classifier_weight.as_detached_tensor(),
            head.classifier_bias.as_detached_tensor(),
        ];
        let mut scores = vec![0f32; pairs.len()];
        let mut done = 0;
        for chunk in order.chunks(batch_size) {
            let rows: Vec<&PairIds> = chunk.iter().map(|&i| &pairs[i]).collect();
            let batch = self.batch(&rows)?;
            let hidden = self.bert.forward_segments_no_grad(
                &batch.batch.input_ids,
                Some(&batch.token_type_ids),
                &batch.batch.attention_mask,
            )?;
            let logits = classify(&hidden, weights.each_ref(), None)
                .and_then(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
                .during(|| "the classification head".to_owned())?;
            for (&i, logit) in chunk.iter().zip(logits) {
                scores[i] = logit;
            }
            done += chunk.len();
            progress(done);
        }
        Ok(scores)
    }

    /// The logits of (query, passage) pairs, in input order.
    pub fn score(
        &self,
        pairs: &[(&str, &str)],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<f32>, ModelError> {
        let ids = self.pair_ids(pairs)?;
        self.score_ids(&ids, batch_size, progress)
    }
}

/// `classifier(dropout(tanh(pooler(hidden[:, 0]))))`, one logit per row. `weights`: pooler
/// weight and bias, classifier weight and bias.
fn classify(
    hidden: &Tensor,
    [
        pooler_weight,
        pooler_bias,
        classifier_weight,
        classifier_bias,
    ]: [&Tensor; 4],
    dropout: Option<Dropout>,
) -> candle_core::Result<Tensor> {
    let first = hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
    let pooled = kernels::linear(&first, pooler_weight, pooler_bias)?.tanh()?;
    let pooled = match dropout {
        Some(dropout) => kernels::dropout(&pooled, dropout)?,
        None => pooled,
    };
    kernels::linear(&pooled, classifier_weight, classifier_bias)?.squeeze(1)
}

impl Head {
    /// The head from the checkpoint's tensors (canonical names), seeding what is missing.
    fn build(
        config: &BertConfig,
        head_config: &HeadConfig,
        mut tensors: BTreeMap<String, Tensor>,
        seed: u64,
        path: &Path,
        device: &Device,
    ) -> Result<(Self, HeadOrigin), ModelError> {
        let hidden = config.hidden_size;
        let has_classifier = tensors.contains_key("classifier.weight");
        if has_classifier && head_config.num_labels.is_some_and(|n| n != 1) {
            return Err(ModelError::UnsupportedConfig {
                path: path.with_file_name("config.json"),
                key: "num_labels".to_owned(),
                value: head_config.num_labels.unwrap_or_default().to_string(),
                supported: "1 (a relevance score)".to_owned(),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut take = |name: &str, shape: &[usize], weight: bool| {
            let tensor = match tensors.remove(name) {
                Some(tensor) => {
                    if tensor.dims() != shape {
                        return Err(ModelError::ShapeMismatch {
                            name: name.to_owned(),
                            expected: shape.to_vec(),
                            got: tensor.dims().to_vec(),
                        });
                    }
                    tensor
                        .to_device(device)
                        .during(|| format!("loading `{name}`"))?
                }
                None if weight => {
                    normal_tensor(&mut rng, shape, head_config.initializer_range, device)
                        .during(|| format!("initialising `{name}`"))?
                }
                None => Tensor::zeros(shape, DType::F32, device)
                    .during(|| format!("initialising `{name}`"))?,
            };
            tensor
                .to_dtype(DType::F32)
                .and_then(|t| Var::from_tensor(&t))
                .during(|| format!("making `{name}` trainable"))
        };
        // The pooler first: a seeded classifier draws the same values whether or not the
        // checkpoint had a pooler to skip.
        let pooler_weight = take("pooler.dense.weight", &[hidden, hidden], true)?;
        let pooler_bias = take("pooler.dense.bias", &[hidden], false)?;
        let classifier_weight = take("classifier.weight", &[1, hidden], true)?;
        let classifier_bias = take("classifier.bias", &[1], false)?;
        let head = Self {
            pooler_weight,
            pooler_bias,
            classifier_weight,
            classifier_bias,
            dropout: head_config
                .classifier_dropout
                .unwrap_or(config.hidden_dropout_prob),
        };
        let origin = if has_classifier {
            HeadOrigin::Loaded
        } else {
            HeadOrigin::Seeded(seed)
        };
        Ok((head, origin))
    }
}

/// A tensor of N(0, std²) draws (Box–Muller over the seeded stream).
fn normal_tensor(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    std: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random();
            let z = (-2. * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (z * std) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, device)
}

/// `model_max_length` of `tokenizer_config.json`, where the folder's cross-encoder length lives
/// (sentence-transformers' `CrossEncoder` saves `max_length` there); transformers writes a huge
/// sentinel when there is no limit, which is ignored.
fn tokenizer_config_limit(dir: &Path) -> Option<usize> {
    #[derive(Deserialize)]
    struct TokenizerConfig {
        model_max_length: Option<f64>,
    }
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return None;
    }
    let config: TokenizerConfig = read_json(&path).ok()?;
    config
        .model_max_length
        .filter(|n| *n >= 2. && *n <= 1e6)
        .map(|n| n as usize)
}

#[cfg(test)]
mod tests;
