//! Regressions of issue 18 (bad input never kills the process, nothing cached is stale), on the
//! real binary with the chunk stage.

use crate::util::Project;

const RECIPE: &str = "name: demo\nchunk:\n  input: docs\n  max_tokens: 64\n  overlap: 8\n";

fn project() -> Project {
    let project = Project::new();
    project.write("recipe.yaml", RECIPE);
    project.write(
        "docs/guide.md",
        "# Guide\n\nSnapshots are kept for thirty days and then deleted.\n",
    );
    project
}

#[test]
fn r18_13_an_unreadable_document_is_skipped_not_fatal() {
    let project = project();
    // Unreadable even for root, which ignores `chmod 000`: reading `/proc/self/mem` at offset 0
    // fails with an I/O error, as a file on a failing disk or another user's file does.
    std::os::unix::fs::symlink("/proc/self/mem", project.path("docs/secret.md")).expect("link");
    project.run(&["plan", "recipe.yaml"]).success();
    // Exit 1: chunk would run.
    project.run(&["status", "recipe.yaml"]).failure(1);
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert_eq!(run.ran(), ["chunk"]);
    assert!(run.stderr.contains("secret.md"), "{}", run.stderr);
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert!(run.ran().is_empty(), "{}", run.stderr);
}

#[test]
fn r18_15_read_only_commands_do_not_write_the_workdir() {
    let project = project();
    project.run(&["run", "recipe.yaml"]).success();
    // Writes that fail whoever runs the test (root ignores permissions): the digest memo's
    // place is taken by a folder, and the run-log folder by a file.
    let workdir = project.path(".ragd-pipe");
    // The memo exists only if a file was old enough to be memoised.
    let _ = std::fs::remove_file(workdir.join("digests-v1.json"));
    std::fs::create_dir(workdir.join("digests-v1.json")).expect("folder");
    std::fs::remove_dir_all(workdir.join("runs")).expect("runs");
    std::fs::write(workdir.join("runs"), "").expect("file");
    for command in [
        &["status", "recipe.yaml"][..],
        &["plan", "recipe.yaml"],
        &["run", "recipe.yaml", "--dry-run"],
    ] {
        let run = project.run(command);
        run.success();
        assert!(!run.stdout.contains("will run"), "{}", run.stdout);
    }
}

#[test]
fn r18_16_an_unreadable_lock_says_how_to_recover() {
    let project = project();
    project.write("recipe.lock", "format: [not, a, lock\n");
    let status = project.run(&["status", "recipe.yaml"]);
    status.failure(2);
    assert!(
        status.stderr.contains("restore it from version control"),
        "{}",
        status.stderr
    );
}

#[test]
fn r18_14_an_unreachable_llm_server_fails_only_the_stages_that_need_it() {
    let project = project();
    project.write(
        "recipe.yaml",
        &format!(
            "{RECIPE}query_gen:\n  strategies: [llm]\n  llm:\n    backend: ollama\n    url: http://127.0.0.1:9\n    max_retries: 0\n"
        ),
    );
    let plan = project.run(&["plan", "recipe.yaml"]);
    plan.success();
    assert!(plan.stdout.contains("identity unknown"), "{}", plan.stdout);
    project.run(&["status", "recipe.yaml"]).failure(1);
    let until = project.run(&["run", "recipe.yaml", "--until", "chunk"]);
    until.success();
    assert_eq!(until.ran(), ["chunk"]);

    let run = project.run(&["run", "recipe.yaml"]);
    run.failure(2);
    assert!(run.stderr.contains("query-gen"), "{}", run.stderr);
    let logs: Vec<String> = std::fs::read_dir(project.path(".ragd-pipe/runs"))
        .expect("runs")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("log"))
        .collect();
    assert!(
        logs.iter().any(|log| log.contains("\"stage-failed\"")),
        "{logs:?}"
    );
}

#[test]
fn r18_6_a_long_one_line_document_chunks_in_bounded_memory() {
    use std::os::unix::process::CommandExt;

    let project = project();
    // 10 MB on one line: one section and one paragraph, encoded at once before (about 100 bytes
    // per byte of text at the peak).
    let sentence = "Backups of the payroll database run nightly and are kept for ninety days. ";
    project.write(
        "docs/long.txt",
        &sentence.repeat(10_000_000 / sentence.len()),
    );
    let mut command = project.command(&["run", "recipe.yaml"]);
    // SAFETY: `setrlimit` is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: DATA_LIMIT,
                rlim_max: DATA_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let output = command.output().expect("the binary runs");
    assert!(
        output.status.success(),
        "{:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The heap (and other private writable memory) the run above may use: the chunks themselves
/// and the tokenizer take a few hundred megabytes; the whole document's encoding took a gigabyte.
const DATA_LIMIT: libc::rlim_t = 600 << 20;
