//! Issue 2: caching, reruns and their reasons, crash safety, corruption and concurrency, on the
//! real binary with the chunk stage.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::Project;

const RECIPE: &str = "name: demo\nchunk:\n  input: docs\n  max_tokens: 64\n  overlap: 8\n";

fn project_with_docs(files: usize) -> Project {
    let project = Project::new();
    project.write("recipe.yaml", RECIPE);
    for i in 0..files {
        project.write(
            &format!("docs/part{}/doc{i:04}.md", i % 7),
            &format!(
                "# Document {i}\n\nThe retention policy {i} keeps daily snapshots for {} days.\n\n## Details\n\n{}\n",
                i % 30 + 1,
                "Repositories deduplicate chunks before they are encrypted and uploaded. ".repeat(i % 5 + 1)
            ),
        );
    }
    project
}

/// The committed artifact folder of the chunk stage, from the lock.
fn chunk_artifact(project: &Project) -> PathBuf {
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&project.read("recipe.lock")).expect("lock parses");
    let key = lock["stages"]["chunk"]["key"].as_str().expect("chunk key");
    project.path(&format!(".ragd-pipe/store-v1/{key}"))
}

#[test]
fn a_second_run_reruns_nothing_and_says_so() {
    let project = project_with_docs(5);
    let first = project.run(&["run", "recipe.yaml"]);
    first.success();
    assert_eq!(first.ran(), ["chunk"]);
    let second = project.run(&["run", "recipe.yaml"]);
    second.success();
    assert!(second.ran().is_empty(), "{}", second.stderr);
    assert!(
        second.stderr.contains("✓ chunk: cached"),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("nothing to do"), "{}", second.stderr);
}

#[test]
fn a_parameter_change_reruns_the_stage_and_names_the_parameter() {
    let project = project_with_docs(5);
    project.run(&["run", "recipe.yaml"]).success();
    let plan = project.run(&["plan", "recipe.yaml", "--set", "chunk.max_tokens=48"]);
    plan.success();
    let chunk = plan
        .stdout
        .lines()
        .find(|l| l.starts_with("chunk "))
        .unwrap_or_default();
    assert!(
        chunk.contains("will run")
            && chunk.contains("parameter changed: `chunk.max_tokens` 64 → 48"),
        "{}",
        plan.stdout
    );
    let run = project.run(&["run", "recipe.yaml", "--set", "chunk.max_tokens=48"]);
    run.success();
    assert_eq!(run.ran(), ["chunk"]);
    // A key written out with its default value changes nothing.
    project.write(
        "recipe.yaml",
        &format!("{RECIPE}  include: ['**/*.{{md,markdown,txt,rst,html,htm,pdf}}']\n"),
    );
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert!(run.ran().is_empty(), "{}", run.stderr);
}

