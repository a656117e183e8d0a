//! The end-to-end harness: runs the real `ci` binary in its own temporary
//! store and workspace. When an expectation fails it panics with the command,
//! its exit status, stdout, stderr and a listing of the store, so a failure
//! in CI can be understood from the log alone (after ripgrep's `tests/util.rs`).
//!
//! The binary is the `ci` next to the test executable (`target/<profile>/ci`);
//! `cargo test --workspace` builds it.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod serve;

/// A temporary directory holding a store (`store/`) and a workspace (`work/`)
/// where tests build the trees they add. Removed on drop.
pub struct Env {
    tmp: TempDir,
    store: PathBuf,
    work: PathBuf,
}

impl Default for Env {
    fn default() -> Env {
        Env::new()
    }
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("strata-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let store = tmp.path().join("store");
        let work = tmp.path().join("work");
        fs::create_dir(&work).expect("create the workspace");
        Env { tmp, store, work }
    }

    /// The temporary directory everything lives in.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The store every `ci` run of this environment uses (`CI_STORE`).
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// The workspace: the current directory of every `ci` run.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// A path inside the workspace.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.work.join(rel)
    }

    /// A `ci` command with this environment's store, workspace and a
    /// cache directory inside the temporary directory.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(ci_bin());
        cmd.args(args)
            .current_dir(&self.work)
            .env("CI_STORE", &self.store)
            .env("XDG_CACHE_HOME", self.tmp.path().join("cache"))
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ci` to completion.
    pub fn ci<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.command(args);
        self.run(cmd, None)
    }

    /// Runs `ci` to completion with extra environment variables.
    pub fn ci_env<I, S>(&self, args: I, vars: &[(&str, &str)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        cmd.envs(vars.iter().copied());
        self.run(cmd, None)
    }

    /// Runs `ci` with `input` on its stdin.
    pub fn ci_stdin<I, S>(&self, args: I, input: &[u8]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.command(args);
        self.run(cmd, Some(input))
    }

    /// Runs a command made by [`Env::command`] (e.g. given more environment)
    /// to completion.
    pub fn output(&self, cmd: Command) -> Output {
        self.run(cmd, None)
    }

    fn run(&self, mut cmd: Command, input: Option<&[u8]>) -> Output {
        let shown = show_command(&cmd);
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("piped stdin");
            let input = input.to_vec();
            // A thread, so that a child filling its stdout pipe cannot deadlock us.
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
        }
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for {shown}: {e}"));
        Output::new(shown, self.store.clone(), output)
    }

    /// Starts `ci` in the background; [`Running::wait`] gives its [`Output`].
    pub fn spawn<I, S>(&self, args: I) -> Running
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        let shown = show_command(&cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
        Running {
            child,
            shown,
            store: self.store.clone(),
        }
    }

    /// `ci store add DIR` (a workspace path) must succeed; returns the digest.
    pub fn add(&self, dir: &str) -> String {
        self.ci(["store", "add", dir]).success().digest()
    }
}

/// A `ci` process running in the background.
pub struct Running {
    child: Child,
    shown: String,
    store: PathBuf,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Takes the process's stdout, to read it while it runs (the [`Output`]
    /// of [`Running::wait`] then has an empty stdout).
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("stdout is piped and taken once")
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal; the child is not reaped yet, so
        // its pid cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill {}: {}",
            self.shown,
            std::io::Error::last_os_error()
        );
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.shown))
            .is_some()
    }

    /// Lets the process run for at most `delay`, then kills it with SIGKILL.
    /// `None` when it was killed; its [`Output`] when it exited on its own first.
    pub fn kill_after(mut self, delay: Duration) -> Option<Output> {
        if !self.wait_exit(delay) {
            // `Child::kill` is SIGKILL on Unix. The child is not reaped yet, so
            // its pid cannot have been reused.
            self.child
                .kill()
                .unwrap_or_else(|e| panic!("cannot kill {}: {e}", self.shown));
        }
        let output = self
            .child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.shown));
        use std::os::unix::process::ExitStatusExt;
        if output.status.signal() == Some(libc::SIGKILL) {
            return None;
        }
        Some(Output::new(self.shown, self.store, output))
    }

    /// Waits up to `timeout` for the process to exit, on a pidfd (an event,
    /// not a polling loop). Returns whether it exited; does not reap it.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + timeout;
        let exited = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, a valid timespec, no signal mask.
            let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if rc >= 0 {
                break rc > 0;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "ppoll: {err}");
        };
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        exited
    }

    pub fn wait(self) -> Output {
        let output = self
            .child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.shown));
        Output::new(self.shown, self.store, output)
    }
}

/// What a finished `ci` run printed. Every check that fails panics with the
/// whole story.
pub struct Output {
    shown: String,
    store: PathBuf,
    output: std::process::Output,
}

impl Output {
    fn new(shown: String, store: PathBuf, output: std::process::Output) -> Output {
        let out = Output {
            shown,
            store,
            output,
        };
        if out.stderr_str().contains("panicked") {
            out.fail("`ci` panicked");
        }
        if out.output.status.code().is_none() {
            out.fail("`ci` was killed by a signal");
        }
        out
    }

    /// Expects exit code 0.
    #[track_caller]
    pub fn success(self) -> Output {
        if !self.output.status.success() {
            self.fail("expected success");
        }
        self
    }

    /// Expects exit code `code` (1: problems found, 2: bad input, 3: store or I/O error)
    /// and an `error: …` message on stderr for codes 2 and 3.
    #[track_caller]
    pub fn failure(self, code: i32) -> Output {
        if self.output.status.code() != Some(code) {
            self.fail(&format!("expected exit code {code}"));
        }
        if code >= 2 && !self.stderr_str().contains("error: ") {
            self.fail("expected an `error: …` message on stderr");
        }
        self
    }

    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn stdout(&self) -> &[u8] {
        &self.output.stdout
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Stdout and stderr together, for "the message names X" checks.
    pub fn all_str(&self) -> String {
        format!("{}{}", self.stdout_str(), self.stderr_str())
    }

    /// The lines of stdout.
    pub fn lines(&self) -> Vec<String> {
        self.stdout_str().lines().map(str::to_owned).collect()
    }

    /// Expects stdout to be exactly one digest line; returns the digest.
    #[track_caller]
    pub fn digest(&self) -> String {
        let s = self.stdout_str();
        match s.strip_suffix('\n') {
            Some(d) if is_digest(d) => d.to_owned(),
            _ => self.fail("expected stdout to be one line holding a 64-hex digest"),
        }
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.output.stdout) {
            Ok(v) => v,
            Err(e) => self.fail(&format!("stdout is not JSON: {e}")),
        }
    }

    /// Expects `needle` in stdout or stderr.
    #[track_caller]
    pub fn mentions(self, needle: &str) -> Output {
        if !self.all_str().contains(needle) {
            self.fail(&format!("expected the output to mention {needle:?}"));
        }
        self
    }

    /// Panics with the command, its output and a listing of the store.
    #[track_caller]
    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "\n\n==================== {why} ====================\n\
             command: {}\n\
             status: {}\n\
             ---------- stdout ----------\n{}\n\
             ---------- stderr ----------\n{}\n\
             ---------- store ----------\n{}\n",
            self.shown,
            self.output.status,
            self.stdout_str(),
            self.stderr_str(),
            list_store(&self.store),
        )
    }
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `ci` binary next to the running test executable.
pub fn ci_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("find the test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a directory")
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("ci");
    if !bin.is_file() {
        panic!(
            "`{}` does not exist: run `cargo build --workspace` first",
            bin.display()
        );
    }
    bin
}

fn show_command(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str("ci");
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            let _ = write!(s, " '{}'", a.replace('\'', r"'\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// The files of a store, for failure reports: paths, modes and sizes, the
/// blob list cut short when long.
pub fn list_store(store: &Path) -> String {
    const MAX_LINES: usize = 200;
    let mut lines = Vec::new();
    list_into(store, store, &mut lines);
    let total = lines.len();
    if total > MAX_LINES {
        lines.truncate(MAX_LINES);
        lines.push(format!("… and {} more", total - MAX_LINES));
    }
    if lines.is_empty() {
        return format!("(`{}` is empty or missing)", store.display());
    }
    lines.join("\n")
}

fn list_into(root: &Path, dir: &Path, lines: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            lines.push(format!("{mode:04o}          {rel}/"));
            list_into(root, &path, lines);
        } else {
            lines.push(format!("{mode:04o} {:>9} {rel}", meta.len()));
        }
    }
}

// ---- building trees ----

/// Writes a file below `root`, creating its parent directories.
pub fn write(root: &Path, rel: &str, contents: impl AsRef<[u8]>) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent directories");
    }
    fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn mkdir(root: &Path, rel: &str) {
    fs::create_dir_all(root.join(rel)).expect("create a directory");
}

pub fn symlink(root: &Path, rel: &str, target: &str) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent directories");
    }
    std::os::unix::fs::symlink(target, &path)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
}

pub fn set_executable(root: &Path, rel: &str, executable: bool) {
    let path = root.join(rel);
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Creates a FIFO (which the store refuses to ingest).
pub fn mkfifo(root: &Path, rel: &str) {
    use std::os::unix::ffi::OsStrExt;
    let path = root.join(rel);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A small tree with every kind of entry: nested directories, an empty
/// directory, an executable, a symlink to a file, one to a directory and a
/// dangling one.
pub fn sample_tree(root: &Path) {
    write(root, "README.md", "# sample\n");
    write(root, "hello.txt", "hello\n");
    write(root, "bin/run.sh", "#!/bin/sh\necho run\n");
    set_executable(root, "bin/run.sh", true);
    write(root, "src/lib.rs", "pub fn f() {}\n");
    write(root, "src/deep/er/file.bin", [0u8, 1, 2, 255, 254]);
    write(root, "src/empty.txt", "");
    mkdir(root, "empty-dir");
    symlink(root, "link-to-hello", "hello.txt");
    symlink(root, "src/link-to-deep", "deep/er");
    symlink(root, "dangling", "does/not/exist");
}

/// Deterministic pseudo-random bytes (xorshift64*), fast even unoptimised.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Generates a deterministic tree of `files` small files (30 B to 4 KiB, in
/// nested directories, every 17th executable), a few symlinks, and one file
/// per entry of `big` of that many bytes. The same arguments give the same
/// tree, hence the same digest.
pub fn gen_tree(root: &Path, files: usize, big: &[usize], seed: u64) {
    fs::create_dir_all(root).expect("create the tree root");
    for i in 0..files {
        let rel = format!("d{:02}/s{}/f{i:05}.txt", i % 23, i % 5);
        let len = 30 + (i * 7919 + seed as usize) % 4066;
        let mut body = format!("file {i} seed {seed}\n").into_bytes();
        body.extend(pseudo_random(seed ^ i as u64, len));
        write(root, &rel, &body);
        if i % 17 == 0 {
            set_executable(root, &rel, true);
        }
    }
    for (i, &size) in big.iter().enumerate() {
        write(
            root,
            &format!("big/blob{i}.bin"),
            pseudo_random(seed + 1000 + i as u64, size),
        );
    }
    for i in 0..files.min(5) {
        symlink(
            root,
            &format!("links/l{i}"),
            &format!("../d{:02}/s{}/f{i:05}.txt", i % 23, i % 5),
        );
    }
}

// ---- comparing trees ----

/// Asserts that `actual` holds the same entries as `expected`: names, file
/// bytes, executable bits, symlink targets. Directory and file modes other
/// than the owner's executable bit and mtimes are not compared.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = snapshot(expected);
    let b = snapshot(actual);
    if a != b {
        let only_a: Vec<_> = a.iter().filter(|x| !b.contains(x)).map(|x| &x.0).collect();
        let only_b: Vec<_> = b.iter().filter(|x| !a.contains(x)).map(|x| &x.0).collect();
        panic!(
            "trees differ\n  {}: {only_a:?}\n  {}: {only_b:?}",
            expected.display(),
            actual.display()
        );
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { exec: bool, bytes: Vec<u8> },
    Link(PathBuf),
}

fn snapshot(root: &Path) -> Vec<(String, Node)> {
    let mut out = Vec::new();
    walk(root, root, &mut |rel, path, meta| {
        let node = if meta.file_type().is_symlink() {
            Node::Link(fs::read_link(path).expect("readlink"))
        } else if meta.is_dir() {
            Node::Dir
        } else {
            Node::File {
                exec: meta.permissions().mode() & 0o100 != 0,
                bytes: fs::read(path).expect("read"),
            }
        };
        out.push((rel.to_owned(), node));
    });
    out
}

/// Calls `f` with every entry below `root` (not following symlinks), sorted.
pub fn walk(root: &Path, dir: &Path, f: &mut dyn FnMut(&str, &Path, &fs::Metadata)) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("list").path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let rel = path
            .strip_prefix(root)
            .expect("below root")
            .to_string_lossy()
            .into_owned();
        f(&rel, &path, &meta);
        if meta.is_dir() {
            walk(root, &path, f);
        }
    }
}

/// Asserts that every entry below `root`, and `root` itself, has mtime `secs`.
pub fn assert_mtimes(root: &Path, secs: i64) {
    use std::os::unix::fs::MetadataExt;
    let root_mtime = fs::symlink_metadata(root).expect("lstat").mtime();
    assert_eq!(root_mtime, secs, "mtime of {}", root.display());
    walk(root, root, &mut |rel, _, meta| {
        assert_eq!(meta.mtime(), secs, "mtime of {rel}");
    });
}

/// Whether FUSE works here; under `CI=true` its absence fails the test
/// (`test` names it), otherwise the test says why it stops and passes.
pub fn fuse_or_fail(test: &str) -> bool {
    let ci = matches!(
        std::env::var("CI").as_deref(),
        Ok("true" | "TRUE" | "True" | "1" | "yes")
    );
    let problem = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse does not exist")
    // SAFETY: geteuid cannot fail.
    } else if unsafe { libc::geteuid() } == 0
        && std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_err()
    {
        Some("/dev/fuse cannot be opened")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if ci => panic!("{test}: CI=true and FUSE is unavailable: {p}"),
        Some(p) => {
            eprintln!("{test}: FUSE is unavailable ({p}); set CI=true to make this a failure");
            false
        }
    }
}
