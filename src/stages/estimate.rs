//! What a stage will cost on this machine before it runs: seconds and peak memory, from the sizes
//! upstream hands it and this machine's speeds. `ragd-pipe plan`, `init` and the dashboard's
//! review show them; each figure says where it comes from ([`Basis`]).
//!
//! Speeds come from the machine's speed book (`cache::speeds`): what earlier runs measured, else
//! a calibration timed here once (one real training step and an encoding batch of the model at
//! the recipe's shape), else the developers' figures scaled to this machine's cores.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::{StageEnv, StageError};
use crate::cache::speeds::{Source, SpeedBook};
use crate::llm::{BackendKind, LlmSettings};
use crate::model::bench::{self, BenchOptions};
use crate::model::encoder::EncodePrecision;
use crate::model::hub::SENTENCE_TRANSFORMER_FILES;

/// Memory of the process before any model is loaded (binary, tokenizers, runtime), measured.
pub const PROCESS_BYTES: u64 = 150 << 20;

/// Counts flowing down the pipeline, counted where an artifact exists and guessed before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sizes {
    pub chunks: Option<u64>,
    /// Mean tokens of a chunk.
    pub chunk_tokens: Option<u64>,
    pub queries: Option<u64>,
    pub examples: Option<u64>,
    /// Hard negatives per training example.
    pub negatives: Option<u64>,
    /// Rounds of mining and training (`mine.rounds`).
    pub rounds: Option<u64>,
}

/// Texts of a training example as the cost of full-length passages: its positive, its negatives,
/// and its query, which is short (a tenth to a fifth of a passage).
pub fn texts_per_example(negatives: u64) -> f64 {
    1.15 + negatives as f64
}

/// Where a figure comes from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// A run on this machine measured this work at this shape.
    Measured,
    /// This machine's kernels were timed at this shape (once, then kept in the speed book).
    Calibrated,
    /// The developers' figures, scaled by this machine's cores and the model's size.
    Rough,
}

impl Basis {
    pub fn name(self) -> &'static str {
        match self {
            Self::Measured => "measured",
            Self::Calibrated => "calibrated",
            Self::Rough => "rough",
        }
    }
}

/// A stage's cost, and the sizes it hands downstream.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub seconds: f64,
    pub peak_bytes: u64,
    pub basis: Basis,
    #[serde(skip)]
    pub sizes: Sizes,
}

impl Estimate {
    /// Work of a few seconds whatever the data (reading and writing files).
    pub fn brief(sizes: Sizes) -> Self {
        Self {
            seconds: 2.,
            peak_bytes: PROCESS_BYTES,
            basis: Basis::Rough,
            sizes,
        }
    }
}

/// What a stage's estimate sees.
pub struct EstimateInput<'a> {
    pub env: &'a StageEnv,
    pub speeds: &'a Speeds,
    /// What upstream hands this stage.
    pub sizes: Sizes,
}

/// A sentence encoder's speed on this machine, timed at one shape ([`Speeds::encoder`]); other
/// shapes scale by their tokens, which is what the work grows with at these lengths.
#[derive(Debug, Clone, Copy)]
pub struct EncoderSpeed {
    /// The model's own limit on tokens per text.
    pub model_tokens: usize,
    /// The calibrated shape: tokens per text, pairs per training step.
    pub tokens: usize,
    pub pairs: usize,
    /// Seconds to encode one text of `tokens` tokens (no gradients).
    pub encode_seconds: f64,
    /// The same with the linear layers in bf16 (`encode_precision: bf16`), where calibrated.
    pub bf16_encode_seconds: Option<f64>,
    /// Seconds per text of `tokens` tokens in a training step (forward, backward, optimiser).
    pub train_seconds: f64,
    /// The process's peak memory during a calibration's training step on `pairs` pairs.
    pub train_peak_bytes: Option<u64>,
    /// The peak memory a training run at exactly this shape reached, which wins.
    pub run_peak_bytes: Option<u64>,
    /// The weights' bytes on disk (f32), for memory figures.
    pub weight_bytes: u64,
    /// Dimensions of an embedding.
    pub dim: u64,
    pub basis: Basis,
}

