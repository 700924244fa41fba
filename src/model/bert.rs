//! A trainable BERT encoder (the transformer under sentence-transformers' BERT-family models).
//!
//! Ported from Hugging Face transformers' `BertModel`
//! (<https://github.com/huggingface/transformers/blob/v4.44.2/src/transformers/models/bert/modeling_bert.py>):
//! embeddings (word + absolute position + token type, LayerNorm, dropout), then per layer
//! self-attention, output dense + dropout + residual LayerNorm, intermediate dense + GELU, output
//! dense + dropout + residual LayerNorm. No pooler: sentence-transformers pools the token states
//! itself, but a checkpoint's pooler weights are kept (see [`Bert::extra_tensors`]) so a saved
//! model holds every original key.
//!
//! The same code runs MPNet (`model_type: mpnet`, all-mpnet-base-v2), whose layers compute the
//! same thing under other names, with no token types, shifted positions and a relative-position
//! bias in attention: see [`crate::model::mpnet`].
//!
//! Why not `candle_transformers::models::bert::BertModel`: its LayerNorm and softmax are fused
//! ops registered without a backward, so `backward()` succeeds with zero gradients for everything
//! before them. Here the ops go through [`crate::model::kernels`], which are differentiable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::model::checkpoint::Checkpoint;
use crate::model::config_file::read_json;
use crate::model::error::{CandleContext, ModelError};
use crate::model::kernels::bf16::Bf16Linear;
use crate::model::kernels::{
    self, Dropout, LayerDropouts, LayerParams, LayerShape, LinearParams, NormParams,
};
use crate::model::mpnet;

/// The fields of a Hugging Face `config.json` that a BERT needs; other keys are ignored.
///
/// Optional fields default as `transformers.BertConfig` does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default)]
    pub position_embedding_type: PositionEmbeddingType,
    /// `bert` or `mpnet` when given; other architectures (`roberta`, `xlm-roberta`, …) are
    /// refused rather than silently run as BERT.
    #[serde(default)]
    pub model_type: Option<ModelType>,
    /// MPNet's number of relative-position buckets (ignored for BERT).
    #[serde(default = "default_relative_attention_num_buckets")]
    pub relative_attention_num_buckets: usize,
}

/// The activation of the intermediate layer. Only BERT's exact (erf) GELU is implemented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    #[default]
    Gelu,
}

/// How positions are embedded. Only learned absolute positions are implemented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionEmbeddingType {
    #[default]
    Absolute,
}

/// The architectures this module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Bert,
    /// See [`crate::model::mpnet`].
    Mpnet,
}

fn default_relative_attention_num_buckets() -> usize {
    32
}

fn default_max_position_embeddings() -> usize {
    512
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_dropout() -> f32 {
    0.1
}

impl BertConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_json(path)?;
        let bad = |key: &str, message: String| ModelError::BadConfig {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide `hidden_size` {}",
                    config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        for (key, p) in [
            ("hidden_dropout_prob", config.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                config.attention_probs_dropout_prob,
            ),
        ] {
            if !(0. ..1.).contains(&p) {
                return Err(bad(key, format!("{p} is not a probability in [0, 1)")));
            }
        }
        if config.type_vocab_size == 0 {
            return Err(bad("type_vocab_size", "must be at least 1".to_owned()));
        }
        if config.is_mpnet() && config.relative_attention_num_buckets < 4 {
            return Err(bad(
                "relative_attention_num_buckets",
                format!(
                    "{} buckets leave none for longer distances",
                    config.relative_attention_num_buckets
                ),
            ));
        }
        if config.max_sequence_length() < 2 {
            return Err(bad(
                "max_position_embeddings",
                format!(
                    "{} positions leave no room for a token",
                    config.max_position_embeddings
                ),
            ));
        }
        Ok(config)
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Whether this is an MPNet ([`crate::model::mpnet`]).
    pub fn is_mpnet(&self) -> bool {
        self.model_type == Some(ModelType::Mpnet)
    }

    /// The row of the position table the first token takes: 0 for BERT, `pad_token_id + 1` for
    /// MPNet.
    pub(crate) fn position_offset(&self) -> usize {
        if self.is_mpnet() {
            self.pad_token_id as usize + 1
        } else {
            0
        }
    }

    /// The most tokens (special tokens included) one input may have.
    pub fn max_sequence_length(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Whether the model has segment embeddings (BERT does; MPNet does not).
    pub fn has_token_types(&self) -> bool {
        !self.is_mpnet()
    }
}

/// A dense layer's parameters, PyTorch layout (`weight` is `[out, in]`).
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// All parameters of the model as tensors. The model holds two copies over the same storage: one
/// whose tensors are the `Var`s (a forward pass records a graph back to them) and one detached
/// (a forward pass records nothing), so inference never builds or keeps a backward graph.
#[derive(Debug, Clone)]
struct Weights {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    /// `None` for MPNet, which has no segments.
    token_type_embeddings: Option<Tensor>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    /// MPNet's `[buckets, heads]` relative-position bias table; `None` for BERT.
    relative_attention_bias: Option<Tensor>,
}

/// Gets one parameter by checkpoint name and expected shape.
type Fetch<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor, ModelError> + 'a;

impl Linear {
    fn fetch(
        fetch: &mut Fetch<'_>,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: fetch(&format!("{name}.weight"), &[out, inp])?,
            bias: fetch(&format!("{name}.bias"), &[out])?,
        })
    }
}

