//! Pointing ragd at a registered model: a targeted, line-level edit of `<ragd_home>/config.yaml`
//! that sets `embedding.model: custom` and `embedding.custom_model_path: <path>` for an embedding
//! model, and `retrieval.rerank: true` and `retrieval.rerank_model: <path>` for a reranker.
//!
//! ragd's names: `retrieval.rerank` is the switch in its `RetrievalConfig`
//! (`src/ragd/config.py`); `retrieval.rerank_model` is the key its configuration schema (ADR-0013)
//! gives the cross-encoder, a model name or folder that its `CrossEncoderReranker` hands to
//! sentence-transformers' `CrossEncoder`.
//!
//! The file is the user's: it holds their comments, key order and quoting. Parsing it and
//! serialising it again would drop every comment and reflow the rest, so the edit touches only the
//! lines concerned (or inserts them), and everything else is copied byte for byte, line endings
//! included. Before the file is replaced, the result is parsed with `serde_yaml` and must hold the
//! new values and otherwise exactly the settings the original held.
//!
//! For either block (`embedding:` or `retrieval:`):
//!
//! | the file                                   | the edit                                      |
//! |--------------------------------------------|-----------------------------------------------|
//! | missing or empty                           | a minimal block                               |
//! | no top-level block                         | the block appended at the end                 |
//! | the block with the keys                    | each value replaced in place; an inline `# comment` after it stays |
//! | the block without one or both keys         | inserted after the block's last line, at its indentation |
//! | `block: {…}` (flow style)                  | refused: no comment-preserving edit exists    |
//! | the block holding a scalar or list         | refused                                       |

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use fs_err as fs;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::error::RegistryError;
use super::ops::model_path;
use super::tree::{sync_dir, unique_path};

/// The value of `embedding.model` that makes ragd load `custom_model_path`.
pub const CUSTOM_MODEL: &str = "custom";

const EMBEDDING: &str = "embedding";
const MODEL_KEY: &str = "model";
const PATH_KEY: &str = "custom_model_path";
const RETRIEVAL: &str = "retrieval";
const RERANK_KEY: &str = "rerank";
const RERANK_MODEL_KEY: &str = "rerank_model";

/// ragd's config file in its home folder.
pub const CONFIG_FILE: &str = "config.yaml";

/// Which of ragd's settings a model fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelRole {
    /// `embedding.model` and `embedding.custom_model_path`.
    Embedding,
    /// `retrieval.rerank` and `retrieval.rerank_model`.
    Reranker,
}

/// What [`use_model`] changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// The config file written.
    pub config_path: PathBuf,
    /// The absolute model path now in the role's setting.
    pub model_path: PathBuf,
    pub role: ModelRole,
    /// Whether the config file did not exist before.
    pub created: bool,
}

/// Makes ragd (home folder `ragd_home`) use the registered model `name` of the registry at
/// `root` in `role`, by editing `<ragd_home>/config.yaml` in place (see the module doc). The file
/// is replaced atomically and keeps its permissions: it may hold API keys.
pub fn use_model(
    root: &Path,
    name: &str,
    role: ModelRole,
    ragd_home: &Path,
) -> Result<ConfigUpdate, RegistryError> {
    let model_path = std::path::absolute(model_path(root, name)?)?;
    let path_text = model_path
        .to_str()
        .ok_or_else(|| RegistryError::NonUtf8Path {
            path: model_path.clone(),
        })?;
    let (block, settings) = role_settings(role, path_text);
    let (config_path, created) = edit_config(ragd_home, block, &settings)?;
    Ok(ConfigUpdate {
        config_path,
        model_path,
        role,
        created,
    })
}

/// Makes ragd embed with the model `ollama_name` of its Ollama server: `embedding.model:
/// <ollama_name>` (ragd's way of naming an Ollama embedding model, as for its default
/// `nomic-embed-text`), with the same line edit as [`use_model`]; `custom_model_path` is left
/// as it was. Returns the config file and whether it was created.
pub fn use_ollama_model(
    ollama_name: &str,
    ragd_home: &Path,
) -> Result<(PathBuf, bool), RegistryError> {
    edit_config(
        ragd_home,
        EMBEDDING,
        &[(MODEL_KEY, Value::String(ollama_name.to_owned()))],
    )
}

