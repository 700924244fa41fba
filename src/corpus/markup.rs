//! Line-based structure for the text formats: markdown, reStructuredText and plain text.
//!
//! Only what chunking needs is recognised: headings (with their level), paragraph breaks, and the
//! regions where a `#` or an underline is not a heading (fenced code, YAML front matter). Inline
//! markup (`**bold**`, links, roles) stays in the text as written. A full CommonMark or docutils
//! parser was rejected: it would render inline markup differently per format for no gain in
//! retrieval, and the headings are what carries the structure.

use super::document::Block;

/// Collects lines into paragraphs and headings.
#[derive(Debug, Default)]
pub(crate) struct BlockBuilder {
    blocks: Vec<Block>,
    /// Lines of the paragraph being read.
    pending: Vec<String>,
}

impl BlockBuilder {
    pub(crate) fn line(&mut self, line: &str) {
        self.pending.push(line.to_owned());
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the current paragraph.
    pub(crate) fn flush(&mut self) {
        let text = normalize_whitespace(&self.pending.join(" "));
        self.pending.clear();
        if !text.is_empty() {
            self.blocks.push(Block::Paragraph { text });
        }
    }

    pub(crate) fn heading(&mut self, level: u8, text: &str) {
        self.flush();
        let text = normalize_whitespace(text);
        if !text.is_empty() {
            self.blocks.push(Block::Heading { level, text });
        }
    }

    /// Turns the pending paragraph into a heading (a setext or reStructuredText underline).
    fn pending_as_heading(&mut self, level: u8) {
        let text = self.pending.join(" ");
        self.pending.clear();
        self.heading(level, &text);
    }

    pub(crate) fn finish(mut self) -> Vec<Block> {
        self.flush();
        self.blocks
    }
}

/// Collapses every run of whitespace to one space, trims, and drops control characters.
pub(crate) fn normalize_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().filter(|c| !c.is_control()));
    }
    out
}

/// Paragraphs separated by blank lines; no headings.
pub(crate) fn plain_blocks(text: &str) -> Vec<Block> {
    let mut builder = BlockBuilder::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            builder.flush();
        } else {
            builder.line(line);
        }
    }
    builder.finish()
}

/// Markdown: ATX (`## Title`) and setext (`Title` over `===`/`---`) headings, fenced code kept as
/// its own paragraph (its `#` lines are comments, not headings), YAML front matter dropped.
pub(crate) fn markdown_blocks(text: &str) -> Vec<Block> {
    let mut builder = BlockBuilder::default();
    let mut fence: Option<(char, usize)> = None;
    for line in strip_front_matter(text).lines() {
        if let Some((marker, len)) = fence {
            if fence_marker(line)
                .is_some_and(|(m, n, info)| m == marker && n >= len && info.is_empty())
            {
                fence = None;
                builder.flush();
            } else {
                builder.line(line);
            }
            continue;
        }
        if let Some((marker, len, _info)) = fence_marker(line) {
            builder.flush();
            fence = Some((marker, len));
        } else if let Some((level, heading)) = atx_heading(line) {
            builder.heading(level, heading);
        } else if builder.has_pending()
            && let Some(level) = setext_level(line)
        {
            builder.pending_as_heading(level);
        } else if line.trim().is_empty() || is_thematic_break(line) {
            builder.flush();
        } else {
            builder.line(line);
        }
    }
    builder.finish()
}

/// Drops a leading `---` … `---` (or `...`) YAML block, as static site generators write.
fn strip_front_matter(text: &str) -> &str {
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return text;
    };
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        offset += line.len();
        let bare = line.trim_end();
        if bare == "---" || bare == "..." {
            return &rest[offset..];
        }
    }
    text
}

/// Up to three spaces of indentation, as CommonMark allows before block markers.
fn strip_indent(line: &str) -> Option<&str> {
    let trimmed = line.trim_start_matches(' ');
    (line.len() - trimmed.len() <= 3).then_some(trimmed)
}

/// A code fence: three or more backticks or tildes, then an info string.
fn fence_marker(line: &str) -> Option<(char, usize, &str)> {
    let rest = strip_indent(line)?;
    let marker = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let len = rest.chars().take_while(|c| *c == marker).count();
    let info = rest[len..].trim();
    (len >= 3 && !(marker == '`' && info.contains('`'))).then_some((marker, len, info))
}

/// `# Title`, `## Title ##`: the level and the text without the closing hashes.
fn atx_heading(line: &str) -> Option<(u8, &str)> {
    let rest = strip_indent(line)?;
    let level = rest.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !(after.is_empty() || after.starts_with([' ', '\t'])) {
        return None;
    }
    let text = after.trim();
    let without_closing = text.trim_end_matches('#');
    let text = if without_closing.is_empty() || without_closing.ends_with([' ', '\t']) {
        without_closing.trim_end()
    } else {
        text
    };
    let level = u8::try_from(level).expect("a level of 1 to 6 fits in u8");
    Some((level, text))
}

/// A setext underline: `===` makes level 1, `---` level 2.
fn setext_level(line: &str) -> Option<u8> {
    let rest = strip_indent(line)?.trim_end();
    let first = rest.chars().next()?;
    let level = match first {
        '=' => 1,
        '-' => 2,
        _ => return None,
    };
    rest.chars().all(|c| c == first).then_some(level)
}

