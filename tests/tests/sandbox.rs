//! What a host task can reach (issue 10): each runs in a sandbox of its own
//! (bubblewrap), where the store, the run's scratch and other tasks'
//! directories do not exist; its inputs are read-only, its `/tmp` private,
//! the network closed unless it has `network = True`; the host's tools are
//! there, read-only. No descriptor of `ci` beyond stdin, stdout and stderr
//! reaches it. Every build here is a real `ci build` of host tasks, and the
//! sandbox is required: without `bwrap` (`scripts/test` installs it) these
//! tests fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use strata_tests::*;

/// How long a test waits for a task to reach its gate before it fails.
const WAIT: Duration = Duration::from_secs(60);

/// A workspace of host tasks with `BUILD.star` and the given files.
fn host_workspace(build: &str, files: &[(&str, &str)]) -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(env.work(), "BUILD.star", build);
    for (rel, text) in files {
        write(env.work(), rel, text);
    }
    env
}

/// Expects the build's output not to say that tasks ran unsandboxed.
#[track_caller]
fn sandboxed(out: Output) -> Output {
    if out.all_str().contains("NOT sandboxed") {
        out.fail("host tasks ran unsandboxed: install bubblewrap (`apt install bubblewrap`)");
    }
    out
}

#[track_caller]
fn cat(env: &Env, layer: &str, path: &str) -> String {
    env.ci(["store", "cat", layer, path]).success().stdout_str()
}

/// A TCP server on 127.0.0.1 that tasks with `network = True` connect to,
/// say their name, and wait on: the test decides when each goes on. It
/// makes two tasks run at the same time without sleeping.
struct Gate {
    port: u16,
    arrived: mpsc::Receiver<(String, TcpStream)>,
}

impl Gate {
    fn new() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local address").port();
        let (tx, arrived) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut name = String::new();
                    let mut r = BufReader::new(conn.try_clone().expect("clone the connection"));
                    if r.read_line(&mut name).is_ok() {
                        let _ = tx.send((name.trim().to_owned(), conn));
                    }
                });
            }
        });
        Gate { port, arrived }
    }

    /// Waits until every one of `names` has connected.
    fn wait_for(&self, names: &[&str], build: &mut Running) -> HashMap<String, TcpStream> {
        let mut here = HashMap::new();
        let deadline = Instant::now() + WAIT;
        while here.len() < names.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.arrived.recv_timeout(left) {
                Ok((name, conn)) => {
                    assert!(names.contains(&name.as_str()), "unexpected `{name}`");
                    here.insert(name, conn);
                }
                Err(_) => {
                    let exited = build.has_exited();
                    panic!(
                        "only {:?} of {names:?} reached the gate in {WAIT:?} (build exited: {exited})",
                        here.keys().collect::<Vec<_>>()
                    );
                }
            }
        }
        here
    }
}

/// Lets a waiting task go on.
fn release(conn: &mut TcpStream) {
    conn.write_all(b"go\n").expect("release a task");
}

/// Reads the line a task sends when it is done with its part.
fn wait_done(conn: &TcpStream) -> String {
    conn.set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .expect("the task says it is done");
    line
}

/// The bash lines that connect to the gate as `name` and wait to be let go.
fn at_gate(port: u16, name: &str) -> String {
    format!("exec 3<>/dev/tcp/127.0.0.1/{port}\necho {name} >&3\nread -r go <&3\n")
}

