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
    let collected = Store::at(workdir)
        .collect_garbage(&recipe.lock_path(), args.dry_run)
        .map_err(|e| Failure::new(exec::ExecError::from(e), 2))?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let summary = format!(
        "{verb} {} unreferenced artifact(s), {:.1} MB; kept {} referenced by {} lock file(s)",
        collected.removed,
        collected.bytes as f64 / 1e6,
        collected.kept,
        collected.locks
    );
    if printer.json {
        printer.json_line(&serde_json::json!({"type": "gc", "removed": collected.removed, "bytes": collected.bytes, "kept": collected.kept, "dry_run": args.dry_run}));
    } else {
        printer.result(&format!("{summary}\n"));
    }
    Ok(())
}
