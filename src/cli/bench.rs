//! `ragd-pipe bench`: benchmarks kept in the repository, so speed claims are measured, not timed
//! tests.
//!
//! - `rerun`: a no-change rerun of a chunk recipe over a generated corpus of N files (default
//!   5,000), timed as whole processes (start-up included), as a user would see it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::{Args, Subcommand};

use super::Failure;
use crate::output::Printer;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Time a no-change rerun of a chunk recipe over a generated corpus.
    Rerun(RerunArgs),
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
