//! The chunk stage: the user's documents (a folder of md/txt/rst/html/pdf, or a BEIR
//! `corpus.jsonl`) → `chunks.jsonl` (`id, doc_id, source, title, text, n_tokens`) and
//! `stats.json`, counted in tokens of the base model's tokenizer.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{Basis, Estimate, EstimateInput, PROCESS_BYTES, Sizes};
use super::io::CHUNKS_FILE;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::{
    self, ChunkOptions, CorpusError, CorpusReporter, FileFilter, Phase, Skip, Source,
};
use crate::model::hub::WantedFile;

/// The artifact's statistics, beside [`CHUNKS_FILE`].
pub const STATS_FILE: &str = "stats.json";

/// How many skipped files get their own warning line; the rest are counted in the table.
const SKIP_WARNINGS: usize = 10;

const TOKENIZER_FILES: &[WantedFile] = &[WantedFile {
    name: "tokenizer.json",
    required: true,
}];

/// The `chunk:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ChunkParams {
    /// The documents: a folder (read recursively) or a JSONL file in the BEIR corpus format
    /// (`{"_id", "title", "text"}` per line). Relative to the recipe. Required.
    #[serde(default)]
    pub input: Option<PathBuf>,
    /// Files of a folder to read, as globs relative to it (`**` crosses folders).
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// Files of a folder to leave out. The default leaves out hidden files and folders.
    #[serde(default = "default_exclude")]
    pub exclude: Vec<String>,
    /// The most tokens of the base model's tokenizer in one chunk (special tokens not counted).
    /// Keep it below the model's `max_seq_length` (256 for all-MiniLM-L6-v2).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Tokens repeated between consecutive pieces of a paragraph longer than `max_tokens`.
    #[serde(default = "default_overlap")]
    pub overlap: usize,
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self {
            input: None,
            include: default_include(),
            exclude: default_exclude(),
            max_tokens: default_max_tokens(),
            overlap: default_overlap(),
        }
    }
}

fn default_include() -> Vec<String> {
    FileFilter::default().include
}

fn default_exclude() -> Vec<String> {
    FileFilter::default().exclude
}

fn default_max_tokens() -> usize {
    200
}

fn default_overlap() -> usize {
    32
}

/// The chunk stage, built from its section.
pub struct Chunk {
    params: ChunkParams,
    source: Source,
    base_model: String,
}

impl StageDef for Chunk {
    const KIND: &'static str = "chunk";
    const SECTION: &'static str = "chunk";
    const ABOUT: &'static str =
        "Cut the documents into chunks of the base model's tokens, along headings and paragraphs.";
    const PRODUCES: Artifact = Artifact::Chunks;
    type Params = ChunkParams;

    fn new(params: ChunkParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        if params.max_tokens < 16 || params.max_tokens > 8192 {
            invalid.push(
                Invalid::new(
                    &["max_tokens"],
                    format!("{} is out of range", params.max_tokens),
                )
                .with_help(
                    "chunks of 16 to 8192 tokens; around 200 suits most sentence-embedding models",
                ),
            );
        }
        if params.overlap.saturating_mul(2) > params.max_tokens {
            invalid.push(
                Invalid::new(
                    &["overlap"],
                    format!("{} is more than half of `max_tokens`", params.overlap),
                )
                .with_help("an overlap of 10-20% of `max_tokens` is typical"),
            );
        }
        let Some(input) = &params.input else {
            invalid
                .push(Invalid::new(&["input"], "is required").with_help(
                    "set `chunk.input` to a folder of documents or a BEIR corpus.jsonl",
                ));
            return Err(invalid);
        };
        let path = env.dir.join(input);
        let filter = FileFilter {
            include: params.include.clone(),
            exclude: params.exclude.clone(),
        };
        let source = match Source::from_path(&path, filter) {
            Ok(source) => Some(source),
            Err(CorpusError::RootMissing { .. }) => {
                invalid.push(
                    Invalid::new(&["input"], format!("`{}` does not exist", path.display()))
                        .with_help("paths are relative to the recipe's folder"),
                );
                None
            }
            Err(error) => {
                invalid.push(Invalid::new(&["input"], error.to_string()));
                None
            }
        };
        // Check the globs now rather than when the stage runs.
        for (which, globs) in [("include", &params.include), ("exclude", &params.exclude)] {
            for (i, glob) in globs.iter().enumerate() {
                if let Err(e) = globset::Glob::new(glob) {
                    invalid.push(Invalid::new(
                        &[which, &i.to_string()],
                        format!("invalid glob: {}", e.kind()),
                    ));
                }
            }
        }
        match source {
            Some(source) if invalid.is_empty() => Ok(Self {
                params,
                source,
                base_model: env.base_model.clone(),
            }),
            _ => Err(invalid),
        }
    }
}

