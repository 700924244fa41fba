//! PDF text through `pdf-extract`, with its failure modes turned into skip reasons.
//!
//! pdf-extract panics on many constructs it does not support (unusual fonts, encodings, colour
//! spaces), so extraction runs under `catch_unwind`, and a panic is a skipped file like any other
//! failure. Running it in a child process would also survive aborts and stack overflows, but needs
//! a helper executable and costs a process per file; the panics are the failure that occurs in
//! practice.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use pdf_extract::encryption::DecryptionError;

use super::skip::{Rejection, SkipReason};

/// The text of every page, in order.
pub(crate) fn pdf_text(bytes: &[u8]) -> Result<String, Rejection> {
    let failed = |detail: String| Rejection::new(SkipReason::ExtractionFailed, detail);
    catch_quietly(|| {
        let mut doc = pdf_extract::Document::load_mem(bytes)
            .map_err(|e| failed(format!("not a readable PDF: {e}")))?;
        if doc.is_encrypted() {
            // Many PDFs are encrypted only to restrict printing or copying, with an empty user
            // password; those open. The others need a password we do not have.
            doc.decrypt("").map_err(|e| match e {
                pdf_extract::Error::Decryption(DecryptionError::IncorrectPassword) => {
                    Rejection::new(
                        SkipReason::EncryptedPdf,
                        "a password is required to open it",
                    )
                }
                other => Rejection::new(SkipReason::EncryptedPdf, other.to_string()),
            })?;
        }
        let mut text = String::new();
        pdf_extract::output_doc(&doc, &mut pdf_extract::PlainTextOutput::new(&mut text))
            .map_err(|e| failed(e.to_string()))?;
        Ok(text)
    })
    .unwrap_or_else(|message| Err(failed(format!("pdf-extract panicked: {message}"))))
}

thread_local! {
    /// Set while this thread runs code whose panics are caught and reported as skips.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

/// Runs `f`, turning a panic into its message. The process's panic hook would print that panic
/// to stderr, which a library must not do and which would tear through the caller's progress bar;
/// so a hook is installed once that stays silent on threads inside this function and defers to
/// the previous hook everywhere else.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.get() {
                previous(info);
            }
        }));
    });
    let was_quiet = QUIET_PANICS.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.set(was_quiet);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        let caught: Result<(), String> = catch_quietly(|| panic!("missing width for {}", 7));
        assert_eq!(caught, Err("missing width for 7".to_owned()));
        assert_eq!(catch_quietly(|| 5), Ok(5));
    }

    #[test]
    fn garbage_is_an_extraction_failure() {
        let rejection = pdf_text(b"%PDF-1.4\nthis is not a pdf").expect_err("garbage");
        assert_eq!(rejection.reason, SkipReason::ExtractionFailed);
    }
}
