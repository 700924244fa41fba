//! Speed of the encoder as training and retrieval use it, kept as code so figures are measured
//! (`ragd-pipe bench encoder`): seconds per training step (forward, backward, optimiser) and
//! sentences per second encoded, each at a fixed token count, plus an optional per-op profile of
//! the kernel seam at the step's shapes.
//!
//! The training step is the train stage's own MultipleNegativesRankingLoss (cosine x 20,
//! cross-entropy over in-batch negatives) and AdamW (`model::train`), on one batch of anchors and
//! positives, so the benchmark measures what a training run spends per step.
//!
//! Measured (release build, MiniLM-L6, 16 pairs x 128 tokens, 2-core Xeon shared with other
//! builds, load ~4-10, so absolute figures are ~2x a quiet machine's): fused 8.35 s/step (forward
//! 2.15, backward 5.71, AdamW 0.47) and 15.6 sentences/s, against the reference kernels' 17.6
//! s/step (4.57 / 10.98 / 2.09) and 12.1 sentences/s. Per-op profile, fused, ms per step:
//! linear 4708 (output 1876, intermediate 1610, qkv 1017, attention output 205), GELU 919,
//! attention 419, dropout 277, LayerNorm 239: the gemms are most of the step.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::model::bert::BertConfig;
use crate::model::encoder::{Embeddings, EncodePrecision, SentenceEncoder};
use crate::model::error::{CandleContext, ModelError};
use crate::model::kernels::peak::FmaPeak;
use crate::model::kernels::{self, Dropout, Implementation};
use crate::model::train::LossConfig;
use crate::model::train::optim::{AdamW, AdamWConfig, Param, decays};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A sentence-transformers BERT folder.
    pub model_dir: PathBuf,
    /// Timed training steps, after one untimed warm-up step.
    pub steps: usize,
    /// Sentences encoded for the throughput figure (after one untimed warm-up batch).
    pub sentences: usize,
    /// Tokens per sequence, special tokens included.
    pub tokens: usize,
    /// (anchor, positive) pairs per training step; encoding batches twice as many sentences, the
    /// same number of sequences per forward pass.
    pub pairs: usize,
    /// Also time each kernel of the seam alone at the training step's shapes.
    pub profile: bool,
    /// Also encode the same sentences in bf16 ([`EncodePrecision::Bf16`]) and compare.
    pub bf16_encode: bool,
    pub implementation: Implementation,
}

/// One training step's wall-clock seconds, and the CPU seconds all threads spent on it (on a
/// machine shared with other work, wall time depends on the neighbours; CPU time much less).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepTime {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub total: f64,
    pub cpu: f64,
}

/// CPU seconds this process has used so far, all threads together.
#[cfg(unix)]
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[cfg(not(unix))]
fn cpu_seconds() -> f64 {
    f64::NAN
}

/// One kernel of the seam at one shape of the training step.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub op: String,
    pub shape: String,
    /// Calls per training step (per layer times layers, and so on).
    pub calls_per_step: usize,
    /// Median milliseconds of one call.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// `calls_per_step * (forward + backward)`.
    pub ms_per_step: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub implementation: &'static str,
    /// What multiplied the matrices (f32 gemm, or AMX tiles and at what precision).
    pub matmul: &'static str,
    pub threads: usize,
    pub tokens: usize,
    pub pairs: usize,
    pub steps: Vec<StepTime>,
    /// The median of each column of `steps` on its own.
    pub median_step: StepTime,
    /// The most memory the process held during the training steps (Linux; `None` elsewhere).
    pub peak_step_bytes: Option<u64>,
    pub sentences: usize,
    pub encode_seconds: f64,
    pub encode_cpu_seconds: f64,
    pub sentences_per_second: f64,
    /// Model FLOPs of one sentence's forward pass ([`forward_flops`]).
    pub sentence_flops: f64,
    /// Model FLOPs of one training step: the forward pass of every sentence and a backward pass
    /// counted as twice the forward's products.
    pub step_flops: f64,
    /// This CPU's f32 FMA peak, measured on the same threads (`None` on a CPU without a measured
    /// vector unit).
    pub fma_peak: Option<FmaPeak>,
    /// Whether the products run on the units the peak measures (not on AMX tiles).
    pub peak_bounds_products: bool,
    pub profile: Vec<OpTime>,
    /// The same sentences encoded again with the linear layers in bf16 (`None` where not run).
    pub bf16_encode: Option<Bf16Encode>,
}

