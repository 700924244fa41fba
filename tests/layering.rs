//! The house's layering, checked: the engines (`model`, `llm`, `corpus`, `index`, `cache`)
//! import nothing of the pipeline (`stages`, `exec`, `plan`, `cli`, `ui`), so the pipeline can
//! change without touching them and they can be lifted into crates of their own.

use std::path::Path;

const ENGINES: [&str; 5] = ["model", "llm", "corpus", "index", "cache"];
const PIPELINE: [&str; 5] = ["stages", "exec", "plan", "cli", "ui"];

/// Every `crate::…` module path a source text names, whether in a `use` (also inside braces:
/// `use crate::{a, b::c}`) or inline (`crate::stages::StageError`).
fn crate_modules(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let module: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(module);
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn engines_import_nothing_of_the_pipeline() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for engine in ENGINES {
        let mut files = Vec::new();
        sources(&src.join(engine), &mut files);
        if let Some(file) = [src.join(format!("{engine}.rs"))]
            .into_iter()
            .find(|f| f.is_file())
        {
            files.push(file);
        }
        assert!(!files.is_empty(), "no sources for `{engine}`");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("a source file");
            for module in crate_modules(&text) {
                if PIPELINE.contains(&module.as_str()) {
                    violations.push(format!(
                        "{} uses crate::{module}",
                        file.strip_prefix(&src).unwrap_or(&file).display()
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_check_sees_imports_in_every_form() {
    let text = "use crate::stages::StageError;\nuse crate::{model::hub, exec};\nlet e = crate::plan::Plan::new();\n";
    assert_eq!(crate_modules(text), ["stages", "model", "exec", "plan"]);
}
