//! Volume names.

use crate::limits::VOLUME_NAME_LENGTH_MAX;
use std::fmt;

/// A validated volume name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// `@` is excluded because `VOL@SNAP` names a snapshot. Names are never used as file paths
/// (the store keys volumes by id), so the rules exist for operators and URLs, not for safety.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct VolumeName(String);

/// Why a volume name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    #[error("volume name is empty")]
    Empty,
    /// The name is longer than the limit.
    #[error("volume name is {length} characters long; the limit is {VOLUME_NAME_LENGTH_MAX}")]
    TooLong {
        /// The length given.
        length: usize,
    },
    /// The name starts with `.` or `-`.
    #[error("volume name may not start with '{first}'")]
    BadStart {
        /// The offending first character.
        first: char,
    },
    /// The name has a character outside `[A-Za-z0-9._-]`.
    #[error("volume name has {found:?}; allowed are A-Z a-z 0-9 . _ - ('@' is for VOL@SNAP)")]
    BadCharacter {
        /// The offending character.
        found: char,
    },
}

impl VolumeName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<VolumeName, NameError> {
        let length = name.chars().count();
        if length == 0 {
            return Err(NameError::Empty);
        }
        if length > VOLUME_NAME_LENGTH_MAX {
            return Err(NameError::TooLong { length });
        }
        if let Some(found) =
            name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadCharacter { found });
        }
        let first = name.chars().next().expect("name is not empty");
        if first == '.' || first == '-' {
            return Err(NameError::BadStart { first });
        }
        Ok(VolumeName(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for VolumeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VolumeName::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for ok in ["a", "vm-01.disk_0", "A9", &"x".repeat(64)] {
            assert_eq!(VolumeName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_invalid_names() {
        assert_eq!(VolumeName::new(""), Err(NameError::Empty));
        assert_eq!(VolumeName::new(&"x".repeat(65)), Err(NameError::TooLong { length: 65 }));
        assert_eq!(VolumeName::new(".hidden"), Err(NameError::BadStart { first: '.' }));
        assert_eq!(VolumeName::new("-opt"), Err(NameError::BadStart { first: '-' }));
        for (bad, c) in [("a@b", '@'), ("a/b", '/'), ("a b", ' '), ("é", 'é'), ("..\0", '\0')] {
            assert_eq!(VolumeName::new(bad), Err(NameError::BadCharacter { found: c }));
        }
    }
}
