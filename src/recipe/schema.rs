//! The recipe's JSON Schema, built from the header and the stage registry, and the unknown-key
//! check that walks a recipe against it.
//!
//! Unknown keys are found here rather than by serde's `deny_unknown_fields` because serde stops at
//! the first one and only knows its message, while this walk reports every unknown key with its
//! position and the nearest valid key. `deny_unknown_fields` stays on every struct as a backstop.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::stages::REGISTRY;

use super::Header;

/// The key that every section accepts besides its parameters: the stages it reads from.
pub const FROM_KEY: &str = "from";

/// Where the committed schema lives, relative to the repository root.
pub const SCHEMA_PATH: &str = "schemas/recipe.schema.json";

/// The JSON Schema of a recipe (draft 2020-12), as `ragd-pipe schema` prints it.
pub fn recipe_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator();
    let mut root = generator.root_schema_for::<Header>().to_value();
    let mut sections = Map::new();
    for spec in REGISTRY {
        let reference = (spec.schema)(&mut generator).to_value();
        let mut section = resolve(&reference, generator.definitions())
            .cloned()
            .unwrap_or(reference);
        if let Some(object) = section.as_object_mut() {
            object.insert(
                "description".to_owned(),
                Value::String(spec.about.to_owned()),
            );
            let properties = object
                .entry("properties")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(properties) = properties.as_object_mut() {
                properties.insert(
                    FROM_KEY.to_owned(),
                    json!({
                        "description": "Stages (section names) whose artifacts this stage reads, instead of the nearest upstream producer in the canonical chain.",
                        "type": "array",
                        "items": {"type": "string"}
                    }),
                );
            }
        }
        sections.insert(spec.section.to_owned(), section);
    }
    let definitions = generator.take_definitions(true);
    if let Some(object) = root.as_object_mut() {
        object.insert("title".to_owned(), json!("ragd-pipe recipe"));
        object.insert(
            "description".to_owned(),
            json!("A ragd-pipe recipe: a few top-level keys and one section per stage to run (chunk, query_gen, judge, mine, train, evaluate, register). A stage left out is not run."),
        );
        let properties = object
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(properties) = properties.as_object_mut() {
            properties.extend(sections);
        }
        object.insert("additionalProperties".to_owned(), Value::Bool(false));
        let defs = object
            .entry("$defs")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(defs) = defs.as_object_mut() {
            defs.extend(definitions);
        }
    }
    root
}

/// Follows a local `$ref` (`#/$defs/Name`) within `definitions`.
fn resolve<'a>(schema: &'a Value, definitions: &'a Map<String, Value>) -> Option<&'a Value> {
    let reference = schema.get("$ref")?.as_str()?;
    let name = reference.rsplit('/').next()?;
    definitions.get(name)
}

/// An unknown key found by [`unknown_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The path of the unknown key itself (its parent's path plus the key).
    pub path: Vec<String>,
    pub section: String,
    pub suggestion: Option<String>,
    pub valid: Vec<String>,
}

/// Every key of `value` that the schema does not allow, depth first in document order.
pub fn unknown_keys(value: &serde_yaml::Value, schema: &Value) -> Vec<UnknownKey> {
    let definitions = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut found = Vec::new();
    walk(value, schema, &definitions, &mut Vec::new(), &mut found);
    found
}

/// The object alternatives of a schema: itself, or the branches of `anyOf`/`oneOf`/`allOf`,
/// with references followed.
fn alternatives<'a>(
    schema: &'a Value,
    definitions: &'a Map<String, Value>,
    out: &mut Vec<&'a Value>,
) {
    let schema = resolve(schema, definitions).unwrap_or(schema);
    let mut branched = false;
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if let Some(branches) = schema.get(combinator).and_then(Value::as_array) {
            branched = true;
            for branch in branches {
                alternatives(branch, definitions, out);
            }
        }
    }
    if !branched || schema.get("properties").is_some() {
        out.push(schema);
    }
}

