//! The host executor: runs the command as a process on this machine, in
//! the task's prepared directories, in a sandbox of its own.
//!
//! The sandbox is bubblewrap (`bwrap`): new mount, PID, IPC, UTS and (unless
//! the task has `network = True`) network namespaces, every capability
//! dropped, and a root made of nothing but
//!
//! | in the sandbox                  | what                                     | mode       |
//! |---------------------------------|------------------------------------------|------------|
//! | `/usr`, `/bin`, `/lib`…, `/etc`, `/opt` | the host's                       | read-only  |
//! | `/dev`, `/proc`                 | a minimal `/dev`, the sandbox's own PIDs |            |
//! | `/tmp`                          | an empty tmpfs, gone with the task       | read-write |
//! | `/ci/in`                        | [`TaskDirs::inputs`]                     | read-only  |
//! | `/ci/work`                      | [`TaskDirs::work`]                       | read-write |
//! | `/ci/context`                   | [`TaskDirs::context`]                    | read-write |
//! | `/ci/prev`, `/ci/prev-in`       | [`TaskDirs::prev`], [`TaskDirs::prev_in`]| read-only  |
//!
//! so the store, the run's scratch and other tasks' directories do not
//! exist for it, and what it mounts or unmounts stays in its namespace. The
//! paths are the containers' ones: an output that embeds them does not
//! depend on where a machine keeps its store.
//!
//! Where `ci` is root, tasks get the same from the build's sandbox helpers
//! ([`super::zygote`]), for a fraction of a bubblewrap of their own; tasks
//! without the network then share one empty network namespace.
//!
//! Where bubblewrap is missing or cannot make namespaces, tasks run as
//! plain processes in the host's directories, as before the sandbox; every
//! build that runs a host task says so once ([`Isolation::Unsandboxed`]).
//!
//! [`TaskDirs::inputs`]: super::TaskDirs::inputs
//! [`TaskDirs::work`]: super::TaskDirs::work
//! [`TaskDirs::context`]: super::TaskDirs::context
//! [`TaskDirs::prev`]: super::TaskDirs::prev
//! [`TaskDirs::prev_in`]: super::TaskDirs::prev_in

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use super::{pump, zygote, ExecOutcome, ExecRequest, Executor, TaskDirs};
use crate::events::Stream;
use crate::BuildError;

/// PATH given to host tasks: the environment of `ci` does not leak in.
pub const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a task gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);
/// The host directories a sandbox shows (read-only), where they exist: the
/// tools, their libraries and their configuration.
const HOST_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];

/// Runs tasks as host processes.
#[derive(Clone, Debug, Default)]
pub struct HostExecutor;

/// How host tasks are isolated on this machine (found once per process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Each task in a bubblewrap sandbox, through this `bwrap`.
    Sandboxed(PathBuf),
    /// Plain processes: the reason, and what to do about it.
    Unsandboxed(String),
}

/// Where a successful probe is remembered ([`remember_probes_in`]).
static PROBE_CACHE: OnceLock<PathBuf> = OnceLock::new();

/// Remembers a successful probe in the directory `dir` (`ci` gives
/// `~/.cache/strata`), so that a build whose every task is cached does not
/// start a sandbox only to learn that it could: the probe is a `bwrap` run,
/// some 6 ms of a 1,000-task no-op build. Call before [`isolation`].
pub fn remember_probes_in(dir: PathBuf) {
    let _ = PROBE_CACHE.set(dir.join("sandbox-probe"));
}

/// How host tasks run here: finds `bwrap` on `ci`'s `PATH` and tries it once
/// (or trusts a remembered success, see [`probe_identity`]).
pub fn isolation() -> &'static Isolation {
    static ISOLATION: OnceLock<Isolation> = OnceLock::new();
    ISOLATION.get_or_init(probe)
}

