//! Uploaded training files: ragd's JSONL (`query`, `positive`, `positive_id`, `negatives`,
//! `source_document`, one [`TrainingExample`] a line), checked row by row before anything is
//! kept, with the train stage's rules: a line that does not parse as a `TrainingExample` fails
//! training (an error here), a row with a blank query or positive and a repeat of an earlier
//! (query, positive) pair are skipped by training (a warning here), and a file with no usable row
//! fails training (an error here).
//!
//! The client's file name never becomes a path: it must be a plain name ([`upload_name`]) and is
//! stored under a name the server makes from the content's hash.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::stages::io::TrainingExample;

/// A problem in one row of a training file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowProblem {
    /// 1-based line number.
    pub line: usize,
    /// The field at fault, when one is (`query`, `negatives[2].text`).
    pub field: Option<String>,
    /// `error` (training would fail) or `warning` (training skips the row).
    pub severity: &'static str,
    pub message: String,
}

/// What a check of a training file found.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub rows: usize,
    pub usable: usize,
    pub problems: Vec<RowProblem>,
    pub stats: serde_json::Value,
}

impl Validation {
    /// Whether training would accept the file.
    pub fn accepted(&self) -> bool {
        self.usable > 0 && self.problems.iter().all(|p| p.severity != "error")
    }
}

/// At most this many problems are listed; the count says how many there were.
const MAX_PROBLEMS: usize = 200;

/// Checks a training file's text with the train stage's rules (see the module doc).
pub fn validate(text: &str) -> Validation {
    let mut problems = Vec::new();
    let mut examples = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut rows = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rows += 1;
        let line_no = index + 1;
        let mut deserializer = serde_json::Deserializer::from_str(line);
        let example: TrainingExample = match serde_path_to_error::deserialize(&mut deserializer) {
            Ok(example) => example,
            Err(error) => {
                let path = error.path().to_string();
                let message = error.inner().to_string();
                let field = if path.is_empty() || path == "." {
                    backticked(&message)
                } else {
                    Some(path)
                };
                problems.push(RowProblem {
                    line: line_no,
                    field,
                    severity: "error",
                    message,
                });
                continue;
            }
        };
        if let Some(field) = example.blank_field() {
            problems.push(RowProblem {
                line: line_no,
                field: Some(field.to_owned()),
                severity: "warning",
                message: format!("`{field}` is blank: training skips this row"),
            });
            continue;
        }
        let pair = example.pair();
        if let Some(first) = seen.get(&pair) {
            problems.push(RowProblem {
                line: line_no,
                field: Some("query".to_owned()),
                severity: "warning",
                message: format!(
                    "repeats the query and positive of line {first}: training skips this row"
                ),
            });
            continue;
        }
        seen.insert(pair, line_no);
        examples.push(example);
    }
    if examples.is_empty() && problems.iter().all(|p| p.severity != "error") {
        problems.push(RowProblem {
            line: 0,
            field: None,
            severity: "error",
            message: "the file holds no usable training example".to_owned(),
        });
    }
    let total_problems = problems.len();
    problems.truncate(MAX_PROBLEMS);
    let mut stats = statistics(&examples);
    stats["problems"] = total_problems.into();
    Validation {
        rows,
        usable: examples.len(),
        problems,
        stats,
    }
}

/// The first `name` in backticks of a serde message (`missing field `query``).
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

/// Upper bounds (in words) of the length histograms' buckets; the last is open.
const LENGTH_BUCKETS: [usize; 7] = [4, 8, 16, 32, 64, 128, 256];

fn histogram(lengths: impl Iterator<Item = usize>) -> Vec<serde_json::Value> {
    let mut counts = [0usize; LENGTH_BUCKETS.len() + 1];
    for length in lengths {
        let bucket = LENGTH_BUCKETS
            .iter()
            .position(|&bound| length <= bound)
            .unwrap_or(LENGTH_BUCKETS.len());
        counts[bucket] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &count)| {
            let label = match i {
                0 => format!("≤{}", LENGTH_BUCKETS[0]),
                i if i == LENGTH_BUCKETS.len() => format!(">{}", LENGTH_BUCKETS[i - 1]),
                i => format!("{}–{}", LENGTH_BUCKETS[i - 1] + 1, LENGTH_BUCKETS[i]),
            };
            serde_json::json!({"label": label, "count": count})
        })
        .collect()
}

