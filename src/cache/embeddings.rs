//! Embeddings of a corpus, kept between stages and runs: the judge's round trip and mine both
//! embed every chunk with the base model, which on a 10,000-chunk corpus costs minutes each on a
//! laptop. An entry is keyed by everything its numbers depend on — the model's files, the
//! settings the caller names, every text in order — so a hit is exactly what encoding would give.
//!
//! One file per entry under `<workdir>/shared-v1/embeddings/`: a header (magic, rows, dim, the
//! blake3 digest of the rows) and the rows as little-endian f32, written atomically
//! ([`write_atomic`]), so a crash leaves either no entry or a whole one. The digest is checked
//! on every load, as the store checks its artifacts: an entry overwritten in place (same size,
//! other numbers) is a miss, never silently used. Checking only the length was the rejected
//! alternative; hashing 15 MB of rows costs a few milliseconds against minutes of encoding.

use std::path::{Path, PathBuf};

use fs_err as fs;

use super::digest::{DigestMemo, list_files};
use super::error::CacheError;
use super::write_atomic;

/// First bytes of an entry; a new layout gets a new magic, and old entries read as misses.
const MAGIC: &[u8; 8] = b"RAGDEMB2";
/// Magic, rows and dim (u64 each), the rows' blake3 digest.
const HEADER_LEN: usize = MAGIC.len() + 16 + 32;

/// The folder of entries, created on first save.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
}

impl EmbeddingCache {
    pub fn new(shared_dir: &Path) -> Self {
        Self {
            dir: shared_dir.join("embeddings"),
        }
    }

    /// The identity of the model in `model_dir`: a digest of its files. Computed once per model
    /// by callers that embed several corpora with it.
    pub fn model_digest(model_dir: &Path) -> Result<String, CacheError> {
        let mut hasher = blake3::Hasher::new();
        let mut memo = DigestMemo::in_memory();
        for relative in list_files(model_dir)? {
            let digest = memo.digest(&model_dir.join(&relative))?;
            hasher.update(relative.to_string_lossy().as_bytes());
            hasher.update(&[0]);
            hasher.update(digest.blake3.as_bytes());
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// The key of `texts` embedded by the model with `model_digest` ([`Self::model_digest`])
    /// under `settings` (whatever else changes the numbers: device, kernels, batch size,
    /// sequence length).
    pub fn key(model_digest: &str, settings: &str, texts: &[&str]) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(MAGIC);
        hasher.update(model_digest.as_bytes());
        hasher.update(&[0]);
        hasher.update(settings.as_bytes());
        hasher.update(&[0]);
        for text in texts {
            hasher.update(&(text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.f32"))
    }

    /// The entry under `key` as (dim, rows row-major), if there is a whole one. A damaged entry
    /// is a miss: it is only a cache.
    pub fn load(&self, key: &str) -> Option<(usize, Vec<f32>)> {
        let bytes = fs::read(self.path(key)).ok()?;
        let header = HEADER_LEN;
        if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
            return None;
        }
        let number = |at: usize| -> Option<usize> {
            let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
            usize::try_from(u64::from_le_bytes(raw)).ok()
        };
        let (rows, dim) = (number(MAGIC.len())?, number(MAGIC.len() + 8)?);
        let body = &bytes[header..];
        if rows.checked_mul(dim)?.checked_mul(4)? != body.len()
            || blake3::hash(body).as_bytes() != &bytes[MAGIC.len() + 16..header]
        {
            return None;
        }
        let data = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some((dim, data))
    }

    /// Stores `data` (rows of `dim`) under `key`, atomically.
    pub fn save(&self, key: &str, dim: usize, data: &[f32]) -> Result<(), CacheError> {
        let rows = data.len().checked_div(dim).unwrap_or(0);
        let mut bytes = Vec::with_capacity(HEADER_LEN + 4 * data.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(rows as u64).to_le_bytes());
        bytes.extend_from_slice(&(dim as u64).to_le_bytes());
        bytes.extend_from_slice(&[0; 32]);
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let digest = blake3::hash(&bytes[HEADER_LEN..]);
        bytes[MAGIC.len() + 16..HEADER_LEN].copy_from_slice(digest.as_bytes());
        write_atomic(&self.path(key), &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::EmbeddingCache;

    #[test]
    fn entries_round_trip_and_keys_follow_model_settings_and_texts() {
        let work = tempfile::tempdir().expect("temp dir");
        let model = work.path().join("model");
        fs_err::create_dir_all(&model).expect("model dir");
        fs_err::write(model.join("model.safetensors"), b"weights").expect("weights");
        let key = |settings: &str, texts: &[&str]| {
            let digest = EmbeddingCache::model_digest(&model).expect("model digest");
            EmbeddingCache::key(&digest, settings, texts)
        };
        let base = key("cpu", &["a", "b"]);
        assert_eq!(base, key("cpu", &["a", "b"]));
        assert_ne!(base, key("cuda", &["a", "b"]));
        assert_ne!(base, key("cpu", &["ab"]));
        assert_ne!(base, key("cpu", &["b", "a"]));

        let cache = EmbeddingCache::new(&work.path().join("shared"));
        assert_eq!(cache.load(&base), None);
        let data = [0.25f32, -1.5, 3.0, f32::MIN_POSITIVE, 0.0, 7.0];
        cache.save(&base, 3, &data).expect("saves");
        assert_eq!(cache.load(&base), Some((3, data.to_vec())));

        fs_err::write(model.join("model.safetensors"), b"other weights").expect("weights");
        assert_ne!(base, key("cpu", &["a", "b"]), "new weights, new key");

        // A truncated entry is a miss, not an error.
        let path = work
            .path()
            .join("shared/embeddings")
            .join(format!("{base}.f32"));
        let bytes = fs_err::read(&path).expect("entry");
        fs_err::write(&path, &bytes[..bytes.len() - 2]).expect("truncate");
        assert_eq!(cache.load(&base), None);
    }

    #[test]
    fn r18_8_an_entry_overwritten_in_place_is_a_miss() {
        let work = tempfile::tempdir().expect("temp dir");
        let cache = EmbeddingCache::new(work.path());
        let data = [0.25f32, -1.5, 3.0, 4.0];
        cache.save("k", 2, &data).expect("saves");
        assert_eq!(cache.load("k"), Some((2, data.to_vec())));
        let path = work.path().join("embeddings/k.f32");
        let mut bytes = fs_err::read(&path).expect("entry");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs_err::write(&path, &bytes).expect("same-size overwrite");
        assert_eq!(cache.load("k"), None);
    }
}
