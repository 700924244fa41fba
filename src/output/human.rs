//! Events rendered for people on stderr: a line per stage, tables, warnings, and indicatif bars
//! when stderr is interactive (plain lines otherwise).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use anstream::eprintln;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Printer, Verbosity, duration, table};
use crate::exec::{Event, Reporter};
use crate::stages::context::NoteLevel;

pub struct HumanReporter {
    printer: Printer,
    bars: MultiProgress,
    live: Mutex<HashMap<u64, ProgressBar>>,
}

impl HumanReporter {
    pub fn new(printer: Printer) -> Self {
        let target = if printer.progress {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            printer,
            bars: MultiProgress::with_draw_target(target),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Prints a line above any bars.
    fn line(&self, text: &str) {
        if self.printer.progress {
            // `println` on MultiProgress draws above the bars without tearing them.
            let _ = self.bars.println(text);
        } else {
            eprintln!("{text}");
            let _ = std::io::stderr().flush();
        }
    }

    fn paint(&self, text: &str, style: anstyle::Style) -> String {
        if self.printer.color {
            format!("{style}{text}{style:#}")
        } else {
            text.to_owned()
        }
    }
}

fn bar_style(total: Option<u64>) -> ProgressStyle {
    let template = if total.is_some() {
        "{prefix:>10} {msg:30!} [{bar:25}] {pos}/{len} {per_sec} eta {eta}"
    } else {
        "{prefix:>10} {spinner} {msg} {pos} {per_sec}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Reporter for HumanReporter {
    fn event(&self, event: &Event) {
        let quiet = self.printer.verbosity == Verbosity::Quiet;
        let verbose = self.printer.verbosity == Verbosity::Verbose;
        let green = anstyle::Style::new().fg_color(Some(anstyle::AnsiColor::Green.into()));
        let yellow = anstyle::Style::new().fg_color(Some(anstyle::AnsiColor::Yellow.into()));
        let red = anstyle::Style::new()
            .fg_color(Some(anstyle::AnsiColor::Red.into()))
            .bold();
        let dim = anstyle::Style::new().dimmed();
        match event {
            Event::Plan { .. } | Event::Estimate { .. } | Event::Diagnostic { .. } => {}
            Event::Waiting { pid } => {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                self.line(&format!(
                    "another ragd-pipe run{who} is using this workdir; waiting for it to finish"
                ));
            }
            Event::StageSkipped { stage, reason, key } if !quiet => {
                let key = if verbose {
                    format!(" {}", &key[..12.min(key.len())])
                } else {
                    String::new()
                };
                self.line(&format!(
                    "{} {stage}: {reason}{}",
                    self.paint("✓", green),
                    self.paint(&key, dim)
                ));
            }
            Event::StageStart { stage, why, .. } if !quiet => {
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join("; "))
                };
                self.line(&format!(
                    "{} {stage}: running{}",
                    self.paint("▶", green),
                    why
                ));
            }
            Event::StageProgress {
                stage,
                id,
                label,
                done,
                total,
                message,
                finished,
            } => {
                if !self.printer.progress {
                    return;
                }
                let mut live = self
                    .live
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *finished {
                    if let Some(bar) = live.remove(id) {
                        bar.finish_and_clear();
                        self.bars.remove(&bar);
                    }
                    return;
                }
                let bar = live.entry(*id).or_insert_with(|| {
                    let bar = self.bars.add(ProgressBar::new(total.unwrap_or(0)));
                    bar.set_style(bar_style(*total));
                    bar.set_prefix(stage.clone());
                    bar.set_message(label.clone());
                    if total.is_none() {
                        bar.enable_steady_tick(Duration::from_millis(120));
                    }
                    bar
                });
                bar.set_position(*done);
                if let Some(message) = message {
                    bar.set_message(format!("{label} {message}"));
                }
            }
            Event::StageNote {
                stage,
                level,
                message,
            } => match level {
                NoteLevel::Warn => self.line(&format!(
                    "  {} {stage}: {message}",
                    self.paint("warning:", yellow)
                )),
                NoteLevel::Info if !quiet => self.line(&format!("  {stage}: {message}")),
                NoteLevel::Info => {}
            },
            Event::StageTable {
                stage,
                title,
                columns,
                rows,
            } if !quiet => {
                let mut text = format!("  {stage}: {title}\n");
                text.push_str(&table(columns, rows, "    "));
                self.line(text.trim_end());
            }
            Event::StageDone { stage, seconds, .. } if !quiet => {
                self.line(&format!(
                    "{} {stage}: done in {}",
                    self.paint("✓", green),
                    duration(*seconds)
                ));
            }
            Event::StageFailed {
                stage,
                seconds,
                message,
                resumable,
                ..
            } => {
                self.line(&format!(
                    "{} {stage}: failed after {}: {message}",
                    self.paint("✗", red),
                    duration(*seconds)
                ));
                if *resumable {
                    self.line(
                        "  finished work is kept in the stage's journal; run again to resume",
                    );
                }
            }
            Event::Summary {
                ran,
                cached,
                failed,
                seconds,
            } if !quiet => {
                let mut parts = vec![format!("{ran} ran"), format!("{cached} cached")];
                if *failed > 0 {
                    parts.push(format!("{failed} failed"));
                }
                let nothing = if *ran == 0 && *failed == 0 {
                    " — nothing to do"
                } else {
                    ""
                };
                self.line(&format!(
                    "{} in {}{nothing}",
                    parts.join(", "),
                    duration(*seconds)
                ));
            }
            _ => {}
        }
    }
}
