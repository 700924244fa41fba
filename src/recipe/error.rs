//! Recipe problems as located `miette` diagnostics.
//!
//! Every problem with something the user wrote (the recipe or a `--set` argument) becomes a
//! [`Problem`] pointing at its line and column, with a stable code and, where it helps, a
//! suggestion. A recipe with several problems reports them all at once through `related`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode, SourceSpan};

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

/// One located problem in a recipe.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
    pub source: NamedSource<Arc<String>>,
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
                span,
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
    #[error("{}", invalid_message(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn invalid_message(path: &std::path::Path, problems: &[Problem]) -> String {
    match problems {
        [one] => one.message.clone(),
        many => format!("recipe `{}` has {} problems", path.display(), many.len()),
    }
}

impl RecipeError {
    /// The problems, for tests and `--json` output.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }

    fn single(&self) -> Option<&Problem> {
        match self.problems() {
            [one] => Some(one),
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
            Self::Invalid { problems, .. } if problems.len() > 1 => {
                Some(Box::new(problems.iter().map(|p| p as &dyn Diagnostic)))
            }
            _ => None,
        }
    }
}
