//! Paths inside a layer: a sequence of validated [`Name`]s.

use std::fmt;

use crate::{Error, Name, Result};

/// A relative path inside a layer; the empty path is the layer's root.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<Name>);

impl RelPath {
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    /// Parses `a/b/c`. Leading, trailing and repeated `/` and `.` components
    /// are tolerated and dropped; `..` and invalid names are refused.
    pub fn parse(bytes: &[u8]) -> Result<RelPath> {
        let mut out = Vec::new();
        for part in bytes.split(|b| *b == b'/') {
            if part.is_empty() || part == b"." {
                continue;
            }
            out.push(Name::new(part)?);
        }
        Ok(RelPath(out))
    }

    pub fn from_names(names: Vec<Name>) -> RelPath {
        RelPath(names)
    }

    pub fn components(&self) -> &[Name] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn join(&self, name: Name) -> RelPath {
        let mut v = self.0.clone();
        v.push(name);
        RelPath(v)
    }

    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            None
        } else {
            Some(RelPath(self.0[..self.0.len() - 1].to_vec()))
        }
    }

    pub fn file_name(&self) -> Option<&Name> {
        self.0.last()
    }

    /// The path as bytes joined with `/` (empty for the root).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(n.as_bytes());
        }
        out
    }

    /// The path as an OS path relative to a checkout root.
    pub fn to_path_buf(&self) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt;
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&self.to_bytes()))
    }

    /// Builds a path from an OS path made of normal components only.
    pub fn from_path(path: &std::path::Path) -> Result<RelPath> {
        use std::os::unix::ffi::OsStrExt;
        let mut out = Vec::new();
        for c in path.components() {
            match c {
                std::path::Component::Normal(n) => out.push(Name::new(n.as_bytes())?),
                std::path::Component::CurDir => {}
                _ => {
                    return Err(Error::BadName {
                        name: path.display().to_string(),
                        reason: "the path must be relative and must not contain `..`",
                    })
                }
            }
        }
        Ok(RelPath(out))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
