//! Issue 15: the user guide (`docs/guide.md`) and the README say only what works. Every
//! `ragd-pipe` line of a `sh` block must parse as a command; those that take seconds run, in
//! the guide's order, on a copy of the example documents; every recipe shown validates.
//! Commands that train or need a registered model (`run` without `--dry-run`, `report`,
//! `models use`, `models export`) are parsed, not run: the pipeline tests run them.

use std::path::Path;

use clap::Parser;
use ragd_pipe::cli::Cli;

use crate::util::{Project, copy_dir};

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative))
        .expect("the file exists")
}

/// The fenced blocks of a Markdown text tagged `lang`, as text.
fn blocks(markdown: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
            Some(block) if line.trim_start() == "```" => {
                found.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    found
}

fn project() -> Project {
    let project = Project::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    copy_dir(&examples.join("docs"), &project.path("examples/docs"));
    copy_dir(
        &examples.join("labelled"),
        &project.path("examples/labelled"),
    );
    project
}

/// Commands that train, or need a model registered by a finished run.
fn too_long_to_run(args: &[&str]) -> bool {
    match args {
        ["run", ..] => !args.contains(&"--dry-run"),
        ["report", ..] => true,
        ["models", "use" | "export", ..] => true,
        _ => false,
    }
}

#[test]
fn every_command_in_the_guide_parses_and_the_short_ones_run() {
    let guide = read("docs/guide.md");
    let commands: Vec<String> = blocks(&guide, "sh")
        .iter()
        .flat_map(|block| block.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| line.starts_with("ragd-pipe "))
        .collect();
    assert!(commands.len() >= 10, "{commands:?}");
    let project = project();
    let mut ran = 0;
    for command in &commands {
        let args: Vec<&str> = command.split_whitespace().collect();
        if let Err(error) = Cli::try_parse_from(&args) {
            panic!("`{command}` in docs/guide.md does not parse:\n{error}");
        }
        if too_long_to_run(&args[1..]) {
            continue;
        }
        let run = project.run(&args[1..]);
        // `status` exits 1 when something would run, which it does before any run.
        let allowed: &[i32] = if args[1] == "status" { &[0, 1] } else { &[0] };
        assert!(
            allowed.contains(&run.code),
            "`{command}` exited with {}\nstdout:\n{}\nstderr:\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} of the guide's commands ran");
}

#[test]
fn every_recipe_in_the_guide_and_the_readme_validates() {
    let project = project();
    let mut recipes: Vec<String> = blocks(&read("docs/guide.md"), "yaml");
    recipes.extend(blocks(&read("README.md"), "yaml"));
    let recipes: Vec<&String> = recipes
        .iter()
        .filter(|block| block.lines().any(|line| line.starts_with("name:")))
        .collect();
    assert!(recipes.len() >= 2, "{recipes:?}");
    for (index, recipe) in recipes.iter().enumerate() {
        let file = format!("shown-{index}.yaml");
        project.write(&file, recipe);
        let run = project.run(&["validate", &file]);
        assert_eq!(
            run.code, 0,
            "this recipe does not validate:\n{recipe}\n{}",
            run.stderr
        );
    }
}

#[test]
fn the_readme_links_the_guide_and_says_how_to_install() {
    let readme = read("README.md");
    assert!(readme.contains("(docs/guide.md)"), "no link to the guide");
    assert!(readme.contains("cargo install --path ."));
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("Cargo.toml names the Rust version");
    assert!(
        readme.contains(&format!("Rust {rust_version}")),
        "the README names Rust {rust_version}"
    );
    assert!(
        !readme.contains("<<<<<<<") && !readme.contains(">>>>>>>"),
        "merge markers"
    );
}
