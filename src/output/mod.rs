//! Everything that reaches the terminal: results and `--json` on stdout, people on stderr, one
//! [`Printer`] deciding what is shown (quiet, verbose, bars or plain lines, colour).

mod human;

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

pub use human::HumanReporter;

use crate::exec::{Event, Reporter};

/// How chatty to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// The output settings of one invocation, resolved from flags and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    pub verbosity: Verbosity,
    pub json: bool,
    /// Animated bars: only on an interactive stderr, never in CI, `TERM=dumb` or when asked not to.
    pub progress: bool,
    pub color: bool,
}

impl Printer {
    pub fn new(verbosity: Verbosity, json: bool, no_progress: bool, color: ColorChoice) -> Self {
        let stderr_tty = std::io::stderr().is_terminal();
        let env = |key: &str| std::env::var_os(key).is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let progress = stderr_tty
            && !no_progress
            && !json
            && verbosity == Verbosity::Normal
            && !dumb
            && !env("CI")
            && !env("RAGD_NO_PROGRESS");
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => stderr_tty && !env("NO_COLOR") && !dumb,
        };
        Self {
            verbosity,
            json,
            progress,
            color,
        }
    }

    /// The reporter for a run: JSON lines on stdout, or lines and bars on stderr.
    pub fn reporter(&self) -> std::sync::Arc<dyn Reporter> {
        if self.json {
            std::sync::Arc::new(JsonReporter::default())
        } else {
            std::sync::Arc::new(HumanReporter::new(*self))
        }
    }

    /// Writes a result (a plan, a list) to stdout.
    pub fn result(&self, text: &str) {
        let mut out = anstream::stdout().lock();
        // A closed pipe (`| head`) is not an error worth reporting.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// Writes a line for people to stderr, unless quiet.
    pub fn status(&self, text: &str) {
        if self.verbosity > Verbosity::Quiet {
            let _ = writeln!(anstream::stderr().lock(), "{text}");
        }
    }

    /// Writes one JSON value as a line to stdout.
    pub fn json_line(&self, value: &impl serde::Serialize) {
        let line = serde_json::to_string(value).unwrap_or_default();
        self.result(&format!("{line}\n"));
    }
}

/// `--color`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

/// `--json`: every event as one JSON object per line on stdout.
#[derive(Default)]
pub struct JsonReporter {
    out: Mutex<()>,
}

impl Reporter for JsonReporter {
    fn event(&self, event: &Event) {
        let _guard = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let line = serde_json::to_string(event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Seconds as `4m12s`, `1.3s`, `2h05m`.
pub fn duration(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.1}s")
    } else if seconds < 60.0 {
        format!("{seconds:.0}s")
    } else if seconds < 3600.0 {
        let s = seconds.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = (seconds / 60.0).round() as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// A table as aligned columns.
pub fn table(columns: &[String], rows: &[Vec<String>], indent: &str) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .chain(columns.get(i))
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns.len()).map(width).collect();
    // A column of numbers aligns right, header included (a dash, for no figure, goes with
    // them); anything else aligns left.
    let numeric = |c: &str| {
        let c = c.trim_end_matches('%');
        c.parse::<f64>().is_ok() || c.starts_with('+') && c[1..].parse::<f64>().is_ok()
    };
    let right: Vec<bool> = (0..columns.len())
        .map(|i| {
            !rows.is_empty()
                && rows.iter().all(|r| {
                    r.get(i)
                        .is_none_or(|c| numeric(c) || matches!(c.as_str(), "" | "-" | "–"))
                })
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                if right.get(i).copied().unwrap_or(false) {
                    format!("{}{c}", " ".repeat(pad))
                } else {
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        format!("{indent}{}", padded.join("  ").trim_end())
    };
    let mut out = String::new();
    out.push_str(&line(columns));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(duration(1.25), "1.2s");
        assert_eq!(duration(42.0), "42s");
        assert_eq!(duration(252.0), "4m12s");
        assert_eq!(duration(7500.0), "2h05m");
    }

    #[test]
    fn aligns_tables() {
        let text = table(
            &["reason".into(), "files".into()],
            &[
                vec!["binary".into(), "3".into()],
                vec!["empty".into(), "12".into()],
            ],
            "  ",
        );
        assert_eq!(text, "  reason  files\n  binary      3\n  empty      12\n");
        let text = table(
            &["α".into(), "nDCG@10".into()],
            &[
                vec!["1".into(), "0.6854".into()],
                vec!["0.5".into(), "-".into()],
            ],
            "",
        );
        assert_eq!(text, "  α  nDCG@10\n  1   0.6854\n0.5        -\n");
    }
}
