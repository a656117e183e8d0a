//! Trees: one directory's entries, with their canonical, versioned encoding.
//!
//! The encoding is specified in `docs/FORMAT.md`; the golden digests in
//! `fixtures/golden.json` freeze it. Changing anything here that changes an
//! encoding is a format change.

use std::fmt;

use crate::{Digest, Error};

/// First bytes of every encoded tree: names the format and its version.
pub const TREE_MAGIC: &[u8] = b"strata-tree\x00\x01";

/// Longest entry name accepted, in bytes (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Longest symlink target accepted, in bytes (Linux `PATH_MAX` less the NUL).
pub const TARGET_MAX: usize = 4095;

const KIND_FILE: u8 = 1;
const KIND_SYMLINK: u8 = 2;
const KIND_DIR: u8 = 3;

/// The name of one entry of a tree: raw bytes, never empty, `.` or `..`, and
/// never containing `/` or NUL. Non-UTF-8 names are allowed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Box<[u8]>);

impl Name {
    /// Checks `bytes` against the rules of the format.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Name, Error> {
        let bytes: Vec<u8> = bytes.into();
        let reason = if bytes.is_empty() {
            Some("a name is empty")
        } else if bytes == b"." || bytes == b".." {
            Some("`.` and `..` are not names")
        } else if bytes.contains(&b'/') {
            Some("a name contains `/`")
        } else if bytes.contains(&0) {
            Some("a name contains a NUL byte")
        } else if bytes.len() > NAME_MAX {
            Some("a name is longer than 255 bytes")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::BadName {
                name: String::from_utf8_lossy(&bytes).into_owned(),
                reason,
            }),
            None => Ok(Name(bytes.into_boxed_slice())),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A symlink target: raw bytes, never empty, never containing NUL.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target(Box<[u8]>);

impl Target {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Target, Error> {
        let bytes: Vec<u8> = bytes.into();
        let reason = if bytes.is_empty() {
            Some("a symlink target is empty")
        } else if bytes.contains(&0) {
            Some("a symlink target contains a NUL byte")
        } else if bytes.len() > TARGET_MAX {
            Some("a symlink target is longer than 4095 bytes")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::BadName {
                name: String::from_utf8_lossy(&bytes).into_owned(),
                reason,
            }),
            None => Ok(Target(bytes.into_boxed_slice())),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// A regular file: its blob, its size in bytes and whether it is executable.
    File {
        digest: Digest,
        size: u64,
        executable: bool,
    },
    /// A symbolic link, stored as its target and never followed.
    Symlink { target: Target },
    /// A directory: the digest of its tree.
    Dir { digest: Digest },
}

/// The kind of an entry, for listings and diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Symlink,
    Dir,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        match self {
            Entry::File { .. } => Kind::File,
            Entry::Symlink { .. } => Kind::Symlink,
            Entry::Dir { .. } => Kind::Dir,
        }
    }

    /// The tree digest when this entry is a directory.
    pub fn dir_digest(&self) -> Option<Digest> {
        match self {
            Entry::Dir { digest } => Some(*digest),
            _ => None,
        }
    }
}

/// One directory: entries sorted bytewise by name, no two with the same name.
/// A `Tree` is always valid; its digest is over its one canonical encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    entries: Vec<(Name, Entry)>,
}

impl Tree {
    /// The empty directory.
    pub fn empty() -> Tree {
        Tree::default()
    }

