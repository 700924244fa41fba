//! JSON-constrained decoding for the local backend: a byte-level pushdown matcher compiled from
//! the small JSON-schema subset the stages ask for (objects with fixed properties, arrays with
//! item bounds, strings with length bounds, booleans). Before each sampled token the backend asks
//! the matcher which tokens keep the output a prefix of a schema-valid document, so even a 135M
//! model always answers with parseable JSON.
//!
//! Properties are emitted in the schema's order, all of them; whitespace is allowed where JSON
//! allows it, but at most [`MAX_WHITESPACE_RUN`] bytes in a row so a model cannot stall in
//! blanks.

use serde_json::Value;

use super::LlmError;

/// Bytes of whitespace allowed in a row between JSON tokens.
const MAX_WHITESPACE_RUN: u8 = 16;
/// Nesting depth the matcher tracks; the stages' schemas use three levels.
const MAX_DEPTH: usize = 8;
/// Bounds used where the schema gives none, so generation always terminates.
const DEFAULT_MAX_ITEMS: u16 = 64;
const DEFAULT_MAX_CHARS: u16 = 2000;

/// One node of a compiled schema.
#[derive(Debug)]
enum Node {
    /// `literals[i]` is what precedes field `i` (`{"name":` or `,"name":`); the last is `}`.
    Object {
        literals: Vec<Vec<u8>>,
        children: Vec<u16>,
    },
    Array {
        item: u16,
        min: u16,
        max: u16,
    },
    String {
        min: u16,
        max: u16,
    },
    Boolean,
}

/// A JSON schema compiled for constrained decoding.
#[derive(Debug)]
pub struct JsonGrammar {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayPhase {
    Open,
    First,
    AfterItem,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringPhase {
    Open,
    Body,
    Escape,
    /// Inside `\uXXXX`, with this many hex digits still to come.
    Unicode(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Matching the literal before field `field` (or the closing `}` when `field` is the count).
    Object { node: u16, field: u16, pos: u16 },
    /// The value of field `field` is being matched on the frame above.
    ObjectValue { node: u16, field: u16 },
    Array {
        node: u16,
        count: u16,
        phase: ArrayPhase,
    },
    String {
        node: u16,
        chars: u16,
        phase: StringPhase,
    },
    /// `literal` 0 before the first byte, 1 for `true`, 2 for `false`.
    Boolean { literal: u8, pos: u8 },
}

/// Where the matcher is in the document: small and `Copy`, so trying a token costs a copy.
#[derive(Debug, Clone, Copy)]
pub struct MatchState {
    stack: [Frame; MAX_DEPTH],
    depth: u8,
    whitespace_run: u8,
    complete: bool,
}

const TRUE: &[u8] = b"true";
const FALSE: &[u8] = b"false";

fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\t' | b'\r')
}

impl JsonGrammar {
    /// Compiles `schema`, or says which part is outside the supported subset.
    pub fn compile(schema: &Value) -> Result<Self, LlmError> {
        let mut grammar = Self { nodes: Vec::new() };
        grammar.add(schema, 0)?;
        Ok(grammar)
    }

