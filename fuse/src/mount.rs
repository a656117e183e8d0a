//! Mounting a [`LayerFs`] and owning the mount: [`mount_layers`] and
//! [`MountHandle`].
//!
//! Each mount is served by a thread of its own reading `/dev/fuse`
//! (`fuser`'s session loop); large reads go to the blocking threads of one
//! private tokio runtime ([`runtime`]), which also waits for signals. Keeping
//! them apart from the caller's runtime matters: a caller that does blocking
//! file I/O on its own runtime's threads against its own mount could
//! otherwise starve the very threads that answer the kernel.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use strata_store::Store;

use crate::layerfs::{Inner, LayerFs, Layers, ReadPath};
use crate::state::{self, RecordGuard};
use crate::trace::AccessTrace;
use crate::{sys, Error, Result};

/// Whether other users (and root, and Docker's daemon) may access a mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AllowOther {
    /// Only the mounting user.
    No,
    /// Everyone when permitted: always for root, for an ordinary user when
    /// `/etc/fuse.conf` has `user_allow_other`; otherwise only the mounting user.
    #[default]
    IfPermitted,
    /// Everyone, or fail with [`Error::AllowOtherDenied`].
    Required,
}

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Who besides the mounting user may use the mount.
    pub allow_other: AllowOther,
    /// Record which paths are looked up, listed and read
    /// ([`MountHandle::trace`]).
    pub trace: bool,
    /// This process unmounts and exits on SIGTERM (it calls
    /// [`MountHandle::wait`]), so [`crate::unmount_path`] may stop it that way
    /// rather than pulling the mount from under it. SIGINT and SIGTERM are
    /// caught from the mount on, so one sent before `wait` is not lost.
    pub stop_on_sigterm: bool,
}

/// Why [`MountHandle::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (Ctrl-C) arrived.
    Interrupt,
    /// SIGTERM arrived.
    Terminate,
    /// The mount went away from outside (`umount`, `fusermount3 -u`).
    Unmounted,
}

