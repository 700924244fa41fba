//! Ollama as a home of embedding models: create a model there from our GGUF, check that what it
//! serves embeds like our encoder, and find the GGUF of a model it holds so we can fine-tune it.
//!
//! Embedding and `show` go through the `ollama-rs` crate. Two operations do not, for defects
//! measured against Ollama 0.5.4 (the server of the development machines):
//!
//! - **create**: `ollama-rs` 0.3.6 sends only the `files` field of Ollama ≥ 0.5.5's create API,
//!   which 0.5.4 answers with "path or Modelfile are required", and it has no call to upload a
//!   blob (`POST /api/blobs/:digest`). We upload the GGUF as a blob and send both forms in one
//!   request (`modelfile: "FROM @sha256:…"` for older servers, `files` for newer ones; each
//!   ignores the other's field).
//! - **digest**: `ollama-rs`'s `LocalModel` (from `/api/tags`) and `ModelInfo` (from `/api/show`)
//!   drop the `digest` field, which identifies the manifest a name points at; we read
//!   `/api/tags` ourselves.
//!
//! Ollama keeps a model as a manifest (`<store>/manifests/<host>/<namespace>/<name>/<tag>`, JSON
//! listing layers by digest) and blobs (`<store>/blobs/sha256-<hex>`); the GGUF is the layer of
//! media type `application/vnd.ollama.image.model`. The API has no call to download a blob, so
//! [`OllamaServer::model_gguf`] reads the store on disk (`OLLAMA_MODELS`, else
//! `~/.ollama/models`) and checks that the manifest there is the one the server reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ollama_rs::generation::embeddings::request::GenerateEmbeddingsRequest;
use ollama_rs::models::ModelOptions;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::model::encoder::SentenceEncoder;
use crate::model::error::OllamaError;
use crate::model::hub::block_on;

/// Where Ollama listens unless `OLLAMA_HOST` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:11434";

const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";

/// Texts embedded by our encoder and by the server to check that they agree: a word and
/// sentences, prose and code, accents, CJK, an unknown-word-heavy line.
///
/// Each is under 32 tokens: the Ollama of the development machines (Intel's ipex-llm build of
/// 0.5.4, on a CPU) crashes its runner on any BERT input of 32 tokens or more — our f16 and f32
/// files alike, and the same file rewritten by gguf-py — while llama.cpp itself (the
/// node-llama-cpp test, which adds a longer text) embeds them like our encoder.
pub const PROBE_TEXTS: [&str; 10] = [
    "How do I restore a snapshot?",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Snapshots are copy-on-write: restoring one rolls the volume back to the moment it was taken.",
    "fn main() { println!(\"{}\", 2 + 2); }",
    "Café, naïve, résumé — déjà vu.",
    "東京は日本の首都です。",
    "ERROR 0x80070005: access denied while mounting /dev/sdb1",
    "What is the difference between a list and a tuple in Python?",
    "Zanzibarian flibbertigibbets quizzically juxtapose xylophones.",
];

/// An Ollama server.
pub struct OllamaServer {
    url: String,
    api: ollama_rs::Ollama,
    http: reqwest::Client,
}

impl std::fmt::Debug for OllamaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OllamaServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// One line of `/api/tags`.
#[derive(Debug, Deserialize)]
struct Tag {
    name: String,
    #[serde(default)]
    model: Option<String>,
    digest: String,
}

#[derive(Debug, Deserialize)]
struct Tags {
    models: Vec<Tag>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

/// How one probe text came out on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeComparison {
    pub text: String,
    /// Cosine similarity of the server's embedding and ours.
    pub cosine: f64,
}

/// The probe comparison of a served model against our encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedCheck {
    pub model: String,
    pub url: String,
    pub probes: Vec<ProbeComparison>,
    pub min_cosine: f64,
    pub mean_cosine: f64,
}

/// Ollama's full name of a model: `name` gets the tag `latest` unless it has one.
pub fn full_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