impl LayerNorm {
    fn fetch(fetch: &mut Fetch<'_>, name: &str, width: usize) -> Result<Self, ModelError> {
        Ok(Self {
            gamma: fetch(&format!("{name}.weight"), &[width])?,
            beta: fetch(&format!("{name}.bias"), &[width])?,
        })
    }
}

impl Weights {
    /// Builds the weights by asking `fetch` for each parameter. This is the one place that knows
    /// the checkpoint names and shapes; loading, the detached copy and tests all go through it.
    fn build(config: &BertConfig, fetch: &mut Fetch<'_>) -> Result<Self, ModelError> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let word_embeddings = fetch(
            "embeddings.word_embeddings.weight",
            &[config.vocab_size, hidden],
        )?;
        let position_embeddings = fetch(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, hidden],
        )?;
        let token_type_embeddings = if config.has_token_types() {
            Some(fetch(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, hidden],
            )?)
        } else {
            None
        };
        let embeddings_norm = LayerNorm::fetch(fetch, "embeddings.LayerNorm", hidden)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let names = if config.is_mpnet() {
                    mpnet::layer_names(i)
                } else {
                    bert_layer_names(i)
                };
                Ok(Layer {
                    query: Linear::fetch(fetch, &names.query, hidden, hidden)?,
                    key: Linear::fetch(fetch, &names.key, hidden, hidden)?,
                    value: Linear::fetch(fetch, &names.value, hidden, hidden)?,
                    attention_output: Linear::fetch(
                        fetch,
                        &names.attention_output,
                        hidden,
                        hidden,
                    )?,
                    attention_norm: LayerNorm::fetch(fetch, &names.attention_norm, hidden)?,
                    intermediate: Linear::fetch(fetch, &names.intermediate, inter, hidden)?,
                    output: Linear::fetch(fetch, &names.output, hidden, inter)?,
                    output_norm: LayerNorm::fetch(fetch, &names.output_norm, hidden)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let relative_attention_bias = if config.is_mpnet() {
            Some(fetch(
                mpnet::RELATIVE_ATTENTION_BIAS,
                &[
                    config.relative_attention_num_buckets,
                    config.num_attention_heads,
                ],
            )?)
        } else {
            None
        };
        Ok(Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            relative_attention_bias,
        })
    }
}

/// Where one layer's weights live in a checkpoint (each name without `.weight`/`.bias`).
pub(crate) struct LayerNames {
    pub(crate) query: String,
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) attention_output: String,
    pub(crate) attention_norm: String,
    pub(crate) intermediate: String,
    pub(crate) output: String,
    pub(crate) output_norm: String,
}

/// BERT's checkpoint names of layer `i`'s parameters.
fn bert_layer_names(i: usize) -> LayerNames {
    let name = |part: &str| format!("encoder.layer.{i}.{part}");
    LayerNames {
        query: name("attention.self.query"),
        key: name("attention.self.key"),
        value: name("attention.self.value"),
        attention_output: name("attention.output.dense"),
        attention_norm: name("attention.output.LayerNorm"),
        intermediate: name("intermediate.dense"),
        output: name("output.dense"),
        output_norm: name("output.LayerNorm"),
    }
}

/// A BERT whose parameters are trainable `Var`s in a [`VarMap`], named as in the checkpoint
/// (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, …).
pub struct Bert {
    config: BertConfig,
    vars: VarMap,
    tracked: Weights,
    detached: Weights,
    /// The linear layers in bf16 for inference, once [`Bert::pack_bf16`] made them.
    packed: Option<Vec<PackedLayer>>,
    extra: BTreeMap<String, Tensor>,
    dropout_rng: Mutex<ChaCha8Rng>,
}

/// One layer's linear layers packed in bf16 ([`Bert::pack_bf16`]); queries, keys and values in
/// one product as the f32 pass has them.
struct PackedLayer {
    qkv: Bf16Linear,
    attention_output: Bf16Linear,
    intermediate: Bf16Linear,
    output: Bf16Linear,
}

