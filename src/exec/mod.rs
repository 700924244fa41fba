//! The executor: plans a recipe, then runs each stage that is not cached, in order, committing
//! each artifact atomically and recording it in the lock file before the next stage starts.
//!
//! It holds the workdir lock for the whole run (a second run waits or fails), runs each stage on
//! tokio's blocking pool so CPU-heavy work stays off the async threads while stages can still drive
//! async work (LLM calls) through the runtime handle, and turns everything into [`Event`]s for the
//! terminal, `--json` and the per-run log.

pub mod events;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fs_err as fs;

pub use events::{Event, NoReporter, Reporter};

use crate::cache::digest::DigestMemo;
use crate::cache::error::CacheError;
use crate::cache::lock::{LockFile, LockedStage};
use crate::cache::store::{LockWait, Store, WorkdirLock};
use crate::error_chain;
use crate::model::hub::HubConfig;
use crate::plan::estimate::PlanEstimate;
use crate::plan::{Dag, Plan, PlanError, PlanOptions, Status};
use crate::recipe::{Recipe, RecipeError};
use crate::stages::context::StageNote;
use crate::stages::estimate::Speeds;
use crate::stages::{StageContext, StageEnv, StageError, StageReporter, Table};

/// What `run` does beyond planning.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub plan: PlanOptions,
    /// Run this stage and what it needs, nothing after it.
    pub until: Option<String>,
    /// Run only this stage; its inputs must already be built.
    pub only: Option<String>,
    /// Plan and report, run nothing.
    pub dry_run: bool,
    /// Fail instead of waiting when another run holds the workdir.
    pub no_wait: bool,
}

/// How a run ended.
#[derive(Default)]
pub struct RunReport {
    pub ran: Vec<String>,
    pub cached: Vec<String>,
    pub seconds: f64,
    pub log: Option<PathBuf>,
    /// A dry run's plan, for rendering: what would run and why.
    pub dry_plan: Option<Plan>,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ExecError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(#[from] CacheError),
    #[error("this recipe has no stage `{name}`")]
    #[diagnostic(code(ragd::run::unknown_stage), help("stages of this recipe: {valid}"))]
    UnknownStage { name: String, valid: String },
    #[error("stage `{stage}` needs `{needs}`, which is not built yet")]
    #[diagnostic(
        code(ragd::run::not_built),
        help("run without `--only` (or with `--until {stage}`) to build it first")
    )]
    NotBuilt { stage: String, needs: String },
    #[error("stage `{stage}` failed")]
    #[diagnostic(code(ragd::run::stage_failed))]
    StageFailed {
        stage: String,
        #[source]
        source: StageError,
    },
    #[error("interrupted during stage `{stage}`")]
    #[diagnostic(
        code(ragd::run::interrupted),
        help("finished work is kept; run again to resume")
    )]
    Interrupted { stage: String },
}

impl ExecError {
    /// 1 for a problem with what the user wrote or asked, 2 for a failure while working.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Recipe(_) | Self::UnknownStage { .. } | Self::NotBuilt { .. } => 1,
            Self::Interrupted { .. } => 130,
            _ => 2,
        }
    }
}

/// Everything known before running: the plan, the store and the lock.
pub struct Prepared {
    pub plan: Plan,
    pub store: Store,
    pub memo: DigestMemo,
    pub lock: LockFile,
    bridge: Arc<Bridge>,
}

/// Builds the DAG and the plan. Keys need every stage's external inputs, so this resolves them:
/// models are downloaded on first use (into the caches, with progress through `reporter`) and
/// LLM servers are asked for their model's identity; a server that does not answer leaves its
/// stages unresolved, not the plan failed. The workdir is only read: `plan`, `status` and
/// `run --dry-run` work on a read-only or full one. The digest memo is saved when it can be, to
/// spare rehashing next time; failing to save it costs only that.
pub fn prepare(
    recipe: &Recipe,
    options: &PlanOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<Prepared, ExecError> {
    prepare_with(recipe, options, Arc::new(Bridge::new(reporter)))
}

fn prepare_with(
    recipe: &Recipe,
    options: &PlanOptions,
    bridge: Arc<Bridge>,
) -> Result<Prepared, ExecError> {
    let dag = Dag::build(recipe)?;
    let store = Store::at(&recipe.workdir);
    let mut memo = DigestMemo::open(&store.memo_path());
    let lock = LockFile::read(&recipe.lock_path())?;
    let hub = HubConfig::from_env();
    let env_for = |stage: &'static str| StageEnv {
        recipe: recipe.env.clone(),
        hub: hub.clone(),
        reporter: bridge.clone(),
        stage,
    };
    let plan = Plan::build(dag, &store, &mut memo, &lock, &env_for, options)?;
    let _ = memo.save();
    Ok(Prepared {
        plan,
        store,
        memo,
        lock,
        bridge,
    })
}