impl OllamaServer {
    /// A server at `url` (`http://host:port`; a bare `host:port` gets `http://`).
    pub fn new(url: &str) -> Result<Self, OllamaError> {
        let url = if url.contains("://") {
            url.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", url.trim_end_matches('/'))
        };
        let bad = |message: String| OllamaError::BadUrl {
            url: url.clone(),
            message,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let api = ollama_rs::Ollama::try_new(url.as_str()).map_err(|e| bad(e.to_string()))?;
        Ok(Self { url, api, http })
    }

    /// The server `OLLAMA_HOST` names (as Ollama's own CLI reads it), else [`DEFAULT_URL`].
    pub fn from_env() -> Result<Self, OllamaError> {
        match std::env::var("OLLAMA_HOST").ok().filter(|h| !h.is_empty()) {
            Some(host) => Self::new(&host),
            None => Self::new(DEFAULT_URL),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> OllamaError {
        OllamaError::Unreachable {
            url: self.url.clone(),
            message: error.to_string(),
        }
    }

    fn refused(&self, what: &str, message: impl Into<String>) -> OllamaError {
        OllamaError::Refused {
            url: self.url.clone(),
            what: what.to_owned(),
            message: message.into(),
        }
    }

    /// Creates (or replaces) the model `name` from the GGUF file `gguf`, with `num_ctx` as its
    /// context (Ollama's default of 2048 is past a BERT's positions). Returns the digest of the
    /// blob, `sha256:<hex>`.
    pub fn create_from_gguf(
        &self,
        name: &str,
        gguf: &Path,
        num_ctx: usize,
    ) -> Result<String, OllamaError> {
        let bytes = fs_err::read(gguf)?;
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&bytes));
        block_on(async {
            let blob_url = format!("{}/api/blobs/{digest}", self.url);
            let head = self
                .http
                .head(&blob_url)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            if !head.status().is_success() {
                let upload = self
                    .http
                    .post(&blob_url)
                    .body(bytes)
                    .send()
                    .await
                    .map_err(|e| self.unreachable(e))?;
                if !upload.status().is_success() {
                    let text = upload.text().await.unwrap_or_default();
                    return Err(self.refused("the upload of the GGUF blob", text));
                }
            }
            let request = serde_json::json!({
                "model": name,
                "modelfile": format!("FROM @{digest}\nPARAMETER num_ctx {num_ctx}\n"),
                "files": {"model.gguf": digest},
                "parameters": {"num_ctx": num_ctx},
                "stream": false,
            });
            let response = self
                .http
                .post(format!("{}/api/create", self.url))
                .json(&request)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| self.unreachable(e))?;
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if !status.is_success() || reply["status"] != "success" {
                let message = reply["error"].as_str().map_or(text.clone(), str::to_owned);
                return Err(self.refused(&format!("to create `{name}`"), message));
            }
            Ok(digest.clone())
        })
    }

    /// The digest (sha256 of its manifest) of the model `name`, as `/api/tags` lists it.
    pub fn model_digest(&self, name: &str) -> Result<String, OllamaError> {
        let wanted = full_name(name);
        let tags: Tags = block_on(async {
            let response = self
                .http
                .get(format!("{}/api/tags", self.url))
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let text = response.text().await.map_err(|e| self.unreachable(e))?;
            serde_json::from_str(&text)
                .map_err(|e| self.refused("to list its models", e.to_string()))
        })?;
        tags.models
            .into_iter()
            .find(|tag| tag.name == wanted || tag.model.as_deref() == Some(wanted.as_str()))
            .map(|tag| tag.digest)
            .ok_or_else(|| OllamaError::NoSuchModel {
                name: name.to_owned(),
                url: self.url.clone(),
            })
    }