impl PackedLayer {
    fn pack(layer: &Layer) -> candle_core::Result<Self> {
        let pack = |weights: &[&Tensor], biases: &[&Tensor]| -> candle_core::Result<Bf16Linear> {
            let weight = Tensor::cat(weights, 0)?.to_dtype(DType::F32)?;
            let (out, inputs) = weight.dims2()?;
            let bias = Tensor::cat(biases, 0)?.to_dtype(DType::F32)?.to_vec1()?;
            Ok(Bf16Linear::new(
                &weight.flatten_all()?.to_vec1()?,
                bias,
                out,
                inputs,
            ))
        };
        let one = |linear: &Linear| pack(&[&linear.weight], &[&linear.bias]);
        let (q, k, v) = (&layer.query, &layer.key, &layer.value);
        Ok(Self {
            qkv: pack(
                &[&q.weight, &k.weight, &v.weight],
                &[&q.bias, &k.bias, &v.bias],
            )?,
            attention_output: one(&layer.attention_output)?,
            intermediate: one(&layer.intermediate)?,
            output: one(&layer.output)?,
        })
    }
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bert")
            .field("config", &self.config)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The dropout seed a model starts with, until [`Bert::reseed_dropout`].
const DEFAULT_DROPOUT_SEED: u64 = 0;

/// Checkpoint names as this module uses them: without the `bert.` (`mpnet.`) prefix that task
/// heads (`BertForMaskedLM`, `MPNetForMaskedLM`, …) add, and with `LayerNorm.weight`/`.bias` for the TensorFlow-era
/// `LayerNorm.gamma`/`.beta` that the original `bert-base-*` checkpoints still use.
pub(crate) fn canonical_name(name: &str) -> String {
    let name = name
        .strip_prefix("bert.")
        .or_else(|| name.strip_prefix("mpnet."))
        .unwrap_or(name);
    if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        name.to_owned()
    }
}

