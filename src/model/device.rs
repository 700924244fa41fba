//! Which accelerator runs the model.

use serde::{Deserialize, Serialize};

/// The accelerator a recipe asks for. `auto` picks the best device compiled in (cargo features
/// `cuda`, `metal`) and present, else the CPU.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}
