//! Prompts: the prefixes some models expect before a text (e5's `query: ` and `passage: `, bge's
//! `Represent this sentence for searching relevant passages: `), read from
//! `config_sentence_transformers.json` (`prompts`, `default_prompt_name`) as
//! sentence-transformers reads them, and prepended to the text before tokenizing.
//!
//! Which prompt a text gets follows sentence-transformers' `encode_query` / `encode_document`
//! (<https://github.com/UKPLab/sentence-transformers/blob/v5.0.0/sentence_transformers/SentenceTransformer.py>):
//! a query takes the prompt named `query`, a passage the first of `document`, `passage`,
//! `corpus`; without one, the `default_prompt_name`'s prompt, else none. Saving a trained model
//! copies the base's `prompts` (see `train::save`), so the fine-tuned model is prompted alike.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::model::config_file::read_json;
use crate::model::error::ModelError;

/// The file prompts are read from, at the model folder's root.
pub const CONFIG_FILE: &str = "config_sentence_transformers.json";

/// What a text is to the model, which decides its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextRole {
    /// A search query (a training anchor).
    Query,
    /// A passage searched over (a chunk, a training positive or negative).
    Passage,
}

impl TextRole {
    /// The prompt names sentence-transformers tries for this role, in order.
    fn prompt_names(self) -> &'static [&'static str] {
        match self {
            Self::Query => &["query"],
            Self::Passage => &["document", "passage", "corpus"],
        }
    }
}

/// A model's prompts by name, and the one used when a text has no role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Prompts {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

impl Prompts {
    /// Reads `dir/config_sentence_transformers.json`; none (a plain Hugging Face folder) means
    /// no prompts. Other keys of the file are ignored. A `default_prompt_name` that names no
    /// prompt is an error, as in sentence-transformers.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let prompts: Self = read_json(&path)?;
        if let Some(name) = &prompts.default_prompt_name
            && !prompts.prompts.contains_key(name)
        {
            return Err(ModelError::BadConfig {
                path,
                key: "default_prompt_name".to_owned(),
                message: format!("`{name}` is not one of `prompts`"),
            });
        }
        Ok(prompts)
    }

    /// Prompts given as (name, prefix) pairs, none the default.
    pub fn new<'a>(prompts: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            prompts: prompts
                .into_iter()
                .map(|(name, prefix)| (name.to_owned(), prefix.to_owned()))
                .collect(),
            default_prompt_name: None,
        }
    }

    /// The prompt of a text with no role: the default prompt, or none.
    pub fn default_prompt(&self) -> &str {
        self.default_prompt_name
            .as_ref()
            .and_then(|name| self.prompts.get(name))
            .map_or("", String::as_str)
    }

    /// The prompt of a text in `role` (see the module documentation).
    pub fn for_role(&self, role: TextRole) -> &str {
        role.prompt_names()
            .iter()
            .find_map(|name| self.prompts.get(*name))
            .map_or_else(|| self.default_prompt(), String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Prompts, ModelError> {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(CONFIG_FILE), json).expect("write");
        Prompts::read(dir.path())
    }

    #[test]
    fn roles_take_their_prompts_as_sentence_transformers_chooses_them() {
        let e5 = read(
            r#"{"__version__": {"sentence_transformers": "3.0.0"},
                "prompts": {"query": "query: ", "passage": "passage: "},
                "default_prompt_name": null, "similarity_fn_name": "cosine"}"#,
        )
        .expect("e5-style prompts");
        assert_eq!(e5.for_role(TextRole::Query), "query: ");
        assert_eq!(e5.for_role(TextRole::Passage), "passage: ");
        assert_eq!(e5.default_prompt(), "");

        // bge: a query prompt only; passages fall back to the default (none here).
        let bge = read(r#"{"prompts": {"query": "Represent this: ", "text": ""}}"#).expect("bge");
        assert_eq!(bge.for_role(TextRole::Passage), "");
        let defaulted = read(
            r#"{"prompts": {"query": "q: ", "document": "d: ", "corpus": "c: "},
                "default_prompt_name": "query"}"#,
        )
        .expect("with a default");
        assert_eq!(
            defaulted.for_role(TextRole::Passage),
            "d: ",
            "document first"
        );
        assert_eq!(defaulted.default_prompt(), "q: ");

        let none = Prompts::read(tempfile::tempdir().expect("dir").path()).expect("no file");
        assert!(none.is_empty());
        assert_eq!(none.for_role(TextRole::Query), "");
    }

    #[test]
    fn a_default_naming_no_prompt_is_refused() {
        let error = read(r#"{"prompts": {"query": "q: "}, "default_prompt_name": "passage"}"#)
            .expect_err("no such prompt");
        assert!(
            error.to_string().contains("`default_prompt_name`"),
            "{error}"
        );
    }
}