impl Bert {
    /// Loads `config.json` and the weights (see [`Checkpoint::read_dir`]) of a model folder, in
    /// f32 whatever the checkpoint's float type.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::read_dir(dir, device)?;
        Self::from_checkpoint(config, checkpoint, DType::F32, device)
    }

    /// Builds the model from checkpoint tensors, converted to `dtype`. Every parameter the config
    /// implies must be there with its shape; tensors that are not parameters (the pooler, buffers
    /// such as `position_ids`, task heads) are kept as they are in [`Bert::extra_tensors`].
    pub fn from_checkpoint(
        config: BertConfig,
        checkpoint: Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let Checkpoint { path, tensors } = checkpoint;
        let mut remaining: BTreeMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, tensor)| (canonical_name(&name), tensor))
            .collect();
        let vars = VarMap::new();
        let tracked = {
            let mut data = vars
                .data()
                .lock()
                .expect("the var map is new and its lock never poisoned");
            Weights::build(&config, &mut |name, shape| {
                let tensor = remaining
                    .remove(name)
                    .ok_or_else(|| ModelError::MissingWeight {
                        name: name.to_owned(),
                        path: path.clone(),
                    })?;
                if tensor.dims() != shape {
                    return Err(ModelError::ShapeMismatch {
                        name: name.to_owned(),
                        expected: shape.to_vec(),
                        got: tensor.dims().to_vec(),
                    });
                }
                if !tensor.dtype().is_float() {
                    return Err(ModelError::NotAFloat {
                        name: name.to_owned(),
                        dtype: tensor.dtype().as_str().to_owned(),
                    });
                }
                let var = tensor
                    .to_device(device)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| Var::from_tensor(&t))
                    .during(|| format!("making `{name}` trainable"))?;
                let tensor = var.as_tensor().clone();
                data.insert(name.to_owned(), var);
                Ok(tensor)
            })?
        };
        let detached = {
            let data = vars
                .data()
                .lock()
                .expect("the var map's lock is only taken in this function");
            Weights::build(&config, &mut |name, _| {
                Ok(data
                    .get(name)
                    .expect("the tracked weights were built from the same names")
                    .as_detached_tensor())
            })?
        };
        Ok(Self {
            config,
            vars,
            tracked,
            detached,
            packed: None,
            extra: remaining,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(DEFAULT_DROPOUT_SEED)),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Packs the linear layers' weights in bf16 ([`Bf16Linear`]): from here on inference
    /// ([`Bert::forward_no_grad`]) multiplies in bf16, attention's products too where the CPU
    /// multiplies bf16 itself, 1.9x faster on a Zen 4's AVX-512 BF16, and within bf16 rounding
    /// of f32. The packed copy is
    /// taken now: call it on a model that no longer trains (training passes keep using the f32
    /// parameters, and an update would not reach the copy).
    pub fn pack_bf16(&mut self) -> Result<(), ModelError> {
        let packed = self
            .detached
            .layers
            .iter()
            .map(PackedLayer::pack)
            .collect::<candle_core::Result<Vec<_>>>()
            .during(|| "packing the linear layers in bf16".to_owned())?;
        self.packed = Some(packed);
        Ok(())
    }

    /// The engine that multiplies the linear layers in bf16 after [`Bert::pack_bf16`]; `None`
    /// before (f32).
    pub fn bf16_engine(&self) -> Option<&'static str> {
        let layer = self.packed.as_ref()?.first()?;
        Some(layer.qkv.weights().engine())
    }

    /// The trainable parameters, by checkpoint name. An optimiser updates them in place
    /// (`Var::set`); the detached copy inference uses shares their storage and sees each update.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// The trainable parameters by checkpoint name, in name order. The map is only ever locked
    /// to read or insert whole entries, so a lock poisoned by a panic elsewhere still holds a
    /// valid map and is recovered.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        self.vars
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect()
    }

    /// The checkpoint's tensors that are not parameters of this model (pooler, buffers, task
    /// heads), unchanged, to be written back when the model is saved.
    pub fn extra_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.extra
    }

    pub fn dtype(&self) -> DType {
        self.tracked.word_embeddings.dtype()
    }

    pub fn device(&self) -> &Device {
        self.tracked.word_embeddings.device()
    }

    /// Restarts the dropout masks' random stream: two runs reseeded alike draw the same masks.
    pub fn reseed_dropout(&self, seed: u64) {
        *self.lock_dropout_rng() = ChaCha8Rng::seed_from_u64(seed);
    }

    fn lock_dropout_rng(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        // A panic while drawing seeds leaves the generator in a valid state: recover it.
        self.dropout_rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last hidden states `[batch, seq, hidden]` of `input_ids` (`[batch, seq]`, u32) under
    /// `attention_mask` (`[batch, seq]`, 1 for tokens and 0 for padding, any dtype), recording
    /// the graph for `backward()`. `train` turns dropout on, with masks from the model's seeded
    /// stream ([`Bert::reseed_dropout`]). Every token has type 0 (one sentence).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        self.forward_segments(input_ids, None, attention_mask, train)
    }

    /// [`Bert::forward`] with each token's segment: `token_type_ids` (`[batch, seq]`, u32, each
    /// below `type_vocab_size`) as a cross-encoder numbers `[CLS] query [SEP]` 0 and
    /// `passage [SEP]` 1; `None` is all 0.
    pub fn forward_segments(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        self.check_inputs(input_ids, token_type_ids, attention_mask)?;
        let inputs = Inputs {
            input_ids,
            token_type_ids,
            attention_mask,
        };
        let result = if train {
            let mut rng = self.lock_dropout_rng();
            let mut seeds = || rng.next_u64();
            run(&self.config, &self.tracked, None, inputs, Some(&mut seeds))
        } else {
            run(&self.config, &self.tracked, None, inputs, None)
        };
        result.during(|| "the bert forward pass".to_owned())
    }

    /// [`Bert::forward`] for inference: no dropout, and no graph recorded, so intermediate
    /// activations are freed as soon as the next op has used them.
    pub fn forward_no_grad(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.forward_segments_no_grad(input_ids, None, attention_mask)
    }

    /// [`Bert::forward_segments`] for inference, as [`Bert::forward_no_grad`].
    pub fn forward_segments_no_grad(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.check_inputs(input_ids, token_type_ids, attention_mask)?;
        let inputs = Inputs {
            input_ids,
            token_type_ids,
            attention_mask,
        };
        let packed = self.packed.as_deref();
        run(&self.config, &self.detached, packed, inputs, None)
            .during(|| "the bert forward pass".to_owned())
    }

    /// The next seed of the model's dropout stream, for dropout a task head applies after the
    /// encoder (a cross-encoder's classifier), so one seed replays a whole training step.
    pub fn next_dropout_seed(&self) -> u64 {
        self.lock_dropout_rng().next_u64()
    }

    fn check_inputs(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<(), ModelError> {
        let invalid = |name, why| Err(ModelError::InvalidArgument { name, why });
        let [_, seq] = input_ids.dims() else {
            return invalid(
                "input_ids",
                format!("shape {:?} is not [batch, seq]", input_ids.dims()),
            );
        };
        if input_ids.dtype() != DType::U32 {
            return invalid(
                "input_ids",
                format!("dtype `{}` is not `u32`", input_ids.dtype().as_str()),
            );
        }
        if attention_mask.dims() != input_ids.dims() {
            return invalid(
                "attention_mask",
                format!(
                    "shape {:?} differs from `input_ids` {:?}",
                    attention_mask.dims(),
                    input_ids.dims()
                ),
            );
        }
        if token_type_ids.is_some() && !self.config.has_token_types() {
            return invalid(
                "token_type_ids",
                "this architecture has no token types".to_owned(),
            );
        }
        if let Some(types) = token_type_ids
            && (types.dims() != input_ids.dims() || types.dtype() != DType::U32)
        {
            return invalid(
                "token_type_ids",
                format!(
                    "shape {:?} and dtype `{}` are not `input_ids`' {:?} and `u32`",
                    types.dims(),
                    types.dtype().as_str(),
                    input_ids.dims()
                ),
            );
        }
        if *seq > self.config.max_sequence_length() {
            return invalid(
                "input_ids",
                format!(
                    "{seq} tokens exceed the {} that `max_position_embeddings` {} allows",
                    self.config.max_sequence_length(),
                    self.config.max_position_embeddings
                ),
            );
        }
        Ok(())
    }
}

/// Draws the seed of each dropout mask in turn (the embeddings', then per layer the attention
/// probabilities' and both residual branches'); `None` runs without dropout.
type Seeds<'a> = Option<&'a mut dyn FnMut() -> u64>;

