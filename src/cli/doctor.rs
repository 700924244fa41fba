//! `ragd-pipe doctor`: what this build and machine offer for running models, so a user knows which
//! `accelerator:` to write before a long run.

use super::Failure;
use crate::model::device;
use crate::output::{Printer, table};

pub(super) fn execute(printer: &Printer) -> Result<(), Failure> {
    let report = device::doctor();
    if printer.json {
        printer.json_line(&report);
        return Ok(());
    }
    let mut rows = vec![vec![
        "compiled backends".to_owned(),
        report.compiled_backends.join(", "),
    ]];
    for probe in &report.devices {
        rows.push(vec![
            format!("{} device 0", probe.name),
            probe
                .error
                .clone()
                .unwrap_or_else(|| "available".to_owned()),
        ]);
    }
    rows.push(vec!["accelerator: auto".to_owned(), report.auto.clone()]);
    rows.push(vec![
        "cpu threads".to_owned(),
        report.cpu_threads.to_string(),
    ]);
    let features: Vec<&str> = report
        .cpu_features
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();
    rows.push(vec![
        "cpu features".to_owned(),
        if features.is_empty() {
            "none the kernels use".to_owned()
        } else {
            features.join(", ")
        },
    ]);
    let columns = ["check", "found"].map(str::to_owned);
    printer.result(&table(&columns, &rows, ""));
    Ok(())
}