impl EncoderSpeed {
    /// This speed for encoding at `precision`: bf16's figure where one was calibrated, else the
    /// f32 one (an upper bound).
    pub fn at_precision(self, precision: EncodePrecision) -> Self {
        match (precision, self.bf16_encode_seconds) {
            (EncodePrecision::Bf16, Some(encode_seconds)) => Self {
                encode_seconds,
                ..self
            },
            _ => self,
        }
    }

    /// Seconds to encode `texts` texts of up to `tokens` tokens.
    pub fn encode(&self, texts: u64, tokens: usize) -> f64 {
        texts as f64 * self.encode_seconds * tokens as f64 / self.tokens as f64
    }

    /// Seconds to train on `texts` texts of up to `tokens` tokens.
    pub fn train(&self, texts: u64, tokens: usize) -> f64 {
        texts as f64 * self.train_seconds * tokens as f64 / self.tokens as f64
    }

    /// Peak memory of training on mini-batches of `mini_batch` examples of `texts` texts each
    /// (query, positive, negatives) of up to `tokens` tokens: activations grow with the tokens
    /// held at once, and the calibration held `2 * pairs` texts of its `tokens`.
    pub fn train_peak(&self, mini_batch: usize, texts: usize, tokens: usize) -> u64 {
        if let Some(peak) = self.run_peak_bytes {
            return peak;
        }
        // Weights, gradients and AdamW's two moments.
        let resident = PROCESS_BYTES + 4 * self.weight_bytes;
        let scale = (mini_batch * texts * tokens) as f64 / (2 * self.pairs * self.tokens) as f64;
        // Without a measured peak: the quickstart's MiniLM step held 3.2 GB for 16 pairs of
        // up to 256 tokens.
        let calibrated = self
            .train_peak_bytes
            .map_or(3_200_000_000, |peak| peak.saturating_sub(resident));
        resident + (calibrated as f64 * scale) as u64
    }

    /// Peak memory of encoding `texts` texts and searching them.
    pub fn encode_peak(&self, texts: u64) -> u64 {
        // Batch activations are small next to the weights and the corpus's vectors, held twice
        // while an index is built.
        PROCESS_BYTES + self.weight_bytes + 2 * texts * self.dim * 4 + (200 << 20)
    }
}

/// Inputs a stage must have seen for the share it kept to be worth keeping for estimates.
pub const KEPT_MIN_INPUTS: usize = 50;

/// Pairs of a calibration's training step, and the mini-batch encoding-only work is looked up at.
pub const CALIBRATION_PAIRS: usize = 16;

/// Mean tokens of a chunk when nothing says: the chunk stage's default 200 tokens at most, and
/// 118 on average on the quickstart's documents.
const CHUNK_TOKENS: u64 = 120;

/// The cost of encoding `chunks` chunks and `queries` queries with the model `reference` and
/// searching them. Texts are encoded sorted by length, so a batch costs its texts' own length.
pub fn encoding(
    input: &EstimateInput,
    reference: &str,
    chunks: u64,
    queries: u64,
) -> Result<Estimate, StageError> {
    /// Tokens of a query: a dozen words.
    const QUERY_TOKENS: usize = 16;
    let speed = input
        .speeds
        .encoder(input.env, reference, None, CALIBRATION_PAIRS)?
        .at_precision(input.env.recipe.encode_precision);
    let chunk_tokens =
        (input.sizes.chunk_tokens.unwrap_or(CHUNK_TOKENS) as usize).min(speed.model_tokens);
    let texts = chunks + queries;
    Ok(Estimate {
        seconds: speed.encode(chunks, chunk_tokens) + speed.encode(queries, QUERY_TOKENS),
        peak_bytes: speed.encode_peak(texts),
        basis: Basis::Calibrated,
        sizes: input.sizes,
    })
}

/// The cost of `calls` calls to the LLM `settings` name (a local model is resolved for its size).
pub fn llm_calls(
    input: &EstimateInput,
    settings: &LlmSettings,
    calls: u64,
) -> Result<Estimate, StageError> {
    let gguf = match settings.backend {
        BackendKind::Local => match super::llm_calls::external(settings, input.env)? {
            super::External::Model { path, .. } => Some(path),
            _ => None,
        },
        BackendKind::Ollama | BackendKind::Openai => None,
    };
    let speed = input.speeds.llm(settings, gguf.as_deref());
    Ok(Estimate {
        seconds: calls as f64 * speed.seconds_per_call,
        peak_bytes: PROCESS_BYTES + speed.bytes,
        basis: speed.basis,
        sizes: input.sizes,
    })
}