/// Two tasks at once: `victim` reads an input and lists its work directory
/// after `attacker` has run `attack` (bash) and said so. Returns the
/// victim's listing, what it read, and the attacker's report.
fn victim_and_attacker(attack: &str) -> (String, String, String) {
    let gate = Gate::new();
    let victim = format!(
        "{}ls -A > listing\ncat \"$CI_IN/src/a.txt\" > read-after || echo unreadable > read-after\n",
        at_gate(gate.port, "victim")
    );
    let attacker = format!(
        "{}: > report\n{attack}\necho done >&3\n",
        at_gate(gate.port, "attacker")
    );
    let env = host_workspace(
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"victim\", deps = [\":src\"], network = True, script = 'bash \"$CI_IN/src/victim.sh\"')\n\
         task(name = \"attacker\", deps = [\":src\"], network = True, script = 'bash \"$CI_IN/src/attacker.sh\"')\n",
        &[("src/a.txt", "a\n"), ("src/victim.sh", &victim)],
    );
    // The attack may name the store's path as `STORE`.
    let store = env.store().display().to_string();
    write(
        env.work(),
        "src/attacker.sh",
        attacker.replace("STORE", &store),
    );
    let mut build = env.spawn(["build", "-j", "4"]);
    let mut here = gate.wait_for(&["victim", "attacker"], &mut build);
    let attacker = here.get_mut("attacker").expect("the attacker");
    release(attacker);
    let said = wait_done(attacker);
    assert_eq!(said, "done\n", "the attacker did not finish its attack");
    release(here.get_mut("victim").expect("the victim"));
    sandboxed(build.wait().success());
    (
        cat(&env, "//:victim", "listing"),
        cat(&env, "//:victim", "read-after"),
        cat(&env, "//:attacker", "report"),
    )
}

#[test]
fn a_task_cannot_see_or_write_a_siblings_work_directory() {
    // Before the sandbox, a sibling's work directory was `$CI_WORK/../../s*/wd`
    // (its slot in the run's scratch), under the store's `work/`.
    let (listing, read, report) = victim_and_attacker(
        r#"for d in "$CI_WORK"/../../s*/wd STORE/work/*/s*/wd; do
  if [ -d "$d" ]; then echo "sees $d" >> report; echo evil > "$d/evil" 2>/dev/null && echo "wrote $d" >> report; fi
done
true"#,
    );
    assert_eq!(report, "", "the attacker reached other work directories");
    assert_eq!(
        listing, "listing\n",
        "the victim's work directory was written"
    );
    assert_eq!(read, "a\n");
}

#[test]
fn umount_in_one_task_does_not_break_a_sibling() {
    let (_, read, report) = victim_and_attacker(
        r#"for m in "$(dirname "$CI_IN")" "$CI_IN" "$CI_IN/src"; do
  umount -l "$m" 2>/dev/null && echo "unmounted $m" >> report
done
true"#,
    );
    assert_eq!(
        read, "a\n",
        "the victim lost its inputs (attacker: {report})"
    );
    assert_eq!(report, "", "the attacker unmounted something");
}

#[test]
fn a_task_cannot_read_or_write_the_store() {
    let env = host_workspace(
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"t\", deps = [\":src\"], script = 'bash \"$CI_IN/src/t.sh\"')\n",
        &[("src/a.txt", "a\n")],
    );
    let store = env.store().display().to_string();
    // What a root task found before the sandbox: the store up the tree
    // from its work directory, and at its own path.
    write(
        env.work(),
        "src/t.sh",
        format!(
            r#": > report
for p in "$CI_WORK/../../../.." "{store}"; do
  for e in blobs db lock; do [ -e "$p/$e" ] && echo "sees $p/$e" >> report; done
done
for b in "$CI_WORK"/../../../../blobs/*/* {store}/blobs/*/*; do
  [ -f "$b" ] && echo tampered > "$b" 2>/dev/null && echo "overwrote $b" >> report
done
for p in "$CI_WORK/../../../.." "{store}"; do
  touch "$p/blobs/evil" "$p/db/evil" 2>/dev/null
done
true
"#
        ),
    );
    sandboxed(env.ci(["build"]).success());
    assert_eq!(
        cat(&env, "//:t", "report"),
        "",
        "the task reached the store"
    );
    for made in ["blobs/evil", "db/evil"] {
        assert!(
            !env.store().join(made).exists(),
            "the task created {made} in the store"
        );
    }
    env.ci(["store", "verify"]).success();
}

