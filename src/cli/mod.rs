//! The command line: clap types, one file per subcommand (each parses its options, calls the
//! library, prints), and the one place errors become miette reports and exit codes
//! (0 ok, 1 bad input, 2 internal or environment failure, 130 interrupted).
//!
//! With `--json` every command writes JSON Lines to stdout, each line an object with a `type`.
//! `run` writes the events of [`crate::exec::Event`] (`plan`, `stage-start`, `stage-done`,
//! `summary`, …) and, after an evaluation, a `report` line; the other commands:
//!
//! | command             | `type` of each line | fields                                          |
//! |---------------------|---------------------|-------------------------------------------------|
//! | `init`              | `init`              | `recipe`, `documents`, `bytes`, `chunks_estimate` |
//! | `plan`              | `plan`              | as `run`'s                                      |
//! | `status`            | `status`            | `recipe`, `lock`, `stages[]` (stage, lock, changes, store, would_run) |
//! | `validate`          | `valid`             | `recipe`, `stages`                              |
//! | `report`            | `report`            | `html`, `markdown`, `json`, `verdict`           |
//! | `stages`            | `stage`             | `kind`, `section`, `produces`, `about`          |
//! | `models list`       | `model`             | `name`, `path`, `created`, `base_model`, `metrics`, `verdict`, `problem` |
//! | `models show`       | `model-details`     | `entry`, `metadata`                             |
//! | `models export`     | `gguf-export`, `ollama-check` | the file written; the probe comparison |
//! | `doctor`            | `doctor`            | backends, devices, `auto`, CPU features and threads, `checks[]` |
//! | `gc`                | `gc`                | `removed`, `bytes`, `kept`, `dry_run`           |
//! | any, on failure     | `diagnostic`        | miette's JSON report                            |

mod bench;
mod completions;
mod doctor;
mod gc;
mod init;
mod models;
mod plan;
mod report;
mod run;
mod schema;
mod stages;
mod status;
mod ui;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::output::{ColorChoice, Printer, Verbosity};
use crate::recipe::Recipe;

/// Fine-tune the embedding models behind your local RAG system on your own documents.
#[derive(Debug, Parser)]
#[command(
    name = "ragd-pipe",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Print only results, warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more detail (cache keys).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Write machine-readable events (JSON Lines) to stdout.
    #[arg(long, global = true, env = "RAGD_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
    /// Never draw progress bars; print plain lines.
    #[arg(long, global = true, env = "RAGD_NO_PROGRESS", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_progress: bool,
    /// When to use colour.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub color: ColorChoice,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented recipe for a folder of documents, matched to this machine.
    Init(init::InitArgs),
    /// Run a recipe: every stage whose inputs, parameters or code changed; the rest is cached.
    Run(run::RunArgs),
    /// Print the latest evaluation report of a recipe (Markdown), or open it (HTML).
    Report(report::ReportArgs),
    /// Show the DAG and, per stage, whether it is cached or will run, and why.
    Plan(plan::PlanArgs),
    /// Compare a recipe and its inputs with its lock file: what changed, what would rerun (exit
    /// code 1 when a stage would rerun, 0 when everything is up to date).
    Status(status::StatusArgs),
    /// Check a recipe without running anything.
    Validate(validate::ValidateArgs),
    /// Print the recipe JSON Schema (for editors), or check the committed one.
    Schema(schema::SchemaArgs),
    /// Remove artifacts that no lock file references.
    Gc(gc::GcArgs),
    /// List the stage kinds a recipe can use.
    Stages,
    /// Manage the registry of fine-tuned models.
    Models(models::ModelsArgs),
    /// Run a benchmark kept in the repository.
    Bench(bench::BenchArgs),
    /// Check this build and machine: accelerators, caches, the registry, ragd's config and a
    /// configured Ollama server.
    Doctor,
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Serve the dashboard on 127.0.0.1: datasets, runs with live progress, models.
    Ui(ui::UiArgs),
}

/// A recipe and `--set` overrides, shared by the commands that read one.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file (YAML).
    pub recipe: PathBuf,
    /// Override a recipe value, e.g. `--set train.epochs=1` (the value is read as YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl RecipeArgs {
    fn load(&self) -> Result<Recipe, Failure> {
        Recipe::load(&self.recipe, &self.set).map_err(|e| Failure::new(e, 1))
    }
}

