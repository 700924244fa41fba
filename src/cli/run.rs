//! `ragd-pipe run`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use super::{Failure, RecipeArgs};
use crate::exec::{self, RunOptions};
use crate::output::Printer;
use crate::plan::PlanOptions;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Rerun this stage even if it is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Rerun every stage.
    #[arg(long)]
    pub force_all: bool,
    /// Run this stage and what it needs, nothing after it.
    #[arg(long, value_name = "STAGE", conflicts_with = "only")]
    pub until: Option<String>,
    /// Run only this stage (its inputs must be built already).
    #[arg(long, value_name = "STAGE")]
    pub only: Option<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Fail instead of waiting when another run holds the workdir.
    #[arg(long)]
    pub no_wait: bool,
}

pub(super) fn execute(args: &RunArgs, printer: &Printer) -> Result<(), Failure> {
    let recipe = args.recipe.load()?;
    let options = RunOptions {
        plan: PlanOptions {
            force: args.force.clone(),
            force_all: args.force_all,
        },
        until: args.until.clone(),
        only: args.only.clone(),
        dry_run: args.dry_run,
        no_wait: args.no_wait,
    };
    let runtime = super::runtime()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
            // A second Ctrl-C means now: everything finished is already journaled or committed.
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let reporter = printer.reporter();
    let result = exec::run(&recipe, &options, reporter, runtime.handle(), cancel);
    if let Ok(report) = &result
        && let Some(plan) = &report.dry_plan
        && !printer.json
    {
        printer.result(&super::plan::render(&recipe, plan, None, printer));
    }
    // Stages may have left blocking work (HTTP clients) on the runtime; do not wait for it.
    runtime.shutdown_background();
    let report = result.map_err(Failure::from)?;
    let evaluated = report
        .ran
        .iter()
        .chain(&report.cached)
        .any(|stage| stage == "evaluate");
    if evaluated && let Some(files) = super::report::ReportFiles::latest(&recipe) {
        files.print_end(printer);
    }
    Ok(())
}