/// The end of a FUSE session, observable from threads and from async code.
#[derive(Default)]
pub(crate) struct Ended {
    done: Mutex<bool>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl Ended {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `limit`; returns whether the session ended.
    fn wait(&self, limit: Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (done, _) = self
            .cv
            .wait_timeout_while(done, limit, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        *done
    }

    async fn wait_async(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

/// Read-ahead of a LayerFs mount, where this process may set it.
const READ_AHEAD_KIB: u32 = 1024;

static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// The runtime helping every mount of this process: one thread
/// (`strata-fuse`) driving a current-thread runtime, for signals, and its
/// blocking threads for large reads.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Handle> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let _one = RUNTIME_INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("strata-fuse")
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("strata-fuse".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|source| Error::Runtime { source })?;
    Ok(RUNTIME.get_or_init(|| handle))
}

/// A mounted [`LayerFs`]. Unmounts when dropped; call [`MountHandle::unmount`]
/// to see errors.
pub struct MountHandle {
    mountpoint: PathBuf,
    fs: Arc<Inner>,
    ended: Arc<Ended>,
    privileged: bool,
    allow_other: bool,
    /// The FUSE connection's id in fusectl, to abort a busy mount (which
    /// also ends the session: its reads of `/dev/fuse` fail).
    conn: Option<u32>,
    record: Option<RecordGuard>,
    /// SIGINT and SIGTERM listeners of a `stop_on_sigterm` mount, made when
    /// it is mounted, so a signal before [`MountHandle::wait`] is not lost.
    signals: Mutex<Option<Signals>>,
    done: bool,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .field("privileged", &self.privileged)
            .field("allow_other", &self.allow_other)
            .finish()
    }
}

/// Mounts `layers` read-only at `mountpoint`, an existing empty directory,
/// and returns once the mount is ready.
///
/// As root the mount is made directly; an ordinary user goes through
/// `fusermount3`. File reads use FUSE passthrough where the kernel and the
/// process allow it ([`MountHandle::read_path`]), except for
/// [`Layers::Views`], whose opens cost no request at all instead. The mount is recorded in the state directory so that, if
/// this process dies, the next [`crate::cleanup_stale`] unmounts it.
///
/// Errors: [`Error::StaleMount`] when `mountpoint` is a dead mount (the
/// message names the command that clears it), [`Error::BadMountpoint`] when
/// it is missing, not a directory, not empty or already mounted,
/// [`Error::FuseUnavailable`], [`Error::AllowOtherDenied`], [`Error::Mount`].
///
/// Blocks the calling thread; from async code call it in `spawn_blocking`.
pub fn mount_layers(
    store: &Store,
    layers: &Layers,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle> {
    let what = match layers {
        Layers::One(d) => format!("layer {}", d.short()),
        Layers::Named(v) => format!("{} layers", v.len()),
        Layers::Views => "views of layers".to_owned(),
    };
    // The views mount is read by tasks through many small inputs: an open
    // request each would cost more than the reads it saves.
    let passthrough = !matches!(layers, Layers::Views);
    mount_inner(store, layers, mountpoint, opts, Some(&what), passthrough)
}

pub(crate) fn mount_inner(
    store: &Store,
    layers: &Layers,
    mountpoint: &Path,
    opts: &MountOptions,
    record: Option<&str>,
    passthrough: bool,
) -> Result<MountHandle> {
    let mountpoint = check_mountpoint(mountpoint)?;
    if let Some(reason) = sys::fuse_problem() {
        return Err(Error::FuseUnavailable { reason });
    }
    let fs = LayerFs::new(store.clone(), layers, opts.trace, passthrough)?;
    let inner = fs.inner();
    let root = sys::is_root();
    let privileged = root;
    let allow_other = match opts.allow_other {
        AllowOther::No => false,
        AllowOther::IfPermitted => root || sys::user_allow_other(),
        AllowOther::Required if root || sys::user_allow_other() => true,
        AllowOther::Required => return Err(Error::AllowOtherDenied),
    };
    let guard = match record {
        Some(what) => Some(state::record(
            what,
            std::slice::from_ref(&mountpoint),
            None,
            opts.stop_on_sigterm,
        )?),
        None => None,
    };
    let signals = match opts.stop_on_sigterm {
        true => Some(listen()?),
        false => None,
    };
    let session =
        start_session(fs, &mountpoint, privileged, allow_other).map_err(|source| Error::Mount {
            path: mountpoint.clone(),
            source,
        })?;
    if inner.passthrough.is_on() {
        probe_passthrough(&session, &inner);
    }
    let ended = Arc::new(Ended::default());
    let ended2 = ended.clone();
    let served = std::thread::Builder::new()
        .name("strata-fuse-session".into())
        .spawn(move || {
            // Returns when the kernel ends the connection: unmounted (by us
            // or from outside) or aborted.
            let _ = session.run();
            ended2.set();
        });
    if let Err(source) = served {
        let _ = sys::unmount_any(&mountpoint, true);
        return Err(Error::Runtime { source });
    }
    let entry = sys::mount_at(&mountpoint).ok().flatten();
    if let Some(m) = &entry {
        // FUSE starts at the kernel's default 128 KiB read-ahead, which
        // halves sequential throughput; requests can be 1 MiB (max_pages).
        sys::set_read_ahead_kib(&m.dev, READ_AHEAD_KIB);
    }
    let conn = entry.map(|m| m.minor);
    Ok(MountHandle {
        mountpoint,
        fs: inner,
        ended,
        privileged,
        allow_other,
        conn,
        record: guard,
        signals: Mutex::new(signals),
        done: false,
    })
}

/// Mounts the FUSE filesystem and answers the kernel's INIT; the session
/// is then ready to run. Root mounts directly (`fuse.strata` in the mount
/// table), an ordinary user through `fusermount3`.
fn start_session(
    fs: LayerFs,
    mountpoint: &Path,
    privileged: bool,
    allow_other: bool,
) -> std::io::Result<fuser::Session<LayerFs>> {
    use fuser::{MountOption, SessionACL};
    let mut config = fuser::Config::default();
    // Without allow_other the kernel lets only the owner in anyway.
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    if !privileged {
        config.mount_options = vec![
            MountOption::FSName("strata".into()),
            MountOption::Subtype("strata".into()),
            MountOption::RO,
            MountOption::DefaultPermissions,
        ];
        return fuser::Session::new(fs, mountpoint, &config);
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions{}",
        std::os::fd::AsRawFd::as_raw_fd(&dev),
        if allow_other { ",allow_other" } else { "" }
    );
    sys::mount_fs_flags(
        "strata",
        mountpoint,
        "fuse.strata",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        &data,
    )?;
    let session = fuser::Session::from_fd(fs, dev.into(), config.acl, config);
    if session.is_err() {
        let _ = sys::unmount_any(mountpoint, true);
    }
    session
}

/// Registers a backing file once, right after INIT and before any open,
/// so that a process or kernel that cannot pass reads through (no
/// CAP_SYS_ADMIN: EPERM) keeps zero-message opens, and says so at once.
fn probe_passthrough(session: &fuser::Session<LayerFs>, fs: &Inner) {
    use std::os::fd::AsFd;
    let probe = match std::fs::File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(_) => return,
    };
    match fuser::BackingId::create_raw(session.as_fd(), &probe) {
        Ok(id) => {
            let _ = sys::fuse_backing_close(session.as_fd(), id);
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOTTY)) => {
            fs.passthrough.refuse_before_opens(format!(
                "the kernel refused a backing file: {e}; FUSE passthrough needs CAP_SYS_ADMIN"
            ))
        }
        // Something about this one file (the binary on a stacked
        // filesystem): blobs may still do.
        Err(_) => {}
    }
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

/// Listeners for SIGINT and SIGTERM on the runtime: from now on those
/// signals are theirs and no longer end the process.
fn listen() -> Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let _in_runtime = runtime()?.enter();
    let int = signal(SignalKind::interrupt()).map_err(|source| Error::Runtime { source })?;
    let term = signal(SignalKind::terminate()).map_err(|source| Error::Runtime { source })?;
    Ok((int, term))
}

/// Checks a mountpoint and returns its absolute path.
fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    let bad = |reason: &str| Error::BadMountpoint {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if sys::is_disconnected(path) {
        return Err(Error::StaleMount {
            path: path.to_owned(),
            command: format!("ci umount {}", path.display()),
        });
    }
    let abs = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("it does not exist; create the directory first"),
        _ => Error::io("resolve", path)(e),
    })?;
    if !abs.is_dir() {
        return Err(bad("it is not a directory"));
    }
    if let Some(m) = sys::mount_at(&abs).map_err(Error::io("read", "/proc/self/mountinfo"))? {
        return Err(bad(&format!(
            "a `{}` filesystem is already mounted there; `ci umount {}` unmounts it",
            m.fstype,
            path.display()
        )));
    }
    let mut entries = std::fs::read_dir(&abs).map_err(Error::io("list", &abs))?;
    if entries.next().is_some() {
        return Err(bad(
            "the directory is not empty; mount on an empty directory",
        ));
    }
    Ok(abs)
}