/// An LLM's speed on this machine.
#[derive(Debug, Clone, Copy)]
pub struct LlmSpeed {
    pub seconds_per_call: f64,
    /// Weights and KV caches of a local model; nothing for a server.
    pub bytes: u64,
    pub basis: Basis,
}

/// The developers' machine (2 cores, AVX-512): SmolLM2-135M Q4_1, 98,362,432 bytes of GGUF,
/// answered 3.36 query-gen calls a second decoding 32 at a time; Ollama 0.5.4 on the same file
/// and requests 0.89 (`ragd-pipe bench llm`, README).
const DEV_CORES: f64 = 2.;
const DEV_GGUF_BYTES: f64 = 98_362_432.;
const DEV_LOCAL_CALLS_PER_SECOND: f64 = 3.36;
const DEV_SERVER_CALLS_PER_SECOND: f64 = 0.89;

/// Tokens a query-gen call holds in its KV cache besides the answer: the prompt with a chunk.
const PROMPT_TOKENS: u64 = 450;

/// The machine's speeds: a speed book read once, calibrations added as they are timed.
pub struct Speeds {
    book: Mutex<SpeedBook>,
    threads: usize,
}

impl Speeds {
    pub fn open(cache_dir: &Path) -> Self {
        Self {
            book: Mutex::new(SpeedBook::open(cache_dir)),
            threads: candle_core::utils::get_num_threads().max(1),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn get(&self, key: &str) -> Option<(f64, Source)> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.get(key).map(|m| (m.value, m.source))
    }

    fn record(&self, key: &str, value: f64, source: Source) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        // A book that cannot be written costs a calibration next time, nothing more.
        let _ = book.record(key, value, source);
    }

    /// The speed book's keys for an encoder's encoding, training and training peak memory at a
    /// shape, on this many threads.
    fn encoder_keys(&self, reference: &str, tokens: usize, pairs: usize) -> [String; 4] {
        // A debug build's kernels are several times slower: its figures are its own.
        let build = if cfg!(debug_assertions) { " debug" } else { "" };
        let shape = format!("{reference} {tokens}x{pairs} {}t{build}", self.threads);
        [
            format!("encode {shape}"),
            format!("train {shape}"),
            format!("train-peak {shape}"),
            format!("encode-bf16 {shape}"),
        ]
    }

    /// Records what a training run measured at its shape: seconds per text and the process's
    /// peak memory; estimates at that shape use them from then on.
    pub fn record_training(
        &self,
        reference: &str,
        tokens: usize,
        mini_batch: usize,
        seconds_per_text: f64,
        peak_bytes: Option<u64>,
    ) {
        let [_, train, peak, _] = self.encoder_keys(reference, tokens, mini_batch);
        self.record(&train, seconds_per_text, Source::Run);
        if let Some(bytes) = peak_bytes {
            self.record(&peak, bytes as f64, Source::Run);
        }
    }

    /// The encoder `reference`'s speed: measured by a training run at exactly `tokens` (the
    /// model's own limit if `None`) and `mini_batch`, else calibrated on the CPU (once per model
    /// and machine) at the model's length up to 256 tokens and 16 pairs a step.
    pub fn encoder(
        &self,
        env: &StageEnv,
        reference: &str,
        tokens: Option<usize>,
        mini_batch: usize,
    ) -> Result<EncoderSpeed, StageError> {
        let dir = env.resolve_model(reference, SENTENCE_TRANSFORMER_FILES)?;
        let calibrated = self.calibrated(env, reference, &dir)?;
        let tokens = tokens.unwrap_or(calibrated.model_tokens);
        let [_, train_key, peak_key, _] = self.encoder_keys(reference, tokens, mini_batch);
        match self.get(&train_key) {
            Some((train_seconds, Source::Run)) => Ok(EncoderSpeed {
                model_tokens: calibrated.model_tokens,
                tokens,
                pairs: mini_batch,
                encode_seconds: calibrated.encode_seconds * tokens as f64
                    / calibrated.tokens as f64,
                bf16_encode_seconds: calibrated
                    .bf16_encode_seconds
                    .map(|seconds| seconds * tokens as f64 / calibrated.tokens as f64),
                train_seconds,
                run_peak_bytes: self.get(&peak_key).map(|(bytes, _)| bytes as u64),
                basis: Basis::Measured,
                ..calibrated
            }),
            _ => Ok(calibrated),
        }
    }

