//! Renderings of a [`Report`]: Markdown (`report.md`), a self-contained HTML page with inline
//! CSS and SVG charts (`report.html`), and a compact plain-text table the CLI prints. All are
//! built as strings; writing them is [`Report::write`]'s job and printing the CLI's.

mod html;
mod markdown;
mod svg;
mod text;

pub use html::html;
pub use markdown::markdown;
pub use text::text_table;

use super::metrics::Metric;
use super::report::{Dataset, HEADLINE_METRICS, MergeTrial, Report, System};

/// The headline metrics that some system of `dataset` has, in headline order.
fn shown_metrics(dataset: &Dataset) -> Vec<Metric> {
    HEADLINE_METRICS
        .into_iter()
        .filter(|metric| {
            dataset
                .systems
                .iter()
                .any(|system| system.metrics.contains_key(metric))
        })
        .collect()
}

/// Each kind's systems at its largest dimension: what the bar chart sets side by side.
fn full_size_systems(dataset: &Dataset) -> Vec<&System> {
    dataset
        .systems
        .iter()
        .filter(|system| {
            !dataset
                .systems
                .iter()
                .any(|other| other.kind == system.kind && other.dimension > system.dimension)
        })
        .collect()
}

fn dimension_text(dimension: Option<usize>) -> String {
    dimension.map_or_else(|| "–".to_owned(), |dimension| dimension.to_string())
}

/// The verdicts worth a line in the short renderings: those on the dataset's primary metric and
/// every regression.
fn key_comparisons(dataset: &Dataset) -> impl Iterator<Item = &super::report::Comparison> {
    let primary = shown_metrics(dataset).first().copied();
    dataset
        .comparisons
        .iter()
        .filter(move |comparison| Some(comparison.metric) == primary || comparison.regression)
}

/// The regression warning, one line per regressed comparison.
fn regression_lines(report: &Report) -> impl Iterator<Item = &str> {
    report.regressions.iter().map(String::as_str)
}

/// What the report is about, for its header: the fine-tuned model (the report's title), the base
/// model, and the data it was scored on.
struct Header {
    base: Option<String>,
    data: Vec<String>,
    date: Option<String>,
}

impl Header {
    fn of(report: &Report) -> Self {
        let base = report
            .datasets
            .iter()
            .flat_map(|dataset| &dataset.systems)
            .find(|system| system.kind == super::report::SystemKind::Base)
            .and_then(|system| system.model.clone());
        let data = report
            .datasets
            .iter()
            .map(|dataset| {
                format!(
                    "{}: {} queries over {} {}",
                    dataset.name,
                    dataset.query_ids.len(),
                    dataset.documents,
                    searched(dataset)
                )
            })
            .collect();
        Self {
            base,
            data,
            date: report.date.clone(),
        }
    }
}

/// What a dataset's queries search: the held-out split searches the chunks of documents that
/// training never saw; a labelled dataset, the passages of its own corpus.
fn searched(dataset: &Dataset) -> &'static str {
    if dataset.name == "held-out" {
        "chunks"
    } else {
        "passages"
    }
}

/// One row of the merge table, as both renderings show it: α, held-out and general-check
/// nDCG@10, and whether α kept within the general check's guard.
fn merge_trial_cells(trial: &MergeTrial) -> [String; 4] {
    [
        trial.alpha.to_string(),
        trial
            .heldout_ndcg10
            .map_or_else(|| "–".to_owned(), |v| format!("{v:.4}")),
        format!("{:.4}", trial.general_ndcg10),
        if trial.within_general_guard {
            "ok"
        } else {
            "lost"
        }
        .to_owned(),
    ]
}

/// The report's verdict in one sentence: the evaluation's `verdict` (label, why, what next) when
/// it has one, else what the regression flag says (reports written before the verdict).
fn verdict_line(report: &Report) -> String {
    if let Some(verdict) = &report.verdict {
        let mut line = format!("Verdict: {}", verdict.label);
        for text in [&verdict.why, &verdict.next] {
            if !text.is_empty() {
                line.push_str(". ");
                line.push_str(text.trim_end_matches('.'));
            }
        }
        line.push('.');
        return line;
    }
    if report.regression {
        "Verdict: worse. The fine-tuned model is worse than the base model beyond noise; do not \
         use it as it is."
            .to_owned()
    } else {
        "Verdict: no regression. The fine-tuned model is not worse than the base model beyond \
         noise; the comparisons below say where it is better."
            .to_owned()
    }
}