#[test]
fn inputs_are_read_only_mounted_or_copied() {
    for mode in ["mount", "copy"] {
        let env = host_workspace(
            "local_source(name = \"src\", path = \"src\")\n\
             task(name = \"t\", deps = [\":src\"], script = 'bash \"$CI_IN/src/t.sh\"')\n",
            &[
                ("src/a.txt", "a\n"),
                (
                    "src/t.sh",
                    r#": > report
echo x > "$CI_IN/src/a.txt" 2>/dev/null && echo "wrote a.txt" >> report
touch "$CI_IN/src/new" 2>/dev/null && echo "made new" >> report
mkdir "$CI_IN/dir" 2>/dev/null && echo "made dir" >> report
rm -f "$CI_IN/src/a.txt" 2>/dev/null; [ -e "$CI_IN/src/a.txt" ] || echo "removed a.txt" >> report
chmod 777 "$CI_IN/src" 2>/dev/null && echo "chmod" >> report
true
"#,
                ),
            ],
        );
        write(
            env.work(),
            "ci.toml",
            format!("[build]\nexecutor = \"host\"\ninputs = \"{mode}\"\n"),
        );
        sandboxed(env.ci(["build"]).success());
        assert_eq!(cat(&env, "//:t", "report"), "", "{mode}");
    }
}

#[test]
fn tmp_is_private() {
    let name = format!("strata-sandbox-{}-{}", std::process::id(), now_nanos());
    let env = host_workspace(
        &format!(
            "task(name = \"t\", script = 'echo secret > /tmp/{name}; ls -A /tmp > seen; test \"$TMPDIR\" = /tmp')\n"
        ),
        &[],
    );
    sandboxed(env.ci(["build"]).success());
    let host = std::path::Path::new("/tmp").join(&name);
    let leaked = host.exists();
    let _ = std::fs::remove_file(&host);
    assert!(!leaked, "the task's /tmp file is on the host's /tmp");
    assert_eq!(
        cat(&env, "//:t", "seen"),
        format!("{name}\n"),
        "/tmp starts empty"
    );
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[test]
fn the_network_is_closed_unless_the_task_has_network() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            drop(conn);
        }
    });
    let probe = format!(
        "if bash -c \"exec 3<>/dev/tcp/127.0.0.1/{port}\" 2>/dev/null; then echo reached > verdict; else echo refused > verdict; fi"
    );
    let env = host_workspace(
        &format!(
            "task(name = \"closed\", script = '{probe}')\n\
             task(name = \"open\", network = True, script = '{probe}')\n"
        ),
        &[],
    );
    sandboxed(env.ci(["build"]).success());
    assert_eq!(cat(&env, "//:closed", "verdict"), "refused\n");
    assert_eq!(cat(&env, "//:open", "verdict"), "reached\n");
}

#[test]
fn a_task_still_has_the_hosts_tools() {
    let env = host_workspace(
        "task(name = \"t\", script = 'test -x /usr/bin/env; printf \"int main(void) { return 7; }\\\\n\" > /tmp/m.c; cc -o m /tmp/m.c; ./m || echo $? > status')\n",
        &[],
    );
    sandboxed(env.ci(["build"]).success());
    assert_eq!(cat(&env, "//:t", "status"), "7\n");
}

