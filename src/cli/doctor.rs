//! `ragd-pipe doctor`: what this build and machine offer for running models, so a user knows which
//! `accelerator:` to write before a long run; and whether the places ragd-pipe reads and writes
//! (the download caches, the registry, ragd's config, a configured Ollama server) are usable.

use std::path::Path;

use serde::Serialize;

use super::Failure;
use crate::model::device;
use crate::model::hub::HubConfig;
use crate::model::kernels::bf16::Engine;
use crate::output::{Printer, table};
use crate::registry;

/// One check of the environment: what was looked at and what was found.
#[derive(Debug, Serialize)]
struct Check {
    check: String,
    found: String,
    /// False when something there will fail a run or `models use`.
    ok: bool,
}

impl Check {
    fn new(check: impl Into<String>, found: impl Into<String>, ok: bool) -> Self {
        Self {
            check: check.into(),
            found: found.into(),
            ok,
        }
    }
}

pub(super) fn execute(printer: &Printer) -> Result<(), Failure> {
    let report = device::doctor();
    let checks = environment_checks();
    let bf16 = Engine::here();
    if printer.json {
        let mut json = super::typed("doctor", &report);
        json["checks"] = serde_json::to_value(&checks).unwrap_or_default();
        json["bf16_encoding"] = serde_json::json!({
            "engine": bf16.name(),
            "faster_than_f32": bf16.multiplies_bf16(),
        });
        printer.json_line(&json);
        return Ok(());
    }
    let mut rows = vec![vec![
        "compiled backends".to_owned(),
        report.compiled_backends.join(", "),
    ]];
    for probe in &report.devices {
        rows.push(vec![
            format!("{} device 0", probe.name),
            probe
                .error
                .clone()
                .unwrap_or_else(|| "available".to_owned()),
        ]);
    }
    rows.push(vec!["accelerator: auto".to_owned(), report.auto.clone()]);
    rows.push(vec![
        "cpu threads".to_owned(),
        report.cpu_threads.to_string(),
    ]);
    let features: Vec<&str> = report
        .cpu_features
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();
    rows.push(vec![
        "cpu features".to_owned(),
        if features.is_empty() {
            "none the kernels use".to_owned()
        } else {
            features.join(", ")
        },
    ]);
    rows.push(vec!["encode_precision: bf16".to_owned(), bf16_advice(bf16)]);
    for check in &checks {
        let mark = if check.ok { "" } else { "PROBLEM: " };
        rows.push(vec![check.check.clone(), format!("{mark}{}", check.found)]);
    }
    let columns = ["check", "found"].map(str::to_owned);
    printer.result(&table(&columns, &rows, ""));
    Ok(())
}

/// Whether `encode_precision: bf16` would pay here: only where the CPU multiplies bf16 itself.
fn bf16_advice(engine: Engine) -> String {
    if engine.multiplies_bf16() {
        format!(
            "{}: judge, mine and evaluate embed faster (MiniLM: 1.6-1.8x f32 on a Zen 4; \
             `ragd-pipe bench encoder` measures it here); off by default: it moves scores a little",
            engine.name()
        )
    } else {
        format!("{}: no faster than f32 here; leave it off", engine.name())
    }
}

fn environment_checks() -> Vec<Check> {
    let hub = HubConfig::from_env();
    let mut checks = vec![
        folder_check("download cache (RAGD_CACHE_DIR)", &hub.cache_dir),
        folder_check("Hugging Face cache (HF_HOME)", &hub.hf_cache),
    ];
    match registry::default_root() {
        Err(error) => checks.push(Check::new("registry", error.to_string(), false)),
        Ok(root) => checks.push(match registry::list(&root) {
            Ok(models) if models.is_empty() => Check::new(
                "registry",
                format!("{}: no models yet", root.display()),
                true,
            ),
            Ok(models) => {
                let broken = models.iter().filter(|m| m.problem.is_some()).count();
                Check::new(
                    "registry",
                    format!(
                        "{}: {} models{}",
                        root.display(),
                        models.len(),
                        if broken > 0 {
                            format!(", {broken} without readable metadata")
                        } else {
                            String::new()
                        }
                    ),
                    broken == 0,
                )
            }
            Err(error) => Check::new("registry", error.to_string(), false),
        }),
    }
    if let Ok(home) = registry::default_ragd_home() {
        checks.push(ragd_config_check(&home));
    }
    // Only a server the user configured: the default address is no promise that one runs.
    if std::env::var("OLLAMA_HOST").is_ok_and(|v| !v.is_empty()) {
        checks.push(ollama_check(&hub.ollama_url));
    }
    checks
}

/// A cache folder: present and writable, or absent (made on first use).
fn folder_check(name: &str, dir: &Path) -> Check {
    if !dir.exists() {
        return Check::new(
            name,
            format!("{} (created on first download)", dir.display()),
            true,
        );
    }
    let probe = dir.join(format!(".ragd-pipe-doctor-{}", std::process::id()));
    match fs_err::write(&probe, b"") {
        Ok(()) => {
            let _ = fs_err::remove_file(&probe);
            Check::new(name, format!("{} (writable)", dir.display()), true)
        }
        Err(error) => Check::new(name, format!("not writable: {error}"), false),
    }
}

/// ragd's config: whether it parses and which models it points at, and that they exist.
fn ragd_config_check(home: &Path) -> Check {
    let name = "ragd config";
    let path = home.join(registry::CONFIG_FILE);
    if !path.exists() {
        return Check::new(
            name,
            format!(
                "{} does not exist (`models use` creates it)",
                path.display()
            ),
            true,
        );
    }
    match registry::configured_models(home) {
        Err(error) => Check::new(name, error.to_string(), false),
        Ok(models) if models.is_empty() => Check::new(
            name,
            format!("{}: uses none of ragd-pipe's models", path.display()),
            true,
        ),
        Ok(models) => {
            let missing: Vec<String> = models
                .iter()
                .filter(|(_, model)| !model.is_dir())
                .map(|(_, model)| model.display().to_string())
                .collect();
            if missing.is_empty() {
                let shown: Vec<String> = models
                    .iter()
                    .map(|(_, model)| model.display().to_string())
                    .collect();
                Check::new(
                    name,
                    format!("{}: uses {}", path.display(), shown.join(", ")),
                    true,
                )
            } else {
                Check::new(
                    name,
                    format!(
                        "{} names models that are gone: {}",
                        path.display(),
                        missing.join(", ")
                    ),
                    false,
                )
            }
        }
    }
}

/// The Ollama server `OLLAMA_HOST` names: does it answer `/api/version`?
fn ollama_check(url: &str) -> Check {
    let name = "Ollama (OLLAMA_HOST)";
    let answer = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .and_then(|client| {
            client
                .get(format!("{}/api/version", url.trim_end_matches('/')))
                .send()
        })
        .and_then(reqwest::blocking::Response::error_for_status)
        .and_then(|response| response.json::<serde_json::Value>());
    match answer {
        Ok(version) => Check::new(
            name,
            format!(
                "{url}: version {}",
                version["version"].as_str().unwrap_or("unknown")
            ),
            true,
        ),
        Err(error) => Check::new(name, format!("{url} does not answer: {error}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_is_advised_only_where_the_cpu_multiplies_it() {
        let widened = bf16_advice(Engine::Rows);
        assert!(widened.contains("no faster than f32"), "{widened}");
        #[cfg(target_arch = "x86_64")]
        for engine in [Engine::Tiles, Engine::Pairs] {
            let advice = bf16_advice(engine);
            assert!(
                advice.starts_with(engine.name()) && advice.contains("embed faster"),
                "{advice}"
            );
        }
    }
}
