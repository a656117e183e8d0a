use std::path::PathBuf;

use crate::Strategy;

/// Everything that can go wrong in `strata-fuse`. Messages start with a
/// capital, quote names in backticks and, for user errors, say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed; its own message says what to do.
    #[error(transparent)]
    Store(#[from] strata_store::Error),

    #[error("Cannot {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("FUSE is not available: {reason}")]
    FuseUnavailable { reason: String },

    #[error("Cannot mount a layer at `{path}`")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot mount at `{path}`: {reason}")]
    BadMountpoint { path: PathBuf, reason: String },

    #[error("`{path}` is a stale mount: the process serving it died; clear it with `{command}`")]
    StaleMount { path: PathBuf, command: String },

    #[error("`{path}` is not mounted")]
    NotMounted { path: PathBuf },

    #[error("Cannot unmount `{path}`; if it is busy, find the users with `fuser -vm {path}`")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("`allow_other` was required but is not permitted for this user; add `user_allow_other` to /etc/fuse.conf or mount as root")]
    AllowOtherDenied,

    #[error("Invalid layer name `{name}` in a multi-layer mount")]
    BadLayerName {
        name: String,
        #[source]
        source: strata_store::Error,
    },

    #[error("Cannot start the runtime that serves FUSE mounts")]
    Runtime {
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot mount the kernel overlay filesystem at `{path}`")]
    KernelOverlay {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot run `{program}`")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("`fuse-overlayfs` could not mount `{path}` ({status}): {stderr}")]
    FuseOverlayfs {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("The work-directory strategy `{strategy}` is not available here: {reason}")]
    StrategyUnavailable { strategy: Strategy, reason: String },

    #[error("The scratch path `{path}` contains `,` or `:`, which overlay mount options cannot carry; choose another scratch directory")]
    BadScratchPath { path: PathBuf },

    #[error("Cannot capture `{path}`: it is a {kind}; only files, directories and symlinks can be stored. Remove it before the task ends")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    #[error("The work directory was already closed")]
    Closed,

    #[error("The mount record `{path}` is corrupt; remove it")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Whether the error is in what the user asked for (a bad mount point,
    /// a stale mount, an unknown layer…) rather than a failure of the system.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Store(e) => matches!(
                e,
                strata_store::Error::BadDigest { .. }
                    | strata_store::Error::UnknownLayer { .. }
                    | strata_store::Error::AmbiguousPrefix { .. }
                    | strata_store::Error::NoSuchRef(_)
                    | strata_store::Error::BadRefName { .. }
                    | strata_store::Error::NoStore { .. }
            ),
            Error::BadMountpoint { .. }
            | Error::StaleMount { .. }
            | Error::NotMounted { .. }
            | Error::AllowOtherDenied
            | Error::BadLayerName { .. }
            | Error::BadScratchPath { .. }
            | Error::UnsupportedFileType { .. }
            | Error::StrategyUnavailable { .. } => true,
            Error::Io { .. }
            | Error::FuseUnavailable { .. }
            | Error::Mount { .. }
            | Error::Unmount { .. }
            | Error::Runtime { .. }
            | Error::KernelOverlay { .. }
            | Error::Spawn { .. }
            | Error::FuseOverlayfs { .. }
            | Error::Closed
            | Error::BadRecord { .. } => false,
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
