//! Why a stage reruns, as data (for `--json`) and as a sentence (for people).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::key::KeyRecord;

/// One reason a stage will run instead of using its cached artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum DirtyReason {
    /// `--force` or `--force-all`.
    Forced,
    /// No lock entry and no artifact: the stage never ran.
    NeverRun,
    /// The lock has this exact key, but the artifact is not in this workdir (a fresh clone, `gc`).
    NotInStore,
    /// The artifact is there but damaged.
    ArtifactCorrupt { detail: String },
    /// The artifact is there, but what the stage did outside the store is gone.
    EffectMissing { detail: String },
    /// Keys are built differently now (the key format or the tool version changed).
    ToolChanged { old: String, new: String },
    /// The stage's implementation version changed.
    StageVersion { old: u32, new: u32 },
    /// Parameters changed, each with its dotted path in the recipe.
    Params { changes: Vec<ParamChange> },
    /// An upstream stage's key changed.
    Upstream { artifact: String },
    /// An upstream stage runs first (forced, or its artifact is damaged or gone) and may produce
    /// other bytes under its key: this stage reruns unless they come out identical (early
    /// cutoff, decided once the upstream stage has run).
    UpstreamRuns { artifact: String, stage: String },
    /// The upstream artifact holds other bytes than the ones this artifact was computed from (a
    /// stage that is not bit-reproducible reran under the same key).
    UpstreamOutput { artifact: String },
    /// Input files changed. Per-file lists are empty when only aggregates were known.
    Files {
        label: String,
        added: Vec<String>,
        removed: Vec<String>,
        modified: Vec<String>,
    },
    /// A model's files changed (or the reference points elsewhere).
    Model { label: String, reference: String },
    /// A remote identity changed (e.g. the Ollama model's digest).
    Identity {
        label: String,
        old: String,
        new: String,
    },
    /// An external input appeared or went away.
    ExternalSet { label: String, present: bool },
    /// What the stage reads could not be resolved (a server that does not answer), so its key
    /// is unknown; it fails if run.
    IdentityUnknown { detail: String },
}

/// One changed parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamChange {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// How many names a message lists before "and N more".
const LIST_LIMIT: usize = 3;

fn listed(names: &[String]) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(LIST_LIMIT)
        .map(|n| format!("`{n}`"))
        .collect();
    match names.len().saturating_sub(LIST_LIMIT) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn short(value: &Option<Value>) -> String {
    match value {
        None => "unset".to_owned(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => {
            let text = other.to_string();
            if text.len() > 40 {
                format!("{}…", &text[..text.floor_char_boundary(39)])
            } else {
                text
            }
        }
    }
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forced => write!(f, "forced"),
            Self::NeverRun => write!(f, "never run"),
            Self::NotInStore => write!(f, "not in this workdir's store (the lock matches)"),
            Self::ArtifactCorrupt { detail } => write!(f, "cached artifact is damaged: {detail}"),
            Self::EffectMissing { detail } => write!(f, "{detail}"),
            Self::ToolChanged { old, new } => write!(f, "ragd-pipe changed ({old} → {new})"),
            Self::StageVersion { old, new } => {
                write!(f, "stage implementation changed (v{old} → v{new})")
            }
            Self::Params { changes } => {
                let parts: Vec<String> = changes
                    .iter()
                    .take(LIST_LIMIT)
                    .map(|c| format!("`{}` {} → {}", c.path, short(&c.old), short(&c.new)))
                    .collect();
                let more = changes.len().saturating_sub(LIST_LIMIT);
                let noun = if changes.len() == 1 {
                    "parameter"
                } else {
                    "parameters"
                };
                write!(f, "{noun} changed: {}", parts.join(", "))?;
                if more > 0 {
                    write!(f, " and {more} more")?;
                }
                Ok(())
            }
            Self::Upstream { artifact } => write!(f, "upstream {artifact} changed"),
            Self::UpstreamRuns { stage, .. } => write!(
                f,
                "upstream `{stage}` runs first; kept if its output comes out identical"
            ),
            Self::UpstreamOutput { artifact } => {
                write!(f, "upstream {artifact} changed (same key, other bytes)")
            }
            Self::Files {
                label,
                added,
                removed,
                modified,
            } => {
                if added.is_empty() && removed.is_empty() && modified.is_empty() {
                    return write!(f, "input `{label}` changed");
                }
                let mut parts = Vec::new();
                if !modified.is_empty() {
                    parts.push(format!("modified {}", listed(modified)));
                }
                if !added.is_empty() {
                    parts.push(format!("added {}", listed(added)));
                }
                if !removed.is_empty() {
                    parts.push(format!("removed {}", listed(removed)));
                }
                write!(f, "input `{label}` changed: {}", parts.join("; "))
            }
            Self::Model { label, reference } => {
                write!(f, "model `{label}` ({reference}) changed")
            }
            Self::Identity { label, old, new } => write!(f, "`{label}` changed ({old} → {new})"),
            Self::IdentityUnknown { detail } => write!(f, "identity unknown: {detail}"),
            Self::ExternalSet { label, present } => {
                if *present {
                    write!(f, "new input `{label}`")
                } else {
                    write!(f, "input `{label}` no longer used")
                }
            }
        }
    }
}

