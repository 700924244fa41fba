//! The training curve the report plots, read from the train stage's step log.

use std::path::Path;

use fs_err as fs;
use serde::{Deserialize, Serialize};

use super::EvalError;

/// One optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainPoint {
    pub step: u64,
    pub loss: f64,
    /// Learning rate at this step.
    pub lr: f64,
}

/// Loss and learning rate over the training steps, in log order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingCurve {
    pub points: Vec<TrainPoint>,
}

impl TrainingCurve {
    /// Reads a train log: JSON Lines, one object per step with at least `step`, `loss` and `lr`
    /// (other fields, such as the epoch or gradient norm, are ignored). Blank lines are skipped.
    pub fn from_jsonl(path: &Path) -> Result<Self, EvalError> {
        let text = fs::read_to_string(path).map_err(|source| EvalError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_jsonl(&text, path)
    }

    /// [`from_jsonl`](Self::from_jsonl) on text already read; `path` names it in errors.
    pub fn parse_jsonl(text: &str, path: &Path) -> Result<Self, EvalError> {
        let points = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                let bad_line = |message: String| EvalError::BadLine {
                    path: path.to_owned(),
                    line: index + 1,
                    message,
                };
                let point: TrainPoint =
                    serde_json::from_str(line).map_err(|error| bad_line(error.to_string()))?;
                if !point.loss.is_finite() || !point.lr.is_finite() {
                    return Err(bad_line(
                        "`loss` and `lr` must be finite numbers".to_owned(),
                    ));
                }
                Ok(point)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { points })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_steps_and_ignores_other_fields() {
        let log = "{\"step\": 1, \"loss\": 2.5, \"lr\": 1e-5, \"epoch\": 0}\n\n\
                   {\"step\": 2, \"loss\": 2.25, \"lr\": 2e-5, \"grad_norm\": 3.1}\n";
        let curve = TrainingCurve::parse_jsonl(log, Path::new("train.jsonl")).expect("valid log");
        assert_eq!(
            curve.points,
            [
                TrainPoint {
                    step: 1,
                    loss: 2.5,
                    lr: 1e-5
                },
                TrainPoint {
                    step: 2,
                    loss: 2.25,
                    lr: 2e-5
                },
            ]
        );
    }

    #[test]
    fn names_the_line_that_is_wrong() {
        let log = "{\"step\": 1, \"loss\": 2.5, \"lr\": 1e-5}\n{\"step\": 2, \"lr\": 2e-5}\n";
        let error = TrainingCurve::parse_jsonl(log, Path::new("train.jsonl"))
            .expect_err("a step without loss");
        assert!(
            error
                .to_string()
                .starts_with("`train.jsonl` line 2: missing field `loss`"),
            "{error}"
        );
        let error = TrainingCurve::from_jsonl(Path::new("/nonexistent/train.jsonl"))
            .expect_err("a missing file");
        assert_eq!(error.to_string(), "I/O error on `/nonexistent/train.jsonl`");
    }
}
