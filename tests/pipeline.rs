//! Issue 5: all seven stages end to end on the bundled example documentation with the real
//! all-MiniLM-L6-v2, LLM-free (ICT queries) and a few training steps so the test stays short:
//! the report, the registered model and its provenance, a no-op rerun, a register that reruns
//! when its model was deleted, and the regression guard.

use std::path::Path;

use crate::util::{Project, copy_dir};

/// The pipeline over a copy of `examples/`, small enough for a test.
const RECIPE: &str = "\
name: e2e
seed: 7
chunk:
  input: examples/docs
query_gen:
  strategies: [ict]
  max_chunks: 48
judge: {}
mine:
  negatives_per_query: 1
train:
  batch_size: 8
  mini_batch_size: 8
  max_steps: 4
  max_seq_length: 96
evaluate:
  resamples: 500
  datasets:
    - path: examples/labelled
      name: labelled
register:
  make_default: true
";

fn project() -> Project {
    let project = Project::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    copy_dir(&examples.join("docs"), &project.path("examples/docs"));
    copy_dir(
        &examples.join("labelled"),
        &project.path("examples/labelled"),
    );
    project.write("recipe.yaml", RECIPE);
    project
}

fn json(project: &Project, relative: &str) -> serde_json::Value {
    serde_json::from_str(&project.read(relative)).expect("valid JSON")
}

#[test]
fn the_whole_pipeline_runs_registers_and_reruns_nothing() {
    let project = project();
    // Four steps rarely make a model better beyond noise: take one that is not worse as the
    // default, so ragd's config points at it.
    project.write(
        "recipe.yaml",
        &RECIPE.replace(
            "  make_default: true\n",
            "  make_default: true\n  default_when: not_worse\n",
        ),
    );
    let first = project.run(&["run", "recipe.yaml"]);
    first.success();
    assert_eq!(
        first.ran(),
        [
            "chunk",
            "query-gen",
            "judge",
            "mine",
            "train",
            "evaluate",
            "register"
        ],
        "{}",
        first.stderr
    );
    // Mine embeds the chunks the judge's round trip embedded: it reuses them.
    assert!(
        first
            .stderr
            .contains("encoding chunks: reused the embeddings of"),
        "{}",
        first.stderr
    );

    // The registered model is a sentence-transformers folder with its provenance.
    let model = project.path(".ragd-home/models/e2e");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert!(model.join(file).is_file(), "{file} missing from {model:?}");
    }
    let metadata = json(&project, ".ragd-home/models/e2e/training_metadata.json");
    assert_eq!(
        metadata["base_model"], "sentence-transformers/all-MiniLM-L6-v2",
        "{metadata}"
    );
    assert!(
        metadata["recipe"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("name: e2e")),
        "{metadata}"
    );
    let metrics = metadata["metrics"].as_object().expect("metrics");
    assert!(!metrics.is_empty(), "{metadata}");

    // The run ends by saying where the report is and what it found.
    assert!(
        first.stderr.contains("report: ") && first.stderr.contains("report.html"),
        "{}",
        first.stderr
    );
    assert!(first.stderr.contains("\nverdict: "), "{}", first.stderr);
    assert!(
        first.stderr.contains("trust: Only ")
            && first.stderr.contains("for a model of 23 M parameters"),
        "{}",
        first.stderr
    );
    // The report opens with its header and verdict; the model folder carries it, and every
    // file of the folder is as readable as the others.
    let report = project.run(&["report", "recipe.yaml"]);
    report.success();
    for expected in [
        "- **Model**: e2e",
        "- **Base model**: sentence-transformers/all-MiniLM-L6-v2",
        "- **Data**: held-out: ",
        "- **Date**: 20",
        "**Verdict: ",
        // A tiny corpus: the report says the result rests on few examples, as the run did.
        "Trust this result less:",
        "training examples",
        "## What the figures mean",
    ] {
        assert!(
            report.stdout.contains(expected),
            "`{expected}`:\n{}",
            report.stdout
        );
    }
    assert!(model.join("report.html").is_file());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |file: &str| {
            std::fs::metadata(model.join(file))
                .expect("model file")
                .permissions()
                .mode()
        };
        assert_eq!(mode("model.safetensors"), mode("config.json"));
    }
    // The lock holds no path of this machine, no text of the documents, no timings.
    let lock = project.read("recipe.lock");
    let root = project.root().display().to_string();
    assert!(!lock.contains(&root), "{lock}");
    assert!(!lock.contains(": /"), "an absolute path:\n{lock}");
    for private in [
        "Tidewater",
        "tidewater",
        "examples:",
        " query:",
        "train_seconds",
        "peak_rss_bytes",
        "device",
    ] {
        assert!(!lock.contains(private), "`{private}` in the lock:\n{lock}");
    }
    let metadata_text = project.read(".ragd-home/models/e2e/training_metadata.json");
    assert!(!metadata_text.contains(&root), "{metadata_text}");
    // ragd uses the model (`make_default`): `models rm` refuses to remove it.
    let rm = project.run(&["models", "rm", "e2e"]);
    rm.failure(1);
    assert!(
        rm.stderr.contains("is ragd's embedding model"),
        "{}",
        rm.stderr
    );

    // Rerunning the stages that write text (queries, drops with examples, timings) leaves the
    // lock as it was: it holds only what a rerun reproduces.
    let forced = project.run(&[
        "run",
        "recipe.yaml",
        "--force",
        "chunk",
        "--force",
        "query-gen",
        "--force",
        "judge",
        "--force",
        "mine",
    ]);
    forced.success();
    assert_eq!(
        forced.ran(),
        ["chunk", "query-gen", "judge", "mine"],
        "{}",
        forced.stderr
    );
    assert_eq!(
        project.read("recipe.lock"),
        lock,
        "the rerun changed the lock"
    );

    // The report scores BM25, the base and the fine-tuned model on both sets.
    let show = project.run(&["models", "show", "e2e", "--json"]);
    show.success();
    let listed = project.run(&["models", "list"]);
    listed.success();
    assert!(listed.stdout.contains("e2e"), "{}", listed.stdout);

    // A second run does nothing.
    let second = project.run(&["run", "recipe.yaml"]);
    second.success();
    assert!(second.ran().is_empty(), "{}", second.stderr);

    // Deleting the registered model reruns register alone, and says why.
    std::fs::remove_dir_all(&model).expect("remove the registered model");
    let third = project.run(&["run", "recipe.yaml"]);
    third.success();
    assert_eq!(third.ran(), ["register"], "{}", third.stderr);
    assert!(
        third.stderr.contains("no longer in"),
        "the reason is named: {}",
        third.stderr
    );
    assert!(model.join("model.safetensors").is_file());
}

