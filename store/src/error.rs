use std::path::PathBuf;

use crate::Digest;

/// Everything that can go wrong in the store. Messages start with a capital,
/// quote names in backticks and, for user errors, say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("The store index failed while {action}")]
    Db {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The index's own files are damaged: a table is missing, cut short or
    /// fails its checksums. `what` names the file or family.
    #[error("The store index `{path}` is damaged: {what}; `ci store verify` lists the damage, `ci store repair` keeps what is readable and says what it lost")]
    DamagedIndex {
        path: PathBuf,
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The filesystem holding the store has no space left.
    #[error("The disk holding the store `{path}` is full; `ci store gc` frees space (it works on a full disk), or make room on that disk")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("`{input}` is not a digest: {reason}")]
    BadDigest { input: String, reason: &'static str },

    #[error("Invalid name `{name}`: {reason}")]
    BadName { name: String, reason: &'static str },

    #[error("A stored tree is corrupt: {reason}; run `ci store verify`")]
    CorruptTree { reason: &'static str },

    #[error("A stored {what} record for `{key}` is corrupt; run `ci store verify`")]
    CorruptRecord { what: &'static str, key: String },

    #[error("Tree `{0}` is missing from the store; run `ci store verify`")]
    MissingTree(Digest),

    #[error("Blob `{0}` is missing from the store; run `ci store verify`")]
    MissingBlob(Digest),

    #[error("No layer, tree or ref matches `{input}`; `ci store ref ls` lists refs")]
    UnknownLayer { input: String },

    #[error("`{input}` is ambiguous; it matches {}", candidates.iter().map(|d| format!("`{}`", d.short())).collect::<Vec<_>>().join(", "))]
    AmbiguousPrefix {
        input: String,
        candidates: Vec<Digest>,
    },

    #[error(
        "Task `{label}` has no successful output in this store yet; `ci build {label}` makes one"
    )]
    UnknownLabel { label: String },

    #[error("No path `{path}` in layer `{layer}`")]
    NoSuchPath { layer: String, path: String },

    #[error("`{path}` is {what}, not {expected}")]
    WrongKind {
        path: String,
        what: &'static str,
        expected: &'static str,
    },

    #[error("Cannot store `{path}`: it is a {kind}; only files, directories and symlinks can be stored. Remove it or exclude it")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    #[error("`{path}` is not a directory")]
    NotADirectory { path: PathBuf },

    /// `entry` and any name in `reason` are quoted at most 100 bytes long
    /// (then `… (N bytes)`), whatever the archive holds.
    #[error("Refused archive `{archive}`: entry `{entry}` {reason}; nothing was imported")]
    BadArchive {
        archive: String,
        entry: String,
        reason: String,
    },

    #[error("Cannot read archive `{archive}`; nothing was imported")]
    ArchiveIo {
        archive: String,
        #[source]
        source: std::io::Error,
    },

    /// The store could not stage an archive's files (e.g. a full disk);
    /// what was staged has been removed.
    #[error("Cannot stage the files of archive `{archive}` in the store; nothing was imported")]
    ArchiveStaging {
        archive: String,
        #[source]
        source: std::io::Error,
    },

    #[error("Invalid ref name `{name}`: {reason}")]
    BadRefName { name: String, reason: &'static str },

    #[error("No ref named `{0}`; `ci store ref ls` lists refs")]
    NoSuchRef(String),

    #[error("Invalid store URL `{url}`: {reason}")]
    BadUrl { url: String, reason: &'static str },

    #[error("There is no store at `{path}` yet; `ci store add DIR` creates one")]
    NoStore { path: PathBuf },

    #[error("Cannot use `{path}` as a store: {reason}")]
    NotAStore { path: PathBuf, reason: String },

    #[error("Cannot write through a read-only store handle; this command opened the store at `{path}` read-only")]
    ReadOnly { path: PathBuf },

    #[error("Invalid ingest pattern `{pattern}`")]
    BadPattern {
        pattern: String,
        #[source]
        source: ignore::Error,
    },

    #[error("The directory walk failed")]
    Walk {
        #[source]
        source: ignore::Error,
    },
}

impl Error {
    /// The error for a socket, FIFO or device found where only files,
    /// directories and symlinks can be stored.
    pub fn unsupported_file(path: &std::path::Path, ft: std::fs::FileType) -> Error {
        Error::UnsupportedFileType {
            path: path.to_owned(),
            kind: special_file_kind(ft),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// What to call a file that is not a file, directory or symlink, in messages.
pub fn special_file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
