//! Issue 16: the dashboard in a real Chromium, driven by `tests/ui/flow.mjs` (npm's
//! playwright-core) on the quickstart's documents: a broken and a good upload, a wizard run with
//! live progress, cancel and resume, the report, making the model ragd's default, and comparing
//! two runs. Skipped, and says so, when no Chromium, node or playwright-core is found
//! (`.ci/run` installs them). `RAGD_UPDATE_SCREENSHOTS=1` writes the screenshots into `docs/ui/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ui_server::UiServer;
use crate::util::{Project, copy_dir};

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Chromium, node and playwright-core's module folder, or what is missing.
fn browser_tools() -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("RAGD_TEST_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| on_path(&["chromium", "chromium-browser", "google-chrome"]))
        .ok_or("no Chromium (RAGD_TEST_CHROMIUM, or `chromium` on PATH)")?;
    let node = on_path(&["node"]).ok_or("no `node` on PATH")?;
    let playwright = std::env::var_os("RAGD_TEST_PLAYWRIGHT")
        .map(PathBuf::from)
        .map(|dir| dir.join("node_modules/playwright-core"))
        .filter(|dir| dir.is_dir())
        .ok_or("no playwright-core (RAGD_TEST_PLAYWRIGHT: a folder with it in node_modules)")?;
    Ok((chromium, node, playwright))
}

#[test]
#[allow(clippy::print_stderr, reason = "a skipped test says so visibly")]
fn ui_browser_flow_on_the_quickstart_documents() {
    let (chromium, node, playwright) = match browser_tools() {
        Ok(tools) => tools,
        Err(missing) => {
            eprintln!("skipped: the dashboard's browser test needs {missing}");
            return;
        }
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let project = Project::new();
    copy_dir(&repo.join("examples/docs"), &project.path("examples/docs"));
    copy_dir(
        &repo.join("examples/labelled"),
        &project.path("examples/labelled"),
    );
    let good = std::fs::read_to_string(repo.join("examples/train/train.jsonl")).expect("data");
    project.write("tidewater.jsonl", &good);
    project.write(
        "broken.jsonl",
        &format!("{good}{{\"query\": \"where are snapshots\", \"positive_id\": \"x\", \"source_document\": \"a.md\"}}\n"),
    );
    let shots = if std::env::var_os("RAGD_UPDATE_SCREENSHOTS").is_some() {
        repo.join("docs/ui")
    } else {
        project.path("shots")
    };
    std::fs::create_dir_all(&shots).expect("screenshot folder");

    let server = UiServer::start(&project, &[]);
    let output = Command::new(node)
        .arg(repo.join("tests/ui/flow.mjs"))
        .arg(&server.url)
        .arg(project.root())
        .arg(&shots)
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser flow failed\n{stdout}\n{stderr}\n--- dashboard\n{}",
        server.stderr()
    );
    for shot in [
        "overview",
        "datasets-invalid",
        "dataset",
        "wizard-review",
        "run-live",
        "run-cancelled",
        "run-report",
        "models-default",
        "runs",
        "compare",
    ] {
        assert!(
            shots.join(format!("{shot}.png")).is_file(),
            "no screenshot {shot}"
        );
    }
}
