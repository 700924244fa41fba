//! Recipe problems as located `miette` diagnostics.
//!
//! Every problem with something the user wrote (the recipe or a `--set` argument) becomes a
//! [`Problem`] pointing at its line and column, with a stable code and, where it helps, a
//! suggestion. A recipe with several problems reports them all at once through `related`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use miette::{
    Diagnostic, LabeledSpan, MietteError, MietteSpanContents, NamedSource, SourceCode, SourceSpan,
    SpanContents,
};

/// What kind of mistake a problem is; each has its own diagnostic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The text is not YAML.
    Syntax,
    /// A key no section knows.
    UnknownKey,
    /// A value of the wrong type (a string where a number belongs).
    Type,
    /// A value of the right type that makes no sense (a zero batch size, a missing path).
    Value,
    /// A stage needs an artifact no stage of the recipe produces.
    MissingInput,
    /// Stages that read each other's output.
    Cycle,
    /// A malformed `--set` argument.
    Override,
}

impl ProblemKind {
    fn code(self) -> &'static str {
        match self {
            Self::Syntax => "ragd::recipe::syntax",
            Self::UnknownKey => "ragd::recipe::unknown_key",
            Self::Type => "ragd::recipe::type",
            Self::Value => "ragd::recipe::value",
            Self::MissingInput => "ragd::recipe::missing_input",
            Self::Cycle => "ragd::recipe::cycle",
            Self::Override => "ragd::recipe::override",
        }
    }
}

/// Lines longer than this (in bytes) are shown as a window around the problem.
const LONG_LINE: usize = 1000;
/// How much of a long line is shown either side of the problem, and at most of the problem.
const WINDOW: usize = 60;

/// The recipe text (or a `--set` argument) as diagnostics show it: as it is, except that a long
/// line is cut to a window around the problem. miette renders a label's column through format
/// widths, which panic past 65,535, so a problem on a 66,000-character line killed the process;
/// and a screenful of one line helps no one either.
#[derive(Debug, Clone)]
pub struct RecipeSource {
    source: NamedSource<Arc<String>>,
    text: Arc<String>,
}

impl RecipeSource {
    pub fn new(name: impl AsRef<str>, text: Arc<String>) -> Self {
        Self {
            source: NamedSource::new(name, text.clone()),
            text,
        }
    }

    /// The line (start, end) holding `offset`, without its line break.
    fn line_around(&self, offset: usize) -> (usize, usize) {
        let text = self.text.as_str();
        let offset = offset.min(text.len());
        let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        (start, end)
    }

    /// The span as labelled: within its first line, and on a long line at most [`WINDOW`] bytes
    /// of it.
    fn shown(&self, span: SourceSpan) -> SourceSpan {
        let text = self.text.as_str();
        let (line_start, line_end) = self.line_around(span.offset());
        let start = text.floor_char_boundary(span.offset().min(text.len()));
        let mut end = (start + span.len()).min(line_end.max(start + 1));
        if line_end - line_start > LONG_LINE {
            end = end.min(start + WINDOW);
        }
        let end = text.ceil_char_boundary(end.min(text.len()));
        (
            start,
            (end - start).max(usize::from(!span.is_empty() && start < text.len())),
        )
            .into()
    }
}

impl SourceCode for RecipeSource {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn SpanContents<'a> + 'a>, MietteError> {
        let whole = self
            .source
            .read_span(span, context_lines_before, context_lines_after)?;
        if whole
            .data()
            .split(|&b| b == b'\n')
            .all(|line| line.len() <= LONG_LINE)
        {
            return Ok(whole);
        }
        // A long line around: only the span's own line, from a little before the span to a
        // little after it.
        let text = self.text.as_str();
        let span = self.shown(*span);
        let (line_start, line_end) = self.line_around(span.offset());
        let from = text.floor_char_boundary(span.offset().saturating_sub(WINDOW).max(line_start));
        let to = text.ceil_char_boundary((span.offset() + span.len() + WINDOW).min(line_end));
        let line = text[..line_start].matches('\n').count();
        Ok(Box::new(MietteSpanContents::new_named(
            self.source.name().to_owned(),
            &text.as_bytes()[from..to],
            (from, to - from).into(),
            line,
            span.offset() - line_start,
            1,
        )))
    }
}

/// One located problem in a recipe.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
    pub source: RecipeSource,
    pub span: Option<SourceSpan>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.kind.code()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display + 'a>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.span.map(|_| &self.source as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.span.map(|span| {
            Box::new(std::iter::once(LabeledSpan::new_with_span(
                Some(self.label.clone()),
                self.source.shown(span),
            ))) as Box<dyn Iterator<Item = LabeledSpan>>
        })
    }
}

/// Why a recipe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", invalid_message(path, problems, *omitted))]
    Invalid {
        path: PathBuf,
        /// The problems reported, at most [`MAX_PROBLEMS`].
        problems: Vec<Problem>,
        /// How many more were found and left out.
        omitted: usize,
    },
}

/// How many problems one report shows. A generated recipe with 16,000 misspelt keys is one
/// mistake made many times; showing each took 25 s and a screen per key. The rest are counted.
pub const MAX_PROBLEMS: usize = 20;

fn invalid_message(path: &std::path::Path, problems: &[Problem], omitted: usize) -> String {
    match problems {
        [one] if omitted == 0 => one.message.clone(),
        many if omitted == 0 => format!("recipe `{}` has {} problems", path.display(), many.len()),
        shown => format!(
            "recipe `{}` has {} problems; the first {} are shown, and {omitted} more",
            path.display(),
            shown.len() + omitted,
            shown.len()
        ),
    }
}

impl RecipeError {
    /// The error for `problems`, keeping the first [`MAX_PROBLEMS`].
    pub fn invalid(path: PathBuf, mut problems: Vec<Problem>) -> Self {
        let omitted = problems.len().saturating_sub(MAX_PROBLEMS);
        problems.truncate(MAX_PROBLEMS);
        Self::Invalid {
            path,
            problems,
            omitted,
        }
    }

    /// The problems, for tests and `--json` output.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }

    fn single(&self) -> Option<&Problem> {
        match self {
            Self::Invalid {
                problems, omitted, ..
            } if *omitted == 0 && problems.len() == 1 => problems.first(),
            _ => None,
        }
    }
}

/// A single problem is shown as the diagnostic itself; several become `related` diagnostics.
impl Diagnostic for RecipeError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            Self::Read { .. } => Some(Box::new("ragd::recipe::read")),
            Self::Invalid { .. } => match self.single() {
                Some(one) => one.code(),
                None => Some(Box::new("ragd::recipe::invalid")),
            },
        }
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.single().and_then(Diagnostic::help)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.single().and_then(Diagnostic::source_code)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.single().and_then(Diagnostic::labels)
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            Self::Invalid { problems, .. } if self.single().is_none() => {
                Some(Box::new(problems.iter().map(|p| p as &dyn Diagnostic)))
            }
            _ => None,
        }
    }
}
