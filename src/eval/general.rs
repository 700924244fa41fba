//! The general check: a small general-domain retrieval set built into the tool (see
//! `general/README.md` for what it holds and its licence), scored for base and fine-tuned in
//! every evaluate so a fine-tune that forgets what its base knew is caught.

use std::path::Path;

use super::{BeirDataset, EvalError};

/// The name the general check has in reports.
pub const GENERAL_CHECK_NAME: &str = "general check";

const CORPUS: &str = include_str!("general/corpus.jsonl");
const QUERIES: &str = include_str!("general/queries.jsonl");
const QRELS: &str = include_str!("general/qrels/test.tsv");

/// The built-in general-domain set.
pub fn general_check() -> Result<BeirDataset, EvalError> {
    let origin = |file: &str| Path::new("<built-in general check>").join(file);
    BeirDataset::parse(
        (CORPUS, &origin("corpus.jsonl")),
        (QUERIES, &origin("queries.jsonl")),
        (QRELS, &origin("qrels/test.tsv")),
    )
}

/// What identifies the set's contents, for cache keys: it changes whenever a file does.
pub fn general_check_digest() -> String {
    let mut hasher = blake3::Hasher::new();
    for text in [CORPUS, QUERIES, QRELS] {
        hasher.update(text.as_bytes());
        hasher.update(&[0]);
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_has_one_relevant_document_in_the_corpus() {
        let set = general_check().expect("the built-in set parses");
        assert_eq!(set.queries.len(), 40);
        assert_eq!(set.documents.len(), 48);
        for (id, _) in &set.queries {
            let relevant = &set.relevant[id];
            assert_eq!(relevant.len(), 1, "{id}");
            assert!(
                set.documents.iter().any(|d| relevant.contains(&d.id)),
                "{id}"
            );
        }
    }
}
