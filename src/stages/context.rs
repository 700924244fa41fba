//! What a running stage sees: its folders, its inputs, the recipe, cancellation, and a reporter
//! that is the only way it talks to the user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Artifact, RecipeEnv, StageError};
use crate::model::hub::{HubConfig, HubNotice};

/// How important a note is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoteLevel {
    Info,
    Warn,
}

/// A line a stage wants a person to read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageNote {
    pub level: NoteLevel,
    pub message: String,
}

/// A summary table (files skipped by reason, queries dropped by filter, metrics).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Receives what stages report. Implemented by the executor, which turns reports into events for
/// the terminal, `--json` and the run log.
pub trait StageReporter: Send + Sync {
    fn note(&self, stage: &str, note: StageNote);
    fn progress_start(&self, stage: &str, id: u64, label: &str, total: Option<u64>);
    fn progress_update(&self, id: u64, done: u64, message: Option<&str>);
    fn progress_end(&self, id: u64);
    fn table(&self, stage: &str, table: &Table);
}

static NEXT_PROGRESS_ID: AtomicU64 = AtomicU64::new(1);

/// How often a progress handle forwards updates: bars redraw smoothly and a `--json` consumer is
/// not flooded by a million-step loop.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A progress bar of one long piece of work. Cheap to update from many threads; the reporter sees
/// at most one update per [`PROGRESS_INTERVAL`] plus the final count.
pub struct Progress {
    reporter: Arc<dyn StageReporter>,
    id: u64,
    done: AtomicU64,
    total: Option<u64>,
    last_sent: Mutex<Instant>,
}

impl Progress {
    pub fn new(
        reporter: Arc<dyn StageReporter>,
        stage: &str,
        label: &str,
        total: Option<u64>,
    ) -> Self {
        let id = NEXT_PROGRESS_ID.fetch_add(1, Ordering::Relaxed);
        reporter.progress_start(stage, id, label, total);
        Self {
            reporter,
            id,
            done: AtomicU64::new(0),
            total,
            last_sent: Mutex::new(Instant::now()),
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.maybe_send(done, None);
    }

    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.maybe_send(done, None);
    }

    /// Sets the count and a short status (`loss 0.213 lr 2.0e-5`).
    pub fn set_with_message(&self, done: u64, message: &str) {
        self.done.store(done, Ordering::Relaxed);
        self.maybe_send(done, Some(message));
    }

    fn maybe_send(&self, done: u64, message: Option<&str>) {
        let finished = self.total.is_some_and(|total| done >= total);
        let mut last = self
            .last_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if finished || last.elapsed() >= PROGRESS_INTERVAL {
            *last = Instant::now();
            self.reporter.progress_update(self.id, done, message);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let done = self.done.load(Ordering::Relaxed);
        self.reporter.progress_update(self.id, done, None);
        self.reporter.progress_end(self.id);
    }
}

/// What planning and running share: the recipe, where models come from, and the reporter.
#[derive(Clone)]
pub struct StageEnv {
    pub recipe: RecipeEnv,
    pub hub: HubConfig,
    pub reporter: Arc<dyn StageReporter>,
    /// The stage this environment is handed to, for attributing reports.
    pub stage: &'static str,
}

impl StageEnv {
    pub fn note(&self, level: NoteLevel, message: impl Into<String>) {
        self.reporter.note(
            self.stage,
            StageNote {
                level,
                message: message.into(),
            },
        );
    }

    /// Resolves a model reference, reporting fallbacks and download progress.
    pub fn resolve_model(
        &self,
        reference: &str,
        files: &[crate::model::hub::WantedFile],
    ) -> Result<PathBuf, StageError> {
        use crate::model::hub::{self, ModelRef};
        let parsed = ModelRef::parse(reference, &self.recipe.dir)?;
        let mut bar: Option<Progress> = None;
        let mut notice = |event: HubNotice| match event {
            HubNotice::Fallback {
                reference,
                mirror,
                why,
            } => self.note(
                NoteLevel::Info,
                format!(
                    "`{reference}`: the hub is not usable ({why}); using its mirror `{mirror}`"
                ),
            ),
            HubNotice::DownloadStart { name, total } => {
                bar = Some(Progress::new(
                    self.reporter.clone(),
                    self.stage,
                    &format!("downloading {name}"),
                    total,
                ));
            }
            HubNotice::DownloadProgress { done } => {
                if let Some(bar) = &bar {
                    bar.set(done);
                }
            }
            HubNotice::DownloadDone => bar = None,
        };
        Ok(hub::resolve(&parsed, files, &self.hub, &mut notice)?)
    }
}

/// Everything a running stage gets from the executor.
pub struct StageContext {
    pub env: StageEnv,
    /// The stage's cache key (hex).
    pub key: String,
    /// Where the artifact is written; committed atomically after `run` returns Ok.
    pub out_dir: PathBuf,
    /// Survives an interrupted run of the same key: a stage records finished work here to resume.
    pub journal_dir: PathBuf,
    /// Upstream artifact folders, verified before the stage starts.
    pub inputs: BTreeMap<Artifact, PathBuf>,
    /// Workdir-wide caches that outlive any one key (LLM responses).
    pub shared_dir: PathBuf,
    /// The recipe as written, and the hash of its lock entries upstream of this stage, for
    /// provenance in model cards and the registry.
    pub recipe_text: String,
    pub recipe_path: PathBuf,
    pub upstream_keys: BTreeMap<String, String>,
    pub cancel: Arc<AtomicBool>,
    pub runtime: tokio::runtime::Handle,
}

impl StageContext {
    pub fn stage(&self) -> &'static str {
        self.env.stage
    }

    pub fn progress(&self, label: &str, total: Option<u64>) -> Progress {
        Progress::new(self.env.reporter.clone(), self.env.stage, label, total)
    }

    pub fn info(&self, message: impl Into<String>) {
        self.env.note(NoteLevel::Info, message);
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.env.note(NoteLevel::Warn, message);
    }

    pub fn table(&self, table: &Table) {
        self.env.reporter.table(self.env.stage, table);
    }

    /// Err(Cancelled) once the user asked to stop; long loops call it between units of work.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The folder of an upstream artifact the stage declared as an input.
    pub fn input(&self, artifact: Artifact) -> Result<&Path, StageError> {
        self.inputs
            .get(&artifact)
            .map(PathBuf::as_path)
            .ok_or(StageError::MissingInput { artifact })
    }
}
