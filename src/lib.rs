//! ragd-pipe: fine-tune the embedding models behind a local RAG system on your own documents.
//!
//! A YAML recipe (`recipe`) compiles into a DAG of stages (`plan`), each cached under a content
//! hash (`cache`) and run by the executor (`exec`). Stages (`stages`) call the engines: the
//! sentence-embedding model (`model`), LLM backends (`llm`), search indexes (`index`), metrics
//! (`eval`) and the model registry (`registry`). Only `cli` and `output` touch the terminal;
//! `ui` serves the same recipes, runs and registry to a browser.

pub mod cache;
pub mod cli;
pub mod corpus;
pub mod eval;
pub mod exec;
pub mod index;
pub mod llm;
pub mod model;
pub mod output;
pub mod plan;
pub mod recipe;
pub mod registry;
pub mod stages;
pub mod ui;

#[cfg(test)]
pub(crate) mod testutil;

/// Runs a parsed command line; the binary's whole `main`.
pub fn run(cli: cli::Cli) -> std::process::ExitCode {
    cli::execute(cli)
}

/// An error and its causes on one line (`failed to load: file missing: x.json`), for the run log,
/// JSON events and messages that must stay one line; the terminal shows causes as miette does.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

/// A value with every key left out, so its fields take the defaults their serde attributes name:
/// the `Default` of a recipe section is then exactly what a recipe that omits it gets. Panics
/// only if a field has no default, which the first use of that `Default` in any test shows.
pub fn serde_defaults<T: serde::de::DeserializeOwned>() -> T {
    serde_json::from_value(serde_json::json!({})).unwrap_or_else(|e| {
        panic!(
            "every key of {} has a default: {e}",
            std::any::type_name::<T>()
        )
    })
}