    fn add(&mut self, schema: &Value, depth: usize) -> Result<u16, LlmError> {
        let unsupported = |what: String| {
            LlmError::Unsupported(format!(
                "the local backend cannot constrain output to this JSON schema: {what}"
            ))
        };
        if depth >= MAX_DEPTH {
            return Err(unsupported(format!("nested deeper than {MAX_DEPTH}")));
        }
        let bound = |key: &str, default: u16| -> Result<u16, LlmError> {
            match schema.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| unsupported(format!("`{key}` is not a small integer"))),
            }
        };
        let kind = schema.get("type").and_then(Value::as_str).unwrap_or("");
        let node = match kind {
            "object" => {
                let properties = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| unsupported("an object without properties".to_owned()))?;
                let mut literals = Vec::new();
                let mut children = Vec::new();
                for (i, (name, property)) in properties.iter().enumerate() {
                    let key =
                        serde_json::to_string(name).map_err(|e| unsupported(e.to_string()))?;
                    let mut literal = vec![if i == 0 { b'{' } else { b',' }];
                    literal.extend_from_slice(key.as_bytes());
                    literal.push(b':');
                    literals.push(literal);
                    children.push(self.add(property, depth + 1)?);
                }
                literals.push(b"}".to_vec());
                Node::Object { literals, children }
            }
            "array" => {
                let items = schema
                    .get("items")
                    .ok_or_else(|| unsupported("an array without `items`".to_owned()))?;
                let min = bound("minItems", 0)?;
                let max = bound("maxItems", DEFAULT_MAX_ITEMS)?;
                if min > max {
                    return Err(unsupported("minItems above maxItems".to_owned()));
                }
                let item = self.add(items, depth + 1)?;
                Node::Array { item, min, max }
            }
            "string" => {
                let min = bound("minLength", 0)?;
                let max = bound("maxLength", DEFAULT_MAX_CHARS)?;
                if min > max {
                    return Err(unsupported("minLength above maxLength".to_owned()));
                }
                Node::String { min, max }
            }
            "boolean" => Node::Boolean,
            other => return Err(unsupported(format!("type `{other}`"))),
        };
        let id = u16::try_from(self.nodes.len())
            .map_err(|_| unsupported("too many schema nodes".to_owned()))?;
        // Children were added first; keep ids stable by placing this node at its own index.
        self.nodes.push(node);
        Ok(id)
    }

    /// The root is the node added last (children are added before their parents).
    fn root(&self) -> u16 {
        (self.nodes.len() - 1) as u16
    }

    /// The state before any output.
    pub fn start(&self) -> MatchState {
        let mut state = MatchState {
            stack: [Frame::Boolean { literal: 0, pos: 0 }; MAX_DEPTH],
            depth: 0,
            whitespace_run: 0,
            complete: false,
        };
        state.push(self.start_frame(self.root()));
        state
    }

    fn start_frame(&self, node: u16) -> Frame {
        match self.nodes[usize::from(node)] {
            Node::Object { .. } => Frame::Object {
                node,
                field: 0,
                pos: 0,
            },
            Node::Array { .. } => Frame::Array {
                node,
                count: 0,
                phase: ArrayPhase::Open,
            },
            Node::String { .. } => Frame::String {
                node,
                chars: 0,
                phase: StringPhase::Open,
            },
            Node::Boolean => Frame::Boolean { literal: 0, pos: 0 },
        }
    }

    /// The state after `bytes`, or None if they leave the schema's language.
    pub fn advance(&self, mut state: MatchState, bytes: &[u8]) -> Option<MatchState> {
        for &byte in bytes {
            if !self.step(&mut state, byte) {
                return None;
            }
        }
        Some(state)
    }

    fn step(&self, state: &mut MatchState, byte: u8) -> bool {
        if state.complete {
            return false;
        }
        let top = state.stack[usize::from(state.depth) - 1];
        if is_whitespace(byte) && self.whitespace_allowed(top) {
            if state.whitespace_run >= MAX_WHITESPACE_RUN {
                return false;
            }
            state.whitespace_run += 1;
            return true;
        }
        state.whitespace_run = 0;
        match top {
            Frame::Object { node, field, pos } => {
                let Node::Object { literals, children } = &self.nodes[usize::from(node)] else {
                    return false;
                };
                let literal = &literals[usize::from(field)];
                if literal.get(usize::from(pos)) != Some(&byte) {
                    return false;
                }
                let pos = pos + 1;
                if usize::from(pos) < literal.len() {
                    state.replace(Frame::Object { node, field, pos });
                } else if usize::from(field) < children.len() {
                    state.replace(Frame::ObjectValue { node, field });
                    if !state.push(self.start_frame(children[usize::from(field)])) {
                        return false;
                    }
                } else {
                    state.finish_top();
                }
                true
            }
            Frame::ObjectValue { .. } => false,
            Frame::Array { node, count, phase } => {
                let Node::Array { item, min, max } = self.nodes[usize::from(node)] else {
                    return false;
                };
                let start_item = |state: &mut MatchState| {
                    state.push(self.start_frame(item)) && self.step(state, byte)
                };
                match (phase, byte) {
                    (ArrayPhase::Open, b'[') => {
                        state.replace(Frame::Array {
                            node,
                            count,
                            phase: ArrayPhase::First,
                        });
                        true
                    }
                    (ArrayPhase::First | ArrayPhase::AfterItem, b']') if count >= min => {
                        state.finish_top();
                        true
                    }
                    (ArrayPhase::AfterItem, b',') if count < max => {
                        state.replace(Frame::Array {
                            node,
                            count,
                            phase: ArrayPhase::AfterComma,
                        });
                        true
                    }
                    (ArrayPhase::First, _) if max > 0 => start_item(state),
                    (ArrayPhase::AfterComma, _) => start_item(state),
                    _ => false,
                }
            }
            Frame::String { node, chars, phase } => {
                let Node::String { min, max } = self.nodes[usize::from(node)] else {
                    return false;
                };
                let next = |state: &mut MatchState, chars: u16, phase| {
                    state.replace(Frame::String { node, chars, phase });
                    true
                };
                match phase {
                    StringPhase::Open => byte == b'"' && next(state, 0, StringPhase::Body),
                    StringPhase::Body => match byte {
                        b'"' if chars >= min => {
                            state.finish_top();
                            true
                        }
                        b'"' => false,
                        b'\\' => chars < max && next(state, chars, StringPhase::Escape),
                        0..0x20 => false,
                        // A UTF-8 continuation byte belongs to the character already counted.
                        0x80..0xC0 => next(state, chars, StringPhase::Body),
                        _ => chars < max && next(state, chars + 1, StringPhase::Body),
                    },
                    StringPhase::Escape => match byte {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            next(state, chars + 1, StringPhase::Body)
                        }
                        b'u' => next(state, chars + 1, StringPhase::Unicode(4)),
                        _ => false,
                    },
                    StringPhase::Unicode(left) => {
                        byte.is_ascii_hexdigit()
                            && next(
                                state,
                                chars,
                                if left == 1 {
                                    StringPhase::Body
                                } else {
                                    StringPhase::Unicode(left - 1)
                                },
                            )
                    }
                }
            }
            Frame::Boolean { literal, pos } => {
                let literal = match (literal, byte) {
                    (0, b't') => 1,
                    (0, b'f') => 2,
                    (0, _) => return false,
                    (l, _) => l,
                };
                let text = if literal == 1 { TRUE } else { FALSE };
                if literal != 0 && pos > 0 && text.get(usize::from(pos)) != Some(&byte) {
                    return false;
                }
                let pos = pos + 1;
                if usize::from(pos) == text.len() {
                    state.finish_top();
                } else {
                    state.replace(Frame::Boolean { literal, pos });
                }
                true
            }
        }
    }

    /// The fewest bytes that complete a document from `state`. Every byte is a token of a
    /// byte-level vocabulary, so a decoder that never picks a token leaving more than its
    /// remaining budget can always finish: `max_tokens` never cuts a constrained answer.
    pub fn bytes_to_complete(&self, state: &MatchState) -> usize {
        let mut total = 0;
        let depth = usize::from(state.depth);
        for (level, frame) in state.stack[..depth].iter().enumerate().rev() {
            // A frame below the top is waiting for the value being written above it.
            let waiting = level + 1 < depth;
            total += match *frame {
                Frame::Object { node, field, pos } => {
                    self.object_rest(node, usize::from(field), usize::from(pos))
                }
                // The value is the frame above (counted); then the fields after it.
                Frame::ObjectValue { node, field } => {
                    self.object_rest(node, usize::from(field) + 1, 0)
                }
                Frame::Array { node, count, phase } => {
                    let Node::Array { item, min, .. } = self.nodes[usize::from(node)] else {
                        continue;
                    };
                    let item = self.min_bytes(item);
                    if waiting {
                        // After the item in progress: the items still short, then `]`.
                        let needed = usize::from(min.saturating_sub(count + 1));
                        total += needed * (item + 1) + 1;
                        continue;
                    }
                    let needed = usize::from(min.saturating_sub(count));
                    match phase {
                        ArrayPhase::Open => self.min_bytes(node),
                        ArrayPhase::First => needed * (item + 1) + usize::from(needed == 0),
                        ArrayPhase::AfterItem => needed * (item + 1) + 1,
                        // A comma was written: one more item at least.
                        ArrayPhase::AfterComma => needed.max(1) * (item + 1),
                    }
                }
                Frame::String { node, chars, phase } => {
                    let Node::String { min, .. } = self.nodes[usize::from(node)] else {
                        continue;
                    };
                    let short = usize::from(min.saturating_sub(chars));
                    match phase {
                        StringPhase::Open => 2 + usize::from(min),
                        StringPhase::Body => short + 1,
                        StringPhase::Escape => 1 + short.saturating_sub(1) + 1,
                        StringPhase::Unicode(left) => usize::from(left) + short + 1,
                    }
                }
                Frame::Boolean { literal, pos } => match literal {
                    2 => FALSE.len() - usize::from(pos),
                    1 => TRUE.len() - usize::from(pos),
                    _ => TRUE.len(),
                },
            };
        }
        total
    }

    /// Bytes of object `node` from field `field`'s literal at `pos` to its `}`.
    fn object_rest(&self, node: u16, field: usize, pos: usize) -> usize {
        let Node::Object { literals, children } = &self.nodes[usize::from(node)] else {
            return 0;
        };
        let literals_left: usize = literals[field..].iter().map(Vec::len).sum::<usize>() - pos;
        literals_left
            + children[field.min(children.len())..]
                .iter()
                .map(|&c| self.min_bytes(c))
                .sum::<usize>()
    }

    /// The fewest bytes of a value of `node`.
    fn min_bytes(&self, node: u16) -> usize {
        match &self.nodes[usize::from(node)] {
            Node::Object { .. } => self.object_rest(node, 0, 0),
            Node::Array { item, min, .. } => {
                let min = usize::from(*min);
                2 + min * self.min_bytes(*item) + min.saturating_sub(1)
            }
            Node::String { min, .. } => 2 + usize::from(*min),
            Node::Boolean => TRUE.len(),
        }
    }

    fn whitespace_allowed(&self, frame: Frame) -> bool {
        match frame {
            Frame::Object { node, field, pos } => {
                let Node::Object { literals, .. } = &self.nodes[usize::from(node)] else {
                    return false;
                };
                let len = literals[usize::from(field)].len() as u16;
                // Before `{`/`,`/`}`, before the key's opening quote, and before the colon.
                pos == 0 || pos == 1 || pos + 1 == len
            }
            Frame::ObjectValue { .. } => false,
            Frame::Array { .. } => true,
            Frame::String { phase, .. } => phase == StringPhase::Open,
            Frame::Boolean { pos, .. } => pos == 0,
        }
    }
}