/// Where `models use` keeps the config it replaced, beside it.
pub const BACKUP_FILE: &str = "config.yaml.bak";

/// Copies ragd's config to [`BACKUP_FILE`] beside it, with its permissions (it may hold API
/// keys), before `models use` edits it: the previous settings stay one `mv` away. `None` when
/// there is no config yet.
pub fn backup_config(ragd_home: &Path) -> Result<Option<PathBuf>, RegistryError> {
    let config_path = through_links(&ragd_home.join(CONFIG_FILE))?;
    let text = match fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let permissions = fs::metadata(&config_path)?.permissions();
    let backup = config_path.with_file_name(BACKUP_FILE);
    write_replacing(&backup, &text, Some(permissions))?;
    Ok(Some(backup))
}

/// The models ragd's config points at: `embedding.custom_model_path` when `embedding.model` is
/// `custom`, and `retrieval.rerank_model`. Empty when there is no config.
pub fn configured_models(ragd_home: &Path) -> Result<Vec<(ModelRole, PathBuf)>, RegistryError> {
    let config_path = ragd_home.join(CONFIG_FILE);
    let text = match fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let config: Value =
        serde_yaml::from_str(&text).map_err(|e| RegistryError::ConfigInvalidYaml {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
    let mut models = Vec::new();
    let embedding = &config[EMBEDDING];
    if embedding[MODEL_KEY].as_str() == Some(CUSTOM_MODEL)
        && let Some(path) = embedding[PATH_KEY].as_str()
    {
        models.push((ModelRole::Embedding, PathBuf::from(path)));
    }
    if let Some(path) = config[RETRIEVAL][RERANK_MODEL_KEY].as_str() {
        models.push((ModelRole::Reranker, PathBuf::from(path)));
    }
    Ok(models)
}

/// The block and the settings that make ragd use the model at `model_path` in `role`.
fn role_settings(role: ModelRole, model_path: &str) -> (&'static str, [(&'static str, Value); 2]) {
    match role {
        ModelRole::Embedding => (
            EMBEDDING,
            [
                (MODEL_KEY, Value::String(CUSTOM_MODEL.to_owned())),
                (PATH_KEY, Value::String(model_path.to_owned())),
            ],
        ),
        ModelRole::Reranker => (
            RETRIEVAL,
            [
                (RERANK_KEY, Value::Bool(true)),
                (RERANK_MODEL_KEY, Value::String(model_path.to_owned())),
            ],
        ),
    }
}

/// Sets `<block>.<key>: <value>` for each pair of `settings` in `<ragd_home>/config.yaml`,
/// atomically and keeping the file's permissions.
fn edit_config(
    ragd_home: &Path,
    block: &str,
    settings: &[(&str, Value)],
) -> Result<(PathBuf, bool), RegistryError> {
    let config_path = ragd_home.join(CONFIG_FILE);
    let (original, permissions) = match fs::read_to_string(&config_path) {
        Ok(text) => (Some(text), Some(fs::metadata(&config_path)?.permissions())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
        Err(e) => return Err(e.into()),
    };
    let edited =
        set_block(original.as_deref().unwrap_or_default(), block, settings).map_err(|problem| {
            let path = config_path.clone();
            match problem {
                EditProblem::InvalidYaml(message) => {
                    RegistryError::ConfigInvalidYaml { path, message }
                }
                EditProblem::NotAMapping => RegistryError::ConfigNotAMapping { path },
                EditProblem::FlowStyle { line } => RegistryError::ConfigFlowStyle { path, line },
                EditProblem::NotABlock { line, found } => {
                    RegistryError::ConfigEmbeddingNotABlock { path, line, found }
                }
                EditProblem::Unsafe(message) => RegistryError::ConfigEditUnsafe { path, message },
            }
        })?;
    // A config kept in a dotfiles repository and linked here is edited where it lives: renaming
    // over the link would cut it off from its target and leave the real file unchanged.
    write_replacing(&through_links(&config_path)?, &edited, permissions)?;
    Ok((config_path, original.is_none()))
}

/// The file `path` names once every symbolic link on its last component is followed (a link may
/// name a file that does not exist yet). A loop of links is refused as the OS refuses it.
fn through_links(path: &Path) -> Result<PathBuf, RegistryError> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path)?;
                let base = path.parent().unwrap_or(Path::new("."));
                path = base.join(target);
            }
            _ => return Ok(path),
        }
    }
    Err(std::io::Error::other(format!(
        "too many levels of symbolic links at `{}`",
        path.display()
    ))
    .into())
}