/// What a probe's result depends on: the `bwrap` found (path, size,
/// modification time), the user, the boot, the user and mount namespaces
/// `ci` runs in, and the kernel's user-namespace settings. A remembered
/// success is trusted only while all of them are the same; a failure is
/// never remembered (it is probed again, and says why, every time).
fn probe_identity(bwrap: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(bwrap).ok()?;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let link = |p: &str| {
        std::fs::read_link(p)
            .map(|l| l.display().to_string())
            .unwrap_or_default()
    };
    Some(format!(
        "1 {} {} {} {} {} {} {} {} {} {}",
        bwrap.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() },
        read("/proc/sys/kernel/random/boot_id").trim(),
        link("/proc/self/ns/user"),
        link("/proc/self/ns/mnt"),
        read("/proc/sys/kernel/unprivileged_userns_clone").trim(),
        read("/proc/sys/user/max_user_namespaces").trim(),
    ))
}

fn probe() -> Isolation {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from(HOST_PATH));
    let Some(bwrap) = std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| is_executable(p))
    else {
        return Isolation::Unsandboxed(
            "`bwrap` is not installed; install bubblewrap (`apt install bubblewrap`)".into(),
        );
    };
    let remembered = PROBE_CACHE.get().zip(probe_identity(&bwrap));
    if let Some((file, id)) = &remembered {
        if std::fs::read_to_string(file).is_ok_and(|s| s == *id) {
            return Isolation::Sandboxed(bwrap);
        }
    }
    let found = try_bwrap(bwrap);
    if let (Isolation::Sandboxed(_), Some((file, id))) = (&found, remembered) {
        // Best effort, and atomic: a reader sees the whole line or none.
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
            if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
                if std::io::Write::write_all(&mut tmp, id.as_bytes()).is_ok() {
                    let _ = tmp.persist(file);
                }
            }
        }
    }
    found
}

