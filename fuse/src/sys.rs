//! Thin wrappers over the system calls and kernel files this crate needs:
//! mount tables, unmounting, overlay mounts, xattrs, process liveness.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs with uid 0 (in its user namespace).
pub(crate) fn is_root() -> bool {
    euid() == 0
}

fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub(crate) struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// `st_dev` minor number; names the FUSE connection in fusectl.
    pub minor: u32,
    /// `major:minor`, the name of the mount's backing device in sysfs.
    pub dev: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Every mount visible to this process.
pub(crate) fn mounts() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount_point options [optional…] - fstype source super_options
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || sep + 1 >= fields.len() {
            continue;
        }
        let minor = fields[2]
            .split(':')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(fields[4])),
            fstype: fields[sep + 1].to_owned(),
            minor,
            dev: fields[2].to_owned(),
        });
    }
    Ok(out)
}

/// The mount whose mount point is exactly `path` (the last one, when stacked).
pub(crate) fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Mount points strictly below `dir`.
pub(crate) fn mounts_below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != dir && p.starts_with(dir))
        .collect())
}

/// Whether `path` is a FUSE mount whose server is gone (`ENOTCONN`).
///
/// Asks with `statfs`, which FUSE never answers from a cache (a `stat` may be
/// served from attributes cached before the server died).
pub(crate) fn is_disconnected(path: &Path) -> bool {
    let Ok(c) = cstr(path.as_os_str()) else {
        return false;
    };
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid path and `buf` has room for one statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// `umount2(2)`; `lazy` detaches even when busy.
pub(crate) fn umount(path: &Path, lazy: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts a FUSE mount as an ordinary user, through `fusermount3 -u`.
pub(crate) fn fusermount_unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u").arg("-q");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(path).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    if msg.contains("not found in")
        || msg.contains("not mounted")
        || msg.contains("Invalid argument")
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Err(io::Error::other(format!("fusermount3 -u: {}", msg.trim())))
}

/// Unmounts any mount at `path`: `umount2` as root, `fusermount3` otherwise.
/// `EINVAL` means nothing is mounted there.
pub(crate) fn unmount_any(path: &Path, lazy: bool) -> io::Result<()> {
    if is_root() {
        umount(path, lazy)
    } else {
        fusermount_unmount(path, lazy)
    }
}

/// Unmounts `path` if it is mounted: plainly first, lazily when busy.
/// Returns whether something was unmounted.
pub(crate) fn unmount_if_mounted(path: &Path) -> io::Result<bool> {
    if mount_at(path)?.is_none() {
        return Ok(false);
    }
    match unmount_any(path, false) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            unmount_any(path, true)?;
            Ok(true)
        }
        Err(e) => {
            // A dead FUSE server can make a plain unmount fail oddly; detach.
            unmount_any(path, true).map_err(|_| e)?;
            Ok(true)
        }
    }
}

/// Aborts a FUSE connection through fusectl, so that requests pending on a
/// lazily detached mount fail instead of hanging. Best effort: `false` when
/// fusectl is not mounted and cannot be.
pub(crate) fn abort_fuse_connection(minor: u32) -> bool {
    let root = Path::new("/sys/fs/fuse/connections");
    let dir = root.join(minor.to_string());
    if !dir.exists() && is_root() {
        // fusectl is often not mounted; mounting it is harmless.
        let _ = mount_fs("fusectl", root, "fusectl", "");
    }
    std::fs::write(dir.join("abort"), b"1").is_ok()
}

/// Whether the FUSE connection `minor` still exists, per fusectl; `None`
/// when fusectl is not mounted (nothing can be known).
pub(crate) fn fuse_connection_alive(minor: u32) -> Option<bool> {
    let root = Path::new("/sys/fs/fuse/connections");
    if root.join(minor.to_string()).exists() {
        return Some(true);
    }
    let mounted = mount_at(root)
        .ok()
        .flatten()
        .is_some_and(|m| m.fstype == "fusectl");
    mounted.then_some(false)
}

/// Sets the read-ahead of a mount's backing device (`/sys/class/bdi/DEV`).
/// Best effort: only root may, and only where sysfs is writable.
pub(crate) fn set_read_ahead_kib(dev: &str, kib: u32) -> bool {
    std::fs::write(
        format!("/sys/class/bdi/{dev}/read_ahead_kb"),
        kib.to_string(),
    )
    .is_ok()
}