#[test]
fn a_timeout_kills_the_whole_sandbox() {
    let gate = Gate::new();
    // A process that left the task's session and process group, holding a
    // connection to the test: it is gone when the connection closes.
    let env = host_workspace(
        "task(name = \"slow\", network = True, timeout = 1, script = 'setsid bash -c \"exec 3<>/dev/tcp/127.0.0.1/PORT; echo daemon >&3; exec sleep 1000\" & sleep 1000')\n"
            .replace("PORT", &gate.port.to_string())
            .as_str(),
        &[],
    );
    let started = Instant::now();
    let mut build = env.spawn(["build"]);
    let mut here = gate.wait_for(&["daemon"], &mut build);
    // Unsandboxed, the escaped process kept the task's pipes open, and the
    // build never ended.
    let out = build
        .kill_after(WAIT)
        .unwrap_or_else(|| panic!("the build did not end after its task timed out"))
        .failure(1);
    assert!(out.all_str().contains("timed out"), "{}", out.all_str());
    sandboxed(out);
    let daemon = here.get_mut("daemon").expect("the daemon");
    daemon
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    let mut buf = [0u8; 16];
    match daemon.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a process of the timed-out task is still alive: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn without_bwrap_host_tasks_run_and_the_build_says_so_once() {
    let env = host_workspace(
        "task(name = \"a\", script = 'echo \"$CI_WORK\" > where')\n\
         task(name = \"b\", script = 'true')\n",
        &[],
    );
    let empty = env.root().join("no-tools");
    std::fs::create_dir_all(&empty).expect("create a directory");
    let out = env.ci_env(["build"], &[("PATH", empty.to_str().expect("UTF-8 path"))]);
    let out = out.success();
    let text = out.all_str();
    assert_eq!(
        text.matches("NOT sandboxed").count(),
        1,
        "one warning per build:\n{text}"
    );
    assert!(text.contains("apt install bubblewrap"), "{text}");
    // Unsandboxed, a task works in its slot's directory, as before.
    let store = env.store().display().to_string();
    assert!(cat(&env, "//:a", "where").starts_with(&store));
}

/// A build whose tasks are all cached does not run `bwrap` to learn whether
/// it could: a success is remembered, but only for the same `bwrap`. A
/// `bwrap` replaced by one that cannot make namespaces is probed again.
#[test]
fn a_remembered_probe_is_trusted_only_for_the_same_bwrap() {
    use std::os::unix::fs::PermissionsExt;
    let env = host_workspace("task(name = \"a\", script = 'echo a > out')\n", &[]);
    // `ci` finds `bwrap` on its PATH (tasks get their own PATH).
    let tools = env.root().join("tools");
    std::fs::create_dir_all(&tools).expect("create a directory");
    let bwrap = tools.join("bwrap");
    let count = env.root().join("bwrap-runs");
    let wrapper = |body: &str| {
        std::fs::write(&bwrap, format!("#!/bin/sh\n{body}\n")).expect("write bwrap");
        std::fs::set_permissions(&bwrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    wrapper(&format!(
        "echo run >> {}\nexec /usr/bin/bwrap \"$@\"",
        count.display()
    ));
    let path = tools.to_str().expect("UTF-8 path").to_owned();
    sandboxed(env.ci_env(["build"], &[("PATH", &path)]).success());
    let runs = || {
        std::fs::read_to_string(&count)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let after_first = runs();
    assert!(
        after_first >= 1,
        "the first build probes (and runs the task)"
    );
    // All cached: nothing runs, and the remembered probe spares its bwrap.
    env.ci_env(["build"], &[("PATH", &path)]).success();
    assert_eq!(runs(), after_first, "no bwrap for an all-cached build");
    // A different bwrap (another size and time) is probed again, and its
    // failure is not trusted away.
    std::thread::sleep(std::time::Duration::from_millis(20));
    wrapper("echo 'bwrap: No permissions to create new namespace' >&2\nexit 1");
    std::fs::write(
        env.work().join("BUILD.star"),
        "task(name = \"a\", script = 'echo b > out')\n",
    )
    .expect("edit BUILD.star");
    let text = env
        .ci_env(["build"], &[("PATH", &path)])
        .success()
        .all_str();
    assert!(text.contains("NOT sandboxed"), "{text}");
    assert!(text.contains("cannot make namespaces"), "{text}");
}

#[test]
fn a_host_task_inherits_only_stdio() {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(env.work(), "src/a.txt", "a\n");
    // Reads an input, so the run's FUSE inputs mount exists while it runs.
    write(
        env.work(),
        "BUILD.star",
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"fds\", deps = [\":src\"], script = \"cat $CI_IN/src/a.txt >/dev/null; for f in /proc/$$/fd/*; do echo \\\"${f##*/} $(readlink $f)\\\"; done > fds.txt\")\n",
    );
    // `ci` itself inherits an open descriptor (fd 9, not close-on-exec),
    // as from a careless parent: the task must not see it.
    let marker = env.root().join("inherited-marker");
    std::fs::write(&marker, "").unwrap();
    let file = std::fs::File::open(&marker).unwrap();
    let mut cmd = env.command(["build"]);
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = file.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; the new fd 9 has no CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 9) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    sandboxed(env.output(cmd).success());
    drop(file);
    let fds = env
        .ci(["store", "cat", "//:fds", "fds.txt"])
        .success()
        .stdout_str();
    let store = env.store().display().to_string();
    let work = env.store().join("work").display().to_string();
    let mut seen = 0;
    for line in fds.lines() {
        let (_, target) = line.split_once(' ').unwrap_or((line, ""));
        seen += 1;
        // Pipes and /dev/null are the shell's own stdio; a file in its work
        // directory is its redirection. Nothing else of `ci` may be open.
        let ok = target.starts_with("pipe:")
            || target == "/dev/null"
            || target.starts_with(&work)
            || target.starts_with("/ci/work/")
            || !target.starts_with(&store)
                && !target.starts_with("/dev/fuse")
                && !target.starts_with("socket:")
                && !target.starts_with("anon_inode:");
        assert!(ok, "the task inherited {line}:\n{fds}");
        assert!(
            !target.starts_with(&format!("{store}/db")) && !target.ends_with("/lock"),
            "{line}\n{fds}"
        );
    }
    assert!(seen >= 3, "{fds}");
    assert!(
        !fds.contains(marker.to_str().unwrap()),
        "the task inherited the descriptor `ci` was given:\n{fds}"
    );
}

/// An impure task sees the inputs of its previous run at `$CI_PREV_IN`
/// (issue 10, part 5), mounted or copied: a diff against `$CI_IN` shows
/// exactly what was edited since. Unset on a first run.
#[test]
fn an_impure_task_sees_its_previous_inputs() {
    for mode in ["mount", "copy"] {
        let env = host_workspace(
            r#"
local_source(name = "src", path = "src")
task(
    name = "diff",
    deps = [":src"],
    pure = False,
    script = 'if [ -n "${CI_PREV_IN:-}" ]; then ls "$CI_PREV_IN" > mounts; diff -rq "$CI_PREV_IN/src" "$CI_IN/src" > diff.txt || true; else echo unset > diff.txt; fi',
)
"#,
            &[("src/a.txt", "a\n"), ("src/b.txt", "b\n")],
        );
        write(
            env.work(),
            "ci.toml",
            format!("[build]\nexecutor = \"host\"\ninputs = \"{mode}\"\n"),
        );
        sandboxed(env.ci(["build"]).success());
        assert_eq!(cat(&env, "//:diff", "diff.txt"), "unset\n", "{mode}");
        write(env.work(), "src/b.txt", "edited\n");
        sandboxed(env.ci(["build"]).success());
        assert_eq!(cat(&env, "//:diff", "mounts"), "src\n", "{mode}");
        assert_eq!(
            cat(&env, "//:diff", "diff.txt"),
            "Files /ci/prev-in/src/b.txt and /ci/in/src/b.txt differ\n",
            "{mode}"
        );
    }
}

/// The Docker executor follows the same rules: nothing of the store or of
/// the run's scratch is mounted but the task's own directories, and an
/// impure container task sees its previous inputs at `/ci/prev-in`.
/// (Needs the daemon and `$STRATA_TEST_IMAGE`, as tests/tests/docker.rs.)
#[test]
fn a_container_gets_its_own_directories_and_previous_inputs() {
    let image = std::env::var("STRATA_TEST_IMAGE")
        .unwrap_or_else(|_| "strata-test/busybox:latest".to_owned());
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\n");
    write(
        env.work(),
        "BUILD.star",
        format!(
            r#"
local_source(name = "src", path = "src")
task(
    name = "c",
    image = "{image}",
    deps = [":src"],
    pure = False,
    script = 'ls /ci > ci; cut -d" " -f4 /proc/self/mountinfo > roots; if [ -n "${{CI_PREV_IN:-}}" ]; then for f in a.txt b.txt; do cmp -s "$CI_PREV_IN/src/$f" "$CI_IN/src/$f" || echo $f; done > changed; fi',
)
"#
        ),
    );
    write(env.work(), "src/a.txt", "a\n");
    write(env.work(), "src/b.txt", "b\n");
    env.ci(["build"]).success();
    assert_eq!(cat(&env, "//:c", "ci"), "context\nin\nwork\n");
    write(env.work(), "src/b.txt", "edited\n");
    env.ci(["build"]).success();
    assert_eq!(
        cat(&env, "//:c", "ci"),
        "context\nin\nprev\nprev-in\nwork\n"
    );
    assert_eq!(cat(&env, "//:c", "changed"), "b.txt\n");
    // Mount roots are paths inside their filesystems: of the store's, only
    // the task's own slot directories (its work directory, context file,
    // copies) may be mounted, never the store, its `work/` or a whole run.
    // (The store's path as seen from the root of whatever filesystem holds
    // it ends with its last two components.)
    let store = env.store();
    let tail = store
        .strip_prefix(store.parent().and_then(|p| p.parent()).expect("a parent"))
        .expect("the store's last components")
        .display()
        .to_string();
    let roots = cat(&env, "//:c", "roots");
    for root in roots.lines().filter(|r| r.contains(&tail)) {
        let own = ["/wd", "/context", "/in", "/prev", "/prev-in"]
            .iter()
            .any(|end| root.ends_with(end))
            && root.contains(&format!("{tail}/work/"));
        assert!(
            own,
            "a container mounts more than its own directories: {root}\n{roots}"
        );
    }
}

/// A store kept under a directory the sandbox shows (`/opt`) is hidden
/// under an empty read-only directory, and its tasks still get their own
/// directories from inside it.
#[test]
fn a_store_under_a_shown_directory_is_hidden() {
    let env = host_workspace(
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"t\", deps = [\":src\"], script = 'ls -A \"$STORE\" > seen; touch \"$STORE/x\" 2>/dev/null && echo wrote >> seen; cat \"$CI_IN/src/a.txt\" > a')\n",
        &[("src/a.txt", "a\n")],
    );
    let store = std::path::PathBuf::from(format!(
        "/opt/strata-sandbox-test-{}-{}",
        std::process::id(),
        now_nanos()
    ));
    let s = store.to_str().expect("a UTF-8 path");
    write(
        env.work(),
        "BUILD.star",
        std::fs::read_to_string(env.path("BUILD.star"))
            .expect("read BUILD.star")
            .replace("$STORE", s),
    );
    let vars = [("CI_STORE", s)];
    let built = env.ci_env(["build"], &vars);
    let seen = env.ci_env(["store", "cat", "//:t", "seen"], &vars);
    let read = env.ci_env(["store", "cat", "//:t", "a"], &vars);
    let _ = std::fs::remove_dir_all(&store);
    sandboxed(built.success());
    assert_eq!(seen.success().stdout_str(), "", "the task saw the store");
    assert_eq!(read.success().stdout_str(), "a\n");
}

/// A command's exit code is its own, whatever its value, with the network
/// or without: 129 to 192 used to be reported as a signal (bubblewrap's 128 + N for a command killed by
/// signal N), and a command killed by a signal is still said to be.
#[test]
fn a_task_exit_code_is_its_own() {
    let env = host_workspace(
        "task(name = \"code\", script = 'exit 130')\n\
         task(name = \"net\", network = True, script = 'exit 131')\n\
         task(name = \"signal\", script = 'kill -USR1 $$')\n",
        &[],
    );
    let out = sandboxed(env.ci(["build", "--keep-going"]).failure(1));
    let text = out.all_str();
    assert!(text.contains("exited with status 130"), "{text}");
    assert!(text.contains("exited with status 131"), "{text}");
    assert!(
        !text.contains("killed by signal 2") && !text.contains("killed by signal 3"),
        "{text}"
    );
    assert!(text.contains("killed by signal 10"), "{text}");
}

/// Every process below `pid` (by parent), with its command line.
fn descendants(pid: i32) -> Vec<(i32, String)> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, not `)`.
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<i32>().ok())
        {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
        .into_iter()
        .skip(1)
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            (p, String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

/// Pidfds of `pids` (those still alive).
fn pidfds(pids: &[(i32, String)]) -> Vec<(libc::c_int, String)> {
    pids.iter()
        .filter_map(|(p, cmd)| {
            // SAFETY: pidfd_open returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, *p, 0) } as libc::c_int;
            (fd >= 0).then(|| (fd, format!("{p} {cmd}")))
        })
        .collect()
}

/// Waits (on the pidfds, no polling loop) until every process has exited;
/// returns those still alive after `timeout`.
fn still_alive_after(fds: Vec<(libc::c_int, String)>, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut left: Vec<(libc::c_int, String)> = fds;
    while !left.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let mut polled: Vec<libc::pollfd> = left
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a live array of pollfds of the length given.
        let n = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                wait.as_millis() as libc::c_int,
            )
        };
        if n == 0 {
            break;
        }
        let mut keep = Vec::new();
        for ((fd, what), p) in left.into_iter().zip(&polled) {
            if p.revents == 0 {
                keep.push((fd, what));
            } else {
                // SAFETY: our own descriptor, closed once.
                unsafe { libc::close(fd) };
            }
        }
        left = keep;
    }
    left.into_iter().map(|(_, what)| what).collect()
}

/// Reads `ci --json build`'s output until a line holds `needle`.
fn read_until(out: &mut impl BufRead, needle: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read ci's output");
        assert!(n > 0, "ci ended before its task said `{needle}`");
        if line.contains(needle) {
            return;
        }
    }
}

