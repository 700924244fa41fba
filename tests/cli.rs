//! Commands that need no stage to run.

use crate::util::Project;

#[test]
fn committed_schema_is_current() {
    let project = Project::new();
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/recipe.schema.json");
    project.run(&["schema", "--check", schema]).success();
}

#[test]
fn a_stale_schema_is_reported() {
    let project = Project::new();
    project.write("old.json", "{}\n");
    let run = project.run(&["schema", "--check", "old.json"]);
    run.failure(1);
    assert!(run.stderr.contains("is stale"), "{}", run.stderr);
}

#[test]
#[allow(clippy::print_stderr)]
fn every_recipe_in_the_repo_starts_with_the_schema_line_and_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes");
    let project = Project::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("recipes/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).expect("read recipe");
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schemas/recipe.schema.json"),
            "{} lacks the schema line",
            path.display()
        );
        // A recipe over data that only development machines hold says so in a `# data:` line;
        // elsewhere it cannot validate (its corpus is missing), which is what users would see.
        let needs = text
            .lines()
            .filter_map(|line| line.strip_prefix("# data: "))
            .map(|data| path.parent().expect("recipes/").join(data.trim()))
            .find(|data| !data.exists());
        if let Some(data) = needs {
            eprintln!(
                "skipped validating {}: its data `{}` is not on this machine",
                path.display(),
                data.display()
            );
            continue;
        }
        let path = path.display().to_string();
        project.run(&["validate", &path]).success();
    }
    assert!(seen >= 1, "no recipes found");
}

#[test]
fn validate_reports_a_bad_recipe_with_exit_1() {
    let project = Project::new();
    project.write("r.yaml", "name: demo\nsede: 3\n");
    let run = project.run(&["validate", "r.yaml"]);
    run.failure(1);
    insta::assert_snapshot!(run.snapshot());
}

#[test]
fn json_diagnostics_go_to_stdout() {
    let project = Project::new();
    project.write("r.yaml", "name: demo\nsede: 3\n");
    let run = project.run(&["--json", "validate", "r.yaml"]);
    run.failure(1);
    let event: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON line");
    assert_eq!(event["type"], "diagnostic");
    assert_eq!(event["diagnostic"]["code"], "ragd::recipe::unknown_key");
}

/// A model folder as the registry holds one (the files `models` commands look at).
fn registered_model(project: &Project, name: &str) {
    let dir = format!(".ragd-home/models/{name}");
    project
        .write(&format!("{dir}/modules.json"), "[]\n")
        .write(&format!("{dir}/config.json"), "{}\n")
        .write(&format!("{dir}/model.safetensors"), "")
        .write(
            &format!("{dir}/training_metadata.json"),
            r#"{"base_model": "sentence-transformers/all-MiniLM-L6-v2",
                "metrics": {"held-out": {"base": {"ndcg@10": 0.5}, "fine-tuned": {"ndcg@10": 0.55}},
                            "mine": {"base": {"ndcg@10": 0.8}, "fine-tuned": {"ndcg@10": 0.86}}},
                "evaluation_regression": false}"#,
        );
}

#[test]
fn models_rm_refuses_the_model_ragd_uses_and_use_keeps_a_backup() {
    let project = Project::new();
    registered_model(&project, "mine");
    registered_model(&project, "other");
    project.write(
        ".ragd-home/config.yaml",
        "# my settings\nllm:\n  model: x\n",
    );

    let used = project.run(&["models", "use", "mine"]);
    used.success();
    assert!(used.stderr.contains("re-index"), "{}", used.stderr);
    assert_eq!(
        project.read(".ragd-home/config.yaml.bak"),
        "# my settings\nllm:\n  model: x\n",
        "the config before the edit is kept"
    );

    let refused = project.run(&["models", "rm", "mine"]);
    refused.failure(1);
    assert!(
        refused.stderr.contains("is ragd's embedding model"),
        "{}",
        refused.stderr
    );
    assert!(project.path(".ragd-home/models/mine/config.json").is_file());
    project.run(&["models", "rm", "other"]).success();
    project.run(&["models", "rm", "mine", "--force"]).success();
    assert!(!project.path(".ragd-home/models/mine").exists());
}

#[test]
fn models_list_shows_the_fine_tuned_score_the_base_the_gain_and_the_verdict() {
    let project = Project::new();
    registered_model(&project, "mine");
    let list = project.run(&["models", "list"]);
    list.success();
    let lines: Vec<&str> = list.stdout.lines().collect();
    for column in ["nDCG@10", "base", "gain", "verdict"] {
        assert!(lines[0].contains(column), "{}", list.stdout);
    }
    // The labelled set (`mine`) is the headline, not the held-out one.
    assert!(
        lines[1].contains("0.860") && lines[1].contains("0.800") && lines[1].contains("+0.060"),
        "{}",
        list.stdout
    );
    assert!(lines[1].contains("not worse"), "{}", list.stdout);
    let json = project.run(&["models", "list", "--json"]);
    json.success();
    let entry: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("one line");
    assert_eq!(entry["type"], "model");
    assert_eq!(entry["verdict"], "not worse");
}

#[test]
fn plan_refuses_to_force_a_stage_the_recipe_does_not_have() {
    let project = Project::new();
    project
        .write("docs/a.md", "# A\n\nSome text.\n")
        .write("recipe.yaml", "name: t\nchunk:\n  input: docs\n");
    let plan = project.run(&["plan", "recipe.yaml", "--force", "chnk"]);
    plan.failure(1);
    assert!(plan.stderr.contains("no stage `chnk`"), "{}", plan.stderr);
}

#[test]
fn completions_are_generated_for_bash() {
    let project = Project::new();
    let run = project.run(&["completions", "bash"]);
    run.success();
    assert!(
        run.stdout.contains("complete -F _ragd__pipe"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("init"));
}

#[test]
fn every_positional_argument_is_described_in_help() {
    let project = Project::new();
    for command in [
        &["init", "--help"][..],
        &["run", "--help"],
        &["report", "--help"],
        &["models", "show", "--help"],
        &["models", "rm", "--help"],
        &["models", "use", "--help"],
        &["models", "export", "--help"],
        &["completions", "--help"],
    ] {
        let run = project.run(command);
        run.success();
        let lines: Vec<&str> = run
            .stdout
            .split("Arguments:")
            .nth(1)
            .and_then(|rest| rest.split("\nOptions:").next())
            .unwrap_or_default()
            .lines()
            .collect();
        for (index, line) in lines.iter().enumerate() {
            // Arguments are indented by two spaces; their descriptions and defaults by more.
            if !(line.starts_with("  [") || line.starts_with("  <")) {
                continue;
            }
            let argument = line.trim_start();
            // The description follows on the same line, or (long help) on the next.
            let described = argument.split_once("  ").is_some()
                || lines
                    .get(index + 1)
                    .is_some_and(|next| next.trim().len() > 1 && next.starts_with("          "));
            assert!(
                described,
                "{command:?}: `{argument}` has no description\n{}",
                run.stdout
            );
        }
    }
}
