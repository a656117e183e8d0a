//! The sandbox helper: `ci __sandbox-helper`, run once per run (and
//! network setting) inside a bubblewrap sandbox that made the base its
//! tasks share (the host's tools read-only, `/dev`, an empty network
//! namespace or the host's, IPC and UTS namespaces, no view of the store).
//! It makes `/` and `/dev` read-only first. Single-threaded: it forks.
//!
//! For each [`Start`] it clones a child into new mount, PID and IPC
//! namespaces. That child, PID 1 of its namespace (the task's init):
//! mounts a fresh `/ci` holding the task's directories (the detached mounts
//! `ci` sent, already read-only where they must be), a fresh `/tmp`,
//! `/dev/shm` and `/proc`; forks the command as PID 2 in a session of its
//! own, without capabilities; reaps whatever is orphaned to it; and when
//! the command ends, writes its wait status to the helper and exits, which
//! ends the PID namespace and everything left in it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::wire::{self, Reply, Start};

/// The control socket, as `ci` passes it.
pub(crate) const CONTROL_FD: RawFd = 3;
/// In the task's init: the pipe to the helper (close-on-exec for the command).
const STATUS_FD: RawFd = 3;

struct Task {
    /// `None` once `ci` closed its end (the task is being killed).
    sock: Option<OwnedFd>,
    init: libc::pid_t,
    pidfd: OwnedFd,
    status: OwnedFd,
}