    /// The `model_info` of `/api/show` (`general.architecture`, `bert.context_length`, …).
    pub fn model_info(
        &self,
        name: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, OllamaError> {
        block_on(self.api.show_model_info(name.to_owned()))
            .map(|info| info.model_info)
            .map_err(|e| self.refused(&format!("to show `{name}`"), e.to_string()))
    }

    /// Embeddings of `texts` by the model `name`, truncated at `num_ctx` tokens.
    pub fn embed(
        &self,
        name: &str,
        texts: &[&str],
        num_ctx: usize,
    ) -> Result<Vec<Vec<f32>>, OllamaError> {
        let input: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        let request = GenerateEmbeddingsRequest::new(name.to_owned(), input.into())
            .options(ModelOptions::default().num_ctx(num_ctx as u64));
        let response = block_on(self.api.generate_embeddings(request))
            .map_err(|e| self.refused(&format!("to embed with `{name}`"), error_text(&e)))?;
        if response.embeddings.len() != texts.len() {
            return Err(self.refused(
                &format!("to embed with `{name}`"),
                format!(
                    "{} embeddings for {} texts",
                    response.embeddings.len(),
                    texts.len()
                ),
            ));
        }
        Ok(response.embeddings)
    }

    /// Removes the model `name` (Ollama keeps blobs other models share).
    pub fn delete(&self, name: &str) -> Result<(), OllamaError> {
        block_on(self.api.delete_model(name.to_owned()))
            .map_err(|e| self.refused(&format!("to delete `{name}`"), error_text(&e)))
    }

    /// The GGUF file of the model `name` in the server's model store `store`, after checking that
    /// the manifest there is the one the server serves under that name.
    pub fn model_gguf(&self, name: &str, store: &Path) -> Result<PathBuf, OllamaError> {
        let digest = self.model_digest(name)?;
        let not_in_store = |why: String| OllamaError::NotInStore {
            name: name.to_owned(),
            store: store.to_owned(),
            why,
        };
        let manifest_path = manifest_path(store, name);
        let manifest_bytes =
            fs_err::read(&manifest_path).map_err(|e| not_in_store(format!("its manifest: {e}")))?;
        let on_disk = format!("{:x}", sha2::Sha256::digest(&manifest_bytes));
        if on_disk != digest.trim_start_matches("sha256:") {
            return Err(not_in_store(format!(
                "the manifest `{}` (sha256 {on_disk}) is not the one the server serves ({digest}): is this the server's store?",
                manifest_path.display()
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| not_in_store(format!("`{}`: {e}", manifest_path.display())))?;
        let layer = manifest
            .layers
            .iter()
            .find(|layer| layer.media_type == MODEL_MEDIA_TYPE)
            .ok_or_else(|| not_in_store("the manifest has no GGUF layer".to_owned()))?;
        let blob = store.join("blobs").join(layer.digest.replace(':', "-"));
        if blob.is_file() {
            Ok(blob)
        } else {
            Err(not_in_store(format!(
                "its blob `{}` is missing",
                blob.display()
            )))
        }
    }

    /// Creates the model `name` from `gguf` (exported from the sentence-transformers folder
    /// `model_dir`), then compares what the server embeds with our encoder of `model_dir`.
    pub fn publish(
        &self,
        name: &str,
        gguf: &Path,
        model_dir: &Path,
    ) -> Result<ServedCheck, OllamaError> {
        let encoder = SentenceEncoder::load(model_dir, &candle_core::Device::Cpu)
            .map_err(|e| OllamaError::Encoder(Box::new(e)))?;
        let num_ctx = encoder.bert().config().max_position_embeddings;
        self.create_from_gguf(name, gguf, num_ctx)?;
        self.compare(name, &encoder, num_ctx)
    }

    /// Embeds [`PROBE_TEXTS`] with the served model `name` and with `encoder`, and compares them
    /// text by text.
    pub fn compare(
        &self,
        name: &str,
        encoder: &SentenceEncoder,
        num_ctx: usize,
    ) -> Result<ServedCheck, OllamaError> {
        let served = self.embed(name, &PROBE_TEXTS, num_ctx)?;
        let ours = encoder
            .encode(&PROBE_TEXTS, PROBE_TEXTS.len(), &mut |_| {})
            .map_err(|e| OllamaError::Encoder(Box::new(e)))?;
        let probes: Vec<ProbeComparison> = PROBE_TEXTS
            .iter()
            .zip(&served)
            .enumerate()
            .map(|(i, (text, theirs))| ProbeComparison {
                text: (*text).to_owned(),
                cosine: cosine(theirs, ours.row(i)),
            })
            .collect();
        // NaN (a length mismatch) must fail a threshold, so it wins here, unlike `f64::min`.
        let min_cosine = probes
            .iter()
            .map(|p| p.cosine)
            .fold(f64::INFINITY, |min, c| {
                if min.is_nan() || c.is_nan() {
                    f64::NAN
                } else {
                    min.min(c)
                }
            });
        let mean_cosine = probes.iter().map(|p| p.cosine).sum::<f64>() / probes.len() as f64;
        Ok(ServedCheck {
            model: name.to_owned(),
            url: self.url.clone(),
            probes,
            min_cosine,
            mean_cosine,
        })
    }
}

/// The message of an `ollama-rs` error, with the server's own text where it sent one.
fn error_text(error: &ollama_rs::error::OllamaError) -> String {
    match error {
        ollama_rs::error::OllamaError::Other(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Where Ollama keeps the manifest of `name` (`[host/][namespace/]model[:tag]`).
fn manifest_path(store: &Path, name: &str) -> PathBuf {
    let full = full_name(name);
    let (path, tag) = full.rsplit_once(':').unwrap_or((full.as_str(), "latest"));
    let parts: Vec<&str> = path.split('/').collect();
    let (host, namespace, model) = match parts.as_slice() {
        [model] => ("registry.ollama.ai", "library", *model),
        [namespace, model] => ("registry.ollama.ai", *namespace, *model),
        [host, namespace, model, ..] => (*host, *namespace, *model),
        [] => ("registry.ollama.ai", "library", ""),
    };
    store
        .join("manifests")
        .join(host)
        .join(namespace)
        .join(model)
        .join(tag)
}

/// Ollama's model store: `OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn default_store() -> PathBuf {
    match std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::home_dir()
            .unwrap_or_default()
            .join(".ollama/models"),
    }
}

/// The cosine similarity of two vectors; NaN when their lengths differ.
pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{GgufType, export_bert};
    use crate::model::hub::{self, ModelRef, SENTENCE_TRANSFORMER_FILES};
    use crate::testutil::minilm_dir;

    /// An Ollama server in `embed` mode (`.ci/run` starts one where `../shared/tools` exists) and
    /// its model store: `RAGD_TEST_OLLAMA_EMBED_URL`, `RAGD_TEST_OLLAMA_EMBED_STORE`.
    #[allow(clippy::print_stderr, reason = "a skipped test says so visibly")]
    fn embed_server(test: &str) -> Option<(OllamaServer, PathBuf)> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let (Some(url), Some(store)) = (
            env("RAGD_TEST_OLLAMA_EMBED_URL"),
            env("RAGD_TEST_OLLAMA_EMBED_STORE"),
        ) else {
            eprintln!(
                "skipped {test}: RAGD_TEST_OLLAMA_EMBED_URL and RAGD_TEST_OLLAMA_EMBED_STORE are not set"
            );
            return None;
        };
        Some((
            OllamaServer::new(&url).expect("a URL"),
            PathBuf::from(store),
        ))
    }

    /// Issue 13: our GGUF export of all-MiniLM-L6-v2, created in a real Ollama, embeds the probe
    /// texts like our encoder: cosine >= 0.99 for each at f16 (and at q8_0, whose figures the
    /// test prints).
    #[test]
    #[allow(clippy::print_stderr, reason = "the figures are the point of the test")]
    fn ollama_serves_our_gguf_like_our_encoder() {
        let Some((server, _)) = embed_server("ollama_serves_our_gguf_like_our_encoder") else {
            return;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        for gguf_type in [GgufType::F16, GgufType::Q8_0] {
            let path = dir.path().join(format!("minilm-{gguf_type}.gguf"));
            export_bert(&minilm_dir(), &path, gguf_type, "minilm").expect("exports");
            let name = format!("ragd-test-minilm-{gguf_type}");
            let check = server
                .publish(&name, &path, &minilm_dir())
                .expect("Ollama creates and embeds");
            eprintln!(
                "{gguf_type}: cosine min {:.6}, mean {:.6}",
                check.min_cosine, check.mean_cosine
            );
            for probe in &check.probes {
                assert!(
                    probe.cosine >= 0.99,
                    "{gguf_type} `{}`: {}",
                    probe.text,
                    probe.cosine
                );
            }
            let info = server.model_info(&name).expect("shows");
            assert_eq!(info["general.architecture"], "bert");
            assert_eq!(info["bert.pooling_type"], 1);
        }
    }

    /// Issue 13, the round trip: export → create in Ollama → `ollama:NAME` as a base model (the
    /// resolution every stage uses) → the same token ids, and embeddings equal to the original's
    /// within f16 rounding.
    #[test]
    fn an_ollama_model_resolves_to_the_encoder_it_was_made_from() {
        let Some((server, store)) =
            embed_server("an_ollama_model_resolves_to_the_encoder_it_was_made_from")
        else {
            return;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let gguf = dir.path().join("minilm-f16.gguf");
        export_bert(&minilm_dir(), &gguf, GgufType::F16, "minilm").expect("exports");
        server
            .create_from_gguf("ragd-test-roundtrip", &gguf, 512)
            .expect("creates");
        let config = hub::HubConfig {
            cache_dir: dir.path().join("cache"),
            ollama_url: server.url().to_owned(),
            ollama_store: store,
            ..crate::testutil::config()
        };
        let reference = ModelRef::parse("ollama:ragd-test-roundtrip", dir.path()).expect("parses");
        let folder = hub::resolve(&reference, SENTENCE_TRANSFORMER_FILES, &config, &mut |_| {})
            .expect("resolves through the server's store");
        let again = hub::resolve(&reference, SENTENCE_TRANSFORMER_FILES, &config, &mut |_| {})
            .expect("resolves again");
        assert_eq!(folder, again, "imported once, then reused");

        let original =
            SentenceEncoder::load(&minilm_dir(), &candle_core::Device::Cpu).expect("loads");
        let imported = SentenceEncoder::load(&folder, &candle_core::Device::Cpu).expect("loads");
        let ids =
            |e: &SentenceEncoder| e.sentence_tokenizer().token_ids(&PROBE_TEXTS).expect("ids");
        assert_eq!(ids(&imported), ids(&original));
        let want = original
            .encode(&PROBE_TEXTS, 4, &mut |_| {})
            .expect("encodes");
        let got = imported
            .encode(&PROBE_TEXTS, 4, &mut |_| {})
            .expect("encodes");
        for (i, text) in PROBE_TEXTS.iter().enumerate() {
            let c = cosine(got.row(i), want.row(i));
            assert!(c >= 0.9999, "`{text}`: {c}");
        }
        let missing =
            ModelRef::parse("ollama:ragd-test-no-such-model", dir.path()).expect("parses");
        let error = hub::resolve(&missing, SENTENCE_TRANSFORMER_FILES, &config, &mut |_| {})
            .expect_err("no such model");
        let mut chain = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        assert!(
            chain.contains("has no model `ragd-test-no-such-model`"),
            "{chain}"
        );
    }

    #[test]
    fn names_and_manifest_paths_follow_ollama() {
        assert_eq!(full_name("ragd-quickstart"), "ragd-quickstart:latest");
        assert_eq!(full_name("me/m:v2"), "me/m:v2");
        let store = Path::new("/s");
        assert_eq!(
            manifest_path(store, "m"),
            Path::new("/s/manifests/registry.ollama.ai/library/m/latest")
        );
        assert_eq!(
            manifest_path(store, "me/m:v2"),
            Path::new("/s/manifests/registry.ollama.ai/me/m/v2")
        );
        assert_eq!(
            manifest_path(store, "localhost:5000/me/m:v2"),
            Path::new("/s/manifests/localhost:5000/me/m/v2")
        );
    }

    #[test]
    fn cosine_of_mismatched_lengths_is_nan_not_a_pass() {
        assert!(cosine(&[1.0], &[1.0, 0.0]).is_nan());
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
    }
}
