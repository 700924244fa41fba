//! The HTML pages, rendered from the templates in `assets/` (compiled into the binary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use minijinja::context;
use serde::Deserialize;

use super::progress::RunProgress;
use super::store::RunRow;
use super::{ApiError, App};
use crate::cache::store::Store;
use crate::eval::{HEADLINE_METRICS, Report, SystemKind};
use crate::registry;

type Page = Result<Html<String>, ApiError>;

const TEMPLATES: &[(&str, &str)] = &[
    ("layout.html", include_str!("assets/layout.html")),
    ("overview.html", include_str!("assets/overview.html")),
    ("datasets.html", include_str!("assets/datasets.html")),
    ("dataset.html", include_str!("assets/dataset.html")),
    ("runs.html", include_str!("assets/runs.html")),
    ("run.html", include_str!("assets/run.html")),
    ("wizard.html", include_str!("assets/wizard.html")),
    ("models.html", include_str!("assets/models.html")),
    ("compare.html", include_str!("assets/compare.html")),
];

/// The templates, parsed once at start-up (they are part of the binary: a parse error is a bug).
pub(super) fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .expect("the dashboard's templates compiled into the binary should parse");
    }
    env
}

fn render(app: &App, name: &str, ctx: minijinja::Value) -> Page {
    let page = context! { csrf => app.csrf, project => app.project.display().to_string() };
    let template = app
        .templates
        .get_template(name)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    template
        .render(context! { ..ctx, ..page })
        .map(Html)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}

