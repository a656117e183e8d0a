//! Strata layers as ordinary directories, without copying them.
//!
//! - [`LayerFs`] / [`mount_layers`]: a read-only FUSE mount of one layer, or
//!   of a directory of named layers, served lazily from the store; optional
//!   access tracing ([`AccessTrace`]).
//! - [`WorkDir`]: a writable directory whose initial content is a base
//!   layer (overlay over a LayerFs mount, or a copy), and its capture as a
//!   new layer.
//! - [`cleanup_stale`]: unmounts and removes what a crashed process left;
//!   [`unmount_path`]: `ci umount`.
//!
//! Every mount and work directory is recorded in [`state_dir`] before it is
//! made and forgotten after it is cleaned up; callers run [`cleanup_stale`]
//! once at startup and print what it returns.
//!
//! The API is blocking. Mounts are served by a private tokio runtime, so it
//! can be called from any thread; from async code use `spawn_blocking`.

mod capture;
mod control;
mod error;
mod layerfs;
mod mount;
mod state;
mod sys;
mod trace;
mod workdir;

pub use control::{detach_stdio, unmount_path, Unmounted};
pub use error::{Error, Result};
pub use layerfs::{LayerFs, Layers, ReadPath, PASSTHROUGH_ENV};
pub use mount::{mount_layers, AllowOther, MountHandle, MountOptions, Stop};
pub use state::{cleanup_stale, live_mounts, state_dir, Cleaned, LiveMount};
pub use trace::{AccessTrace, TracedPath};
pub use workdir::{empty_dir, remove_tree, Strategy, WorkDir, WorkDirOptions};

/// Why FUSE mounts cannot work for this process (no `/dev/fuse`, no
/// permission, no `fusermount3` for an ordinary user), or `None` when they can.
pub fn fuse_problem() -> Option<String> {
    sys::fuse_problem()
}
