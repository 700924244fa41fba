//! `ragd-pipe bench`: benchmarks kept in the repository, so speed claims are measured, not timed
//! tests.
//!
//! - `rerun`: a no-change rerun of a chunk recipe over a generated corpus of N files (default
//!   5,000), timed as whole processes (start-up included), as a user would see it.
//! - `encoder`: the sentence encoder's training step and encoding speed ([`crate::model::bench`]),
//!   with ratios against PyTorch + sentence-transformers on the same CPU.
//! - `llm`: the local LLM writing query-gen's real requests (the chunks of a documents folder,
//!   query-gen's default prompt, schema and sampling) at several batch sizes, and the same
//!   requests sent to an Ollama server when one is named, in interleaved rounds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::{Args, Subcommand};

use super::Failure;
use crate::corpus::{self, ChunkOptions, FileFilter, Source};
use crate::llm::settings::{DEFAULT_LOCAL_MODEL, DEFAULT_OLLAMA_MODEL};
use crate::llm::{self as llm_engine, LlmBackend, ResponseCache};
use crate::model::bench::{self, BenchOptions};
use crate::model::hub::{self, HubConfig, ModelRef};
use crate::model::kernels::Implementation;
use crate::output::{Printer, table};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Time a no-change rerun of a chunk recipe over a generated corpus.
    Rerun(RerunArgs),
    /// Time the encoder's training step (MNRL + AdamW) and encoding, on the CPU.
    Encoder(EncoderArgs),
    /// Time the local LLM on query-gen's requests (and an Ollama server on the same ones).
    Llm(LlmArgs),
}

#[derive(Debug, Args)]
pub struct LlmArgs {
    /// The GGUF model: a path, `pypi:` or hub reference.
    #[arg(long, default_value = DEFAULT_LOCAL_MODEL)]
    pub model: String,
    /// The documents whose chunks make the requests (query-gen's default prompt).
    #[arg(long, default_value = "examples/docs")]
    pub docs: PathBuf,
    /// Batch sizes of the local LLM to time (sequences decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Requests per timing (chunks taken in order, repeated if the folder has fewer).
    #[arg(long, default_value_t = 64)]
    pub calls: usize,
    /// Interleaved rounds over every configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// An Ollama server to time on the same requests, e.g. `http://127.0.0.1:11434`.
    #[arg(long)]
    pub ollama: Option<String>,
    /// The model the Ollama server serves (the same weights as `--model`).
    #[arg(long, default_value = DEFAULT_OLLAMA_MODEL)]
    pub ollama_model: String,
    /// Requests in flight to the Ollama server.
    #[arg(long, default_value_t = 4)]
    pub ollama_concurrency: usize,
}

#[derive(Debug, Args)]
pub struct EncoderArgs {
    /// The model: a hub id, `pypi:` reference or local folder.
    #[arg(long, default_value = "sentence-transformers/all-MiniLM-L6-v2")]
    pub model: String,
    /// Timed training steps (the median is reported), after one warm-up step.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Sentences encoded for the throughput figure.
    #[arg(long, default_value_t = 320)]
    pub sentences: usize,
    /// Shapes to time, each `PAIRSxTOKENS`: (anchor, positive) pairs per training step (encoding
    /// batches twice as many sentences) and tokens per sequence, special tokens included.
    #[arg(long, value_delimiter = ',', default_value = "16x128,32x256", value_parser = parse_shape)]
    pub shapes: Vec<Shape>,
    /// Peer figures to compare with, measured side by side on this machine (PyTorch, ONNX
    /// Runtime, …): `{"PEER": {"16x128": {"step_seconds": 1.75, "sentences_per_second": 83,
    /// "peak_bytes": 3.1e9}}}`, any field optional.
    #[arg(long, value_name = "FILE")]
    pub compare_json: Option<PathBuf>,
    /// Also time each kernel alone at the training step's shapes.
    #[arg(long)]
    pub profile: bool,
    /// Run the composed reference kernels instead of the fused ones (as `RAGD_KERNELS=reference`).
    #[arg(long)]
    pub reference: bool,
}

/// A benchmark shape: pairs per training step and tokens per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub pairs: usize,
    pub tokens: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.pairs, self.tokens)
    }
}