/// What the stages of a prepared plan that will run cost on this machine. Models are resolved
/// and, the first time on a machine, timed (a few seconds each); reports go to the reporter.
pub fn estimate(recipe: &Recipe, prepared: &Prepared) -> PlanEstimate {
    let hub = HubConfig::from_env();
    let speeds = Speeds::open(&hub.cache_dir);
    let env_for = |stage: &'static str| StageEnv {
        recipe: recipe.env.clone(),
        hub: hub.clone(),
        reporter: prepared.bridge.clone(),
        stage,
    };
    PlanEstimate::of(&prepared.plan, &prepared.store, &env_for, &speeds)
}

/// The plan event for a prepared recipe.
pub fn plan_event(recipe: &Recipe, plan: &Plan) -> Event {
    Event::Plan {
        recipe: recipe.path.display().to_string(),
        workdir: recipe.workdir.display().to_string(),
        stages: plan.entries(),
    }
}

/// Runs a recipe. `cancel` is set by the caller on Ctrl-C; the running stage stops at its next
/// check and keeps its journal.
pub fn run(
    recipe: &Recipe,
    options: &RunOptions,
    reporter: Arc<dyn Reporter>,
    runtime: &tokio::runtime::Handle,
    cancel: Arc<AtomicBool>,
) -> Result<RunReport, ExecError> {
    let started = Instant::now();
    let _workdir_lock = if options.dry_run {
        None
    } else {
        let wait = if options.no_wait {
            LockWait::Fail
        } else {
            LockWait::Wait
        };
        Some(WorkdirLock::acquire(&recipe.workdir, wait, &mut |pid| {
            reporter.event(&Event::Waiting { pid });
        })?)
    };
    // A real run keeps a log from the start, so that a run failing before any stage (a recipe
    // whose DAG does not hold, a file that cannot be hashed) leaves a record too.
    let bridge = Arc::new(Bridge::new(reporter.clone()));
    let log = if options.dry_run {
        None
    } else {
        let store = Store::open(&recipe.workdir)?;
        Some(bridge.open_log(&store)?)
    };
    let prepared = prepare_with(recipe, &options.plan, bridge.clone())
        .and_then(|prepared| select(&prepared.plan, options).map(|selected| (prepared, selected)))
        .inspect_err(|error| {
            bridge.log_only(&Event::RunFailed {
                message: error_chain(error),
            });
        });
    let (prepared, selected) = prepared?;
    prepared.bridge.emit(&plan_event(recipe, &prepared.plan));
    let mut report = RunReport {
        log,
        ..RunReport::default()
    };
    if options.dry_run {
        report.dry_plan = Some(prepared.plan);
        return Ok(report);
    }
    prepared.store.register_lock(&recipe.lock_path())?;

    let Prepared {
        plan,
        store,
        mut memo,
        lock,
        bridge,
    } = prepared;
    let mut runner = Runner {
        recipe,
        available: plan.stages.iter().map(|s| s.status.is_cached()).collect(),
        outputs: plan
            .stages
            .iter()
            .map(|s| match &s.status {
                Status::Cached(manifest) => Some(manifest.digest.clone()),
                Status::Run(_) => None,
            })
            .collect(),
        plan: &plan,
        store,
        lock,
        bridge,
        hub: HubConfig::from_env(),
        report,
        cancel,
        runtime,
    };
    let mut failure = None;
    for index in selected {
        if let Some(error) = runner.step(index)? {
            failure = Some(error);
            break;
        }
    }
    memo.save().map_err(CacheError::from)?;
    let mut report = runner.report;
    report.seconds = started.elapsed().as_secs_f64();
    runner.bridge.emit(&Event::Summary {
        ran: report.ran.len(),
        cached: report.cached.len(),
        failed: usize::from(failure.is_some()),
        seconds: report.seconds,
    });
    match failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// A run in progress: what has been built so far and where it is recorded.
struct Runner<'a> {
    recipe: &'a Recipe,
    plan: &'a Plan,
    store: Store,
    lock: LockFile,
    bridge: Arc<Bridge>,
    /// Built once per run and handed to every stage.
    hub: HubConfig,
    /// Whether each stage's artifact is in the store now.
    available: Vec<bool>,
    /// The output digest of each stage's artifact as it is now, filled in as stages run.
    outputs: Vec<Option<String>>,
    report: RunReport,
    cancel: Arc<AtomicBool>,
    runtime: &'a tokio::runtime::Handle,
}

