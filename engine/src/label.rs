//! Labels name tasks (`//dir:name`); patterns name sets of them (`//dir:all`, `//...`).
//!
//! A [`Label`] is always valid: its constructors refuse anything a user could not have
//! written, so code past the edge never re-checks. Packages are `/`-separated directory
//! paths relative to the workspace root (`""` is the root package).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The name reserved for "every task of a package" (`//dir:all`).
pub const ALL: &str = "all";

/// Why a string is not a label or pattern. Display says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("Label `{0}` must start with `//` (absolute) or `:` (in this package)")]
    NoPrefix(String),
    #[error("Label `{0}` has no target name; write `{0}:NAME` (or `{0}:all` for every task)")]
    NoName(String),
    #[error("`:{0}` is relative to a package, and there is none here; write `//DIR:{0}`")]
    NoCurrentPackage(String),
    #[error("Package `{package}` in `{label}` is not a valid path: segments are made of `A-Z a-z 0-9 . _ -`, separated by single `/`, without `.` or `..`")]
    BadPackage { label: String, package: String },
    #[error(
        "Target name `{name}` in `{label}` is not valid: use `A-Z a-z 0-9 . _ + -`, not only dots"
    )]
    BadName { label: String, name: String },
    #[error("`{0}` is a pattern, not a single target; name one task here")]
    IsPattern(String),
    #[error("`all` is reserved for the pattern `//DIR:all`; pick another task name")]
    ReservedName,
    #[error("Target name in `{label}` is {len} bytes; names may be at most {NAME_MAX} bytes")]
    NameTooLong { label: String, len: usize },
}

/// The longest target name: a name becomes part of file names (work
/// directories, logs), and those are at most 255 bytes.
pub const NAME_MAX: usize = 200;

/// A validated task label: a package path and a name within it.
///
/// Ordered by package, then name, so maps keyed by labels list a package's tasks together.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    package: String,
    name: String,
}

impl Label {
    /// Builds a label from its parts; refuses invalid packages, names and the reserved `all`.
    pub fn new(package: impl Into<String>, name: impl Into<String>) -> Result<Label, LabelError> {
        let package = package.into();
        let name = name.into();
        let shown = format!("//{package}:{name}");
        if !valid_package(&package) {
            return Err(LabelError::BadPackage {
                label: shown,
                package,
            });
        }
        check_name(&name, &shown)?;
        Ok(Label { package, name })
    }

    /// Parses `//pkg:name`, or `:name` relative to `current` (the package being evaluated).
    /// Patterns (`:all`, `//...`) are refused with [`LabelError::IsPattern`].
    pub fn parse(text: &str, current: Option<&str>) -> Result<Label, LabelError> {
        match Pattern::parse(text, current)? {
            Pattern::Target(label) => Ok(label),
            Pattern::Package(_) | Pattern::Recursive(_) => {
                Err(LabelError::IsPattern(text.to_owned()))
            }
        }
    }

    /// The package: a `/`-separated directory path from the workspace root, `""` for the root.
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The task's name within its package.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "//{}:{}", self.package, self.name)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Label({self})")
    }
}

impl FromStr for Label {
    type Err = LabelError;
    /// Parses an absolute label (`//pkg:name`).
    fn from_str(s: &str) -> Result<Label, LabelError> {
        Label::parse(s, None)
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Label, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Label::parse(&text, None).map_err(serde::de::Error::custom)
    }
}

/// A set of tasks named on a command line or in an API request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    /// One task: `//dir:name`.
    Target(Label),
    /// Every task of one package: `//dir:all`.
    Package(String),
    /// Every task of a package and all packages below it: `//dir/...`; `//...` is `""`.
    Recursive(String),
}