impl Stage for Chunk {
    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }

    /// Everything but `input`: where the corpus lives does not change the chunks; its files'
    /// relative paths and bytes (in the key through [`Stage::externals`]) do.
    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "include": self.params.include,
            "exclude": self.params.exclude,
            "max_tokens": self.params.max_tokens,
            "overlap": self.params.overlap,
        })
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        let files = self.source.files().map_err(corpus_error)?;
        let root = match &self.source {
            Source::Folder { root, .. } => root.clone(),
            Source::BeirJsonl { path } => path.parent().map(PathBuf::from).unwrap_or_default(),
        };
        let relative = files
            .iter()
            .map(|f| {
                f.strip_prefix(&root)
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| f.clone())
            })
            .collect();
        let model = env.resolve_model(&self.base_model, TOKENIZER_FILES)?;
        Ok(vec![
            External::Files {
                label: "corpus".to_owned(),
                root,
                files: relative,
            },
            External::Model {
                label: "tokenizer".to_owned(),
                reference: self.base_model.clone(),
                path: model.join("tokenizer.json"),
            },
        ])
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let files = self.source.files().map_err(corpus_error)?;
        let bytes: u64 = files
            .iter()
            .filter_map(|f| fs_err::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        // Each chunk advances by `max_tokens - overlap` tokens of about 4 bytes. Corpora differ:
        // the quickstart's prose made a chunk of 904 bytes, pyfaq's code and markup one of 477.
        let step = (self.params.max_tokens.saturating_sub(self.params.overlap)).max(1) as u64 * 4;
        Ok(Estimate {
            // Tokenizing runs at a few MB a second.
            seconds: 1. + bytes as f64 / 2e6,
            peak_bytes: PROCESS_BYTES + 4 * bytes,
            basis: Basis::Rough,
            sizes: Sizes {
                chunks: Some(bytes.div_ceil(step)),
                // Chunks end at headings and paragraphs: the quickstart's average 118 of 200.
                chunk_tokens: Some(self.params.max_tokens as u64 * 3 / 5),
                ..input.sizes
            },
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let model = ctx.env.resolve_model(&self.base_model, TOKENIZER_FILES)?;
        let tokenizer_path = model.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            StageError::Failed(format!("cannot load `{}`: {e}", tokenizer_path.display()))
        })?;
        let reporter = Reporter::new(ctx);
        let corpus = corpus::read_source(&self.source, &reporter).map_err(corpus_error)?;
        ctx.check_cancelled()?;
        let options = ChunkOptions {
            max_tokens: self.params.max_tokens,
            overlap: self.params.overlap,
        };
        let chunked = corpus::chunk_documents(&corpus, &tokenizer, options, &reporter)
            .map_err(corpus_error)?;
        drop(reporter);

        let mut out = std::io::BufWriter::new(fs_err::File::create(ctx.out_dir.join(CHUNKS_FILE))?);
        for chunk in &chunked.chunks {
            serde_json::to_writer(&mut out, chunk)?;
            std::io::Write::write_all(&mut out, b"\n")?;
        }
        std::io::Write::flush(&mut out)?;
        let stats = serde_json::to_value(&chunked.stats)?;
        fs_err::write(
            ctx.out_dir.join(STATS_FILE),
            serde_json::to_vec_pretty(&stats)?,
        )?;

        let s = &chunked.stats;
        if s.chunks == 0 {
            return Err(StageError::Failed(
                "no chunk came out of the corpus: every document was skipped or empty".to_owned(),
            ));
        }
        let mut rows = vec![
            vec!["documents".to_owned(), s.documents_seen.to_string()],
            vec!["chunked".to_owned(), s.documents_chunked.to_string()],
        ];
        for (reason, count) in &s.skipped {
            rows.push(vec![format!("skipped: {reason}"), count.to_string()]);
        }
        if s.lossy_utf8 > 0 {
            rows.push(vec!["repaired UTF-8".to_owned(), s.lossy_utf8.to_string()]);
        }
        rows.push(vec!["chunks".to_owned(), s.chunks.to_string()]);
        rows.push(vec!["tokens".to_owned(), s.tokens.to_string()]);
        rows.push(vec![
            "shortest chunk (tokens)".to_owned(),
            s.min_tokens.to_string(),
        ]);
        rows.push(vec![
            "mean chunk (tokens)".to_owned(),
            format!("{:.0}", s.mean_tokens),
        ]);
        rows.push(vec![
            "longest chunk (tokens)".to_owned(),
            s.max_tokens.to_string(),
        ]);
        ctx.table(&Table {
            title: "corpus".to_owned(),
            columns: vec!["what".to_owned(), "count".to_owned()],
            rows,
        });
        Ok(StageOutcome { summary: stats })
    }
}

fn corpus_error(error: CorpusError) -> StageError {
    StageError::engine(error)
}

/// Forwards corpus events to the stage context: skip warnings (the first few), progress bars.
struct Reporter<'a> {
    ctx: &'a StageContext,
    skips: AtomicUsize,
    bars: Mutex<[Option<super::Progress>; 2]>,
}

impl<'a> Reporter<'a> {
    fn new(ctx: &'a StageContext) -> Self {
        Self {
            ctx,
            skips: AtomicUsize::new(0),
            bars: Mutex::new([None, None]),
        }
    }
}

impl CorpusReporter for Reporter<'_> {
    fn on_skip(&self, skip: &Skip) {
        let n = self.skips.fetch_add(1, Ordering::Relaxed);
        if n < SKIP_WARNINGS {
            self.ctx.warn(format!(
                "skipped `{}`: {} ({})",
                skip.location, skip.reason, skip.detail
            ));
        } else if n == SKIP_WARNINGS {
            self.ctx
                .warn("more files skipped; the summary table counts them all");
        }
    }

    fn on_progress(&self, phase: Phase, done: usize, total: usize) {
        let (slot, label) = match phase {
            Phase::Read => (0, "reading"),
            Phase::Chunk => (1, "chunking"),
        };
        let mut bars = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = bars[slot].get_or_insert_with(|| self.ctx.progress(label, Some(total as u64)));
        bar.set(done as u64);
    }
}
