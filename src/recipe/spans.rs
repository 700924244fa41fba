//! Where each key and value of a YAML document sits, so any problem found after parsing can point
//! at the recipe's line and column.
//!
//! serde_yaml parses the recipe into values but forgets positions (it reports one only for syntax
//! errors), so the same text is also read with yaml-rust2's event parser, whose events carry
//! markers. Paths are the keys and sequence indexes from the root: `["train", "epochs"]`.

use std::collections::HashMap;

use miette::SourceSpan;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Positions of the keys and values of one YAML document.
#[derive(Debug, Default, Clone)]
pub struct SpanIndex {
    entries: HashMap<Vec<String>, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Option<SourceSpan>,
    value: SourceSpan,
}

impl SpanIndex {
    /// Indexes `text`; a document that does not parse yields an empty index (serde_yaml reports
    /// the syntax error with its own location).
    pub fn new(text: &str) -> Self {
        let mut builder = Builder {
            text,
            char_to_byte: char_offsets(text),
            stack: Vec::new(),
            index: SpanIndex::default(),
            done: false,
        };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return SpanIndex::default();
        }
        builder.index
    }

    /// The span of the key at `path`, falling back to its value's span.
    pub fn key(&self, path: &[String]) -> Option<SourceSpan> {
        self.entries.get(path).map(|e| e.key.unwrap_or(e.value))
    }

    /// The span of the value at `path`, falling back to its key's span.
    pub fn value(&self, path: &[String]) -> Option<SourceSpan> {
        self.entries.get(path).map(|e| e.value)
    }

    /// For a path that is not in the document (a missing key): the key of its nearest ancestor
    /// that is, so the label lands on `chunk:` for a missing `chunk.input`.
    pub fn nearest_value(&self, path: &[String]) -> Option<SourceSpan> {
        (1..=path.len())
            .rev()
            .find_map(|n| match self.entries.get(&path[..n]) {
                Some(entry) if n == path.len() => Some(entry.value),
                Some(entry) => Some(entry.key.unwrap_or(entry.value)),
                None => None,
            })
    }
}

/// Byte offset of each char index (yaml-rust2 markers count chars), plus one past the end.
fn char_offsets(text: &str) -> Vec<usize> {
    let mut offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    offsets.push(text.len());
    offsets
}

enum Frame {
    Mapping {
        path: Vec<String>,
        pending_key: Option<(String, SourceSpan)>,
    },
    Sequence {
        path: Vec<String>,
        next: usize,
    },
}

struct Builder<'a> {
    text: &'a str,
    char_to_byte: Vec<usize>,
    stack: Vec<Frame>,
    index: SpanIndex,
    done: bool,
}