#[test]
fn touching_one_file_reruns_chunk_naming_the_file() {
    let project = project_with_docs(5);
    project.run(&["run", "recipe.yaml"]).success();
    let before =
        std::fs::read_to_string(chunk_artifact(&project).join("chunks.jsonl")).expect("chunks");
    project.write("docs/part2/doc0002.md", "# Document 2\n\nEdited.\n");
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert_eq!(
        run.stage_lines()[0],
        "▶ chunk: running (input `corpus` changed: modified `part2/doc0002.md`)"
    );
    // Only the edited file's chunks changed their ids.
    let after =
        std::fs::read_to_string(chunk_artifact(&project).join("chunks.jsonl")).expect("chunks");
    // Chunk ids of one source file (`only`), or of every other file.
    let ids = |text: &str, source: &str, only: bool| -> Vec<String> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .filter(|c| (c["source"].as_str() == Some(source)) == only)
            .map(|c| c["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let edited = "part2/doc0002.md";
    assert_eq!(ids(&before, edited, false), ids(&after, edited, false));
    assert_ne!(ids(&before, edited, true), ids(&after, edited, true));
    assert!(!ids(&after, edited, true).is_empty());
}

#[test]
fn a_damaged_artifact_is_detected_and_recomputed() {
    let project = project_with_docs(5);
    project.run(&["run", "recipe.yaml"]).success();
    let chunks = chunk_artifact(&project).join("chunks.jsonl");
    let good = std::fs::read(&chunks).expect("chunks");
    let mut bad = good.clone();
    bad[10] ^= 0x20;
    std::fs::write(&chunks, bad).expect("corrupt");
    let run = project.run(&["run", "recipe.yaml"]);
    run.success();
    assert_eq!(
        run.stage_lines()[0],
        "▶ chunk: running (cached artifact is damaged: `chunks.jsonl` does not match its recorded hash)"
    );
    assert_eq!(std::fs::read(&chunks).expect("chunks"), good);
}

#[test]
fn a_run_killed_at_any_moment_then_rerun_gives_the_same_output() {
    // Enough files that chunking takes a while, so kills land inside the stage.
    let reference = project_with_docs(1500);
    reference.run(&["run", "recipe.yaml"]).success();
    let expected = std::fs::read(chunk_artifact(&reference).join("chunks.jsonl")).expect("chunks");

    let project = project_with_docs(1500);
    for delay_ms in [5u64, 40, 120, 250, 500] {
        let mut child = project
            .command(&["run", "recipe.yaml", "--force", "chunk"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SIGKILL: no destructor, no cleanup runs.
        child.kill().expect("kill");
        child.wait().expect("wait");
        // Whatever the moment, the store holds no half artifact: each entry verifies or is absent.
        let store = project.path(".ragd-pipe/store-v1");
        if let Ok(entries) = std::fs::read_dir(&store) {
            for entry in entries {
                let dir = entry.expect("entry").path();
                assert!(
                    dir.join("ragd-artifact.json").is_file(),
                    "half artifact at {}",
                    dir.display()
                );
            }
        }
        let rerun = project.run(&["run", "recipe.yaml"]);
        rerun.success();
        let actual = std::fs::read(chunk_artifact(&project).join("chunks.jsonl")).expect("chunks");
        assert!(
            actual == expected,
            "output differs after a kill at {delay_ms} ms"
        );
    }
}

#[test]
fn concurrent_runs_do_not_corrupt_the_store() {
    let project = project_with_docs(800);
    let spawn = || {
        project
            .command(&["run", "recipe.yaml"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let started = Instant::now();
    let children: Vec<_> = (0..3).map(|_| spawn()).collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    assert!(started.elapsed() < Duration::from_secs(120));
    for output in &outputs {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stderr: Vec<String> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    // One run chunked; the others waited for it and then found the artifact cached.
    let ran = stderr
        .iter()
        .filter(|s| s.contains("▶ chunk: running"))
        .count();
    assert_eq!(ran, 1, "{stderr:#?}");
    assert!(
        stderr
            .iter()
            .any(|s| s.contains("waiting for it to finish")),
        "{stderr:#?}"
    );
    let verify = project.run(&["status", "recipe.yaml"]);
    verify.success();
    assert!(
        verify.stdout.contains("chunk  present"),
        "{}",
        verify.stdout
    );
}

#[test]
fn no_wait_fails_clearly_while_another_run_holds_the_workdir() {
    let project = project_with_docs(1500);
    let mut child = project
        .command(&["run", "recipe.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until the first run holds the lock.
    let lock = project.path(".ragd-pipe/run.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = project.run(&["run", "recipe.yaml", "--no-wait"]);
    child.wait().expect("wait");
    if second.code == 0 {
        // The first run finished before the second looked; nothing to assert about waiting.
        return;
    }
    second.failure(2);
    assert!(
        second.stderr.contains("is using the workdir"),
        "{}",
        second.stderr
    );
}

#[test]
fn status_on_a_fresh_clone_compares_with_the_lock() {
    let project = project_with_docs(3);
    project.run(&["run", "recipe.yaml"]).success();
    // A fresh clone: the recipe, its lock and the documents, but no workdir.
    std::fs::remove_dir_all(project.path(".ragd-pipe")).expect("remove workdir");
    let status = project.run(&["status", "recipe.yaml"]);
    // Something would rerun: exit 1, like `git diff --exit-code`.
    status.failure(1);
    assert!(
        status.stdout.contains("chunk  missing  yes        in sync"),
        "{}",
        status.stdout
    );
    project.write("docs/part0/doc0000.md", "# Changed\n\nNew text.\n");
    let status = project.run(&["status", "recipe.yaml"]);
    assert!(
        status.stdout.contains("changed: input `corpus` changed"),
        "{}",
        status.stdout
    );
}

#[test]
fn gc_removes_only_unreferenced_artifacts() {
    let project = project_with_docs(3);
    project.run(&["run", "recipe.yaml"]).success();
    let old = chunk_artifact(&project);
    project
        .run(&["run", "recipe.yaml", "--set", "chunk.max_tokens=32"])
        .success();
    // The lock now references the new key; the old artifact is garbage.
    let gc = project.run(&["gc", "recipe.yaml", "--set", "chunk.max_tokens=32"]);
    gc.success();
    assert!(
        gc.stdout.contains("removed 1 unreferenced artifact"),
        "{}",
        gc.stdout
    );
    assert!(!old.exists());
    assert!(chunk_artifact(&project).exists());
}

#[test]
fn json_events_describe_the_run() {
    let project = project_with_docs(3);
    let run = project.run(&["--json", "run", "recipe.yaml"]);
    run.success();
    let types: Vec<String> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .filter(|t| t != "stage-progress" && t != "stage-note")
        .collect();
    assert_eq!(
        types,
        [
            "plan",
            "stage-start",
            "stage-table",
            "stage-done",
            "summary"
        ]
    );
    // The same events are in the run log.
    let runs: Vec<_> = std::fs::read_dir(project.path(".ragd-pipe/runs"))
        .expect("runs")
        .collect();
    assert_eq!(runs.len(), 1);
}

/// A project with documents and a one-question BEIR dataset, whose recipe `recipe` may name.
fn project_with_dataset(recipe: &str) -> Project {
    let project = project_with_docs(3);
    project.write("recipe.yaml", recipe);
    project.write(
        "data/corpus.jsonl",
        "{\"_id\": \"d1\", \"text\": \"Snapshots are kept for thirty days.\"}\n",
    );
    project.write(
        "data/queries.jsonl",
        "{\"_id\": \"q1\", \"text\": \"How long are snapshots kept?\"}\n",
    );
    project.write(
        "data/qrels/test.tsv",
        "query-id\tcorpus-id\tscore\nq1\td1\t1\n",
    );
    project
}

/// Each stage's planned key, by stage, for `plan recipe.yaml` with `extra` arguments.
fn planned_keys(project: &Project, extra: &[&str]) -> Vec<(String, String)> {
    let plan = project.run(&[&["--json", "plan", "recipe.yaml"], extra].concat());
    plan.success();
    let event: serde_json::Value =
        serde_json::from_str(plan.stdout.lines().next().expect("the plan event")).expect("JSON");
    event["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["stage"].to_string(), s["key"].to_string()))
        .collect()
}

const EVALUATE_RECIPE: &str = "name: moved\nchunk:\n  input: docs\nevaluate:\n  heldout: false\n  datasets:\n    - path: data\n      name: tiny\n";

/// Keys name every input file relative to its folder: the same project in another place (a
/// clone, a moved folder) plans the same keys for every stage, BEIR datasets included.
#[test]
fn a_project_in_another_folder_plans_the_same_keys() {
    let first = planned_keys(&project_with_dataset(EVALUATE_RECIPE), &[]);
    let second = planned_keys(&project_with_dataset(EVALUATE_RECIPE), &[]);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first, second);
}

/// `encode_precision: bf16` changes the key of a stage that embeds (evaluate) and of no other;
/// f32, written out, is the default and changes nothing.
#[test]
fn bf16_encoding_enters_the_keys_of_the_stages_that_embed() {
    let project = project_with_dataset(EVALUATE_RECIPE);
    let f32 = planned_keys(&project, &[]);
    let written = planned_keys(&project, &["--set", "encode_precision=f32"]);
    let bf16 = planned_keys(&project, &["--set", "encode_precision=bf16"]);
    assert_eq!(f32, written);
    assert_eq!(f32[0], bf16[0], "chunk does not embed");
    assert_eq!(f32[1].0, bf16[1].0);
    assert_ne!(f32[1].1, bf16[1].1, "evaluate embeds in bf16: another key");
}
