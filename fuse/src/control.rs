//! Unmounting by path, for `ci umount`, and the small process plumbing
//! `ci mount --background` needs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{state, sys, Error, Result};

/// What [`unmount_path`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// The process serving the mount was asked to stop (SIGTERM) and did.
    Stopped { pid: u32 },
    /// The mount was unmounted directly (its process was gone, or it was not
    /// a Strata mount).
    Direct { stale: bool },
}

/// Unmounts whatever is mounted at `dir`.
///
/// A `ci mount` serving it (a live record made with
/// [`crate::MountOptions::stop_on_sigterm`]) is sent SIGTERM and waited for, so
/// it exits cleanly; anything else is unmounted directly, lazily when busy.
/// A stale mount (its server died) is cleared the same way. Fails with
/// [`Error::NotMounted`] when nothing is mounted at `dir`.
pub fn unmount_path(dir: &Path) -> Result<Unmounted> {
    let abs = absolute(dir)?;
    let stale = sys::is_disconnected(&abs);
    if let Some(owner) = state::owner_of(&abs)? {
        if owner.stop_on_sigterm && owner.pid != std::process::id() {
            // SAFETY: kill has no memory-safety preconditions.
            if unsafe { libc::kill(owner.pid as libc::pid_t, libc::SIGTERM) } == 0
                && wait_exit(owner.pid, owner.start_time, Duration::from_secs(30))
                && sys::mount_at(&abs)
                    .map_err(Error::io("read", "/proc/self/mountinfo"))?
                    .is_none()
            {
                return Ok(Unmounted::Stopped { pid: owner.pid });
            }
        }
    }
    match sys::unmount_if_mounted(&abs) {
        Ok(true) => {
            // A record whose process is gone is now fully cleaned.
            let _ = state::cleanup_stale();
            Ok(Unmounted::Direct { stale })
        }
        Ok(false) => Err(Error::NotMounted {
            path: dir.to_owned(),
        }),
        Err(source) => Err(Error::Unmount {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// An absolute path without resolving the last component (a stale mount
/// point cannot be resolved: `stat` fails with ENOTCONN).
fn absolute(dir: &Path) -> Result<PathBuf> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = std::fs::canonicalize(parent).map_err(Error::io("resolve", parent))?;
    Ok(match dir.file_name() {
        Some(name) => parent.join(name),
        None => parent,
    })
}

/// Waits until process `pid` exits; `false` when the limit passed first.
fn wait_exit(pid: u32, start_time: Option<u64>, limit: Duration) -> bool {
    // A pidfd becomes readable when the process exits: no polling loop.
    // SAFETY: plain syscall; a negative result is an error, checked below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd >= 0 {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd; `fd` is ours and closed once.
        let rc = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
        unsafe { libc::close(fd) };
        return rc > 0;
    }
    // No pidfd (old kernel): check now and then.
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if !sys::process_alive(pid, start_time) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Points stdin, stdout and stderr at `/dev/null`: for a process that keeps
/// serving a mount after the command that started it has returned.
pub fn detach_stdio() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(Error::io("open", "/dev/null"))?;
    for fd in 0..3 {
        // SAFETY: both descriptors are valid; dup2 replaces `fd` atomically.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(Error::io("redirect standard streams to", "/dev/null")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}