/// Writes `text` to a temporary file beside `path` with the old file's permissions, syncs it, and
/// renames it over `path`. `crate::cache::write_atomic` does the same minus the permissions, which
/// a config holding secrets must keep.
fn write_replacing(
    path: &Path,
    text: &str,
    permissions: Option<std::fs::Permissions>,
) -> Result<(), RegistryError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let temp = unique_path(dir, ".", &format!("{CONFIG_FILE}.tmp"));
    let mut file = fs::File::create(&temp)?;
    file.write_all(text.as_bytes())?;
    if let Some(permissions) = permissions {
        file.set_permissions(permissions)?;
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    sync_dir(dir)
}

/// Why the config could not be edited; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EditProblem {
    InvalidYaml(String),
    NotAMapping,
    FlowStyle { line: usize },
    NotABlock { line: usize, found: String },
    Unsafe(String),
}

/// One line of the file and the ending it had (`\n`, `\r\n`, or none on a last line).
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    text: &'a str,
    ending: &'a str,
}

fn split_lines(text: &str) -> Vec<Line<'_>> {
    text.split_inclusive('\n')
        .map(|raw| {
            if let Some(text) = raw.strip_suffix("\r\n") {
                Line {
                    text,
                    ending: "\r\n",
                }
            } else if let Some(text) = raw.strip_suffix('\n') {
                Line { text, ending: "\n" }
            } else {
                Line {
                    text: raw,
                    ending: "",
                }
            }
        })
        .collect()
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// A block-mapping entry `key: rest`: the key (unquoted) and the byte index just after its colon.
fn key_of(line: &str) -> Option<(&str, usize)> {
    let indent = indentation(line);
    let body = &line[indent..];
    if body.is_empty() || body.starts_with(['#', '-', '?']) {
        return None;
    }
    if let Some(quote) = body.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let close = body[1..].find(quote)? + 1;
        let after_key = body[close + 1..].trim_start_matches([' ', '\t']);
        let rest = after_key.strip_prefix(':')?;
        return Some((&body[1..close], line.len() - rest.len()));
    }
    for (i, c) in body.char_indices() {
        if c == '#' && body[..i].ends_with([' ', '\t']) {
            return None;
        }
        if c == ':'
            && body[i + 1..]
                .chars()
                .next()
                .is_none_or(|n| n == ' ' || n == '\t')
        {
            return Some((body[..i].trim_end(), indent + i + 1));
        }
    }
    None
}

/// Where the value after a colon lies, and where an inline comment starts (byte indices in `rest`).
#[derive(Debug, PartialEq, Eq)]
struct ValueSpan {
    start: usize,
    end: usize,
    comment: Option<usize>,
}

fn value_span(rest: &str) -> ValueSpan {
    let start = rest.len() - rest.trim_start_matches([' ', '\t']).len();
    let value = &rest[start..];
    let length = match value.chars().next() {
        None | Some('#') => 0,
        Some('"') => closing_double_quote(value).unwrap_or(value.len()),
        Some('\'') => closing_single_quote(value).unwrap_or(value.len()),
        Some(_) => {
            let cut = value
                .char_indices()
                .find(|&(i, c)| c == '#' && value[..i].ends_with([' ', '\t']))
                .map_or(value.len(), |(i, _)| i);
            value[..cut].trim_end().len()
        }
    };
    let end = start + length;
    let after = rest[end..].trim_start_matches([' ', '\t']);
    let comment = after.starts_with('#').then(|| rest.len() - after.len());
    ValueSpan {
        start,
        end,
        comment,
    }
}

/// The length of a `"…"` scalar including its quotes, if it closes on this line.
fn closing_double_quote(value: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in value.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// The length of a `'…'` scalar including its quotes (`''` is an escaped quote), if it closes.
fn closing_single_quote(value: &str) -> Option<usize> {
    let mut chars = value.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                chars.next();
            } else {
                return Some(i + 1);
            }
        }
    }
    None
}