#[test]
fn a_model_made_worse_is_flagged_and_not_made_the_default() {
    let project = project();
    // A learning rate a thousand times too high wrecks the encoder in a few steps; no merge
    // with the base to rescue it.
    let run = project.run(&[
        "run",
        "recipe.yaml",
        "--set",
        "train.learning_rate=0.05",
        "--set",
        "train.merge=none",
    ]);
    run.success();
    assert!(
        run.stderr.contains("WORSE THAN THE BASE"),
        "the regression is said loudly: {}",
        run.stderr
    );
    assert_not_made_default(&project, &run.stderr);
    // The model is still registered, marked as a regression.
    let metadata = json(&project, ".ragd-home/models/e2e/training_metadata.json");
    assert_eq!(metadata["evaluation_regression"], true, "{metadata}");
}

/// Issue 12: a deliberately bad recipe (learning rate 1e-3, 5 epochs on about 50 examples) ends
/// with the verdict `worse`, or is rescued by the merge with the base (α of 0.5 or less); either way it is
/// never made ragd's default, and the report lists every α tried.
#[test]
fn a_bad_recipe_ends_worse_or_is_rescued_by_the_merge_and_is_never_the_default() {
    let project = project();
    project.write(
        "bad.yaml",
        &RECIPE.replace("max_chunks: 48", "max_chunks: 60").replace(
            "  max_steps: 4\n",
            "  epochs: 5\n  learning_rate: 0.001\n  merge: auto\n",
        ),
    );
    let run = project.run(&["run", "bad.yaml"]);
    run.success();
    let report = json(&project, &report_path(&project));
    let label = report["verdict"]["label"].as_str().expect("a verdict");
    let alpha = report["merge"]["alpha"].as_f64().expect("a merge");
    let trials = report["merge"]["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 5, "{}", report["merge"]);
    // Rescued: the merge kept at most half of the bad fine-tune's change.
    assert!(
        label == "worse" || alpha <= 0.5,
        "verdict `{label}` with α = {alpha}: {}",
        run.stderr
    );
    assert_ne!(label, "better", "{}", run.stderr);
    assert!(run.stderr.contains("verdict: "), "{}", run.stderr);
    assert_not_made_default(&project, &run.stderr);
    // The registered model carries the verdict `models list` shows.
    let metadata = json(&project, ".ragd-home/models/e2e/training_metadata.json");
    assert_eq!(metadata["verdict"]["label"], label, "{metadata}");
    // The general check was scored for both models.
    let general = report["datasets"]
        .as_array()
        .expect("datasets")
        .iter()
        .find(|d| d["role"] == "general")
        .expect("the general check");
    assert_eq!(general["query_ids"].as_array().map(Vec::len), Some(40));
}

/// Issue 12: a chunk's continuation as a second positive, and a second round of mining with the
/// first round's model, retrained from the base; evaluate reports both rounds.
#[test]
fn two_rounds_with_continuations_train_twice_and_report_both() {
    let project = project();
    let run = project.run(&[
        "run",
        "recipe.yaml",
        "--set",
        "mine.rounds=2",
        "--set",
        "mine.continuation_positive=true",
    ]);
    run.success();
    assert!(run.stderr.contains("round 1 of 2"), "{}", run.stderr);
    assert!(run.stderr.contains("round 2 of 2"), "{}", run.stderr);
    assert!(
        run.stderr.contains("mining, second round"),
        "{}",
        run.stderr
    );
    let store = project.path(".ragd-pipe");
    let files = walk(&store);
    let find = |name: &str| {
        files
            .iter()
            .find(|p| p.ends_with(name))
            .unwrap_or_else(|| panic!("{name} in the store"))
            .clone()
    };
    let rows = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("readable")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    };
    // Mine gave second positives, never also negatives.
    let first = rows(&find("train.jsonl"));
    let with_continuation = first
        .iter()
        .filter(|row| {
            row["extra_positives"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .count();
    assert!(with_continuation > 0, "some chunk has a continuation");
    // The second round kept each example's query and positives and mined its negatives again.
    let second = rows(&find("round1/second_round_train.jsonl"));
    assert_eq!(second.len(), first.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a["query"], b["query"]);
        assert_eq!(a["positive_id"], b["positive_id"]);
        assert_eq!(a["extra_positives"], b["extra_positives"]);
        let answers: Vec<&serde_json::Value> = std::iter::once(&b["positive_id"])
            .chain(
                b["extra_positives"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| &p["id"]),
            )
            .collect();
        for negative in b["negatives"].as_array().expect("negatives") {
            assert!(!answers.contains(&&negative["id"]), "{b}");
        }
    }
    assert!(find("round1/model/model.safetensors").is_file());
    // Both rounds are scored against the base; the verdict reads the final one.
    let report = json(&project, &report_path(&project));
    let labelled = report["datasets"]
        .as_array()
        .expect("datasets")
        .iter()
        .find(|d| d["name"] == "labelled")
        .expect("the labelled set");
    let candidates: Vec<&str> = labelled["comparisons"]
        .as_array()
        .expect("comparisons")
        .iter()
        .filter_map(|c| c["candidate"].as_str())
        .collect();
    assert!(
        candidates.contains(&"fine-tuned (round 1)"),
        "{candidates:?}"
    );
    assert!(candidates.contains(&"fine-tuned"), "{candidates:?}");
    assert!(report["verdict"]["why"].is_string());
}

/// `train.save_length: auto` scores the held-out split at the training length (96) and at the
/// base's own (256), saves the model at the base's only where it is better beyond noise, and
/// says both figures; `base` saves at the base's length without asking.
#[test]
fn the_saved_length_is_chosen_on_the_held_out_split() {
    let project = project();
    let run = project.run(&[
        "run",
        "recipe.yaml",
        "--until",
        "train",
        "--set",
        "train.save_length=auto",
    ]);
    run.success();
    assert!(run.stderr.contains("saved length: "), "{}", run.stderr);
    let store = project.path(".ragd-pipe");
    let find = |name: &str| {
        walk(&store)
            .into_iter()
            .find(|p| p.ends_with(name))
            .unwrap_or_else(|| panic!("{name} in the store"))
    };
    let metadata: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(find("model/training_metadata.json")).expect("readable"),
    )
    .expect("JSON");
    let choice = &metadata["save_length"];
    let tried: Vec<u64> = choice["trials"]
        .as_array()
        .expect("trials")
        .iter()
        .map(|t| t[0].as_u64().expect("tokens"))
        .collect();
    assert_eq!(tried, [96, 256], "{choice}");
    // The base's length only where it wins beyond noise; else the faster training length.
    let tokens = choice["tokens"].as_u64().expect("tokens");
    let score = |i: usize| choice["trials"][i][1].as_f64().expect("a figure");
    assert!(
        tokens == 96 || (tokens == 256 && score(1) > score(0)),
        "{choice}"
    );
    assert!(
        choice["why"]
            .as_str()
            .is_some_and(|why| why.contains("95% CI")),
        "{choice}"
    );
    let saved_length = |project: &Project| -> u64 {
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                walk(&project.path(".ragd-pipe"))
                    .into_iter()
                    .filter(|p| p.ends_with("model/sentence_bert_config.json"))
                    .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                    .expect("a saved model"),
            )
            .expect("readable"),
        )
        .expect("JSON");
        config["max_seq_length"].as_u64().expect("a length")
    };
    assert_eq!(saved_length(&project), tokens);
    let fixed = project.run(&[
        "run",
        "recipe.yaml",
        "--until",
        "train",
        "--set",
        "train.save_length=base",
    ]);
    fixed.success();
    assert_eq!(saved_length(&project), 256, "{}", fixed.stderr);
}

