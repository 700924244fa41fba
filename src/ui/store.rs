//! The dashboard's own state in SQLite (`<dir>/.ragd-ui/ui.sqlite`): the run queue and the
//! uploaded datasets. Artifacts stay in each recipe's content-addressed store and models in the
//! registry; this database only remembers what the dashboard was asked to do, so that a queue
//! survives a restart.
//!
//! | table      | one row per                | columns                                             |
//! |------------|----------------------------|-----------------------------------------------------|
//! | `runs`     | run asked for              | `id`, `name`, `recipe` (path), `status`, `created`, `started`, `finished`, `pid`, `exit_code`, `message` |
//! | `datasets` | accepted training file     | `id`, `name`, `file` (a name the server chose), `rows`, `bytes`, `uploaded`, `stats` (JSON) |
//!
//! A run's events are the JSON Lines `ragd-pipe run --json` prints, kept in `runs/<id>.jsonl`
//! beside the database; its stderr in `runs/<id>.log`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fs_err as fs;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::error::UiError;

/// The folder of the dashboard's state inside its project folder.
pub(crate) const STATE_DIR: &str = ".ragd-ui";

/// The schema version in `PRAGMA user_version`; bump it with a migration when the tables change.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    recipe TEXT NOT NULL,
    status TEXT NOT NULL,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    pid INTEGER,
    exit_code INTEGER,
    message TEXT
);
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    file TEXT NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    uploaded TEXT NOT NULL,
    stats TEXT NOT NULL
);
";

/// Where a run is. Stored as its kebab-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RunStatus {
    Queued,
    Running,
    /// Asked to stop; the process got SIGINT and is closing its journals.
    Cancelling,
    Done,
    Failed,
    /// Stopped on request (Ctrl-C semantics: finished work and journals kept).
    Cancelled,
    /// Was running when the dashboard stopped; a rerun resumes it.
    Interrupted,
}

impl RunStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "cancelling" => Self::Cancelling,
            "done" => Self::Done,
            "cancelled" => Self::Cancelled,
            "interrupted" => Self::Interrupted,
            _ => Self::Failed,
        }
    }

    /// Whether the run will not change any more.
    pub(crate) fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Interrupted
        )
    }
}

/// One run of the queue.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) recipe: PathBuf,
    pub(crate) status: RunStatus,
    pub(crate) created: String,
    pub(crate) started: Option<String>,
    pub(crate) finished: Option<String>,
    pub(crate) pid: Option<i64>,
    pub(crate) exit_code: Option<i64>,
    pub(crate) message: Option<String>,
}

/// One accepted dataset.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DatasetRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) file: String,
    pub(crate) rows: i64,
    pub(crate) bytes: i64,
    pub(crate) uploaded: String,
    pub(crate) stats: serde_json::Value,
}

