//! `ragd-pipe plan`.

use std::sync::Arc;

use clap::Args;

use super::{Failure, RecipeArgs};
use crate::exec;
use crate::output::{Printer, table};
use crate::plan::{Plan, PlanOptions, Status};
use crate::recipe::Recipe;

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
        Arc::new(super::run::NoReporter)
    } else {
        printer.reporter()
    };
    let prepared = exec::prepare(&recipe, &options, reporter)?;
    // As in `run`: a stage name that is not in the recipe is a mistake, not a no-op.
    if let Some(name) = args.force.iter().find(|name| {
        !prepared
            .plan
            .stages
            .iter()
            .any(|s| s.spec.kind == name.as_str() || s.spec.section == name.as_str())
    }) {
        return Err(exec::ExecError::UnknownStage {
            name: name.clone(),
            valid: prepared
                .plan
                .stages
                .iter()
                .map(|s| format!("`{}`", s.spec.kind))
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into());
    }
    if printer.json {
        printer.json_line(&exec::plan_event(&recipe, &prepared.plan));
    } else {
        printer.result(&render(&recipe, &prepared.plan, printer));
    }
    Ok(())
}

/// The plan for people: the DAG, then one row per stage with its status and reasons.
pub(super) fn render(recipe: &Recipe, plan: &Plan, printer: &Printer) -> String {
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
    columns.push("why".to_owned());
    let rows: Vec<Vec<String>> = plan
        .stages
        .iter()
        .map(|stage| {
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
            row.push(why);
            row
        })
        .collect();
    out.push_str(&table(&columns, &rows, ""));
    out
}