/// Issue 14: mine rescores its candidates with a cross-encoder (here all-MiniLM-L6-v2's
/// encoder with a seeded head: no cross-encoder weights exist offline), whose scores then pick
/// the negatives: they differ from those the base model's cosine picks.
#[test]
fn mine_rescores_candidates_with_a_cross_encoder() {
    let project = project();
    let minings = |project: &Project| -> Vec<std::path::PathBuf> {
        walk(&project.path(".ragd-pipe"))
            .into_iter()
            .filter(|p| p.ends_with("train.jsonl"))
            .collect()
    };
    let negatives = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("readable")
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON"))
            .map(|row| row["negatives"].clone())
            .collect()
    };
    project
        .run(&["run", "recipe.yaml", "--until", "mine"])
        .success();
    let first = minings(&project);
    assert_eq!(first.len(), 1, "{first:?}");

    let cross_encoder = crate::train::base_model_dir();
    let reference = format!("mine.cross_encoder={}", cross_encoder.display());
    let run = project.run(&["run", "recipe.yaml", "--set", &reference, "--until", "mine"]);
    run.success();
    assert!(
        run.stderr.contains("the cross-encoder") && run.stderr.contains("rescored"),
        "{}",
        run.stderr
    );
    let second = minings(&project)
        .into_iter()
        .find(|p| !first.contains(p))
        .expect("a second mining");
    let (by_cosine, by_cross_encoder) = (negatives(&first[0]), negatives(&second));
    assert_eq!(by_cosine.len(), by_cross_encoder.len());
    assert_ne!(
        by_cosine, by_cross_encoder,
        "the cross-encoder's scores chose"
    );
}

