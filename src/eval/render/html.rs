//! `report.html`: one self-contained page (inline CSS, inline SVG, no script, nothing fetched)
//! so it can be mailed or opened from disk anywhere.

use super::svg::{self, Bar, BarChart, BarGroup, LineChart, Series, XScale};
use super::{
    Header, METRIC_EXPLANATIONS, dimension_text, escape, full_size_systems, merge_trial_cells,
    regression_lines, shown_metrics, verdict_line,
};
use crate::eval::report::{Dataset, Report, SystemKind};
use crate::eval::stats::{Verdict, format_percent, format_setting};
use crate::eval::training::TrainingCurve;

const STYLE: &str = "
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
.scroll { overflow-x: auto; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; }
p.verdict { font-size: 1.1rem; padding: .6rem 1rem; border-left: 4px solid #0072b2; background: #eef5fb; }
p.verdict.worse { border-color: #d55e00; background: #fcefe6; }
div.warnings { border-left: 4px solid #e69f00; background: #fdf5e6; padding: .3rem 1rem; }
@media (max-width: 40rem) { body { font-size: 14px; margin: 1rem auto; } th, td { padding: .2rem .35rem; } }
th:first-child, td:first-child, td.kind { text-align: left; }
td .ci { color: #777; font-size: .85em; }
.regression { background: #fcefe6; border: 2px solid #d55e00; padding: .75rem 1rem; border-radius: 6px; }
.regression strong { color: #a04000; }
li.better { color: #005a8c; } li.worse { color: #a04000; font-weight: 600; } li.same { color: #555; }
figure { margin: 1.5rem 0; }
svg text { font: 12px system-ui, sans-serif; fill: #333; }
svg text.title { font-weight: 600; font-size: 13px; }
svg .grid { stroke: #eee; } svg .axis { stroke: #999; fill: none; }
svg .whisker { stroke: #222; stroke-width: 1.5; fill: none; }
details { margin: 1rem 0; }
";

/// Renders the report as a standalone HTML page.
pub fn html(report: &Report) -> String {
    let title = escape(&report.title);
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
    );
    let header = Header::of(report);
    let date = header
        .date
        .as_deref()
        .map(|d| format!("<dt>Date</dt><dd>{}</dd>\n", escape(d)))
        .unwrap_or_default();
    out.push_str(&format!(
        "<dl class=\"header\">\n<dt>Model</dt><dd>{title}</dd>\n<dt>Base model</dt><dd>{}</dd>\n<dt>Data</dt><dd>{}</dd>\n{date}</dl>\n",
        escape(header.base.as_deref().unwrap_or("–")),
        header
            .data
            .iter()
            .map(|line| escape(line))
            .collect::<Vec<_>>()
            .join("<br>")
    ));
    let verdict = verdict_line(report);
    let worse = if verdict.starts_with("Verdict: worse") {
        " worse"
    } else {
        ""
    };
    out.push_str(&format!(
        "<p class=\"verdict{worse}\"><strong>{}</strong></p>\n",
        escape(&verdict)
    ));
    if !report.warnings.is_empty() {
        out.push_str("<div class=\"warnings\"><strong>Trust this result less:</strong>\n<ul>\n");
        for warning in &report.warnings {
            out.push_str(&format!("<li>{}</li>\n", escape(warning)));
        }
        out.push_str("</ul></div>\n");
    }
    if report.regression {
        out.push_str(
            "<div class=\"regression\"><strong>REGRESSION:</strong> the fine-tuned model is worse \
             than the base model beyond noise.\n<ul>\n",
        );
        for line in regression_lines(report) {
            out.push_str(&format!("<li>{}</li>\n", escape(line)));
        }
        out.push_str("</ul></div>\n");
    }
    for dataset in &report.datasets {
        dataset_section(&mut out, dataset, report.settings.confidence);
    }
    if let Some(merge) = &report.merge {
        out.push_str(&format!(
            "<h2>Merge with the base</h2>\n<p>The fine-tuned model is α·fine-tuned + (1−α)·base \
             with α = {} ({}): nDCG@10 of each α tried. α is chosen on the held-out split, so \
             the held-out figures of the merged model are optimistic.</p>\n<table>\n<tr><th>α</th>\
             <th>held-out</th><th>general check</th><th>general guard</th></tr>\n",
            merge.alpha,
            escape(&merge.why)
        ));
        for trial in &merge.trials {
            let [alpha, heldout, general, guard] = merge_trial_cells(trial);
            out.push_str(&format!(
                "<tr><td>{alpha}</td><td>{heldout}</td><td>{general}</td><td>{guard}</td></tr>\n"
            ));
        }
        out.push_str("</table>\n");
    }
    if let Some(training) = &report.training {
        training_section(&mut out, training);
    }
    out.push_str("<h2>What the figures mean</h2>\n<p>Each query was written for one or a few passages (chunks of the documents, or the entries of a labelled corpus): the right passages. Each system ranks all passages for it. Every figure runs from 0 to 1, higher is better, and is averaged over the queries; the interval after it is where the true average lies with the stated confidence. A difference is <em>beyond noise</em> only when it holds across the queries, not on a few of them.</p>\n<dl>\n");
    for (metric, explanation) in METRIC_EXPLANATIONS {
        out.push_str(&format!(
            "<dt>{}</dt><dd>{}</dd>\n",
            metric.label(),
            escape(explanation)
        ));
    }
    out.push_str("</dl>\n");
    let settings = &report.settings;
    out.push_str(&format!(
        "<h2>Method</h2>\n<p>Metrics follow sentence-transformers' \
         <code>InformationRetrievalEvaluator</code>. Intervals are {}% bootstrap percentile \
         intervals over queries, paired for differences ({} resamples); p-values come from a \
         paired sign-flip permutation test ({} random patterns, or all when fewer). A difference \
         counts as beyond noise when its interval excludes 0 and p &lt; {} (seed {}).</p>\n</body>\n</html>\n",
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
        "<section>\n<h2>{}</h2>\n<p>{} queries, searching {} {}.</p>\n",
        escape(&dataset.name),
        dataset.query_ids.len(),
        dataset.documents,
        super::searched(dataset)
    ));
    let metrics = shown_metrics(dataset);
    out.push_str("<div class=\"scroll\"><table>\n<tr><th>System</th><th>Kind</th><th>Dim</th>");
    for metric in &metrics {
        out.push_str(&format!("<th>{}</th>", metric.label()));
    }
    out.push_str("</tr>\n");
    for system in &dataset.systems {
        out.push_str(&format!(
            "<tr><td>{}</td><td class=\"kind\">{}</td><td>{}</td>",
            escape(&system.label),
            system.kind.name(),
            dimension_text(system.dimension)
        ));
        for metric in &metrics {
            match system.metrics.get(metric) {
                Some(summary) => out.push_str(&format!(
                    "<td>{:.4} <span class=\"ci\">({:.3}–{:.3})</span></td>",
                    summary.mean, summary.interval.low, summary.interval.high
                )),
                None => out.push_str("<td>–</td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str(&format!(
        "</table></div>\n<p>In parentheses: {}% bootstrap interval of the mean.</p>\n",
        format_percent(confidence)
    ));

    if !dataset.comparisons.is_empty() {
        out.push_str("<h3>Verdicts</h3>\n<ul>\n");
        for comparison in &dataset.comparisons {
            let class = match comparison.result.verdict {
                Verdict::Better => "better",
                Verdict::Worse => "worse",
                Verdict::NoDifference => "same",
            };
            out.push_str(&format!(
                "<li class=\"{class}\">{}</li>\n",
                escape(&comparison.sentence)
            ));
        }
        out.push_str("</ul>\n");
    }

    out.push_str(&format!("<figure>{}</figure>\n", metric_bars(dataset)));
    if let Some(chart) = dimension_chart(dataset) {
        out.push_str(&format!("<figure>{chart}</figure>\n"));
    }
    out.push_str("</section>\n");
}

/// Headline metrics of each kind's full-size system, with bootstrap whiskers.
fn metric_bars(dataset: &Dataset) -> String {
    let systems = full_size_systems(dataset);
    let groups = shown_metrics(dataset)
        .into_iter()
        .map(|metric| BarGroup {
            label: metric.label(),
            bars: systems
                .iter()
                .enumerate()
                .filter_map(|(series, system)| {
                    system.metrics.get(&metric).map(|summary| Bar {
                        series,
                        value: summary.mean,
                        low: summary.interval.low,
                        high: summary.interval.high,
                    })
                })
                .collect(),
        })
        .collect();
    svg::bar_chart(&BarChart {
        title: "Headline metrics (whiskers: bootstrap interval)",
        y_label: "score",
        series_names: systems.iter().map(|system| system.label.clone()).collect(),
        groups,
    })
}

/// The primary metric against embedding dimension, one line per dense kind and BM25 as a
/// dashed reference; `None` unless some kind was evaluated at two dimensions or more.
fn dimension_chart(dataset: &Dataset) -> Option<String> {
    let metric = *shown_metrics(dataset).first()?;
    let line = |kind: SystemKind| {
        let mut points: Vec<(f64, f64)> = dataset
            .systems
            .iter()
            .filter(|system| system.kind == kind)
            .filter_map(|system| {
                let dimension = system.dimension?;
                let summary = system.metrics.get(&metric)?;
                Some((dimension as f64, summary.mean))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let (base, tuned) = (line(SystemKind::Base), line(SystemKind::FineTuned));
    if base.len() < 2 && tuned.len() < 2 {
        return None;
    }
    let dimensions: Vec<f64> = base.iter().chain(&tuned).map(|point| point.0).collect();
    let (lowest, highest) = dimensions
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), d| {
            (lo.min(*d), hi.max(*d))
        });
    let mut series = vec![
        Series {
            name: SystemKind::Base.name().to_owned(),
            points: base,
            dashed: false,
        },
        Series {
            name: SystemKind::FineTuned.name().to_owned(),
            points: tuned,
            dashed: false,
        },
    ];
    if let Some(bm25) = dataset
        .systems
        .iter()
        .find(|system| system.kind == SystemKind::Bm25)
        .and_then(|system| system.metrics.get(&metric))
    {
        series.push(Series {
            name: SystemKind::Bm25.name().to_owned(),
            points: vec![(lowest, bm25.mean), (highest, bm25.mean)],
            dashed: true,
        });
    }
    let title = format!("{} by embedding dimension", metric.label());
    let y_label = metric.label();
    Some(svg::line_chart(&LineChart {
        title: &title,
        x_label: "embedding dimension (Matryoshka truncation)",
        y_label: &y_label,
        x_scale: XScale::Log2,
        series,
    }))
}

fn training_section(out: &mut String, training: &TrainingCurve) {
    out.push_str("<section>\n<h2>Training</h2>\n");
    if training.points.is_empty() {
        out.push_str("<p>The train log has no steps.</p>\n</section>\n");
        return;
    }
    let curve = |name: &str, value: fn(&crate::eval::training::TrainPoint) -> f64| Series {
        name: name.to_owned(),
        points: training
            .points
            .iter()
            .map(|point| (point.step as f64, value(point)))
            .collect(),
        dashed: false,
    };
    for (title, y_label, series) in [
        ("Training loss", "loss", curve("loss", |point| point.loss)),
        (
            "Learning rate",
            "learning rate",
            curve("lr", |point| point.lr),
        ),
    ] {
        out.push_str(&format!(
            "<figure>{}</figure>\n",
            svg::line_chart(&LineChart {
                title,
                x_label: "step",
                y_label,
                x_scale: XScale::Linear,
                series: vec![series],
            })
        ));
    }
    out.push_str("</section>\n");
}
