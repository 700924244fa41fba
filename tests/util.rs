//! The harness of the integration tests: a temporary project, the real binary run with a pinned
//! environment (no progress bars, no colour, 80 columns, no hub, a shared model cache), and its
//! output normalised for snapshots.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary project folder in which tests write recipes and corpora.
pub(crate) struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("ragd-test-")
                .tempdir()
                .expect("a temp dir"),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes a file, creating its folders.
    pub(crate) fn write(&self, relative: &str, content: &str) -> &Self {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create folders");
        }
        std::fs::write(&path, content).expect("write file");
        self
    }

    pub(crate) fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).expect("read file")
    }

    /// The binary with the pinned environment, run in the project folder.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ragd-pipe"));
        command
            .args(args)
            .current_dir(self.root())
            .env("RAGD_NO_PROGRESS", "1")
            .env("NO_COLOR", "1")
            .env("COLUMNS", "80")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", self.path(".hf"))
            .env("RAGD_HOME", self.path(".ragd-home"))
            .env("RAGD_CACHE_DIR", model_cache())
            .env_remove("RAGD_JSON")
            .env_remove("CI");
        command
    }

    pub(crate) fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("the binary runs"), self)
    }
}

/// Where downloaded models are shared between tests and runs: `RAGD_TEST_CACHE`, else
/// `target/test-cache` (the same place the unit tests use).
pub(crate) fn model_cache() -> PathBuf {
    std::env::var_os("RAGD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-cache"))
}

/// A finished run of the binary.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    root: PathBuf,
}

impl Run {
    fn from(output: Output, project: &Project) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            root: project.root().to_path_buf(),
        }
    }

    #[track_caller]
    pub(crate) fn success(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub(crate) fn failure(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Exit code, stdout and stderr together, with temp paths, durations and hashes replaced.
    pub(crate) fn snapshot(&self) -> String {
        normalize(
            &format!(
                "exit: {}\n--- stdout\n{}--- stderr\n{}",
                self.code, self.stdout, self.stderr
            ),
            &self.root,
        )
    }

    /// Lines of stderr about stages (`✓ chunk: cached`, `▶ mine: running (...)`).
    pub(crate) fn stage_lines(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with('✓') || l.starts_with('▶') || l.starts_with('✗'))
            .map(|l| normalize(l, &self.root))
            .collect()
    }

    /// The stages that ran (started) in this run.
    pub(crate) fn ran(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("▶ "))
            .filter_map(|l| l.split(':').next())
            .map(str::to_owned)
            .collect()
    }
}

/// Replaces what changes between runs: the temp folder, durations, hex hashes.
pub(crate) fn normalize(text: &str, root: &Path) -> String {
    let root = root.display().to_string();
    let text = text.replace(&root, "[ROOT]");
    let duration = regex::Regex::new(r"\b\d+(\.\d+)?(s|ms|m\d\ds|h\d\dm)\b").expect("regex");
    let text = duration.replace_all(&text, "[TIME]");
    let hash = regex::Regex::new(r"\b[0-9a-f]{12,64}\b").expect("regex");
    hash.replace_all(&text, "[HASH]").into_owned()
}

/// Copies a folder tree (the repository's examples into a test project).
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("read folder") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}
