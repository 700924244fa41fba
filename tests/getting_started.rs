//! Issue 15: a newcomer's first steps. `init` writes a recipe for a folder of documents that
//! validates and runs as written.

use std::path::Path;

use crate::util::{Project, copy_dir};

#[test]
fn init_writes_a_recipe_for_the_example_docs_that_runs_until_judge() {
    let project = Project::new();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docs"),
        &project.path("examples/docs"),
    );
    let init = project.run(&["init", "examples/docs", "--preset", "quick"]);
    init.success();
    assert!(init.stderr.contains("wrote recipe.yaml"), "{}", init.stderr);
    let recipe = project.read("recipe.yaml");
    for expected in [
        "name: docs",
        "input: examples/docs",
        "strategies: [ict]",
        " md,",
        "about ",
        "CPU cores",
        "Estimate on this machine:",
    ] {
        assert!(recipe.contains(expected), "`{expected}` missing:\n{recipe}");
    }
    // It does not overwrite a recipe unasked.
    project.run(&["init", "examples/docs"]).failure(1);
    project.run(&["validate", "recipe.yaml"]).success();
    let run = project.run(&["run", "recipe.yaml", "--until", "judge"]);
    run.success();
    assert_eq!(run.ran(), ["chunk", "query-gen", "judge"], "{}", run.stderr);

    // Without a preset, the recipe matches the machine and still validates.
    let auto = project.run(&["init", "examples/docs", "--output", "auto.yaml"]);
    auto.success();
    project.run(&["validate", "auto.yaml"]).success();
}

#[test]
fn init_says_what_is_wrong_with_the_folder() {
    let project = Project::new();
    let missing = project.run(&["init", "nowhere"]);
    missing.failure(1);
    assert!(
        missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );
    project.write("empty/notes.bin", "x");
    let empty = project.run(&["init", "empty"]);
    empty.failure(1);
    assert!(empty.stderr.contains("no documents"), "{}", empty.stderr);
}

/// `plan` estimates each stage's time and peak memory on this machine before anything runs, and
/// a run refines what later estimates start from (the sizes it counted, the share it kept).
#[test]
fn plan_estimates_time_and_memory_per_stage_and_a_run_refines_it() {
    let project = Project::new();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docs"),
        &project.path("docs"),
    );
    project.write(
        "recipe.yaml",
        "name: estimated\nchunk:\n  input: docs\nquery_gen:\n  strategies: [ict]\njudge:\nmine:\ntrain:\n  max_steps: 4\nevaluate:\n",
    );
    let estimate_of = |plan: &crate::util::Run| -> serde_json::Value {
        plan.stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
            .find(|e| e["type"] == "estimate")
            .expect("an estimate event")
    };
    let stage = |estimate: &serde_json::Value, name: &str| -> serde_json::Value {
        estimate["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap_or_else(|| panic!("{name} in {estimate}"))["estimate"]
            .clone()
    };
    let plan = project.run(&["--json", "plan", "recipe.yaml"]);
    plan.success();
    let before = estimate_of(&plan);
    let train = stage(&before, "train");
    assert!(
        train["seconds"].as_f64().expect("seconds") > 0.0,
        "{before}"
    );
    // At least the model's weights, gradients and optimiser state (4 x 90 MB).
    assert!(
        train["peak_bytes"].as_u64().expect("bytes") > 360_000_000,
        "{before}"
    );
    assert!(
        ["measured", "calibrated"].contains(&train["basis"].as_str().expect("basis")),
        "{before}"
    );
    assert!(
        before["seconds"].as_f64().expect("total") >= train["seconds"].as_f64().expect("train")
    );

    let human = project.run(&["plan", "recipe.yaml"]);
    human.success();
    assert!(
        human.stdout.contains("time") && human.stdout.contains("memory"),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("estimate: about "),
        "{}",
        human.stdout
    );

    project
        .run(&["run", "recipe.yaml", "--until", "judge"])
        .success();
    let book: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::util::model_cache().join("speeds-v1.json"))
            .expect("the speed book"),
    )
    .expect("JSON");
    assert!(
        book.as_object()
            .expect("entries")
            .keys()
            .any(|k| k.starts_with("kept query-gen ict x")),
        "{book}"
    );
    let after = estimate_of(&project.run(&["--json", "plan", "recipe.yaml"]));
    // Cached stages cost nothing; mine starts from the queries the judge really kept.
    assert!(stage(&after, "query-gen").is_null(), "{after}");
    assert!(stage(&after, "mine").is_object(), "{after}");
}
