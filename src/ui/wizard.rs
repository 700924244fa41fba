//! The new-run wizard's recipe: data, a base model and a preset become recipe text, which the
//! review step shows (editable, and checked by the recipe loader itself before it is queued).
//!
//! The presets, for a documents folder:
//!
//! | preset     | query-gen                           | mine             | train                               |
//! |------------|-------------------------------------|------------------|-------------------------------------|
//! | `quick`    | `ict` (LLM-free), 48 chunks         | 1 negative       | 8 steps of 8, 96 tokens             |
//! | `balanced` | `llm` (embedded SmolLM2), every chunk | 1 negative (default) | 1 epoch, batches of 16          |
//! | `thorough` | `llm` and `ict`, every chunk        | 3 negatives      | 3 epochs, batches of 32             |
//!
//! `quick` is minutes on a laptop CPU and shows the pipeline works; `balanced` is the
//! quickstart's recipe; `thorough` spends about three times that on more data and epochs. For an
//! uploaded training file only `train` (and `register`) run, with the same train settings.

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

/// How much work a run does; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Quick,
    Balanced,
    Thorough,
}

/// Where the training data comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataChoice {
    /// A folder of documents (or a BEIR `corpus.jsonl`) on this machine.
    Folder {
        path: String,
        /// A folder of labelled BEIR questions to evaluate on besides the held-out split.
        #[serde(default)]
        labelled: Option<String>,
    },
    /// An uploaded training file (by dataset id).
    Dataset { id: i64 },
}

/// What the wizard asks.
#[derive(Debug, Clone, Deserialize)]
pub struct WizardChoices {
    pub name: String,
    pub data: DataChoice,
    pub base_model: String,
    pub preset: Preset,
}

/// A YAML double-quoted string.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The recipe text for `choices`; `data` is the resolved absolute path of the folder or file,
/// `labelled` that of the labelled questions.
pub fn recipe_text(
    choices: &WizardChoices,
    data: &Path,
    labelled: Option<&Path>,
    workdir: &Path,
) -> String {
    let mut out = format!(
        "# Made by the ragd-pipe dashboard's wizard (preset `{preset}`); a normal recipe:\n\
         # `ragd-pipe run` runs it the same way.\n\
         name: {name}\nbase_model: {model}\nseed: 7\nworkdir: {workdir}\n",
        preset = preset_name(choices.preset),
        name = quoted(&choices.name),
        model = quoted(&choices.base_model),
        workdir = quoted(&workdir.to_string_lossy()),
    );
    let train = match choices.preset {
        Preset::Quick => {
            "train:\n  batch_size: 8\n  mini_batch_size: 8\n  max_steps: 8\n  max_seq_length: 96\n"
        }
        Preset::Balanced => "train:\n  epochs: 1\n  batch_size: 16\n",
        Preset::Thorough => "train:\n  epochs: 3\n  batch_size: 32\n",
    };
    match &choices.data {
        DataChoice::Folder { .. } => {
            let query_gen = match choices.preset {
                Preset::Quick => "query_gen:\n  strategies: [ict]\n  max_chunks: 48\n",
                Preset::Balanced => "query_gen:\n  strategies: [llm]\n",
                Preset::Thorough => "query_gen:\n  strategies: [llm, ict]\n",
            };
            let mine = match choices.preset {
                Preset::Quick => "mine:\n  negatives_per_query: 1\n",
                Preset::Balanced => "mine: {}\n",
                Preset::Thorough => "mine:\n  negatives_per_query: 3\n",
            };
            let _ = write!(
                out,
                "chunk:\n  input: {}\n{query_gen}judge: {{}}\n{mine}{train}",
                quoted(&data.to_string_lossy())
            );
            out.push_str("evaluate:\n");
            if choices.preset == Preset::Quick {
                out.push_str("  resamples: 500\n");
            }
            if let Some(labelled) = labelled {
                let _ = write!(
                    out,
                    "  datasets:\n    - path: {}\n      name: labelled\n",
                    quoted(&labelled.to_string_lossy())
                );
            }
        }
        DataChoice::Dataset { .. } => {
            out.push_str(train);
            let _ = writeln!(out, "  data: {}", quoted(&data.to_string_lossy()));
        }
    }
    out.push_str("register: {}\n");
    out
}

fn preset_name(preset: Preset) -> &'static str {
    match preset {
        Preset::Quick => "quick",
        Preset::Balanced => "balanced",
        Preset::Thorough => "thorough",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;

    fn choices(data: DataChoice, preset: Preset) -> WizardChoices {
        WizardChoices {
            name: "docs".to_owned(),
            data,
            base_model: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
            preset,
        }
    }

    #[test]
    fn every_preset_makes_a_recipe_the_loader_accepts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let docs = dir.path().join("docs");
        fs_err::create_dir_all(&docs).expect("docs");
        let data = dir.path().join("train.jsonl");
        fs_err::write(&data, "{}\n").expect("data");
        for preset in [Preset::Quick, Preset::Balanced, Preset::Thorough] {
            let folder = DataChoice::Folder {
                path: String::new(),
                labelled: None,
            };
            for (choice, path) in [
                (folder, docs.as_path()),
                (DataChoice::Dataset { id: 1 }, data.as_path()),
            ] {
                let text = recipe_text(&choices(choice, preset), path, None, &dir.path().join("w"));
                let recipe = Recipe::from_text(&dir.path().join("r.yaml"), text.clone(), &[]);
                assert!(recipe.is_ok(), "{preset:?}\n{text}\n{:?}", recipe.err());
            }
        }
    }
}