/// `mount(2)` of a filesystem with a data string.
pub(crate) fn mount_fs(source: &str, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    mount_fs_flags(source, target, fstype, 0, data)
}

/// `mount(2)` with mount flags (`MS_RDONLY`…) and a data string.
pub(crate) fn mount_fs_flags(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let src = cstr(OsStr::new(source))?;
    let tgt = cstr(target.as_os_str())?;
    let ty = cstr(OsStr::new(fstype))?;
    let data = cstr(OsStr::new(data))?;
    // SAFETY: all pointers are valid NUL-terminated strings during the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)` (linux/fuse.h).
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// Closes the backing id `id` registered on the FUSE device `dev`.
pub(crate) fn fuse_backing_close(dev: std::os::fd::BorrowedFd<'_>, id: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the ioctl reads one u32 through a pointer valid during the call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE,
            &id as *const u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The value of an extended attribute, without following symlinks;
/// `None` when the file has no such attribute or the filesystem has none.
pub(crate) fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let p = cstr(path.as_os_str())?;
    let n = cstr(OsStr::new(name))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes; the strings are NUL-terminated.
        let rc = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if rc >= 0 {
            buf.truncate(rc as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// The start time of a process (field 22 of `/proc/PID/stat`, in clock
/// ticks since boot): with the pid, it names one process even across pid reuse.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After `)`: field 3 (state) is index 0, so field 22 is index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` started at `start_time` is still running
/// (a zombie is not: it only waits to be reaped).
pub(crate) fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return false;
    }
    match process_start_time(pid) {
        None => false,
        Some(t) => start_time.is_none_or(|s| s == t),
    }
}

/// Whether `program` is an executable file on `$PATH`.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `/etc/fuse.conf` lets ordinary users pass `allow_other`.
pub(crate) fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|s| {
        s.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| l == "user_allow_other")
    })
}

fn accessible_rw(p: &Path) -> bool {
    match cstr(p.as_os_str()) {
        // SAFETY: a valid NUL-terminated path.
        Ok(c) => unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 },
        Err(_) => false,
    }
}

/// Why FUSE mounts cannot work for this process, or `None` when they can.
pub(crate) fn fuse_problem() -> Option<String> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Some("`/dev/fuse` does not exist; load the module with `modprobe fuse` (or pass `--device /dev/fuse` to a container)".into());
    }
    if is_root() {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            return Some(format!("`/dev/fuse` cannot be opened ({e}); a container needs `--device /dev/fuse --cap-add SYS_ADMIN`"));
        }
        None
    } else if find_program("fusermount3").is_none() {
        Some("`fusermount3` is not on PATH; install the `fuse3` package".into())
    } else if !accessible_rw(dev) {
        // fusermount3 opens the device with the user's rights.
        Some("`/dev/fuse` is not readable and writable by this user; distributions make it mode 0666 (`chmod 0666 /dev/fuse` as root)".into())
    } else {
        None
    }
}

/// Takes a write lease on the file open as `f`. The kernel grants it only
/// when no other open file (in any process, mappings included) refers to
/// the file, and while it is held an `open` or `truncate` by anyone else
/// waits: the bytes cannot change under the holder. Refused (false) when
/// the file is in use, owned by another user without CAP_LEASE, or on a
/// filesystem without leases.
pub(crate) fn take_write_lease(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    quiet_lease_breaks();
    // SAFETY: fcntl on a descriptor `f` keeps open for the call.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) == 0 }
}

/// Gives a lease back (closing the file does too).
pub(crate) fn release_lease(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    unsafe {
        libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK);
    }
}

/// Someone opening a leased file makes the kernel send the holder SIGIO,
/// whose default action ends the process. A lease is held for the moment
/// of hashing and moving one file; the opener just waits until it is given
/// back. So SIGIO gets a handler that does nothing, unless the program set
/// one of its own. (A handler, not SIG_IGN: an ignored signal would stay
/// ignored in every program the engine starts.)
fn quiet_lease_breaks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn nothing(_: libc::c_int) {}
    ONCE.call_once(|| {
        // SAFETY: sigaction with zeroed, then filled, plain-data structs;
        // the handler is async-signal-safe (it does nothing).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGIO, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                return;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGIO, &act, std::ptr::null_mut());
        }
    });
}
