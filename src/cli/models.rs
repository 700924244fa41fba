//! `ragd-pipe models`: the registry of fine-tuned models.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::Failure;
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
    /// List registered models with their base model and headline metrics.
    List,
    /// Show a model's folder and full training metadata.
    Show { name: String },
    /// Remove a model from the registry.
    Rm { name: String },
    /// Copy a model to a new folder (for sentence-transformers, Ollama, another machine).
    Export { name: String, dest: PathBuf },
    /// Make ragd embed with this model (`embedding.model: custom` in ragd's config.yaml).
    Use { name: String },
}

fn registry_failure(error: RegistryError) -> Failure {
    let code = match error {
        RegistryError::InvalidName { .. }
        | RegistryError::NotFound { .. }
        | RegistryError::Exists { .. }
        | RegistryError::DestinationNotEmpty { .. } => 1,
        _ => 2,
    };
    Failure::report(
        miette::miette!("{}", crate::exec::error_chain(&error)),
        code,
    )
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
                    printer.json_line(entry);
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
                    let ndcg = e
                        .metrics
                        .iter()
                        .find(|(k, _)| k.ends_with("ndcg@10"))
                        .map(|(_, v)| format!("{v:.3}"))
                        .unwrap_or_else(|| "-".to_owned());
                    vec![
                        e.name.clone(),
                        e.base_model.clone().unwrap_or_else(|| "-".to_owned()),
                        ndcg,
                        e.created
                            .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
                            .unwrap_or_else(|| "-".to_owned()),
                        e.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let columns = ["name", "base model", "nDCG@10", "registered", ""].map(str::to_owned);
            printer.result(&table(&columns, &rows, ""));
        }
        ModelsAction::Show { name } => {
            let details = registry::show(&root, name).map_err(registry_failure)?;
            if printer.json {
                printer.json_line(&details);
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
        ModelsAction::Rm { name } => {
            let path = registry::remove(&root, name).map_err(registry_failure)?;
            printer.status(&format!("removed {name} ({})", path.display()));
        }
        ModelsAction::Export { name, dest } => {
            let path = registry::export(&root, name, dest).map_err(registry_failure)?;
            printer.status(&format!("exported {name} to {}", path.display()));
        }
        ModelsAction::Use { name } => {
            let home = registry::default_ragd_home().map_err(registry_failure)?;
            let update = registry::use_model(&root, name, &home).map_err(registry_failure)?;
            let verb = if update.created { "created" } else { "updated" };
            printer.status(&format!(
                "{verb} {}: ragd now embeds with {} ({})",
                update.config_path.display(),
                name,
                update.model_path.display()
            ));
        }
    }
    Ok(())
}
