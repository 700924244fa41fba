//! The dashboard as the tests drive it: `ragd-pipe ui --port 0` on a test project, its address
//! read from the line it prints, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::Project;

pub(crate) struct UiServer {
    child: Child,
    pub(crate) url: String,
    /// The rest of the server's stderr, collected in the background.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl UiServer {
    /// Starts the dashboard on `project` with extra arguments; panics with its output if it
    /// does not come up.
    pub(crate) fn start(project: &Project, args: &[&str]) -> Self {
        let mut command = project.command(&["ui", "--port", "0"]);
        command
            .args(args)
            .arg(".")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        let mut seen = String::new();
        let url = loop {
            line.clear();
            let read = reader.read_line(&mut line).expect("read stderr");
            assert!(read > 0, "the dashboard did not start:\n{seen}");
            seen.push_str(&line);
            if let Some(rest) = line.split("dashboard on ").nth(1) {
                let url = rest.split_whitespace().next().expect("an address");
                break url
                    .split('?')
                    .next()
                    .unwrap_or(url)
                    .trim_end_matches('/')
                    .to_owned();
            }
        };
        let collected = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let sink = collected.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().expect("stderr buffer").push_str(&(line + "\n"));
            }
        });
        Self {
            child,
            url,
            stderr: collected,
        }
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    pub(crate) fn client() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client")
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::blocking::Response {
        Self::client()
            .get(format!("{}{path}", self.url))
            .send()
            .expect("the dashboard answers")
    }

    /// The CSRF token the pages carry.
    pub(crate) fn csrf(&self) -> String {
        let page = self.get("/").text().expect("a page");
        let start = page
            .find("name=\"csrf-token\" content=\"")
            .expect("the page carries a CSRF token")
            + "name=\"csrf-token\" content=\"".len();
        page[start..start + 32].to_owned()
    }

    /// A JSON request with the CSRF token.
    pub(crate) fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = Self::client()
            .request(method, format!("{}{path}", self.url))
            .header("X-CSRF-Token", self.csrf());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().expect("the dashboard answers");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or_default())
    }

    /// Polls `GET /api/runs` until run `id` has one of `statuses`; its row.
    pub(crate) fn wait_for_run(
        &self,
        id: i64,
        statuses: &[&str],
        limit: Duration,
    ) -> serde_json::Value {
        self.wait_for_run_where(id, limit, &format!("{statuses:?}"), |run| {
            statuses.iter().any(|s| run["run"]["status"] == *s)
        })
    }

    /// Polls `GET /api/runs` until run `id`'s row satisfies `ready` (`what` names it in the
    /// failure); the row.
    pub(crate) fn wait_for_run_where(
        &self,
        id: i64,
        limit: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let runs: serde_json::Value = self.get("/api/runs").json().expect("JSON");
            let run = runs["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["run"]["id"] == id)
                .cloned()
                .unwrap_or_default();
            if ready(&run) {
                return run;
            }
            assert!(
                started.elapsed() < limit,
                "run {id} is not {what} after {limit:?}: {run}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL: the dashboard dies as in a crash.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        // SIGINT first, as Ctrl-C: the server interrupts its run and records it.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            // A server the test already killed has no process to signal.
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