/// Rows, lengths (words), negatives per query, documents: what the datasets page shows.
fn statistics(examples: &[TrainingExample]) -> serde_json::Value {
    let words = |text: &str| text.split_whitespace().count();
    let negatives: Vec<usize> = examples.iter().map(|e| e.negatives.len()).collect();
    let documents: BTreeSet<&str> = examples
        .iter()
        .map(|e| e.source_document.as_str())
        .collect();
    let mean_negatives = if negatives.is_empty() {
        0.0
    } else {
        negatives.iter().sum::<usize>() as f64 / negatives.len() as f64
    };
    serde_json::json!({
        "usable": examples.len(),
        "documents": documents.len(),
        "negatives_per_query": {
            "mean": mean_negatives,
            "min": negatives.iter().min().copied().unwrap_or(0),
            "max": negatives.iter().max().copied().unwrap_or(0),
        },
        "query_words": histogram(examples.iter().map(|e| words(&e.query))),
        "positive_words": histogram(examples.iter().map(|e| words(&e.positive))),
    })
}

/// Why a client's file name is refused: anything but a plain `name.jsonl` (no folder, no `..`,
/// no hidden file, printable ASCII letters, digits, `-`, `_`, `.` and spaces, at most 100 bytes).
pub fn upload_name(name: &str) -> Result<&str, &'static str> {
    if name.is_empty() || name.len() > 100 {
        return Err("a file name of 1 to 100 characters");
    }
    if name.contains(['/', '\\']) || name.contains("..") || name.starts_with('.') {
        return Err("a plain file name: no folder, no `..`, not hidden");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
    {
        return Err("letters, digits, `-`, `_`, `.` and spaces only");
    }
    if !name.ends_with(".jsonl") {
        return Err("a `.jsonl` file");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"query":"how do I restore","positive":"Restore with tide restore.","positive_id":"c1","negatives":[{"id":"c2","text":"Backups."}],"source_document":"a.md"}"#;

    #[test]
    fn every_problem_has_its_line_and_field() {
        let text = format!(
            "{GOOD}\n\n{{\"query\":\"q\",\"positive_id\":\"c\",\"source_document\":\"d\"}}\n\
             {{\"query\":\"q\",\"positive\":\"p\",\"positive_id\":\"c\",\"negatives\":[{{\"id\":\"x\",\"text\":3}}],\"source_document\":\"d\"}}\n\
             {{\"query\":\" \",\"positive\":\"p\",\"positive_id\":\"c\",\"source_document\":\"d\"}}\n{GOOD}\nnot json\n"
        );
        let validation = validate(&text);
        let found: Vec<(usize, Option<&str>, &str)> = validation
            .problems
            .iter()
            .map(|p| (p.line, p.field.as_deref(), p.severity))
            .collect();
        assert_eq!(
            found,
            [
                (3, Some("positive"), "error"),
                (4, Some("negatives[0].text"), "error"),
                (5, Some("query"), "warning"),
                (6, Some("query"), "warning"),
                (7, None, "error"),
            ]
        );
        assert_eq!(validation.rows, 6);
        assert_eq!(validation.usable, 1);
        assert!(!validation.accepted());
        assert!(validation.problems[3].message.contains("line 1"));
    }

    #[test]
    fn a_file_without_usable_rows_is_refused() {
        assert!(!validate("\n\n").accepted());
        let good = validate(&format!("{GOOD}\n"));
        assert!(good.accepted());
        assert_eq!(good.stats["negatives_per_query"]["max"], 1);
    }

    #[test]
    fn client_names_cannot_reach_a_folder() {
        for bad in [
            "../x.jsonl",
            "a/b.jsonl",
            "..\\x.jsonl",
            ".hidden.jsonl",
            "x.json",
            "",
            "a\0.jsonl",
        ] {
            assert!(upload_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(upload_name("my data_1.jsonl"), Ok("my data_1.jsonl"));
    }
}
