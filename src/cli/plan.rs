//! `ragd-pipe plan`.

use std::sync::Arc;

use clap::Args;

use super::{Failure, RecipeArgs};
use crate::exec;
use crate::output::{Printer, table};
use crate::plan::estimate::PlanEstimate;
use crate::plan::{Plan, PlanOptions, Status};
use crate::recipe::Recipe;
use crate::stages::estimate::Basis;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Plan as if these stages were forced.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
}

pub(super) fn execute(args: &PlanArgs, printer: &Printer) -> Result<(), Failure> {
    let recipe = args.recipe.load()?;
    let options = PlanOptions {
        force: args.force.clone(),
        force_all: false,
    };
    let reporter: Arc<dyn exec::Reporter> = if printer.json {
        Arc::new(exec::NoReporter)
    } else {
        printer.reporter()
    };
    let prepared = exec::prepare(&recipe, &options, reporter)?;
    exec::check_stage_names(&prepared.plan, &args.force)?;
    let estimate = exec::estimate(&recipe, &prepared);
    if printer.json {
        printer.json_line(&exec::plan_event(&recipe, &prepared.plan));
        printer.json_line(&exec::Event::Estimate { estimate });
    } else {
        printer.result(&render(&recipe, &prepared.plan, Some(&estimate), printer));
    }
    Ok(())
}

/// The plan for people: the DAG, then one row per stage with its status, its estimate (when
/// given) and reasons, then the estimate's total.
pub(super) fn render(
    recipe: &Recipe,
    plan: &Plan,
    estimate: Option<&PlanEstimate>,
    printer: &Printer,
) -> String {
    let chain: Vec<&str> = plan.stages.iter().map(|s| s.spec.kind).collect();
    let mut out = format!(
        "recipe   {}\nworkdir  {}\nstages   {}\n\n",
        recipe.path.display(),
        recipe.workdir.display(),
        chain.join(" → ")
    );
    let verbose = printer.verbosity == crate::output::Verbosity::Verbose;
    let mut columns = vec!["stage".to_owned(), "reads".to_owned(), "status".to_owned()];
    if verbose {
        columns.push("key".to_owned());
    }
    if estimate.is_some() {
        columns.extend(["time".to_owned(), "memory".to_owned()]);
    }
    columns.push("why".to_owned());
    let rows: Vec<Vec<String>> = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let reads: Vec<&str> = stage
                .inputs
                .values()
                .map(|&p| plan.stages[p].spec.kind)
                .collect();
            let (status, why) = match &stage.status {
                Status::Cached(_) => ("cached".to_owned(), String::new()),
                Status::Run(reasons) => (
                    "will run".to_owned(),
                    reasons
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            let mut row = vec![
                stage.spec.kind.to_owned(),
                if reads.is_empty() {
                    "-".to_owned()
                } else {
                    reads.join(", ")
                },
                status,
            ];
            if verbose {
                row.push(stage.key[..16].to_owned());
            }
            if let Some(estimate) = estimate {
                let line = &estimate.stages[i];
                match (&line.estimate, &line.problem) {
                    (Some(e), _) => row.extend([duration(e.seconds), bytes(e.peak_bytes)]),
                    (None, Some(_)) => row.extend(["?".to_owned(), "?".to_owned()]),
                    (None, None) => row.extend(["-".to_owned(), "-".to_owned()]),
                }
            }
            row.push(why);
            row
        })
        .collect();
    out.push_str(&table(&columns, &rows, ""));
    if let Some(estimate) = estimate {
        out.push_str(&summary(estimate));
    }
    out
}

/// The estimate's total and where its figures come from.
fn summary(estimate: &PlanEstimate) -> String {
    let mut out = String::new();
    for line in &estimate.stages {
        if let Some(problem) = &line.problem {
            out.push_str(&format!("\nno estimate for {}: {problem}", line.stage));
        }
    }
    if estimate.stages.iter().all(|s| s.estimate.is_none()) {
        return out;
    }
    out.push_str(&format!(
        "\nestimate: about {} in all, at most {} of memory ({})\n",
        duration(estimate.seconds),
        bytes(estimate.peak_bytes),
        basis_text(estimate.basis)
    ));
    out
}

/// Where an estimate's figures come from, in words.
pub(super) fn basis_text(basis: Basis) -> &'static str {
    match basis {
        Basis::Measured => "measured by earlier runs on this machine",
        Basis::Calibrated => {
            "this machine's kernels timed at the recipe's shapes; sizes guessed upstream of what exists"
        }
        Basis::Rough => {
            "rough: the developers' figures scaled to this machine's cores (a run measures the real ones)"
        }
    }
}

/// Seconds as people read a duration.
pub(super) fn duration(seconds: f64) -> String {
    let seconds = seconds.round() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", (seconds + 30) / 60),
        _ => format!("{} h {:02} min", seconds / 3600, (seconds % 3600 + 30) / 60),
    }
}

/// Bytes as people read memory.
pub(super) fn bytes(bytes: u64) -> String {
    let gib = bytes as f64 / f64::from(1 << 30);
    if gib >= 1. {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
    }
}
