//! A stage's cache key: the blake3 of everything that can change its output.
//!
//! | field           | what it holds                                                         |
//! |-----------------|-----------------------------------------------------------------------|
//! | `format`        | [`KEY_FORMAT`]; bumping it invalidates every key                      |
//! | `kind`          | the stage kind (`query-gen`)                                          |
//! | `stage_version` | `Stage::version()`, bumped when the implementation's output changes   |
//! | `tool_version`  | ragd-pipe's crate version                                             |
//! | `params`        | canonical parameters, defaults filled in                              |
//! | `upstream`      | artifact → the key of the stage that produced it                      |
//! | `externals`     | label → aggregate digest of files, model files or a remote identity   |
//!
//! The key holds aggregates only; the [`KeyRecord`] beside it keeps per-file digests so a rerun
//! can say which file changed. Serialised as JSON (sorted maps), then hashed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::hash_bytes;

/// Bump to invalidate every cached artifact (a change in how keys are built).
pub const KEY_FORMAT: u32 = 1;

/// The digest of one external input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalDigest {
    /// What it is: `files`, `model` or `identity`.
    pub kind: String,
    /// The aggregate hash that enters the key.
    pub digest: String,
    /// Per-file digests (relative path → blake3), kept in the record only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// For identities and models: the value or reference, for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ExternalDigest {
    /// An aggregate over relative paths and their digests.
    pub fn of_files(kind: &str, files: BTreeMap<String, String>, detail: Option<String>) -> Self {
        let mut listing = String::new();
        for (path, digest) in &files {
            listing.push_str(path);
            listing.push('\0');
            listing.push_str(digest);
            listing.push('\n');
        }
        Self {
            kind: kind.to_owned(),
            digest: hash_bytes(listing.as_bytes()),
            files,
            detail,
        }
    }

    pub fn of_identity(value: &str) -> Self {
        Self {
            kind: "identity".to_owned(),
            digest: hash_bytes(value.as_bytes()),
            files: BTreeMap::new(),
            detail: Some(value.to_owned()),
        }
    }
}

/// Everything that went into a key, with per-file detail: stored under the workdir per key and
/// (without per-file detail) in the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub format: u32,
    pub kind: String,
    pub stage_version: u32,
    pub tool_version: String,
    pub params: serde_json::Value,
    pub upstream: BTreeMap<String, String>,
    pub externals: BTreeMap<String, ExternalDigest>,
}

/// The hashed form: like the record, with externals reduced to their aggregate digests.
#[derive(Serialize)]
struct CacheKey<'a> {
    format: u32,
    kind: &'a str,
    stage_version: u32,
    tool_version: &'a str,
    params: &'a serde_json::Value,
    upstream: &'a BTreeMap<String, String>,
    externals: BTreeMap<&'a str, &'a str>,
}

impl KeyRecord {
    /// The record of a stage of `kind` at `stage_version` with `params` (made canonical here),
    /// its upstream keys by artifact name and its externals' digests by label, under this
    /// key format and tool version.
    pub fn new(
        kind: &str,
        stage_version: u32,
        params: &serde_json::Value,
        upstream: BTreeMap<String, String>,
        externals: BTreeMap<String, ExternalDigest>,
    ) -> Self {
        Self {
            format: KEY_FORMAT,
            kind: kind.to_owned(),
            stage_version,
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            params: canonical(params),
            upstream,
            externals,
        }
    }

    /// The cache key, hex.
    pub fn key(&self) -> String {
        let key = CacheKey {
            format: self.format,
            kind: &self.kind,
            stage_version: self.stage_version,
            tool_version: &self.tool_version,
            params: &self.params,
            upstream: &self.upstream,
            externals: self
                .externals
                .iter()
                .map(|(label, e)| (label.as_str(), e.digest.as_str()))
                .collect(),
        };
        let json =
            serde_json::to_vec(&key).expect("serialising a cache key to JSON should not fail");
        hash_bytes(&json)
    }

    /// The record without per-file detail, as the lock keeps it.
    pub fn summarized(&self) -> Self {
        let mut copy = self.clone();
        for external in copy.externals.values_mut() {
            external.files.clear();
        }
        copy
    }
}

/// Canonical JSON: objects with sorted keys (serde_json preserves insertion order here), so the
/// same parameters always hash the same.
pub fn canonical(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut sorted: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::Value::Object(
                sorted
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(canonical).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> KeyRecord {
        let mut files = BTreeMap::new();
        files.insert("a.md".to_owned(), hash_bytes(b"a"));
        let mut externals = BTreeMap::new();
        externals.insert(
            "corpus".to_owned(),
            ExternalDigest::of_files("files", files, None),
        );
        let mut upstream = BTreeMap::new();
        upstream.insert("chunks".to_owned(), "k1".to_owned());
        KeyRecord {
            format: KEY_FORMAT,
            kind: "chunk".to_owned(),
            stage_version: 1,
            tool_version: "0.1.0".to_owned(),
            params: canonical(&json!({"max_tokens": 256, "overlap": 32})),
            upstream,
            externals,
        }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = record();
        let key = base.key();
        let mut variants: Vec<KeyRecord> = Vec::new();
        let mut r = base.clone();
        r.format += 1;
        variants.push(r);
        let mut r = base.clone();
        r.kind = "mine".to_owned();
        variants.push(r);
        let mut r = base.clone();
        r.stage_version += 1;
        variants.push(r);
        let mut r = base.clone();
        r.tool_version = "0.2.0".to_owned();
        variants.push(r);
        let mut r = base.clone();
        r.params = canonical(&json!({"max_tokens": 128, "overlap": 32}));
        variants.push(r);
        let mut r = base.clone();
        r.upstream.insert("chunks".to_owned(), "k2".to_owned());
        variants.push(r);
        let mut r = base.clone();
        let mut files = BTreeMap::new();
        files.insert("a.md".to_owned(), hash_bytes(b"changed"));
        r.externals.insert(
            "corpus".to_owned(),
            ExternalDigest::of_files("files", files, None),
        );
        variants.push(r);
        for variant in variants {
            assert_ne!(variant.key(), key, "{variant:?}");
        }
    }

    #[test]
    fn parameter_order_and_file_detail_do_not_change_the_key() {
        let a = record();
        let mut b = a.clone();
        b.params = canonical(&json!({"overlap": 32, "max_tokens": 256}));
        assert_eq!(a.key(), b.key());
        assert_eq!(a.key(), a.summarized().key());
    }
}
