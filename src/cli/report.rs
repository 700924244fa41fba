//! `ragd-pipe report`: the latest evaluation report of a recipe, printed or opened; and the
//! lines `run` ends with (where the report is, and its verdict).

use std::path::{Path, PathBuf};

use clap::Args;

use super::Failure;
use crate::cache::lock::LockFile;
use crate::cache::store::Store;
use crate::output::Printer;
use crate::recipe::Recipe;
use crate::stages::io::REPORT_FILE;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The recipe whose report to show [default: the recipe in the current folder with the newest
    /// lock file].
    pub recipe: Option<PathBuf>,
    /// Open the HTML report in the default browser instead of printing the Markdown one.
    #[arg(long)]
    pub open: bool,
}

/// The report files of a recipe's latest evaluation.
#[derive(Debug, Clone)]
pub(super) struct ReportFiles {
    dir: PathBuf,
}

impl ReportFiles {
    /// The report of the evaluation the recipe's lock records, when it is in the store.
    pub(super) fn latest(recipe: &Recipe) -> Option<Self> {
        let lock = LockFile::read(&recipe.lock_path()).ok()?;
        let evaluate = lock.stages.get("evaluate")?;
        let dir = Store::at(&recipe.workdir).artifact_dir(&evaluate.key);
        dir.join(REPORT_FILE).is_file().then_some(Self { dir })
    }

    pub(super) fn html(&self) -> PathBuf {
        self.dir.join("report.html")
    }

    pub(super) fn markdown(&self) -> PathBuf {
        self.dir.join("report.md")
    }

    pub(super) fn json(&self) -> PathBuf {
        self.dir.join(REPORT_FILE)
    }

    /// The report's verdict in one line: the evaluation's `verdict` (label, why) when it has one,
    /// else its regression flag.
    pub(super) fn verdict_line(&self) -> String {
        let report: serde_json::Value = fs_err::read_to_string(self.json())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        verdict_line(&report)
    }

    /// What `run` ends with: where the report is, and its verdict.
    pub(super) fn print_end(&self, printer: &Printer) {
        if printer.json {
            printer.json_line(&serde_json::json!({
                "type": "report",
                "html": self.html(),
                "markdown": self.markdown(),
                "json": self.json(),
                "verdict": self.verdict_line(),
            }));
            return;
        }
        printer.status(&format!(
            "report: {} (also report.md, report.json; `ragd-pipe report --open` opens it)\n{}",
            shown(&self.html()).display(),
            self.verdict_line()
        ));
    }
}

/// `verdict: better — why` from a report's `verdict`, or what its regression flag says.
pub(super) fn verdict_line(report: &serde_json::Value) -> String {
    let verdict = &report["verdict"];
    if let Some(label) = verdict["label"].as_str() {
        let mut line = format!("verdict: {label}");
        for part in [&verdict["why"], &verdict["next"]] {
            if let Some(text) = part.as_str().filter(|t| !t.is_empty()) {
                line.push_str(" — ");
                line.push_str(text);
            }
        }
        return line;
    }
    let fine_tuned = report["datasets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["systems"].as_array().into_iter().flatten())
        .any(|s| s["kind"] == "fine-tuned");
    if !fine_tuned && report["datasets"].is_array() {
        return "verdict: — no fine-tuned model to judge: the base model was scored alone"
            .to_owned();
    }
    match report["regression"].as_bool() {
        Some(true) => format!(
            "verdict: worse — the fine-tuned model is worse than the base model beyond noise ({})",
            report["regressions"]
                .as_array()
                .and_then(|r| r.first())
                .and_then(|r| r.as_str())
                .unwrap_or("see the report")
        ),
        Some(false) => {
            "verdict: no regression — the fine-tuned model is not worse than the base model beyond noise".to_owned()
        }
        None => "verdict: —".to_owned(),
    }
}

/// A path relative to the current folder when it is under it, for shorter lines.
fn shown(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}

pub(super) fn execute(args: &ReportArgs, printer: &Printer) -> Result<(), Failure> {
    let path = match &args.recipe {
        Some(path) => path.clone(),
        None => newest_locked_recipe(Path::new("."))?,
    };
    let recipe = Recipe::load(&path, &[]).map_err(|e| Failure::new(e, 1))?;
    let Some(files) = ReportFiles::latest(&recipe) else {
        return Err(Failure::report(
            miette::miette!(
                help = format!(
                    "run `ragd-pipe run {}` first (its evaluate stage writes the report)",
                    path.display()
                ),
                "`{}` has no evaluation report yet",
                path.display()
            ),
            1,
        ));
    };
    if printer.json {
        files.print_end(printer);
        return Ok(());
    }
    if args.open {
        open(&files.html())?;
        printer.status(&format!("opened {}", files.html().display()));
        printer.status(&files.verdict_line());
        return Ok(());
    }
    let markdown = fs_err::read_to_string(files.markdown())
        .map_err(|e| Failure::report(miette::miette!("{e}"), 2))?;
    printer.result(&markdown);
    printer.status(&format!("report: {}", files.html().display()));
    Ok(())
}

/// The recipe (`*.yaml`, `*.yml`) in `dir` whose lock file was written last.
fn newest_locked_recipe(dir: &Path) -> Result<PathBuf, Failure> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs_err::read_dir(dir)
        .map_err(|e| Failure::report(miette::miette!("{e}"), 2))?
        .flatten()
    {
        let path = entry.path();
        let is_recipe = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let written = fs_err::metadata(path.with_extension("lock")).and_then(|m| m.modified());
        if let (true, Ok(written)) = (is_recipe, written)
            && newest.as_ref().is_none_or(|(t, _)| written > *t)
        {
            newest = Some((
                written,
                path.strip_prefix(".").unwrap_or(&path).to_path_buf(),
            ));
        }
    }
    newest.map(|(_, path)| path).ok_or_else(|| {
        Failure::report(
            miette::miette!(
                help = "name the recipe: `ragd-pipe report RECIPE`",
                "no recipe with a lock file in the current folder"
            ),
            1,
        )
    })
}

/// Opens a file with the desktop's default application.
fn open(path: &Path) -> Result<(), Failure> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(path)
        .status()
        .map_err(|e| e.to_string())
        .and_then(|status| {
            status
                .success()
                .then_some(())
                .ok_or_else(|| format!("it exited with {status}"))
        })
        .map_err(|why| {
            Failure::report(
                miette::miette!(
                    help = format!("open `{}` in a browser yourself", path.display()),
                    "cannot open the report with `{opener}`: {why}"
                ),
                2,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_verdict_line_reads_the_verdict_else_the_regression_flag() {
        let with_verdict = json!({
            "regression": false,
            "verdict": {"label": "better", "why": "nDCG@10 rose by 0.04", "next": "use it"}
        });
        assert_eq!(
            verdict_line(&with_verdict),
            "verdict: better — nDCG@10 rose by 0.04 — use it"
        );
        assert!(verdict_line(&json!({"regression": false})).contains("no regression"));
        let base_only = json!({"regression": false, "datasets": [{"systems": [{"kind": "base"}]}]});
        assert!(verdict_line(&base_only).contains("scored alone"));
        assert!(
            verdict_line(&json!({"regression": true, "regressions": ["held-out: worse"]}))
                .ends_with("(held-out: worse)")
        );
        assert_eq!(verdict_line(&json!({})), "verdict: —");
    }
}
