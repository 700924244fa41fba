//! `ragd-pipe status`: the recipe and its inputs against the lock file, and what the local store
//! holds. On a fresh clone (an empty store) it still tells which stages changed since the lock.
//! Like `git diff --exit-code` and `dvc status`, it exits 1 when a stage would rerun.

use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use super::{Failure, RecipeArgs};
use crate::exec;
use crate::output::{Printer, table};
use crate::plan::{DirtyReason, PlanOptions, SinceLock, Status, since_lock};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Serialize)]
struct StageStatus {
    stage: String,
    /// `in-sync`, `changed`, `not-locked` or `unknown` (the key could not be computed).
    lock: &'static str,
    changes: Vec<DirtyReason>,
    /// `present`, `missing`, `damaged`, `stale` (computed from other upstream bytes) or
    /// `unknown` (the stage's inputs could not be resolved).
    store: &'static str,
    would_run: bool,
}

pub(super) fn execute(args: &StatusArgs, printer: &Printer) -> Result<(), Failure> {
    let recipe = args.recipe.load()?;
    let prepared = exec::prepare(&recipe, &PlanOptions::default(), Arc::new(exec::NoReporter))?;
    let statuses: Vec<StageStatus> = prepared
        .plan
        .stages
        .iter()
        .map(|stage| {
            let since = since_lock(
                &prepared.store,
                &prepared.lock,
                stage.spec.kind,
                stage.spec.section,
                &stage.record,
                &stage.key,
            );
            let (lock, changes) = match since {
                _ if stage.unresolved.is_some() => match &stage.status {
                    Status::Run(reasons) => ("unknown", reasons.clone()),
                    Status::Cached(_) => ("unknown", Vec::new()),
                },
                SinceLock::NotLocked => ("not-locked", Vec::new()),
                SinceLock::InSync => ("in-sync", Vec::new()),
                SinceLock::Changed(reasons) => ("changed", reasons),
            };
            let store = match &stage.status {
                _ if stage.unresolved.is_some() => "unknown",
                Status::Cached(_) => "present",
                Status::Run(reasons)
                    if reasons
                        .iter()
                        .any(|r| matches!(r, DirtyReason::ArtifactCorrupt { .. })) =>
                {
                    "damaged"
                }
                Status::Run(reasons)
                    if reasons
                        .iter()
                        .any(|r| matches!(r, DirtyReason::UpstreamOutput { .. })) =>
                {
                    "stale"
                }
                Status::Run(_) if stage.reusable.is_some() => "present",
                Status::Run(_) => "missing",
            };
            StageStatus {
                stage: stage.spec.kind.to_owned(),
                lock,
                changes,
                store,
                would_run: !stage.status.is_cached(),
            }
        })
        .collect();
    let outcome = if statuses.iter().any(|s| s.would_run) {
        Err(Failure::code(1))
    } else {
        Ok(())
    };
    if printer.json {
        printer.json_line(&serde_json::json!({"type": "status", "recipe": recipe.path, "lock": recipe.lock_path(), "stages": statuses}));
        return outcome;
    }
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            let lock = match s.lock {
                "changed" | "unknown" => format!(
                    "{}: {}",
                    s.lock,
                    s.changes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                other => other.replace('-', " "),
            };
            vec![
                s.stage.clone(),
                s.store.to_owned(),
                if s.would_run {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                },
                lock,
            ]
        })
        .collect();
    let columns = ["stage", "store", "would run", "against the lock"].map(str::to_owned);
    let mut out = format!("lock  {}\n\n", recipe.lock_path().display());
    out.push_str(&table(&columns, &rows, ""));
    printer.result(&out);
    outcome
}
