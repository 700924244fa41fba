//! The server backends: Ollama's `/api/chat` and the OpenAI-compatible `/v1/chat/completions`,
//! with JSON-schema structured output, a timeout per call, and retries with exponential backoff
//! for what may pass (connection refused, timeouts, 5xx, 429).

use std::time::Duration;

use serde_json::{Value, json};

use super::settings::BackendKind;
use super::{LlmBackend, LlmError, Request};

/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How to talk to a server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub model: String,
    pub timeout: Duration,
    pub max_retries: u32,
    /// The wait before the first retry; it doubles with each one.
    pub first_backoff: Duration,
    pub api_key: Option<String>,
}

/// One Ollama or OpenAI-compatible server serving one model.
pub struct HttpBackend {
    kind: BackendKind,
    url: String,
    options: HttpOptions,
    client: reqwest::blocking::Client,
    identity: String,
}

impl HttpBackend {
    /// Connects to `url` and checks it serves the model, whose digest (Ollama) or listing
    /// (OpenAI, which has no digests) becomes the identity.
    pub fn connect(kind: BackendKind, url: &str, options: &HttpOptions) -> Result<Self, LlmError> {
        let client = reqwest::blocking::Client::builder()
            .timeout(options.timeout)
            .build()
            .map_err(|e| http_error(url, &e))?;
        let mut backend = Self {
            kind,
            url: url.trim_end_matches('/').to_owned(),
            options: options.clone(),
            client,
            identity: String::new(),
        };
        backend.identity = backend.with_retries(|b| b.model_identity())?;
        Ok(backend)
    }

    fn model_identity(&self) -> Result<String, LlmError> {
        let model = &self.options.model;
        match self.kind {
            BackendKind::Ollama => {
                let tags = self.get("/api/tags")?;
                let models = tags["models"].as_array().cloned().unwrap_or_default();
                let wanted = |name: &str| name == model || name == format!("{model}:latest");
                let found = models.iter().find(|m| {
                    m["name"].as_str().is_some_and(wanted)
                        || m["model"].as_str().is_some_and(wanted)
                });
                match found.and_then(|m| m["digest"].as_str()) {
                    Some(digest) => Ok(format!("ollama {model} sha256:{digest}")),
                    None => Err(self.unknown_model(&models, "name")),
                }
            }
            BackendKind::Openai | BackendKind::Local => {
                let listing = self.get("/v1/models")?;
                let models = listing["data"].as_array().cloned().unwrap_or_default();
                match models.iter().find(|m| m["id"].as_str() == Some(model)) {
                    // No digest in this API: the listing entry (id, owner, creation time) is
                    // the most a client can see of which weights answer.
                    Some(entry) => Ok(format!("openai {entry}")),
                    None if models.is_empty() => Ok(format!("openai {model}")),
                    None => Err(self.unknown_model(&models, "id")),
                }
            }
        }
    }

