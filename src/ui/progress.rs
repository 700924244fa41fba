//! Where a run stands, folded from its event lines (the [`crate::exec::Event`] JSON that
//! `ragd-pipe run --json` prints): each stage's state and latest progress, notes, and the error.
//! The run page renders it once; the browser then folds the same events as they arrive.

use std::path::Path;

use serde::Serialize;

/// One stage of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct StageProgress {
    pub(crate) stage: String,
    /// `pending`, `cached`, `running`, `done` or `failed`.
    pub(crate) state: String,
    /// The cache key (set from `plan` on), which locates the artifact in the store.
    pub(crate) key: String,
    pub(crate) label: String,
    pub(crate) done: u64,
    pub(crate) total: Option<u64>,
    pub(crate) message: String,
    pub(crate) seconds: Option<f64>,
}

/// A run folded from its events.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RunProgress {
    pub(crate) stages: Vec<StageProgress>,
    pub(crate) notes: Vec<String>,
    /// The first error the run reported (a failed stage's message, a diagnostic).
    pub(crate) error: Option<String>,
    pub(crate) workdir: Option<String>,
    pub(crate) finished: bool,
}

impl RunProgress {
    /// Reads an event file; a missing or partly written file gives what it holds so far.
    pub(crate) fn read(path: &Path) -> Self {
        let text = fs_err::read_to_string(path).unwrap_or_default();
        Self::fold(&text)
    }

    pub(crate) fn fold(text: &str) -> Self {
        let mut progress = Self::default();
        for line in text.lines() {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
                progress.apply(&event);
            }
        }
        progress
    }

    fn stage_mut(&mut self, name: &str) -> &mut StageProgress {
        let index = match self.stages.iter().position(|s| s.stage == name) {
            Some(index) => index,
            None => {
                self.stages.push(StageProgress {
                    stage: name.to_owned(),
                    state: "pending".to_owned(),
                    ..StageProgress::default()
                });
                self.stages.len() - 1
            }
        };
        &mut self.stages[index]
    }

    fn apply(&mut self, event: &serde_json::Value) {
        let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
        let stage = text("stage");
        match event["type"].as_str().unwrap_or_default() {
            "plan" => {
                self.workdir = event["workdir"].as_str().map(str::to_owned);
                for planned in event["stages"].as_array().into_iter().flatten() {
                    let name = planned["stage"].as_str().unwrap_or_default();
                    let key = planned["key"].as_str().unwrap_or_default().to_owned();
                    self.stage_mut(name).key = key;
                }
            }
            "stage-skipped" => {
                let entry = self.stage_mut(&stage);
                entry.state = "cached".to_owned();
                entry.key = text("key");
            }
            "stage-start" => {
                let entry = self.stage_mut(&stage);
                entry.state = "running".to_owned();
                entry.key = text("key");
            }
            "stage-progress" => {
                let entry = self.stage_mut(&stage);
                entry.label = text("label");
                entry.done = event["done"].as_u64().unwrap_or_default();
                entry.total = event["total"].as_u64();
                if let Some(message) = event["message"].as_str() {
                    entry.message = message.to_owned();
                }
            }
            "stage-note" => self.notes.push(format!("{stage}: {}", text("message"))),
            "stage-done" => {
                let entry = self.stage_mut(&stage);
                entry.state = "done".to_owned();
                entry.seconds = event["seconds"].as_f64();
            }
            "stage-failed" => {
                let entry = self.stage_mut(&stage);
                entry.state = "failed".to_owned();
                entry.seconds = event["seconds"].as_f64();
                let message = text("message");
                self.error.get_or_insert(format!("{stage}: {message}"));
            }
            "run-failed" => {
                self.error.get_or_insert(text("message"));
            }
            "diagnostic" => {
                let message = event["diagnostic"]["message"]
                    .as_str()
                    .unwrap_or("the run failed")
                    .to_owned();
                self.error.get_or_insert(message);
            }
            "summary" => self.finished = true,
            _ => {}
        }
    }

    /// The key of `stage` in this run, once planned.
    pub(crate) fn key_of(&self, stage: &str) -> Option<&str> {
        self.stages
            .iter()
            .find(|s| s.stage == stage && !s.key.is_empty())
            .map(|s| s.key.as_str())
    }

    /// The stage running now, or the last one that did something.
    pub(crate) fn current(&self) -> Option<&StageProgress> {
        self.stages
            .iter()
            .rev()
            .find(|s| s.state == "running")
            .or_else(|| self.stages.iter().rev().find(|s| s.state != "pending"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_a_run_that_was_interrupted_in_train() {
        let log = r#"{"type":"plan","recipe":"r.yaml","workdir":"/w","stages":[{"stage":"chunk","key":"k1"},{"stage":"train","key":"k2"}]}
{"type":"stage-skipped","stage":"chunk","key":"k1","reason":"cached"}
{"type":"stage-start","stage":"train","key":"k2","reasons":[],"why":[]}
{"type":"stage-progress","stage":"train","id":1,"label":"training","done":3,"total":10,"message":"loss 1.2","finished":false}
{"type":"stage-failed","stage":"train","key":"k2","seconds":1.5,"message":"interrupted","resumable":true}
{"type":"summary","ran":0,"cached":1,"failed":1,"seconds":2.0}
"#;
        let progress = RunProgress::fold(log);
        let states: Vec<(&str, &str)> = progress
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.state.as_str()))
            .collect();
        assert_eq!(states, [("chunk", "cached"), ("train", "failed")]);
        assert_eq!(progress.stages[1].done, 3);
        assert_eq!(progress.stages[1].total, Some(10));
        assert_eq!(progress.key_of("train"), Some("k2"));
        assert_eq!(progress.error.as_deref(), Some("train: interrupted"));
        assert!(progress.finished);
        assert_eq!(progress.current().map(|s| s.stage.as_str()), Some("train"));
    }
}