/// The reasons `new` differs from `old`, most fundamental first. `section` prefixes parameter paths.
pub fn explain(old: &KeyRecord, new: &KeyRecord, section: &str) -> Vec<DirtyReason> {
    let mut reasons = Vec::new();
    if old.format != new.format || old.tool_version != new.tool_version {
        reasons.push(DirtyReason::ToolChanged {
            old: old.tool_version.clone(),
            new: new.tool_version.clone(),
        });
    }
    if old.stage_version != new.stage_version {
        reasons.push(DirtyReason::StageVersion {
            old: old.stage_version,
            new: new.stage_version,
        });
    }
    let mut changes = Vec::new();
    diff_values(section, Some(&old.params), Some(&new.params), &mut changes);
    if !changes.is_empty() {
        reasons.push(DirtyReason::Params { changes });
    }
    let artifacts: BTreeSet<&String> = old.upstream.keys().chain(new.upstream.keys()).collect();
    for artifact in artifacts {
        if old.upstream.get(artifact) != new.upstream.get(artifact) {
            reasons.push(DirtyReason::Upstream {
                artifact: artifact.clone(),
            });
        }
    }
    let labels: BTreeSet<&String> = old.externals.keys().chain(new.externals.keys()).collect();
    for label in labels {
        match (old.externals.get(label), new.externals.get(label)) {
            (Some(a), Some(b)) if a.digest != b.digest => match b.kind.as_str() {
                "identity" => reasons.push(DirtyReason::Identity {
                    label: label.clone(),
                    old: a.detail.clone().unwrap_or_default(),
                    new: b.detail.clone().unwrap_or_default(),
                }),
                "model" => reasons.push(DirtyReason::Model {
                    label: label.clone(),
                    reference: b.detail.clone().unwrap_or_default(),
                }),
                _ => {
                    let (mut added, mut removed, mut modified) =
                        (Vec::new(), Vec::new(), Vec::new());
                    if !a.files.is_empty() {
                        for (path, digest) in &b.files {
                            match a.files.get(path) {
                                None => added.push(path.clone()),
                                Some(d) if d != digest => modified.push(path.clone()),
                                Some(_) => {}
                            }
                        }
                        removed = a
                            .files
                            .keys()
                            .filter(|p| !b.files.contains_key(*p))
                            .cloned()
                            .collect();
                    }
                    reasons.push(DirtyReason::Files {
                        label: label.clone(),
                        added,
                        removed,
                        modified,
                    });
                }
            },
            (Some(_), Some(_)) => {}
            (None, Some(_)) => reasons.push(DirtyReason::ExternalSet {
                label: label.clone(),
                present: true,
            }),
            (Some(_), None) => reasons.push(DirtyReason::ExternalSet {
                label: label.clone(),
                present: false,
            }),
            (None, None) => {}
        }
    }
    reasons
}

/// Leaf-level differences between two JSON values, with dotted paths.
fn diff_values(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<ParamChange>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                diff_values(&format!("{path}.{key}"), a.get(key), b.get(key), out);
            }
        }
        (a, b) if a != b => out.push(ParamChange {
            path: path.to_owned(),
            old: a.cloned(),
            new: b.cloned(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{ExternalDigest, KEY_FORMAT};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn record(params: Value, files: &[(&str, &str)]) -> KeyRecord {
        let files: BTreeMap<String, String> = files
            .iter()
            .map(|(p, d)| ((*p).to_owned(), (*d).to_owned()))
            .collect();
        let mut externals = BTreeMap::new();
        externals.insert(
            "corpus".to_owned(),
            ExternalDigest::of_files("files", files, None),
        );
        KeyRecord {
            format: KEY_FORMAT,
            kind: "chunk".to_owned(),
            stage_version: 1,
            tool_version: "0.1.0".to_owned(),
            params,
            upstream: BTreeMap::new(),
            externals,
        }
    }

    #[test]
    fn names_the_changed_parameter_and_files() {
        let old = record(
            json!({"max_tokens": 256, "nested": {"a": 1}}),
            &[("a.md", "1"), ("b.md", "2")],
        );
        let new = record(
            json!({"max_tokens": 128, "nested": {"a": 1}}),
            &[("a.md", "9"), ("c.md", "3")],
        );
        let reasons = explain(&old, &new, "chunk");
        let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "parameter changed: `chunk.max_tokens` 256 → 128",
                "input `corpus` changed: modified `a.md`; added `c.md`; removed `b.md`",
            ]
        );
    }

    #[test]
    fn identical_records_have_no_reason() {
        let a = record(json!({"x": 1}), &[("a.md", "1")]);
        assert!(explain(&a, &a.clone(), "chunk").is_empty());
    }
}