/// `***`, `---`, `___` (spaces allowed between) on a line of their own.
fn is_thematic_break(line: &str) -> bool {
    let Some(rest) = strip_indent(line) else {
        return false;
    };
    let marks: Vec<char> = rest.chars().filter(|c| !c.is_whitespace()).collect();
    marks.len() >= 3 && matches!(marks[0], '*' | '-' | '_') && marks.iter().all(|c| *c == marks[0])
}

/// reStructuredText: section titles are recognised by their adornment, an underline (and optional
/// overline of the same character) at least as long as the title. Levels follow the order in
/// which adornment styles first appear, as docutils assigns them. Explicit markup lines (`.. `:
/// comments, link targets, directive markers) are dropped; directive bodies stay as text.
pub(crate) fn rst_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut styles: Vec<(char, bool)> = Vec::new();
    let mut level_of = |style: (char, bool)| -> u8 {
        let index = styles.iter().position(|s| *s == style).unwrap_or_else(|| {
            styles.push(style);
            styles.len() - 1
        });
        u8::try_from(index + 1).unwrap_or(u8::MAX)
    };
    let mut builder = BlockBuilder::default();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(marker) = adornment(line)
            && !builder.has_pending()
        {
            let title = lines.get(i + 1).map(|t| t.trim()).unwrap_or_default();
            let under = lines.get(i + 2).copied().and_then(adornment);
            if !title.is_empty()
                && under == Some(marker)
                && line.trim_end().chars().count() >= title.chars().count()
            {
                builder.heading(level_of((marker, true)), title);
                i += 3;
                continue;
            }
            // A transition between blank lines: not text.
            i += 1;
            continue;
        }
        if line.trim().is_empty() {
            builder.flush();
        } else if !builder.has_pending()
            && !line.starts_with(char::is_whitespace)
            && let Some(marker) = lines.get(i + 1).copied().and_then(adornment)
            && underline_fits(lines[i + 1], line)
        {
            builder.heading(level_of((marker, false)), line);
            i += 2;
            continue;
        } else if line.starts_with("..") && (line.len() == 2 || line[2..].starts_with(' ')) {
            builder.flush();
        } else {
            builder.line(line);
        }
        i += 1;
    }
    builder.finish()
}

/// A line of one repeated punctuation character, at least two long.
fn adornment(line: &str) -> Option<char> {
    let bare = line.trim_end();
    let first = bare.chars().next()?;
    (first.is_ascii_punctuation() && bare.len() >= 2 && bare.chars().all(|c| c == first))
        .then_some(first)
}

/// Docutils wants the underline as long as the title; it still builds the section, with a
/// warning, when a shorter underline has at least four characters.
fn underline_fits(underline: &str, title: &str) -> bool {
    let under = underline.trim_end().chars().count();
    under >= title.trim().chars().count() || under >= 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heading(level: u8, text: &str) -> Block {
        Block::Heading {
            level,
            text: text.to_owned(),
        }
    }

    fn paragraph(text: &str) -> Block {
        Block::Paragraph {
            text: text.to_owned(),
        }
    }

    #[test]
    fn whitespace_collapses_and_controls_go() {
        assert_eq!(
            normalize_whitespace("  a\t\tb \n\u{0007}c\u{00A0}d  "),
            "a b c d"
        );
    }

    #[test]
    fn markdown_headings_paragraphs_and_fences() {
        let text = "---\ntitle: x\n---\nIntro   line\nwraps.\n\n# Guide #\n\nSetext\n======\n\n\
                    ## Install\n```sh\n# not a heading\nmake\n```\n***\nAfter\n   ### Deep\n    # code\n#nospace\n";
        assert_eq!(
            markdown_blocks(text),
            vec![
                paragraph("Intro line wraps."),
                heading(1, "Guide"),
                heading(1, "Setext"),
                heading(2, "Install"),
                paragraph("# not a heading make"),
                paragraph("After"),
                heading(3, "Deep"),
                paragraph("# code #nospace"),
            ]
        );
    }

    #[test]
    fn markdown_setext_dash_needs_a_paragraph_above() {
        assert_eq!(
            markdown_blocks("Title\n---\n\n---\nText\n"),
            vec![heading(2, "Title"), paragraph("Text")]
        );
    }

    #[test]
    fn unclosed_front_matter_is_text() {
        assert_eq!(
            markdown_blocks("---\nnot front matter\n"),
            vec![paragraph("not front matter")]
        );
    }

    #[test]
    fn rst_titles_by_adornment_in_order_of_appearance() {
        let text = "=====\nGuide\n=====\n\nIntro text\nsecond line.\n\nInstall\n-------\n\n\
                    .. note:: dropped marker\n   body kept\n\nLinux\n~~~~~\n\nOn Linux.\n\n----------\n\n\
                    Windows\n-------\n\nshort\n==\n";
        assert_eq!(
            rst_blocks(text),
            vec![
                heading(1, "Guide"),
                paragraph("Intro text second line."),
                heading(2, "Install"),
                paragraph("body kept"),
                heading(3, "Linux"),
                paragraph("On Linux."),
                heading(2, "Windows"),
                paragraph("short =="),
            ]
        );
    }

    #[test]
    fn plain_text_is_paragraphs() {
        assert_eq!(
            plain_blocks("a\nb\n\n\n# c\n"),
            vec![paragraph("a b"), paragraph("# c")]
        );
    }
}
