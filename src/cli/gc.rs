//! `ragd-pipe gc`: removes store entries, interrupted-run journals and key records that no lock
//! file using the workdir references.

use clap::Args;

use super::{Failure, RecipeArgs};
use crate::cache::store::{LockWait, Store, WorkdirLock};
use crate::exec;
use crate::output::Printer;

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Show what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub(super) fn execute(args: &GcArgs, printer: &Printer) -> Result<(), Failure> {
    let recipe = args.recipe.load()?;
    let workdir = &recipe.workdir;
    if !workdir.exists() {
        printer.status("nothing to collect: the workdir does not exist");
        return Ok(());
    }
    let _lock = WorkdirLock::acquire(workdir, LockWait::Fail, &mut |_| {})
        .map_err(|e| Failure::new(exec::ExecError::from(e), 2))?;
    let store = Store::at(workdir);
    let mut locks = exec::registered_locks(workdir);
    let own = std::path::absolute(recipe.lock_path()).unwrap_or_else(|_| recipe.lock_path());
    if !locks.contains(&own) {
        locks.push(own);
    }
    let referenced = exec::referenced_keys(&locks);
    let mut keys = store
        .keys()
        .map_err(|e| Failure::new(exec::ExecError::from(e), 2))?;
    keys.extend(
        store
            .staged_keys()
            .map_err(|e| Failure::new(exec::ExecError::from(e), 2))?,
    );
    keys.sort();
    keys.dedup();
    let mut freed = 0u64;
    let mut removed = 0usize;
    for key in keys.iter().filter(|k| !referenced.contains_key(*k)) {
        removed += 1;
        if args.dry_run {
            freed += crate::cache::store::dir_size(&store.artifact_dir(key));
        } else {
            freed += store
                .purge(key)
                .map_err(|e| Failure::new(exec::ExecError::from(e), 2))?;
        }
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let summary = format!(
        "{verb} {removed} unreferenced artifact(s), {:.1} MB; kept {} referenced by {} lock file(s)",
        freed as f64 / 1e6,
        referenced.len(),
        locks.iter().filter(|l| l.exists()).count()
    );
    if printer.json {
        printer.json_line(&serde_json::json!({"type": "gc", "removed": removed, "bytes": freed, "kept": referenced.len(), "dry_run": args.dry_run}));
    } else {
        printer.result(&format!("{summary}\n"));
    }
    Ok(())
}
