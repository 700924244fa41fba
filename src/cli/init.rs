//! `ragd-pipe init`: a commented recipe for a folder of documents, with what was found in it,
//! a preset for this machine and a rough estimate, checked by the same loader `run` uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::Failure;
use crate::exec;
use crate::llm::LlmSettings;
use crate::model::hub::HubConfig;
use crate::output::Printer;
use crate::plan::PlanOptions;
use crate::recipe::Recipe;
use crate::stages::estimate::Speeds;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The folder of documents to fine-tune on (md, txt, rst, html, pdf), or a BEIR
    /// `corpus.jsonl`.
    #[arg(default_value = ".")]
    pub docs: PathBuf,
    /// Where to write the recipe.
    #[arg(short, long, default_value = "recipe.yaml")]
    pub output: PathBuf,
    /// How queries are written: `auto` picks `llm` when this machine writes them in under half
    /// an hour, else `quick`.
    #[arg(long, value_enum, default_value_t)]
    pub preset: Preset,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// How the recipe gets its training queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    #[default]
    Auto,
    /// Questions written by the embedded LLM: the better data, minutes per hundred chunks.
    Llm,
    /// LLM-free queries (a sentence of each chunk, the inverse cloze task): seconds.
    Quick,
}

/// File extensions the chunk stage reads by default.
const FORMATS: [&str; 7] = ["md", "markdown", "txt", "rst", "html", "htm", "pdf"];

/// Characters per chunk: the chunk stage's 200 tokens less its 32 of overlap, at about 4
/// characters a token in English prose.
const CHARS_PER_CHUNK: f64 = 168. * 4.;

/// Where the recipe's comment gets the plan's estimate, once the recipe loads.
const ESTIMATE: &str = "@@estimate@@";

/// What `init` found in the documents.
#[derive(Debug, Default)]
struct Survey {
    files_by_format: BTreeMap<String, usize>,
    bytes: u64,
    beir: bool,
}

impl Survey {
    fn of(docs: &Path) -> Self {
        let mut survey = Self::default();
        if docs.is_file() {
            survey.beir = true;
            survey.bytes = fs_err::metadata(docs).map_or(0, |m| m.len());
            return survey;
        }
        let hidden = |entry: &walkdir::DirEntry| {
            entry.depth() > 0 && entry.file_name().to_string_lossy().starts_with('.')
        };
        for entry in walkdir::WalkDir::new(docs)
            .into_iter()
            .filter_entry(|e| !hidden(e))
            .flatten()
            .filter(|e| e.file_type().is_file())
        {
            let extension = entry
                .path()
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if FORMATS.contains(&extension.as_str()) {
                *survey.files_by_format.entry(extension).or_default() += 1;
                survey.bytes += entry.metadata().map_or(0, |m| m.len());
            }
        }
        survey
    }

    fn files(&self) -> usize {
        self.files_by_format.values().sum()
    }

    /// Chunks to expect; markup and PDF structure make the bytes an overestimate of the text.
    fn chunks(&self) -> usize {
        (self.bytes as f64 / CHARS_PER_CHUNK).ceil() as usize
    }

    fn describe(&self) -> String {
        if self.beir {
            return format!("a BEIR corpus of {}", size(self.bytes));
        }
        let formats: Vec<String> = self
            .files_by_format
            .iter()
            .map(|(format, count)| format!("{count} {format}"))
            .collect();
        format!(
            "{} documents ({}), {}",
            self.files(),
            formats.join(", "),
            size(self.bytes)
        )
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.0} KB", bytes as f64 / 1e3)
    }
}

/// Total memory of this machine in GiB, where the system says (Linux).
fn memory_gib() -> Option<f64> {
    let text = fs_err::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024. * 1024.))
}

/// A recipe name from the documents' folder: the registry's name rules, else `my-docs`.
fn recipe_name(docs: &Path) -> String {
    let stem = std::path::absolute(docs)
        .ok()
        .and_then(|p| {
            p.components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                    _ => None,
                })
                .next_back()
        })
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    match crate::registry::validate_name(name) {
        Ok(name) => name.to_owned(),
        Err(_) => "my-docs".to_owned(),
    }
}

/// The documents' path as the recipe should hold it: relative to the recipe's folder when one
/// is under the other's parent, else absolute.
fn input_path(docs: &Path, output: &Path) -> Result<String, Failure> {
    let io = |e: std::io::Error| Failure::report(miette::miette!("{e}"), 2);
    let docs = std::path::absolute(docs).map_err(io)?;
    let recipe_dir = std::path::absolute(output)
        .map_err(io)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let relative = docs
        .strip_prefix(&recipe_dir)
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or(docs);
    Ok(relative.display().to_string())
}

