//! Issue 2: every kind of recipe mistake is a located diagnostic (snapshots of exit code, stdout
//! and stderr together), never a panic or a bare serde message.

use crate::util::Project;

/// Validates `recipe` (with `docs/` present) and returns the normalised output.
fn diagnose(recipe: &str) -> String {
    let project = Project::new();
    project.write("docs/a.md", "# A\n\nText.\n");
    project.write("r.yaml", recipe);
    let run = project.run(&["validate", "r.yaml"]);
    assert_eq!(run.code, 1, "{}", run.snapshot());
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run.snapshot()
}

#[test]
fn yaml_syntax() {
    insta::assert_snapshot!(diagnose(
        "name: demo\nchunk:\n  input: docs\n  include: [\"*.md\"\n  overlap: 8\n"
    ));
}

#[test]
fn unknown_key_in_a_section() {
    insta::assert_snapshot!(diagnose(
        "name: demo\nchunk:\n  input: docs\n  max_tokns: 100\n"
    ));
}

#[test]
fn wrong_type() {
    insta::assert_snapshot!(diagnose("chunk:\n  input: docs\n  max_tokens: lots\n"));
}

#[test]
fn negative_number() {
    insta::assert_snapshot!(diagnose("chunk:\n  input: docs\n  overlap: -8\n"));
}

#[test]
fn value_out_of_range() {
    insta::assert_snapshot!(diagnose(
        "chunk:\n  input: docs\n  max_tokens: 4\n  overlap: 2\n"
    ));
}

#[test]
fn missing_corpus_path() {
    insta::assert_snapshot!(diagnose("chunk:\n  input: no/such/folder\n"));
}

#[test]
fn missing_required_key() {
    insta::assert_snapshot!(diagnose("name: demo\nchunk:\n  max_tokens: 100\n"));
}

#[test]
fn unknown_section() {
    insta::assert_snapshot!(diagnose("name: demo\nchnuk:\n  input: docs\n"));
}

#[test]
fn bad_override() {
    let project = Project::new();
    project.write("docs/a.md", "# A\n\nText.\n");
    project.write("r.yaml", "chunk:\n  input: docs\n");
    let run = project.run(&["validate", "r.yaml", "--set", "chunk.max_tokens=many"]);
    run.failure(1);
    insta::assert_snapshot!(run.snapshot());
}
