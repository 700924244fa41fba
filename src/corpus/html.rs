//! HTML to blocks through `html2text`, with headings kept as headings.
//!
//! html2text already drops `<head>`, `<script>` and `<style>`; navigation (`<nav>`) is cut from the
//! DOM before rendering. A private decorator marks each heading line with [`HEADING_MARK`] and its
//! level instead of markdown's `#`, so a `#` that starts a line of `<pre>` text is never mistaken
//! for a heading; links, emphasis and images render as their bare text.

use html2text::render::{TaggedLine, TextDecorator};

use super::document::Block;
use super::markup::BlockBuilder;

/// Marks a heading line in the rendered text: a private-use character, then the level digit.
const HEADING_MARK: char = '\u{E000}';

/// Wide enough that html2text never wraps a paragraph or a heading; lines are rejoined anyway.
const RENDER_WIDTH: usize = 100_000;

/// Elements removed before rendering: site chrome, not content.
const DROPPED_ELEMENTS: &[&str] = &["nav"];

pub(crate) fn html_blocks(html: &str) -> Result<Vec<Block>, html2text::Error> {
    let config = html2text::config::with_decorator(StructureDecorator).no_table_borders();
    let dom = config.parse_html(html.as_bytes())?;
    drop_elements(&dom.document);
    let tree = config.dom_to_render_tree(&dom)?;
    let rendered = config.render_to_string(tree, RENDER_WIDTH)?;
    let mut builder = BlockBuilder::default();
    for line in rendered.lines() {
        if let Some(rest) = line.strip_prefix(HEADING_MARK) {
            let mut chars = rest.chars();
            let level = chars
                .next()
                .and_then(|c| c.to_digit(10))
                .and_then(|d| u8::try_from(d).ok())
                .unwrap_or(1);
            builder.heading(level, chars.as_str());
        } else if line.trim().is_empty() {
            builder.flush();
        } else {
            builder.line(line);
        }
    }
    Ok(builder.finish())
}

fn drop_elements(node: &html2text::Handle) {
    node.children
        .borrow_mut()
        .retain(|child| match &child.data {
            html2text::Element { name, .. } => !DROPPED_ELEMENTS.contains(&&*name.local),
            _ => true,
        });
    for child in node.children.borrow().iter() {
        drop_elements(child);
    }
}

/// Renders structure only: heading marks, list bullets, nothing around links or emphasis.
#[derive(Debug, Clone, Copy)]
struct StructureDecorator;

impl TextDecorator for StructureDecorator {
    type Annotation = ();

    fn decorate_link_start(&mut self, _url: &str) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_link_end(&mut self) -> String {
        String::new()
    }

    fn decorate_em_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_em_end(&self) -> String {
        String::new()
    }

    fn decorate_strong_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_strong_end(&self) -> String {
        String::new()
    }

    fn decorate_strikeout_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_strikeout_end(&self) -> String {
        String::new()
    }

    fn decorate_code_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_code_end(&self) -> String {
        String::new()
    }

    fn decorate_preformat_first(&self) {}

    fn decorate_preformat_cont(&self) {}

    fn decorate_image(&mut self, _src: &str, title: &str) -> (String, ()) {
        (title.to_owned(), ())
    }

    fn header_prefix(&self, level: usize) -> String {
        format!("{HEADING_MARK}{}", level.clamp(1, 9))
    }

    fn quote_prefix(&self) -> String {
        String::new()
    }

    fn unordered_item_prefix(&self) -> String {
        "- ".to_owned()
    }

    fn ordered_item_prefix(&self, i: i64) -> String {
        format!("{i}. ")
    }

    fn make_subblock_decorator(&self) -> Self {
        *self
    }

    fn finalise(&mut self, _urls: Vec<String>) -> Vec<TaggedLine<()>> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_paragraphs_and_no_chrome() {
        let html = r#"<!doctype html><html><head><title>T</title><style>p{color:red}</style></head>
            <body><nav><a href="/">Home</a> <a href="/x">Other</a></nav>
            <h1>Guide</h1><p>Read <a href="https://x.org">the <em>docs</em></a>
            first.</p><script>var x = 1;</script>
            <h2>Install</h2><ul><li>one</li><li>two</li></ul><pre># not a heading</pre>
            <h3>Linux &amp; BSD</h3><p>Use make.</p></body></html>"#;
        let blocks = html_blocks(html).expect("renders");
        let h = |level, text: &str| Block::Heading {
            level,
            text: text.to_owned(),
        };
        let p = |text: &str| Block::Paragraph {
            text: text.to_owned(),
        };
        assert_eq!(
            blocks,
            vec![
                h(1, "Guide"),
                p("Read the docs first."),
                h(2, "Install"),
                p("- one - two"),
                p("# not a heading"),
                h(3, "Linux & BSD"),
                p("Use make."),
            ]
        );
    }
}