fn maybe_dropout(x: Tensor, p: f32, seeds: &mut Seeds<'_>) -> candle_core::Result<Tensor> {
    match seeds {
        Some(next) if p > 0. => kernels::dropout(&x, Dropout { p, seed: next() }),
        _ => Ok(x),
    }
}

/// One batch of a forward pass.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    input_ids: &'a Tensor,
    /// `None`: every token has type 0.
    token_type_ids: Option<&'a Tensor>,
    attention_mask: &'a Tensor,
}

/// The forward pass; with `packed` (inference only) the linear layers multiply in bf16.
fn run(
    config: &BertConfig,
    weights: &Weights,
    packed: Option<&[PackedLayer]>,
    inputs: Inputs<'_>,
    mut seeds: Seeds<'_>,
) -> candle_core::Result<Tensor> {
    let Inputs {
        input_ids,
        token_type_ids,
        attention_mask,
    } = inputs;
    let (batch, seq) = input_ids.dims2()?;
    let hidden = config.hidden_size;
    let dtype = weights.word_embeddings.dtype();

    // Embeddings. A single sentence has every token type 0: one row of the token-type table,
    // broadcast, instead of an index_select over an all-zero id tensor.
    let words = weights
        .word_embeddings
        .index_select(&input_ids.flatten_all()?, 0)?
        .reshape((batch, seq, hidden))?;
    let positions = weights
        .position_embeddings
        .narrow(0, config.position_offset(), seq)?;
    let embedded = match (&weights.token_type_embeddings, token_type_ids) {
        (None, _) => words.broadcast_add(&positions)?,
        (Some(table), None) => {
            words.broadcast_add(&positions.broadcast_add(&table.narrow(0, 0, 1)?)?)?
        }
        (Some(table), Some(types)) => {
            let types = table
                .index_select(&types.flatten_all()?, 0)?
                .reshape((batch, seq, hidden))?;
            (words + types)?.broadcast_add(&positions)?
        }
    };
    let norm = &weights.embeddings_norm;
    let embedded = kernels::layer_norm(&embedded, &norm.gamma, &norm.beta, config.layer_norm_eps)?;
    let mut x = maybe_dropout(embedded, config.hidden_dropout_prob, &mut seeds)?;

    // 0 where attended, the most negative float where padded (as transformers' `finfo.min`), so
    // padding gets exactly zero probability. Built once, broadcast over heads and query rows.
    let mask_bias = attention_mask
        .to_dtype(dtype)?
        .affine(-f64::from(f32::MIN), f64::from(f32::MIN))?
        .reshape((batch, 1, 1, seq))?;
    let heads = config.num_attention_heads;
    let scale = 1. / (config.head_dim() as f64).sqrt();
    // MPNet: one `[heads, seq, seq]` bias for every layer and sequence.
    let position_bias = weights
        .relative_attention_bias
        .as_ref()
        .map(|table| mpnet::position_bias(table, seq))
        .transpose()?;
    let shape = LayerShape {
        heads,
        scale,
        eps: config.layer_norm_eps,
    };
    for (i, layer) in weights.layers.iter().enumerate() {
        // Seeds in the order the layer applies them: the attention probabilities', then each
        // half's output.
        let mut draw = |p: f32| match &mut seeds {
            Some(next) if p > 0. => Some(Dropout { p, seed: next() }),
            _ => None,
        };
        let dropouts = LayerDropouts {
            probs: draw(config.attention_probs_dropout_prob),
            attention_output: draw(config.hidden_dropout_prob),
            output: draw(config.hidden_dropout_prob),
        };
        x = match packed.map(|layers| &layers[i]) {
            Some(packed) => {
                packed_layer(&x, layer, packed, &mask_bias, position_bias.as_ref(), shape)?
            }
            None => kernels::bert_layer(
                &x,
                &layer.params(),
                &mask_bias,
                position_bias.as_ref(),
                shape,
                dropouts,
            )?,
        };
    }
    Ok(x)
}

/// One layer for inference with its linear layers packed in bf16 (no dropout): each residual
/// is added inside the product before it.
fn packed_layer(
    x: &Tensor,
    layer: &Layer,
    packed: &PackedLayer,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    shape: LayerShape,
) -> candle_core::Result<Tensor> {
    let qkv = kernels::linear_bf16(x, &packed.qkv, None)?;
    let context =
        kernels::attention_bf16(&qkv, mask_bias, position_bias, shape.heads, shape.scale)?;
    let attended = kernels::linear_bf16(&context, &packed.attention_output, Some(x))?;
    let norm = &layer.attention_norm;
    let attended = kernels::layer_norm(&attended, &norm.gamma, &norm.beta, shape.eps)?;
    let output = kernels::feed_forward_bf16(&attended, &packed.intermediate, &packed.output)?;
    let norm = &layer.output_norm;
    kernels::layer_norm(&output, &norm.gamma, &norm.beta, shape.eps)
}

