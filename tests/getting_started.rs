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
        "Rough estimate:",
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
