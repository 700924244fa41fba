//! `report.md`: tables and plain-words verdicts, readable as text and on any Markdown viewer.

use super::{
    Header, METRIC_EXPLANATIONS, dimension_text, full_size_systems, merge_trial_cells,
    regression_lines, shown_metrics, verdict_line,
};
use crate::eval::report::{Dataset, Report};
use crate::eval::stats::{Verdict, format_percent, format_setting};
use crate::eval::training::TrainingCurve;

/// Renders the report as Markdown. User text is escaped so it can neither break a table nor
/// inject HTML into a viewer that renders it.
pub fn markdown(report: &Report) -> String {
    let mut out = format!("# {}\n\n", inline(&report.title));
    let header = Header::of(report);
    out.push_str(&format!(
        "- **Model**: {}\n- **Base model**: {}\n",
        inline(&report.title),
        inline(header.base.as_deref().unwrap_or("–"))
    ));
    for line in &header.data {
        out.push_str(&format!("- **Data**: {}\n", inline(line)));
    }
    if let Some(date) = &header.date {
        out.push_str(&format!("- **Date**: {}\n", inline(date)));
    }
    out.push_str(&format!("\n**{}**\n\n", inline(&verdict_line(report))));
    if !report.warnings.is_empty() {
        out.push_str("Trust this result less:\n\n");
        for warning in &report.warnings {
            out.push_str(&format!("- {}\n", inline(warning)));
        }
        out.push('\n');
    }
    if report.regression {
        out.push_str(
            "> **REGRESSION**: the fine-tuned model is worse than the base model beyond noise:\n",
        );
        for line in regression_lines(report) {
            out.push_str(&format!(">\n> - {}\n", inline(line)));
        }
        out.push('\n');
    }
    for dataset in &report.datasets {
        dataset_section(&mut out, dataset, report.settings.confidence);
    }
    if let Some(merge) = &report.merge {
        out.push_str(&format!(
            "## Merge with the base\n\nThe fine-tuned model is `α·fine-tuned + (1−α)·base` with α = {} ({}): nDCG@10 of each α tried.\n\n| α | held-out | general check | general guard |\n|---:|---:|---:|---|\n",
            merge.alpha,
            inline(&merge.why)
        ));
        for trial in &merge.trials {
            let [alpha, heldout, general, guard] = merge_trial_cells(trial);
            out.push_str(&format!("| {alpha} | {heldout} | {general} | {guard} |\n"));
        }
        out.push_str(
            "\nα is chosen on the held-out split, so the held-out figures of the merged model \
             are optimistic; your own datasets and the general check are not used to choose it \
             beyond the guard.\n\n",
        );
    }
    if let Some(training) = &report.training {
        training_section(&mut out, training);
    }
    out.push_str(
        "## What the figures mean\n\nEach query was written for one or a few chunks of the \
         documents (the right chunks); each system ranks all chunks for it. Every figure runs \
         from 0 to 1, higher is better, and is averaged over the queries; the interval after it \
         is where the true average lies with the stated confidence. A difference is *beyond \
         noise* only when it holds across the queries, not on a few of them.\n\n",
    );
    for (metric, explanation) in METRIC_EXPLANATIONS {
        out.push_str(&format!("- **{}**: {explanation}\n", metric.label()));
    }
    out.push('\n');
    let settings = &report.settings;
    out.push_str(&format!(
        "## Method\n\nMetrics follow sentence-transformers' `InformationRetrievalEvaluator`; \
         intervals are {}% bootstrap percentile intervals over queries, paired for differences \
         ({} resamples), p-values come from a paired sign-flip permutation test ({} random \
         patterns, or all when fewer), and a difference counts as beyond noise when its interval excludes 0 and p < {} \
         (seed {}).\n",
        format_percent(settings.confidence),
        settings.resamples,
        settings.permutations,
        format_setting(settings.alpha),
        settings.seed
    ));
    out
}

fn dataset_section(out: &mut String, dataset: &Dataset, confidence: f64) {
    out.push_str(&format!(
        "## {}\n\n{} queries, searching {} {}.\n\n",
        inline(&dataset.name),
        dataset.query_ids.len(),
        dataset.documents,
        super::searched(dataset)
    ));
    let metrics = shown_metrics(dataset);
    out.push_str("| System | Kind | Dim |");
    for metric in &metrics {
        out.push_str(&format!(" {} |", metric.label()));
    }
    out.push_str("\n|---|---|---:|");
    out.push_str(&"---:|".repeat(metrics.len()));
    out.push('\n');
    for system in &dataset.systems {
        out.push_str(&format!(
            "| {} | {} | {} |",
            inline(&system.label),
            system.kind.name(),
            dimension_text(system.dimension)
        ));
        for metric in &metrics {
            let cell = system.metrics.get(metric).map_or_else(
                || "–".to_owned(),
                |summary| {
                    format!(
                        "{:.4} ({:.3}–{:.3})",
                        summary.mean, summary.interval.low, summary.interval.high
                    )
                },
            );
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\nIn parentheses: {}% bootstrap interval of the mean.\n\n",
        format_percent(confidence)
    ));

    if !dataset.comparisons.is_empty() {
        out.push_str("### Verdicts\n\n");
        for comparison in &dataset.comparisons {
            let mark = match comparison.result.verdict {
                Verdict::Better => "**better**",
                Verdict::Worse if comparison.regression => "**WORSE (regression)**",
                Verdict::Worse => "**worse**",
                Verdict::NoDifference => "no difference",
            };
            out.push_str(&format!("- {mark}: {}\n", inline(&comparison.sentence)));
        }
        out.push('\n');
    }

    let all_metrics: Vec<_> = {
        let mut metrics: Vec<_> = dataset
            .systems
            .iter()
            .flat_map(|system| system.metrics.keys().copied())
            .collect();
        metrics.sort();
        metrics.dedup();
        metrics
    };
    let systems = full_size_systems(dataset);
    out.push_str("### All metrics\n\n| Metric |");
    for system in &systems {
        out.push_str(&format!(" {} |", inline(&system.label)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(systems.len()));
    out.push('\n');
    for metric in all_metrics {
        out.push_str(&format!("| {} |", metric.label()));
        for system in &systems {
            let cell = system
                .metrics
                .get(&metric)
                .map_or_else(|| "–".to_owned(), |summary| format!("{:.4}", summary.mean));
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push('\n');
}

fn training_section(out: &mut String, training: &TrainingCurve) {
    out.push_str("## Training\n\n");
    let (Some(first), Some(last)) = (training.points.first(), training.points.last()) else {
        out.push_str("The train log has no steps.\n\n");
        return;
    };
    let lowest = training
        .points
        .iter()
        .min_by(|a, b| a.loss.total_cmp(&b.loss))
        .unwrap_or(last);
    let peak_lr = training
        .points
        .iter()
        .map(|point| point.lr)
        .fold(f64::NEG_INFINITY, f64::max);
    out.push_str(&format!(
        "{} steps. Loss {:.4} at step {} → {:.4} at step {} (lowest {:.4} at step {}); peak \
         learning rate {:.2e}.\n\n",
        training.points.len(),
        first.loss,
        first.step,
        last.loss,
        last.step,
        lowest.loss,
        lowest.step,
        peak_lr
    ));
}

/// Escapes Markdown's inline syntax and HTML in user text.
fn inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '#' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_text_cannot_break_a_table() {
        assert_eq!(inline("a|b *c* <d>\nnext"), "a\\|b \\*c\\* &lt;d&gt; next");
    }
}