impl MountHandle {
    /// Where the layers are mounted (absolute).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether other users may access the mount.
    pub fn allow_other(&self) -> bool {
        self.allow_other
    }

    /// Whether the mount was made directly (root without `fusermount3`)
    /// rather than through `fusermount3`.
    pub fn privileged(&self) -> bool {
        self.privileged
    }

    /// The paths used so far, `None` when the mount is not traced. Still
    /// complete after [`MountHandle::unmount`] for a handle kept by reference.
    pub fn trace(&self) -> Option<AccessTrace> {
        self.fs.trace()
    }

    /// Serves `layers` ([`Layers::One`] or [`Layers::Named`]) as the directory
    /// `name` at the root of a [`Layers::Views`] mount, and returns its path.
    /// A name is served once per mount: [`Error::BadLayerName`] when it was
    /// already used (or is not a valid entry name), when a layer is missing,
    /// or when this mount does not serve views.
    pub fn add_view(&self, name: &str, layers: &Layers) -> Result<PathBuf> {
        self.fs.add_view(name, layers)?;
        Ok(self.mountpoint.join(name))
    }

    /// Takes the view `name` away from the root listing and from new
    /// lookups; files already open in it stay readable.
    pub fn remove_view(&self, name: &str) {
        self.fs.remove_view(name)
    }

