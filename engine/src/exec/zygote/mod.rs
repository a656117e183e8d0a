//! One sandbox for a whole build, forking a cheap one per task: the
//! *zygote*.
//!
//! bubblewrap made each task's sandbox from nothing: new namespaces, some
//! fifteen mounts, its own exec and two forks, ~4 ms of CPU per task
//! (docs/BENCHMARKS.md, "Host sandboxes"). Here bubblewrap runs once per
//! build, making the base all tasks share (the host's tools read-only,
//! `/dev`, one empty network namespace or the host's, IPC and UTS
//! namespaces, the store hidden), and execs `ci __sandbox-helper` in it ([`helper`]). Per task,
//! `ci` clones the task's directories as detached mounts (`open_tree`),
//! read-only where they must be, and sends them with the command, its
//! environment and its stdout and stderr over a Unix socket; the helper
//! forks the task into new mount, PID and IPC namespaces where they are
//! its `/ci`. The helper never sees the store or the run's scratch: what it
//! gets is what the task gets.
//!
//! A run has up to two helpers: one whose tasks share an empty network
//! namespace, one for tasks with `network = True`, which share the host's.
//! Needs `ci` to be root (cloning a mount needs `CAP_SYS_ADMIN` where `ci`
//! runs); otherwise tasks get a bubblewrap sandbox of their own, as before.

pub(crate) mod helper;
mod wire;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::{pump, ExecOutcome, ExecRequest};
use crate::events::Stream;
pub(crate) use wire::{Mount, Start, MAX_MESSAGE};

/// The argument that makes `ci` the helper (see [`helper_if_asked`]).
pub const HELPER_ARG: &str = "__sandbox-helper";
/// Where the helper's executable (`ci` itself) is in its sandbox.
pub(crate) const HELPER_EXE: &str = "/.ci-sandbox-helper";
/// How long the helper gets to say it has started.
const START_WAIT: Duration = Duration::from_secs(30);

/// Runs the sandbox helper when this process was started as one (`ci
/// __sandbox-helper`), returning its exit code; `None` otherwise. The `ci`
/// binary calls it first thing, before it makes any thread.
pub fn helper_if_asked() -> Option<u8> {
    let asked = std::env::args_os().nth(1);
    (asked.as_deref() == Some(OsStr::new(HELPER_ARG))).then(helper::main)
}

/// A running helper.
pub(crate) struct Zygote {
    control: AsyncFd<OwnedFd>,
    /// The store and scratch it hides (a helper serves one run's tasks).
    private: Vec<PathBuf>,
    /// Whether its tasks have the host's network (else one empty network
    /// namespace they share).
    network: bool,
    /// Set when the helper went away: the next task starts another.
    lost: AtomicBool,
    /// bubblewrap, killed with this.
    _child: tokio::process::Child,
}

/// The running helpers: one per run (a server runs several at once).
static CURRENT: tokio::sync::Mutex<Vec<Arc<Zygote>>> = tokio::sync::Mutex::const_new(Vec::new());
/// Why no helper can run in this process, once found.
static REFUSED: OnceLock<String> = OnceLock::new();

/// The helper for tasks whose private directories are `private`, with the
/// host's network or without, started through `bwrap` with `args` (then
/// `--`) on first use; `Err` says why there can be none (tasks then get a
/// bubblewrap sandbox each).
pub(crate) async fn zygote(
    bwrap: &Path,
    args: impl FnOnce(&Path) -> Vec<std::ffi::OsString>,
    private: &[PathBuf],
    network: bool,
) -> Result<Arc<Zygote>, String> {
    if let Some(why) = REFUSED.get() {
        return Err(why.clone());
    }
    let mut current = CURRENT.lock().await;
    let usable = |z: &Arc<Zygote>| {
        z.private == private && z.network == network && !z.lost.load(Ordering::Relaxed)
    };
    if let Some(z) = current.iter().find(|z| usable(z)) {
        return Ok(z.clone());
    }
    // Helpers of ended runs (or lost ones) that no task holds any more go.
    current.retain(|z| Arc::strong_count(z) > 1 && !z.lost.load(Ordering::Relaxed));
    match Zygote::start(bwrap, args, private, network).await {
        Ok(z) => {
            let z = Arc::new(z);
            current.push(z.clone());
            Ok(z)
        }
        Err(why) => Err(REFUSED.get_or_init(|| why).clone()),
    }
}

