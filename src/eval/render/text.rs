//! The compact table the CLI prints after an evaluation: main metrics per system and the
//! verdicts that matter, regressions first.

use super::{dimension_text, key_comparisons, regression_lines, shown_metrics};
use crate::eval::report::Report;

/// Renders each dataset as an aligned table of the headline metrics (means), followed by the
/// verdicts on the primary metric and every regression. A regression also heads the text.
pub fn text_table(report: &Report) -> String {
    let mut out = String::new();
    if report.regression {
        out.push_str("REGRESSION: fine-tuned is worse than base beyond noise\n");
        for line in regression_lines(report) {
            out.push_str(&format!("  {line}\n"));
        }
        out.push('\n');
    }
    for (index, dataset) in report.datasets.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}: {} queries, {} documents\n",
            dataset.name,
            dataset.query_ids.len(),
            dataset.documents
        ));
        let metrics = shown_metrics(dataset);
        let mut rows: Vec<Vec<String>> = vec![
            ["system", "dim"]
                .into_iter()
                .map(str::to_owned)
                .chain(metrics.iter().map(|metric| metric.label()))
                .collect(),
        ];
        for system in &dataset.systems {
            let mut row = vec![system.label.clone(), dimension_text(system.dimension)];
            row.extend(metrics.iter().map(|metric| {
                system
                    .metrics
                    .get(metric)
                    .map_or_else(|| "–".to_owned(), |summary| format!("{:.4}", summary.mean))
            }));
            rows.push(row);
        }
        let columns = rows.first().map_or(0, Vec::len);
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                rows.iter()
                    .map(|row| row[column].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &rows {
            let mut line = String::new();
            for (column, (cell, width)) in row.iter().zip(&widths).enumerate() {
                let pad = " ".repeat(width - cell.chars().count());
                if column == 0 {
                    line.push_str(&format!("{cell}{pad}"));
                } else {
                    line.push_str(&format!("  {pad}{cell}"));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for comparison in key_comparisons(dataset) {
            out.push_str(&format!("  {}\n", comparison.sentence));
        }
    }
    out
}