/// Runs the helper on the control socket [`CONTROL_FD`] until `ci` closes
/// it; returns the process's exit code.
pub(crate) fn main() -> u8 {
    // SAFETY: `ci` gave this process descriptor 3 as its control socket.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // Nothing mounted in a task's namespace comes back here or goes to a
    // sibling: every copy of this namespace starts private.
    // The base root and `/dev` are read-only: no task leaves anything in
    // them for another.
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
    let made = mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .and_then(|()| mount(None, "/", None, ro | libc::MS_NODEV, None))
        .and_then(|()| mount(None, "/dev", None, ro, None));
    if let Err(e) = made {
        eprintln!("sandbox helper: {e}");
        return 1;
    }
    if wire::send(control.as_fd(), wire::READY, &[]).is_err() {
        return 1;
    }
    let mut tasks: Vec<Task> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let mut polled = vec![libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for t in &tasks {
            polled.push(libc::pollfd {
                fd: t.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            polled.push(libc::pollfd {
                // A negative descriptor is skipped by poll.
                fd: t.sock.as_ref().map_or(-1, |s| s.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `polled` is a live array of the length given.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return 1;
        }
        // Tasks first, from the last, so removing one keeps the indices.
        for i in (0..tasks.len()).rev() {
            let (exited, asked) = (polled[1 + 2 * i].revents, polled[2 + 2 * i].revents);
            if asked != 0 {
                on_request(&mut tasks[i], &mut buf);
            }
            if exited != 0 {
                let t = tasks.swap_remove(i);
                finish(t);
            }
        }
        if polled[0].revents != 0 {
            match wire::recv(control.as_fd(), &mut buf) {
                Ok(Some(fds)) => {
                    if let Some(t) = start(&buf, fds) {
                        tasks.push(t);
                    }
                }
                // `ci` is gone: so are its tasks.
                Ok(None) | Err(_) => {
                    for t in &tasks {
                        kill(t.init, libc::SIGKILL);
                    }
                    return 0;
                }
            }
        }
    }
}

/// `term` signals the command's session; `kill` (or `ci` closing the
/// task's socket) ends the init and with it the PID namespace.
fn on_request(t: &mut Task, buf: &mut Vec<u8>) {
    let Some(sock) = &t.sock else { return };
    match wire::recv(sock.as_fd(), buf) {
        Ok(Some(_)) if buf.as_slice() == wire::TERM => match first_child(t.init) {
            // SAFETY: killpg only sends a signal.
            Some(c) => unsafe {
                libc::killpg(c, libc::SIGTERM);
            },
            None => kill(t.init, libc::SIGKILL),
        },
        Ok(Some(_)) => kill(t.init, libc::SIGKILL),
        Ok(None) | Err(_) => {
            kill(t.init, libc::SIGKILL);
            t.sock = None;
        }
    }
}

/// Reaps an ended init and tells `ci` how its command ended.
fn finish(t: Task) {
    let mut status = 0;
    // SAFETY: waitpid on our own child, which has exited (its pidfd said so).
    unsafe { libc::waitpid(t.init, &mut status, 0) };
    let mut said = [0u8; 4096];
    // SAFETY: read into a live buffer; the init wrote before it exited.
    let n = unsafe { libc::read(t.status.as_raw_fd(), said.as_mut_ptr().cast(), said.len()) };
    let said = &said[..n.max(0) as usize];
    let reply = match said.split_first() {
        Some((b'S', s)) if s.len() == 4 => {
            Reply::Ended(i32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        }
        Some((b'E', msg)) => {
            let msg = msg.split(|b| *b == 0).next().unwrap_or_default();
            Reply::Failed(String::from_utf8_lossy(msg).into_owned())
        }
        // Killed before its command ended (a timeout): the init's own status.
        _ => Reply::Ended(status),
    };
    if let Some(sock) = &t.sock {
        if let Ok(bytes) = serde_json::to_vec(&reply) {
            let _ = wire::send(sock.as_fd(), &bytes, &[]);
        }
    }
}

/// Starts one task; `None` when it could not (said on its socket, if any).
fn start(msg: &[u8], mut fds: Vec<OwnedFd>) -> Option<Task> {
    let sock = (!fds.is_empty()).then(|| fds.remove(0))?;
    let fail = |why: String| {
        if let Ok(bytes) = serde_json::to_vec(&Reply::Failed(why)) {
            let _ = wire::send(sock.as_fd(), &bytes, &[]);
        }
    };
    let start: Start = match serde_json::from_slice(msg) {
        Ok(s) => s,
        Err(e) => {
            fail(format!("The sandbox helper got a bad request: {e}"));
            return None;
        }
    };
    if fds.len() != 2 + start.mounts.len() {
        fail("The sandbox helper got the wrong number of descriptors".into());
        return None;
    }
    let prepared = match Prepared::new(&start) {
        Ok(p) => p,
        Err(e) => {
            fail(format!("Cannot start `{}`: {e}", start.program));
            return None;
        }
    };
    let (status_r, status_w) = match wire::pipe() {
        Ok(p) => p,
        Err(e) => {
            fail(format!("The sandbox helper cannot make a pipe: {e}"));
            return None;
        }
    };
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::SIGCHLD;
    // SAFETY: a fork-like clone (no new stack) of a single-threaded process:
    // the child runs on a copy of this one and never returns from `init`.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        let why = init(&start, &prepared, &fds, status_w.as_raw_fd());
        report(STATUS_FD, b'E', why.as_bytes());
        // SAFETY: ends the child without running this process's destructors.
        unsafe { libc::_exit(127) };
    }
    if pid < 0 {
        fail(format!(
            "The sandbox helper cannot make namespaces: {}",
            io::Error::last_os_error()
        ));
        return None;
    }
    let pid = pid as libc::pid_t;
    drop(status_w);
    // A process of the task that still holds the pipe must not block the
    // helper's read when the init said nothing.
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(status_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    drop(fds);
    // SAFETY: pidfd_open of our own unreaped child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        kill(pid, libc::SIGKILL);
        // SAFETY: reaps the child just killed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        fail(format!(
            "The sandbox helper cannot watch a task: {}",
            io::Error::last_os_error()
        ));
        return None;
    }
    Some(Task {
        sock: Some(sock),
        init: pid,
        // SAFETY: pidfd_open returned a new descriptor we own.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
        status: status_r,
    })
}

/// The command's strings as C wants them, made before the fork.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: CString,
}

impl Prepared {
    fn new(s: &Start) -> Result<Prepared, String> {
        let c = |s: &str| CString::new(s).map_err(|_| format!("`{s}` holds a NUL byte"));
        Ok(Prepared {
            program: c(&s.program)?,
            argv: s.argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
            env: s
                .env
                .iter()
                .map(|(k, v)| c(&format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            cwd: c(&s.cwd)?,
        })
    }
}

/// The task's init (PID 1 of its namespace): returns only with why it
/// failed before its command started.
fn init(s: &Start, p: &Prepared, fds: &[OwnedFd], status: RawFd) -> String {
    // SAFETY: prctl, dup2 and fcntl on this process: it dies with the
    // helper, and its status pipe takes the control socket's place.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::dup2(status, STATUS_FD);
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    if let Err(e) = mount_all(s, &fds[2..]) {
        return format!("Cannot make the sandbox: {e}");
    }
    // stdio from `ci`, the status pipe at 3, nothing else of the helper's.
    // SAFETY: dup2, open, fcntl and close_range on this process's own table.
    unsafe {
        libc::dup2(fds[0].as_raw_fd(), 1);
        libc::dup2(fds[1].as_raw_fd(), 2);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null >= 0 {
            libc::dup2(null, 0);
        }
        libc::syscall(
            libc::SYS_close_range,
            4 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
    }
    // SAFETY: chdir to a path we own as a C string.
    if unsafe { libc::chdir(p.cwd.as_ptr()) } < 0 {
        return format!("Cannot enter `{}`: {}", s.cwd, io::Error::last_os_error());
    }
    // SAFETY: fork in this single-threaded process; the child only execs.
    let command = unsafe { libc::fork() };
    if command == 0 {
        exec(s, p);
    }
    if command < 0 {
        return format!("Cannot fork: {}", io::Error::last_os_error());
    }
    // Reap everything orphaned to us until the command ends; returning
    // ends the namespace.
    loop {
        let mut st = 0;
        // SAFETY: waitpid into a live integer.
        let r = unsafe { libc::waitpid(-1, &mut st, 0) };
        if r == command {
            report(STATUS_FD, b'S', &st.to_ne_bytes());
            // SAFETY: ends the init; the kernel kills what is left in its namespace.
            unsafe { libc::_exit(0) };
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return format!("Lost track of `{}`", s.program);
        }
    }
}

/// The command (PID 2): a session of its own, no capabilities, no way to
/// gain any, default signal handling; then exec.
fn exec(s: &Start, p: &Prepared) -> ! {
    // SAFETY: these calls change only this process, which execs or exits.
    unsafe {
        libc::setsid();
        // Rust ignores SIGPIPE; an exec'd program must not inherit that.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
            let e = io::Error::last_os_error();
            report(
                STATUS_FD,
                b'E',
                format!("Cannot drop capabilities: {e}").as_bytes(),
            );
            libc::_exit(127);
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut env: Vec<*const libc::c_char> = p.env.iter().map(|a| a.as_ptr()).collect();
        env.push(std::ptr::null());
        libc::execve(p.program.as_ptr(), argv.as_ptr(), env.as_ptr());
        let e = io::Error::last_os_error();
        report(
            STATUS_FD,
            b'E',
            format!("Cannot start `{}`: {e}", s.program).as_bytes(),
        );
        libc::_exit(127)
    }
}

/// The task's filesystem: `/ci` with its directories, then a private
/// `/tmp`, `/dev/shm` and a `/proc` of its own PID namespace.
fn mount_all(s: &Start, mounts: &[OwnedFd]) -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    // The helper's own executable is not the task's business.
    let exe = cstr(super::HELPER_EXE)?;
    // SAFETY: umount2 of a path we own as a C string.
    if unsafe { libc::umount2(exe.as_ptr(), libc::MNT_DETACH) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unmount `{}`: {e}", super::HELPER_EXE),
        ));
    }
    mount(
        Some("tmpfs"),
        "/ci",
        Some("tmpfs"),
        nosuid,
        Some("mode=0755"),
    )?;
    for (m, fd) in s.mounts.iter().zip(mounts) {
        let target = format!("/ci/{}", m.name);
        if m.file {
            std::fs::File::create(&target)?;
        } else {
            std::fs::create_dir(&target)?;
        }
        let at = cstr(&target)?;
        // SAFETY: move_mount of a detached mount we hold onto a path we made.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                at.as_ptr(),
                0x4u32, // MOVE_MOUNT_F_EMPTY_PATH
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("mount `{target}`: {e}")));
        }
    }
    mount(
        None,
        "/ci",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nosuid,
        None,
    )?;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        nosuid,
        Some("mode=1777"),
    )?;
    if std::path::Path::new("/dev/shm").is_dir() {
        mount(
            Some("tmpfs"),
            "/dev/shm",
            Some("tmpfs"),
            nosuid,
            Some("mode=1777"),
        )?;
    }
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nosuid | libc::MS_NOEXEC,
        None,
    )?;
    Ok(())
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::other(format!("`{s}` holds a NUL byte")))
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let t = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a live C string or null.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            t.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount `{target}`: {e}")));
    }
    Ok(())
}

/// Writes `tag` and `body` to the helper in one write (a pipe write of
/// under 4 KiB is atomic); an error (`E`) ends with a NUL, as the init's
/// status may follow it.
fn report(fd: RawFd, tag: u8, body: &[u8]) {
    let mut msg = Vec::with_capacity(2 + body.len());
    msg.push(tag);
    msg.extend_from_slice(&body[..body.len().min(4000)]);
    if tag == b'E' {
        msg.push(0);
    }
    // SAFETY: write from a live buffer.
    unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
}

fn kill(pid: libc::pid_t, sig: i32) {
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pid, sig) };
}

/// The first child of `pid` (`/proc/<pid>/task/<pid>/children`), if any.
fn first_child(pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}