/// Runs `bwrap` once with the namespaces every task gets.
fn try_bwrap(bwrap: PathBuf) -> Isolation {
    // The namespaces every task gets; a kernel or policy that refuses them
    // (no unprivileged user namespaces, a container without CAP_SYS_ADMIN)
    // fails here rather than in every task.
    let tried = std::process::Command::new(&bwrap)
        .args(["--unshare-all", "--die-with-parent", "--cap-drop", "ALL"])
        .args(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"])
        .args(["--", "/bin/sh", "-c", ":"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match tried {
        Ok(o) if o.status.success() => Isolation::Sandboxed(bwrap),
        Ok(o) => {
            let said = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            Isolation::Unsandboxed(format!(
                "`{}` cannot make namespaces here ({said}); run `ci` as root, or allow \
                 unprivileged user namespaces (`sysctl kernel.unprivileged_userns_clone=1`, \
                 and `kernel.apparmor_restrict_unprivileged_userns=0` where AppArmor restricts them)",
                bwrap.display()
            ))
        }
        Err(e) => Isolation::Unsandboxed(format!(
            "`{}` does not run ({e}); reinstall bubblewrap (`apt install bubblewrap`)",
            bwrap.display()
        )),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where a task's directories are, as the task sees them.
struct Seen {
    inputs: PathBuf,
    work: PathBuf,
    context: PathBuf,
    prev: Option<PathBuf>,
    prev_in: Option<PathBuf>,
}

impl Seen {
    fn host(dirs: &TaskDirs) -> Seen {
        Seen {
            inputs: dirs.inputs.clone(),
            work: dirs.work.clone(),
            context: dirs.context.clone(),
            prev: dirs.prev.clone(),
            prev_in: dirs.prev_in.clone(),
        }
    }

    fn sandbox(dirs: &TaskDirs) -> Seen {
        Seen {
            inputs: "/ci/in".into(),
            work: "/ci/work".into(),
            context: "/ci/context".into(),
            prev: dirs.prev.as_ref().map(|_| "/ci/prev".into()),
            prev_in: dirs.prev_in.as_ref().map(|_| "/ci/prev-in".into()),
        }
    }
}

/// bubblewrap's arguments for one task, up to the command.
fn sandbox_args(req: &ExecRequest, cwd: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    // The sandbox goes when `ci` does; `setsid` keeps the task off the
    // terminal `ci` may have (no TIOCSTI into the user's shell).
    for s in ["--die-with-parent", "--new-session", "--unshare-all"] {
        a.push(s.into());
    }
    if req.network {
        a.push("--share-net".into());
    }
    // Root in the sandbox is root without privileges: it cannot mount,
    // make devices, load modules, trace, or pass file permissions.
    for s in ["--cap-drop", "ALL"] {
        a.push(s.into());
    }
    host_root(&req.dirs.private, &mut a);
    for s in ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"] {
        a.push(s.into());
    }
    let dirs = &req.dirs;
    let mut bind = |how: &str, host: &Path, inside: &str| {
        a.push(how.into());
        a.push(host.into());
        a.push(inside.into());
    };
    bind("--ro-bind", &dirs.inputs, "/ci/in");
    bind("--bind", &dirs.work, "/ci/work");
    bind("--bind", &dirs.context, "/ci/context");
    if let Some(p) = &dirs.prev {
        bind("--ro-bind", p, "/ci/prev");
    }
    if let Some(p) = &dirs.prev_in {
        bind("--ro-bind", p, "/ci/prev-in");
    }
    a.push("--chdir".into());
    a.push(cwd.into());
    a.push("--".into());
    a
}

/// bubblewrap's arguments for a sandbox helper of a build (up to the
/// command): the base its tasks share, with its own IPC, UTS and PID
/// namespaces and, unless `network`, network namespace; capabilities kept
/// (it mounts each task's `/ci`), and `ci`'s executable `exe` to run.
fn helper_args(private: &[PathBuf], network: bool, exe: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if !network {
        a.push("--unshare-net".into());
    }
    for s in [
        "--die-with-parent",
        "--new-session",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-pid",
        "--unshare-cgroup-try",
        "--cap-add",
        "ALL",
    ] {
        a.push(s.into());
    }
    host_root(private, &mut a);
    for s in [
        "--dev", "/dev", "--proc", "/proc", "--dir", "/tmp", "--dir", "/ci",
    ] {
        a.push(s.into());
    }
    a.push("--ro-bind".into());
    a.push(exe.into());
    a.push(zygote::HELPER_EXE.into());
    a
}

/// The host's directories, read-only, with whatever of `private` (the
/// store, the run's scratch) lies under them hidden.
fn host_root(private: &[PathBuf], a: &mut Vec<OsString>) {
    let mut arg = |s: &dyn AsRef<std::ffi::OsStr>| a.push(s.as_ref().to_owned());
    for name in HOST_DIRS {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&host) {
                    arg(&"--symlink");
                    arg(&target);
                    arg(&host);
                }
            }
            Ok(m) if m.is_dir() => {
                arg(&"--ro-bind");
                arg(&host);
                arg(&host);
            }
            _ => {}
        }
    }
    // Whatever of the store or the run's scratch lies under those
    // directories is hidden under an empty read-only directory (the
    // outermost only: the scratch is inside the store).
    for p in private {
        let shown = HOST_DIRS
            .iter()
            .any(|d| p.starts_with(Path::new("/").join(d)));
        let inside_another = private.iter().any(|q| q != p && p.starts_with(q));
        if shown && !inside_another {
            for s in ["--perms", "0555", "--tmpfs"] {
                arg(&s);
            }
            arg(p);
            arg(&"--remount-ro");
            arg(p);
        }
    }
}

/// `program` as `execvp` would find it with [`HOST_PATH`], or `None`. The
/// sandbox shows the same directories, so a missing program is reported
/// like an unsandboxed one instead of as bubblewrap's failure.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    std::env::split_paths(HOST_PATH)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

#[async_trait::async_trait]
impl Executor for HostExecutor {
    fn name(&self) -> &'static str {
        "host"
    }

    /// `host/<os>-<arch>`, and `/sandbox` when tasks are sandboxed: the
    /// paths, `/tmp` and network a task sees differ, and so may its output.
    fn platform(&self) -> String {
        let base = format!("host/{}-{}", std::env::consts::OS, std::env::consts::ARCH);
        match isolation() {
            Isolation::Sandboxed(_) => format!("{base}/sandbox"),
            Isolation::Unsandboxed(_) => base,
        }
    }

    async fn resolve_image(&self, image: &str) -> Result<String, BuildError> {
        Err(BuildError::ImageNeedsDocker {
            image: image.to_owned(),
        })
    }

    async fn run(&self, req: ExecRequest) -> Result<ExecOutcome, BuildError> {
        let Some(program) = req.argv.first() else {
            return Ok(ExecOutcome {
                spawn_error: Some("the command is empty".into()),
                ..ExecOutcome::default()
            });
        };
        let bwrap = match isolation() {
            Isolation::Sandboxed(b) => Some(b),
            Isolation::Unsandboxed(why) => {
                req.log.warn_once(
                    "host-sandbox",
                    format!("host tasks are NOT sandboxed (a task can read and write the store and other tasks): {why}"),
                );
                None
            }
        };
        let seen = match bwrap {
            Some(_) => Seen::sandbox(&req.dirs),
            None => Seen::host(&req.dirs),
        };
        let dir = match &req.workdir {
            Some(w) => seen.work.join(w),
            None => seen.work.clone(),
        };
        let tmp = match bwrap {
            Some(_) => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let env = task_env(&req, &seen, &tmp);
        if let Some(b) = bwrap {
            let Some(found) = find_program(program) else {
                let msg = format!("Cannot start `{program}`: not found in {HOST_PATH}");
                req.log.line(Stream::Stderr, msg.as_bytes());
                return Ok(ExecOutcome {
                    spawn_error: Some(msg),
                    ..ExecOutcome::default()
                });
            };
            // Tasks share a sandbox helper (those without the network its
            // empty network namespace); a command line too long for one
            // message gets a sandbox of its own.
            let size: usize = req.argv.iter().map(String::len).sum::<usize>()
                + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
            if size < zygote::MAX_MESSAGE / 2 {
                let (private, net) = (&req.dirs.private, req.network);
                let args = |exe: &Path| helper_args(private, net, exe);
                match zygote::zygote(b, args, private, net).await {
                    Ok(z) => {
                        let (start, dirs) = zygote_start(&req, &found, &dir, &env);
                        return Ok(z.run(start, dirs, &req, GRACE).await);
                    }
                    Err(why) => req.log.warn_once(
                        "host-sandbox-helper",
                        format!("host tasks each start a sandbox of their own (some 4 ms a task): {why}"),
                    ),
                }
            }
        }
        let mut cmd = match bwrap {
            Some(b) => {
                let mut c = tokio::process::Command::new(b);
                c.args(sandbox_args(&req, &dir)).args(&req.argv);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(program);
                c.args(&req.argv[1..]).current_dir(&dir);
                c
            }
        };
        cmd.env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // A task inherits stdin, stdout and stderr only: descriptors this
        // process holds (the store's lock and index, `/dev/fuse` of its
        // mounts, a server's sockets) are marked close-on-exec in the child,
        // whether or not whoever opened them said so.
        // SAFETY: close_range is async-signal-safe and touches only the
        // child's descriptor table; an old kernel without it (ENOSYS)
        // leaves the descriptors as they were.
        unsafe {
            cmd.pre_exec(|| {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let what = match bwrap {
                    Some(b) => b.display().to_string(),
                    None => program.clone(),
                };
                let msg = format!("Cannot start `{what}`: {e}");
                req.log.line(Stream::Stderr, msg.as_bytes());
                return Ok(ExecOutcome {
                    spawn_error: Some(msg),
                    ..ExecOutcome::default()
                });
            }
        };
        let pid = child.id().map(|p| p as i32);
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, Stream::Stdout, req.log.clone())));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, Stream::Stderr, req.log.clone())));

        let timeout = async {
            match req.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut outcome = ExecOutcome::default();
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = timeout => { outcome.timed_out = true; None }
            _ = req.cancel.cancelled() => { outcome.cancelled = true; None }
        };
        let status = match status {
            Some(s) => s,
            None => {
                // The task's processes get SIGTERM and a grace period. In a
                // sandbox they are in the session of its init (bubblewrap's
                // child), not in the group of bubblewrap, which would go at
                // once and take the sandbox with it.
                let group = match bwrap {
                    Some(_) => pid.and_then(first_child),
                    None => pid,
                };
                signal_group(group, libc::SIGTERM);
                match tokio::time::timeout(GRACE, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        // Killing bubblewrap kills its init, which ends the
                        // PID namespace: the kernel kills everything in it,
                        // wherever it went (another session, a daemon).
                        signal_group(group, libc::SIGKILL);
                        signal_group(pid, libc::SIGKILL);
                        child.wait().await
                    }
                }
            }
        };
        // Whatever the command left running in its group goes too: no
        // process outlives its task, and the pipes close. (In a sandbox,
        // nothing is left: its PID namespace ended with its init.)
        signal_group(pid, libc::SIGKILL);
        for h in [out, err].into_iter().flatten() {
            let _ = h.await;
        }
        match status {
            Ok(s) => {
                outcome.exit_code = s.code();
                outcome.signal = s.signal();
                // bubblewrap exits with 128 + N when the command was killed
                // by signal N (the shell's convention): say it as a signal,
                // as for an unsandboxed command.
                if bwrap.is_some() && s.signal().is_none() {
                    if let Some(n) = s.code().filter(|c| (129..=128 + 64).contains(c)) {
                        outcome.exit_code = None;
                        outcome.signal = Some(n - 128);
                    }
                }
            }
            Err(e) => outcome.spawn_error = Some(format!("Lost track of `{program}`: {e}")),
        }
        Ok(outcome)
    }
}

