//! Issue 14: the reranker through the binary, on the real all-MiniLM-L6-v2. A recipe trains a
//! cross-encoder from MiniLM's plain encoder beside the bi-encoder, evaluate scores
//! retrieve+rerank against retrieval alone with paired comparisons, and register puts the
//! reranker beside the model, as ragd's reranker only when reranking did not make retrieval
//! worse.

use std::path::Path;

use crate::util::{Project, copy_dir};

fn json(project: &Project, relative: &str) -> serde_json::Value {
    serde_json::from_str(&project.read(relative)).expect("valid JSON")
}

fn with_examples(recipe: &str) -> Project {
    let project = Project::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    copy_dir(&examples.join("docs"), &project.path("examples/docs"));
    copy_dir(
        &examples.join("labelled"),
        &project.path("examples/labelled"),
    );
    copy_dir(&examples.join("train"), &project.path("examples/train"));
    project.write("recipe.yaml", recipe);
    project
}

/// The whole pipeline, small: mined data trains both models; the reranker stops early on the
/// held-out split (scored every 2 steps).
const PIPELINE: &str = "\
name: rr
seed: 7
chunk:
  input: examples/docs
query_gen:
  strategies: [ict]
  max_chunks: 48
judge: {}
mine:
  negatives_per_query: 2
train:
  batch_size: 8
  mini_batch_size: 8
  max_steps: 2
  max_seq_length: 96
train_reranker:
  batch_size: 4
  mini_batch_size: 4
  max_steps: 4
  eval_every: 2
  learning_rate: 5.0e-5
  max_seq_length: 128
  validation_queries: 12
  validation_negatives: 3
evaluate:
  resamples: 500
  rerank_top_k: 5
  datasets:
    - path: examples/labelled
      name: labelled
register:
  make_default: true
  default_when: not_worse
";

#[test]
fn a_reranker_is_trained_evaluated_and_registered_beside_the_model() {
    let project = with_examples(PIPELINE);
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert!(
        run.ran().contains(&"train-reranker".to_owned()),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("has no classification head: starting from one drawn with seed 7"),
        "{}",
        run.stderr
    );

    // The stage's artifact: the folder, its log, and the held-out scorings (steps 0, 2, 4).
    let report = json(&project, &artifact(&project, "evaluate", "report.json"));
    let evals = project.read(&artifact(&project, "train-reranker", "evals.jsonl"));
    let steps: Vec<u64> = evals
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("json")["step"]
                .as_u64()
                .expect("a step")
        })
        .collect();
    assert_eq!(steps, [0, 2, 4], "{evals}");

    // Both dense systems reranked, each compared with itself unreranked, on both sets.
    for dataset in report["datasets"].as_array().expect("datasets") {
        for retriever in ["base", "fine-tuned"] {
            let label = format!("{retriever}+rerank");
            let system = dataset["systems"]
                .as_array()
                .expect("systems")
                .iter()
                .find(|s| s["label"] == label.as_str())
                .unwrap_or_else(|| panic!("no `{label}` in {}", dataset["name"]));
            assert_eq!(system["kind"], "reranked");
            assert_eq!(system["reranker"]["top_k"], 5);
            assert!(system["reranker"]["seconds_per_query"].as_f64() > Some(0.));
            assert!(
                dataset["comparisons"]
                    .as_array()
                    .expect("comparisons")
                    .iter()
                    .any(|c| c["baseline"] == retriever && c["candidate"] == label.as_str()),
                "`{label}` is compared with `{retriever}`"
            );
        }
    }

    // Registered beside the model, in the form sentence-transformers' CrossEncoder loads.
    let config = json(&project, ".ragd-home/models/rr-reranker/config.json");
    assert_eq!(config["num_labels"], 1, "{config}");
    assert!(
        project
            .path(".ragd-home/models/rr-reranker/model.safetensors")
            .is_file()
    );
    assert!(
        project
            .path(".ragd-home/models/rr-reranker/tokenizer.json")
            .is_file()
    );
    let metadata = json(&project, ".ragd-home/models/rr/training_metadata.json");
    assert_eq!(metadata["reranker"], "rr-reranker");
    let reranker_meta = json(
        &project,
        ".ragd-home/models/rr-reranker/training_metadata.json",
    );
    assert_eq!(reranker_meta["kind"], "cross-encoder");
    let worse = report["reranker_regression"].as_bool().expect("a flag");
    assert_eq!(reranker_meta["evaluation_regression"], worse);

    // ragd's reranker setting follows the guard.
    let ragd: serde_yaml::Value =
        serde_yaml::from_str(&project.read(".ragd-home/config.yaml")).expect("yaml");
    if worse {
        assert!(ragd["retrieval"].is_null(), "{ragd:?}");
        assert!(
            run.stderr
                .contains("NOT making `rr-reranker` ragd's reranker")
        );
    } else {
        assert_eq!(ragd["retrieval"]["rerank"], serde_yaml::Value::Bool(true));
        let path = ragd["retrieval"]["rerank_model"].as_str().expect("a path");
        assert!(path.ends_with("rr-reranker"), "{path}");
    }

    // Deleting the registered reranker reruns register alone.
    std::fs::remove_dir_all(project.path(".ragd-home/models/rr-reranker")).expect("rm");
    let again = project.run(&["run", "recipe.yaml"]);
    again.success();
    assert_eq!(again.ran(), ["register"], "{}", again.stderr);
}