/// `value` as a YAML scalar: plain when it reads back as the same string, else double-quoted
/// (a JSON string is a valid YAML double-quoted scalar, escapes included).
fn yaml_scalar(value: &str) -> String {
    let plain_safe = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+~@".contains(c))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '/' || c == '.')
        && serde_yaml::from_str::<Value>(value).ok() == Some(Value::String(value.to_owned()));
    if plain_safe {
        value.to_owned()
    } else {
        serde_json::to_string(value).expect("a string always serialises to JSON")
    }
}

/// Sets `embedding.model` and `embedding.custom_model_path` in the YAML `text`.
#[cfg(test)]
pub(crate) fn set_custom_model(text: &str, model_path: &str) -> Result<String, EditProblem> {
    let (block, settings) = role_settings(ModelRole::Embedding, model_path);
    set_block(text, block, &settings)
}

/// Sets `retrieval.rerank: true` and `retrieval.rerank_model` in the YAML `text`.
#[cfg(test)]
pub(crate) fn set_reranker(text: &str, model_path: &str) -> Result<String, EditProblem> {
    let (block, settings) = role_settings(ModelRole::Reranker, model_path);
    set_block(text, block, &settings)
}

/// Sets each `(key, value)` (strings and booleans) in the top-level block `block` of `text`.
fn set_block(text: &str, block: &str, settings: &[(&str, Value)]) -> Result<String, EditProblem> {
    let (bom, body) = match text.strip_prefix('\u{FEFF}') {
        Some(body) => ("\u{FEFF}", body),
        None => ("", text),
    };
    let original: Value =
        serde_yaml::from_str(body).map_err(|e| EditProblem::InvalidYaml(e.to_string()))?;
    if !matches!(original, Value::Null | Value::Mapping(_)) {
        return Err(EditProblem::NotAMapping);
    }
    let lines = split_lines(body);
    let newline = lines
        .iter()
        .map(|l| l.ending)
        .find(|e| !e.is_empty())
        .unwrap_or("\n");
    let values: Vec<(&str, String)> = settings
        .iter()
        .map(|(key, value)| {
            let text = match value {
                Value::Bool(b) => b.to_string(),
                Value::String(s) => yaml_scalar(s),
                other => unreachable!("only strings and booleans are set, not {other:?}"),
            };
            (*key, text)
        })
        .collect();
    let block_line = lines
        .iter()
        .position(|l| indentation(l.text) == 0 && key_of(l.text).is_some_and(|(k, _)| k == block));

    let edited = match block_line {
        None => append_block(body, &lines, newline, block, &values),
        Some(at) => edit_block(&lines, at, newline, &values)?,
    };
    verify(&original, &edited, block, settings)?;
    Ok(format!("{bom}{edited}"))
}

fn append_block(
    body: &str,
    lines: &[Line<'_>],
    newline: &str,
    block: &str,
    values: &[(&str, String)],
) -> String {
    let mut out = body.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push_str(newline);
    }
    if lines.last().is_some_and(|l| !is_blank(l.text)) {
        out.push_str(newline);
    }
    out.push_str(block);
    out.push(':');
    out.push_str(newline);
    for (key, value) in values {
        out.push_str(&format!("  {key}: {value}{newline}"));
    }
    out
}

fn edit_block(
    lines: &[Line<'_>],
    at: usize,
    newline: &str,
    values: &[(&str, String)],
) -> Result<String, EditProblem> {
    let header = lines[at].text;
    let (_, after_colon) = key_of(header).expect("the block's line was found by its key");
    let rest = &header[after_colon..];
    let span = value_span(rest);
    let value = &rest[span.start..span.end];
    let is_anchor = value.starts_with('&') && !value.contains([' ', '\t']);
    if value.starts_with('{') {
        return Err(EditProblem::FlowStyle { line: at + 1 });
    }
    if !value.is_empty() && !is_anchor {
        return Err(EditProblem::NotABlock {
            line: at + 1,
            found: value.to_owned(),
        });
    }

    // The block runs until the next line that starts at column 0 and is neither blank nor a
    // comment (a comment at column 0 may sit between two entries of the block).
    let block_end = (at + 1..lines.len())
        .find(|&i| {
            let text = lines[i].text;
            indentation(text) == 0 && !is_blank(text) && !is_comment(text)
        })
        .unwrap_or(lines.len());
    let content: Vec<usize> = (at + 1..block_end)
        .filter(|&i| !is_blank(lines[i].text) && !is_comment(lines[i].text))
        .collect();
    let indent = content.first().map_or(2, |&i| indentation(lines[i].text));

    let mut replaced: Vec<(usize, String)> = Vec::new();
    let mut deleted: BTreeSet<usize> = BTreeSet::new();
    let mut missing: Vec<String> = Vec::new();
    for (key, new_value) in values {
        let found = content.iter().copied().find(|&i| {
            indentation(lines[i].text) == indent
                && key_of(lines[i].text).is_some_and(|(k, _)| k == *key)
        });
        match found {
            Some(i) => {
                let (line, continuation) = replace_value(lines, i, block_end, new_value);
                replaced.push((i, line));
                deleted.extend(continuation);
            }
            None => missing.push(format!("{}{key}: {new_value}", " ".repeat(indent))),
        }
    }
    let insert_after = content.last().copied().unwrap_or(at);

    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if !deleted.contains(&i) {
            match replaced.iter().find(|(r, _)| *r == i) {
                Some((_, text)) => out.push_str(text),
                None => out.push_str(line.text),
            }
            out.push_str(line.ending);
        }
        if i == insert_after && !missing.is_empty() {
            if line.ending.is_empty() {
                out.push_str(newline);
            }
            for text in &missing {
                out.push_str(text);
                out.push_str(newline);
            }
        }
    }
    Ok(out)
}

