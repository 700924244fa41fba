//! The decoder of the `llama` (SmolLM2, Llama, Mistral) and `qwen2` (Qwen2.5) GGUF architectures,
//! run over a ragged batch: many sequences, each with its own KV cache, advance in one forward
//! pass by stacking their new tokens as rows, so every weight matrix is read once per step for
//! the whole batch.
//!
//! No padding and no mask: the linear layers work row by row, and attention runs per row over its
//! own sequence's cache up to its position (causal by construction). A prompt's prefill and other
//! sequences' one-token decode steps share a pass. Nothing a row computes depends on the rows
//! beside it ([`crate::model::kernels::bf16`]), so a sequence decodes to the same bits alone or in
//! any batch.
//!
//! We own this code rather than use candle-transformers' `quantized_llama`, whose batches must be
//! padded to one length with no padding mask, and whose quantized products need AVX at compile
//! time. Weights are widened from their GGUF quantization to bf16 once at load
//! ([`Bf16Weights`]). Ported from llama.cpp's `llm_build_llama` / `llm_build_qwen2`
//! (ggml-org/llama.cpp `src/llama-model.cpp`): RMSNorm, rotary embeddings (`llama`: adjacent
//! pairs, as llama.cpp's converter permutes q and k for; `qwen2`: halves, "NEOX"), grouped-query
//! attention, SwiGLU feed-forward; `qwen2` adds q/k/v biases.

use std::io::{Read, Seek};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use rayon::prelude::*;

use super::LlmError;
use crate::model::kernels::bf16::{Bf16Weights, dot};
use crate::model::kernels::{exp, multiversion};

/// Positions the rotary tables cover: prompts and answers of query generation are far shorter.
const MAX_POSITIONS: usize = 8192;

/// How a head's dimensions pair up for the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotary {
    /// `(2i, 2i + 1)` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
    Adjacent,
    /// `(i, i + d/2)` (`LLAMA_ROPE_TYPE_NEOX`).
    Halves,
}

/// The shapes and constants of a model, from its GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: String,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    rms_eps: f32,
    rope_base: f32,
    rotary: Rotary,
    /// Tokens a sequence may hold (the model's context, at most [`MAX_POSITIONS`]).
    pub context: usize,
    pub vocab: usize,
}

impl Config {
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections stacked: `[(heads + 2 kv_heads) · head_dim, hidden]`.
    qkv: Bf16Weights,
    qkv_bias: Option<Vec<f32>>,
    attn_output: Bf16Weights,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: `[2 ffn, hidden]`.
    gate_up: Bf16Weights,
    down: Bf16Weights,
}

