//! Checkpoints of a training run in the stage's journal folder: the weights, AdamW's moments and
//! the step reached (which fixes the sampler's position: batches are a function of seed, epoch
//! and data). Each checkpoint is written to a temporary folder and renamed into place, so a run
//! killed mid-write leaves the previous checkpoint intact; older ones are removed after.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::error::TrainError;
use super::trainer::StepRecord;

const PREFIX: &str = "checkpoint-";
const TENSORS_FILE: &str = "state.safetensors";
const STATE_FILE: &str = "state.json";

/// The JSON side of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Of the settings and data; a checkpoint of anything else is not resumed.
    pub fingerprint: String,
    /// Steps done.
    pub step: u64,
    pub optimizer_steps: u64,
    pub train_seconds: f64,
    pub log: Vec<StepRecord>,
}

/// A checkpoint: its state and tensors (`param.<name>`, `m.<name>`, `v.<name>`).
#[derive(Debug)]
pub struct Snapshot {
    pub state: State,
    pub tensors: HashMap<String, Tensor>,
}

/// A checkpoint read back, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub state: State,
    pub tensors: HashMap<String, Tensor>,
}

/// Writes `snapshot` as the newest checkpoint in `dir` and removes older ones.
pub fn save(dir: &Path, snapshot: &Snapshot) -> Result<(), TrainError> {
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TrainError::Write { path, source }
    };
    fs_err::create_dir_all(dir)?;
    let temporary = dir.join(format!(".{PREFIX}partial"));
    if temporary.exists() {
        fs_err::remove_dir_all(&temporary)?;
    }
    fs_err::create_dir_all(&temporary)?;
    let tensors_path = temporary.join(TENSORS_FILE);
    safetensors::serialize_to_file(
        snapshot.tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        &tensors_path,
    )
    .map_err(|e| TrainError::Checkpoint {
        path: tensors_path.clone(),
        message: e.to_string(),
    })?;
    let state_path = temporary.join(STATE_FILE);
    std::fs::write(&state_path, serde_json::to_vec(&snapshot.state)?)
        .map_err(write_error(&state_path))?;
    let target = dir.join(format!("{PREFIX}{:010}", snapshot.state.step));
    if target.exists() {
        fs_err::remove_dir_all(&target)?;
    }
    fs_err::rename(&temporary, &target)?;
    for (step, path) in list(dir)? {
        if step < snapshot.state.step {
            fs_err::remove_dir_all(path)?;
        }
    }
    Ok(())
}

/// The newest checkpoint in `dir` whose fingerprint is `fingerprint`, loaded on the CPU.
pub fn latest(dir: &Path, fingerprint: &str) -> Result<Option<Loaded>, TrainError> {
    let mut found = list(dir)?;
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    for (_, path) in found {
        let Ok(text) = fs_err::read_to_string(path.join(STATE_FILE)) else {
            continue;
        };
        let state: State = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.fingerprint != fingerprint {
            continue;
        }
        let tensors = candle_core::safetensors::load(path.join(TENSORS_FILE), &Device::Cpu)
            .map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
        return Ok(Some(Loaded {
            path,
            state,
            tensors,
        }));
    }
    Ok(None)
}

/// The checkpoint folders in `dir` with their steps.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}