/// Issue 14: train distils a cross-encoder's margins (MarginMSE) into the bi-encoder on top of
/// the ranking loss; the teacher is all-MiniLM-L6-v2's encoder with a seeded head.
#[test]
fn train_distils_a_cross_encoders_margins() {
    let project = project();
    let teacher = crate::train::base_model_dir();
    let run = project.run(&[
        "run",
        "recipe.yaml",
        "--set",
        &format!(
            "train.distill={{teacher: '{}', weight: 0.5}}",
            teacher.display()
        ),
        "--until",
        "train",
    ]);
    run.success();
    assert!(run.stderr.contains("for MarginMSE"), "{}", run.stderr);
    let metadata = walk(&project.path(".ragd-pipe"))
        .into_iter()
        .find(|p| p.ends_with("model/training_metadata.json"))
        .expect("the trained model's metadata");
    let metadata: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(metadata).expect("readable")).expect("JSON");
    let loss = metadata["loss"].as_str().expect("the loss's name");
    assert!(loss.contains("0.5 × MarginMSE"), "{loss}");
    // Without mined negatives there is nothing to distil: refused where the recipe says so.
    let refused = project.run(&[
        "run",
        "recipe.yaml",
        "--set",
        &format!("train.distill={{teacher: '{}'}}", teacher.display()),
        "--set",
        "train.hard_negatives=false",
    ]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("hard_negatives"),
        "{}",
        refused.stderr
    );
}

/// The run said it would not make `e2e` ragd's default, and left ragd's config alone.
fn assert_not_made_default(project: &Project, stderr: &str) {
    assert!(
        stderr.contains("NOT making `e2e` ragd's default"),
        "{stderr}"
    );
    assert!(
        !project.path(".ragd-home/config.yaml").exists(),
        "ragd's config was left alone"
    );
}

/// Where the evaluate stage of the run in `project` wrote its report, relative to the project.
fn report_path(project: &Project) -> String {
    let found = walk(&project.path(".ragd-pipe"))
        .into_iter()
        .find(|p| p.ends_with("report.json"))
        .expect("a report.json in the store");
    found
        .strip_prefix(project.root())
        .expect("inside the project")
        .display()
        .to_string()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