/// One sequence's keys and values, per layer. Keys are stored transposed,
/// `[kv_heads · head_dim, capacity]`, so a query's scores against consecutive positions are one
/// vectorised multiply-add per dimension (no sum across lanes per key); values as written,
/// `[position, kv_heads · head_dim]`.
pub struct KvCache {
    len: usize,
    capacity: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// New tokens of one sequence for a forward pass.
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

pub struct Transformer {
    pub config: Config,
    /// Token embeddings as bf16 rows.
    embedding: Vec<u16>,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    lm_head: Bf16Weights,
    /// `cos` and `sin` of position × frequency, `[MAX_POSITIONS, head_dim / 2]`.
    rotary_cos: Vec<f32>,
    rotary_sin: Vec<f32>,
}

fn bad(path: &Path, message: impl Into<String>) -> LlmError {
    LlmError::BadModel {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

multiversion! {
    /// `out = x / rms(x) * weight`.
    fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let mean_square = dot(x, x) / x.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }
}

multiversion! {
    /// `silu(gate) * up`, in place into `gate`.
    fn swiglu(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// What a model holds in memory once loaded, read from a GGUF file's header alone: the weights
/// (as bf16, how [`Transformer::load`] keeps them) and the KV cache per token of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub weight_bytes: u64,
    pub kv_bytes_per_token: u64,
}

impl Footprint {
    pub fn of_gguf(path: &Path) -> Result<Self, LlmError> {
        let mut file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        let content =
            Content::read(&mut file).map_err(|e| bad(path, format!("not a GGUF file: {e}")))?;
        let config = Config::read(&content, path)?;
        let parameters: usize = content
            .tensor_infos
            .values()
            .map(|info| info.shape.elem_count())
            .sum();
        Ok(Self {
            weight_bytes: parameters as u64 * 2,
            // Keys and values, f32, every layer.
            kv_bytes_per_token: (config.layers * config.kv_width() * 2 * 4) as u64,
        })
    }
}

impl Config {
    /// The model's shape from GGUF metadata; only `llama` and `qwen2` are supported.
    fn read(content: &Content, path: &Path) -> Result<Self, LlmError> {
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let rotary = match architecture.as_str() {
            "llama" => Rotary::Adjacent,
            "qwen2" => Rotary::Halves,
            other => {
                return Err(bad(
                    path,
                    format!(
                        "architecture `{other}` is not supported (llama: SmolLM2, Llama, Mistral; qwen2: Qwen2.5)"
                    ),
                ));
            }
        };
        let number = |key: &str| -> Result<Option<f64>, LlmError> {
            let Some(value) = content.metadata.get(&format!("{architecture}.{key}")) else {
                return Ok(None);
            };
            value
                .to_u32()
                .map(f64::from)
                .or_else(|_| value.to_u64().map(|v| v as f64))
                .or_else(|_| value.to_f32().map(f64::from))
                .map(Some)
                .map_err(|e| bad(path, format!("`{architecture}.{key}`: {e}")))
        };
        let required = |key: &str| -> Result<usize, LlmError> {
            number(key)?
                .map(|v| v as usize)
                .ok_or_else(|| bad(path, format!("no `{architecture}.{key}`")))
        };
        let hidden = required("embedding_length")?;
        let heads = required("attention.head_count")?;
        let kv_heads = number("attention.head_count_kv")?.map_or(heads, |v| v as usize);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || hidden % heads != 0 {
            return Err(bad(
                path,
                format!("{heads} heads and {kv_heads} key/value heads do not fit {hidden} wide"),
            ));
        }
        let embedding_info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| bad(path, "no `token_embd.weight`"))?;
        let vocab = embedding_info.shape.dims()[0];
        Ok(Self {
            architecture: architecture.clone(),
            hidden,
            layers: required("block_count")?,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn: required("feed_forward_length")?,
            rms_eps: number("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
            rope_base: number("rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rotary,
            context: required("context_length")?.min(MAX_POSITIONS),
            vocab,
        })
    }
}

impl Transformer {
    /// Reads a `llama` or `qwen2` model from GGUF `content` (the file at `path`, open as `file`).
    pub fn load<R: Read + Seek>(
        content: &Content,
        file: &mut R,
        path: &Path,
    ) -> Result<Self, LlmError> {
        let config = Config::read(content, path)?;
        let hidden = config.hidden;
        let mut tensors = Tensors {
            content,
            file,
            path,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let name = |part: &str| format!("blk.{i}.{part}");
            let qkv_names = ["attn_q", "attn_k", "attn_v"].map(|p| name(&format!("{p}.weight")));
            let qkv = tensors.matrix(&qkv_names, hidden)?;
            let expected = (config.heads + 2 * config.kv_heads) * config.head_dim;
            if qkv.out_features() != expected {
                return Err(bad(
                    path,
                    format!("layer {i}: q, k and v are not {expected} wide"),
                ));
            }
            let qkv_bias = if content.tensor_infos.contains_key(&name("attn_q.bias")) {
                let mut bias = Vec::with_capacity(expected);
                for p in ["attn_q", "attn_k", "attn_v"] {
                    bias.extend(tensors.read(&name(&format!("{p}.bias")))?.0);
                }
                Some(bias)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: tensors.read(&name("attn_norm.weight"))?.0,
                qkv,
                qkv_bias,
                attn_output: tensors.matrix(&[name("attn_output.weight")], hidden)?,
                ffn_norm: tensors.read(&name("ffn_norm.weight"))?.0,
                gate_up: tensors
                    .matrix(&[name("ffn_gate.weight"), name("ffn_up.weight")], hidden)?,
                down: tensors.matrix(&[name("ffn_down.weight")], config.ffn)?,
            });
        }
        let (embedding, _) = tensors.read("token_embd.weight")?;
        let head_name = if content.tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let lm_head = tensors.matrix(&[head_name.to_owned()], hidden)?;
        let half_dim = config.head_dim / 2;
        let (mut rotary_cos, mut rotary_sin) = (
            Vec::with_capacity(MAX_POSITIONS * half_dim),
            Vec::with_capacity(MAX_POSITIONS * half_dim),
        );
        for pos in 0..MAX_POSITIONS {
            for i in 0..half_dim {
                let frequency = config
                    .rope_base
                    .powf(-((2 * i) as f32) / config.head_dim as f32);
                let angle = pos as f32 * frequency;
                rotary_cos.push(angle.cos());
                rotary_sin.push(angle.sin());
            }
        }
        Ok(Self {
            embedding: embedding
                .par_iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect(),
            layers,
            output_norm: tensors.read("output_norm.weight")?.0,
            lm_head,
            rotary_cos,
            rotary_sin,
            config,
        })
    }

    /// What multiplies the weights (`AMX bf16`, or the portable loop).
    pub fn engine(&self) -> &'static str {
        self.lm_head.engine()
    }

    /// An empty cache for a sequence of up to `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let width = self.config.kv_width();
        KvCache {
            len: 0,
            capacity,
            keys: (0..self.config.layers)
                .map(|_| vec![0f32; capacity * width])
                .collect(),
            values: (0..self.config.layers)
                .map(|_| Vec::with_capacity(capacity * width))
                .collect(),
        }
    }

    /// Appends each segment's tokens to its sequence and returns the next-token logits after
    /// each segment's last token (`[vocab]` each). Segments must have at least one token each
    /// and fit the context.
    pub fn forward(&self, segments: &mut [Segment]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (hidden, head_dim, kv_width) = (c.hidden, c.head_dim, c.kv_width());
        let q_width = c.heads * head_dim;
        let qkv_width = q_width + 2 * kv_width;
        // (segment, position) of each row.
        let rows: Vec<(usize, usize)> = segments
            .iter()
            .enumerate()
            .flat_map(|(s, seg)| (0..seg.tokens.len()).map(move |i| (s, seg.cache.len + i)))
            .collect();
        let total = rows.len();
        let mut h = vec![0f32; total * hidden];
        for (row, &token) in h
            .chunks_exact_mut(hidden)
            .zip(segments.iter().flat_map(|s| s.tokens.iter()))
        {
            let embedding = &self.embedding[token as usize * hidden..(token as usize + 1) * hidden];
            for (v, &bits) in row.iter_mut().zip(embedding) {
                *v = f32::from_bits(u32::from(bits) << 16);
            }
        }
        let mut normed = vec![0f32; total * hidden];
        for (l, layer) in self.layers.iter().enumerate() {
            self.norm_rows(&h, &layer.attn_norm, &mut normed);
            let mut qkv = layer.qkv.forward(&normed, total);
            qkv.par_chunks_mut(qkv_width)
                .zip(&rows)
                .for_each(|(row, &(_, pos))| {
                    if let Some(bias) = &layer.qkv_bias {
                        for (v, b) in row.iter_mut().zip(bias) {
                            *v += b;
                        }
                    }
                    for head in row[..q_width + kv_width].chunks_exact_mut(head_dim) {
                        self.rotate(head, pos);
                    }
                });
            let mut row_of = rows.iter().zip(qkv.chunks_exact(qkv_width));
            for segment in segments.iter_mut() {
                let cache = &mut *segment.cache;
                for (&(_, pos), row) in row_of.by_ref().take(segment.tokens.len()) {
                    for (d, &key) in row[q_width..q_width + kv_width].iter().enumerate() {
                        cache.keys[l][d * cache.capacity + pos] = key;
                    }
                    cache.values[l].extend_from_slice(&row[q_width + kv_width..]);
                }
            }
            let caches: Vec<&KvCache> = segments.iter().map(|s| &*s.cache).collect();
            let mut attended = vec![0f32; total * q_width];
            attended
                .par_chunks_mut(q_width)
                .zip(qkv.par_chunks(qkv_width))
                .zip(&rows)
                .for_each_init(Vec::new, |scores, ((out, row), &(s, pos))| {
                    self.attend(&row[..q_width], caches[s], l, pos, scores, out);
                });
            add(&mut h, &layer.attn_output.forward(&attended, total));

            self.norm_rows(&h, &layer.ffn_norm, &mut normed);
            let gate_up = layer.gate_up.forward(&normed, total);
            let mut activation = vec![0f32; total * c.ffn];
            activation
                .par_chunks_mut(c.ffn)
                .zip(gate_up.par_chunks(2 * c.ffn))
                .for_each(|(out, row)| {
                    out.copy_from_slice(&row[..c.ffn]);
                    swiglu(out, &row[c.ffn..]);
                });
            add(&mut h, &layer.down.forward(&activation, total));
        }
        for segment in segments.iter_mut() {
            segment.cache.len += segment.tokens.len();
        }
        // The last row of each segment.
        let mut last = Vec::with_capacity(segments.len() * hidden);
        let mut end = 0;
        for segment in segments.iter() {
            end += segment.tokens.len();
            let mut out = vec![0f32; hidden];
            rms_norm(
                &h[(end - 1) * hidden..end * hidden],
                &self.output_norm,
                c.rms_eps,
                &mut out,
            );
            last.extend(out);
        }
        self.lm_head
            .forward(&last, segments.len())
            .chunks_exact(c.vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }

    fn norm_rows(&self, x: &[f32], weight: &[f32], out: &mut [f32]) {
        let hidden = self.config.hidden;
        out.par_chunks_mut(hidden)
            .zip(x.par_chunks(hidden))
            .for_each(|(o, row)| rms_norm(row, weight, self.config.rms_eps, o));
    }

    /// The rotary embedding of one head at `pos`, in place.
    fn rotate(&self, head: &mut [f32], pos: usize) {
        let half = self.config.head_dim / 2;
        let cos = &self.rotary_cos[pos * half..(pos + 1) * half];
        let sin = &self.rotary_sin[pos * half..(pos + 1) * half];
        match self.config.rotary {
            Rotary::Adjacent => {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[i] - b * sin[i];
                    pair[1] = a * sin[i] + b * cos[i];
                }
            }
            Rotary::Halves => {
                let (first, second) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (first[i], second[i]);
                    first[i] = a * cos[i] - b * sin[i];
                    second[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Causal attention of one row's query heads at `pos` over `cache`'s layer `l`, up to and
    /// including `pos`, into `out` (`heads · head_dim`).
    /// `scores` is scratch, reused across the rows a thread attends.
    fn attend(
        &self,
        queries: &[f32],
        cache: &KvCache,
        l: usize,
        pos: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let shape = HeadShape {
            head_dim: c.head_dim,
            kv_width: c.kv_width(),
            group: c.heads / c.kv_heads,
            len: pos + 1,
            capacity: cache.capacity,
        };
        scores.resize(pos + 1, 0.0);
        attend_heads(
            queries,
            &cache.keys[l],
            &cache.values[l],
            shape,
            scores,
            out,
        );
    }
}

/// Where a row's heads find their keys and values.
#[derive(Clone, Copy)]
struct HeadShape {
    head_dim: usize,
    /// Values per cached position (all key/value heads).
    kv_width: usize,
    /// Query heads per key/value head.
    group: usize,
    /// Positions attended.
    len: usize,
    /// Positions the transposed keys have room for (their row length).
    capacity: usize,
}

/// Positions whose scores accumulate in registers together, and value dimensions likewise:
/// enough independent FMA chains to hide their latency.
const ATTENTION_LANES: usize = 64;

multiversion! {
    /// Per query head: softmax of its scaled scores against the keys, then the weighted sum of
    /// the values, into `out`. One compiled body, so the inner loops vectorise without a
    /// dispatch per key; scores and outputs accumulate over blocks of [`ATTENTION_LANES`] in
    /// local arrays (registers), each element in the same order whatever the block.
    fn attend_heads(
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        shape: HeadShape,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let HeadShape {
            head_dim,
            kv_width,
            group,
            len,
            capacity,
        } = shape;
        let scale = 1.0 / (head_dim as f32).sqrt();
        for (head, (query, out)) in queries
            .chunks_exact(head_dim)
            .zip(out.chunks_exact_mut(head_dim))
            .enumerate()
        {
            let offset = (head / group) * head_dim;
            let scores = &mut scores[..len];
            for (start, scores) in scores.chunks_mut(ATTENTION_LANES).enumerate() {
                let start = start * ATTENTION_LANES;
                let key = |d: usize| &keys[(offset + d) * capacity + start..];
                lanes_block(scores, query.len(), |d| query[d] * scale, key);
            }
            let max = lanes_fold(scores, f32::NEG_INFINITY, f32::max);
            for score in scores.iter_mut() {
                *score = exp(*score - max);
            }
            let total = lanes_fold(scores, 0.0, |a, b| a + b);
            for score in scores.iter_mut() {
                *score /= total;
            }
            for (start, out) in out.chunks_mut(ATTENTION_LANES).enumerate() {
                let start = offset + start * ATTENTION_LANES;
                let value = |j: usize| &values[j * kv_width + start..];
                lanes_block(out, len, |j| scores[j], value);
            }
        }
    }
}

/// `out[i] = Σ_t factor(t) · row(t)[i]` for `t` in `0..terms`, in order of `t`, with `out` at
/// most [`ATTENTION_LANES`] long. Where every row holds a whole block — the last term's row
/// starts latest, so it is the shortest — the block accumulates in registers (fixed bounds) and
/// the lanes past `out` are dropped.
#[inline(always)]
fn lanes_block<'a>(
    out: &mut [f32],
    terms: usize,
    factor: impl Fn(usize) -> f32,
    row: impl Fn(usize) -> &'a [f32],
) {
    if terms > 0 && row(terms - 1).len() >= ATTENTION_LANES {
        let mut block = [0f32; ATTENTION_LANES];
        for t in 0..terms {
            let (f, row) = (factor(t), &row(t)[..ATTENTION_LANES]);
            for i in 0..ATTENTION_LANES {
                block[i] = f.mul_add(row[i], block[i]);
            }
        }
        out.copy_from_slice(&block[..out.len()]);
    } else {
        out.fill(0.0);
        for t in 0..terms {
            let f = factor(t);
            for (o, &v) in out.iter_mut().zip(row(t)) {
                *o = f.mul_add(v, *o);
            }
        }
    }
}

/// `values` folded by `f` over 16 lanes, then the lanes in order: independent chains (the
/// compiler vectorises them) in an order that depends only on the length.
#[inline(always)]
fn lanes_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, v);
        }
    }
    lanes.into_iter().fold(tail, f)
}