    /// The calibration of `reference` (folder `dir`), timed now if the book has none.
    fn calibrated(
        &self,
        env: &StageEnv,
        reference: &str,
        dir: &Path,
    ) -> Result<EncoderSpeed, StageError> {
        let model_tokens = model_number(dir, "sentence_bert_config.json", "max_seq_length")
            .or_else(|| model_number(dir, "config.json", "max_position_embeddings"))
            .map_or(512, |n| n as usize);
        let tokens = model_tokens.min(256);
        let weight_bytes = weight_bytes(dir);
        let dim = model_number(dir, "config.json", "hidden_size").unwrap_or(768);
        let [encode_key, train_key, peak_key, bf16_key] =
            self.encoder_keys(reference, tokens, CALIBRATION_PAIRS);
        let bf16_encode_seconds = || self.get(&bf16_key).map(|(seconds, _)| seconds);
        let speed = |encode_seconds, train_seconds, train_peak_bytes| EncoderSpeed {
            model_tokens,
            tokens,
            pairs: CALIBRATION_PAIRS,
            encode_seconds,
            bf16_encode_seconds: bf16_encode_seconds(),
            train_seconds,
            train_peak_bytes,
            run_peak_bytes: None,
            weight_bytes,
            dim,
            basis: Basis::Calibrated,
        };
        // bf16 encoding is timed only for a recipe that asks for it (a second model loaded and
        // packed), and then once even where the f32 figures are already in the book.
        let bf16 = env.recipe.encode_precision == EncodePrecision::Bf16;
        if let (Some((encode, _)), Some((train, _))) = (self.get(&encode_key), self.get(&train_key))
            && (!bf16 || self.get(&bf16_key).is_some())
        {
            let peak = self.get(&peak_key).map(|(bytes, _)| bytes as u64);
            return Ok(speed(encode, train, peak));
        }
        env.note(
            super::context::NoteLevel::Info,
            format!(
                "timing `{reference}` on this machine ({tokens} tokens, {CALIBRATION_PAIRS} pairs a training step); once, kept for later estimates"
            ),
        );
        let started = Instant::now();
        let report = bench::run(
            &BenchOptions {
                model_dir: dir.to_path_buf(),
                steps: 1,
                sentences: 2 * CALIBRATION_PAIRS,
                tokens,
                pairs: CALIBRATION_PAIRS,
                profile: false,
                bf16_encode: bf16,
                implementation: crate::model::kernels::implementation(),
            },
            &mut |_| {},
        )
        .map_err(super::io::model_error)?;
        let encode_seconds = report.encode_seconds / report.sentences as f64;
        let train_seconds = report.median_step.total / (2 * CALIBRATION_PAIRS) as f64;
        self.record(&encode_key, encode_seconds, Source::Calibration);
        self.record(&train_key, train_seconds, Source::Calibration);
        if let Some(bf16) = &report.bf16_encode {
            self.record(
                &bf16_key,
                bf16.seconds / report.sentences as f64,
                Source::Calibration,
            );
        }
        if let Some(bytes) = report.peak_step_bytes {
            self.record(&peak_key, bytes as f64, Source::Calibration);
        }
        env.note(
            super::context::NoteLevel::Info,
            format!(
                "timed in {:.0} s: {:.0} texts/s encoding, {:.2} s a training step",
                started.elapsed().as_secs_f64(),
                1. / encode_seconds,
                report.median_step.total
            ),
        );
        Ok(speed(encode_seconds, train_seconds, report.peak_step_bytes))
    }

    /// What share of its input a stage kept when it last ran here on enough data (`what` names
    /// the stage and the settings the share depends on).
    pub fn kept(&self, what: &str) -> Option<f64> {
        self.get(&format!("kept {what}")).map(|(share, _)| share)
    }

    /// Records the share of its input a stage kept, for later estimates of what it hands on.
    pub fn record_kept(&self, what: &str, share: f64) {
        self.record(&format!("kept {what}"), share, Source::Run);
    }

