//! Issue 16: the dashboard's API through the real binary: the token and CSRF checks, the Host
//! check, uploads (row-by-row validation, size limit, path traversal) and the run queue after a
//! restart.

use std::path::Path;
use std::time::Duration;

use ragd_pipe::cache::store::{LockWait, WorkdirLock};
use reqwest::Method;

use crate::ui_server::UiServer;
use crate::util::Project;

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

#[test]
fn ui_refuses_to_bind_beyond_loopback_without_a_token() {
    let project = Project::new();
    let run = project.run(&["ui", "--host", "0.0.0.0", "--port", "0", "."]);
    run.failure(1);
    assert!(run.stderr.contains("--token"), "{}", run.stderr);
}

#[test]
fn ui_checks_the_token_on_every_request() {
    let project = Project::new();
    let server = UiServer::start(&project, &["--token", "s3cret-token"]);
    let client = UiServer::client();
    let status = |request: reqwest::blocking::RequestBuilder| {
        request.send().expect("answers").status().as_u16()
    };
    assert_eq!(status(client.get(format!("{}/", server.url))), 401);
    assert_eq!(status(client.get(format!("{}/api/runs", server.url))), 401);
    assert_eq!(
        status(
            client
                .get(format!("{}/runs", server.url))
                .bearer_auth("wrong-token!")
        ),
        401
    );
    assert_eq!(
        status(
            client
                .get(format!("{}/api/runs", server.url))
                .bearer_auth("s3cret-token")
        ),
        200
    );
    // The printed address carries the token once; a cookie keeps it for the next requests.
    let first = client
        .get(format!("{}/?token=s3cret-token", server.url))
        .send()
        .expect("answers");
    assert_eq!(first.status().as_u16(), 200);
    let cookie = first
        .headers()
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .expect("a cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    assert_eq!(
        status(
            client
                .get(format!("{}/models", server.url))
                .header("cookie", pair)
        ),
        200
    );
}

#[test]
fn ui_state_changes_need_the_csrf_token_and_a_loopback_host() {
    let project = Project::new();
    let server = UiServer::start(&project, &[]);
    let client = UiServer::client();
    let body = serde_json::json!({"recipe": "r.yaml"});
    for token in [None, Some("0123456789abcdef0123456789abcdef")] {
        let mut request = client.post(format!("{}/api/runs", server.url)).json(&body);
        if let Some(token) = token {
            request = request.header("X-CSRF-Token", token);
        }
        assert_eq!(request.send().expect("answers").status().as_u16(), 403);
    }
    let delete = client
        .delete(format!("{}/api/models/any", server.url))
        .send()
        .expect("answers");
    assert_eq!(delete.status().as_u16(), 403);
    // A page of another site that resolves its own name to 127.0.0.1 (DNS rebinding).
    let rebound = client
        .get(format!("{}/api/runs", server.url))
        .header("host", "attacker.example:80")
        .send()
        .expect("answers");
    assert_eq!(rebound.status().as_u16(), 421);
    // With the page's token the same request reaches the handler (and is refused there: no
    // such recipe).
    let (status, answer) = server.send(Method::POST, "/api/runs", Some(&body));
    assert_eq!(status, 422, "{answer}");
}

fn upload(server: &UiServer, name: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let response = UiServer::client()
        .post(format!("{}/api/datasets", server.url))
        .query(&[("name", name)])
        .header("X-CSRF-Token", server.csrf())
        .body(body)
        .send()
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or_default())
}

