//! From a file's bytes to blocks, by format.

use std::path::Path;

use super::decode::decode;
use super::document::Block;
use super::html::html_blocks;
use super::markup::{markdown_blocks, plain_blocks, rst_blocks};
use super::pdf::pdf_text;
use super::skip::{Rejection, SkipReason};

/// How a file is read, from its extension. Anything the include globs let through that is not
/// listed (`.adoc`, `.org`, no extension) is read as plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Markdown,
    ReStructuredText,
    Html,
    Pdf,
    Text,
}

impl Format {
    pub(crate) fn of(path: &Path) -> Self {
        let extension = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match extension.as_str() {
            "md" | "markdown" | "mdown" | "mkd" => Self::Markdown,
            "rst" | "rest" => Self::ReStructuredText,
            "html" | "htm" | "xhtml" => Self::Html,
            "pdf" => Self::Pdf,
            _ => Self::Text,
        }
    }
}

/// A file's content as blocks.
#[derive(Debug)]
pub(crate) struct Extracted {
    pub(crate) blocks: Vec<Block>,
    /// Invalid UTF-8 sequences replaced while decoding (0 for a clean file).
    pub(crate) invalid_sequences: usize,
}

pub(crate) fn extract(bytes: &[u8], format: Format) -> Result<Extracted, Rejection> {
    if format == Format::Pdf {
        let blocks = plain_blocks(&pdf_text(bytes)?);
        if blocks.is_empty() {
            return Err(Rejection::new(
                SkipReason::PdfWithoutText,
                "no text on any page (scanned images need OCR first)",
            ));
        }
        return Ok(Extracted {
            blocks,
            invalid_sequences: 0,
        });
    }
    let decoded = decode(bytes)?;
    let blocks = match format {
        Format::Markdown => markdown_blocks(&decoded.text),
        Format::ReStructuredText => rst_blocks(&decoded.text),
        Format::Html => html_blocks(&decoded.text)
            .map_err(|e| Rejection::new(SkipReason::ExtractionFailed, format!("html2text: {e}")))?,
        Format::Pdf | Format::Text => plain_blocks(&decoded.text),
    };
    Ok(Extracted {
        blocks,
        invalid_sequences: decoded.invalid_sequences,
    })
}