/// Encoding with [`EncodePrecision::Bf16`], against the f32 encoding of the same sentences.
#[derive(Debug, Clone, Serialize)]
pub struct Bf16Encode {
    /// What multiplies: AVX-512 BF16 or AMX, or an engine that widens bf16 to f32 (no faster).
    pub engine: &'static str,
    pub seconds: f64,
    pub sentences_per_second: f64,
    /// The lowest cosine between a sentence's bf16 and f32 embeddings.
    pub lowest_cosine: f64,
}

/// Model FLOPs of one sequence of `tokens` through a BERT's layers: each token's four attention
/// projections and two feed-forward products, and each head's score and context products (a
/// multiply-add counts two; embeddings, norms, softmax and pooling are left out, as small).
pub fn forward_flops(config: &BertConfig, tokens: usize) -> f64 {
    let (hidden, inner, tokens) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        tokens as f64,
    );
    let projections = tokens * 2. * (4. * hidden * hidden + 2. * hidden * inner);
    let attention = 2. * 2. * tokens * tokens * hidden;
    config.num_hidden_layers as f64 * (projections + attention)
}

/// Starts a new peak-memory measurement: Linux's high-water mark of resident memory is reset to
/// what the process holds now, so [`peak_rss`] reports the peak of what follows.
fn reset_peak_rss() {
    #[cfg(target_os = "linux")]
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The high-water mark of resident memory since [`reset_peak_rss`] (Linux's `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.,
    }
}

