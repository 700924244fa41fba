//! The pipeline's side of the LLM engine: what the `llm:` blocks of query-gen and the judge
//! need from a stage (the model resolved for the cache key, the backend opened, answers through
//! the workdir's response cache under a progress bar) and LLM errors as stage errors.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::{External, Invalid, StageContext, StageEnv, StageError};
use crate::llm::{self, BackendKind, LlmBackend, LlmError, LlmSettings, ResponseCache};
use crate::model::hub::WantedFile;

/// Where LLM answers are cached, under the workdir's shared folder (it outlives stage keys).
pub const RESPONSES_FILE: &str = "llm/responses.jsonl";

/// A GGUF reference names one file; nothing else is fetched with it.
const NO_FILES: &[WantedFile] = &[];

/// An LLM failure as a stage reports it: an interruption stays one, anything else keeps its
/// causes.
pub fn stage_error(error: LlmError) -> StageError {
    match error {
        LlmError::Cancelled => StageError::Cancelled,
        other => StageError::engine(other),
    }
}

/// The block's bad values as a section's, the block being at `at` in it.
pub fn check(settings: &LlmSettings, at: &[&str]) -> Vec<Invalid> {
    settings
        .check()
        .into_iter()
        .map(|problem| {
            let path: Vec<&str> = at
                .iter()
                .copied()
                .chain(problem.path.iter().map(String::as_str))
                .collect();
            let invalid = Invalid::new(&path, problem.message);
            match problem.help {
                Some(help) => invalid.with_help(help),
                None => invalid,
            }
        })
        .collect()
}

/// What the stage's cache key must see of the model: the GGUF file's bytes, or the served
/// model's digest.
pub fn external(settings: &LlmSettings, env: &StageEnv) -> Result<External, StageError> {
    match settings.backend {
        BackendKind::Local => {
            let reference = settings.local_reference();
            let path = env.resolve_model(reference, NO_FILES)?;
            Ok(External::Model {
                label: "llm".to_owned(),
                reference: reference.to_owned(),
                path,
            })
        }
        BackendKind::Ollama | BackendKind::Openai => Ok(External::Identity {
            label: format!("llm ({})", settings.backend.name()),
            value: settings.connect_http().map_err(stage_error)?.identity(),
        }),
    }
}

/// Opens the backend: loads the local model, or checks every server has the model. A local
/// model stops writing as soon as `cancel` is set.
pub fn connect(
    settings: &LlmSettings,
    env: &StageEnv,
    cancel: &Arc<AtomicBool>,
) -> Result<Box<dyn LlmBackend>, StageError> {
    match settings.backend {
        BackendKind::Local => {
            let path = env.resolve_model(settings.local_reference(), NO_FILES)?;
            let backend = settings.open_local(&path, cancel).map_err(stage_error)?;
            Ok(Box::new(backend))
        }
        BackendKind::Ollama | BackendKind::Openai => {
            Ok(Box::new(settings.connect_http().map_err(stage_error)?))
        }
    }
}

/// Answers `requests` through the workdir's response cache (journaled as answers arrive), with a
/// progress bar labelled `label` that shows calls per second.
pub fn complete_with_progress(
    ctx: &StageContext,
    label: &str,
    backend: &dyn LlmBackend,
    requests: &[llm::Request],
) -> Result<(Vec<String>, llm::CallStats), StageError> {
    let cache = ResponseCache::open(&ctx.shared_dir.join(RESPONSES_FILE)).map_err(stage_error)?;
    let bar = ctx.progress(label, Some(requests.len() as u64));
    let cancel: &AtomicBool = &ctx.cancel;
    llm::complete_all(backend, &cache, requests, cancel, &|calls| {
        bar.set_with_message(
            (calls.cached + calls.calls) as u64,
            &format!("{:.2} calls/s", calls.calls_per_second()),
        );
    })
    .map_err(stage_error)
}
