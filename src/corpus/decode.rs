//! Bytes to text: byte-order marks, binary detection, and UTF-8 with bounded repair.
//!
//! The thresholds, and why:
//!
//! | finding                                              | verdict                 |
//! |------------------------------------------------------|-------------------------|
//! | a NUL byte                                           | binary (as git and ripgrep decide) |
//! | control bytes (not tab, newline, CR, form feed) > 5% | binary                  |
//! | invalid UTF-8 sequences > 10% of bytes               | binary (random bytes are ~50%) |
//! | invalid sequences > 1 per 1,000 bytes (and > 1)      | [`SkipReason::InvalidUtf8`] |
//! | fewer                                                | repaired: each becomes U+FFFD, and the caller is told |
//!
//! One per thousand separates damage (a truncated multi-byte character, a stray byte from a bad
//! copy) from a file in another encoding: Latin-1 or Windows-1252 prose has an accented letter or
//! curly quote every few dozen bytes, and replacing each would garble the text that training reads.
//! Guessing the legacy encoding instead was rejected: a wrong guess produces plausible-looking
//! mojibake that nobody notices, while a skip with "convert the file to UTF-8" gets it fixed.

use std::borrow::Cow;

use super::skip::{Rejection, SkipReason};

/// Text decoded from a file's bytes.
#[derive(Debug)]
pub(crate) struct Decoded<'a> {
    pub(crate) text: Cow<'a, str>,
    /// Invalid sequences replaced by U+FFFD.
    pub(crate) invalid_sequences: usize,
}

/// Decodes UTF-8 (with or without BOM) or BOM-marked UTF-16.
pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded<'_>, Rejection> {
    if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        return decode_utf8(rest);
    }
    // Windows editors still save "Unicode" text as UTF-16 with a BOM; without this it would read as
    // binary (every other byte is NUL).
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return decode_utf16(rest, u16::from_le_bytes);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return decode_utf16(rest, u16::from_be_bytes);
    }
    decode_utf8(bytes)
}

fn decode_utf8(bytes: &[u8]) -> Result<Decoded<'_>, Rejection> {
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(Rejection::new(
            SkipReason::Binary,
            format!("NUL byte at offset {offset}"),
        ));
    }
    let control = bytes.iter().filter(|&&b| is_binary_control(b)).count();
    check_control(control, bytes.len())?;
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok(Decoded {
            text: Cow::Borrowed(text),
            invalid_sequences: 0,
        });
    }
    let mut text = String::with_capacity(bytes.len() + 16);
    let mut invalid = 0;
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            invalid += 1;
            text.push(char::REPLACEMENT_CHARACTER);
        }
    }
    check_invalid(invalid, bytes.len())?;
    Ok(Decoded {
        text: Cow::Owned(text),
        invalid_sequences: invalid,
    })
}

fn decode_utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Result<Decoded<'static>, Rejection> {
    let units = bytes.chunks_exact(2).map(|pair| unit([pair[0], pair[1]]));
    let mut invalid = usize::from(bytes.len() % 2 == 1);
    let mut text = String::with_capacity(bytes.len() / 2);
    for decoded in char::decode_utf16(units) {
        text.push(decoded.unwrap_or_else(|_| {
            invalid += 1;
            char::REPLACEMENT_CHARACTER
        }));
    }
    if let Some(offset) = text.find('\0') {
        return Err(Rejection::new(
            SkipReason::Binary,
            format!("NUL character at offset {offset} of the UTF-16 text"),
        ));
    }
    let control = text
        .chars()
        .filter(|&c| u8::try_from(c).is_ok_and(is_binary_control))
        .count();
    check_control(control, bytes.len() / 2)?;
    check_invalid(invalid, bytes.len() / 2)?;
    Ok(Decoded {
        text: Cow::Owned(text),
        invalid_sequences: invalid,
    })
}

/// ASCII control bytes that text files do not contain.
fn is_binary_control(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0C)) || b == 0x7F
}

fn check_control(control: usize, len: usize) -> Result<(), Rejection> {
    if control * 100 > len * 5 {
        return Err(Rejection::new(
            SkipReason::Binary,
            format!("{control} control bytes in {len}"),
        ));
    }
    Ok(())
}

fn check_invalid(invalid: usize, len: usize) -> Result<(), Rejection> {
    if invalid * 100 > len * 10 {
        return Err(Rejection::new(
            SkipReason::Binary,
            format!("mostly non-text: {invalid} invalid UTF-8 sequences in {len} bytes"),
        ));
    }
    if invalid > 1 && invalid * 1000 > len {
        return Err(Rejection::new(
            SkipReason::InvalidUtf8,
            format!(
                "{invalid} invalid UTF-8 sequences in {len} bytes (at most 1 per 1000 is repaired): \
                 convert the file to UTF-8"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_utf8_is_borrowed_and_a_bom_is_dropped() {
        let decoded = decode("héllo\n".as_bytes()).expect("text");
        assert!(matches!(decoded.text, Cow::Borrowed("héllo\n")));
        let decoded = decode(b"\xEF\xBB\xBFhi").expect("text");
        assert_eq!(decoded.text, "hi");
    }

    #[test]
    fn utf16_with_a_bom_is_text() {
        let mut le = vec![0xFF, 0xFE];
        le.extend("Grüße".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode(&le).expect("utf-16le").text, "Grüße");
        let mut be = vec![0xFE, 0xFF];
        be.extend("Grüße".encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(decode(&be).expect("utf-16be").text, "Grüße");
    }

    #[test]
    fn nul_and_control_bytes_are_binary() {
        let rejection = decode(b"abc\0def").expect_err("nul");
        assert_eq!(rejection.reason, SkipReason::Binary);
        assert_eq!(rejection.detail, "NUL byte at offset 3");
        let controls: Vec<u8> = (0..100)
            .map(|i| if i % 10 == 0 { 0x01 } else { b'a' })
            .collect();
        assert_eq!(
            decode(&controls).expect_err("10% control").reason,
            SkipReason::Binary
        );
    }

    #[test]
    fn mild_damage_is_repaired_and_counted() {
        let mut bytes = "word ".repeat(400).into_bytes();
        bytes[7] = 0xC3; // a lead byte without its continuation
        let decoded = decode(&bytes).expect("repaired");
        assert_eq!(decoded.invalid_sequences, 1);
        assert!(decoded.text.contains('\u{FFFD}'));
        assert_eq!(decoded.text.len(), bytes.len() + 2);
    }

    #[test]
    fn latin1_prose_is_invalid_utf8_not_repaired() {
        // French in Latin-1: three accented letters in 38 bytes.
        let latin1: Vec<u8> = b"Le caf\xE9 est tr\xE8s bon, la cr\xE8me aussi. ".repeat(10);
        let rejection = decode(&latin1).expect_err("latin-1");
        assert_eq!(rejection.reason, SkipReason::InvalidUtf8);
        assert!(
            rejection
                .detail
                .starts_with("30 invalid UTF-8 sequences in 380 bytes"),
            "{}",
            rejection.detail
        );
    }

    #[test]
    fn random_high_bytes_are_binary() {
        let noise: Vec<u8> = (0..1000u32).map(|i| 0x80 | (i * 37 % 127) as u8).collect();
        assert_eq!(
            decode(&noise).expect_err("noise").reason,
            SkipReason::Binary
        );
    }
}
