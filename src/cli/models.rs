//! `ragd-pipe models`: the registry of fine-tuned models.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use super::Failure;
use crate::model::gguf::{self, GgufType};
use crate::model::ollama::{OllamaServer, ServedCheck};
use crate::output::{Printer, table};
use crate::registry::{self, RegistryError};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// The registry folder [default: `$RAGD_HOME/models`, else `~/.ragd/models`].
    #[arg(long, global = true, value_name = "DIR")]
    pub registry: Option<PathBuf>,
    #[command(subcommand)]
    pub action: ModelsAction,
}

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// List registered models: base model, the fine-tuned model's nDCG@10 and the base's (on the
    /// labelled queries, else the held-out documents), the gain, and the evaluation's verdict.
    List,
    /// Show a model's folder and full training metadata.
    Show {
        /// The registered model.
        name: String,
    },
    /// Remove a model from the registry; refused for a model ragd's config uses.
    Rm {
        /// The registered model.
        name: String,
        /// Remove it even if ragd's config uses it (ragd then fails to load it).
        #[arg(long)]
        force: bool,
    },
    /// Copy a model to a new folder (for sentence-transformers, another machine), or write it as
    /// a GGUF file (for llama.cpp and Ollama), optionally creating it in Ollama.
    Export(ExportArgs),
    /// Make ragd use this model: an embedding model sets `embedding.model: custom` in ragd's
    /// config.yaml, and brings the reranker registered beside it (`retrieval.rerank_model`) unless
    /// its evaluation found reranking worse; a reranker sets `retrieval.rerank_model` alone. With
    /// `--ollama NAME`, ragd embeds with the Ollama model made from it (`embedding.model: NAME`).
    /// The previous config is kept as `config.yaml.bak`.
    Use {
        /// The registered model.
        name: String,
        /// The model's name in Ollama, which must serve it.
        #[arg(long, value_name = "NAME")]
        ollama: Option<String>,
        /// The Ollama server [default: `OLLAMA_HOST`, else http://127.0.0.1:11434].
        #[arg(long, value_name = "URL", requires = "ollama")]
        ollama_url: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The registered model.
    name: String,
    /// The folder to copy to, or the GGUF file to write [default for gguf: `NAME-TYPE.gguf`].
    dest: Option<PathBuf>,
    /// What to write.
    #[arg(long, value_enum, default_value_t = ExportFormat::Folder)]
    format: ExportFormat,
    /// The GGUF's matrix type: f16 (llama.cpp's default), q8_0 (half the size) or f32.
    #[arg(long = "type", value_name = "TYPE", default_value = "f16", value_parser = parse_gguf_type)]
    gguf_type: GgufType,
    /// Also create the model in Ollama under this name, and check that it embeds like ours
    /// (implies `--format gguf`).
    #[arg(long, value_name = "NAME")]
    ollama: Option<String>,
    /// The Ollama server [default: `OLLAMA_HOST`, else http://127.0.0.1:11434].
    #[arg(long, value_name = "URL", requires = "ollama")]
    ollama_url: Option<String>,
    /// The least cosine similarity per probe text between Ollama's embedding and ours.
    #[arg(long, default_value_t = 0.99, requires = "ollama")]
    min_cosine: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    /// A copy of the sentence-transformers folder.
    Folder,
    /// One GGUF file (llama.cpp's `bert` architecture).
    Gguf,
}

fn parse_gguf_type(text: &str) -> Result<GgufType, String> {
    text.parse()
}

fn registry_failure(error: RegistryError) -> Failure {
    let code = match error {
        RegistryError::InvalidName { .. }
        | RegistryError::NotFound { .. }
        | RegistryError::Exists { .. }
        | RegistryError::DestinationNotEmpty { .. }
        | RegistryError::LinkOutside { .. } => 1,
        _ => 2,
    };
    Failure::report(miette::miette!("{}", crate::error_chain(&error)), code)
}

