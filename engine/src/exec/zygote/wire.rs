//! What `ci` and its sandbox helper say to each other: one JSON datagram per
//! message over a `SOCK_SEQPACKET` socket, descriptors riding along as
//! `SCM_RIGHTS`.
//!
//! - On the control socket, `ci` sends a [`Start`] per task with the task's
//!   socket, its stdout and stderr, and one detached mount per directory; the
//!   helper sends [`READY`] once, when it has started.
//! - On a task's socket, `ci` sends [`TERM`] or [`KILL`]; the helper answers
//!   once with a [`Reply`]. `ci` closing its end kills the task.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// The longest message: a bigger command line and environment go to a
/// sandbox of their own (plain bubblewrap) instead.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one message carries (three plus five mounts).
const MAX_FDS: usize = 16;

pub(crate) const READY: &[u8] = b"ready";
pub(crate) const TERM: &[u8] = b"term";
pub(crate) const KILL: &[u8] = b"kill";

/// One task to start. Its descriptors, in order: the task's socket, stdout,
/// stderr, then one detached mount per entry of `mounts`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Start {
    /// The program, as an absolute path.
    pub program: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub mounts: Vec<Mount>,
}

/// Where a detached mount goes, under `/ci`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Mount {
    /// A name under `/ci` (`in`, `work`, `context`, `prev`, `prev-in`).
    pub name: String,
    /// A file (the context file), not a directory.
    pub file: bool,
}

/// How a task ended, said once on its socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The command ran; its wait status (as `waitpid` gives it).
    Ended(i32),
    /// The command could not start: why.
    Failed(String),
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` sockets.
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, owned from here.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just made and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, owned from here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just made and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message with `fds`. `WouldBlock` on a non-blocking socket
/// whose buffer is full.
pub(crate) fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let data = std::mem::size_of_val(fds) as u32;
    // u64 words keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_* compute sizes and offsets inside `control`, which
        // holds CMSG_SPACE(16 descriptors) bytes.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(data) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers; MSG_NOSIGNAL: no SIGPIPE.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf` (cleared first) and the descriptors that
/// came with it (close-on-exec). `Ok(None)` at end of stream (the other end
/// closed). A message longer than [`MAX_MESSAGE`] is an error.
pub(crate) fn recv(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<Option<Vec<OwnedFd>>> {
    buf.clear();
    buf.resize(MAX_MESSAGE, 0);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at live buffers of the sizes it says.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            buf.clear();
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_*
    // walk it without going past that.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    buf.truncate(n);
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("a message was cut short"));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(fds))
}