impl Pattern {
    /// Parses a label or pattern; `:name` and `:all` are relative to `current`.
    pub fn parse(text: &str, current: Option<&str>) -> Result<Pattern, LabelError> {
        let (package, name) = if let Some(rest) = text.strip_prefix("//") {
            if rest == "..." {
                return Ok(Pattern::Recursive(String::new()));
            }
            match rest.split_once(':') {
                Some((package, name)) => (package, name),
                None => {
                    if let Some(dir) = rest.strip_suffix("/...") {
                        if !valid_package(dir) || dir.is_empty() {
                            return Err(LabelError::BadPackage {
                                label: text.to_owned(),
                                package: dir.to_owned(),
                            });
                        }
                        return Ok(Pattern::Recursive(dir.to_owned()));
                    }
                    return Err(LabelError::NoName(text.to_owned()));
                }
            }
        } else if let Some(name) = text.strip_prefix(':') {
            match current {
                Some(package) => (package, name),
                None => return Err(LabelError::NoCurrentPackage(name.to_owned())),
            }
        } else {
            return Err(LabelError::NoPrefix(text.to_owned()));
        };
        let shown = format!("//{package}:{name}");
        if !valid_package(package) {
            return Err(LabelError::BadPackage {
                label: shown,
                package: package.to_owned(),
            });
        }
        if name == ALL {
            return Ok(Pattern::Package(package.to_owned()));
        }
        check_name(name, &shown)?;
        Ok(Pattern::Target(Label {
            package: package.to_owned(),
            name: name.to_owned(),
        }))
    }

    /// Whether `label` belongs to the set this pattern names.
    pub fn matches(&self, label: &Label) -> bool {
        match self {
            Pattern::Target(target) => target == label,
            Pattern::Package(package) => label.package == *package,
            Pattern::Recursive(prefix) => package_within(&label.package, prefix),
        }
    }
}

/// Whether `package` is `prefix` or lies below it (`""` contains every package).
pub fn package_within(package: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || package == prefix
        || (package.starts_with(prefix) && package.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Target(label) => label.fmt(f),
            Pattern::Package(package) => write!(f, "//{package}:{ALL}"),
            Pattern::Recursive(prefix) if prefix.is_empty() => f.write_str("//..."),
            Pattern::Recursive(prefix) => write!(f, "//{prefix}/..."),
        }
    }
}

impl From<Label> for Pattern {
    fn from(label: Label) -> Pattern {
        Pattern::Target(label)
    }
}

impl FromStr for Pattern {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Pattern, LabelError> {
        Pattern::parse(s, None)
    }
}

/// Whether `package` is a valid package path (`""` is the root).
pub fn valid_package(package: &str) -> bool {
    package.is_empty() || package.split('/').all(valid_segment)
}

/// One path segment: `A-Z a-z 0-9 . _ -`, and not only dots.
pub(crate) fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.bytes().all(|b| b == b'.')
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A target name: `A-Z a-z 0-9 . _ + -`, not only dots. Also used for mount names.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.bytes().all(|b| b == b'.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

fn check_name(name: &str, shown: &str) -> Result<(), LabelError> {
    if name == ALL {
        return Err(LabelError::ReservedName);
    }
    if name.len() > NAME_MAX {
        let shown: String = shown.chars().take(60).collect();
        return Err(LabelError::NameTooLong {
            label: format!("{shown}…"),
            len: name.len(),
        });
    }
    if !valid_name(name) {
        return Err(LabelError::BadName {
            label: shown.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_and_relative() {
        let l = Label::parse("//a/b:c", None).unwrap();
        assert_eq!((l.package(), l.name()), ("a/b", "c"));
        let l = Label::parse(":c", Some("x")).unwrap();
        assert_eq!(l.to_string(), "//x:c");
        assert_eq!(Label::parse("//:root", None).unwrap().package(), "");
    }

    #[test]
    fn refuses_bad_labels() {
        for bad in [
            "a:b",
            "//a",
            "//a/../b:c",
            "//a//b:c",
            "//a/:c",
            "//a:",
            "//a:b/c",
            "//a:..",
            "//a:all",
            "//a:b c",
            ":x",
            "//./a:b",
        ] {
            assert!(Label::parse(bad, None).is_err(), "{bad} parsed");
        }
    }
}
