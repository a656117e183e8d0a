//! `ci mount` and `ci umount` with the real binary: Ctrl-C and SIGTERM
//! leave no mount behind, `--background` returns once the mount is ready,
//! a mount whose process died is cleaned or reported with its cure, `ci -v
//! mount` says whether the kernel reads files itself (FUSE passthrough).
//!
//! Needs FUSE; under `CI=true` a machine without it fails these tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::*;

/// A `ci` command whose mount records live inside the test's directory.
fn ci(env: &Env, args: &[&str]) -> Command {
    let mut cmd = env.command(args);
    cmd.env("XDG_RUNTIME_DIR", runtime_dir(env));
    cmd
}

fn runtime_dir(env: &Env) -> PathBuf {
    let d = env.root().join("run");
    std::fs::create_dir_all(&d).expect("create the runtime directory");
    d
}

fn is_mounted(path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.to_str().expect("utf-8 path")))
}

fn setup(env: &Env) -> (String, PathBuf) {
    sample_tree(&env.path("src"));
    symlink(&env.path("src"), "link", "README.md");
    let layer = env.add("src");
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).expect("create the mount point");
    (layer, mnt)
}

/// Unmounts `mnt` when dropped, so a failing test leaves no mount and no
/// background process behind.
struct UmountOnDrop<'a>(&'a Env);

impl Drop for UmountOnDrop<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.0.path("mnt")) {
            let _ = ci(self.0, &["umount", "mnt"]).output();
        }
    }
}

/// A `ci mount` in the foreground, stopped with SIGKILL if the test fails
/// before it is waited for.
struct Foreground(Option<std::process::Child>);

