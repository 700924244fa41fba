//! Model names: the folder names of the registry, so they must never reach outside it.

use super::error::RegistryError;

/// The longest name accepted, so a name fits in any file system's name limit with room for the
/// registry's temporary prefixes.
pub const MAX_NAME_LEN: usize = 64;

/// Checks `name` against `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`: no separator, no leading dot (so
/// never `.`, `..`, or one of the registry's own hidden entries), portable across file systems.
pub fn validate_name(name: &str) -> Result<&str, RegistryError> {
    let invalid = |why| RegistryError::InvalidName {
        name: name.to_owned(),
        why,
    };
    let first = name.chars().next().ok_or_else(|| invalid("it is empty"))?;
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("it must start with a letter or digit"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "only ASCII letters, digits, `.`, `_` and `-` are allowed",
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["legal-v2", "MiniLM_ft.2024-06-01", "a", &"x".repeat(64)] {
            assert_eq!(validate_name(name).expect("valid"), name);
        }
    }

    #[test]
    fn rejects_traversal_and_odd_names() {
        for name in [
            "",
            ".",
            "..",
            ".hidden",
            "../escape",
            "a/b",
            "a\\b",
            "-flag",
            "_x",
            "sp ace",
            "naïve",
            "a\0b",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_name(name), Err(RegistryError::InvalidName { .. })),
                "{name:?} accepted"
            );
        }
    }
}
