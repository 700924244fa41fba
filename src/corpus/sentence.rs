//! Sentence boundaries for splitting an over-long paragraph.
//!
//! Unicode's sentence segmentation (UAX #29, from `unicode-segmentation`) handles the scripts and
//! punctuation a hand-written regex misses (CJK full stops, closing quotes and brackets after the
//! stop, decimal points), but knows no abbreviations: it ends a sentence after "Dr." in
//! "Dr. Smith". Boundaries after the common abbreviations of the prose ragd-pipe reads (legal,
//! medical, technical) and after initials ("Fred L. Drake") are therefore removed again.

use unicode_segmentation::UnicodeSegmentation;

/// Abbreviations, lowercased, after which a capitalised word does not start a sentence. "etc."
/// and "no." are left out: they end sentences about as often as not.
const ABBREVIATIONS: &[&str] = &[
    "mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "v.", "e.g.", "i.e.", "cf.",
    "al.", "fig.", "figs.", "vol.", "inc.", "ltd.", "co.", "corp.", "approx.", "ca.", "p.", "pp.",
    "sec.", "art.", "para.", "ch.", "eq.", "ref.", "dept.", "gen.", "gov.", "rev.",
];

/// Byte offsets at which the sentences of `text` end; the last is `text.len()`.
pub(crate) fn sentence_ends(text: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    for (start, sentence) in text.split_sentence_bound_indices() {
        let end = start + sentence.len();
        let last_word = sentence.split_whitespace().next_back().unwrap_or_default();
        if end < text.len() && is_abbreviation(last_word) {
            continue;
        }
        ends.push(end);
    }
    if ends.last() != Some(&text.len()) {
        ends.push(text.len());
    }
    ends
}

fn is_abbreviation(word: &str) -> bool {
    let word = word.trim_start_matches(['(', '[', '"', '\'']);
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    // Initials and dotted acronyms: "L.", "U.S.", "U.S.C."
    let mut letters = 0;
    let mut chars = word.chars();
    loop {
        match (chars.next(), chars.next()) {
            (Some(letter), Some('.')) if letter.is_alphabetic() => letters += 1,
            (None, _) => return letters > 0,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentences(text: &str) -> Vec<&str> {
        let mut start = 0;
        sentence_ends(text)
            .into_iter()
            .map(|end| {
                let sentence = text[start..end].trim();
                start = end;
                sentence
            })
            .collect()
    }

    #[test]
    fn splits_on_stops_but_not_abbreviations_or_initials() {
        assert_eq!(
            sentences(
                "Fred L. Drake, Jr. wrote it. Dr. Smith agreed (see Fig. 2). Is it 3.5? \
                 Yes! The U.S. Army e.g. said so. 終わり。次の文。"
            ),
            vec![
                "Fred L. Drake, Jr. wrote it.",
                "Dr. Smith agreed (see Fig. 2).",
                "Is it 3.5?",
                "Yes!",
                "The U.S. Army e.g. said so.",
                "終わり。",
                "次の文。",
            ]
        );
    }

    #[test]
    fn text_without_a_stop_is_one_sentence() {
        assert_eq!(sentence_ends("no stop here"), vec![12]);
        assert_eq!(sentence_ends(""), vec![0]);
    }
}