/// A task without the network (one of the sandbox helper's) that escaped
/// into a session of its own is killed with the rest when it times out,
/// while `ci` and the helper go on (another task still runs).
#[test]
fn a_timeout_kills_everything_a_task_started() {
    let env = host_workspace(
        "task(name = \"slow\", timeout = 1, script = 'setsid sleep 1000 & echo escaped; sleep 1000')\n\
         task(name = \"other\", script = 'echo other-started; sleep 2000')\n",
        &[],
    );
    let mut build = env.spawn(["--json", "build", "-j", "2", "--keep-going"]);
    let mut out = BufReader::new(build.take_stdout());
    read_until(&mut out, "escaped");
    // The shell, and the child it put in a session of its own (`$!` is
    // known, so it is forked; it may not have exec'd `sleep` yet).
    let slow: Vec<_> = descendants(build.id() as i32)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("sleep 1000"))
        .collect();
    assert!(slow.len() >= 2, "the task's processes: {slow:?}");
    let fds = pidfds(&slow);
    read_until(&mut out, "timed out");
    let alive = still_alive_after(fds, Duration::from_secs(10));
    assert!(
        !build.has_exited(),
        "ci ended, which would have killed them anyway"
    );
    assert!(
        alive.is_empty(),
        "still running after the timeout: {alive:?}"
    );
    // `Running::kill_after` is SIGKILL.
    let _ = build.kill_after(Duration::ZERO);
}