/// The environment of a task: a fixed base, its own variables and
/// secrets, then the `CI_*` paths as it sees them (which nothing overrides).
fn task_env(req: &ExecRequest, seen: &Seen, tmp: &Path) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    let mut set = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
        env.insert(k.into(), v.as_ref().to_owned());
    };
    set("PATH", &HOST_PATH);
    set("HOME", &seen.work);
    set("TMPDIR", &tmp);
    set("LANG", &"C.UTF-8");
    for (k, v) in req.env.iter().chain(&req.secrets) {
        set(k, v);
    }
    set("CI", &"true");
    set("CI_IN", &seen.inputs);
    set("CI_WORK", &seen.work);
    set("CI_CONTEXT", &seen.context);
    if let Some(prev) = &seen.prev {
        set("CI_PREV", prev);
    }
    if let Some(prev_in) = &seen.prev_in {
        set("CI_PREV_IN", prev_in);
    }
    env
}

/// What the sandbox helper gets for one task: the command, and each of the
/// task's directories (host path, read-only) with where it goes in `/ci`.
fn zygote_start(
    req: &ExecRequest,
    program: &Path,
    cwd: &Path,
    env: &BTreeMap<OsString, OsString>,
) -> (zygote::Start, Vec<(PathBuf, bool)>) {
    let d = &req.dirs;
    let mut mounts = Vec::new();
    let mut dirs = Vec::new();
    let mut add = |name: &str, host: &Path, read_only: bool, file: bool| {
        mounts.push(zygote::Mount {
            name: name.into(),
            file,
        });
        dirs.push((host.to_owned(), read_only));
    };
    add("in", &d.inputs, true, false);
    add("work", &d.work, false, false);
    add("context", &d.context, false, true);
    if let Some(p) = &d.prev {
        add("prev", p, true, false);
    }
    if let Some(p) = &d.prev_in {
        add("prev-in", p, true, false);
    }
    let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
    let start = zygote::Start {
        program: text(program.as_os_str()),
        argv: req.argv.clone(),
        env: env.iter().map(|(k, v)| (text(k), text(v))).collect(),
        cwd: text(cwd.as_os_str()),
        mounts,
    };
    (start, dirs)
}

/// The first child of `pid` (`/proc/<pid>/task/<pid>/children`), if any.
fn first_child(pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

fn signal_group(pgid: Option<i32>, sig: i32) {
    if let Some(pgid) = pgid {
        // SAFETY: killpg only sends a signal; a gone group gives ESRCH.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}