pub(super) fn execute(args: &ModelsArgs, printer: &Printer) -> Result<(), Failure> {
    let root = match &args.registry {
        Some(root) => root.clone(),
        None => registry::default_root().map_err(registry_failure)?,
    };
    match &args.action {
        ModelsAction::List => {
            let entries = registry::list(&root).map_err(registry_failure)?;
            if printer.json {
                for entry in &entries {
                    printer.json_line(&super::typed("model", entry));
                }
                return Ok(());
            }
            if entries.is_empty() {
                printer.status(&format!("no models in {}", root.display()));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let scores = Scores::of(e);
                    let figure =
                        |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
                    vec![
                        e.name.clone(),
                        e.base_model.clone().unwrap_or_else(|| "-".to_owned()),
                        figure(scores.fine_tuned),
                        figure(scores.base),
                        scores
                            .gain()
                            .map_or_else(|| "-".to_owned(), |g| format!("{g:+.3}")),
                        scores.verdict,
                        e.created
                            .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
                            .unwrap_or_else(|| "-".to_owned()),
                        e.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let columns = [
                "name",
                "base model",
                "nDCG@10",
                "base",
                "gain",
                "verdict",
                "registered",
                "",
            ]
            .map(str::to_owned);
            printer.result(&table(&columns, &rows, ""));
            if let Some(set) = entries.iter().find_map(|e| Scores::of(e).dataset) {
                printer.status(&format!(
                    "nDCG@10 on your labelled queries where a model has them, else on held-out documents (`{set}` for the first); `models show NAME` has every figure"
                ));
            }
        }
        ModelsAction::Show { name } => {
            let details = registry::show(&root, name).map_err(registry_failure)?;
            if printer.json {
                printer.json_line(&super::typed("model-details", &details));
            } else {
                let metadata = serde_json::to_string_pretty(&details.metadata).unwrap_or_default();
                printer.result(&format!(
                    "name      {}\npath      {}\nbase      {}\n\n{metadata}\n",
                    details.entry.name,
                    details.entry.path.display(),
                    details.entry.base_model.as_deref().unwrap_or("-"),
                ));
            }
        }
        ModelsAction::Rm { name, force } => {
            let home = registry::default_ragd_home().map_err(registry_failure)?;
            if !force
                && let Some(role) =
                    registry::in_use(&root, name, &home).map_err(registry_failure)?
            {
                let what = match role {
                    registry::ModelRole::Embedding => "embedding model",
                    registry::ModelRole::Reranker => "reranker",
                };
                return Err(Failure::report(
                    miette::miette!(
                        help = "make ragd use another model first (`ragd-pipe models use OTHER`), or remove it anyway with `--force`",
                        "`{name}` is ragd's {what} (in `{}`): removing it would leave ragd without it",
                        home.join(registry::CONFIG_FILE).display()
                    ),
                    1,
                ));
            }
            let path = registry::remove(&root, name).map_err(registry_failure)?;
            printer.status(&format!("removed {name} ({})", path.display()));
        }
        ModelsAction::Export(args) => export(&root, args, printer)?,
        ModelsAction::Use {
            name,
            ollama: Some(ollama_name),
            ollama_url,
        } => {
            registry::show(&root, name).map_err(registry_failure)?;
            let failure = |e: &dyn std::error::Error| {
                Failure::report(miette::miette!("{}", crate::error_chain(e)), 2)
            };
            let server = match ollama_url {
                Some(url) => OllamaServer::new(url),
                None => OllamaServer::from_env(),
            }
            .map_err(|e| failure(&e))?;
            server.model_digest(ollama_name).map_err(|e| failure(&e))?;
            let home = registry::default_ragd_home().map_err(registry_failure)?;
            let backup = registry::backup_config(&home).map_err(registry_failure)?;
            let (config, created) =
                registry::use_ollama_model(ollama_name, &home).map_err(registry_failure)?;
            let verb = if created { "created" } else { "updated" };
            printer.status(&format!(
                "{verb} {}: ragd now embeds with `{ollama_name}` from Ollama at {} (made from {name})",
                config.display(),
                server.url()
            ));
            print_after_use(printer, backup.as_deref(), true);
        }
        ModelsAction::Use { name, .. } => {
            let home = registry::default_ragd_home().map_err(registry_failure)?;
            let backup = registry::backup_config(&home).map_err(registry_failure)?;
            let outcome = registry::use_registered(&root, name, &home).map_err(registry_failure)?;
            for update in &outcome.updates {
                let verb = if update.created { "created" } else { "updated" };
                let what = match update.role {
                    registry::ModelRole::Embedding => "embeds with",
                    registry::ModelRole::Reranker => "reranks with",
                };
                printer.status(&format!(
                    "{verb} {}: ragd now {what} {}",
                    update.config_path.display(),
                    update.model_path.display()
                ));
            }
            if let Some(why) = &outcome.reranker_skipped {
                printer.status(&format!("not changing ragd's reranker: {why}"));
            }
            let embedding = outcome
                .updates
                .iter()
                .any(|u| u.role == registry::ModelRole::Embedding);
            print_after_use(printer, backup.as_deref(), embedding);
        }
    }
    Ok(())
}

/// Where the previous config is, and that documents embedded with the old model must be embedded
/// again: vectors of two models do not compare.
fn print_after_use(printer: &Printer, backup: Option<&Path>, embedding_changed: bool) {
    if let Some(backup) = backup {
        printer.status(&format!(
            "the previous config is kept in {}",
            backup.display()
        ));
    }
    if embedding_changed {
        printer.status(
            "ragd must re-index your documents with the new embedding model: vectors from the old one do not match it",
        );
    }
}

/// The evaluation set evaluate holds out of the training documents.
const HELD_OUT: &str = "held-out";

/// A registry entry's headline: nDCG@10 of the fine-tuned and base models on one evaluation set
/// (the user's labelled queries when there are some), and the evaluation's verdict.
struct Scores {
    dataset: Option<String>,
    fine_tuned: Option<f64>,
    base: Option<f64>,
    verdict: String,
}

impl Scores {
    fn of(entry: &registry::ModelEntry) -> Self {
        // `metrics` is `{dataset: {system: {metric: mean}}}` flattened to dotted keys. The
        // user's own labelled queries say more than the held-out synthetic ones: they come first.
        let scored: Vec<&str> = entry
            .metrics
            .keys()
            .filter_map(|k| k.strip_suffix(".fine-tuned.ndcg@10"))
            .collect();
        let dataset = scored
            .iter()
            .find(|d| **d != HELD_OUT)
            .or(scored.first())
            .map(|d| (*d).to_owned());
        let score = |system: &str| {
            let dataset = dataset.as_deref()?;
            entry
                .metrics
                .get(&format!("{dataset}.{system}.ndcg@10"))
                .copied()
        };
        Self {
            fine_tuned: score("fine-tuned"),
            base: score("base"),
            dataset,
            verdict: entry.verdict.clone().unwrap_or_else(|| "—".to_owned()),
        }
    }

    fn gain(&self) -> Option<f64> {
        Some(self.fine_tuned? - self.base?)
    }
}
fn export(root: &Path, args: &ExportArgs, printer: &Printer) -> Result<(), Failure> {
    let name = &args.name;
    if args.format == ExportFormat::Folder && args.ollama.is_none() {
        let Some(dest) = &args.dest else {
            return Err(Failure::report(
                miette::miette!(
                    help = "give a destination folder, or `--format gguf` for a GGUF file",
                    "`models export {name}` needs a destination folder"
                ),
                1,
            ));
        };
        let path = registry::export(root, name, dest).map_err(registry_failure)?;
        printer.status(&format!("exported {name} to {}", path.display()));
        return Ok(());
    }
    let details = registry::show(root, name).map_err(registry_failure)?;
    let dest = args
        .dest
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}-{}.gguf", args.gguf_type)));
    let exported = gguf::export_bert(&details.entry.path, &dest, args.gguf_type, name)
        .map_err(|e| Failure::report(miette::miette!("{}", crate::error_chain(&e)), 2))?;
    printer.status(&format!(
        "exported {name} to {} ({}, {:.1} MB, {} tensors, {} pooling)",
        exported.path.display(),
        exported.gguf_type,
        exported.bytes as f64 / 1e6,
        exported.tensors,
        exported.pooling
    ));
    let Some(ollama_name) = &args.ollama else {
        if printer.json {
            printer.json_line(&super::typed("gguf-export", &exported));
        }
        return Ok(());
    };
    let ollama_failure = |e: &dyn std::error::Error| {
        Failure::report(miette::miette!("{}", crate::error_chain(e)), 2)
    };
    let server = match &args.ollama_url {
        Some(url) => OllamaServer::new(url),
        None => OllamaServer::from_env(),
    }
    .map_err(|e| ollama_failure(&e))?;
    let check = server
        .publish(ollama_name, &exported.path, &details.entry.path)
        .map_err(|e| ollama_failure(&e))?;
    print_check(printer, &check, args.min_cosine);
    if check.min_cosine >= args.min_cosine {
        Ok(())
    } else {
        Err(Failure::report(
            miette::miette!(
                "the model Ollama serves as `{ollama_name}` does not embed like `{name}`: the least cosine is {:.6}, below {}",
                check.min_cosine,
                args.min_cosine
            ),
            2,
        ))
    }
}

/// The probe comparison: a table on stdout (or one JSON line), the verdict on stderr.
fn print_check(printer: &Printer, check: &ServedCheck, min_cosine: f64) {
    if printer.json {
        printer.json_line(&super::typed("ollama-check", check));
        return;
    }
    let rows: Vec<Vec<String>> = check
        .probes
        .iter()
        .map(|p| vec![format!("{:.6}", p.cosine), p.text.clone()])
        .collect();
    let columns = ["cosine", "probe text"].map(str::to_owned);
    printer.result(&table(&columns, &rows, ""));
    let verdict = if check.min_cosine >= min_cosine {
        "ok"
    } else {
        "FAILED"
    };
    printer.status(&format!(
        "Ollama at {} serves `{}`: cosine with our encoder min {:.6}, mean {:.6} over {} probe texts (needs >= {min_cosine}): {verdict}",
        check.url,
        check.model,
        check.min_cosine,
        check.mean_cosine,
        check.probes.len()
    ));
}