impl Layer {
    /// The parameters as the kernels take them.
    fn params(&self) -> LayerParams<'_> {
        fn linear(l: &Linear) -> LinearParams<'_> {
            LinearParams {
                weight: &l.weight,
                bias: &l.bias,
            }
        }
        fn norm(n: &LayerNorm) -> NormParams<'_> {
            NormParams {
                gamma: &n.gamma,
                beta: &n.beta,
            }
        }
        LayerParams {
            query: linear(&self.query),
            key: linear(&self.key),
            value: linear(&self.value),
            attention_output: linear(&self.attention_output),
            attention_norm: norm(&self.attention_norm),
            intermediate: linear(&self.intermediate),
            output: linear(&self.output),
            output_norm: norm(&self.output_norm),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::pooling::{Pooling, PoolingMode};

    /// A tiny BERT's `config.json`, with keys this module ignores (as real ones have).
    const TINY_CONFIG: &str = r#"{
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50,
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 24, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "pad_token_id": 0, "initializer_range": 0.02,
        "transformers_version": "4.8.2"
    }"#;

    pub(crate) fn tiny_config() -> BertConfig {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, TINY_CONFIG).expect("write config");
        BertConfig::from_file(&path).expect("the tiny config parses")
    }

    /// Random checkpoint tensors for `config` in f64, named as a checkpoint names them, plus a
    /// pooler that is not a parameter of the model. Values are large enough (weights ~U(-0.5,
    /// 0.5), LayerNorm gammas near 1) that every gradient is far from zero.
    pub(crate) fn random_checkpoint(config: &BertConfig, seed: u64) -> Checkpoint {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        Weights::build(config, &mut |name, shape| {
            let n: usize = shape.iter().product();
            let offset = if name.ends_with("LayerNorm.weight") {
                1.
            } else {
                0.
            };
            let data: Vec<f64> = (0..n)
                .map(|_| offset + rng.random_range(-0.5..0.5))
                .collect();
            let tensor = Tensor::from_vec(data, shape, &Device::Cpu).expect("random tensor");
            tensors.insert(name.to_owned(), tensor.clone());
            Ok(tensor)
        })
        .expect("building from random tensors cannot fail");
        let hidden = config.hidden_size;
        for (name, shape) in [
            ("pooler.dense.weight", vec![hidden, hidden]),
            ("pooler.dense.bias", vec![hidden]),
        ] {
            let zeros = Tensor::zeros(shape, DType::F64, &Device::Cpu).expect("zeros");
            tensors.insert(name.to_owned(), zeros);
        }
        Checkpoint {
            path: "random-tiny-bert".into(),
            tensors,
        }
    }

    pub(crate) fn tiny_bert(dtype: DType) -> Bert {
        let config = tiny_config();
        let checkpoint = random_checkpoint(&config, 1);
        Bert::from_checkpoint(config, checkpoint, dtype, &Device::Cpu).expect("tiny bert builds")
    }

    /// Three sequences of lengths 7, 4 and 2 (`[CLS]`-like 1 first), padded with 0 to 7.
    pub(crate) fn tiny_batch() -> (Tensor, Tensor) {
        let rows: [&[u32]; 3] = [&[1, 5, 9, 13, 44, 2, 3], &[1, 7, 30, 3], &[1, 3]];
        let mut ids = vec![0u32; 3 * 7];
        let mut mask = vec![0u32; 3 * 7];
        for (r, row) in rows.iter().enumerate() {
            ids[r * 7..r * 7 + row.len()].copy_from_slice(row);
            mask[r * 7..r * 7 + row.len()].fill(1);
        }
        (
            Tensor::from_vec(ids, (3, 7), &Device::Cpu).expect("ids"),
            Tensor::from_vec(mask, (3, 7), &Device::Cpu).expect("mask"),
        )
    }

    /// A scalar loss through pooling (mean, normalised): the pooled embeddings dotted with fixed
    /// random directions, so each parameter's gradient is generic (no symmetry zeroes it).
    pub(crate) fn loss(bert: &Bert, train: bool) -> Tensor {
        let (ids, mask) = tiny_batch();
        let hidden = bert.forward(&ids, &mask, train).expect("forward");
        let pooled = Pooling::new(vec![PoolingMode::Mean], true)
            .forward(&hidden, &mask)
            .expect("pooling");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let directions: Vec<f64> = (0..pooled.elem_count())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let directions = Tensor::from_vec(directions, pooled.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(pooled.dtype()))
            .expect("directions");
        (pooled * directions)
            .and_then(|t| t.sum_all())
            .expect("loss")
    }

    pub(crate) fn var(bert: &Bert, name: &str) -> Var {
        bert.vars()
            .data()
            .lock()
            .expect("lock")
            .get(name)
            .unwrap_or_else(|| panic!("no var `{name}`"))
            .clone()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .expect("a scalar")
    }

    #[test]
    fn config_tolerates_unknown_keys_and_refuses_other_architectures() {
        let config = tiny_config();
        assert_eq!(config.hidden_size, 16);
        assert_eq!(config.hidden_act, HiddenAct::Gelu);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        for (replace, key) in [
            (r#""hidden_act": "gelu""#, r#""hidden_act": "relu""#),
            (r#""model_type": "bert""#, r#""model_type": "roberta""#),
            (r#""num_attention_heads": 2"#, r#""num_attention_heads": 3"#),
            (r#""hidden_size": 16,"#, ""),
        ] {
            std::fs::write(&path, TINY_CONFIG.replace(replace, key)).expect("write");
            let error = BertConfig::from_file(&path).expect_err("a bad config");
            assert!(matches!(error, ModelError::BadConfig { .. }), "{error}");
            let field = replace.split('"').nth(1).expect("a quoted key");
            let message = error.to_string();
            assert!(message.contains(field), "`{message}` should name `{field}`");
        }
    }

    #[test]
    fn loads_prefixed_and_gamma_beta_names_and_keeps_extra_tensors() {
        let config = tiny_config();
        let Checkpoint { tensors, .. } = random_checkpoint(&config, 2);
        let renamed = tensors
            .into_iter()
            .map(|(name, t)| {
                let name = name
                    .replace("LayerNorm.weight", "LayerNorm.gamma")
                    .replace("LayerNorm.bias", "LayerNorm.beta");
                (format!("bert.{name}"), t)
            })
            .collect();
        let checkpoint = Checkpoint {
            path: "renamed".into(),
            tensors: renamed,
        };
        let bert = Bert::from_checkpoint(config, checkpoint, DType::F32, &Device::Cpu)
            .expect("prefixed, gamma/beta names load");
        assert_eq!(bert.vars().all_vars().len(), 5 + 2 * 16);
        assert!(
            bert.vars()
                .data()
                .lock()
                .expect("lock")
                .contains_key("embeddings.LayerNorm.weight")
        );
        let extra: Vec<&String> = bert.extra_tensors().keys().collect();
        assert_eq!(extra, ["pooler.dense.bias", "pooler.dense.weight"]);
        assert_eq!(bert.dtype(), DType::F32);
    }

    #[test]
    fn missing_and_misshapen_weights_are_named() {
        let config = tiny_config();
        let mut checkpoint = random_checkpoint(&config, 2);
        checkpoint
            .tensors
            .remove("encoder.layer.1.output.dense.bias");
        let error = Bert::from_checkpoint(config.clone(), checkpoint, DType::F32, &Device::Cpu)
            .expect_err("a weight is missing");
        assert!(
            error
                .to_string()
                .contains("`encoder.layer.1.output.dense.bias`"),
            "{error}"
        );

        let mut checkpoint = random_checkpoint(&config, 2);
        checkpoint.tensors.insert(
            "encoder.layer.0.attention.self.key.weight".to_owned(),
            Tensor::zeros((16, 8), DType::F32, &Device::Cpu).expect("zeros"),
        );
        let error = Bert::from_checkpoint(config, checkpoint, DType::F32, &Device::Cpu)
            .expect_err("a weight has the wrong shape");
        assert!(
            matches!(&error, ModelError::ShapeMismatch { expected, got, .. }
                if expected == &[16, 16] && got == &[16, 8]),
            "{error}"
        );
    }

    #[test]
    fn padding_does_not_change_a_sequence_and_no_grad_matches_forward() {
        let bert = tiny_bert(DType::F32);
        let (ids, mask) = tiny_batch();
        let batched = bert.forward_no_grad(&ids, &mask).expect("forward");
        let tracked = bert.forward(&ids, &mask, false).expect("forward");
        let diff = (&batched - &tracked)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        // The same weights; inference takes candle's fused f32 kernels, so only rounding differs.
        assert!(
            diff < 1e-5,
            "forward_no_grad differs from forward by {diff}"
        );

        // The 4-token row alone, unpadded, gives the same states for its real tokens.
        let alone_ids = ids
            .narrow(0, 1, 1)
            .and_then(|t| t.narrow(1, 0, 4))
            .expect("row");
        let alone_mask = mask
            .narrow(0, 1, 1)
            .and_then(|t| t.narrow(1, 0, 4))
            .expect("row");
        let alone = bert
            .forward_no_grad(&alone_ids, &alone_mask)
            .expect("forward");
        let in_batch = batched
            .narrow(0, 1, 1)
            .and_then(|t| t.narrow(1, 0, 4))
            .expect("row");
        let diff = (&alone - &in_batch)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-5, "padding changed real tokens by {diff}");
    }

    #[test]
    fn dropout_only_in_training_and_reproducible_from_its_seed() {
        let bert = tiny_bert(DType::F32);
        let (ids, mask) = tiny_batch();
        let run = |train| {
            bert.forward(&ids, &mask, train)
                .map(|t| {
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("vec")
                })
                .expect("forward")
        };
        assert_eq!(run(false), run(false));
        bert.reseed_dropout(11);
        let first = run(true);
        let second = run(true);
        assert_ne!(first, second, "the stream moves on between steps");
        assert_ne!(first, run(false), "dropout changes the output in training");
        bert.reseed_dropout(11);
        assert_eq!(first, run(true), "the same seed replays the same masks");
    }

    #[test]
    fn every_parameter_gets_a_finite_nonzero_gradient() {
        let bert = tiny_bert(DType::F32);
        bert.reseed_dropout(5);
        let grads = loss(&bert, true).backward().expect("backward");
        let vars = bert.vars().data().lock().expect("lock");
        assert_eq!(vars.len(), 5 + 2 * 16);
        for (name, var) in vars.iter() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("`{name}` got no gradient"));
            assert_eq!(grad.dims(), var.dims(), "`{name}`");
            let values = grad
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("gradient values");
            assert!(
                values.iter().all(|v| v.is_finite()),
                "`{name}` has a non-finite gradient"
            );
            let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The key bias shifts every score of a query row by the same amount, which softmax
            // ignores: its exact gradient is zero and only rounding noise is left.
            let floor = if name.ends_with("attention.self.key.bias") {
                0.
            } else {
                1e-6
            };
            assert!(
                largest > floor,
                "`{name}` has a vanishing gradient ({largest})"
            );
        }
    }

    /// Analytic gradients against central differences, in f64 and with dropout on (the same masks
    /// each time, by reseeding), so a wrong backward anywhere in the kernels, the model or pooling
    /// shows as a mismatch far above the f64 rounding noise. The tolerance, 1e-5 relative, is set
    /// by candle's GELU backward, which uses 0.398942 for 1/sqrt(2 pi) (relative error 7e-7); the
    /// central difference itself is good to ~1e-9 here.
    #[test]
    fn gradients_match_central_differences() {
        let checked = check_gradients(
            &tiny_bert(DType::F64),
            &[
                "embeddings.word_embeddings.weight",
                "embeddings.position_embeddings.weight",
                "embeddings.LayerNorm.weight",
                "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.0.attention.self.key.weight",
                "encoder.layer.0.attention.self.value.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight",
                "encoder.layer.0.attention.output.LayerNorm.bias",
                "encoder.layer.0.intermediate.dense.bias",
                "encoder.layer.1.intermediate.dense.weight",
                "encoder.layer.1.output.dense.weight",
                "encoder.layer.1.output.LayerNorm.bias",
            ],
        );
        assert_eq!(checked, 36);
    }

    /// Checks three random entries of each named parameter of `bert` (an f64 model) against
    /// central differences of [`loss`] with dropout on; returns how many were checked.
    pub(crate) fn check_gradients(bert: &Bert, names: &[&str]) -> usize {
        let seeded_loss = || {
            bert.reseed_dropout(9);
            loss(bert, true)
        };
        let grads = seeded_loss().backward().expect("backward");
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let used_tokens = [1u32, 5, 9, 13, 44, 2, 3, 7, 30];
        let first_position = bert.config().position_offset();
        let mut checked = 0;
        for &name in names {
            let var = var(bert, name);
            let width = var.dims().last().copied().unwrap_or(1);
            let grad = grads
                .get(var.as_tensor())
                .and_then(|g| g.flatten_all().ok())
                .and_then(|g| g.to_vec1::<f64>().ok())
                .unwrap_or_else(|| panic!("`{name}` got no gradient"));
            let original = var
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .expect("values");
            for _ in 0..3 {
                let index = if name.contains("word_embeddings") {
                    let token = used_tokens[rng.random_range(0..used_tokens.len())] as usize;
                    token * width + rng.random_range(0..width)
                } else if name.contains("position_embeddings") {
                    (first_position + rng.random_range(0..7)) * width + rng.random_range(0..width)
                } else if name == mpnet::RELATIVE_ATTENTION_BIAS {
                    // Only the buckets of distances within 7 tokens get a gradient.
                    let buckets = var.dims()[0];
                    let relative = rng.random_range(-6i64..=6);
                    let bucket = mpnet::relative_position_bucket(relative, buckets) as usize;
                    bucket * width + rng.random_range(0..width)
                } else {
                    rng.random_range(0..original.len())
                };
                let h = 1e-5;
                let at = |delta: f64| {
                    let mut values = original.clone();
                    values[index] += delta;
                    let tensor = Tensor::from_vec(values, var.shape(), &Device::Cpu)
                        .expect("perturbed tensor");
                    var.set(&tensor).expect("set");
                    scalar(&seeded_loss())
                };
                let numeric = (at(h) - at(-h)) / (2. * h);
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).expect("t"))
                    .expect("restore");
                let analytic = grad[index];
                assert!(
                    (analytic - numeric).abs() <= 1e-5 * numeric.abs().max(1e-2),
                    "`{name}`[{index}]: analytic {analytic}, numeric {numeric}"
                );
                assert!(
                    analytic.abs() > 1e-6,
                    "`{name}`[{index}] gradient {analytic} too small to test"
                );
                checked += 1;
            }
        }
        checked
    }
}