fn parse_shape(text: &str) -> Result<Shape, String> {
    let bad = || format!("`{text}` is not PAIRSxTOKENS, e.g. 16x128");
    let (pairs, tokens) = text.split_once('x').ok_or_else(bad)?;
    let pairs: usize = pairs.trim().parse().map_err(|_| bad())?;
    let tokens: usize = tokens.trim().parse().map_err(|_| bad())?;
    if pairs == 0 || tokens < 3 {
        return Err(bad());
    }
    Ok(Shape { pairs, tokens })
}

/// A peer's figures at one shape, as `--compare-json` gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct PeerFigures {
    step_seconds: Option<f64>,
    sentences_per_second: Option<f64>,
    peak_bytes: Option<f64>,
}

/// Peers by name, their figures by shape (`16x128`).
type Peers = std::collections::BTreeMap<String, std::collections::BTreeMap<String, PeerFigures>>;

/// Ours against one peer's: our step time over theirs (below 1 is faster), our throughput over
/// theirs (above 1 is faster), our peak memory over theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
struct Ratios {
    step_time: Option<f64>,
    encode_throughput: Option<f64>,
    bf16_encode_throughput: Option<f64>,
    peak_memory: Option<f64>,
}

fn ratios(ours: &bench::BenchReport, peer: &PeerFigures) -> Ratios {
    Ratios {
        step_time: peer.step_seconds.map(|p| ours.median_step.total / p),
        encode_throughput: peer
            .sentences_per_second
            .map(|p| ours.sentences_per_second / p),
        bf16_encode_throughput: peer
            .sentences_per_second
            .zip(ours.bf16_encode.as_ref())
            .map(|(p, bf16)| bf16.sentences_per_second / p),
        peak_memory: peer
            .peak_bytes
            .zip(ours.peak_step_bytes)
            .map(|(p, o)| o as f64 / p),
    }
}

#[derive(Debug, Args)]
pub struct RerunArgs {
    /// Files in the generated corpus.
    #[arg(long, default_value_t = 5000)]
    pub files: usize,
    /// Timed reruns (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub repeat: usize,
}

pub(super) fn execute(args: &BenchArgs, printer: &Printer) -> Result<(), Failure> {
    match &args.which {
        Bench::Rerun(args) => rerun(args, printer),
        Bench::Encoder(args) => encoder(args, printer),
        Bench::Llm(args) => llm_bench(args, printer),
    }
}

fn fail(message: String) -> Failure {
    Failure::report(miette::miette!("{message}"), 2)
}

