//! Writable work directories for tasks: a base layer made writable without
//! copying it, then captured as a new layer.
//!
//! Lower = a [`LayerFs`](crate::LayerFs) mount of the base, upper = a scratch
//! directory, joined by the kernel's overlayfs where it is permitted, by
//! `fuse-overlayfs` where it is installed and the kernel's is not, and a plain
//! checkout where FUSE is unavailable. Kernel overlays are mounted with
//! `redirect_dir=off`: renaming a directory of the base copies it up whole,
//! so the upper directory alone says what changed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use strata_store::{Digest, Store, Tree};

use crate::capture::{self, Upper};
use crate::layerfs::Layers;
use crate::mount::{mount_inner, AllowOther, MountHandle, MountOptions};
use crate::state::{self, RecordGuard};
use crate::trace::AccessTrace;
use crate::{sys, Error, Result};

/// How a work directory is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The best one available: kernel overlay, then fuse-overlayfs, then a
    /// copy (and a copy when there is no base: there is nothing to share).
    #[default]
    Auto,
    /// Kernel overlayfs over a LayerFs mount (root, or root in a user namespace).
    KernelOverlay,
    /// `fuse-overlayfs` over a LayerFs mount (an ordinary user with FUSE).
    FuseOverlayfs,
    /// A plain checkout of the base (no FUSE needed; costs a full copy).
    Copy,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::KernelOverlay => "kernel-overlay",
            Strategy::FuseOverlayfs => "fuse-overlayfs",
            Strategy::Copy => "copy",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Strategy, String> {
        match s {
            "auto" => Ok(Strategy::Auto),
            "kernel-overlay" => Ok(Strategy::KernelOverlay),
            "fuse-overlayfs" => Ok(Strategy::FuseOverlayfs),
            "copy" => Ok(Strategy::Copy),
            _ => Err(format!(
                "unknown strategy `{s}`; use `auto`, `kernel-overlay`, `fuse-overlayfs` or `copy`"
            )),
        }
    }
}

/// How to make a work directory.
#[derive(Clone, Debug, Default)]
pub struct WorkDirOptions {
    /// How to make it; [`Strategy::Auto`] picks and says why.
    pub strategy: Strategy,
    /// Trace accesses to the base layer ([`WorkDir::trace`]); overlay
    /// strategies only (a copy reads nothing lazily).
    pub trace: bool,
}

/// Set once the kernel refused an overlay mount: later work directories of
/// this process skip the attempt.
static KERNEL_OVERLAY_DENIED: AtomicBool = AtomicBool::new(false);

/// A writable directory whose initial content is a base layer.
///
/// Dropping it unmounts everything and removes its scratch directory (errors
/// ignored); [`WorkDir::close`] does the same and reports errors. If the
/// process dies first, [`crate::cleanup_stale`] in the next process does it.
pub struct WorkDir {
    strategy: Strategy,
    note: Option<String>,
    base: Digest,
    /// `scratch_root/wd-XXXXXX`, removed on close.
    scratch: PathBuf,
    /// What the task sees and writes.
    path: PathBuf,
    upper: Option<PathBuf>,
    lower: Option<MountHandle>,
    /// The overlay mounted at `path`, when there is one.
    overlay_mounted: bool,
    record: Option<RecordGuard>,
    closed: bool,
    /// `scratch` belongs to the caller ([`WorkDir::empty_in`]): closing
    /// empties it and leaves it in place.
    borrowed: bool,
}

impl std::fmt::Debug for WorkDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkDir")
            .field("strategy", &self.strategy)
            .field("path", &self.path)
            .field("base", &self.base)
            .finish()
    }
}

/// Overlay options cannot carry these in paths.
fn check_option_path(p: &Path) -> Result<()> {
    let b = std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str());
    if b.contains(&b',') || b.contains(&b':') || b.contains(&b'\\') {
        return Err(Error::BadScratchPath { path: p.to_owned() });
    }
    Ok(())
}