    fn unknown_model(&self, models: &[Value], key: &str) -> LlmError {
        let available: Vec<&str> = models.iter().filter_map(|m| m[key].as_str()).collect();
        LlmError::UnknownModel {
            url: self.url.clone(),
            model: self.options.model.clone(),
            available: if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(", ")
            },
        }
    }

    fn with_retries<T>(&self, call: impl Fn(&Self) -> Result<T, LlmError>) -> Result<T, LlmError> {
        let mut attempt = 0;
        loop {
            match call(self) {
                Err(error) if error.is_transient() && attempt < self.options.max_retries => {
                    let backoff = self
                        .options
                        .first_backoff
                        .saturating_mul(1 << attempt.min(16))
                        .min(MAX_BACKOFF);
                    std::thread::sleep(backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn get(&self, path: &str) -> Result<Value, LlmError> {
        let url = format!("{}{path}", self.url);
        let mut request = self.client.get(&url);
        if let Some(key) = &self.options.api_key {
            request = request.bearer_auth(key);
        }
        read_json(&url, request.send())
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, LlmError> {
        let url = format!("{}{path}", self.url);
        let mut request = self.client.post(&url).json(body);
        if let Some(key) = &self.options.api_key {
            request = request.bearer_auth(key);
        }
        read_json(&url, request.send())
    }

    fn chat_once(&self, request: &Request) -> Result<String, LlmError> {
        let mut messages = Vec::new();
        if let Some(system) = &request.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": request.prompt}));
        let (path, body, pointer) = match self.kind {
            BackendKind::Ollama => {
                let mut body = json!({
                    "model": self.options.model,
                    "messages": messages,
                    "stream": false,
                    "options": {
                        "temperature": request.temperature,
                        "top_p": request.top_p,
                        "seed": request.seed,
                        "num_predict": request.max_tokens,
                    },
                });
                if let Some(schema) = &request.json_schema {
                    body["format"] = schema.clone();
                }
                ("/api/chat", body, "/message/content")
            }
            BackendKind::Openai | BackendKind::Local => {
                let mut body = json!({
                    "model": self.options.model,
                    "messages": messages,
                    "temperature": request.temperature,
                    "top_p": request.top_p,
                    "seed": request.seed,
                    "max_tokens": request.max_tokens,
                });
                if let Some(schema) = &request.json_schema {
                    body["response_format"] = json!({
                        "type": "json_schema",
                        "json_schema": {"name": "answer", "strict": true, "schema": schema},
                    });
                }
                ("/v1/chat/completions", body, "/choices/0/message/content")
            }
        };
        let answer = self.post(path, &body)?;
        answer
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| LlmError::Protocol {
                url: format!("{}{path}", self.url),
                message: format!("no `{pointer}` in the answer"),
            })
    }
}

fn http_error(url: &str, error: &reqwest::Error) -> LlmError {
    // reqwest's Display omits the cause ("error sending request"); the root cause says why.
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    if error.is_timeout() {
        message = format!("timed out ({message})");
    }
    LlmError::Http {
        url: url.to_owned(),
        message,
    }
}

fn read_json(
    url: &str,
    sent: reqwest::Result<reqwest::blocking::Response>,
) -> Result<Value, LlmError> {
    let response = sent.map_err(|e| http_error(url, &e))?;
    let status = response.status();
    let text = response.text().map_err(|e| http_error(url, &e))?;
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(LlmError::Http {
            url: url.to_owned(),
            message: format!("{status}: {}", text.trim()),
        });
    }
    if !status.is_success() {
        return Err(LlmError::Protocol {
            url: url.to_owned(),
            message: format!("{status}: {}", text.trim()),
        });
    }
    serde_json::from_str(&text).map_err(|e| LlmError::Protocol {
        url: url.to_owned(),
        message: format!("not JSON ({e})"),
    })
}

impl LlmBackend for HttpBackend {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn concurrency(&self) -> usize {
        1
    }

    fn complete(&self, request: &Request) -> Result<String, LlmError> {
        self.with_retries(|b| b.chat_once(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(model: &str, timeout: Duration, max_retries: u32) -> HttpOptions {
        HttpOptions {
            model: model.to_owned(),
            timeout,
            max_retries,
            first_backoff: Duration::from_millis(10),
            api_key: None,
        }
    }

    #[test]
    fn a_server_that_is_down_is_a_clear_error_after_retries() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        let error = HttpBackend::connect(
            BackendKind::Ollama,
            &url,
            &options("smollm2:135m", Duration::from_secs(2), 2),
        )
        .err()
        .expect("nothing answers");
        assert!(matches!(error, LlmError::Http { .. }), "{error}");
        assert!(error.to_string().contains(&url), "{error}");
        // Two retries waited 10 ms and 20 ms.
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        // Accepts connections (the backlog) but never reads or writes.
        let error = HttpBackend::connect(
            BackendKind::Openai,
            &url,
            &options("m", Duration::from_millis(300), 0),
        )
        .err()
        .expect("times out");
        assert!(error.to_string().contains("timed out"), "{error}");
        drop(listener);
    }

    /// Against a real Ollama serving `smollm2:135m` (`../shared/tools/start-ollama.sh` starts
    /// one); skipped with a message when `RAGD_TEST_OLLAMA_URL` is not set.
    #[test]
    #[allow(clippy::print_stderr, reason = "a skipped test says so visibly")]
    fn ollama_answers_structured_json() {
        let Ok(url) = std::env::var("RAGD_TEST_OLLAMA_URL") else {
            eprintln!("skipped: RAGD_TEST_OLLAMA_URL not set");
            return;
        };
        let backend = HttpBackend::connect(
            BackendKind::Ollama,
            &url,
            &options("smollm2:135m", Duration::from_secs(120), 1),
        )
        .expect("the server has smollm2:135m");
        assert!(
            backend.identity().contains("sha256:"),
            "{}",
            backend.identity()
        );
        let unknown = HttpBackend::connect(
            BackendKind::Ollama,
            &url,
            &options("no-such-model:1b", Duration::from_secs(10), 0),
        );
        assert!(matches!(unknown, Err(LlmError::UnknownModel { .. })));
        let request = Request {
            system: Some("You check search queries against a passage.".to_owned()),
            prompt: "Passage: Snapshots are kept for thirty days.\nQuestion: How long are snapshots kept?\nCan the passage answer the question? Answer in JSON.".to_owned(),
            json_schema: Some(serde_json::json!({
                "type": "object",
                "properties": {"answerable": {"type": "boolean"}, "reason": {"type": "string"}},
                "required": ["answerable", "reason"]
            })),
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            max_tokens: 64,
        };
        let answer = backend.complete(&request).expect("answers");
        let parsed: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert!(parsed["answerable"].is_boolean(), "{answer}");
    }
}
