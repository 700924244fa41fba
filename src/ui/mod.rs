//! The dashboard (`ragd-pipe ui`): a local web app over the same recipes, stores, run events and
//! registry the command line uses. Pages are rendered on the server (minijinja templates and one
//! small script compiled into the binary: no build step, nothing fetched from a CDN); live
//! progress is Server-Sent Events from a run's JSON event lines.
//!
//! It owns only its queue and uploads (`store`, SQLite under `<dir>/.ragd-ui/`); runs are this
//! binary's `run` command (`queue`), reports are the evaluate stage's `report.html`, models are
//! the registry's.
//!
//! Security: it binds 127.0.0.1 unless told otherwise, and then only with a token; on loopback
//! it answers only requests addressed to a loopback host name (no DNS rebinding). Every request
//! that changes something carries the page's CSRF token in `X-CSRF-Token`, which another site's
//! page cannot read nor send without a CORS preflight this server never grants.

mod api;
mod error;
mod pages;
mod progress;
mod queue;
mod store;

pub mod dataset;
pub mod wizard;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::UiError;

use queue::Queue;
use store::UiStore;

/// The cookie that carries the access token after a first visit with `?token=`.
const TOKEN_COOKIE: &str = "ragd_ui_token";

/// How the dashboard is served.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// The project folder: its recipes are offered, and the state lives in `.ragd-ui/` inside it.
    pub dir: PathBuf,
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    /// Required on every request when set; required to bind beyond loopback.
    pub token: Option<String>,
    pub max_upload_bytes: usize,
    /// The model registry.
    pub registry: PathBuf,
    /// ragd's home (its `config.yaml`), which `models use` edits.
    pub ragd_home: PathBuf,
}

/// What every handler shares.
pub(crate) struct App {
    store: Arc<UiStore>,
    queue: Arc<Queue>,
    templates: minijinja::Environment<'static>,
    project: PathBuf,
    registry: PathBuf,
    ragd_home: PathBuf,
    token: Option<String>,
    csrf: String,
    /// Host header values accepted on loopback; empty when bound elsewhere (the token guards).
    hosts: Vec<String>,
    max_upload_bytes: usize,
    /// Set on Ctrl-C: live event streams end, so the server can stop.
    stopping: AtomicBool,
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]")
}

/// Serves the dashboard until Ctrl-C; `listening` hears the address once bound.
pub async fn serve(options: UiOptions, listening: impl FnOnce(SocketAddr)) -> Result<(), UiError> {
    if !is_loopback(&options.host) && options.token.is_none() {
        return Err(UiError::TokenRequired { host: options.host });
    }
    if !options.dir.is_dir() {
        return Err(UiError::NotAFolder { dir: options.dir });
    }
    let project = fs_err::canonicalize(&options.dir)?;
    let store = Arc::new(UiStore::open(&project)?);
    store.recover()?;
    let exe = std::env::current_exe()?;
    let queue = Queue::start(store.clone(), exe);
    let address = format!("{}:{}", options.host, options.port);
    let bind_host = options.host.trim_start_matches('[').trim_end_matches(']');
    let listener = tokio::net::TcpListener::bind((bind_host, options.port))
        .await
        .map_err(|source| UiError::Bind {
            address: address.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    let hosts = if is_loopback(&options.host) {
        let port = local.port();
        vec![
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ]
    } else {
        Vec::new()
    };
    let app = Arc::new(App {
        store,
        queue: queue.clone(),
        templates: pages::templates(),
        project,
        registry: options.registry,
        ragd_home: options.ragd_home,
        token: options.token,
        csrf: random_token(),
        hosts,
        max_upload_bytes: options.max_upload_bytes,
        stopping: AtomicBool::new(false),
    });
    let router = router(app.clone());
    listening(local);
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            app.stopping.store(true, Ordering::SeqCst);
            app.queue.shut_down();
        })
        .await;
    // The run in progress got SIGINT: give it time to close its journals and be recorded.
    for _ in 0..300 {
        if !queue.busy() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    served.map_err(UiError::Io)
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/datasets", get(pages::datasets))
        .route("/datasets/{id}", get(pages::dataset))
        .route("/runs", get(pages::runs))
        .route("/runs/new", get(pages::wizard))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/report", get(pages::report))
        .route("/runs/{id}/events", get(api::events))
        .route("/models", get(pages::models))
        .route("/compare", get(pages::compare))
        .route("/assets/{name}", get(pages::asset))
        .route("/api/datasets", post(api::upload))
        .route("/api/runs", get(api::runs).post(api::queue_run))
        .route("/api/runs/{id}/cancel", post(api::cancel))
        .route("/api/runs/{id}/rerun", post(api::rerun))
        .route("/api/wizard/review", post(api::review))
        .route("/api/models/{name}/use", post(api::use_model))
        .route("/api/models/{name}/gguf", get(api::model_gguf))
        .route(
            "/api/models/{name}",
            axum::routing::delete(api::delete_model),
        )
        .layer(axum::extract::DefaultBodyLimit::max(app.max_upload_bytes))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// 32 random hex digits.
fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Host check, token check and CSRF check, before any handler.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !app.hosts.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !app.hosts.iter().any(|allowed| allowed == host) {
            return refuse(StatusCode::MISDIRECTED_REQUEST, "unexpected Host header");
        }
    }
    let mut set_cookie = None;
    if let Some(token) = &app.token {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "));
        let from_query = request.uri().query().and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
        });
        let cookie = cookie_value(headers, TOKEN_COOKIE);
        let ok = [bearer, cookie, from_query]
            .into_iter()
            .flatten()
            .any(|given| same_secret(given, token));
        if !ok {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "a token is required: open the address printed at start-up",
            );
        }
        if from_query.is_some() {
            set_cookie = Some(format!(
                "{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            ));
        }
    }
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe {
        let given = headers
            .get("x-csrf-token")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !same_secret(given, &app.csrf) {
            return refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
        }
    }
    let mut response = next.run(request).await;
    if let Some(cookie) = set_cookie
        && let Ok(value) = cookie.parse()
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// An error as an HTTP response: a status and `{"error": …}` (plus details).
pub(crate) struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }

    fn with(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }
}

impl From<UiError> for ApiError {
    fn from(error: UiError) -> Self {
        let status = match error {
            UiError::NoRun { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, crate::error_chain(&error))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A path the client named, resolved against the project folder and checked to exist.
fn resolve_local(project: &Path, given: &str) -> Result<PathBuf, ApiError> {
    let path = project.join(given.trim());
    fs_err::canonicalize(&path).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{}` does not exist", path.display()),
        )
    })
}