impl Runner<'_> {
    /// Skips or runs the stage at `index`: `Ok(Some(error))` when the stage failed or was
    /// interrupted (the run stops there), `Err` when the run itself cannot go on.
    fn step(&mut self, index: usize) -> Result<Option<ExecError>, ExecError> {
        let planned = &self.plan.stages[index];
        let kind = planned.spec.kind;
        if let Some(error) = &planned.unresolved {
            self.bridge.emit(&Event::StageFailed {
                stage: kind.to_owned(),
                key: planned.key.clone(),
                seconds: 0.,
                message: error_chain(error.as_ref()),
                resumable: false,
            });
            return Ok(Some(ExecError::Plan(PlanError::External {
                stage: kind.to_owned(),
                source: error.clone(),
            })));
        }
        // What this stage reads now: each input's output digest, once every producer has one.
        let consumed: Option<BTreeMap<String, String>> = planned
            .inputs
            .iter()
            .map(|(&artifact, &producer)| {
                self.outputs[producer]
                    .clone()
                    .map(|digest| (crate::plan::artifact_name(artifact), digest))
            })
            .collect();
        if self.skip_cached(index, consumed.as_ref())? {
            return Ok(None);
        }
        if let Some((_, &producer)) = planned.inputs.iter().find(|(_, p)| !self.available[**p]) {
            return Err(ExecError::NotBuilt {
                stage: kind.to_owned(),
                needs: self.plan.stages[producer].spec.kind.to_owned(),
            });
        }
        self.run_one(index, consumed.unwrap_or_default())
    }

    /// Keeps the stage's artifact when it is cached, or when its inputs came out identical to
    /// those it was built from (early cutoff); whether it did.
    fn skip_cached(
        &mut self,
        index: usize,
        consumed: Option<&BTreeMap<String, String>>,
    ) -> Result<bool, ExecError> {
        let planned = &self.plan.stages[index];
        let kind = planned.spec.kind;
        let kept = match &planned.status {
            Status::Cached(manifest) => Some((&**manifest, "cached")),
            Status::Run(_) => consumed
                .and_then(|current| planned.reusable_with(current))
                .map(|manifest| (manifest, "cached: its inputs came out identical")),
        };
        let Some((manifest, reason)) = kept else {
            return Ok(false);
        };
        self.bridge.emit(&Event::StageSkipped {
            stage: kind.to_owned(),
            key: planned.key.clone(),
            reason: reason.to_owned(),
        });
        let entry = locked(planned, manifest);
        if self.lock.stages.get(kind) != Some(&entry) {
            self.lock.stages.insert(kind.to_owned(), entry);
            self.lock.write(&self.recipe.lock_path())?;
        }
        self.available[index] = true;
        self.outputs[index] = Some(manifest.digest.clone());
        self.report.cached.push(kind.to_owned());
        Ok(true)
    }

    /// Runs the stage on a blocking thread into a staging folder and commits its artifact.
    fn run_one(
        &mut self,
        index: usize,
        consumed: BTreeMap<String, String>,
    ) -> Result<Option<ExecError>, ExecError> {
        let planned = &self.plan.stages[index];
        let kind = planned.spec.kind;
        let reasons = match &planned.status {
            Status::Run(reasons) => reasons.clone(),
            Status::Cached(_) => Vec::new(),
        };
        self.bridge.emit(&Event::StageStart {
            stage: kind.to_owned(),
            key: planned.key.clone(),
            why: reasons.iter().map(ToString::to_string).collect(),
            reasons,
        });
        let stage_started = Instant::now();
        self.store.remove(&planned.key)?;
        let staging = self.store.begin(&planned.key)?;
        self.store.save_record(&planned.key, &planned.record)?;
        let context = self.context(index, &staging);
        let stage = planned.stage.clone();
        let outcome = self
            .runtime
            .block_on(self.runtime.spawn_blocking(move || stage.run(&context)))
            .unwrap_or_else(|join| {
                Err(StageError::Failed(format!(
                    "the stage thread panicked: {join}"
                )))
            });
        let seconds = stage_started.elapsed().as_secs_f64();
        match outcome {
            Ok(outcome) => {
                let manifest =
                    self.store
                        .commit(&staging, kind, outcome.summary.clone(), consumed)?;
                self.outputs[index] = Some(manifest.digest.clone());
                self.lock
                    .stages
                    .insert(kind.to_owned(), locked(planned, &manifest));
                self.lock.write(&self.recipe.lock_path())?;
                self.bridge.emit(&Event::StageDone {
                    stage: kind.to_owned(),
                    key: planned.key.clone(),
                    seconds,
                    output: manifest.digest.clone(),
                    summary: outcome.summary,
                });
                self.available[index] = true;
                self.report.ran.push(kind.to_owned());
                Ok(None)
            }
            Err(error) => {
                let interrupted =
                    matches!(error, StageError::Cancelled) || self.cancel.load(Ordering::Relaxed);
                let resumable = fs::read_dir(&staging.journal_dir)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                self.bridge.emit(&Event::StageFailed {
                    stage: kind.to_owned(),
                    key: planned.key.clone(),
                    seconds,
                    message: error_chain(&error),
                    resumable,
                });
                Ok(Some(if interrupted {
                    ExecError::Interrupted {
                        stage: kind.to_owned(),
                    }
                } else {
                    ExecError::StageFailed {
                        stage: kind.to_owned(),
                        source: error,
                    }
                }))
            }
        }
    }

    /// What the stage at `index` sees while it runs in `staging`.
    fn context(&self, index: usize, staging: &crate::cache::store::Staging) -> StageContext {
        let planned = &self.plan.stages[index];
        StageContext {
            env: StageEnv {
                recipe: self.recipe.env.clone(),
                hub: self.hub.clone(),
                reporter: self.bridge.clone(),
                stage: planned.spec.kind,
            },
            key: planned.key.clone(),
            out_dir: staging.out_dir.clone(),
            journal_dir: staging.journal_dir.clone(),
            inputs: planned
                .inputs
                .iter()
                .map(|(&artifact, &producer)| {
                    (
                        artifact,
                        self.store.artifact_dir(&self.plan.stages[producer].key),
                    )
                })
                .collect(),
            shared_dir: self.store.shared_dir(),
            recipe_text: provenance_text(self.recipe),
            recipe_path: self.recipe.path.clone(),
            upstream_keys: planned.record.upstream.clone(),
            cancel: self.cancel.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

/// The stages `--only`/`--until` select (all by default), as plan indexes.
fn select(plan: &Plan, options: &RunOptions) -> Result<Vec<usize>, ExecError> {
    check_stage_names(plan, &options.plan.force)?;
    let find = |name: &str| plan.find(name).ok_or_else(|| unknown_stage(plan, name));
    if let Some(only) = &options.only {
        return Ok(vec![find(only)?]);
    }
    if let Some(until) = &options.until {
        return Ok(plan.ancestors(find(until)?));
    }
    Ok((0..plan.stages.len()).collect())
}

/// A name the recipe has no stage for is a mistake, not a no-op (`run` and `plan` alike).
pub fn check_stage_names(plan: &Plan, names: &[String]) -> Result<(), ExecError> {
    match names.iter().find(|name| plan.find(name).is_none()) {
        Some(name) => Err(unknown_stage(plan, name)),
        None => Ok(()),
    }
}

/// The error for `name`, listing the stages the recipe has.
fn unknown_stage(plan: &Plan, name: &str) -> ExecError {
    ExecError::UnknownStage {
        name: name.to_owned(),
        valid: plan
            .stages
            .iter()
            .map(|s| format!("`{}`", s.spec.kind))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn locked(
    planned: &crate::plan::PlannedStage,
    manifest: &crate::cache::store::Manifest,
) -> LockedStage {
    LockedStage {
        key: planned.key.clone(),
        record: planned.record.summarized(),
        output: manifest.digest.clone(),
        bytes: manifest.bytes(),
        summary: crate::cache::lock::reproducible_summary(&manifest.summary),
    }
}

/// The recipe text plus the overrides applied, as provenance for models and the registry.
fn provenance_text(recipe: &Recipe) -> String {
    let mut text = recipe.text.to_string();
    if !recipe.overrides.is_empty() {
        text.push_str("\n# overrides (--set):\n");
        for o in &recipe.overrides {
            text.push_str(&format!("#   {o}\n"));
        }
    }
    text
}

/// Remembers which lock files use this workdir, so `gc` knows every key still referenced.
type BarInfo = (String, String, Option<u64>);

/// Turns stage reports into events, for the caller's reporter and the run log.
struct Bridge {
    reporter: Arc<dyn Reporter>,
    log: Mutex<Option<RunLog>>,
    /// Progress id → (stage, label, total), to fill in updates.
    bars: Mutex<HashMap<u64, BarInfo>>,
}

/// The run log being written, and when its buffer last reached the file.
struct RunLog {
    writer: std::io::BufWriter<fs::File>,
    flushed: Instant,
}

/// Progress lines are buffered, but reach the file at least this often: someone reading the
/// log while a stage runs sees where it is.
const PROGRESS_FLUSH: Duration = Duration::from_secs(1);

impl Bridge {
    fn new(reporter: Arc<dyn Reporter>) -> Self {
        Self {
            reporter,
            log: Mutex::new(None),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn open_log(&self, store: &Store) -> Result<PathBuf, CacheError> {
        let name = format!(
            "{}-{}.jsonl",
            jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ"),
            std::process::id()
        );
        let path = store.runs_dir().join(name);
        let file = fs::File::create(&path)?;
        *self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(RunLog {
            writer: std::io::BufWriter::new(file),
            flushed: Instant::now(),
        });
        Ok(path)
    }

    fn emit(&self, event: &Event) {
        self.reporter.event(event);
        self.log_only(event);
    }

    /// Records an event in the run log without showing it (the caller reports it otherwise).
    fn log_only(&self, event: &Event) {
        let mut log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(log) = log.as_mut() {
            // The log is a record for later reading; failing to write it must not fail the run.
            let line = serde_json::to_string(event).unwrap_or_default();
            let _ = writeln!(log.writer, "{line}");
            if !matches!(event, Event::StageProgress { .. })
                || log.flushed.elapsed() >= PROGRESS_FLUSH
            {
                let _ = log.writer.flush();
                log.flushed = Instant::now();
            }
        }
    }
}

impl StageReporter for Bridge {
    fn note(&self, stage: &str, note: StageNote) {
        self.emit(&Event::StageNote {
            stage: stage.to_owned(),
            level: note.level,
            message: note.message,
        });
    }

    fn progress_start(&self, stage: &str, id: u64, label: &str, total: Option<u64>) {
        self.bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, (stage.to_owned(), label.to_owned(), total));
        self.emit(&Event::StageProgress {
            stage: stage.to_owned(),
            id,
            label: label.to_owned(),
            done: 0,
            total,
            message: None,
            finished: false,
        });
    }

    fn progress_update(&self, id: u64, done: u64, message: Option<&str>) {
        let bar = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some((stage, label, total)) = bar {
            self.emit(&Event::StageProgress {
                stage,
                id,
                label,
                done,
                total,
                message: message.map(str::to_owned),
                finished: false,
            });
        }
    }

    fn progress_end(&self, id: u64) {
        let bar = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        if let Some((stage, label, total)) = bar {
            self.emit(&Event::StageProgress {
                stage,
                id,
                label,
                done: total.unwrap_or(0),
                total,
                message: None,
                finished: true,
            });
        }
    }

    fn table(&self, stage: &str, table: &Table) {
        self.emit(&Event::StageTable {
            stage: stage.to_owned(),
            title: table.title.clone(),
            columns: table.columns.clone(),
            rows: table.rows.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::plan::DirtyReason;
    use crate::stages::{Artifact, External, Input, Stage, StageOutcome};

    /// A stage that is not bit-reproducible: it writes whatever `output` holds, or random bytes
    /// when it holds nothing (an LLM sampling without a seed).
    struct Nondeterministic {
        output: Arc<Mutex<Option<String>>>,
    }

    impl Stage for Nondeterministic {
        fn version(&self) -> u32 {
            1
        }
        fn inputs(&self) -> Vec<Input> {
            Vec::new()
        }
        fn params(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn externals(&self, _env: &StageEnv) -> Result<Vec<External>, StageError> {
            Ok(Vec::new())
        }
        fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
            let text = self
                .output
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_else(|| rand::random::<u64>().to_string());
            fs::write(ctx.out_dir.join("chunks.jsonl"), text)?;
            Ok(StageOutcome::default())
        }
    }

    /// A stage reading the chunks, counting its runs.
    struct Reader {
        runs: Arc<AtomicUsize>,
    }

    impl Stage for Reader {
        fn version(&self) -> u32 {
            1
        }
        fn inputs(&self) -> Vec<Input> {
            vec![Input {
                artifact: Artifact::Chunks,
                required: true,
                instead: None,
            }]
        }
        fn params(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn externals(&self, _env: &StageEnv) -> Result<Vec<External>, StageError> {
            Ok(Vec::new())
        }
        fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let chunks = fs::read(ctx.input(Artifact::Chunks)?.join("chunks.jsonl"))?;
            fs::write(ctx.out_dir.join("queries.jsonl"), chunks)?;
            Ok(StageOutcome::default())
        }
    }

    /// A progress line stays in the buffer while the last flush is recent, and reaches the file
    /// once it is a second old, so the log can be followed while a stage runs.
    #[test]
    fn progress_reaches_the_run_log_at_least_once_a_second() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lines_after = |name: &str, flushed: Instant| {
            let path = dir.path().join(name);
            let bridge = Bridge::new(Arc::new(NoReporter));
            *bridge.log.lock().expect("not poisoned") = Some(RunLog {
                writer: std::io::BufWriter::new(fs::File::create(&path).expect("creates")),
                flushed,
            });
            bridge.progress_start("train", 1, "training", Some(10));
            bridge.progress_update(1, 5, Some("loss 1.0"));
            fs::read_to_string(&path).expect("reads").lines().count()
        };
        assert_eq!(lines_after("fresh.jsonl", Instant::now()), 0);
        let long_ago = Instant::now() - PROGRESS_FLUSH - Duration::from_millis(10);
        // The first line goes out with the flush it is due; the second waits for the next one.
        assert_eq!(lines_after("due.jsonl", long_ago), 1);
    }

    /// Every event of a run.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl Reporter for Recorder {
        fn event(&self, event: &Event) {
            self.0.lock().expect("not poisoned").push(event.clone());
        }
    }

    #[test]
    fn r18_11_dependents_follow_the_bytes_their_inputs_came_out_with() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("docs")).expect("mkdir");
        let mut recipe = Recipe::from_text(
            &dir.path().join("recipe.yaml"),
            "chunk:\n  input: docs\nquery_gen:\n  strategies: [ict]\n".to_owned(),
            &[],
        )
        .expect("loads");
        let output = Arc::new(Mutex::new(Some("one".to_owned())));
        let runs = Arc::new(AtomicUsize::new(0));
        recipe.stages[0].stage = Arc::new(Nondeterministic {
            output: output.clone(),
        });
        recipe.stages[1].stage = Arc::new(Reader { runs: runs.clone() });
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let run = |force: &[&str], only: Option<&str>| {
            let options = RunOptions {
                plan: PlanOptions {
                    force: force.iter().map(|f| (*f).to_owned()).collect(),
                    force_all: false,
                },
                only: only.map(str::to_owned),
                ..RunOptions::default()
            };
            let recorder = Arc::new(Recorder::default());
            let report = super::run(
                &recipe,
                &options,
                recorder.clone(),
                runtime.handle(),
                Arc::new(AtomicBool::new(false)),
            )
            .expect("runs");
            let events = std::mem::take(&mut *recorder.0.lock().expect("not poisoned"));
            (report, events)
        };

        run(&[], None);
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // Forced, the same bytes again: the reader is planned to run, then kept (early cutoff).
        let prepared = prepare(
            &recipe,
            &PlanOptions {
                force: vec!["chunk".to_owned()],
                force_all: false,
            },
            Arc::new(Recorder::default()),
        )
        .expect("plans");
        assert!(
            matches!(&prepared.plan.stages[1].status, Status::Run(reasons)
                if matches!(reasons[..], [DirtyReason::UpstreamRuns { .. }])),
            "a dependent of a forced stage is not listed as cached"
        );
        let (report, events) = run(&["chunk"], None);
        assert_eq!(report.ran, ["chunk"]);
        assert_eq!(report.cached, ["query-gen"]);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::StageSkipped { reason, .. }
            if reason.contains("identical")))
        );

        // Forced, and other bytes come out: the reader reruns on them.
        *output.lock().expect("not poisoned") = None;
        let (report, _) = run(&["chunk"], None);
        assert_eq!(report.ran, ["chunk", "query-gen"]);
        assert_eq!(runs.load(Ordering::SeqCst), 2);

        // The chunks recomputed alone (`--only`): the reader's artifact is stale, and reruns.
        let (report, _) = run(&["chunk"], Some("chunk"));
        assert_eq!(report.ran, ["chunk"]);
        let (report, _) = run(&[], None);
        assert_eq!(report.ran, ["query-gen"]);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let (report, _) = run(&[], None);
        assert!(report.ran.is_empty());
    }
}