/// The key line at `i` with its value replaced (an inline comment kept), and the lines of the old
/// value that continue below it: a block scalar's body, a multi-line scalar, a nested mapping.
fn replace_value(
    lines: &[Line<'_>],
    i: usize,
    block_end: usize,
    new_value: &str,
) -> (String, Vec<usize>) {
    let text = lines[i].text;
    let (_, after_colon) = key_of(text).expect("the line was found by its key");
    let rest = &text[after_colon..];
    let span = value_span(rest);
    let old_value = &rest[span.start..span.end];
    let mut line = format!("{} {new_value}", &text[..after_colon]);
    if let Some(comment) = span.comment {
        let gap = &rest[span.end..comment];
        line.push_str(if gap.is_empty() { " " } else { gap });
        line.push_str(&rest[comment..]);
    }

    let key_indent = indentation(text);
    let block_scalar = old_value.starts_with(['|', '>']);
    let deeper: Vec<usize> = (i + 1..block_end)
        .take_while(|&j| is_blank(lines[j].text) || indentation(lines[j].text) > key_indent)
        .collect();
    let last = deeper
        .iter()
        .rev()
        .find(|&&j| !is_blank(lines[j].text) && (block_scalar || !is_comment(lines[j].text)));
    let continuation = match last {
        Some(&last) => deeper
            .into_iter()
            .filter(|&j| {
                j <= last && (block_scalar || is_blank(lines[j].text) || !is_comment(lines[j].text))
            })
            .collect(),
        None => Vec::new(),
    };
    (line, continuation)
}

/// The edit must have set the values and changed nothing else that YAML sees.
fn verify(
    original: &Value,
    edited: &str,
    block: &str,
    settings: &[(&str, Value)],
) -> Result<(), EditProblem> {
    let unsafe_edit = |message: String| EditProblem::Unsafe(message);
    let parsed: Value = serde_yaml::from_str(edited)
        .map_err(|e| unsafe_edit(format!("the result does not parse: {e}")))?;
    let section = &parsed[block];
    if settings.iter().any(|(key, value)| &section[*key] != value) {
        return Err(unsafe_edit(format!(
            "the result reads `{block}` as {}",
            serde_json::to_string(section).unwrap_or_default()
        )));
    }
    let keys: Vec<&str> = settings.iter().map(|(key, _)| *key).collect();
    if without_keys(original, block, &keys) != without_keys(&parsed, block, &keys) {
        return Err(unsafe_edit("other settings would change".to_owned()));
    }
    Ok(())
}

fn without_keys(value: &Value, block: &str, keys: &[&str]) -> Value {
    let mut value = match value {
        Value::Null => Value::Mapping(serde_yaml::Mapping::new()),
        other => other.clone(),
    };
    if let Value::Mapping(top) = &mut value {
        let now_empty = match top.get_mut(block) {
            Some(Value::Mapping(section)) => {
                for key in keys {
                    section.remove(*key);
                }
                section.is_empty()
            }
            Some(Value::Null) => true,
            _ => false,
        };
        if now_empty {
            top.remove(block);
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/home/ana/.ragd/models/legal-v2";

    fn edit(text: &str) -> String {
        set_custom_model(text, PATH).expect("edits")
    }

    #[test]
    fn an_ollama_model_name_replaces_only_embedding_model() {
        let original =
            "# ragd\nembedding:\n  model: custom  # was\n  custom_model_path: /m\nk: v\n";
        let edited = set_block(
            original,
            EMBEDDING,
            &[(MODEL_KEY, Value::String("my-docs:latest".to_owned()))],
        )
        .expect("edits");
        assert_eq!(
            edited,
            "# ragd\nembedding:\n  model: \"my-docs:latest\"  # was\n  custom_model_path: /m\nk: v\n"
        );
        assert_eq!(
            set_block(
                "",
                EMBEDDING,
                &[(MODEL_KEY, Value::String("my-docs".to_owned()))]
            )
            .expect("edits"),
            "embedding:\n  model: my-docs\n"
        );
    }

    #[test]
    fn a_missing_or_empty_file_gets_a_minimal_block() {
        let expected =
            "embedding:\n  model: custom\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n";
        assert_eq!(edit(""), expected);
        assert_eq!(
            edit("# only a comment\n"),
            format!("# only a comment\n\n{expected}")
        );
    }

    #[test]
    fn without_an_embedding_block_one_is_appended_after_everything() {
        let text = "# ragd settings\nllm:\n  model: llama3  # the chat model\n  # temperature: 0.2\nchunk_size: 512";
        assert_eq!(
            edit(text),
            "# ragd settings\nllm:\n  model: llama3  # the chat model\n  # temperature: 0.2\nchunk_size: 512\n\n\
             embedding:\n  model: custom\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n"
        );
    }

    #[test]
    fn present_keys_are_replaced_in_place_keeping_comments() {
        let text = "# top comment\n\
                    embedding:   # which model embeds\n\
                    \x20   # before model\n\
                    \x20   model: all-MiniLM-L6-v2   # the default\n\
                    \x20   custom_model_path: '/old/path' # set by hand\n\
                    \x20   batch_size: 32\n\
                    # between blocks\n\
                    llm:\n\
                    \x20   model: llama3\n";
        assert_eq!(
            edit(text),
            "# top comment\n\
             embedding:   # which model embeds\n\
             \x20   # before model\n\
             \x20   model: custom   # the default\n\
             \x20   custom_model_path: /home/ana/.ragd/models/legal-v2 # set by hand\n\
             \x20   batch_size: 32\n\
             # between blocks\n\
             llm:\n\
             \x20   model: llama3\n"
        );
    }

    #[test]
    fn absent_keys_are_inserted_at_the_block_indentation() {
        let text = "embedding:\n   batch_size: 32  # tuned\n   # device: cuda\n\n# next\nllm: {}\n";
        assert_eq!(
            edit(text),
            "embedding:\n   batch_size: 32  # tuned\n   model: custom\n   custom_model_path: \
             /home/ana/.ragd/models/legal-v2\n   # device: cuda\n\n# next\nllm: {}\n"
        );
        // One present, one absent; the block is the last thing in a file without a final newline.
        assert_eq!(
            edit("embedding:\n  model: old"),
            "embedding:\n  model: custom\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n"
        );
        // An empty block (`embedding:` alone is null).
        assert_eq!(
            edit("embedding:\n# nothing yet\nother: 1\n"),
            "embedding:\n  model: custom\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n\
             # nothing yet\nother: 1\n"
        );
    }

    #[test]
    fn paths_with_spaces_colons_quotes_or_backslashes_are_quoted() {
        for path in [
            "/Users/Ana Lopez/models/legal v2",
            "/data/models:v2",
            "/x/#not-a-comment",
            "C:\\Users\\ana\\models",
            "/it's \"quoted\"",
            "/ünï/cödé",
        ] {
            let text = "embedding:\n  model: x  # keep\n  custom_model_path: /old\n";
            let edited = set_custom_model(text, path).expect("edits");
            let parsed: Value = serde_yaml::from_str(&edited).expect("valid YAML");
            assert_eq!(
                parsed["embedding"]["custom_model_path"].as_str(),
                Some(path)
            );
            assert!(edited.contains("model: custom  # keep\n"), "{edited}");
        }
        assert_eq!(yaml_scalar("/a b"), "\"/a b\"");
        assert_eq!(yaml_scalar("/plain/path-1.2"), "/plain/path-1.2");
    }

    #[test]
    fn multi_line_old_values_are_replaced_whole() {
        let text = "embedding:\n  model: |\n    # block scalar content\n    line two\n\n  \
                    custom_model_path: \"/a very long\n    continued path\"\n  # kept\n  dim: 384\n";
        assert_eq!(
            edit(text),
            "embedding:\n  model: custom\n\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n  \
             # kept\n  dim: 384\n"
        );
    }

    #[test]
    fn crlf_endings_a_bom_and_quoted_keys_survive() {
        let text = "\u{FEFF}# c\r\n\"embedding\":\r\n  'model': old\r\n";
        assert_eq!(
            edit(text),
            "\u{FEFF}# c\r\n\"embedding\":\r\n  'model': custom\r\n  custom_model_path: \
             /home/ana/.ragd/models/legal-v2\r\n"
        );
    }

    #[test]
    fn an_anchored_block_is_still_a_block() {
        let text = "embedding: &emb\n  model: old\nother: *emb\n";
        let edited = set_custom_model(text, PATH);
        // The alias copies the block elsewhere, so the edit changes `other` too: refused.
        assert!(matches!(edited, Err(EditProblem::Unsafe(_))), "{edited:?}");
        let text = "embedding: &emb\n  model: old\n";
        assert_eq!(
            edit(text),
            "embedding: &emb\n  model: custom\n  custom_model_path: /home/ana/.ragd/models/legal-v2\n"
        );
    }

    #[test]
    fn unsupported_shapes_are_refused() {
        assert_eq!(
            set_custom_model("a: 1\nembedding: {model: x}\n", PATH),
            Err(EditProblem::FlowStyle { line: 2 })
        );
        assert_eq!(
            set_custom_model("embedding: minilm # old style\n", PATH),
            Err(EditProblem::NotABlock {
                line: 1,
                found: "minilm".to_owned()
            })
        );
        assert_eq!(
            set_custom_model("- a\n- b\n", PATH),
            Err(EditProblem::NotAMapping)
        );
        assert!(matches!(
            set_custom_model("a: [unclosed\n", PATH),
            Err(EditProblem::InvalidYaml(_))
        ));
    }

    /// The reranker's two settings go into `retrieval:` by the same rules, keeping ragd's other
    /// retrieval settings and the embedding block as they were.
    #[test]
    fn the_reranker_setting_is_edited_in_the_retrieval_block() {
        let text = "embedding:\n  model: custom  # ours\nretrieval:\n  default_limit: 10\n  rerank: false  # off for now\n  min_score: 0.55\n";
        assert_eq!(
            set_reranker(text, PATH).expect("edits"),
            "embedding:\n  model: custom  # ours\nretrieval:\n  default_limit: 10\n  rerank: true  # off for now\n  \
             min_score: 0.55\n  rerank_model: /home/ana/.ragd/models/legal-v2\n"
        );
        assert_eq!(
            set_reranker("", PATH).expect("edits"),
            "retrieval:\n  rerank: true\n  rerank_model: /home/ana/.ragd/models/legal-v2\n"
        );
        // A string `"true"` would not be the boolean ragd reads.
        let edited = set_reranker("retrieval:\n  rerank: 'no'\n", PATH).expect("edits");
        let parsed: Value = serde_yaml::from_str(&edited).expect("valid");
        assert_eq!(parsed["retrieval"]["rerank"], Value::Bool(true));
        assert_eq!(
            set_reranker("retrieval: {rerank: false}\n", PATH),
            Err(EditProblem::FlowStyle { line: 1 })
        );
    }

    #[test]
    fn value_spans_find_inline_comments_outside_quotes() {
        assert_eq!(
            value_span(" \"a # b\"  # c"),
            ValueSpan {
                start: 1,
                end: 8,
                comment: Some(10)
            }
        );
        assert_eq!(
            value_span(" 'it''s' #x"),
            ValueSpan {
                start: 1,
                end: 8,
                comment: Some(9)
            }
        );
        assert_eq!(
            value_span(" a#b"),
            ValueSpan {
                start: 1,
                end: 4,
                comment: None
            }
        );
        assert_eq!(
            value_span("   # only"),
            ValueSpan {
                start: 3,
                end: 3,
                comment: Some(3)
            }
        );
    }
}