fn walk(
    value: &serde_yaml::Value,
    schema: &Value,
    definitions: &Map<String, Value>,
    path: &mut Vec<String>,
    found: &mut Vec<UnknownKey>,
) {
    let mut options = Vec::new();
    alternatives(schema, definitions, &mut options);
    match value {
        serde_yaml::Value::Mapping(mapping) => {
            let mut allowed: Vec<&str> = Vec::new();
            let mut open = false;
            for option in &options {
                if let Some(properties) = option.get("properties").and_then(Value::as_object) {
                    allowed.extend(properties.keys().map(String::as_str));
                }
                let closed = option.get("additionalProperties") == Some(&Value::Bool(false));
                let has_properties = option.get("properties").is_some();
                // A map type (an object schema without properties) or an unconstrained schema
                // accepts any key; a non-object alternative (`null` of an Option) says nothing.
                let may_be_object = match option.get("type") {
                    None => true,
                    Some(Value::String(t)) => t == "object",
                    Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
                    Some(_) => false,
                };
                if may_be_object && !closed && !has_properties {
                    open = true;
                }
                // Externally tagged enums list their variants as single-key objects.
                if let Some(required) = option.get("required").and_then(Value::as_array)
                    && !has_properties
                {
                    allowed.extend(required.iter().filter_map(Value::as_str));
                }
            }
            for (key, child) in mapping {
                let Some(key) = key.as_str() else { continue };
                let child_schema = options.iter().find_map(|option| {
                    option
                        .get("properties")
                        .and_then(|p| p.get(key))
                        .or_else(|| option.get("additionalProperties").filter(|a| a.is_object()))
                });
                path.push(key.to_owned());
                match child_schema {
                    Some(child_schema) => walk(child, child_schema, definitions, path, found),
                    None if !open && !options.is_empty() => {
                        let mut valid: Vec<String> =
                            allowed.iter().map(|k| (*k).to_owned()).collect();
                        valid.sort();
                        valid.dedup();
                        found.push(UnknownKey {
                            path: path.clone(),
                            section: path[..path.len() - 1].join("."),
                            suggestion: nearest(key, &valid),
                            valid,
                        });
                    }
                    None => {}
                }
                path.pop();
            }
        }
        serde_yaml::Value::Sequence(items) => {
            let item_schema = options.iter().find_map(|option| option.get("items"));
            if let Some(item_schema) = item_schema {
                for (index, item) in items.iter().enumerate() {
                    path.push(index.to_string());
                    walk(item, item_schema, definitions, path, found);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

/// The valid key closest to a misspelt one, when it is close enough to be a likely typo.
pub fn nearest(wrong: &str, valid: &[String]) -> Option<String> {
    valid
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(wrong, candidate), candidate))
        .filter(|(distance, candidate)| {
            let limit = (candidate.len().max(wrong.len()) / 3).max(1);
            *distance <= limit
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_key() {
        let valid: Vec<String> = ["epochs", "batch_size", "learning_rate"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(nearest("epocs", &valid).as_deref(), Some("epochs"));
        assert_eq!(nearest("batchsize", &valid).as_deref(), Some("batch_size"));
        assert_eq!(nearest("zebra", &valid), None);
    }

    #[test]
    fn finds_unknown_keys_at_every_depth() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "train": {"$ref": "#/$defs/Train"},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}}
            },
            "$defs": {
                "Train": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {"epochs": {"type": "integer"}, "loss": {"anyOf": [{"$ref": "#/$defs/Loss"}, {"type": "null"}]}}
                },
                "Loss": {"type": "object", "additionalProperties": false, "properties": {"scale": {"type": "number"}}}
            }
        });
        let value: serde_yaml::Value = serde_yaml::from_str(
            "train:\n  epocs: 1\n  loss:\n    scael: 2\ntags:\n  anything: goes\nnmae: x\n",
        )
        .expect("yaml");
        let found = unknown_keys(&value, &schema);
        let paths: Vec<String> = found.iter().map(|u| u.path.join(".")).collect();
        assert_eq!(paths, ["train.epocs", "train.loss.scael", "nmae"]);
        assert_eq!(found[0].suggestion.as_deref(), Some("epochs"));
        assert_eq!(found[1].suggestion.as_deref(), Some("scale"));
    }
}