impl Foreground {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    fn wait_with_output(mut self) -> std::process::Output {
        self.0
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait for ci mount")
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `ci --json mount` in the foreground and waits for its "mounted" line.
fn mount_foreground(env: &Env, layer: &str) -> Foreground {
    let mut child = ci(env, &["--json", "mount", &layer[..12], "mnt"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ci mount");
    let out = child.stdout.take().expect("stdout");
    // One JSON value, read as soon as it is complete (the process goes on).
    let first = serde_json::Deserializer::from_reader(out)
        .into_iter::<serde_json::Value>()
        .next();
    let child = Foreground(Some(child));
    let v = match first {
        Some(Ok(v)) => v,
        other => {
            let o = child.wait_with_output();
            panic!(
                "ci mount printed no JSON ({other:?}); status {}; stderr:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    let line = v.to_string();
    assert!(
        v["mounted"].as_str().is_some_and(|m| m.ends_with("/mnt")),
        "{line}"
    );
    child
}

#[test]
fn ctrl_c_and_sigterm_unmount_cleanly() {
    if !fuse_or_fail("ctrl_c_and_sigterm_unmount_cleanly") {
        return;
    }
    let env = Env::new();
    let (layer, mnt) = setup(&env);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let child = mount_foreground(&env, &layer);
        assert_same_tree(&env.path("src"), &mnt);
        assert_mtimes(&mnt, 1);
        // SAFETY: the child is not reaped yet, so its pid is still its own.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        let out = child.wait_with_output();
        assert!(
            out.status.success(),
            "ci mount after signal {sig}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&mnt), "signal {sig} left the mount behind");
        assert_eq!(std::fs::read_dir(&mnt).expect("list").count(), 0);
    }
    let records = runtime_dir(&env).join("strata/mounts");
    assert_eq!(
        std::fs::read_dir(&records).map(|d| d.count()).unwrap_or(0),
        0,
        "records left"
    );
}

#[test]
fn background_mount_and_umount() {
    if !fuse_or_fail("background_mount_and_umount") {
        return;
    }
    let env = Env::new();
    let (layer, mnt) = setup(&env);
    let _guard = UmountOnDrop(&env);
    let out = env
        .output(ci(
            &env,
            &["--json", "mount", "--background", &layer, "mnt"],
        ))
        .success();
    let pid = out.json()["pid"].as_u64().expect("a pid");
    assert!(is_mounted(&mnt), "not mounted when --background returned");
    assert_same_tree(&env.path("src"), &mnt);
    // Mounting again on a live mount is refused and says how to unmount.
    env.output(ci(&env, &["mount", "--background", &layer, "mnt"]))
        .failure(2)
        .mentions("ci umount");
    let out = env.output(ci(&env, &["--json", "umount", "mnt"])).success();
    assert_eq!(
        out.json()["stopped_pid"].as_u64(),
        Some(pid),
        "the serving process was stopped"
    );
    assert!(!is_mounted(&mnt));
    env.output(ci(&env, &["umount", "mnt"]))
        .failure(2)
        .mentions("not mounted");
}

#[test]
fn a_dead_mount_is_cleaned_or_reported_with_its_cure() {
    if !fuse_or_fail("a_dead_mount_is_cleaned_or_reported_with_its_cure") {
        return;
    }
    let env = Env::new();
    let (layer, mnt) = setup(&env);
    let _guard = UmountOnDrop(&env);

    // Recorded: the next `ci mount` cleans it and says so.
    let pid = env
        .output(ci(
            &env,
            &["--json", "mount", "--background", &layer, "mnt"],
        ))
        .success()
        .json()["pid"]
        .as_u64()
        .expect("pid");
    // SAFETY: sending SIGKILL to the process we just started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_gone(pid);
    assert!(is_mounted(&mnt), "a killed server leaves its mount");
    let out = env
        .output(ci(
            &env,
            &["--json", "mount", "--background", &layer, "mnt"],
        ))
        .success();
    assert!(
        out.stderr_str().contains("Cleaned up after process"),
        "{}",
        out.stderr_str()
    );
    let pid = out.json()["pid"].as_u64().expect("pid");
    assert_same_tree(&env.path("src"), &mnt);

    // Not recorded (its record is lost): reported with the command that clears it.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_gone(pid);
    std::fs::remove_dir_all(runtime_dir(&env).join("strata")).expect("remove the records");
    env.output(ci(&env, &["mount", &layer, "mnt"]))
        .failure(2)
        .mentions("stale mount")
        .mentions("ci umount mnt");
    env.output(ci(&env, &["umount", "mnt"])).success();
    assert!(!is_mounted(&mnt));
    env.output(ci(&env, &["mount", "--background", &layer, "mnt"]))
        .success();
    env.output(ci(&env, &["umount", "mnt"])).success();
}

/// Waits until `pid` is dead or a zombie (its parent, our `ci` child, has
/// exited; nobody may reap it soon).
fn wait_gone(pid: u64) {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as libc::c_int;
    if fd < 0 {
        return; // Already gone.
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; `fd` is ours and closed once.
    unsafe {
        libc::poll(&mut p, 1, 30_000);
        libc::close(fd);
    }
}

/// Starts `ci -v mount` in the foreground; returns it and what it printed
/// on stderr up to its "Mounted" line.
fn mount_verbose(env: &Env, layer: &str, passthrough: Option<&str>) -> (Foreground, String) {
    use std::io::BufRead;
    let mut cmd = ci(env, &["-v", "mount", &layer[..12], "mnt"]);
    match passthrough {
        Some(v) => cmd.env("CI_FUSE_PASSTHROUGH", v),
        None => cmd.env_remove("CI_FUSE_PASSTHROUGH"),
    };
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ci mount");
    let err = child.stderr.take().expect("stderr");
    let mut said = String::new();
    for line in std::io::BufReader::new(err).lines() {
        let line = line.expect("read stderr");
        said.push_str(&line);
        said.push('\n');
        if line.starts_with("Mounted") {
            return (Foreground(Some(child)), said);
        }
    }
    let o = Foreground(Some(child)).wait_with_output();
    panic!("ci mount did not mount ({}):\n{said}", o.status);
}

#[test]
fn ci_v_mount_says_how_files_are_read() {
    if !fuse_or_fail("ci_v_mount_says_how_files_are_read") {
        return;
    }
    let env = Env::new();
    sample_tree(&env.path("src"));
    let big: Vec<u8> = (0..(8u32 << 20) + 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(env.path("src/big.bin"), &big).expect("write big.bin");
    std::fs::write(env.path("src/empty"), b"").expect("write empty");
    let layer = env.add("src");
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).expect("create the mount point");
    let _umount = UmountOnDrop(&env);
    for (knob, says) in [
        (
            None,
            "File reads: the kernel reads blob files itself (FUSE passthrough)",
        ),
        (
            Some("0"),
            "File reads: LayerFs serves every read (CI_FUSE_PASSTHROUGH=0)",
        ),
    ] {
        let (child, said) = mount_verbose(&env, &layer, knob);
        assert!(
            said.contains(says),
            "with CI_FUSE_PASSTHROUGH={knob:?}, ci -v mount said:\n{said}"
        );
        assert_same_tree(&env.path("src"), &mnt);
        assert!(
            std::fs::read(mnt.join("big.bin")).expect("read big.bin") == big,
            "big.bin's bytes"
        );
        // SAFETY: the child is not reaped yet, so its pid is still its own.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
            0
        );
        let out = child.wait_with_output();
        assert!(
            out.status.success(),
            "ci mount after Ctrl-C: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&mnt), "Ctrl-C left the mount behind");
    }
}