impl WorkDir {
    /// Makes a writable directory whose content is `base` (or empty for
    /// `None`) inside a new directory under `scratch_root` (created when
    /// missing; use a local disk). The chosen strategy and why are in
    /// [`WorkDir::strategy`] and [`WorkDir::note`]: print them once.
    ///
    /// An explicit strategy that cannot work here fails with
    /// [`Error::StrategyUnavailable`]; [`Strategy::Auto`] falls back instead.
    /// The store must be writable when `base` is `None` (the empty tree is
    /// stored). Blocks; from async code call it in `spawn_blocking`.
    pub fn create(
        store: &Store,
        base: Option<Digest>,
        scratch_root: &Path,
        opts: &WorkDirOptions,
    ) -> Result<WorkDir> {
        let empty = Tree::empty();
        let base = match base {
            Some(d) => {
                if !store.has_tree(&d)? {
                    return Err(strata_store::Error::MissingTree(d).into());
                }
                d
            }
            None => {
                let d = empty.digest();
                if !store.has_tree(&d)? {
                    store.put_trees([empty])?;
                }
                d
            }
        };
        std::fs::create_dir_all(scratch_root).map_err(Error::io("create", scratch_root))?;
        let root =
            std::fs::canonicalize(scratch_root).map_err(Error::io("resolve", scratch_root))?;
        let scratch = make_unique_dir(&root)?;
        let mut wd = WorkDir {
            strategy: opts.strategy,
            note: None,
            base,
            path: scratch.join("merged"),
            upper: None,
            lower: None,
            overlay_mounted: false,
            // Recorded before anything is mounted, so a crash at any point
            // leaves something the next run can find.
            record: Some(state::record(
                &format!("work directory on layer {}", base.short()),
                &[scratch.join("merged"), scratch.join("lower")],
                Some(&scratch),
                false,
            )?),
            scratch,
            closed: false,
            borrowed: false,
        };
        // On error `wd` drops here, which unmounts and removes what was made.
        wd.setup(store, opts)?;
        Ok(wd)
    }

    /// An empty work directory at `dir`, an existing empty directory the
    /// caller owns and keeps: nothing is mounted, copied or recorded, and
    /// closing empties `dir` rather than removing it, so the next work
    /// directory can use it again. Creating and deleting directories is what
    /// costs most for a short task (ext4 without a journal scans past every
    /// inode deleted in the last minutes to allocate one); a build reuses one
    /// such directory per job slot. Strategy [`Strategy::Copy`].
    ///
    /// Fails with an I/O error naming `dir` when it is missing or not empty.
    /// The store must be writable (the empty tree is stored).
    pub fn empty_in(store: &Store, dir: &Path) -> Result<WorkDir> {
        let empty = Tree::empty();
        let base = empty.digest();
        if !store.has_tree(&base)? {
            store.put_trees([empty])?;
        }
        let mut entries = std::fs::read_dir(dir).map_err(Error::io("list", dir))?;
        if entries.next().is_some() {
            return Err(Error::io("use", dir)(std::io::Error::other(
                "the directory is not empty",
            )));
        }
        Ok(WorkDir {
            strategy: Strategy::Copy,
            note: Some("no base layer: a plain directory".into()),
            base,
            scratch: dir.to_owned(),
            path: dir.to_owned(),
            upper: None,
            lower: None,
            overlay_mounted: false,
            record: None,
            closed: false,
            borrowed: true,
        })
    }

