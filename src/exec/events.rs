//! Events of a run: what `--json` prints (one JSON object per line on stdout) and what the per-run
//! log under `<workdir>/runs/` records.
//!
//! Every line has a `type`:
//!
//! | `type`           | when                                      | fields                                          |
//! |------------------|-------------------------------------------|-------------------------------------------------|
//! | `plan`           | after planning                            | `recipe`, `workdir`, `stages[]` (stage, key, inputs, cached, reasons) |
//! | `estimate`       | `plan` only: after the plan               | `stages[]` (stage, estimate: seconds, peak_bytes, basis; or problem), `seconds`, `peak_bytes`, `basis` |
//! | `waiting`        | another run holds the workdir             | `pid`                                           |
//! | `stage-skipped`  | a stage's artifact is cached              | `stage`, `key`, `reason`                        |
//! | `stage-start`    | a stage starts                            | `stage`, `key`, `reasons` (typed), `why` (text) |
//! | `stage-progress` | progress of long work (≤ 10/s per bar)    | `stage`, `id`, `label`, `done`, `total`, `message`, `finished` |
//! | `stage-note`     | an info or warning line                   | `stage`, `level`, `message`                     |
//! | `stage-table`    | a summary table                           | `stage`, `title`, `columns`, `rows`             |
//! | `stage-done`     | a stage committed its artifact            | `stage`, `key`, `seconds`, `output`, `summary`  |
//! | `stage-failed`   | a stage failed or was interrupted         | `stage`, `key`, `seconds`, `message`, `resumable` |
//! | `summary`        | at the end                                | `ran`, `cached`, `failed`, `seconds`            |
//! | `diagnostic`     | an error, as miette's JSON report         | `diagnostic`                                    |
//! | `run-failed`     | in the run log only: the run failed before or between stages | `message` |

use serde::Serialize;

use crate::plan::estimate::PlanEstimate;
use crate::plan::{DirtyReason, PlanEntry};
use crate::stages::context::NoteLevel;

/// One event; see the module documentation for the JSON form.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    Plan {
        recipe: String,
        workdir: String,
        stages: Vec<PlanEntry>,
    },
    Estimate {
        #[serde(flatten)]
        estimate: PlanEstimate,
    },
    Waiting {
        pid: Option<u32>,
    },
    StageSkipped {
        stage: String,
        key: String,
        reason: String,
    },
    StageStart {
        stage: String,
        key: String,
        reasons: Vec<DirtyReason>,
        why: Vec<String>,
    },
    StageProgress {
        stage: String,
        id: u64,
        label: String,
        done: u64,
        total: Option<u64>,
        message: Option<String>,
        finished: bool,
    },
    StageNote {
        stage: String,
        level: NoteLevel,
        message: String,
    },
    StageTable {
        stage: String,
        title: String,
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    StageDone {
        stage: String,
        key: String,
        seconds: f64,
        output: String,
        summary: serde_json::Value,
    },
    StageFailed {
        stage: String,
        key: String,
        seconds: f64,
        message: String,
        /// True when an interrupted stage left a journal that the next run resumes from.
        resumable: bool,
    },
    Summary {
        ran: usize,
        cached: usize,
        failed: usize,
        seconds: f64,
    },
    Diagnostic {
        diagnostic: serde_json::Value,
    },
    RunFailed {
        message: String,
    },
}

/// Receives the events of a run. The CLI renders them for people or as JSON lines.
pub trait Reporter: Send + Sync {
    fn event(&self, event: &Event);
}

/// Discards events: for planning quietly (`status`, `run --dry-run`, the dashboard's review).
pub struct NoReporter;

impl Reporter for NoReporter {
    fn event(&self, _event: &Event) {}
}