#[test]
fn ui_upload_names_every_bad_row_and_keeps_only_good_files() {
    let project = Project::new();
    let server = UiServer::start(&project, &["--max-upload-mib", "1"]);
    let good = std::fs::read(examples().join("train/train.jsonl")).expect("example data");
    let mut broken = good.clone();
    broken.extend_from_slice(b"{\"query\": \"where are snapshots\", \"positive_id\": \"x\", \"source_document\": \"a.md\"}\n");
    broken.extend_from_slice(b"{\"query\": \"q\", \"positive\": \"p\", \"positive_id\": \"x\", \"negatives\": [{\"id\": 1, \"text\": \"t\"}], \"source_document\": \"a.md\"}\n");
    let (status, answer) = upload(&server, "broken.jsonl", broken);
    assert_eq!(status, 422, "{answer}");
    let problems: Vec<(u64, &str)> = answer["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["line"].as_u64().unwrap_or(0),
                p["field"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(problems, [(65, "positive"), (66, "negatives[0].id")]);

    let (status, answer) = upload(&server, "tidewater.jsonl", good.clone());
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["usable"], 64);
    let page = server
        .get(&format!("/datasets/{}", answer["id"]))
        .text()
        .expect("page");
    assert!(page.contains("64 usable rows"), "{page}");
    let kept: Vec<String> = std::fs::read_dir(project.path(".ragd-ui/datasets"))
        .expect("datasets folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].ends_with("-tidewater.jsonl"), "{kept:?}");

    // No name from the client reaches the filesystem: folders, `..` and hidden names are refused.
    for name in [
        "../../escaped.jsonl",
        "..%2fescaped.jsonl",
        "/tmp/escaped.jsonl",
        ".escaped.jsonl",
    ] {
        let (status, answer) = upload(&server, name, good.clone());
        assert_eq!(status, 400, "{name}: {answer}");
    }
    assert!(!project.root().join("../escaped.jsonl").exists());
    assert!(!project.path("escaped.jsonl").exists());

    let (status, _) = upload(&server, "big.jsonl", vec![b'\n'; 1024 * 1024 + 1]);
    assert_eq!(status, 413);
}

const CHUNK_ONLY: &str = "name: queued\nchunk:\n  input: docs\n";

#[test]
fn ui_queue_survives_a_restart() {
    let project = Project::new();
    project.write("docs/a.md", "# Tides\n\nThe tide comes in twice a day.\n");
    project.write("queued.yaml", CHUNK_ONLY);
    // Another run holds the workdir: the first queued run waits on it, the second stays queued.
    let held = WorkdirLock::acquire(&project.path(".ragd-pipe"), LockWait::Fail, &mut |_| {})
        .expect("the workdir lock");
    let server = UiServer::start(&project, &[]);
    let queue = serde_json::json!({"recipe": "queued.yaml"});
    let (status, first) = server.send(Method::POST, "/api/runs", Some(&queue));
    assert_eq!(status, 200, "{first}");
    let (_, second) = server.send(Method::POST, "/api/runs", Some(&queue));
    let (_, third) = server.send(Method::POST, "/api/runs", Some(&queue));
    let first = first["id"].as_i64().expect("id");
    let second = second["id"].as_i64().expect("id");
    let third = third["id"].as_i64().expect("id");
    // The queue marks a run running before it spawns it, and records the pid just after.
    let running = server.wait_for_run_where(
        first,
        Duration::from_secs(30),
        "running with a pid",
        |run| run["run"]["status"] == "running" && run["run"]["pid"].is_i64(),
    );
    let child = running["run"]["pid"].as_i64().expect("a pid");
    let (status, cancelled) = server.send(Method::POST, &format!("/api/runs/{third}/cancel"), None);
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    // The dashboard and its run die as in a crash.
    server.kill();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.to_string()])
        .stderr(std::process::Stdio::null())
        .status();

    let server = UiServer::start(&project, &[]);
    let runs: serde_json::Value = server.get("/api/runs").json().expect("JSON");
    let status_of = |id: i64| {
        runs["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["run"]["id"] == id)
            .map(|r| r["run"]["status"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(status_of(first).as_deref(), Some("interrupted"));
    assert!(
        matches!(status_of(second).as_deref(), Some("queued" | "running")),
        "{runs}"
    );
    assert_eq!(status_of(third).as_deref(), Some("cancelled"));
    drop(held);
    let done = server.wait_for_run(second, &["done", "failed"], Duration::from_secs(60));
    assert_eq!(done["run"]["status"], "done", "{done}\n{}", server.stderr());
    let page = server.get(&format!("/runs/{second}")).text().expect("page");
    assert!(page.contains("data-stage=\"chunk\""), "{page}");
}

/// Launching a second run under the name of one still queued or running would rewrite the
/// recipe file that run reads: refused, while another name is fine.
#[test]
fn ui_refuses_to_relaunch_a_name_whose_run_is_not_finished() {
    let project = Project::new();
    project.write("docs/a.md", "# Tides\n\nThe tide comes in twice a day.\n");
    // The wizard's recipes live in the dashboard's state; their workdir is beside them.
    let workdir = project.path(".ragd-ui/recipes/.ragd-pipe");
    std::fs::create_dir_all(&workdir).expect("workdir");
    let held = WorkdirLock::acquire(&workdir, LockWait::Fail, &mut |_| {}).expect("the lock");
    let server = UiServer::start(&project, &[]);
    let text = format!(
        "name: same\nchunk:\n  input: {}\n",
        project.path("docs").display()
    );
    let launch = |name: &str| {
        server.send(
            Method::POST,
            "/api/runs",
            Some(&serde_json::json!({"text": text, "name": name})),
        )
    };
    let (status, first) = launch("same");
    assert_eq!(status, 200, "{first}");
    let (status, refused) = launch("same");
    assert_eq!(status, 409, "{refused}");
    assert!(refused.to_string().contains("another name"), "{refused}");
    let (status, other) = launch("other");
    assert_eq!(status, 200, "{other}");
    drop(held);
    let first = first["id"].as_i64().expect("id");
    let done = server.wait_for_run(first, &["done", "failed"], Duration::from_secs(60));
    assert_eq!(done["run"]["status"], "done", "{done}\n{}", server.stderr());
}

/// The models page's GGUF link: a registered model comes back as one f16 GGUF file, exported on
/// demand (register may not have written one), named for the download.
#[test]
fn ui_downloads_a_registered_model_as_one_gguf_file() {
    let project = Project::new();
    crate::util::copy_dir(
        &crate::train::base_model_dir(),
        &project.path(".ragd-home/models/mini"),
    );
    project.write(
        ".ragd-home/models/mini/training_metadata.json",
        r#"{"base_model": "sentence-transformers/all-MiniLM-L6-v2"}"#,
    );
    let server = UiServer::start(&project, &[]);
    let page = server.get("/models").text().expect("the models page");
    assert!(page.contains("/api/models/mini/gguf"), "{page}");
    let response = server.get("/api/models/mini/gguf");
    assert_eq!(response.status(), 200);
    let disposition = response
        .headers()
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(disposition.contains("mini-f16.gguf"), "{disposition}");
    let bytes = response.bytes().expect("the file");
    assert_eq!(&bytes[..4], b"GGUF");
    // 22.7 M parameters at two bytes each, and the vocabulary.
    assert!(bytes.len() > 40_000_000, "{} bytes", bytes.len());
    assert_eq!(server.get("/api/models/nowhere/gguf").status(), 404);
}