pub(super) fn execute(args: &InitArgs, printer: &Printer) -> Result<(), Failure> {
    if !args.docs.exists() {
        return Err(Failure::report(
            miette::miette!(
                help = "give the folder that holds your documents: `ragd-pipe init path/to/docs`",
                "`{}` does not exist",
                args.docs.display()
            ),
            1,
        ));
    }
    if args.output.exists() && !args.force {
        return Err(Failure::report(
            miette::miette!(
                help = "choose another file with `--output`, or replace it with `--force`",
                "`{}` exists already",
                args.output.display()
            ),
            1,
        ));
    }
    let survey = Survey::of(&args.docs);
    if !survey.beir && survey.files() == 0 {
        return Err(Failure::report(
            miette::miette!(
                help = format!("the chunk stage reads {}", FORMATS.join(", ")),
                "no documents in `{}`",
                args.docs.display()
            ),
            1,
        ));
    }
    let draft = recipe_text(args, &survey)?;
    // The recipe must load as written: check it before writing anything.
    let recipe =
        Recipe::from_text(&args.output, draft.clone(), &[]).map_err(|e| Failure::new(e, 2))?;
    let estimate = exec::prepare(&recipe, &PlanOptions::default(), printer.reporter())
        .map(|prepared| exec::estimate(&recipe, &prepared));
    let line = match estimate {
        Ok(estimate) if estimate.stages.iter().all(|s| s.problem.is_none()) => format!(
            "Estimate on this machine: about {} in all, at most {} of memory\n#   ({}).",
            super::plan::duration(estimate.seconds),
            super::plan::bytes(estimate.peak_bytes),
            super::plan::basis_text(estimate.basis)
        ),
        _ => "No estimate yet: the models could not be loaded to time them.".to_owned(),
    };
    let text = draft.replace(ESTIMATE, &line);
    crate::cache::write_atomic(&args.output, text.as_bytes())
        .map_err(|e| Failure::report(miette::miette!("{e}"), 2))?;
    if printer.json {
        printer.json_line(&serde_json::json!({
            "type": "init",
            "recipe": args.output,
            "documents": survey.files(),
            "bytes": survey.bytes,
            "chunks_estimate": survey.chunks(),
        }));
    } else {
        printer.status(&format!(
            "wrote {} for {}: {}\nnext: `ragd-pipe plan {0}` shows what will run, `ragd-pipe run {0}` runs it",
            args.output.display(),
            args.docs.display(),
            survey.describe()
        ));
    }
    Ok(())
}

fn recipe_text(args: &InitArgs, survey: &Survey) -> Result<String, Failure> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks = survey.chunks();
    let speeds = Speeds::open(&HubConfig::from_env().cache_dir);
    let llm_minutes =
        chunks as f64 * speeds.llm(&LlmSettings::default(), None).seconds_per_call / 60.;
    let preset = match args.preset {
        Preset::Auto if llm_minutes <= 30. => Preset::Llm,
        Preset::Auto => Preset::Quick,
        chosen => chosen,
    };
    let memory = memory_gib().map_or_else(
        || "memory unknown".to_owned(),
        |gib| format!("{gib:.0} GiB memory"),
    );
    let (strategies, why) = match preset {
        Preset::Llm => (
            "[llm]",
            "# Questions written by the embedded LLM (SmolLM2-135M, in-process on the CPU, no\n  # server): the better training data. `[ict]` is LLM-free and takes seconds.",
        ),
        _ => (
            "[ict]",
            "# LLM-free queries (a sentence of each chunk stands in for a question): seconds to\n  # write. `[llm]` has the embedded LLM write real questions, the better data, in about\n  # LLM_MINUTES minutes on this machine.",
        ),
    };
    let why = why.replace("LLM_MINUTES", &format!("{:.0}", llm_minutes.max(1.)));
    let input = input_path(&args.docs, &args.output)?;
    let name = recipe_name(&args.docs);
    let today = jiff::Zoned::now().strftime("%Y-%m-%d");
    Ok(format!(
        "\
# A recipe written by `ragd-pipe init` on {today} for {input}:
#   {described}, about {chunks} chunks.
#   This machine: {cores} CPU cores, {memory}.
#   {ESTIMATE}
#   `ragd-pipe plan` shows what will run, and the estimate per stage.
# Check it: `ragd-pipe validate {output}`; run it: `ragd-pipe run {output}`.
# Every key and its default: `ragd-pipe schema`, and docs/guide.md in ragd-pipe's repository.
name: {name}
base_model: sentence-transformers/all-MiniLM-L6-v2
chunk:
  input: {input}
query_gen:
  {why}
  strategies: {strategies}
judge:
mine:
train:
  epochs: 1
  batch_size: 16
evaluate:
  # Scored on documents held out from training. Your own labelled queries (BEIR format,
  # see docs/guide.md) are the most trustworthy test; add them like this:
  # datasets:
  #   - path: my-labelled-queries
register:
  # Stored as `{name}` in ~/.ragd/models. `make_default: true` also makes it ragd's model.
  make_default: false
",
        described = survey.describe(),
        input = yaml_string(&input),
        output = args.output.display(),
    ))
}

/// A plain YAML scalar when the text is one, else a double-quoted string.
fn yaml_string(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if plain {
        text.to_owned()
    } else {
        serde_json::to_string(text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_folder_and_fall_back() {
        assert_eq!(recipe_name(Path::new("examples/docs")), "docs");
        assert_eq!(recipe_name(Path::new("/tmp/My Docs")), "my-docs");
        assert_eq!(recipe_name(Path::new("/")), "my-docs");
    }

    #[test]
    fn odd_paths_are_quoted() {
        assert_eq!(yaml_string("../docs"), "../docs");
        assert_eq!(yaml_string("my docs: 2"), "\"my docs: 2\"");
    }
}
