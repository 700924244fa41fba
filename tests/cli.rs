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