    /// Builds a tree from entries in any order; refuses a name given twice.
    pub fn from_entries(mut entries: Vec<(Name, Entry)>) -> Result<Tree, Error> {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::BadName {
                name: w[0].0.to_string(),
                reason: "the name appears twice in one directory",
            });
        }
        Ok(Tree { entries })
    }

    pub fn entries(&self) -> &[(Name, Entry)] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<(Name, Entry)> {
        self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry named `name`, found by binary search.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// The canonical encoding (see `docs/FORMAT.md`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TREE_MAGIC.len() + 4 + self.entries.len() * 56);
        out.extend_from_slice(TREE_MAGIC);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (name, entry) in &self.entries {
            let kind = match entry {
                Entry::File { .. } => KIND_FILE,
                Entry::Symlink { .. } => KIND_SYMLINK,
                Entry::Dir { .. } => KIND_DIR,
            };
            out.push(kind);
            out.extend_from_slice(&(name.0.len() as u32).to_le_bytes());
            out.extend_from_slice(&name.0);
            match entry {
                Entry::File {
                    digest,
                    size,
                    executable,
                } => {
                    out.push(u8::from(*executable));
                    out.extend_from_slice(&size.to_le_bytes());
                    out.extend_from_slice(digest.as_bytes());
                }
                Entry::Symlink { target } => {
                    out.extend_from_slice(&(target.0.len() as u32).to_le_bytes());
                    out.extend_from_slice(&target.0);
                }
                Entry::Dir { digest } => out.extend_from_slice(digest.as_bytes()),
            }
        }
        out
    }

    /// The digest of the canonical encoding.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// Decodes a canonical encoding, refusing anything that is not exactly one:
    /// wrong magic, bad names, unsorted or repeated names, trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Tree, Error> {
        let mut r = Reader { bytes, pos: 0 };
        let bad = |what: &'static str| Error::CorruptTree { reason: what };
        if r.take(TREE_MAGIC.len()).ok_or(bad("truncated header"))? != TREE_MAGIC {
            return Err(bad("unknown magic or version"));
        }
        let count = r.u32().ok_or(bad("truncated entry count"))? as usize;
        let mut entries: Vec<(Name, Entry)> = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            let kind = r.u8().ok_or(bad("truncated entry"))?;
            let name_len = r.u32().ok_or(bad("truncated entry"))? as usize;
            let name = r.take(name_len).ok_or(bad("truncated name"))?;
            let name = Name::new(name).map_err(|_| bad("invalid entry name"))?;
            let entry = match kind {
                KIND_FILE => {
                    let executable = match r.u8().ok_or(bad("truncated file entry"))? {
                        0 => false,
                        1 => true,
                        _ => return Err(bad("executable flag is neither 0 nor 1")),
                    };
                    let size = r.u64().ok_or(bad("truncated file entry"))?;
                    let digest = r.digest().ok_or(bad("truncated file entry"))?;
                    Entry::File {
                        digest,
                        size,
                        executable,
                    }
                }
                KIND_SYMLINK => {
                    let len = r.u32().ok_or(bad("truncated symlink entry"))? as usize;
                    let target = r.take(len).ok_or(bad("truncated symlink entry"))?;
                    let target = Target::new(target).map_err(|_| bad("invalid symlink target"))?;
                    Entry::Symlink { target }
                }
                KIND_DIR => Entry::Dir {
                    digest: r.digest().ok_or(bad("truncated directory entry"))?,
                },
                _ => return Err(bad("unknown entry kind")),
            };
            if let Some((prev, _)) = entries.last() {
                if prev >= &name {
                    return Err(bad("entries are not strictly sorted by name"));
                }
            }
            entries.push((name, entry));
        }
        if r.pos != bytes.len() {
            return Err(bad("trailing bytes after the last entry"));
        }
        Ok(Tree { entries })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn digest(&mut self) -> Option<Digest> {
        self.take(32).and_then(Digest::from_slice)
    }
}

/// One entry of a listing, as `ci store ls --json` and the HTTP API show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listed {
    /// The path below the listed directory.
    pub name: String,
    pub kind: Kind,
    pub size: Option<u64>,
    pub executable: Option<bool>,
    pub digest: Option<crate::Digest>,
    /// A symlink's target.
    pub target: Option<String>,
}

impl Listed {
    pub fn new(name: String, entry: &Entry) -> Listed {
        let (size, executable, digest, target) = match entry {
            Entry::File {
                digest,
                size,
                executable,
            } => (Some(*size), Some(*executable), Some(*digest), None),
            Entry::Dir { digest } => (None, None, Some(*digest), None),
            Entry::Symlink { target } => (None, None, None, Some(target.to_string())),
        };
        Listed {
            name,
            kind: entry.kind(),
            size,
            executable,
            digest,
            target,
        }
    }

    /// The mode column of `ls -l` as a checkout shows the entry.
    pub fn mode(&self) -> &'static str {
        match (self.kind, self.executable) {
            (Kind::Dir, _) => "drwxr-xr-x",
            (Kind::Symlink, _) => "lrwxrwxrwx",
            (Kind::File, Some(true)) => "-rwxr-xr-x",
            (Kind::File, _) => "-rw-r--r--",
        }
    }
}