    fn setup(&mut self, store: &Store, opts: &WorkDirOptions) -> Result<()> {
        let empty_base = self.base == Tree::empty().digest();
        match opts.strategy {
            Strategy::Copy => self.setup_copy(store, None),
            Strategy::KernelOverlay => {
                self.mount_lower(store, opts)
                    .map_err(|e| unavailable(Strategy::KernelOverlay, e))?;
                self.mount_kernel_overlay()
                    .map_err(|e| unavailable(Strategy::KernelOverlay, e))
            }
            Strategy::FuseOverlayfs => {
                self.mount_lower(store, opts)
                    .map_err(|e| unavailable(Strategy::FuseOverlayfs, e))?;
                self.mount_fuse_overlayfs()
                    .map_err(|e| unavailable(Strategy::FuseOverlayfs, e))
            }
            Strategy::Auto if empty_base => {
                self.setup_copy(store, Some("no base layer: a plain directory".into()))
            }
            Strategy::Auto => {
                if let Some(reason) = sys::fuse_problem() {
                    return self.setup_copy(store, Some(format!("copy of the base: {reason}")));
                }
                if let Err(e) = self.mount_lower(store, opts) {
                    return self.setup_copy(
                        store,
                        Some(format!("copy of the base: FUSE failed: {}", chain(&e))),
                    );
                }
                let mut why = Vec::new();
                if KERNEL_OVERLAY_DENIED.load(Ordering::Relaxed) {
                    why.push("kernel overlayfs is not permitted".to_owned());
                } else {
                    match self.mount_kernel_overlay() {
                        Ok(()) => {
                            self.strategy = Strategy::KernelOverlay;
                            return Ok(());
                        }
                        Err(e) => {
                            if let Error::KernelOverlay { source, .. } = &e {
                                if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES))
                                {
                                    KERNEL_OVERLAY_DENIED.store(true, Ordering::Relaxed);
                                }
                            }
                            why.push(chain(&e));
                        }
                    }
                }
                if sys::find_program("fuse-overlayfs").is_some() {
                    match self.mount_fuse_overlayfs() {
                        Ok(()) => {
                            self.strategy = Strategy::FuseOverlayfs;
                            self.note = Some(format!("fuse-overlayfs: {}", why.join("; ")));
                            return Ok(());
                        }
                        Err(e) => why.push(chain(&e)),
                    }
                } else {
                    why.push("`fuse-overlayfs` is not installed".into());
                }
                if let Some(lower) = self.lower.take() {
                    lower.unmount()?;
                }
                self.setup_copy(store, Some(format!("copy of the base: {}", why.join("; "))))
            }
        }
    }

    fn setup_copy(&mut self, store: &Store, note: Option<String>) -> Result<()> {
        self.strategy = Strategy::Copy;
        self.note = note;
        self.path = self.scratch.join("tree");
        store.checkout(&self.base, &self.path)?;
        Ok(())
    }

    fn mount_lower(&mut self, store: &Store, opts: &WorkDirOptions) -> Result<()> {
        check_option_path(&self.scratch)?;
        let lower = self.scratch.join("lower");
        for d in ["lower", "upper", "work", "merged"] {
            let p = self.scratch.join(d);
            std::fs::create_dir(&p).map_err(Error::io("create", &p))?;
        }
        self.upper = Some(self.scratch.join("upper"));
        let mo = MountOptions {
            allow_other: AllowOther::IfPermitted,
            trace: opts.trace,
            stop_on_sigterm: false,
        };
        self.lower = Some(mount_inner(
            store,
            &Layers::One(self.base),
            &lower,
            &mo,
            None,
            // A task reads its base through the overlay, often many small
            // files: zero-message opens, as for the views mount.
            false,
        )?);
        Ok(())
    }

    fn overlay_dirs(&self) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let s = &self.scratch;
        (
            s.join("lower"),
            s.join("upper"),
            s.join("work"),
            s.join("merged"),
        )
    }

    fn mount_kernel_overlay(&mut self) -> Result<()> {
        let (lower, upper, work, merged) = self.overlay_dirs();
        let base = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off",
            lower.display(),
            upper.display(),
            work.display()
        );
        // `volatile` skips syncs we do not need: a crashed work directory is
        // thrown away, and capture syncs what it keeps. Older kernels lack it.
        let res = sys::mount_fs("overlay", &merged, "overlay", &format!("{base},volatile"))
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => sys::mount_fs("overlay", &merged, "overlay", &base),
                _ => Err(e),
            });
        res.map_err(|source| Error::KernelOverlay {
            path: merged.clone(),
            source,
        })?;
        self.overlay_mounted = true;
        self.path = merged;
        Ok(())
    }

    fn mount_fuse_overlayfs(&mut self) -> Result<()> {
        let (lower, upper, work, merged) = self.overlay_dirs();
        // A failed kernel attempt may have left the work directory in use.
        empty_dir(&work)?;
        let mut o = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        if sys::is_root() || sys::user_allow_other() {
            o.push_str(",allow_other");
        }
        // Without -f it forks once the mount is ready: its exit is our signal.
        let out = std::process::Command::new("fuse-overlayfs")
            .arg("-o")
            .arg(&o)
            .arg(&merged)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: "fuse-overlayfs",
                source,
            })?;
        if !out.status.success() {
            return Err(Error::FuseOverlayfs {
                path: merged,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        self.overlay_mounted = true;
        self.path = merged;
        Ok(())
    }

    /// The directory the task reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The strategy in use (never [`Strategy::Auto`]).
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Why [`Strategy::Auto`] chose a fallback, for the one line printed
    /// about it; `None` for the first choice or an explicit strategy.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The base layer (the empty tree for a work directory made from none).
    pub fn base(&self) -> Digest {
        self.base
    }

    /// Which paths of the base were used so far: `None` unless tracing was
    /// asked for and the strategy mounts the base (overlays).
    pub fn trace(&self) -> Option<AccessTrace> {
        self.lower.as_ref().and_then(MountHandle::trace)
    }

    /// Turns the directory into a layer: base + everything changed, stored
    /// (blobs made durable with one [`strata_store::BlobStore::sync`] before any tree names
    /// them; that sync also covers blobs the caller published just before,
    /// even when nothing changed) but not recorded as a layer: record it
    /// with [`Store::record_layer`] and its lineage. Call once every writer
    /// is done; the work directory stays usable. The digest is the one an
    /// ingest of [`WorkDir::path`] would give, whatever the strategy.
    ///
    /// A socket, FIFO or device left in the directory fails with
    /// [`Error::UnsupportedFileType`] naming it.
    pub fn capture(&self, store: &Store) -> Result<Digest> {
        self.capture_inner(store, false)
    }

    /// [`WorkDir::capture`], then [`WorkDir::close`]. A plain directory's
    /// files are moved into the store rather than copied when nothing else
    /// has them open or links to them (checked with a write lease), so a
    /// task's output costs no copy and no file is made or deleted for it.
    /// The capture's error comes first when both fail.
    pub fn capture_and_close(self, store: &Store) -> Result<Digest> {
        let captured = self.capture_inner(store, true);
        let closed = self.close();
        let digest = captured?;
        closed?;
        Ok(digest)
    }

    fn capture_inner(&self, store: &Store, adopt: bool) -> Result<Digest> {
        if self.closed {
            return Err(Error::Closed);
        }
        match (self.strategy, &self.upper) {
            (Strategy::KernelOverlay, Some(upper)) => {
                capture::capture_upper(store, &self.base, upper, &self.path, Upper::Kernel)
            }
            (Strategy::FuseOverlayfs, Some(upper)) => {
                capture::capture_upper(store, &self.base, upper, &self.path, Upper::FuseOverlayfs)
            }
            _ => capture::capture_dir(store, &self.path, adopt),
        }
    }

    /// Unmounts everything and removes the scratch directory.
    pub fn close(mut self) -> Result<()> {
        self.close_now()
    }

    fn close_now(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let merged = self.scratch.join("merged");
        if self.overlay_mounted {
            // Anything a task mounted inside goes first.
            let mut below =
                sys::mounts_below(&merged).map_err(Error::io("read", "/proc/self/mountinfo"))?;
            below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in below {
                sys::unmount_if_mounted(&p).map_err(|source| Error::Unmount {
                    path: p.clone(),
                    source,
                })?;
            }
            sys::unmount_if_mounted(&merged).map_err(|source| Error::Unmount {
                path: merged.clone(),
                source,
            })?;
            self.overlay_mounted = false;
        }
        if let Some(lower) = self.lower.take() {
            lower.unmount()?;
        }
        if self.borrowed {
            empty_dir(&self.scratch)?;
        } else {
            remove_tree(&self.scratch).map_err(Error::io("remove", &self.scratch))?;
        }
        self.record.take();
        Ok(())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = self.close_now();
    }
}

fn unavailable(strategy: Strategy, e: Error) -> Error {
    Error::StrategyUnavailable {
        strategy,
        reason: chain(&e),
    }
}

/// An error and its causes on one line.
fn chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn make_unique_dir(root: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let pid = std::process::id();
    for i in 0u32.. {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = root.join(format!(
            "wd-{pid}-{:08x}",
            nanos ^ i.wrapping_mul(0x9e37_79b9)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && i < 100 => continue,
            Err(e) => return Err(Error::io("create", &p)(e)),
        }
    }
    Err(Error::io("create", root)(std::io::Error::other(
        "no free name",
    )))
}

/// Empties a directory without removing it.
/// Removes everything inside `dir` and keeps `dir`, making it writable
/// first (a task may leave its work directory read-only), with
/// [`remove_tree`]'s care for mounts inside.
pub fn empty_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        if meta.is_dir() && meta.permissions().mode() & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    for entry in std::fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let p = entry.map_err(Error::io("list", dir))?.path();
        remove_tree(&p).map_err(Error::io("remove", &p))?;
    }
    Ok(())
}

/// Removes `path` and everything below it, making read-only directories
/// writable first, and never crossing into another filesystem (a mount left
/// inside is an error, not something to delete through). Returns whether
/// anything was there.
pub fn remove_tree(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        std::fs::remove_file(path)?;
        return Ok(true);
    }
    fn walk(dir: &Path, dev: u64) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(dir)?;
        if meta.dev() != dev {
            return Err(std::io::Error::other(format!(
                "`{}` is another filesystem (a mount?); not removing through it",
                dir.display()
            )));
        }
        if meta.permissions().mode() & 0o700 != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let p = entry.path();
            if entry.file_type()?.is_dir() {
                walk(&p, dev)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        std::fs::remove_dir(dir)
    }
    walk(path, meta.dev())?;
    Ok(true)
}