fn rerun(args: &RerunArgs, printer: &Printer) -> Result<(), Failure> {
    let dir = std::env::temp_dir().join(format!("ragd-bench-rerun-{}", std::process::id()));
    let corpus = dir.join("corpus");
    printer.status(&format!(
        "generating {} files under {}",
        args.files,
        corpus.display()
    ));
    generate_corpus(&corpus, args.files)
        .map_err(|e| fail(format!("cannot write the corpus: {e}")))?;
    let recipe = dir.join("bench.yaml");
    fs_err::write(&recipe, "name: bench-rerun\nchunk:\n  input: corpus\n")
        .map_err(|e| fail(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let run = |label: &str| -> Result<f64, Failure> {
        let started = Instant::now();
        let output = Command::new(&exe)
            .args(["--quiet", "--no-progress", "run"])
            .arg(&recipe)
            .output()
            .map_err(|e| fail(format!("cannot run {}: {e}", exe.display())))?;
        let seconds = started.elapsed().as_secs_f64();
        if !output.status.success() {
            return Err(fail(format!(
                "the {label} run failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(seconds)
    };
    let first = run("first")?;
    printer.status(&format!("first run (chunks everything): {first:.2}s"));
    let mut times: Vec<f64> = (0..args.repeat.max(1))
        .map(|_| run("no-change"))
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let _ = fs_err::remove_dir_all(&dir);
    if printer.json {
        printer.json_line(&serde_json::json!({
            "type": "bench", "bench": "rerun", "files": args.files,
            "first_seconds": first, "rerun_seconds": times, "median_seconds": median,
        }));
    } else {
        printer.result(&format!(
            "no-change rerun over {} files: median {:.3}s (min {:.3}s, max {:.3}s, {} runs); first run {:.2}s\n",
            args.files,
            median,
            times[0],
            times[times.len() - 1],
            times.len(),
            first
        ));
    }
    Ok(())
}

fn encoder(args: &EncoderArgs, printer: &Printer) -> Result<(), Failure> {
    let cwd = std::env::current_dir().map_err(|e| fail(e.to_string()))?;
    let reference = ModelRef::parse(&args.model, &cwd).map_err(|e| fail(e.to_string()))?;
    let model_dir = hub::resolve(
        &reference,
        hub::SENTENCE_TRANSFORMER_FILES,
        &HubConfig::from_env(),
        &mut |_| {},
    )
    .map_err(|e| fail(format!("cannot get `{}`: {e}", args.model)))?;
    let peers: Peers = match &args.compare_json {
        Some(path) => {
            let text = fs_err::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            serde_json::from_str(&text)
                .map_err(|e| fail(format!("`{}` is not peer figures: {e}", path.display())))?
        }
        None => Peers::new(),
    };
    for shape in &args.shapes {
        let options = BenchOptions {
            model_dir: model_dir.clone(),
            steps: args.steps.max(1),
            sentences: args.sentences,
            tokens: shape.tokens,
            pairs: shape.pairs,
            profile: args.profile,
            bf16_encode: true,
            implementation: if args.reference {
                Implementation::Reference
            } else {
                Implementation::from_env()
            },
        };
        let report = bench::run(&options, &mut |line| printer.status(line))
            .map_err(|e| fail(crate::error_chain(&e)))?;
        let compared: std::collections::BTreeMap<&str, PeerFigures> = peers
            .iter()
            .filter_map(|(peer, shapes)| Some((peer.as_str(), *shapes.get(&shape.to_string())?)))
            .collect();
        if printer.json {
            let ratios: std::collections::BTreeMap<&str, Ratios> = compared
                .iter()
                .map(|(peer, figures)| (*peer, ratios(&report, figures)))
                .collect();
            printer.json_line(&serde_json::json!({
                "type": "bench", "bench": "encoder", "shape": shape.to_string(),
                "report": report, "compared": ratios,
            }));
            continue;
        }
        printer.result(&encoder_text(&report, &compared));
    }
    Ok(())
}

/// One shape's figures for people, with the ratios against each peer's `compared` figures.
fn encoder_text(
    report: &bench::BenchReport,
    compared: &std::collections::BTreeMap<&str, PeerFigures>,
) -> String {
    let step = report.median_step;
    let mut text = format!(
        "{} kernels, matmul {}, {} threads\n\
         training step ({} pairs x {} tokens, MNRL + AdamW): median {:.3} s/step \
         (forward {:.3}, backward {:.3}, optimiser {:.3}; {:.3} cpu-s; {} steps)\n\
         encoding ({} tokens): {:.1} sentences/s ({} in {:.2} s, {:.2} cpu-s)\n",
        report.implementation,
        report.matmul,
        report.threads,
        report.pairs,
        report.tokens,
        step.total,
        step.forward,
        step.backward,
        step.optimizer,
        step.cpu,
        report.steps.len(),
        report.tokens,
        report.sentences_per_second,
        report.sentences,
        report.encode_seconds,
        report.encode_cpu_seconds,
    );
    if let Some(bf16) = &report.bf16_encode {
        text.push_str(&format!(
            "encoding in bf16 ({}): {:.1} sentences/s ({:.2}x f32; {:.2} s), lowest cosine to f32 {:.6}\n",
            bf16.engine,
            bf16.sentences_per_second,
            bf16.sentences_per_second / report.sentences_per_second,
            bf16.seconds,
            bf16.lowest_cosine
        ));
    }
    if let Some(peak) = report.peak_step_bytes {
        text.push_str(&format!(
            "peak memory of the training steps: {:.0} MiB (the whole process)\n",
            peak as f64 / f64::from(1 << 20)
        ));
    }
    text.push_str(&format!(
        "model FLOPs: {:.2} G a sentence, {:.0} G a step (backward = 2 x forward)",
        report.sentence_flops / 1e9,
        report.step_flops / 1e9
    ));
    match report.fma_peak {
        Some(peak) if report.peak_bounds_products => text.push_str(&format!(
            "; this CPU's f32 FMA peak, measured: {:.0} GFLOP/s ({}, {} threads)\n",
            peak.flops / 1e9,
            peak.unit.name(),
            peak.threads
        )),
        Some(_) => {
            text.push_str("; the products run on AMX tiles, which the FMA peak does not bound\n")
        }
        None => text.push_str("; no FMA peak measured on this CPU\n"),
    }
    text.push_str(&work_text(
        report,
        report.median_step.total,
        report.sentences_per_second,
        true,
    ));
    let ratio = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
    for (peer, figures) in compared {
        let ratios = ratios(report, figures);
        text.push_str(&format!(
            "against {peer}: step time {}, encoding throughput {} (in bf16 {}), peak memory {}\n",
            ratio(ratios.step_time),
            ratio(ratios.encode_throughput),
            ratio(ratios.bf16_encode_throughput),
            ratio(ratios.peak_memory)
        ));
        if let (Some(step), Some(encode)) = (figures.step_seconds, figures.sentences_per_second) {
            text.push_str(&format!("  {peer}'s "));
            text.push_str(&work_text(report, step, encode, false));
        }
    }
    if !report.profile.is_empty() {
        let columns: Vec<String> = ["op", "shape", "calls", "fwd ms", "bwd ms", "ms/step"]
            .map(str::to_owned)
            .to_vec();
        let rows: Vec<Vec<String>> = report
            .profile
            .iter()
            .map(|op| {
                vec![
                    op.op.clone(),
                    op.shape.clone(),
                    op.calls_per_step.to_string(),
                    format!("{:.2}", op.forward_ms),
                    format!("{:.2}", op.backward_ms),
                    format!("{:.0}", op.ms_per_step),
                ]
            })
            .collect();
        let total: f64 = report.profile.iter().map(|op| op.ms_per_step).sum();
        text.push_str(&format!(
            "per-op profile (each kernel alone, forward + backward):\n{}  sum of profiled ops: {total:.0} ms/step\n",
            table(&columns, &rows, "  ")
        ));
    }
    text
}

/// The model FLOPs per second of a step taking `step_seconds` and of encoding
/// `sentences_per_second`, against this CPU's measured f32 FMA peak where the products run on
/// the units it measures: how far from the hardware a figure is; `ceiling` adds the most
/// sentences/s the peak allows.
fn work_text(
    report: &bench::BenchReport,
    step_seconds: f64,
    sentences_per_second: f64,
    ceiling: bool,
) -> String {
    let step = report.step_flops / step_seconds;
    let encode = report.sentence_flops * sentences_per_second;
    let giga = |flops: f64| format!("{:.0} GFLOP/s", flops / 1e9);
    match report.fma_peak.filter(|_| report.peak_bounds_products) {
        Some(peak) => format!(
            "work: step {} ({:.0}% of the FMA peak), encoding {} ({:.0}%{})\n",
            giga(step),
            100. * step / peak.flops,
            giga(encode),
            100. * encode / peak.flops,
            if ceiling {
                format!(
                    "; {:.1} sentences/s at the peak",
                    peak.flops / report.sentence_flops
                )
            } else {
                String::new()
            }
        ),
        None => format!("work: step {}, encoding {}\n", giga(step), giga(encode)),
    }
}

/// Deterministic markdown files of ~2 KB: a heading, a few paragraphs of pseudo-random words.
fn generate_corpus(dir: &Path, files: usize) -> std::io::Result<()> {
    const WORDS: &[&str] = &[
        "backup",
        "snapshot",
        "repository",
        "policy",
        "retention",
        "encrypt",
        "key",
        "restore",
        "schedule",
        "daemon",
        "config",
        "option",
        "default",
        "network",
        "storage",
        "chunk",
        "index",
        "verify",
        "prune",
        "remote",
        "local",
        "disk",
        "volume",
        "mount",
        "archive",
        "compress",
        "upload",
        "download",
        "error",
        "warning",
        "log",
        "metric",
        "service",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..files {
        let sub = dir.join(format!("part{:02}", i % 50));
        fs_err::create_dir_all(&sub)?;
        let mut text = format!("# Topic {i}\n\n");
        for _ in 0..4 {
            let words: Vec<&str> = (0..60)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            text.push_str(&words.join(" "));
            text.push_str(".\n\n");
        }
        fs_err::write(sub.join(format!("doc{i:05}.md")), text)?;
    }
    Ok(())
}

/// One timing of one configuration.
#[derive(Debug, Clone, serde::Serialize)]
struct LlmTiming {
    backend: String,
    batch: usize,
    calls: usize,
    seconds: f64,
    prompt_tokens: usize,
    answer_tokens: usize,
}

impl LlmTiming {
    fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

fn llm_bench(args: &LlmArgs, printer: &Printer) -> Result<(), Failure> {
    let cwd = std::env::current_dir().map_err(|e| fail(e.to_string()))?;
    let config = HubConfig::from_env();
    let resolve = |reference: &str, files: &[hub::WantedFile]| {
        let parsed = ModelRef::parse(reference, &cwd).map_err(|e| fail(e.to_string()))?;
        hub::resolve(&parsed, files, &config, &mut |_| {})
            .map_err(|e| fail(format!("cannot get `{reference}`: {e}")))
    };
    let gguf = resolve(&args.model, &[])?;
    // Chunked as the quickstart's chunk stage does: its default sizes, its default tokenizer.
    let tokenizer_dir = resolve(
        crate::recipe::DEFAULT_BASE_MODEL,
        hub::SENTENCE_TRANSFORMER_FILES,
    )?;
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_dir.join("tokenizer.json"))
        .map_err(|e| fail(format!("cannot load the chunking tokenizer: {e}")))?;
    let source =
        Source::from_path(&args.docs, FileFilter::default()).map_err(|e| fail(e.to_string()))?;
    let corpus = corpus::read_source(&source, &()).map_err(|e| fail(e.to_string()))?;
    let options = ChunkOptions {
        max_tokens: 200,
        overlap: 32,
    };
    let chunks = corpus::chunk_documents(&corpus, &tokenizer, options, &())
        .map_err(|e| fail(e.to_string()))?
        .chunks;
    let params = crate::stages::query_gen::QueryGenParams::default();
    let usable: Vec<_> = chunks
        .iter()
        .filter(|c| c.n_tokens >= params.min_chunk_tokens)
        .collect();
    if usable.is_empty() {
        return Err(fail(format!(
            "`{}` has no chunk long enough to ask about",
            args.docs.display()
        )));
    }
    let picked: Vec<_> = usable.iter().cycle().take(args.calls).copied().collect();
    let requests_for =
        |round: usize| crate::stages::query_gen::llm_requests(&params, &picked, round as u64);
    let scratch = tempfile_dir("ragd-bench-llm")?;
    let mut timings: Vec<LlmTiming> = Vec::new();
    let locals = args
        .batches
        .iter()
        .map(|&batch| llm_engine::local::LocalBackend::load(&gguf, batch.max(1)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(crate::error_chain(&e)))?;
    // Any local backend tokenizes alike: the first counts prompt and answer tokens.
    let counter = locals
        .first()
        .ok_or_else(|| fail("`--batches` names no batch size".to_owned()))?;
    printer.status(&format!(
        "{} requests from {} chunks of `{}`; local LLM on {}",
        args.calls,
        usable.len(),
        args.docs.display(),
        counter.engine()
    ));
    let prompt_tokens: usize = requests_for(0)
        .iter()
        .map(|r| counter.prompt_ids(r).map(|ids| ids.len()))
        .sum::<Result<usize, _>>()
        .map_err(|e| fail(crate::error_chain(&e)))?;
    let ollama = match &args.ollama {
        Some(url) => {
            let settings = llm_engine::LlmSettings {
                backend: llm_engine::BackendKind::Ollama,
                model: Some(args.ollama_model.clone()),
                url: Some(url.clone()),
                concurrency: Some(args.ollama_concurrency.max(1)),
                ..llm_engine::LlmSettings::default()
            };
            let pool = settings
                .connect_http()
                .map_err(|e| fail(crate::error_chain(&e)))?;
            Some((format!("ollama {url}"), pool))
        }
        None => None,
    };
    let mut backends: Vec<(String, usize, &dyn LlmBackend)> = locals
        .iter()
        .map(|l| ("local".to_owned(), l.concurrency(), l as &dyn LlmBackend))
        .collect();
    if let Some((name, pool)) = &ollama {
        backends.push((name.clone(), args.ollama_concurrency.max(1), pool));
    }
    let cancel = std::sync::atomic::AtomicBool::new(false);
    for round in 0..args.rounds.max(1) {
        for (i, (name, batch, backend)) in backends.iter().enumerate() {
            // A fresh cache per timing: every request is a real call.
            let cache = ResponseCache::open(&scratch.join(format!("{round}-{i}.jsonl")))
                .map_err(|e| fail(crate::error_chain(&e)))?;
            let requests = requests_for(round + 1);
            let started = Instant::now();
            let (answers, _) =
                llm_engine::complete_all(*backend, &cache, &requests, &cancel, &|_| {})
                    .map_err(|e| fail(crate::error_chain(&e)))?;
            let seconds = started.elapsed().as_secs_f64();
            let answer_tokens = answers.iter().map(|a| counter.count_tokens(a)).sum();
            let timing = LlmTiming {
                backend: name.clone(),
                batch: *batch,
                calls: requests.len(),
                seconds,
                prompt_tokens,
                answer_tokens,
            };
            printer.status(&format!(
                "round {}: {name} batch {batch}: {:.2} calls/s ({:.1} s)",
                round + 1,
                timing.calls_per_second(),
                seconds
            ));
            timings.push(timing);
        }
    }
    let _ = fs_err::remove_dir_all(&scratch);
    let medians: Vec<LlmTiming> = backends
        .iter()
        .map(|(name, batch, _)| {
            let mut runs: Vec<&LlmTiming> = timings
                .iter()
                .filter(|t| &t.backend == name && t.batch == *batch)
                .collect();
            runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            runs[runs.len() / 2].clone()
        })
        .collect();
    let ollama = medians
        .iter()
        .find(|t| t.backend.starts_with("ollama"))
        .map(LlmTiming::calls_per_second);
    if printer.json {
        printer.json_line(&serde_json::json!({
            "type": "bench", "bench": "llm", "engine": counter.engine(),
            "runs": timings, "medians": medians,
        }));
        return Ok(());
    }
    let rows = medians
        .iter()
        .map(|t| {
            vec![
                t.backend.clone(),
                t.batch.to_string(),
                format!("{:.2}", t.calls_per_second()),
                format!("{:.0}", t.prompt_tokens as f64 / t.seconds),
                format!("{:.0}", t.answer_tokens as f64 / t.seconds),
                format!("{:.0}", t.answer_tokens as f64 / t.calls as f64),
                ollama.map_or(String::new(), |o| {
                    format!("{:.2}x", t.calls_per_second() / o)
                }),
            ]
        })
        .collect::<Vec<_>>();
    let columns = [
        "backend",
        "batch",
        "calls/s",
        "prompt tok/s",
        "answer tok/s",
        "answer tokens/call",
        "vs ollama",
    ]
    .map(str::to_owned);
    printer.result(&table(&columns, &rows, ""));
    printer.result(&format!(
        "medians of {} interleaved rounds of {} calls ({} prompt tokens each round)\n",
        args.rounds.max(1),
        args.calls,
        prompt_tokens
    ));
    Ok(())
}

/// A new empty folder under the system's temporary folder.
fn tempfile_dir(prefix: &str) -> Result<PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    fs_err::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::peak::{FmaPeak, VectorUnit};

    #[test]
    fn shapes_read_as_pairs_x_tokens() {
        assert_eq!(
            parse_shape("32x256"),
            Ok(Shape {
                pairs: 32,
                tokens: 256
            })
        );
        assert!(parse_shape("32").is_err());
        assert!(parse_shape("0x128").is_err());
    }

    #[test]
    fn peer_figures_read_by_peer_and_shape_and_refuse_unknown_fields() {
        let peers: Peers = serde_json::from_str(
            r#"{"pytorch": {"16x128": {"step_seconds": 1.75, "sentences_per_second": 83}}}"#,
        )
        .expect("peer figures");
        let figures = peers["pytorch"]["16x128"];
        assert_eq!(figures.step_seconds, Some(1.75));
        assert_eq!(figures.peak_bytes, None);
        assert!(serde_json::from_str::<Peers>(r#"{"p": {"16x128": {"steps": 1}}}"#).is_err());
    }

    /// Our figures at 16 x 128 in round numbers: a 1.4 s step, 100 sentences/s, a measured peak
    /// of 400 GFLOP/s on the units the products run on.
    fn our_report() -> bench::BenchReport {
        bench::BenchReport {
            implementation: "fused",
            matmul: "f32",
            threads: 2,
            tokens: 128,
            pairs: 16,
            steps: Vec::new(),
            median_step: bench::StepTime {
                total: 1.4,
                ..bench::StepTime::default()
            },
            peak_step_bytes: Some(2_000_000_000),
            sentences: 320,
            encode_seconds: 3.2,
            encode_cpu_seconds: 6.4,
            sentences_per_second: 100.,
            sentence_flops: 2e9,
            step_flops: 200e9,
            fma_peak: Some(FmaPeak {
                flops: 400e9,
                threads: 2,
                unit: VectorUnit::Avx2,
            }),
            peak_bounds_products: true,
            profile: Vec::new(),
            bf16_encode: Some(bench::Bf16Encode {
                engine: "AVX-512 BF16",
                seconds: 2.,
                sentences_per_second: 160.,
                lowest_cosine: 0.99997,
            }),
        }
    }

    #[test]
    fn ratios_put_ours_over_the_peers() {
        let ours = our_report();
        let peer = PeerFigures {
            step_seconds: Some(1.75),
            sentences_per_second: Some(80.),
            peak_bytes: None,
        };
        let r = ratios(&ours, &peer);
        assert!((r.step_time.expect("step") - 0.8).abs() < 1e-12);
        assert!((r.encode_throughput.expect("encode") - 1.25).abs() < 1e-12);
        assert!((r.bf16_encode_throughput.expect("bf16") - 2.0).abs() < 1e-12);
        assert_eq!(r.peak_memory, None);
    }

    /// The work lines put each figure over the measured peak, ours and the peer's, and say the
    /// most the peak allows; on AMX tiles no percentage is given.
    #[test]
    fn work_is_put_over_the_measured_peak() {
        let mut ours = our_report();
        let peer = PeerFigures {
            step_seconds: Some(2.0),
            sentences_per_second: Some(80.),
            peak_bytes: None,
        };
        let compared = [("pytorch", peer)].into_iter().collect();
        let text = encoder_text(&ours, &compared);
        assert!(
            text.contains("encoding in bf16 (AVX-512 BF16): 160.0 sentences/s (1.60x f32; 2.00 s), lowest cosine to f32 0.999970\n"),
            "{text}"
        );
        assert!(
            text.contains("against pytorch: step time 0.70x, encoding throughput 1.25x (in bf16 2.00x), peak memory -\n"),
            "{text}"
        );
        assert!(
            text.contains("model FLOPs: 2.00 G a sentence, 200 G a step (backward = 2 x forward); this CPU's f32 FMA peak, measured: 400 GFLOP/s (AVX2 FMA, 2 threads)"),
            "{text}"
        );
        assert!(
            text.contains("work: step 143 GFLOP/s (36% of the FMA peak), encoding 200 GFLOP/s (50%; 200.0 sentences/s at the peak)"),
            "{text}"
        );
        assert!(
            text.contains("  pytorch's work: step 100 GFLOP/s (25% of the FMA peak), encoding 160 GFLOP/s (40%)\n"),
            "{text}"
        );
        ours.peak_bounds_products = false;
        let text = encoder_text(&ours, &compared);
        assert!(
            text.contains("AMX tiles, which the FMA peak does not bound"),
            "{text}"
        );
        assert!(
            text.contains("work: step 143 GFLOP/s, encoding 200 GFLOP/s\n"),
            "{text}"
        );
    }
}
