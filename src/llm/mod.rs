//! LLM backends behind one trait, [`LlmBackend`]: `local` (an in-process quantized GGUF model run
//! with candle, JSON output enforced by constrained decoding), `ollama` and `openai` (any
//! OpenAI-compatible server), with several endpoints pooled. [`LlmSettings`] is the recipe block
//! that picks one; [`cache::ResponseCache`] keeps every answer, journaled as it arrives, so an
//! interrupted or changed run never pays for the same call twice.
//!
//! Calls are synchronous: stages run off the async threads, and concurrency comes from
//! [`cache::complete_all`]'s worker threads.

pub mod cache;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod http;
pub mod local;
pub mod pool;
pub mod settings;
pub mod transformer;

use serde::Serialize;

pub use cache::{CallStats, ResponseCache, complete_all};
pub use error::LlmError;
pub use settings::{BackendKind, LlmSettings, SettingProblem};

/// One chat completion: a system message, a user message, and how to sample the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    pub system: Option<String>,
    pub prompt: String,
    /// The answer must be a JSON document valid under this schema (structured output).
    pub json_schema: Option<serde_json::Value>,
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens holding this much probability.
    pub top_p: f64,
    pub seed: u64,
    pub max_tokens: u32,
}

/// A source of completions.
pub trait LlmBackend: Send + Sync {
    /// `local`, `ollama` or `openai`.
    fn name(&self) -> &'static str;
    /// What decides the answers besides the request: the model's digest (and for a pool, every
    /// member's), for cache keys.
    fn identity(&self) -> String;
    /// Calls that may usefully run at once.
    fn concurrency(&self) -> usize;
    /// The answer's text.
    fn complete(&self, request: &Request) -> Result<String, LlmError>;
}