/// `GET /assets/{name}`: the script and the style sheet.
pub(super) async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    match name.as_str() {
        "app.js" => (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            include_str!("assets/app.js"),
        )
            .into_response(),
        "app.css" => (
            [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
            include_str!("assets/app.css"),
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The recipes of the project: `*.yaml` in its folder and in `recipes/`, canonical paths.
pub(super) fn project_recipes(project: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in [project.to_path_buf(), project.join("recipes")] {
        let Ok(entries) = fs_err::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && path.is_file()
                && let Ok(path) = fs_err::canonicalize(&path)
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The model folders ragd's config names now (embedding model, reranker), canonical.
pub(super) fn defaults(ragd_home: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs_err::read_to_string(ragd_home.join(registry::CONFIG_FILE)) else {
        return Vec::new();
    };
    let Ok(config) = serde_yaml::from_str::<serde_yaml::Value>(&text) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    if config["embedding"]["model"].as_str() == Some(registry::CUSTOM_MODEL)
        && let Some(path) = config["embedding"]["custom_model_path"].as_str()
    {
        paths.push(PathBuf::from(path));
    }
    if config["retrieval"]["rerank"].as_bool() == Some(true)
        && let Some(path) = config["retrieval"]["rerank_model"].as_str()
    {
        paths.push(PathBuf::from(path));
    }
    paths
        .into_iter()
        .map(|p| fs_err::canonicalize(&p).unwrap_or(p))
        .collect()
}

/// The embedding model ragd uses now, as its config says it.
fn current_embedding(ragd_home: &Path) -> String {
    let text = fs_err::read_to_string(ragd_home.join(registry::CONFIG_FILE)).unwrap_or_default();
    let config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_default();
    match config["embedding"]["model"].as_str() {
        Some(registry::CUSTOM_MODEL) => config["embedding"]["custom_model_path"]
            .as_str()
            .unwrap_or("custom (no path)")
            .to_owned(),
        Some(model) => model.to_owned(),
        None => "ragd's built-in default (no `embedding.model` in its config)".to_owned(),
    }
}

fn models_with_defaults(app: &App) -> Vec<minijinja::Value> {
    let defaults = defaults(&app.ragd_home);
    registry::list(&app.registry)
        .unwrap_or_default()
        .into_iter()
        .map(|entry| {
            let canonical = fs_err::canonicalize(&entry.path).unwrap_or(entry.path.clone());
            let role = registry::role_of(&entry.path);
            let details = registry::show(&app.registry, &entry.name).ok();
            let regression = details.as_ref().is_some_and(|d| {
                d.metadata[registry::REGRESSION_KEY] == serde_json::Value::Bool(true)
            });
            context! {
                entry => entry,
                role => format!("{role:?}").to_lowercase(),
                is_default => defaults.contains(&canonical),
                regression => regression,
            }
        })
        .collect()
}

pub(super) async fn overview(State(app): State<Arc<App>>) -> Page {
    let runs = app.store.runs()?;
    let datasets = app.store.datasets()?;
    let models = registry::list(&app.registry).unwrap_or_default();
    let recent: Vec<minijinja::Value> = runs.iter().take(5).map(|r| run_summary(&app, r)).collect();
    render(
        &app,
        "overview.html",
        context! {
            counts => context! { runs => runs.len(), datasets => datasets.len(), models => models.len() },
            recent => recent,
            current => current_embedding(&app.ragd_home),
            ragd_home => app.ragd_home.display().to_string(),
        },
    )
}

fn run_summary(app: &App, run: &RunRow) -> minijinja::Value {
    let progress = RunProgress::read(&app.store.events_path(run.id));
    context! { run => run, current => progress.current() }
}

pub(super) async fn datasets(State(app): State<Arc<App>>) -> Page {
    render(
        &app,
        "datasets.html",
        context! { datasets => app.store.datasets()?, max_upload => app.max_upload_bytes },
    )
}

pub(super) async fn dataset(State(app): State<Arc<App>>, UrlPath(id): UrlPath<i64>) -> Page {
    let dataset = app
        .store
        .dataset(id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no dataset {id}")))?;
    let text = fs_err::read_to_string(app.store.dataset_path(&dataset)).unwrap_or_default();
    let preview: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .take(5)
        .collect();
    render(
        &app,
        "dataset.html",
        context! { dataset => dataset, preview => preview },
    )
}

pub(super) async fn runs(State(app): State<Arc<App>>) -> Page {
    let runs: Vec<minijinja::Value> = app
        .store
        .runs()?
        .iter()
        .map(|r| run_summary(&app, r))
        .collect();
    let recipes: Vec<String> = project_recipes(&app.project)
        .iter()
        .filter_map(|p| p.strip_prefix(&app.project).ok())
        .map(|p| p.display().to_string())
        .collect();
    render(
        &app,
        "runs.html",
        context! { runs => runs, recipes => recipes },
    )
}

pub(super) async fn wizard(State(app): State<Arc<App>>) -> Page {
    render(
        &app,
        "wizard.html",
        context! {
            datasets => app.store.datasets()?,
            default_model => crate::recipe::DEFAULT_BASE_MODEL,
        },
    )
}

/// The artifact file `name` of `stage` in a run, if the run got that far.
fn artifact_file(app: &App, id: i64, stage: &str, name: &str) -> Option<PathBuf> {
    let progress = RunProgress::read(&app.store.events_path(id));
    let key = progress.key_of(stage)?;
    let done = progress
        .stages
        .iter()
        .any(|s| s.stage == stage && (s.state == "done" || s.state == "cached"));
    let path = Store::at(Path::new(progress.workdir.as_deref()?))
        .artifact_dir(key)
        .join(name);
    (done && path.is_file()).then_some(path)
}

pub(super) async fn run(State(app): State<Arc<App>>, UrlPath(id): UrlPath<i64>) -> Page {
    let run = app.store.run(id)?;
    let progress = RunProgress::read(&app.store.events_path(id));
    let log = fs_err::read_to_string(app.store.log_path(id)).unwrap_or_default();
    let log_tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>();
    let recipe = fs_err::read_to_string(app.store.recipe_copy_path(id)).unwrap_or_default();
    let others: Vec<RunRow> = app
        .store
        .runs()?
        .into_iter()
        .filter(|r| r.id != id)
        .collect();
    render(
        &app,
        "run.html",
        context! {
            run => run,
            progress => progress,
            finished => run.status.is_finished(),
            has_report => artifact_file(&app, id, "evaluate", "report.html").is_some(),
            log => log_tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            recipe => recipe,
            others => others,
        },
    )
}

/// `GET /runs/{id}/report`: the evaluate stage's own `report.html`.
pub(super) async fn report(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<i64>,
) -> Result<Html<String>, ApiError> {
    let path = artifact_file(&app, id, "evaluate", "report.html").ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("run {id} has no report yet"))
    })?;
    Ok(Html(
        fs_err::read_to_string(path).map_err(super::UiError::from)?,
    ))
}

pub(super) async fn models(State(app): State<Arc<App>>) -> Page {
    render(
        &app,
        "models.html",
        context! {
            models => models_with_defaults(&app),
            registry => app.registry.display().to_string(),
            config => app.ragd_home.join(registry::CONFIG_FILE).display().to_string(),
        },
    )
}

#[derive(Deserialize)]
pub(super) struct CompareQuery {
    a: i64,
    b: i64,
}

/// A YAML document as `dotted.key → value text`.
fn flatten_yaml(prefix: &str, value: &serde_yaml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (key, child) in map {
                let key = match key {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_yaml(&path, child, out);
            }
        }
        other => {
            let text = serde_json::to_string(other).unwrap_or_default();
            out.insert(prefix.to_owned(), text);
        }
    }
}

fn recipe_values(app: &App, id: i64) -> BTreeMap<String, String> {
    let text = fs_err::read_to_string(app.store.recipe_copy_path(id)).unwrap_or_default();
    let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_default();
    let mut out = BTreeMap::new();
    flatten_yaml("", &value, &mut out);
    out
}

fn run_report(app: &App, id: i64) -> Option<Report> {
    let path = artifact_file(app, id, "evaluate", "report.json")?;
    Report::from_json(&fs_err::read_to_string(path).ok()?).ok()
}

/// Metric rows of two reports: each fine-tuned model's mean and interval, and the paired
/// difference (B − A) with its interval where both scored the same queries.
fn metric_rows(a: &Report, b: &Report) -> Vec<minijinja::Value> {
    let mut rows = Vec::new();
    for dataset_a in &a.datasets {
        let Some(dataset_b) = b.datasets.iter().find(|d| d.name == dataset_a.name) else {
            continue;
        };
        let fine_tuned = |d: &crate::eval::Dataset| {
            d.systems
                .iter()
                .find(|s| s.kind == SystemKind::FineTuned)
                .cloned()
        };
        let (Some(system_a), Some(system_b)) = (fine_tuned(dataset_a), fine_tuned(dataset_b))
        else {
            continue;
        };
        for metric in HEADLINE_METRICS {
            let (Some(ma), Some(mb)) =
                (system_a.metrics.get(&metric), system_b.metrics.get(&metric))
            else {
                continue;
            };
            let paired = (dataset_a.query_ids == dataset_b.query_ids)
                .then(|| {
                    let pa = system_a.per_query.get(&metric)?;
                    let pb = system_b.per_query.get(&metric)?;
                    crate::eval::stats::compare_paired(pa, pb, &a.settings).ok()
                })
                .flatten();
            rows.push(context! {
                dataset => dataset_a.name,
                metric => metric.label(),
                a => format!("{:.3} [{:.3}, {:.3}]", ma.mean, ma.interval.low, ma.interval.high),
                b => format!("{:.3} [{:.3}, {:.3}]", mb.mean, mb.interval.low, mb.interval.high),
                delta => format!("{:+.3}", mb.mean - ma.mean),
                paired => paired.map(|p| p.sentence("B", "A", &metric.label())),
            });
        }
    }
    rows
}

/// `GET /compare?a=&b=`: two runs side by side.
pub(super) async fn compare(
    State(app): State<Arc<App>>,
    Query(query): Query<CompareQuery>,
) -> Page {
    let run_a = app.store.run(query.a)?;
    let run_b = app.store.run(query.b)?;
    let values_a = recipe_values(&app, query.a);
    let values_b = recipe_values(&app, query.b);
    let keys: std::collections::BTreeSet<&String> =
        values_a.keys().chain(values_b.keys()).collect();
    let differ: Vec<minijinja::Value> = keys
        .into_iter()
        .filter(|k| values_a.get(*k) != values_b.get(*k))
        .map(|k| {
            context! {
                key => k,
                a => values_a.get(k).cloned().unwrap_or_else(|| "—".to_owned()),
                b => values_b.get(k).cloned().unwrap_or_else(|| "—".to_owned()),
            }
        })
        .collect();
    let (report_a, report_b) = (run_report(&app, query.a), run_report(&app, query.b));
    let metrics = match (&report_a, &report_b) {
        (Some(a), Some(b)) => metric_rows(a, b),
        _ => Vec::new(),
    };
    render(
        &app,
        "compare.html",
        context! {
            a => run_a,
            b => run_b,
            differ => differ,
            metrics => metrics,
            reports => report_a.is_some() && report_b.is_some(),
        },
    )
}