impl MatchState {
    /// The whole document has been matched: generation should stop.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    fn push(&mut self, frame: Frame) -> bool {
        let depth = usize::from(self.depth);
        if depth == MAX_DEPTH {
            return false;
        }
        self.stack[depth] = frame;
        self.depth += 1;
        true
    }

    fn replace(&mut self, frame: Frame) {
        self.stack[usize::from(self.depth) - 1] = frame;
    }

    /// Pops a finished value and moves its parent past it.
    fn finish_top(&mut self) {
        self.depth -= 1;
        if self.depth == 0 {
            self.complete = true;
            return;
        }
        let parent = self.stack[usize::from(self.depth) - 1];
        let next = match parent {
            Frame::ObjectValue { node, field } => Frame::Object {
                node,
                field: field + 1,
                pos: 0,
            },
            Frame::Array { node, count, .. } => Frame::Array {
                node,
                count: count + 1,
                phase: ArrayPhase::AfterItem,
            },
            other => other,
        };
        self.replace(next);
    }
}

#[cfg(test)]
mod tests {
    /// Walking a document byte by byte, the bytes still needed never exceed what is left of
    /// the shortest document and reach 0 exactly at the end.
    #[test]
    fn bytes_to_complete_counts_down_to_the_end() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "queries": {"type": "array", "items": {"type": "string", "minLength": 3}, "minItems": 2},
                "ok": {"type": "boolean"}
            }
        });
        let grammar = JsonGrammar::compile(&schema).expect("compiles");
        let shortest = br#"{"queries":["abc","def"],"ok":true}"#;
        let mut state = grammar.start();
        assert_eq!(grammar.bytes_to_complete(&state), shortest.len());
        for (i, &byte) in shortest.iter().enumerate() {
            state = grammar.advance(state, &[byte]).expect("valid");
            assert_eq!(
                grammar.bytes_to_complete(&state),
                shortest.len() - i - 1,
                "after {i}"
            );
        }
        assert!(state.is_complete());
        // Longer content: the count stays what closing takes.
        let mut state = grammar.start();
        state = grammar
            .advance(state, br#"{"queries":["abcdef"#)
            .expect("valid");
        assert_eq!(
            grammar.bytes_to_complete(&state),
            r#"","def"],"ok":true}"#.len()
        );
    }

    use super::*;
    use serde_json::json;

    fn queries_grammar() -> JsonGrammar {
        JsonGrammar::compile(&json!({
            "type": "object",
            "properties": {
                "queries": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 2, "maxLength": 10},
                    "minItems": 1,
                    "maxItems": 2
                }
            },
            "required": ["queries"]
        }))
        .expect("compiles")
    }

    fn accepts(grammar: &JsonGrammar, text: &str) -> Option<bool> {
        grammar
            .advance(grammar.start(), text.as_bytes())
            .map(|s| s.is_complete())
    }

    #[test]
    fn accepts_valid_documents_with_whitespace() {
        let g = queries_grammar();
        assert_eq!(accepts(&g, r#"{"queries":["ab"]}"#), Some(true));
        assert_eq!(
            accepts(&g, "{ \"queries\" : [ \"ab\\\"c\" ,\n \"Größe\" ] }"),
            Some(true)
        );
        // A prefix is accepted but not complete.
        assert_eq!(accepts(&g, r#"{"queries": ["a"#), Some(false));
    }

    #[test]
    fn rejects_what_breaks_the_schema() {
        let g = queries_grammar();
        for bad in [
            r#"{"query":["ab"]}"#,                     // wrong key
            r#"{"queries":[]}"#,                       // below minItems
            r#"{"queries":["ab","cd","ef"]}"#,         // above maxItems
            r#"{"queries":["a"]}"#,                    // below minLength
            r#"{"queries":["abcdefghijk"]}"#,          // above maxLength
            "{\"queries\":[\"a\nb\"]}",                // raw control character
            r#"{"queries":["ab"]}x"#,                  // anything after the end
            r#"{"queries":["ab"],}"#,                  // trailing comma
            "{                 \"queries\":[\"ab\"]}", // a run of 17 blanks
        ] {
            assert_eq!(accepts(&g, bad), None, "{bad}");
        }
    }

    #[test]
    fn booleans_and_several_fields() {
        let g = JsonGrammar::compile(&json!({
            "type": "object",
            "properties": {"answerable": {"type": "boolean"}, "reason": {"type": "string"}}
        }))
        .expect("compiles");
        assert_eq!(
            accepts(&g, r#"{"answerable": false, "reason": "no"}"#),
            Some(true)
        );
        assert_eq!(
            accepts(&g, r#"{"answerable": true,"reason":""}"#),
            Some(true)
        );
        assert_eq!(accepts(&g, r#"{"answerable": tru"#), Some(false));
        assert_eq!(accepts(&g, r#"{"answerable": trux"#), None);
        assert_eq!(accepts(&g, r#"{"answerable": "yes""#), None);
    }

    #[test]
    fn refuses_schemas_outside_the_subset() {
        assert!(JsonGrammar::compile(&json!({"type": "number"})).is_err());
        assert!(JsonGrammar::compile(&json!({"type": "object"})).is_err());
    }
}
