//! `ragd-pipe validate`.

use clap::Args;

use super::{Failure, RecipeArgs};
use crate::output::Printer;
use crate::plan::Dag;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
}

pub(super) fn execute(args: &ValidateArgs, printer: &Printer) -> Result<(), Failure> {
    let recipe = args.recipe.load()?;
    let dag = Dag::build(&recipe).map_err(|e| Failure::new(e, 1))?;
    let chain: Vec<&str> = dag.nodes.iter().map(|n| n.spec.kind).collect();
    if printer.json {
        printer.json_line(
            &serde_json::json!({"type": "valid", "recipe": recipe.path, "stages": chain}),
        );
    } else {
        printer.result(&format!(
            "{} is valid: {}\n",
            args.recipe.recipe.display(),
            chain.join(" → ")
        ));
    }
    Ok(())
}
