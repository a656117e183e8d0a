use std::path::PathBuf;

/// Why a build could not be carried out. A task that fails is not an error:
/// it is recorded in the run ([`crate::TaskRecord`]).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] strata_store::Error),

    #[error(transparent)]
    Fuse(#[from] strata_fuse::Error),

    #[error(transparent)]
    Load(#[from] crate::LoadError),

    #[error(transparent)]
    Model(#[from] crate::ModelError),

    #[error("Task image `{image}` needs Docker, which is not reachable here; start it (`dockerd &` or `systemctl start docker`) or choose `--executor docker` on a machine that has it")]
    ImageNeedsDocker { image: String },

    #[error("Image `{image}` is not on this machine and could not be pulled from `{registry}` (no registry is reachable, or it lacks the image); build or import it here: `docker build -t {image} DIR`, `docker load -i FILE.tar` or `docker import ROOTFS.tar {image}`")]
    ImageUnavailable {
        image: String,
        registry: String,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("Docker could not {action}")]
    Docker {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("The `{executor}` executor is not available: {reason}")]
    ExecutorUnavailable { executor: String, reason: String },

    #[error("No run `{run}`; `ci runs` lists them")]
    UnknownRun { run: String },

    #[error("Run id `{run}` is ambiguous; it matches {}", candidates.join(", "))]
    AmbiguousRun {
        run: String,
        candidates: Vec<String>,
    },

    #[error("The record of run `{run}` is unreadable: {reason}")]
    Record { run: String, reason: String },

    #[error("Cannot {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("No task `{label}` in the last build; `ci build {label}` first")]
    NoHistory { label: String },

    /// An input's output lacks an object the store no longer has (a blob
    /// removed by hand). The scheduler runs the producer again when it can.
    #[error("Input `{input}` lacks `{object}`, which is no longer in the store; `ci store repair` drops what names it, then `ci build` makes it again")]
    IncompleteInput {
        input: crate::Label,
        object: strata_store::Digest,
    },

    #[error("The engine's worker failed: {0}")]
    Join(String),

    #[error("Input layer {layer} is held only at the remote cache `{url}`, which could not provide it; build again when the cache is back, or fetch it by hand: `ci store pull {layer} {url}`")]
    HeldRemotely { layer: String, url: String },

    #[error("Cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl BuildError {
    pub(crate) fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> BuildError {
        move |source| BuildError::Encode { what, source }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Io {
            action,
            path,
            source,
        }
    }

    /// Whether the user can fix this by changing their input (exit status 2).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            BuildError::Load(_)
                | BuildError::Model(_)
                | BuildError::UnknownRun { .. }
                | BuildError::AmbiguousRun { .. }
                | BuildError::NoHistory { .. }
                | BuildError::ImageNeedsDocker { .. }
                | BuildError::ImageUnavailable { .. }
        )
    }
}
