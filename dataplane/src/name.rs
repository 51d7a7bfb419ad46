//! Checkpoint names arrive from outside (CLI, gRPC, CRDs) and become directory and object
//! names, so they are validated once, here, and carried as a distinct type afterwards.

use std::fmt;

/// Longest accepted checkpoint name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A validated checkpoint name: 1–128 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// Such a name is safe to use as a single path component and as an S3 key component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointName(String);

/// Why a string is not a valid [`CheckpointName`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid checkpoint name {name:?}: {reason}")]
pub struct InvalidName {
    /// The rejected input.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl CheckpointName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let reject = |reason| {
            Err(InvalidName {
                name: name.chars().take(MAX_NAME_LEN + 8).collect(),
                reason,
            })
        };
        if name.is_empty() {
            return reject("it is empty");
        }
        if name.len() > MAX_NAME_LEN {
            return reject("it is longer than 128 bytes");
        }
        if name.starts_with('.') || name.starts_with('-') {
            return reject("it must not start with '.' or '-'");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return reject("only letters, digits, '.', '_' and '-' are allowed");
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CheckpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for CheckpointName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["a", "job-1", "train_step.0042", "A9"] {
            assert_eq!(CheckpointName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_names_that_escape_or_hide() {
        for bad in [
            "", "../x", "a/b", ".hidden", "..", "-rf", "a b", "ü", "x\0y",
        ] {
            let err = CheckpointName::new(bad).unwrap_err();
            assert!(err.to_string().contains("invalid checkpoint name"), "{err}");
        }
        assert!(CheckpointName::new(&"x".repeat(129)).is_err());
        assert!(CheckpointName::new(&"x".repeat(128)).is_ok());
    }
}