/// The folder of a stage's artifact in the store, relative to the project.
fn artifact(project: &Project, stage: &str, file: &str) -> String {
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&project.read("recipe.lock")).expect("the lock parses");
    let stages = lock["stages"].as_mapping().expect("stages");
    let entry = stages
        .iter()
        .find(|(name, _)| name.as_str() == Some(stage))
        .map(|(_, entry)| entry)
        .unwrap_or_else(|| panic!("`{stage}` in the lock: {lock:?}"));
    let key = entry["key"].as_str().expect("a key");
    format!(".ragd-pipe/store-v1/{key}/{file}")
}

/// A reranker taught the opposite of relevance (each query's answer given as its negative, an
/// unrelated passage as its positive) makes retrieval worse: evaluate flags it, and register and
/// `models use` keep it out of ragd's config.
#[test]
fn a_reranker_found_worse_never_becomes_the_default() {
    let project = with_examples(
        "\
name: bad
seed: 3
train:
  data: examples/train/train.jsonl
  batch_size: 8
  mini_batch_size: 8
  max_steps: 1
  max_seq_length: 64
train_reranker:
  data: inverted.jsonl
  epochs: 3
  batch_size: 8
  mini_batch_size: 8
  learning_rate: 1.0e-4
  warmup_ratio: 0.0
  max_seq_length: 128
evaluate:
  resamples: 1000
  rerank_top_k: 10
  datasets:
    - path: examples/labelled
      name: labelled
register:
  make_default: true
  default_when: not_worse
",
    );
    let examples: Vec<serde_json::Value> = project
        .read("examples/train/train.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let inverted: Vec<String> = examples
        .iter()
        .enumerate()
        .map(|(i, example)| {
            let other = &examples[(i + examples.len() / 2) % examples.len()];
            serde_json::json!({
                "query": example["query"],
                "positive": other["positive"],
                "positive_id": other["positive_id"],
                "negatives": [{"id": example["positive_id"], "text": example["positive"]}],
                "source_document": example["source_document"],
            })
            .to_string()
        })
        .collect();
    project.write("inverted.jsonl", &(inverted.join("\n") + "\n"));

    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    let report = json(&project, &artifact(&project, "evaluate", "report.json"));
    assert_eq!(report["reranker_regression"], true, "{}", run.stderr);
    assert!(
        run.stderr.contains("RERANKING MAKES RETRIEVAL WORSE"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("NOT making `bad-reranker` ragd's reranker"),
        "{}",
        run.stderr
    );
    let metadata = json(
        &project,
        ".ragd-home/models/bad-reranker/training_metadata.json",
    );
    assert_eq!(metadata["evaluation_regression"], true);
    let ragd: serde_yaml::Value =
        serde_yaml::from_str(&project.read(".ragd-home/config.yaml")).expect("yaml");
    assert!(ragd["retrieval"].is_null(), "{ragd:?}");

    // `models use` on the model leaves the reranker out too, and says why.
    let used = project.run(&["models", "use", "bad"]);
    used.success();
    assert!(
        used.stderr.contains("not changing ragd's reranker"),
        "{}",
        used.stderr
    );
    let ragd: serde_yaml::Value =
        serde_yaml::from_str(&project.read(".ragd-home/config.yaml")).expect("yaml");
    assert!(ragd["retrieval"].is_null(), "{ragd:?}");
}
