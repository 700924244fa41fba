//! The JSON endpoints the pages' script calls, and the Server-Sent Events of a run.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;

use super::dataset;
use super::progress::RunProgress;
use super::wizard::{self, DataChoice, WizardChoices};
use super::{ApiError, App, resolve_local};
use crate::exec;
use crate::model::gguf::{self, GgufType};
use crate::recipe::Recipe;
use crate::registry;

type ApiResult = Result<Json<serde_json::Value>, ApiError>;

/// How often a run's event file is read for new lines.
const TAIL_EVERY: Duration = Duration::from_millis(250);

#[derive(Deserialize)]
pub(super) struct UploadQuery {
    name: String,
}

/// `POST /api/datasets?name=FILE.jsonl` with the file as the body: checked row by row; kept
/// only when training would accept it.
pub(super) async fn upload(
    State(app): State<Arc<App>>,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let name = dataset::upload_name(&query.name).map_err(|rule| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{}` is not an accepted file name: {rule}", query.name),
        )
    })?;
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the file is not UTF-8 text: {e}"),
        )
    })?;
    let validation = dataset::validate(text);
    if !validation.accepted() {
        return Err(ApiError::with(
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({
                "error": format!("`{name}` cannot train a model"),
                "rows": validation.rows,
                "problems": validation.problems,
            }),
        ));
    }
    let digest = blake3::hash(&body).to_hex();
    let file = format!("{}-{name}", &digest[..12]);
    let path = app.store.datasets_dir().join(&file);
    let staging = app.store.datasets_dir().join(format!(".{file}.part"));
    fs_err::write(&staging, &body).map_err(super::UiError::from)?;
    fs_err::rename(&staging, &path).map_err(super::UiError::from)?;
    let id = app.store.add_dataset(
        name,
        &file,
        validation.usable,
        body.len(),
        &validation.stats,
    )?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": id,
            "rows": validation.rows,
            "usable": validation.usable,
            "problems": validation.problems,
            "stats": validation.stats,
        })),
    ))
}

/// `GET /api/runs`: the queue with each run's current stage.
pub(super) async fn runs(State(app): State<Arc<App>>) -> ApiResult {
    let runs = app.store.runs()?;
    let rows: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            let progress = RunProgress::read(&app.store.events_path(run.id));
            serde_json::json!({ "run": run, "current": progress.current() })
        })
        .collect();
    Ok(Json(serde_json::json!({ "runs": rows })))
}

#[derive(Deserialize)]
pub(super) struct QueueRequest {
    /// A recipe of the project, relative to its folder.
    recipe: Option<String>,
    /// Or recipe text from the wizard, with its name.
    text: Option<String>,
    name: Option<String>,
}

/// `POST /api/runs`: queue a recipe of the project, or the wizard's recipe text.
pub(super) async fn queue_run(
    State(app): State<Arc<App>>,
    Json(request): Json<QueueRequest>,
) -> ApiResult {
    let (name, path) = match (request.recipe, request.text) {
        (Some(recipe), None) => {
            let path = resolve_local(&app.project, &recipe)?;
            if !super::pages::project_recipes(&app.project).contains(&path) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("`{recipe}` is not a recipe of this project"),
                ));
            }
            let loaded = Recipe::load(&path, &[]).map_err(|e| recipe_problem(&e))?;
            (loaded.env.name.clone(), path)
        }
        (None, Some(text)) => {
            let name = request.name.unwrap_or_default();
            registry::validate_name(&name)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
            let path = app.store.recipes_dir().join(format!("{name}.yaml"));
            Recipe::from_text(&path, text.clone(), &[]).map_err(|e| recipe_problem(&e))?;
            // A queued or running run reads this file when it starts (or resumes): changing it
            // under that run would run another recipe than the one launched.
            if app
                .store
                .runs()?
                .iter()
                .any(|run| run.recipe == path && !run.status.is_finished())
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "a run named `{name}` is queued or running; give this one another name, or wait for it"
                    ),
                ));
            }
            fs_err::write(&path, &text).map_err(super::UiError::from)?;
            (name, path)
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "give `recipe` (a path) or `text` and `name`",
            ));
        }
    };
    let id = enqueue(&app, &name, &path)?;
    Ok(Json(serde_json::json!({ "id": id })))
}

/// Queues a run and keeps a copy of its recipe as it was (for comparing runs later).
fn enqueue(app: &App, name: &str, recipe: &Path) -> Result<i64, ApiError> {
    let id = app.store.enqueue(name, recipe)?;
    if let Ok(text) = fs_err::read_to_string(recipe) {
        let _ = fs_err::write(app.store.recipe_copy_path(id), text);
    }
    Ok(id)
}

/// A recipe's diagnostics as text (miette's graphical report without colour).
pub(super) fn recipe_problem(error: &crate::recipe::RecipeError) -> ApiError {
    let mut text = String::new();
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100);
    if handler.render_report(&mut text, error).is_err() {
        text = error.to_string();
    }
    ApiError::with(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::json!({ "error": error.to_string(), "diagnostic": text }),
    )
}

/// `POST /api/runs/{id}/cancel`: Ctrl-C semantics.
pub(super) async fn cancel(State(app): State<Arc<App>>, UrlPath(id): UrlPath<i64>) -> ApiResult {
    let (status, pid) = app.store.request_cancel(id)?;
    if let Some(pid) = pid {
        app.queue.cancel(pid);
    }
    Ok(Json(serde_json::json!({ "status": status })))
}

/// `POST /api/runs/{id}/rerun`: the same recipe again; cached stages are skipped and an
/// interrupted stage resumes from its journal.
pub(super) async fn rerun(State(app): State<Arc<App>>, UrlPath(id): UrlPath<i64>) -> ApiResult {
    let run = app.store.run(id)?;
    if !run.status.is_finished() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("run {id} is still {}", run.status.as_str()),
        ));
    }
    let new = enqueue(&app, &run.name, &run.recipe)?;
    Ok(Json(serde_json::json!({ "id": new })))
}

/// `POST /api/wizard/review`: the recipe for the wizard's choices, checked by the loader.
pub(super) async fn review(
    State(app): State<Arc<App>>,
    Json(choices): Json<WizardChoices>,
) -> ApiResult {
    registry::validate_name(&choices.name)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let (data, labelled) = match &choices.data {
        DataChoice::Folder { path, labelled } => {
            let data = resolve_local(&app.project, path)?;
            let labelled = labelled
                .as_deref()
                .filter(|l| !l.trim().is_empty())
                .map(|l| resolve_local(&app.project, l))
                .transpose()?;
            (data, labelled)
        }
        DataChoice::Dataset { id } => {
            let dataset = app
                .store
                .dataset(*id)?
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no dataset {id}")))?;
            (app.store.dataset_path(&dataset), None)
        }
    };
    let workdir = app.store.recipes_dir().join(".ragd-pipe");
    let text = wizard::recipe_text(&choices, &data, labelled.as_deref(), &workdir);
    let path: PathBuf = app
        .store
        .recipes_dir()
        .join(format!("{}.yaml", choices.name));
    let (problem, estimate) = match Recipe::from_text(&path, text.clone(), &[]) {
        Err(error) => (Some(recipe_problem(&error).body), None),
        // Planning hashes the documents and may time the model once: not on the event loop.
        Ok(recipe) => {
            let estimate = tokio::task::spawn_blocking(move || {
                let options = crate::plan::PlanOptions::default();
                exec::prepare(&recipe, &options, Arc::new(exec::NoReporter))
                    .map(|prepared| exec::estimate(&recipe, &prepared))
                    .map_err(|e| crate::error_chain(&e))
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            (None, Some(estimate))
        }
    };
    let (estimate, estimate_problem) = match estimate {
        Some(Ok(estimate)) => (Some(estimate), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, None),
    };
    Ok(Json(serde_json::json!({
        "text": text,
        "path": path,
        "problem": problem,
        "estimate": estimate,
        "estimate_problem": estimate_problem,
    })))
}

/// `POST /api/models/{name}/use`: make it ragd's default (`models use`).
pub(super) async fn use_model(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let outcome = registry::use_registered(&app.registry, &name, &app.ragd_home)
        .map_err(|e| registry_problem(&e))?;
    Ok(Json(serde_json::to_value(outcome).unwrap_or_default()))
}

/// `DELETE /api/models/{name}`: refused for the model ragd uses now.
pub(super) async fn delete_model(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let details = registry::show(&app.registry, &name).map_err(|e| registry_problem(&e))?;
    if super::pages::defaults(&app.ragd_home).contains(&details.entry.path) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "`{name}` is ragd's current default; make another model the default before deleting it"
            ),
        ));
    }
    let path = registry::remove(&app.registry, &name).map_err(|e| registry_problem(&e))?;
    Ok(Json(serde_json::json!({ "removed": path })))
}

/// `GET /api/models/{name}/gguf`: the model as one f16 GGUF file for llama.cpp and Ollama, as a
/// download: the registered folder's own when `register` wrote one, else exported now into the
/// dashboard's state (`models export NAME --format gguf` does the same).
pub(super) async fn model_gguf(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    let details = registry::show(&app.registry, &name).map_err(|e| registry_problem(&e))?;
    let file_name = format!("{name}-{}.gguf", GgufType::F16);
    let registered = details.entry.path.join(&file_name);
    let path = if registered.is_file() {
        registered
    } else {
        let model_dir = details.entry.path.clone();
        let out = app.store.exports_dir().join(&file_name);
        tokio::task::spawn_blocking(move || -> Result<PathBuf, ApiError> {
            let unprocessable = |why: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why);
            let cannot = |e: crate::model::error::ModelError| unprocessable(crate::error_chain(&e));
            if let Some(why) = gguf::not_exportable(&model_dir).map_err(cannot)? {
                return Err(unprocessable(format!("no GGUF for `{name}`: {why}")));
            }
            gguf::export_bert(&model_dir, &out, GgufType::F16, &name).map_err(cannot)?;
            Ok(out)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let disposition = format!("attachment; filename=\"{file_name}\"");
    Ok(axum::response::IntoResponse::into_response((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )))
}

fn registry_problem(error: &registry::RegistryError) -> ApiError {
    let status = match error {
        registry::RegistryError::NotFound { .. } => StatusCode::NOT_FOUND,
        registry::RegistryError::InvalidName { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, crate::error_chain(error))
}

/// Where the SSE tail of a run stands.
struct Tail {
    app: Arc<App>,
    id: i64,
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    ready: VecDeque<SseEvent>,
    ended: bool,
}

impl Tail {
    /// New complete lines since the last read.
    fn read_more(&mut self) -> usize {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return 0;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return 0;
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let mut lines = 0;
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_owned();
            if !line.is_empty() {
                self.ready.push_back(SseEvent::default().data(line));
                lines += 1;
            }
        }
        lines
    }
}

/// `GET /runs/{id}/events`: the run's event lines as Server-Sent Events, from the first, as they
/// are written; an `end` event with the final status once the run is over.
pub(super) async fn events(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<i64>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    app.store.run(id)?;
    let tail = Tail {
        path: app.store.events_path(id),
        app,
        id,
        offset: 0,
        partial: Vec::new(),
        ready: VecDeque::new(),
        ended: false,
    };
    let stream = futures_util::stream::unfold(tail, |mut tail| async move {
        loop {
            if let Some(event) = tail.ready.pop_front() {
                return Some((Ok(event), tail));
            }
            if tail.ended || tail.app.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            // Read the status before the file, so that lines written before the end are sent.
            let status = tail.app.store.run(tail.id).map(|r| r.status);
            if tail.read_more() == 0 {
                match status {
                    Ok(status) if status.is_finished() => {
                        tail.ended = true;
                        tail.ready
                            .push_back(SseEvent::default().event("end").data(status.as_str()));
                    }
                    Err(_) => tail.ended = true,
                    Ok(_) => tokio::time::sleep(TAIL_EVERY).await,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
