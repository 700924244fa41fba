//! Labelled query sets in the BEIR layout, the format users already have from evaluating ragd:
//! a folder with `corpus.jsonl` (`{"_id","title","text"}`), `queries.jsonl` (`{"_id","text"}`)
//! and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header line).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fs_err as fs;
use serde::Deserialize;

use super::EvalError;

/// A BEIR dataset: documents, queries and which documents answer which query.
#[derive(Debug, Clone)]
pub struct BeirDataset {
    pub documents: Vec<BeirDocument>,
    /// Queries in file order.
    pub queries: Vec<(String, String)>,
    /// Relevant document ids per query id (score above zero).
    pub relevant: HashMap<String, HashSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeirDocument {
    pub id: String,
    pub title: String,
    pub text: String,
}

/// The files of a dataset folder, in the order they are read: what a cache key hashes.
pub fn files(dir: &Path, split: &str) -> [PathBuf; 3] {
    [
        dir.join("corpus.jsonl"),
        dir.join("queries.jsonl"),
        dir.join("qrels").join(format!("{split}.tsv")),
    ]
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "_id")]
    id: Id,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: String,
}

/// BEIR ids are strings, but some exports write numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(serde_json::Number),
}

impl Id {
    fn into_string(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Number(number) => number.to_string(),
        }
    }
}

impl BeirDataset {
    /// Reads the dataset in `dir` with the qrels of `split`. Queries without a relevant document
    /// are kept here; scoring leaves them out, as BEIR does.
    pub fn load(dir: &Path, split: &str) -> Result<Self, EvalError> {
        let [corpus_path, queries_path, qrels_path] = files(dir, split);
        Self::parse(
            (&read(&corpus_path)?, &corpus_path),
            (&read(&queries_path)?, &queries_path),
            (&read(&qrels_path)?, &qrels_path),
        )
    }

    /// The dataset from the texts of its three files, each with the path its errors name.
    pub fn parse(
        (corpus, corpus_path): (&str, &Path),
        (queries, queries_path): (&str, &Path),
        (qrels, qrels_path): (&str, &Path),
    ) -> Result<Self, EvalError> {
        let documents = read_records(corpus, corpus_path)?
            .into_iter()
            .map(|(_, record)| BeirDocument {
                id: record.id.into_string(),
                title: record.title.unwrap_or_default(),
                text: record.text,
            })
            .collect();
        let queries = read_records(queries, queries_path)?
            .into_iter()
            .map(|(_, record)| (record.id.into_string(), record.text))
            .collect();
        let relevant = read_qrels(qrels, qrels_path)?;
        Ok(Self {
            documents,
            queries,
            relevant,
        })
    }
}

fn read(path: &Path) -> Result<String, EvalError> {
    fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_records(text: &str, path: &Path) -> Result<Vec<(usize, Record)>, EvalError> {
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| EvalError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            message: e.to_string(),
        })?;
        records.push((index + 1, record));
    }
    Ok(records)
}

fn read_qrels(text: &str, path: &Path) -> Result<HashMap<String, HashSet<String>>, EvalError> {
    let mut relevant: HashMap<String, HashSet<String>> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        if line.trim().is_empty() || (index == 0 && fields.first() == Some(&"query-id")) {
            continue;
        }
        let bad = |message: String| EvalError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let [query, doc, score] = fields[..] else {
            return Err(bad(format!(
                "expected 3 tab-separated fields (query-id, corpus-id, score), found {}",
                fields.len()
            )));
        };
        let score: f64 = score
            .parse()
            .map_err(|_| bad(format!("score `{score}` is not a number")))?;
        if score > 0.0 {
            relevant
                .entry(query.to_owned())
                .or_default()
                .insert(doc.to_owned());
        }
    }
    Ok(relevant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_as_ids_skips_the_header_and_zero_scores() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("qrels")).expect("mkdir");
        fs::write(
            dir.path().join("corpus.jsonl"),
            "{\"_id\": 7, \"title\": \"T\", \"text\": \"seven\"}\n\n{\"_id\": \"d2\", \"text\": \"two\"}\n",
        )
        .expect("corpus");
        fs::write(
            dir.path().join("queries.jsonl"),
            "{\"_id\": \"q1\", \"text\": \"which?\"}\n",
        )
        .expect("queries");
        fs::write(
            dir.path().join("qrels/test.tsv"),
            "query-id\tcorpus-id\tscore\nq1\t7\t1\nq1\td2\t0\n",
        )
        .expect("qrels");
        let data = BeirDataset::load(dir.path(), "test").expect("loads");
        assert_eq!(data.documents[0].id, "7");
        assert_eq!(data.documents[1].title, "");
        assert_eq!(data.queries, vec![("q1".to_owned(), "which?".to_owned())]);
        assert_eq!(data.relevant["q1"], HashSet::from(["7".to_owned()]));
    }

    #[test]
    fn a_bad_qrels_line_names_file_and_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("qrels")).expect("mkdir");
        fs::write(dir.path().join("corpus.jsonl"), "").expect("corpus");
        fs::write(dir.path().join("queries.jsonl"), "").expect("queries");
        fs::write(dir.path().join("qrels/dev.tsv"), "q1 d1 1\n").expect("qrels");
        let error = BeirDataset::load(dir.path(), "dev").expect_err("bad line");
        assert!(error.to_string().contains("dev.tsv` line 1"), "{error}");
    }
}
