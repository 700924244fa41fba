//! `ragd-pipe schema`: the recipe JSON Schema that `schemas/recipe.schema.json` holds.

use std::path::PathBuf;

use clap::Args;

use super::Failure;
use crate::output::Printer;
use crate::recipe::schema::recipe_schema;

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Write the schema to this file instead of stdout.
    #[arg(long, value_name = "PATH", conflicts_with = "check")]
    pub write: Option<PathBuf>,
    /// Exit 1 if this file differs from the schema this build generates.
    #[arg(long, value_name = "PATH")]
    pub check: Option<PathBuf>,
}

/// The schema as committed: pretty JSON with a final newline.
pub(super) fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&recipe_schema())
        .expect("a JSON value serialises to a string");
    text.push('\n');
    text
}

pub(super) fn execute(args: &SchemaArgs, printer: &Printer) -> Result<(), Failure> {
    let text = schema_text();
    if let Some(path) = &args.check {
        let committed =
            fs_err::read_to_string(path).map_err(|e| Failure::report(miette::miette!("{e}"), 1))?;
        if committed != text {
            return Err(Failure::report(
                miette::miette!(
                    help = "regenerate it with `ragd-pipe schema --write {}`",
                    "`{}` is stale: it differs from the schema this build generates",
                    path.display()
                ),
                1,
            ));
        }
        printer.status(&format!("{} is up to date", path.display()));
        return Ok(());
    }
    match &args.write {
        Some(path) => {
            crate::cache::write_atomic(path, text.as_bytes()).map_err(|e| {
                Failure::report(miette::miette!("cannot write `{}`: {e}", path.display()), 2)
            })?;
            printer.status(&format!("wrote {}", path.display()));
        }
        None => printer.result(&text),
    }
    Ok(())
}