impl Builder<'_> {
    fn byte(&self, mark: Marker) -> usize {
        self.char_to_byte
            .get(mark.index())
            .copied()
            .unwrap_or(self.text.len())
    }

    /// A scalar's span: from its marker to the end of its text on that line, without a trailing
    /// comment; for a key, up to the `:`.
    fn scalar_span(&self, mark: Marker, value: &str, is_key: bool) -> SourceSpan {
        let start = self.byte(mark);
        let rest = &self.text[start..];
        let line = rest.split('\n').next().unwrap_or("");
        let quoted = line.starts_with('"') || line.starts_with('\'');
        let natural = value.len() + if quoted { 2 } else { 0 };
        let mut len = if is_key {
            line.find(':').unwrap_or(natural)
        } else {
            let uncommented = line.find(" #").unwrap_or(line.len());
            line[..uncommented].trim_end().len()
        };
        if len == 0 {
            len = natural.min(line.len()).max(1);
        }
        (start, len.min(rest.len())).into()
    }

    /// Records the value node starting at `span`, returning its path.
    fn record_value(&mut self, span: SourceSpan) -> Option<Vec<String>> {
        match self.stack.last_mut() {
            None => {
                self.index.entries.insert(
                    Vec::new(),
                    Entry {
                        key: None,
                        value: span,
                    },
                );
                Some(Vec::new())
            }
            Some(Frame::Mapping { path, pending_key }) => {
                let (key, key_span) = pending_key.take()?;
                let mut child = path.clone();
                child.push(key);
                self.index.entries.insert(
                    child.clone(),
                    Entry {
                        key: Some(key_span),
                        value: span,
                    },
                );
                Some(child)
            }
            Some(Frame::Sequence { path, next }) => {
                let mut child = path.clone();
                child.push(next.to_string());
                *next += 1;
                self.index.entries.insert(
                    child.clone(),
                    Entry {
                        key: None,
                        value: span,
                    },
                );
                Some(child)
            }
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame::Mapping {
                pending_key: None,
                ..
            })
        )
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.done {
            return;
        }
        match event {
            Event::Scalar(value, ..) => {
                if self.expecting_key() {
                    let span = self.scalar_span(mark, &value, true);
                    if let Some(Frame::Mapping { pending_key, .. }) = self.stack.last_mut() {
                        *pending_key = Some((value, span));
                    }
                } else {
                    let span = self.scalar_span(mark, &value, false);
                    self.record_value(span);
                }
            }
            Event::Alias(_) => {
                if self.expecting_key() {
                    // An alias as a key cannot be named in a path; give it a placeholder.
                    let span: SourceSpan = (self.byte(mark), 1).into();
                    if let Some(Frame::Mapping { pending_key, .. }) = self.stack.last_mut() {
                        *pending_key = Some(("*alias".to_owned(), span));
                    }
                } else {
                    let span = (self.byte(mark), 1).into();
                    self.record_value(span);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let span: SourceSpan = (self.byte(mark), 1).into();
                let path = if self.expecting_key() {
                    // A complex key: index its contents under a placeholder.
                    Some(vec!["?complex-key".to_owned()])
                } else {
                    self.record_value(span)
                };
                let path = path.unwrap_or_default();
                self.stack
                    .push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Mapping {
                            path,
                            pending_key: None,
                        }
                    } else {
                        Frame::Sequence { path, next: 0 }
                    });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| (*p).to_owned()).collect()
    }

    fn text_at(text: &str, span: SourceSpan) -> &str {
        &text[span.offset()..span.offset() + span.len()]
    }

    #[test]
    fn locates_keys_and_values() {
        let text = "name: demo\ntrain:\n  epochs: 3 # three\n  dims: [64, 128]\n  list:\n    - a\n    - \"b c\"\n";
        let index = SpanIndex::new(text);
        let key = index.key(&path(&["train", "epochs"])).expect("key");
        assert_eq!(text_at(text, key), "epochs");
        let value = index.value(&path(&["train", "epochs"])).expect("value");
        assert_eq!(text_at(text, value), "3");
        let item = index.value(&path(&["train", "list", "1"])).expect("item");
        assert_eq!(text_at(text, item), "\"b c\"");
        let flow = index
            .value(&path(&["train", "dims", "1"]))
            .expect("flow item");
        assert!(text_at(text, flow).starts_with("128"));
    }

    #[test]
    fn spans_are_byte_offsets_after_multibyte_text() {
        let text = "name: \"café ☕\"\nseed: 7\n";
        let index = SpanIndex::new(text);
        let seed = index.value(&path(&["seed"])).expect("seed");
        assert_eq!(text_at(text, seed), "7");
    }

    #[test]
    fn a_missing_path_points_at_its_nearest_ancestor_key() {
        let text = "train:\n  epochs: 3\n";
        let index = SpanIndex::new(text);
        let span = index
            .nearest_value(&path(&["train", "epochs", "deeper"]))
            .expect("ancestor");
        assert_eq!(text_at(text, span), "epochs");
        let span = index
            .nearest_value(&path(&["train", "missing"]))
            .expect("ancestor");
        assert_eq!(text_at(text, span), "train");
    }
}