    /// How file reads are done: by the kernel from the blob files (FUSE
    /// passthrough), or served by LayerFs and why. Can change from
    /// passthrough to served once, when the kernel first refuses a blob.
    pub fn read_path(&self) -> ReadPath {
        self.fs.passthrough.read_path()
    }

    /// Read requests LayerFs has answered (a file read with passthrough
    /// makes none).
    pub fn read_requests(&self) -> u64 {
        self.fs.reads()
    }

    /// Backing ids held now: one per file open for passthrough, released
    /// when the kernel releases the last open of it.
    pub fn backing_ids(&self) -> usize {
        self.fs.passthrough.backing_ids()
    }

    /// The last error met while serving (replied to the kernel as `EIO`).
    pub fn last_error(&self) -> Option<String> {
        self.fs.last_error()
    }

    /// Whether the FUSE session is still serving.
    pub fn is_mounted(&self) -> bool {
        !self.ended.is_set()
    }

    /// Blocks until SIGINT or SIGTERM arrives or the mount is unmounted from
    /// outside. From then on those signals no longer end the process: the
    /// caller unmounts and exits.
    pub fn wait(&self) -> Result<Stop> {
        let rt = runtime()?;
        // A `stop_on_sigterm` mount listens since it was mounted; others
        // from now.
        let held = self
            .signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (mut int, mut term) = match held {
            Some(s) => s,
            None => listen()?,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let ended = self.ended.clone();
        rt.spawn(async move {
            let stop = tokio::select! {
                _ = int.recv() => Stop::Interrupt,
                _ = term.recv() => Stop::Terminate,
                _ = ended.wait_async() => Stop::Unmounted,
            };
            let _ = tx.send(stop);
        });
        Ok(rx.recv().unwrap_or(Stop::Unmounted))
    }

    /// Unmounts and waits for the session to end. A mount still in use
    /// (an open file, a process inside it) is detached lazily and its
    /// connection aborted, so the users get errors rather than a hang.
    /// Unmounting something already unmounted from outside is not an error.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let path = self.mountpoint.clone();
        if !self.ended.is_set() {
            match sys::unmount_any(&path, false) {
                Ok(()) => {
                    // Normally the kernel ends the session right away. But
                    // something else may still pin the filesystem (a lazily
                    // detached overlay on top of it, with a file open): then
                    // the connection lives on and we end it ourselves.
                    let wait = match self.conn.map(sys::fuse_connection_alive) {
                        Some(Some(true)) => Duration::ZERO,
                        Some(Some(false)) => Duration::from_secs(30),
                        _ => Duration::from_secs(2),
                    };
                    if !self.ended.wait(wait) {
                        self.force_stop();
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.ended.wait(Duration::from_secs(30));
                }
                Err(e) => {
                    // Busy: detach now, so the path is free at once.
                    match sys::unmount_any(&path, true) {
                        Ok(()) => {}
                        Err(e2) if e2.raw_os_error() == Some(libc::EINVAL) => {}
                        Err(_) => return Err(Error::Unmount { path, source: e }),
                    }
                    self.force_stop();
                }
            }
        }
        self.record.take();
        Ok(())
    }

    /// Cuts the connection so that whoever still uses the (detached)
    /// filesystem gets errors instead of waiting forever; the session's
    /// next read of `/dev/fuse` fails and it ends.
    fn force_stop(&mut self) {
        if let Some(conn) = self.conn {
            sys::abort_fuse_connection(conn);
        }
        self.ended.wait(Duration::from_secs(30));
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        let _ = self.unmount_now();
    }
}