impl Zygote {
    async fn start(
        bwrap: &Path,
        args: impl FnOnce(&Path) -> Vec<std::ffi::OsString>,
        private: &[PathBuf],
        network: bool,
    ) -> Result<Zygote, String> {
        // SAFETY: geteuid has no failure mode.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "`ci` is not root, so it cannot pass a task its directories as mounts".into(),
            );
        }
        let exe = std::env::current_exe()
            .map_err(|e| format!("`ci` cannot find its own executable ({e})"))?;
        if !exe.is_file() {
            return Err(format!("`ci`'s executable `{}` is gone", exe.display()));
        }
        // A kernel without the mount API (before 5.2) says so here.
        detach(Path::new("/"), true)
            .map_err(|e| format!("this kernel cannot pass mounts (`open_tree`: {e})"))?;
        let (mine, theirs) =
            wire::socket_pair().map_err(|e| format!("cannot make a socket pair ({e})"))?;
        let mut cmd = tokio::process::Command::new(bwrap);
        cmd.args(args(&exe))
            .arg("--")
            .arg(HELPER_EXE)
            .arg(HELPER_ARG)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let fd = theirs.as_raw_fd();
        // SAFETY: close_range, dup2 and fcntl are async-signal-safe and
        // touch only the child's descriptor table: it keeps stdio and the
        // control socket, as descriptor 3, and nothing else of `ci`.
        unsafe {
            cmd.pre_exec(move || {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                );
                if fd == helper::CONTROL_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                } else if libc::dup2(fd, helper::CONTROL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("`{}` does not run ({e})", bwrap.display()))?;
        drop(theirs);
        let control = nonblocking(mine).map_err(|e| format!("cannot watch a socket ({e})"))?;
        let mut buf = Vec::new();
        let ready = tokio::time::timeout(START_WAIT, recv(&control, &mut buf)).await;
        if matches!(ready, Ok(Some(_))) && buf == wire::READY {
            return Ok(Zygote {
                control,
                private: private.to_vec(),
                network,
                lost: AtomicBool::new(false),
                _child: child,
            });
        }
        let _ = child.start_kill();
        let mut said = String::new();
        if let Some(mut err) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ =
                tokio::time::timeout(Duration::from_secs(5), err.read_to_string(&mut said)).await;
        }
        Err(format!(
            "the sandbox helper did not start ({})",
            match said.trim() {
                "" => "it said nothing",
                s => s,
            }
        ))
    }

    /// Runs one task: `start` names its mounts, one per entry of `dirs`
    /// (host path, read-only). The outcome is the command's own.
    pub(crate) async fn run(
        &self,
        start: Start,
        dirs: Vec<(PathBuf, bool)>,
        req: &ExecRequest,
        grace: Duration,
    ) -> ExecOutcome {
        let program = start.program.clone();
        let failed = |msg: String| {
            req.log.line(Stream::Stderr, msg.as_bytes());
            ExecOutcome {
                spawn_error: Some(msg),
                ..ExecOutcome::default()
            }
        };
        // Cloning a mount may look a path up in the run's FUSE mount, which
        // this process serves: not on a runtime thread.
        let mounts = tokio::task::spawn_blocking(move || {
            dirs.iter()
                .map(|(p, ro)| {
                    detach(p, *ro)
                        .map_err(|e| format!("Cannot pass `{}` to the sandbox: {e}", p.display()))
                })
                .collect::<Result<Vec<OwnedFd>, String>>()
        })
        .await;
        let mounts = match mounts {
            Ok(Ok(m)) => m,
            Ok(Err(msg)) => return failed(msg),
            Err(e) => return failed(format!("Cannot pass the task's directories: {e}")),
        };
        let made =
            (|| -> io::Result<_> { Ok((wire::socket_pair()?, wire::pipe()?, wire::pipe()?)) })();
        let ((sock, theirs), (out_r, out_w), (err_r, err_w)) = match made {
            Ok(m) => m,
            Err(e) => return failed(format!("Cannot start `{program}`: {e}")),
        };
        let bytes = match serde_json::to_vec(&start) {
            Ok(b) => b,
            Err(e) => return failed(format!("Cannot start `{program}`: {e}")),
        };
        let mut fds: Vec<RawFd> = vec![theirs.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        fds.extend(mounts.iter().map(|m| m.as_raw_fd()));
        if let Err(e) = self.send(&bytes, &fds).await {
            self.lost.store(true, Ordering::Relaxed);
            return failed(format!(
                "The sandbox helper is gone ({e}); `{program}` did not start"
            ));
        }
        drop((theirs, out_w, err_w, mounts));
        let sock = match nonblocking(sock) {
            Ok(s) => s,
            Err(e) => return failed(format!("Cannot watch `{program}`: {e}")),
        };
        let pumps: Vec<_> = [(out_r, Stream::Stdout), (err_r, Stream::Stderr)]
            .into_iter()
            .filter_map(|(fd, stream)| {
                let r = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok()?;
                Some(tokio::spawn(pump(r, stream, req.log.clone())))
            })
            .collect();
        let mut buf = Vec::new();
        let timeout = async {
            match req.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut outcome = ExecOutcome::default();
        let ended = tokio::select! {
            r = recv(&sock, &mut buf) => Some(r),
            _ = timeout => { outcome.timed_out = true; None }
            _ = req.cancel.cancelled() => { outcome.cancelled = true; None }
        };
        let ended = match ended {
            Some(r) => r,
            None => {
                // SIGTERM to the command's session and a grace period, then
                // the end of its PID namespace: everything it started goes.
                let _ = send_now(&sock, wire::TERM);
                match tokio::time::timeout(grace, recv(&sock, &mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = send_now(&sock, wire::KILL);
                        recv(&sock, &mut buf).await
                    }
                }
            }
        };
        let reply = ended.and_then(|_| serde_json::from_slice::<wire::Reply>(&buf).ok());
        drop(sock);
        for h in pumps {
            let _ = h.await;
        }
        match reply {
            Some(wire::Reply::Ended(status)) => {
                if libc::WIFEXITED(status) {
                    outcome.exit_code = Some(libc::WEXITSTATUS(status));
                } else if libc::WIFSIGNALED(status) {
                    outcome.signal = Some(libc::WTERMSIG(status));
                }
            }
            Some(wire::Reply::Failed(msg)) => {
                req.log.line(Stream::Stderr, msg.as_bytes());
                outcome.spawn_error = Some(msg);
            }
            None => {
                self.lost.store(true, Ordering::Relaxed);
                let msg = format!("Lost track of `{program}`: the sandbox helper is gone");
                req.log.line(Stream::Stderr, msg.as_bytes());
                outcome.spawn_error = Some(msg);
            }
        }
        outcome
    }

    async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        loop {
            let mut ready = self.control.writable().await?;
            match ready.try_io(|c| wire::send(c.get_ref().as_fd(), bytes, fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One message from `sock` into `buf`; `None` at its end or on an error.
async fn recv(sock: &AsyncFd<OwnedFd>, buf: &mut Vec<u8>) -> Option<()> {
    loop {
        let mut ready = sock.readable().await.ok()?;
        match ready.try_io(|s| wire::recv(s.get_ref().as_fd(), buf)) {
            Ok(Ok(Some(_))) => return Some(()),
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            Err(_would_block) => continue,
        }
    }
}

/// Sends a short request on a task's socket (its buffer is never full).
fn send_now(sock: &AsyncFd<OwnedFd>, bytes: &[u8]) -> io::Result<()> {
    wire::send(sock.get_ref().as_fd(), bytes, &[])
}

fn nonblocking(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which closes it only
    // when dropped; nothing else holds or replaces it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into())
}

/// A detached copy of the mount tree at `path` (`open_tree`), with
/// `nosuid`, `nodev` and, when `read_only`, read-only throughout: it can
/// be mounted in another mount namespace, and nothing done there changes
/// the original.
fn detach(path: &Path, read_only: bool) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("the path holds a NUL byte"))?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE;
    // SAFETY: open_tree with a live C string; a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on our detached tree, with a live struct of the
    // size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH as libc::c_uint) | AT_RECURSIVE,
            &attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
