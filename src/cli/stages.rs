//! `ragd-pipe stages`: the registry, as users see it.

use super::Failure;
use crate::output::{Printer, table};
use crate::stages::REGISTRY;

pub(super) fn execute(printer: &Printer) -> Result<(), Failure> {
    if printer.json {
        for spec in REGISTRY {
            printer.json_line(&serde_json::json!({
                "type": "stage", "kind": spec.kind, "section": spec.section, "produces": spec.produces, "about": spec.about,
            }));
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = REGISTRY
        .iter()
        .map(|s| {
            vec![
                s.kind.to_owned(),
                format!("{}:", s.section),
                s.produces.name().to_owned(),
                s.about.to_owned(),
            ]
        })
        .collect();
    let columns = ["stage", "section", "produces", "what it does"].map(str::to_owned);
    printer.result(&table(&columns, &rows, ""));
    Ok(())
}