/// Reads tensors of a GGUF file, dequantized to f32.
struct Tensors<'a, R> {
    content: &'a Content,
    file: &'a mut R,
    path: &'a Path,
}

impl<R: Read + Seek> Tensors<'_, R> {
    /// A tensor's values (row-major) and shape.
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LlmError> {
        let tensor = self
            .content
            .tensor(self.file, name, &Device::Cpu)
            .map_err(|e| bad(self.path, format!("`{name}`: {e}")))?
            .dequantize(&Device::Cpu)?;
        let dims = tensor.dims().to_vec();
        Ok((tensor.flatten_all()?.to_vec1::<f32>()?, dims))
    }

    /// The matrices `names` (each `[rows, inputs]`) stacked by rows, packed as bf16.
    fn matrix(&mut self, names: &[String], inputs: usize) -> Result<Bf16Weights, LlmError> {
        let mut values = Vec::new();
        for name in names {
            let (v, dims) = self.read(name)?;
            if dims.len() != 2 || dims[1] != inputs {
                return Err(bad(self.path, format!("`{name}` has shape {dims:?}")));
            }
            values.extend(v);
        }
        let outputs = values.len() / inputs;
        Ok(Bf16Weights::new(&values, outputs, inputs))
    }
}

/// `h += x`, elementwise.
fn add(h: &mut [f32], x: &[f32]) {
    h.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(h, x)| {
            for (a, b) in h.iter_mut().zip(x) {
                *a += b;
            }
        });
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{DType, Tensor};
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Our logits after a prompt and after one more token (through the KV cache), and candle's
    /// for the same steps.
    fn both(
        path: &Path,
        tokens: &[u32],
        reference: &mut dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut file = std::fs::File::open(path).expect("opens");
        let content = Content::read(&mut file).expect("a GGUF file");
        let ours = Transformer::load(&content, &mut file, path).expect("loads");
        let mut cache = ours.new_cache(64);
        let (prompt, next) = tokens.split_at(tokens.len() - 1);
        let mut steps = Vec::new();
        for (piece, pos) in [(prompt, 0), (next, prompt.len())] {
            let got = ours
                .forward(&mut [Segment {
                    cache: &mut cache,
                    tokens: piece,
                }])
                .remove(0);
            let input = Tensor::new(piece, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("a tensor");
            let expected = reference(&input, pos)
                .and_then(|t| t.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>())
                .expect("candle runs");
            steps.push((got, expected));
        }
        steps
    }

    /// Same best token, and every logit within a small fraction of the logits' spread (our
    /// activations round to bf16, candle's to 8 bits for its quantized products).
    fn assert_close(steps: &[(Vec<f32>, Vec<f32>)], tolerance: f32) {
        for (step, (got, expected)) in steps.iter().enumerate() {
            let argmax = |v: &[f32]| {
                (0..v.len())
                    .max_by(|&a, &b| v[a].total_cmp(&v[b]))
                    .expect("logits")
            };
            let spread = expected.iter().copied().fold(f32::MIN, f32::max)
                - expected.iter().copied().fold(f32::MAX, f32::min);
            let worst = got
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tolerance * spread,
                "step {step}: max difference {worst} over a spread of {spread}"
            );
            assert_eq!(argmax(got), argmax(expected), "step {step}");
        }
    }

    #[test]
    fn smollm2_logits_match_candles_llama() {
        let path = crate::testutil::smollm2_gguf();
        let mut file = std::fs::File::open(&path).expect("opens");
        let content = Content::read(&mut file).expect("a GGUF file");
        let text = super::super::gguf::GgufText::from_gguf(&content, &path).expect("tokenizer");
        let tokens = text
            .encode("<|im_start|>user\nWhere are remote snapshots kept?<|im_end|>\n<|im_start|>assistant\nThey")
            .expect("encodes");
        let mut reference =
            quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                .expect("candle loads it");
        let steps = both(&path, &tokens, &mut |input, pos| {
            reference.forward(input, pos)
        });
        assert_close(&steps, 0.04);
    }

    /// Attention against an f64 softmax at lengths on both sides of a register block (whole
    /// blocks, a tail, a capacity too short for a whole block) and head sizes below and at one.
    #[test]
    fn attention_matches_f64_across_block_edges() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (head_dim, len, capacity) in [
            (16, 1, 8),
            (64, 63, 63),
            (64, 64, 200),
            (64, 130, 130),
            (24, 70, 100),
        ] {
            let (heads, kv_heads) = (3, 1);
            let kv_width = kv_heads * head_dim;
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let (queries, keys, values) = (
                random(heads * head_dim),
                random(kv_width * capacity),
                random(len * kv_width),
            );
            let shape = HeadShape {
                head_dim,
                kv_width,
                group: heads / kv_heads,
                len,
                capacity,
            };
            let (mut scores, mut out) = (vec![0f32; len], vec![0f32; heads * head_dim]);
            attend_heads(&queries, &keys, &values, shape, &mut scores, &mut out);
            for h in 0..heads {
                let q = &queries[h * head_dim..(h + 1) * head_dim];
                let logits: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| f64::from(q[d]) * f64::from(keys[d * capacity + j]))
                            .sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let want: f64 = (0..len)
                        .map(|j| weights[j] / total * f64::from(values[j * kv_width + d]))
                        .sum();
                    let got = f64::from(out[h * head_dim + d]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "({head_dim}, {len}, {capacity}) head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A small random `qwen2` model (biases, rotary halves, grouped heads, tied embeddings)
    /// against candle's `quantized_qwen2`.
    #[test]
    fn qwen2_logits_match_candles_qwen2() {
        let (hidden, heads, kv_heads, ffn, layers, vocab) = (64, 4, 2, 96, 2, 300);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut tensor = |dims: &[usize], scale: f32| {
            let len = dims.iter().product();
            let values: Vec<f32> = (0..len).map(|_| rng.random_range(-scale..scale)).collect();
            let t = Tensor::from_vec(values, dims, &Device::Cpu).expect("a tensor");
            QTensor::quantize(&t, GgmlDType::F32).expect("f32 tensors")
        };
        let kv = hidden / heads * kv_heads;
        let mut tensors = vec![
            (
                "token_embd.weight".to_owned(),
                tensor(&[vocab, hidden], 1.0),
            ),
            ("output_norm.weight".to_owned(), tensor(&[hidden], 1.0)),
        ];
        for i in 0..layers {
            for (name, dims, scale) in [
                ("attn_norm.weight", vec![hidden], 1.0),
                ("ffn_norm.weight", vec![hidden], 1.0),
                ("attn_q.weight", vec![hidden, hidden], 0.2),
                ("attn_q.bias", vec![hidden], 0.5),
                ("attn_k.weight", vec![kv, hidden], 0.2),
                ("attn_k.bias", vec![kv], 0.5),
                ("attn_v.weight", vec![kv, hidden], 0.2),
                ("attn_v.bias", vec![kv], 0.5),
                ("attn_output.weight", vec![hidden, hidden], 0.2),
                ("ffn_gate.weight", vec![ffn, hidden], 0.2),
                ("ffn_up.weight", vec![ffn, hidden], 0.2),
                ("ffn_down.weight", vec![hidden, ffn], 0.2),
            ] {
                tensors.push((format!("blk.{i}.{name}"), tensor(&dims, scale)));
            }
        }
        let u32_value = |v: usize| gguf_file::Value::U32(v as u32);
        let metadata = [
            (
                "general.architecture",
                gguf_file::Value::String("qwen2".to_owned()),
            ),
            ("qwen2.embedding_length", u32_value(hidden)),
            ("qwen2.block_count", u32_value(layers)),
            ("qwen2.attention.head_count", u32_value(heads)),
            ("qwen2.attention.head_count_kv", u32_value(kv_heads)),
            ("qwen2.feed_forward_length", u32_value(ffn)),
            ("qwen2.context_length", u32_value(128)),
            (
                "qwen2.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(1e-6),
            ),
            ("qwen2.rope.freq_base", gguf_file::Value::F32(1_000_000.0)),
        ];
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("tiny-qwen2.gguf");
        {
            let mut out = std::fs::File::create(&path).expect("writes");
            let metadata: Vec<(&str, &gguf_file::Value)> =
                metadata.iter().map(|(k, v)| (*k, v)).collect();
            let tensors: Vec<(&str, &QTensor)> =
                tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            gguf_file::write(&mut out, &metadata, &tensors).expect("a GGUF file");
        }
        let mut file = std::fs::File::open(&path).expect("opens");
        let content = Content::read(&mut file).expect("reads back");
        let mut reference =
            quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                .expect("candle loads it");
        let tokens = [5, 17, 250, 3, 99, 42, 7];
        let steps = both(&path, &tokens, &mut |input, pos| {
            // candle's qwen2 returns every position's logits: the last one is the next token's.
            let all = reference.forward(input, pos)?;
            let all = if all.rank() == 3 {
                all.squeeze(0)?
            } else {
                all
            };
            if all.rank() == 2 {
                all.get(all.dim(0)? - 1)?.unsqueeze(0)
            } else {
                all.unsqueeze(0)
            }
        });
        assert_close(&steps, 0.005);
    }
}
