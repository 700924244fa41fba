//! Issue 13 against a real Ollama in `embed` mode (`RAGD_TEST_OLLAMA_EMBED_URL`, its model store
//! `RAGD_TEST_OLLAMA_EMBED_STORE`; `.ci/run` starts one where `../shared/tools` exists): the
//! pipeline registers its model, creates it in Ollama and checks what Ollama serves; a new run
//! then starts from that Ollama model.

use std::path::Path;

use crate::util::{Project, copy_dir};

/// The e2e recipe of `pipeline.rs`, registering into Ollama too.
fn recipe(url: &str) -> String {
    format!(
        "\
name: served
seed: 7
chunk:
  input: examples/docs
query_gen:
  strategies: [ict]
  max_chunks: 48
judge: {{}}
mine:
  negatives_per_query: 1
train:
  batch_size: 8
  mini_batch_size: 8
  max_steps: 4
  max_seq_length: 96
evaluate:
  resamples: 200
register:
  gguf: [f16, q8_0]
  ollama:
    name: ragd-test-served
    url: {url}
"
    )
}

#[test]
#[allow(clippy::print_stderr, reason = "a skipped test says so visibly")]
fn register_serves_the_model_from_ollama_and_a_new_run_starts_from_it() {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let (Some(url), Some(store)) = (
        env("RAGD_TEST_OLLAMA_EMBED_URL"),
        env("RAGD_TEST_OLLAMA_EMBED_STORE"),
    ) else {
        eprintln!("skipped: RAGD_TEST_OLLAMA_EMBED_URL and RAGD_TEST_OLLAMA_EMBED_STORE not set");
        return;
    };
    let project = Project::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    copy_dir(&examples.join("docs"), &project.path("examples/docs"));
    project.write("recipe.yaml", &recipe(&url));
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert!(run.ran().contains(&"register".to_owned()), "{}", run.stderr);
    assert!(
        run.stderr.contains("probe comparison: min") && run.stderr.contains(": ok"),
        "{}",
        run.stderr
    );
    let model = project.path(".ragd-home/models/served");
    for file in ["served-f16.gguf", "served-q8_0.gguf", "model.safetensors"] {
        assert!(model.join(file).is_file(), "{file}");
    }

    // `models export --ollama` does the same for a registered model, printing the table.
    let export = project.run(&[
        "models",
        "export",
        "served",
        "exported.gguf",
        "--ollama",
        "ragd-test-exported",
        "--ollama-url",
        &url,
    ]);
    export.success();
    assert!(export.stdout.contains("probe text"), "{}", export.stdout);
    assert!(project.path("exported.gguf").is_file());

    // `models use --ollama` points ragd at the Ollama model.
    let used = project
        .command(&[
            "models",
            "use",
            "served",
            "--ollama",
            "ragd-test-served",
            "--ollama-url",
            &url,
        ])
        .output()
        .expect("runs");
    assert!(
        used.status.success(),
        "{}",
        String::from_utf8_lossy(&used.stderr)
    );
    assert!(
        project
            .read(".ragd-home/config.yaml")
            .contains("model: ragd-test-served"),
        "{}",
        project.read(".ragd-home/config.yaml")
    );

    // A new run whose base model is the Ollama model: its GGUF is read from the store and
    // imported; chunking runs with its tokenizer.
    project.write(
        "again.yaml",
        "name: again\nbase_model: ollama:ragd-test-served\nchunk:\n  input: examples/docs\n",
    );
    let again = project
        .command(&["run", "again.yaml"])
        .env("OLLAMA_HOST", &url)
        .env("OLLAMA_MODELS", &store)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("chunk"), "{stderr}");
}