/// A failed command: what to report (nothing when the output already said it) and the exit code.
pub struct Failure {
    report: Option<miette::Report>,
    code: u8,
}

impl Failure {
    pub fn new<E>(error: E, code: u8) -> Self
    where
        E: miette::Diagnostic + Send + Sync + 'static,
    {
        Self {
            report: Some(miette::Report::new(error)),
            code,
        }
    }

    pub fn report(report: miette::Report, code: u8) -> Self {
        Self {
            report: Some(report),
            code,
        }
    }

    /// An exit code alone, for an answer the output gave (`status`: something would rerun).
    pub fn code(code: u8) -> Self {
        Self { report: None, code }
    }
}

impl From<crate::exec::ExecError> for Failure {
    fn from(error: crate::exec::ExecError) -> Self {
        let code = u8::try_from(error.exit_code()).unwrap_or(2);
        Self::new(error, code)
    }
}

/// Runs the parsed command line and returns the process exit code.
pub(super) fn execute(cli: Cli) -> ExitCode {
    let verbosity = if cli.global.quiet {
        Verbosity::Quiet
    } else if cli.global.verbose > 0 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let printer = Printer::new(
        verbosity,
        cli.global.json,
        cli.global.no_progress,
        cli.global.color,
    );
    install_miette_hook(&printer);
    let result = match cli.command {
        Command::Init(args) => init::execute(&args, &printer),
        Command::Run(args) => run::execute(&args, &printer),
        Command::Plan(args) => plan::execute(&args, &printer),
        Command::Report(args) => report::execute(&args, &printer),
        Command::Status(args) => status::execute(&args, &printer),
        Command::Validate(args) => validate::execute(&args, &printer),
        Command::Schema(args) => schema::execute(&args, &printer),
        Command::Gc(args) => gc::execute(&args, &printer),
        Command::Stages => stages::execute(&printer),
        Command::Bench(args) => bench::execute(&args, &printer),
        Command::Models(args) => models::execute(&args, &printer),
        Command::Doctor => doctor::execute(&printer),
        Command::Completions(args) => completions::execute(&args, &printer),
        Command::Ui(args) => ui::execute(&args, &printer),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(report) = &failure.report {
                render_failure(report, &printer);
            }
            ExitCode::from(failure.code)
        }
    }
}

fn install_miette_hook(printer: &Printer) {
    let color = printer.color;
    // Only fails if a hook is already set, which cannot happen: this runs once per process.
    let _ = miette::set_hook(Box::new(move |_| {
        Box::new(
            miette::MietteHandlerOpts::new()
                .color(color)
                .unicode(true)
                .terminal_links(false)
                .width(terminal_width())
                .build(),
        )
    }));
}

/// The terminal width for diagnostics: 80 when stderr is not a terminal, so output is stable.
fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(80)
}

/// Prints an error: graphical on stderr, or a `diagnostic` event on stdout with `--json`.
fn render_failure(report: &miette::Report, printer: &Printer) {
    if printer.json {
        let mut json = String::new();
        let handler = miette::JSONReportHandler::new();
        if handler.render_report(&mut json, report.as_ref()).is_ok() {
            let diagnostic: serde_json::Value =
                serde_json::from_str(&json).unwrap_or(serde_json::Value::String(json));
            printer.json_line(&crate::exec::Event::Diagnostic { diagnostic });
            return;
        }
    }
    anstream::eprintln!("{report:?}");
}

/// `value` as a JSON object with `type` first: the envelope of every `--json` line.
fn typed(kind: &str, value: &impl serde::Serialize) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert("type".to_owned(), kind.into());
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(fields)) => object.extend(fields),
        Ok(other) => {
            object.insert("value".to_owned(), other);
        }
        Err(_) => {}
    }
    serde_json::Value::Object(object)
}

/// A multi-threaded tokio runtime for commands that run stages: async work (LLM calls) runs on its
/// threads, stages on its blocking pool.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ragd-pipe")
        .build()
        .map_err(|e| Failure::report(miette::miette!("cannot start the async runtime: {e}"), 2))
}