    /// The speed book's key for an LLM's query-gen calls.
    pub fn llm_key(&self, settings: &LlmSettings) -> String {
        let build = if cfg!(debug_assertions) { " debug" } else { "" };
        let backend = match settings.backend {
            BackendKind::Local => format!("local {}t{build}", self.threads),
            BackendKind::Ollama => "ollama".to_owned(),
            BackendKind::Openai => "openai".to_owned(),
        };
        format!(
            "llm {} {backend} {}",
            settings.model().unwrap_or("server default"),
            settings.concurrency()
        )
    }

    /// Records what a run measured of an LLM: seconds per call, over many uncached calls.
    pub fn record_llm(&self, settings: &LlmSettings, seconds_per_call: f64) {
        self.record(&self.llm_key(settings), seconds_per_call, Source::Run);
    }

    /// An LLM's seconds per call, measured by an earlier run or scaled from the developers'
    /// figures; `gguf` is the local model's file, for its size.
    pub fn llm(&self, settings: &LlmSettings, gguf: Option<&Path>) -> LlmSpeed {
        let footprint =
            gguf.and_then(|path| crate::llm::transformer::Footprint::of_gguf(path).ok());
        let bytes = footprint.map_or(0, |f| {
            let held = PROMPT_TOKENS + u64::from(settings.max_tokens);
            f.weight_bytes + settings.concurrency() as u64 * held * f.kv_bytes_per_token
        });
        if let Some((seconds, _)) = self.get(&self.llm_key(settings)) {
            return LlmSpeed {
                seconds_per_call: seconds,
                bytes,
                basis: Basis::Measured,
            };
        }
        let seconds_per_call = match settings.backend {
            BackendKind::Local => {
                let size = gguf
                    .and_then(|path| fs_err::metadata(path).ok())
                    .map_or(DEV_GGUF_BYTES, |m| m.len() as f64);
                size / DEV_GGUF_BYTES * DEV_CORES / self.threads as f64 / DEV_LOCAL_CALLS_PER_SECOND
            }
            BackendKind::Ollama | BackendKind::Openai => 1. / DEV_SERVER_CALLS_PER_SECOND,
        };
        LlmSpeed {
            seconds_per_call,
            bytes,
            basis: Basis::Rough,
        }
    }
}

/// Bytes of a model folder's weights (the files the registry counts as weights).
fn weight_bytes(dir: &Path) -> u64 {
    crate::registry::WEIGHT_FILES
        .iter()
        .find_map(|name| fs_err::metadata(dir.join(name)).ok())
        .map_or(0, |m| m.len())
}

/// A number from one of a model folder's JSON files (`config.json`'s `hidden_size`).
fn model_number(dir: &Path, file: &str, key: &str) -> Option<u64> {
    crate::model::config_file::read_json::<serde_json::Value>(&dir.join(file)).ok()?[key].as_u64()
}

/// Training examples a training stage will see: its `data` file's rows when the recipe gives
/// one, else what mine hands on.
pub fn training_examples(input: &EstimateInput, data: Option<&Path>) -> u64 {
    match data {
        Some(path) => super::io::count_lines(path),
        None => input.sizes.examples.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoding at bf16 takes the bf16 calibration where the book has one, and the f32 figure
    /// (an upper bound) where it does not; f32 and training figures are untouched.
    #[test]
    fn bf16_encoding_is_estimated_from_its_own_calibration() {
        let speed = EncoderSpeed {
            model_tokens: 256,
            tokens: 256,
            pairs: CALIBRATION_PAIRS,
            encode_seconds: 0.03,
            bf16_encode_seconds: Some(0.02),
            train_seconds: 0.2,
            train_peak_bytes: None,
            run_peak_bytes: None,
            weight_bytes: 90_000_000,
            dim: 384,
            basis: Basis::Calibrated,
        };
        let bf16 = speed.at_precision(EncodePrecision::Bf16);
        assert_eq!(bf16.encode(100, 128), 1.0);
        assert_eq!(bf16.train(10, 256), speed.train(10, 256));
        assert_eq!(
            speed.at_precision(EncodePrecision::F32).encode(100, 128),
            1.5
        );
        let uncalibrated = EncoderSpeed {
            bf16_encode_seconds: None,
            ..speed
        };
        let fallback = uncalibrated.at_precision(EncodePrecision::Bf16);
        assert_eq!(fallback.encode(100, 128), 1.5);
    }
}