/// One plain sentence per headline metric, for readers who are not ML engineers.
const METRIC_EXPLANATIONS: [(Metric, &str); 6] = [
    (
        Metric::NDCG_10,
        "how high the right passages rank among the first 10 results: 1 when they come first, 0 when none is in the 10. The main figure.",
    ),
    (
        Metric::MRR_10,
        "where the first right passage comes: 1 in first place, 0.5 in second, 0.33 in third, 0 when not in the first 10; averaged over queries.",
    ),
    (
        Metric::RECALL_10,
        "the share of the right passages found among the first 10 results.",
    ),
    (
        Metric::RECALL_100,
        "the share of the right passages found among the first 100 results: what a reranker could still reorder.",
    ),
    (
        Metric::MAP_100,
        "like nDCG, rewards putting every right passage early, not only the first one (first 100 results).",
    ),
    (
        Metric::ACCURACY_1,
        "the share of queries whose first result is a right passage.",
    ),
];

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::eval::metrics::RunScores;
    use crate::eval::report::{SystemKind, SystemSpec};
    use crate::eval::stats::PairedTestConfig;
    use crate::eval::training::TrainingCurve;

    /// Fixture: `tests/fixtures/eval/` holds per-query metric values of five systems on six
    /// queries and a ten-step train log, all made up by hand.
    fn fixture_report() -> Report {
        let fixture = |name: &str| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/eval")
                .join(name)
        };
        let runs: BTreeMap<String, (SystemSpec, BTreeMap<Metric, Vec<f64>>)> =
            serde_json::from_str::<Vec<FixtureSystem>>(
                &fs_err::read_to_string(fixture("systems.json")).expect("the fixture exists"),
            )
            .expect("the fixture parses")
            .into_iter()
            .map(|system| {
                let spec = SystemSpec {
                    label: system.label.clone(),
                    kind: system.kind,
                    model: system.model,
                    dimension: system.dimension,
                    reranker: None,
                    max_seq_length: None,
                };
                (system.label, (spec, system.per_query))
            })
            .collect();
        let query_ids: Vec<String> = (1..=6).map(|i| format!("q{i}")).collect();
        let settings = PairedTestConfig::default();
        let mut dataset = Dataset::new("held-out <queries> & \"friends\"", 40, query_ids.clone());
        for label in ["bm25", "base", "fine-tuned", "base@64", "fine-tuned@64"] {
            let (spec, values) = runs[label].clone();
            let scores = RunScores {
                query_ids: query_ids.clone(),
                values,
            };
            dataset
                .add_system(spec, scores, &settings)
                .expect("the fixture covers the dataset's queries");
        }
        dataset
            .compare_fine_tuned_with_base(&[Metric::NDCG_10, Metric::MRR_10], &settings)
            .expect("both systems have the metrics");
        dataset
            .compare("bm25", "fine-tuned", &[Metric::NDCG_10], &settings)
            .expect("both systems exist");
        let training = TrainingCurve::from_jsonl(&fixture("train.jsonl")).expect("a valid log");
        Report::new(
            "demo <script>alert(1)</script>",
            settings,
            vec![dataset],
            Some(training),
        )
    }

    /// A reranked system worse than its retriever raises the reranker's flag, not the embedding
    /// model's: the fixture's `fine-tuned@64` values (worse than `base@64` beyond noise) stand
    /// for `base@64` reranked.
    #[test]
    fn a_worse_reranker_raises_its_own_flag_only() {
        let report = fixture_report();
        let systems = &report.datasets[0].systems;
        let find = |label: &str| {
            systems
                .iter()
                .find(|s| s.label == label)
                .expect("in the fixture")
                .clone()
        };
        let query_ids: Vec<String> = (1..=6).map(|i| format!("q{i}")).collect();
        let settings = PairedTestConfig::default();
        let mut dataset = Dataset::new("rerank", 40, query_ids.clone());
        let retriever = find("base@64");
        let reranked = find("fine-tuned@64");
        for (system, kind, label) in [
            (&retriever, SystemKind::Base, "base"),
            (&reranked, SystemKind::Reranked, "base+rerank"),
        ] {
            let spec = SystemSpec {
                label: label.to_owned(),
                kind,
                model: None,
                dimension: Some(64),
                reranker: None,
                max_seq_length: None,
            };
            let scores = RunScores {
                query_ids: query_ids.clone(),
                values: system.per_query.clone(),
            };
            dataset.add_system(spec, scores, &settings).expect("adds");
        }
        dataset
            .compare("base", "base+rerank", &[Metric::MRR_10], &settings)
            .expect("compares");
        let report = Report::new("t", settings, vec![dataset], None);
        assert!(!report.regression, "{:?}", report.regressions);
        assert!(report.reranker_regression);
        assert_eq!(report.reranker_regressions.len(), 1);
        assert!(
            report.reranker_regressions[0].starts_with("rerank: base+rerank trails base"),
            "{:?}",
            report.reranker_regressions
        );
        // A report written before rerankers existed reads as "no reranker".
        let mut json: serde_json::Value =
            serde_json::from_str(&fixture_report().to_json().expect("json")).expect("parses");
        let object = json.as_object_mut().expect("an object");
        object.remove("reranker_regression");
        object.remove("reranker_regressions");
        let old = Report::from_json(&json.to_string()).expect("an old report reads");
        assert!(!old.reranker_regression);
    }

    #[derive(serde::Deserialize)]
    struct FixtureSystem {
        label: String,
        kind: SystemKind,
        model: Option<String>,
        dimension: Option<usize>,
        per_query: BTreeMap<Metric, Vec<f64>>,
    }

    #[test]
    fn fixture_flags_the_regression_at_64_dimensions() {
        let report = fixture_report();
        let comparisons = &report.datasets[0].comparisons;
        assert_eq!(comparisons.len(), 5);
        assert!(report.regression);
        assert_eq!(report.regressions.len(), 1, "{:?}", report.regressions);
        assert!(report.regressions[0].contains("fine-tuned@64 trails base@64 on MRR@10"));
        assert!(report.regressions[0].ends_with("worse beyond noise"));
    }

    #[test]
    fn json_round_trips() {
        let report = fixture_report();
        let json = report.to_json().expect("the report serialises");
        let back = Report::from_json(&json).expect("the report parses back");
        assert_eq!(back, report);
        assert!(json.contains("\"ndcg@10\""));
        assert!(json.contains("\"regression\": true"));
    }

    #[test]
    fn html_is_self_contained_with_charts() {
        let page = html(&fixture_report());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "{page}"
        );
        assert!(!page.contains("<script"), "user text must be escaped");
        assert!(page.contains("demo &lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("held-out &lt;queries&gt; &amp; &quot;friends&quot;"));
        // Loss, learning rate, metric bars, metric against dimension.
        assert_eq!(page.matches("<svg").count(), 4);
        assert!(page.contains("aria-label=\"Training loss\""));
        assert!(page.contains("aria-label=\"Learning rate\""));
        assert!(page.contains("class=\"whisker\""));
        assert!(page.contains("nDCG@10 by embedding dimension"));
        assert!(page.contains("class=\"regression\""));
    }

    #[test]
    fn markdown_has_tables_and_verdicts() {
        let page = markdown(&fixture_report());
        assert!(
            page.contains("| System | Kind | Dim | nDCG@10 | MRR@10 |"),
            "{page}"
        );
        assert!(page.contains("|---|---|---:|---:|---:|"));
        assert!(page.contains("| fine-tuned@64 | fine-tuned | 64 |"));
        assert!(page.contains("**REGRESSION**"));
        assert!(page.contains("fine-tuned beats base on nDCG@10"));
        assert!(page.contains("held-out &lt;queries&gt; &amp; \"friends\""));
    }

    #[test]
    fn text_table_lists_systems_and_verdicts() {
        let table = text_table(&fixture_report());
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("REGRESSION"), "{table}");
        assert!(table.contains("system"));
        assert!(table.contains("nDCG@10"));
        for label in ["bm25", "base", "fine-tuned", "base@64", "fine-tuned@64"] {
            assert!(lines.iter().any(|line| line.starts_with(label)), "{table}");
        }
        assert!(table.contains("better beyond noise"));
        assert!(table.contains("worse beyond noise"));
    }

    #[test]
    fn pages_open_with_a_header_and_the_verdict_and_explain_the_metrics() {
        let report = fixture_report();
        for page in [html(&report), markdown(&report)] {
            assert!(page.contains("Base model"), "{page}");
            assert!(page.contains("held-out &lt;queries&gt; &amp;"), "{page}");
            assert!(page.contains("6 queries over 40 passages"), "{page}");
            assert!(page.contains("Verdict: worse."), "{page}");
            assert!(page.contains("What the figures mean"), "{page}");
            assert!(
                page.contains("where the first right passage comes"),
                "{page}"
            );
            // alpha is 1 − 0.95, which prints as 0.050000000000000044 unrounded.
            assert!(
                page.contains("p &lt; 0.05 (") || page.contains("p < 0.05 ("),
                "{page}"
            );
            assert!(!page.contains("00000000"), "{page}");
        }
        let mut fine = fixture_report();
        fine.regression = false;
        assert!(markdown(&fine).contains("**Verdict: no regression."));
    }

    #[test]
    fn settings_print_as_written() {
        use crate::eval::stats::format_setting;
        assert_eq!(format_setting(1.0 - 0.95), "0.05");
        assert_eq!(format_setting(0.01), "0.01");
        assert_eq!(format_setting(1.0), "1");
        assert_eq!(format_setting(0.0), "0");
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
