//! The run queue's worker: one run at a time, each as `ragd-pipe run RECIPE --json` (this very
//! binary), so the dashboard runs exactly what the command line runs and a run that crashes
//! cannot take the server down. Its stdout (the JSON event lines) goes straight into the run's
//! event file, which the pages follow. Cancelling sends SIGINT, the same as Ctrl-C in a terminal:
//! the stage stops at its next check, keeps its journal, and a rerun resumes.
//!
//! A second process on the same workdir (a `ragd-pipe run` in a terminal) is kept out by the
//! workdir lock the executor takes; the run waits for it and says so (`waiting` event).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use fs_err as fs;

use super::progress::RunProgress;
use super::store::{RunRow, RunStatus, UiStore};

/// How often an idle worker looks for a queued run.
const POLL: Duration = Duration::from_millis(300);

/// The worker's shared handle: who is running, and whether to stop.
#[derive(Default)]
pub(crate) struct Queue {
    /// The pid of the run in progress, 0 when none.
    running_pid: AtomicI64,
    stopping: AtomicBool,
}

impl Queue {
    /// Starts the worker thread.
    pub(crate) fn start(store: Arc<UiStore>, exe: PathBuf) -> Arc<Self> {
        let queue = Arc::new(Self::default());
        let worker = queue.clone();
        std::thread::Builder::new()
            .name("ragd-ui-queue".to_owned())
            .spawn(move || worker.work(&store, &exe))
            .expect("spawning a thread at start-up should not fail");
        queue
    }

    #[allow(
        clippy::print_stderr,
        reason = "the dashboard's own failures go to the terminal that started it"
    )]
    fn work(&self, store: &UiStore, exe: &Path) {
        while !self.stopping.load(Ordering::Relaxed) {
            match store.take_next() {
                Ok(Some(run)) => self.execute(store, exe, &run),
                Ok(None) => std::thread::sleep(POLL),
                Err(error) => {
                    anstream::eprintln!("dashboard queue: {error}");
                    std::thread::sleep(POLL * 10);
                }
            }
        }
    }

    #[allow(
        clippy::print_stderr,
        reason = "the dashboard's own failures go to the terminal that started it"
    )]
    fn execute(&self, store: &UiStore, exe: &Path, run: &RunRow) {
        let outcome = self.spawn_and_wait(store, exe, run);
        let (status, code, message) = match outcome {
            Err(error) => (RunStatus::Failed, None, Some(error.to_string())),
            Ok(code) => {
                let cancelled = store
                    .run(run.id)
                    .is_ok_and(|r| r.status == RunStatus::Cancelling);
                let progress = RunProgress::read(&store.events_path(run.id));
                match code {
                    Some(0) => (RunStatus::Done, code, None),
                    // 130: interrupted (SIGINT); None: killed by a signal.
                    Some(130) | None if cancelled || self.stopping.load(Ordering::Relaxed) => {
                        let status = if cancelled {
                            RunStatus::Cancelled
                        } else {
                            RunStatus::Interrupted
                        };
                        (
                            status,
                            code,
                            Some("finished work and journals are kept; rerun to resume".to_owned()),
                        )
                    }
                    _ => (RunStatus::Failed, code, progress.error),
                }
            }
        };
        if let Err(error) = store.finish(run.id, status, code, message.as_deref()) {
            anstream::eprintln!("dashboard queue: {error}");
        }
    }

    /// Runs the recipe; the exit code (None when a signal ended it).
    fn spawn_and_wait(
        &self,
        store: &UiStore,
        exe: &Path,
        run: &RunRow,
    ) -> Result<Option<i32>, std::io::Error> {
        let stdout = fs::File::create(store.events_path(run.id))?;
        let stderr = fs::File::create(store.log_path(run.id))?;
        let mut child = Command::new(exe)
            .arg("run")
            .arg(&run.recipe)
            .arg("--json")
            .arg("--no-progress")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout.into_parts().0)
            .stderr(stderr.into_parts().0)
            .spawn()?;
        self.running_pid
            .store(i64::from(child.id()), Ordering::SeqCst);
        let _ = store.set_pid(run.id, child.id());
        // A cancel or a shutdown that came between taking the run and knowing its pid.
        if self.stopping.load(Ordering::SeqCst)
            || store
                .run(run.id)
                .is_ok_and(|r| r.status == RunStatus::Cancelling)
        {
            interrupt(i64::from(child.id()));
        }
        let status = child.wait();
        self.running_pid.store(0, Ordering::SeqCst);
        Ok(status?.code())
    }

    /// Interrupts `pid` if it is the run in progress (never another process that took its pid).
    pub(crate) fn cancel(&self, pid: i64) -> bool {
        if pid > 0 && self.running_pid.load(Ordering::SeqCst) == pid {
            interrupt(pid);
            true
        } else {
            false
        }
    }

    /// Stops taking runs and interrupts the one in progress; it keeps its journals.
    pub(crate) fn shut_down(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let pid = self.running_pid.load(Ordering::SeqCst);
        if pid > 0 {
            interrupt(pid);
        }
    }

    /// Whether a run is in progress.
    pub(crate) fn busy(&self) -> bool {
        self.running_pid.load(Ordering::SeqCst) > 0
    }
}

/// SIGINT, what Ctrl-C sends.
fn interrupt(pid: i64) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes any pid and signal number; it touches no memory of ours.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
}