/// `count` texts of exactly `tokens` tokens each (special tokens included), all different.
fn texts_of_length(
    encoder: &SentenceEncoder,
    count: usize,
    tokens: usize,
) -> Result<Vec<String>, ModelError> {
    const WORDS: [&str; 8] = [
        "alpha", "river", "stone", "cloud", "table", "music", "green", "light",
    ];
    let invalid = |why: String| ModelError::InvalidArgument {
        name: "tokens",
        why,
    };
    if tokens < 3 || tokens > encoder.max_seq_length() {
        return Err(invalid(format!(
            "{tokens} is not between 3 and the model's {} tokens",
            encoder.max_seq_length()
        )));
    }
    let texts: Vec<String> = (0..count)
        .map(|i| {
            (0..tokens - 2)
                .map(|j| WORDS[(i + j * 3 + j / 8) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = encoder.sentence_tokenizer().token_ids(&refs)?;
    if let Some(other) = ids.iter().find(|ids| ids.len() != tokens) {
        return Err(invalid(format!(
            "the benchmark's words tokenize to {} tokens, not {tokens}, with this model",
            other.len()
        )));
    }
    Ok(texts)
}

/// Runs the benchmark; `status` hears what is being measured as it goes.
pub fn run(
    options: &BenchOptions,
    status: &mut dyn FnMut(&str),
) -> Result<BenchReport, ModelError> {
    kernels::set_implementation(options.implementation);
    let device = Device::Cpu;
    let encoder = SentenceEncoder::load(&options.model_dir, &device)?;
    let pairs = options.pairs.max(1);
    let count = options.sentences.max(2 * pairs);
    let texts = texts_of_length(&encoder, count, options.tokens)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();

    // Encoding first, on the model as loaded: the bf16 embeddings are compared with these f32
    // ones, which the training steps below would move.
    let encode_batch = 2 * pairs;
    status(&format!(
        "encoding: {count} sentences x {} tokens, batches of {encode_batch}",
        options.tokens
    ));
    encoder.encode(&refs[..encode_batch], encode_batch, &mut |_| {})?;
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let f32_embeddings = encoder.encode(&refs, encode_batch, &mut |_| {})?;
    let encode_seconds = start.elapsed().as_secs_f64();
    let encode_cpu_seconds = cpu_seconds() - cpu;

    let bf16_encode = if options.bf16_encode {
        let bf16 = SentenceEncoder::load(&options.model_dir, &device)?
            .with_precision(EncodePrecision::Bf16)?;
        let engine = bf16.bert().bf16_engine().unwrap_or("not packed: f32");
        status(&format!("encoding again in bf16 ({engine})"));
        bf16.encode(&refs[..encode_batch], encode_batch, &mut |_| {})?;
        let start = Instant::now();
        let bf16_embeddings = bf16.encode(&refs, encode_batch, &mut |_| {})?;
        let seconds = start.elapsed().as_secs_f64();
        Some(Bf16Encode {
            engine,
            seconds,
            sentences_per_second: count as f64 / seconds,
            lowest_cosine: lowest_cosine(&f32_embeddings, &bf16_embeddings),
        })
    } else {
        None
    };

    status(&format!(
        "training: {} steps of {pairs} pairs x {} tokens ({} kernels)",
        options.steps,
        options.tokens,
        options.implementation.name()
    ));
    let tokenizer = encoder.sentence_tokenizer();
    let ids = tokenizer.token_ids(&refs[..2 * pairs])?;
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = tokenizer.batch(&rows, &device)?;
    let params = {
        let vars =
            encoder
                .bert()
                .vars()
                .data()
                .lock()
                .map_err(|_| ModelError::InvalidArgument {
                    name: "model",
                    why: "its parameters are locked by a panicked thread".to_owned(),
                })?;
        vars.iter()
            .map(|(name, var)| Param::new(name.clone(), var.clone(), decays(name)))
            .collect::<candle_core::Result<Vec<_>>>()
            .during(|| "creating the optimiser".to_owned())?
    };
    let mut optimizer = AdamW::new(AdamWConfig::default(), params);
    let loss_config = LossConfig::default();
    encoder.bert().reseed_dropout(0);
    let mut steps = Vec::new();
    reset_peak_rss();
    for step in 0..=options.steps {
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let embeddings = encoder.forward(&batch, true)?;
        let loss = loss_config
            .loss(
                &embeddings
                    .narrow(0, 0, pairs)
                    .during(|| "the anchors".to_owned())?,
                &embeddings
                    .narrow(0, pairs, pairs)
                    .during(|| "the positives".to_owned())?,
            )
            .during(|| "the loss".to_owned())?;
        // Reading the loss waits for the forward pass on devices that run asynchronously.
        loss.to_dtype(DType::F32)
            .and_then(|l| l.to_scalar::<f32>())
            .during(|| "reading the loss".to_owned())?;
        let forward = start.elapsed().as_secs_f64();
        let grads = loss.backward().during(|| "the backward pass".to_owned())?;
        let backward = start.elapsed().as_secs_f64() - forward;
        let param_grads = optimizer
            .params
            .iter()
            .map(|param| {
                grads.get(param.var.as_tensor()).cloned().ok_or_else(|| {
                    ModelError::InvalidArgument {
                        name: "model",
                        why: format!("`{}` got no gradient", param.name),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        optimizer
            .step(&param_grads, 2e-5)
            .during(|| "the optimiser step".to_owned())?;
        let total = start.elapsed().as_secs_f64();
        if step > 0 {
            let time = StepTime {
                forward,
                backward,
                optimizer: total - forward - backward,
                total,
                cpu: cpu_seconds() - cpu,
            };
            status(&format!(
                "step {step}: {:.3} s (forward {:.3}, backward {:.3}, optimiser {:.3}; {:.3} s cpu)",
                time.total, time.forward, time.backward, time.optimizer, time.cpu
            ));
            steps.push(time);
        }
    }
    let peak_step_bytes = peak_rss();
    let column = |f: fn(&StepTime) -> f64| median(steps.iter().map(f).collect());
    let median_step = StepTime {
        forward: column(|s| s.forward),
        backward: column(|s| s.backward),
        optimizer: column(|s| s.optimizer),
        total: column(|s| s.total),
        cpu: column(|s| s.cpu),
    };

    let profile = if options.profile {
        status("profiling each kernel at the training step's shapes");
        profile(&encoder, 2 * pairs, options.tokens)
            .during(|| "profiling the kernels".to_owned())?
    } else {
        Vec::new()
    };
    status("measuring this CPU's f32 FMA peak");
    let fma_peak = kernels::peak::measure(PEAK_ITERATIONS, 3);
    let sentence_flops = forward_flops(encoder.bert().config(), options.tokens);
    Ok(BenchReport {
        sentence_flops,
        step_flops: 3. * 2. * pairs as f64 * sentence_flops,
        fma_peak,
        peak_bounds_products: kernels::matmul_on_vector_units(),
        implementation: options.implementation.name(),
        matmul: kernels::matmul_engine(),
        threads: candle_core::utils::get_num_threads(),
        tokens: options.tokens,
        pairs,
        steps,
        median_step,
        peak_step_bytes,
        sentences: count,
        encode_seconds,
        encode_cpu_seconds,
        sentences_per_second: count as f64 / encode_seconds,
        profile,
        bf16_encode,
    })
}

/// The lowest cosine between rows of `a` and `b` with the same index.
fn lowest_cosine(a: &Embeddings, b: &Embeddings) -> f64 {
    a.rows()
        .zip(b.rows())
        .map(|(x, y)| crate::model::ollama::cosine(x, y))
        .fold(1.0, f64::min)
}

/// Rounds of FMA chains per thread for the peak: 600 M FMAs, about 0.1 s at 3 GHz on two ports.
const PEAK_ITERATIONS: u64 = 50_000_000;

/// Timed repetitions of each profiled kernel (the median is kept).
const PROFILE_REPEATS: usize = 5;

/// Median seconds of `PROFILE_REPEATS` runs of the forward of `op` on fresh `Var`s holding
/// `inputs`, and of the backward of `sum(out * probe)` less that of the probe alone.
fn time_op(
    inputs: &[Tensor],
    op: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<(f64, f64)> {
    let mut forward = Vec::new();
    let mut backward = Vec::new();
    let mut probe_only = Vec::new();
    for _ in 0..=PROFILE_REPEATS {
        let vars: Vec<Var> = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let start = Instant::now();
        let out = op(&tensors)?;
        forward.push(start.elapsed().as_secs_f64());
        let probe = out.ones_like()?.affine(0.5, 0.25)?;
        let loss = (&out * &probe)?.sum_all()?;
        let start = Instant::now();
        loss.backward()?;
        backward.push(start.elapsed().as_secs_f64());
        let alone = Var::from_tensor(&out.detach())?;
        let loss = (alone.as_tensor() * &probe)?.sum_all()?;
        let start = Instant::now();
        loss.backward()?;
        probe_only.push(start.elapsed().as_secs_f64());
    }
    // The first run warms caches and allocators up; drop it.
    let (forward, backward, probe_only) = (
        median(forward[1..].to_vec()),
        median(backward[1..].to_vec()),
        median(probe_only[1..].to_vec()),
    );
    Ok((forward, (backward - probe_only).max(0.)))
}

/// Each kernel of the seam at the shapes of one training step of `sequences x tokens`.
fn profile(
    encoder: &SentenceEncoder,
    sequences: usize,
    tokens: usize,
) -> candle_core::Result<Vec<OpTime>> {
    let config = encoder.bert().config();
    let (hidden, inter, heads, layers) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_hidden_layers,
    );
    let rows = sequences * tokens;
    let device = Device::Cpu;
    let random = |dims: &[usize], seed: u64| -> candle_core::Result<Tensor> {
        // Deterministic, non-zero values in about [-1, 1]: the dropout mask of a constant.
        let ones = Tensor::ones(dims, DType::F32, &device)?;
        kernels::dropout(&ones, Dropout { p: 0.5, seed })?.affine(0.9, -0.95)
    };
    let mask_bias = Tensor::zeros((sequences, 1, 1, tokens), DType::F32, &device)?;
    let dropout = Dropout {
        p: config.hidden_dropout_prob,
        seed: 1,
    };
    let attention_dropout = Dropout {
        p: config.attention_probs_dropout_prob,
        seed: 2,
    };
    let head_dim = hidden / heads;
    let scale = 1. / (head_dim as f64).sqrt();
    type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;
    let linear: fn(&[Tensor]) -> candle_core::Result<Tensor> =
        |t| kernels::linear(&t[0], &t[1], &t[2]);
    let cases: Vec<(&str, String, usize, Vec<Tensor>, Op)> = vec![
        (
            "linear (q,k,v)",
            format!("[{rows}, {hidden}] -> {}", 3 * hidden),
            layers,
            vec![
                random(&[rows, hidden], 1)?,
                random(&[3 * hidden, hidden], 2)?,
                random(&[3 * hidden], 3)?,
            ],
            Box::new(linear),
        ),
        (
            "attention",
            format!("[{sequences}, {tokens}, {}], {heads} heads", 3 * hidden),
            layers,
            vec![random(&[sequences, tokens, 3 * hidden], 4)?],
            Box::new(move |t| {
                kernels::attention(
                    &t[0],
                    &mask_bias,
                    None,
                    heads,
                    scale,
                    Some(attention_dropout),
                )
            }),
        ),
        (
            "linear (attention output)",
            format!("[{rows}, {hidden}] -> {hidden}"),
            layers,
            vec![
                random(&[rows, hidden], 5)?,
                random(&[hidden, hidden], 6)?,
                random(&[hidden], 7)?,
            ],
            Box::new(linear),
        ),
        (
            "linear + gelu (intermediate)",
            format!("[{rows}, {hidden}] -> {inter}"),
            layers,
            vec![
                random(&[rows, hidden], 8)?,
                random(&[inter, hidden], 9)?,
                random(&[inter], 10)?,
            ],
            Box::new(|t| kernels::linear_gelu(&t[0], &t[1], &t[2])),
        ),
        (
            "linear (output)",
            format!("[{rows}, {inter}] -> {hidden}"),
            layers,
            vec![
                random(&[rows, inter], 12)?,
                random(&[hidden, inter], 13)?,
                random(&[hidden], 14)?,
            ],
            Box::new(linear),
        ),
        (
            "layer_norm",
            format!("[{rows}, {hidden}]"),
            2 * layers + 1,
            vec![
                random(&[rows, hidden], 15)?,
                random(&[hidden], 16)?,
                random(&[hidden], 17)?,
            ],
            Box::new(|t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-12)),
        ),
        (
            "dropout",
            format!("[{rows}, {hidden}]"),
            2 * layers + 1,
            vec![random(&[rows, hidden], 18)?],
            Box::new(move |t| kernels::dropout(&t[0], dropout)),
        ),
    ];
    cases
        .into_iter()
        .map(|(op, shape, calls, inputs, run)| {
            let (forward, backward) = time_op(&inputs, &*run)?;
            Ok(OpTime {
                op: op.to_owned(),
                shape,
                calls_per_step: calls,
                forward_ms: forward * 1e3,
                backward_ms: backward * 1e3,
                ms_per_step: calls as f64 * (forward + backward) * 1e3,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::minilm_dir;

    /// A tiny run end to end on the real model with the selected kernels (other tests run at the
    /// same time, so this one must not switch them): every figure is there and positive.
    #[test]
    fn runs_and_reports_every_figure() {
        let options = BenchOptions {
            model_dir: minilm_dir(),
            steps: 1,
            sentences: 4,
            tokens: 12,
            pairs: 2,
            profile: true,
            bf16_encode: true,
            implementation: kernels::implementation(),
        };
        let mut heard = Vec::new();
        let report = run(&options, &mut |s| heard.push(s.to_owned())).expect("bench runs");
        assert_eq!(report.steps.len(), 1);
        assert!(report.median_step.total > 0. && report.median_step.forward > 0.);
        assert!(report.sentences_per_second > 0.);
        let bf16 = report.bf16_encode.expect("bf16 encoding was asked for");
        assert!(
            bf16.sentences_per_second > 0. && bf16.lowest_cosine >= 0.9999,
            "{bf16:?}"
        );
        assert_eq!(report.profile.len(), 7);
        assert!(report.profile.iter().all(|op| op.forward_ms > 0.));
        assert!(heard.iter().any(|s| s.starts_with("step 1:")), "{heard:?}");
        assert_eq!(report.step_flops, 3. * 4. * report.sentence_flops);
        assert_eq!(
            report.fma_peak.is_some(),
            kernels::peak::VectorUnit::detect().is_some()
        );
    }

    /// MiniLM-L6 at 128 tokens, by hand: 6 layers x (128 x 2 x (4 x 384^2 + 2 x 384 x 1536)
    /// + 4 x 128^2 x 384).
    #[test]
    fn counts_the_products_of_a_forward_pass() {
        let encoder = SentenceEncoder::load(&minilm_dir(), &Device::Cpu).expect("MiniLM loads");
        assert_eq!(
            forward_flops(encoder.bert().config(), 128),
            6. * (128. * 2. * (4. * 147_456. + 2. * 589_824.) + 25_165_824.)
        );
        assert_eq!(forward_flops(encoder.bert().config(), 128), 2_868_903_936.);
    }

    #[test]
    fn refuses_token_counts_the_model_cannot_take() {
        let encoder = SentenceEncoder::load(&minilm_dir(), &Device::Cpu).expect("MiniLM loads");
        assert!(texts_of_length(&encoder, 2, 2).is_err());
        assert!(texts_of_length(&encoder, 2, 100_000).is_err());
        let texts = texts_of_length(&encoder, 3, 9).expect("9 tokens");
        assert_eq!(texts.len(), 3);
    }
}