/// The database and the folder it lives in.
pub(crate) struct UiStore {
    conn: Mutex<Connection>,
    root: PathBuf,
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

impl UiStore {
    /// Opens (or creates) the state under `<project>/.ragd-ui/`.
    pub(crate) fn open(project: &Path) -> Result<Self, UiError> {
        let root = project.join(STATE_DIR);
        for dir in ["runs", "datasets", "recipes"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let path = root.join("ui.sqlite");
        let database = |source| UiError::Database {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(database)?;
        conn.execute_batch(SCHEMA).map_err(database)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(database)?;
        Ok(Self {
            conn: Mutex::new(conn),
            root,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls back.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The events of run `id` (what `run --json` printed).
    pub(crate) fn events_path(&self, id: i64) -> PathBuf {
        self.root.join("runs").join(format!("{id}.jsonl"))
    }

    /// The recipe of run `id` as it was when queued.
    pub(crate) fn recipe_copy_path(&self, id: i64) -> PathBuf {
        self.root.join("runs").join(format!("{id}.recipe.yaml"))
    }

    /// The stderr of run `id`.
    pub(crate) fn log_path(&self, id: i64) -> PathBuf {
        self.root.join("runs").join(format!("{id}.log"))
    }

    pub(crate) fn datasets_dir(&self) -> PathBuf {
        self.root.join("datasets")
    }

    pub(crate) fn recipes_dir(&self) -> PathBuf {
        self.root.join("recipes")
    }

    /// Where models exported for download are written.
    pub(crate) fn exports_dir(&self) -> PathBuf {
        self.root.join("exports")
    }

    /// Runs left `running` by a dashboard that stopped become `interrupted` (their process is
    /// gone or no longer ours); queued runs stay queued.
    pub(crate) fn recover(&self) -> Result<usize, UiError> {
        let changed = self.conn().execute(
            "UPDATE runs SET status = 'interrupted', finished = ?1, pid = NULL,
             message = 'the dashboard stopped during the run; rerun to resume'
             WHERE status IN ('running', 'cancelling')",
            params![now()],
        )?;
        Ok(changed)
    }

    pub(crate) fn enqueue(&self, name: &str, recipe: &Path) -> Result<i64, UiError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (name, recipe, status, created) VALUES (?1, ?2, 'queued', ?3)",
            params![name, recipe.to_string_lossy(), now()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
        Ok(RunRow {
            id: row.get(0)?,
            name: row.get(1)?,
            recipe: PathBuf::from(row.get::<_, String>(2)?),
            status: RunStatus::parse(&row.get::<_, String>(3)?),
            created: row.get(4)?,
            started: row.get(5)?,
            finished: row.get(6)?,
            pid: row.get(7)?,
            exit_code: row.get(8)?,
            message: row.get(9)?,
        })
    }

    const RUN_COLUMNS: &str =
        "id, name, recipe, status, created, started, finished, pid, exit_code, message";

    /// Every run, newest first.
    pub(crate) fn runs(&self) -> Result<Vec<RunRow>, UiError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {} FROM runs ORDER BY id DESC",
            Self::RUN_COLUMNS
        ))?;
        let rows = statement
            .query_map([], Self::row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub(crate) fn run(&self, id: i64) -> Result<RunRow, UiError> {
        self.conn()
            .query_row(
                &format!("SELECT {} FROM runs WHERE id = ?1", Self::RUN_COLUMNS),
                params![id],
                Self::row,
            )
            .optional()?
            .ok_or(UiError::NoRun { id })
    }

    /// The oldest queued run, marked running in the same statement so that it is taken once.
    pub(crate) fn take_next(&self) -> Result<Option<RunRow>, UiError> {
        let id: Option<i64> = self
            .conn()
            .query_row(
                "UPDATE runs SET status = 'running', started = ?1
                 WHERE id = (SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1)
                 RETURNING id",
                params![now()],
                |row| row.get(0),
            )
            .optional()?;
        id.map(|id| self.run(id)).transpose()
    }

    pub(crate) fn set_pid(&self, id: i64, pid: u32) -> Result<(), UiError> {
        self.conn().execute(
            "UPDATE runs SET pid = ?2 WHERE id = ?1",
            params![id, i64::from(pid)],
        )?;
        Ok(())
    }

    /// Records how a run ended.
    pub(crate) fn finish(
        &self,
        id: i64,
        status: RunStatus,
        exit_code: Option<i32>,
        message: Option<&str>,
    ) -> Result<(), UiError> {
        self.conn().execute(
            "UPDATE runs SET status = ?2, finished = ?3, pid = NULL, exit_code = ?4, message = ?5
             WHERE id = ?1",
            params![id, status.as_str(), now(), exit_code, message],
        )?;
        Ok(())
    }

    /// Asks a run to stop: a queued run is cancelled at once; a running one becomes
    /// `cancelling` and its pid is returned for the caller to interrupt.
    pub(crate) fn request_cancel(&self, id: i64) -> Result<(RunStatus, Option<i64>), UiError> {
        let run = self.run(id)?;
        match run.status {
            RunStatus::Queued => {
                self.finish(
                    id,
                    RunStatus::Cancelled,
                    None,
                    Some("cancelled while queued"),
                )?;
                Ok((RunStatus::Cancelled, None))
            }
            RunStatus::Running | RunStatus::Cancelling => {
                self.conn().execute(
                    "UPDATE runs SET status = 'cancelling' WHERE id = ?1",
                    params![id],
                )?;
                Ok((RunStatus::Cancelling, run.pid))
            }
            other => Ok((other, None)),
        }
    }

    pub(crate) fn add_dataset(
        &self,
        name: &str,
        file: &str,
        rows: usize,
        bytes: usize,
        stats: &serde_json::Value,
    ) -> Result<i64, UiError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO datasets (name, file, rows, bytes, uploaded, stats)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                name,
                file,
                i64::try_from(rows).unwrap_or(i64::MAX),
                i64::try_from(bytes).unwrap_or(i64::MAX),
                now(),
                stats.to_string()
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn dataset_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DatasetRow> {
        let stats: String = row.get(6)?;
        Ok(DatasetRow {
            id: row.get(0)?,
            name: row.get(1)?,
            file: row.get(2)?,
            rows: row.get(3)?,
            bytes: row.get(4)?,
            uploaded: row.get(5)?,
            stats: serde_json::from_str(&stats).unwrap_or_default(),
        })
    }

    /// Every dataset, newest first.
    pub(crate) fn datasets(&self) -> Result<Vec<DatasetRow>, UiError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, name, file, rows, bytes, uploaded, stats FROM datasets ORDER BY id DESC",
        )?;
        let rows = statement
            .query_map([], Self::dataset_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub(crate) fn dataset(&self, id: i64) -> Result<Option<DatasetRow>, UiError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, file, rows, bytes, uploaded, stats FROM datasets WHERE id = ?1",
                params![id],
                Self::dataset_row,
            )
            .optional()?)
    }

    /// The file of a dataset, always inside the datasets folder (its name was chosen here).
    pub(crate) fn dataset_path(&self, dataset: &DatasetRow) -> PathBuf {
        self.datasets_dir().join(&dataset.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_survives_reopening_and_running_runs_become_interrupted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = UiStore::open(dir.path()).expect("opens");
        let first = store.enqueue("a", Path::new("/r/a.yaml")).expect("queued");
        let second = store.enqueue("b", Path::new("/r/b.yaml")).expect("queued");
        let taken = store.take_next().expect("query").expect("a run");
        assert_eq!(taken.id, first);
        assert_eq!(taken.status, RunStatus::Running);
        drop(store);

        let store = UiStore::open(dir.path()).expect("reopens");
        assert_eq!(store.recover().expect("recovers"), 1);
        assert_eq!(
            store.run(first).expect("run").status,
            RunStatus::Interrupted
        );
        let next = store.take_next().expect("query").expect("the queued run");
        assert_eq!(next.id, second);
        assert!(store.take_next().expect("query").is_none());
    }

    #[test]
    fn cancelling_a_queued_run_never_starts_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = UiStore::open(dir.path()).expect("opens");
        let id = store.enqueue("a", Path::new("/r/a.yaml")).expect("queued");
        assert_eq!(
            store.request_cancel(id).expect("cancel"),
            (RunStatus::Cancelled, None)
        );
        assert!(store.take_next().expect("query").is_none());
    }
}
