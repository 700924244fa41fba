//! What can go wrong in the dashboard's server, its state database and its uploads.

use std::path::PathBuf;

/// An error of the dashboard. Request handlers turn it into an HTTP status and a JSON body.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum UiError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the dashboard database `{path}` cannot be used")]
    #[diagnostic(code(ragd::ui::database))]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the dashboard database failed")]
    Query(#[from] rusqlite::Error),
    #[error("cannot listen on `{address}`")]
    #[diagnostic(code(ragd::ui::bind))]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding `{host}` exposes the dashboard beyond this machine without a token")]
    #[diagnostic(
        code(ragd::ui::token_required),
        help("pass `--token SECRET` (or set `RAGD_UI_TOKEN`), or bind 127.0.0.1")
    )]
    TokenRequired { host: String },
    #[error("`{dir}` is not a folder")]
    #[diagnostic(code(ragd::ui::not_a_folder))]
    NotAFolder { dir: PathBuf },
    #[error("no run {id}")]
    #[diagnostic(code(ragd::ui::no_run))]
    NoRun { id: i64 },
}