/// `kill -9` of `ci` leaves nothing behind: not the sandbox helper, not a
/// task, not what a task started in a session of its own.
#[test]
fn killing_ci_leaves_no_sandbox_or_task_behind() {
    let env = host_workspace(
        "task(name = \"slow\", script = 'setsid sleep 1000 & echo escaped; sleep 1000')\n",
        &[],
    );
    let mut build = env.spawn(["--json", "build"]);
    let mut out = BufReader::new(build.take_stdout());
    read_until(&mut out, "escaped");
    let below = descendants(build.id() as i32);
    let task = below
        .iter()
        .filter(|(_, c)| c.contains("sleep 1000"))
        .count();
    assert!(task >= 2, "the task's processes: {below:?}");
    let fds = pidfds(&below);
    // `Running::kill_after` is SIGKILL.
    assert!(
        build.kill_after(Duration::ZERO).is_none(),
        "ci ended on its own"
    );
    let alive = still_alive_after(fds, Duration::from_secs(10));
    assert!(
        alive.is_empty(),
        "still running after `kill -9` of ci: {alive:?}"
    );
}

/// Tasks that share the sandbox helper share nothing writable: the root,
/// `/dev` and `/ci` are read-only, and `/tmp` and `/dev/shm` are each task's
/// own.
#[test]
fn tasks_of_one_sandbox_share_nothing_writable() {
    let env = host_workspace(
        "task(name = \"a\", script = ': > report; echo s > /dev/shm/strata-a; echo t > /tmp/strata-a; for p in /evil /dev/evil /ci/evil; do touch $p 2>/dev/null && echo $p >> report; done; true')\n\
         task(name = \"b\", deps = [\":a\"], script = 'ls -A /dev/shm /tmp / > seen')\n",
        &[],
    );
    sandboxed(env.ci(["build", "-j", "1"]).success());
    assert_eq!(
        cat(&env, "//:a", "report"),
        "",
        "a task wrote outside its directories"
    );
    let seen = cat(&env, "//:b", "seen");
    assert!(
        !seen.contains("strata-a") && !seen.contains("evil"),
        "{seen}"
    );
}
