//! The remote cache end to end: real `ci` processes on separate stores and
//! workspaces (two "hosts"), a real `ci serve` on 127.0.0.1 (or on a veth
//! pair into a network namespace), a real nginx as the WebDAV backend. No
//! mocks: the hosts share results only through the server.
//!
//! Needs root (network namespaces) and nginx with its DAV module
//! (`./scripts/test` installs it); a missing piece fails the test that needs
//! it, never skips it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_tests::serve::{agent, Server};
use strata_tests::*;

/// The tasks of fixtures/cproject with `effects = True`: they run in every
/// run and are never cached, locally or remotely.
const EFFECTS: &[&str] = &["//release:publish"];

// ---- hosts, servers and what they say ----

/// A "host": its own store and a copy of fixtures/cproject at its own path.
fn host() -> Env {
    let env = Env::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/cproject");
    let status = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", src.display()))
        .arg(env.work())
        .status()
        .expect("cp");
    assert!(status.success(), "copy fixtures/cproject");
    env
}

/// A store for a cache server, with the minimal workspace `ci serve` needs.
fn server_env() -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "name = \"cache\"\n");
    env
}

fn token(server: &Env, name: &str, read_only: bool) -> String {
    let mut args = vec!["serve", "token", "create", name];
    if read_only {
        args.push("--read-only");
    }
    server.ci(args).success().stdout_str().trim().to_owned()
}

/// One task of a finished run.
#[derive(Clone, Debug)]
struct Task {
    cached: bool,
    executed: bool,
    output: String,
    key: String,
}

/// A build and the record of its run.
struct Build {
    out: Output,
    tasks: BTreeMap<String, Task>,
}

impl Build {
    fn executed(&self) -> BTreeSet<String> {
        self.labels(|t| t.executed)
    }

    fn cached(&self) -> BTreeSet<String> {
        self.labels(|t| t.cached)
    }

    fn labels(&self, f: impl Fn(&Task) -> bool) -> BTreeSet<String> {
        self.tasks
            .iter()
            .filter(|(_, t)| f(t))
            .map(|(l, _)| l.clone())
            .collect()
    }

    /// The `remote cache URL: …` summary line.
    fn summary(&self) -> Summary {
        let err = self.out.stderr_str();
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("remote cache ") && l.contains(" hits, "))
            .collect();
        if lines.len() != 1 {
            self.out
                .fail("expected exactly one `remote cache URL: N hits, …` line on stderr");
        }
        let line = lines[0];
        let number_before = |word: &str| -> Option<u64> {
            let i = line.find(word)?;
            line[..i].split_whitespace().last()?.parse().ok()
        };
        Summary {
            hits: number_before(" hits").unwrap_or_else(|| self.out.fail("no hit count")),
            misses: number_before(" misses").unwrap_or_else(|| self.out.fail("no miss count")),
            sent_objects: number_before(" objects ("),
            sent_results: number_before(" results"),
        }
    }

    /// The lines of stderr that are warnings.
    fn warnings(&self) -> Vec<String> {
        self.out
            .stderr_str()
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .map(str::to_owned)
            .collect()
    }

    #[track_caller]
    fn expect_warnings(&self, n: usize) -> Vec<String> {
        let w = self.warnings();
        if w.len() != n {
            self.out.fail(&format!(
                "expected {n} warning lines, saw {}: {w:?}",
                w.len()
            ));
        }
        w
    }
}

#[derive(Debug)]
struct Summary {
    hits: u64,
    misses: u64,
    /// Only in write mode.
    sent_objects: Option<u64>,
    sent_results: Option<u64>,
}

/// `ci build` of every target with `--remote-cache url` (and `vars`), which
/// must succeed; then the run's record.
fn build(env: &Env, url: &str, vars: &[(&str, &str)]) -> Build {
    let mut cmd = cache_command(env, ["build", "--remote-cache", url]);
    cmd.envs(vars.iter().copied());
    finish_build(env, env.output(cmd))
}

/// `ci ARGS` in `env`, with none of the remote cache's settings inherited
/// from the test's own environment (a `CI_TOKEN` there would make every
/// build a writer).
fn cache_command<const N: usize>(env: &Env, args: [&str; N]) -> Command {
    let mut cmd = env.command(args);
    for var in [
        "CI_TOKEN",
        "CI_REMOTE_CACHE",
        "CI_REMOTE_CACHE_MODE",
        "CI_REMOTE_TIMEOUT",
        "CI_SERVER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn finish_build(env: &Env, out: Output) -> Build {
    let out = out.success();
    let run = env.ci(["--json", "run", "show", "latest"]).success().json();
    let tasks = run["tasks"]
        .as_object()
        .unwrap_or_else(|| out.fail(&format!("the run record has no tasks: {run:#}")))
        .iter()
        .map(|(label, t)| {
            let cached = t["cached"] == true;
            let task = Task {
                cached,
                executed: !cached && t["attempts"].as_u64().unwrap_or(0) > 0,
                output: t["output"].as_str().unwrap_or("").to_owned(),
                key: t["key"].as_str().unwrap_or("").to_owned(),
            };
            (label.clone(), task)
        })
        .collect();
    Build { out, tasks }
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

/// A counter of `/metrics` (0 when the server has not made it yet).
fn metric(base: &str, name_and_labels: &str) -> u64 {
    let mut res = agent()
        .get(format!("{base}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("GET {base}/metrics: {e}"));
    let text = res.body_mut().read_to_string().expect("read /metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == name_and_labels).then(|| value.parse::<f64>().ok())?
        })
        .map_or(0, |v| v as u64)
}

const OBJECTS_IN: &str = r#"strata_cache_objects_total{protocol="strata",direction="in"}"#;
const EVICTIONS: &str = "strata_cache_evictions_total";

fn du(env: &Env) -> Value {
    env.ci(["--json", "store", "du"]).success().json()
}

fn verify_clean(env: &Env) {
    env.ci(["store", "verify"]).success().mentions("ok:");
}

/// Asserts that both builds ran the same tasks, with the same output digests.
fn assert_same_outputs(a: &Build, b: &Build) {
    assert_eq!(
        a.tasks.keys().collect::<Vec<_>>(),
        b.tasks.keys().collect::<Vec<_>>(),
        "the same tasks"
    );
    for (label, t) in &a.tasks {
        assert!(!t.output.is_empty(), "{label} has an output");
        assert_eq!(
            t.output, b.tasks[label].output,
            "{label}: the same output digest on both hosts"
        );
    }
}

/// Exports one layer from each of two stores and compares the archives
/// byte for byte.
fn assert_same_export(a: &Env, b: &Env, layer: &str) {
    let fa = a.root().join("export.tar.zst");
    let fb = b.root().join("export.tar.zst");
    a.ci(["store", "export", layer, "-o", fa.to_str().unwrap()])
        .success();
    b.ci(["store", "export", layer, "-o", fb.to_str().unwrap()])
        .success();
    let (ba, bb) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    assert!(!ba.is_empty());
    assert!(ba == bb, "the exports of {layer} differ between the stores");
}

// ---- 1. two hosts ----

/// A builds with `a_vars` (a write token) and sends; B (its own store, the
/// workspace elsewhere, built by `b_build`) gets every cacheable result and
/// runs only tasks with effects, and its outputs are A's. A rebuild on A
/// sends nothing; an edit on B runs only the edit's cone.
fn two_hosts(
    server: &str,
    a: &Env,
    a_vars: &[(&str, &str)],
    b: &Env,
    b_build: &dyn Fn(&Env) -> Build,
) {
    let objects_in = |n: u64, why: &str| {
        assert_eq!(metric(server, OBJECTS_IN), n, "objects received: {why}");
    };
    objects_in(0, "before any build");
    let first = build(a, server, a_vars);
    assert_eq!(first.tasks.len(), 10, "cproject has 10 tasks");
    assert_eq!(first.cached(), set(&[]), "A starts empty");
    first.expect_warnings(0);
    let received = metric(server, OBJECTS_IN);
    assert!(received > 0, "the server received A's objects");

    // A again, all local: which tasks are never cached is what this says.
    let again = build(a, server, a_vars);
    assert_eq!(again.executed(), set(EFFECTS), "only effects rerun on A");
    let cacheable = again.cached();
    assert_eq!(cacheable.len(), 10 - EFFECTS.len());
    assert_eq!(
        first.summary().sent_results,
        Some(cacheable.len() as u64),
        "A sent every cacheable result\n{}",
        first.out.stderr_str()
    );
    let s = again.summary();
    assert_eq!((s.hits, s.misses), (0, 0), "A asks the server nothing");
    assert_eq!(s.sent_objects, Some(0), "A has nothing new to send");
    objects_in(received, "a rebuild of what the server has sends no object");

    // B: every cacheable result from the server.
    let on_b = b_build(b);
    assert_eq!(
        on_b.executed(),
        set(EFFECTS),
        "B runs only tasks with effects"
    );
    assert_eq!(on_b.cached(), cacheable, "B reuses every cacheable result");
    let sb = on_b.summary();
    assert_eq!((sb.hits, sb.misses), (cacheable.len() as u64, 0), "{sb:?}");
    assert_eq!(sb.sent_objects, None, "B has no token: read mode");
    on_b.expect_warnings(0);
    assert_same_outputs(&first, &on_b);
    assert_same_export(a, b, &first.tasks["//release:tarball"].output);
    verify_clean(b);
    objects_in(received, "a build in read mode sends nothing");

    // An edit on B: only //test:smoke (the edited task, a leaf) and effects run.
    let path = b.path("test/BUILD.star");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace("'Hello, strata!'\"]", "'Hello, strata!' && true\"]");
    assert_ne!(text, edited, "the edit applies");
    std::fs::write(&path, edited).unwrap();
    let after = b_build(b);
    assert_eq!(
        after.executed(),
        set(&["//test:smoke", "//release:publish"]),
        "only the edited task's cone and effects run"
    );
    assert_eq!(after.cached().len(), cacheable.len() - 1);
    let s = after.summary();
    assert_eq!(
        (s.hits, s.misses),
        (0, 1),
        "B has the rest locally now; the server lacks the edited task"
    );
    after.expect_warnings(0);
}

#[test]
fn a_second_host_reuses_every_result_and_a_rebuild_sends_nothing() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &[]);
    let (a, b) = (host(), host());
    assert_ne!(a.work(), b.work());
    two_hosts(&server.url, &a, &[("CI_TOKEN", &writer)], &b, &|b| {
        build(b, &server.url, &[])
    });
    verify_clean(&s);
    assert_eq!(du(&s)["actions"], 9, "one entry per cacheable task");
}

// ---- network namespaces ----

/// A network namespace joined to this one by a veth pair: `host_ip` (.1 of a
/// /30 of 10.231.0.0/16) on this side, .2 inside. Both are removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (package iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            panic!("network namespaces need root: run the tests as root (./scripts/test does)");
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() as u64;
        let name = format!("strata-rc-{pid}-{n}");
        let tag = format!("{:x}", (pid * 16 + n) % 0xff_ffff);
        let (host_if, ns_if) = (format!("src{tag}h"), format!("src{tag}n"));
        // A /30 no interface here has yet (other test processes make theirs).
        let taken = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "-4", "addr"])
                .output()
                .expect("ip addr")
                .stdout,
        )
        .into_owned();
        let mut slot = (pid.wrapping_mul(2_654_435_761) + n * 7919) % 16384;
        let (host_ip, ns_ip) = loop {
            let (hi, lo) = (slot / 64, (slot % 64) * 4);
            let host = format!("10.231.{hi}.{}", lo + 1);
            if !taken.contains(&format!("{host}/")) {
                break (host, format!("10.231.{hi}.{}", lo + 2));
            }
            slot = (slot + 1) % 16384;
        };
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            host_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `cmd` run inside the namespace: `nsenter --net` only (`ip netns exec`
    /// remounts /sys, which breaks FUSE).
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            c.current_dir(dir);
        }
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `ci serve` listening on `addr` (the harness's [`Server`] listens on
/// 127.0.0.1 only). Killed on drop.
struct Listening {
    child: Child,
    url: String,
}

fn serve_at(env: &Env, addr: &str) -> Listening {
    let mut cmd = env.command(["serve", "--listen", addr, "."]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start ci serve");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
            if let Some(url) = line.strip_prefix("Serving on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(url.trim().to_owned()));
                }
            }
        }
        if let Some(tx) = tx {
            let _ = tx.send(Err(log));
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(url)) => Listening { child, url },
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ci serve --listen {addr} did not start: {other:?}");
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_host_in_another_network_namespace_reuses_every_result() {
    let ns = Netns::new();
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = serve_at(&s, &format!("{}:0", ns.host_ip));
    assert!(server.url.contains(&ns.host_ip), "{}", server.url);
    let (a, b) = (host(), host());
    let b_build = |b: &Env| {
        let cmd = cache_command(b, ["build", "--remote-cache", &server.url]);
        finish_build(b, b.output(ns.wrap(&cmd)))
    };
    // The namespace is another network: the host's loopback is not there.
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let loopback = format!("http://{}", probe.local_addr().unwrap());
    let mut cmd = cache_command(&b, ["build", "--remote-cache", &loopback]);
    cmd.env("CI_REMOTE_TIMEOUT", "2");
    let isolated = finish_build(&b, b.output(ns.wrap(&cmd)));
    let w = isolated.expect_warnings(1);
    assert!(w[0].contains("Connection refused"), "{w:?}");
    drop(probe);
    // Start B from nothing again.
    std::fs::remove_dir_all(b.store()).unwrap();
    two_hosts(&server.url, &a, &[("CI_TOKEN", &writer)], &b, &b_build);
    verify_clean(&s);
}

// ---- 2. a tampered blob ----

#[test]
fn a_tampered_blob_on_the_server_is_a_miss_naming_it_and_runs_locally() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &[]);
    let (a, b) = (host(), host());
    let on_a = build(&a, &server.url, &[("CI_TOKEN", &writer)]);

    // bin/hello, which only //build:binary makes (later tasks carry it on).
    let binary = &on_a.tasks["//build:binary"];
    let ls = a
        .ci(["--json", "store", "ls", "-r", &binary.output])
        .success()
        .json();
    let hello = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "bin/hello")
        .unwrap_or_else(|| panic!("no bin/hello in {ls:#}"))["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = s.store().join("blobs").join(&hello[..2]).join(&hello[2..]);
    let mut bytes = std::fs::read(&file)
        .unwrap_or_else(|e| panic!("the server's blob {}: {e}", file.display()));
    bytes[100] ^= 0x55;
    let mut perm = std::fs::metadata(&file).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o644);
    std::fs::set_permissions(&file, perm).unwrap();
    std::fs::write(&file, &bytes).unwrap();

    let on_b = build(&b, &server.url, &[]);
    let warnings = on_b.expect_warnings(1);
    assert!(
        warnings[0].contains(&hello) && warnings[0].contains(&binary.key[..12]),
        "the warning names the blob and the action: {warnings:?}"
    );
    assert_eq!(
        on_b.executed(),
        set(&["//build:binary", "//release:publish"]),
        "the task whose blob was wrong runs locally, nothing else does"
    );
    let sb = on_b.summary();
    assert_eq!((sb.hits, sb.misses), (8, 1), "{sb:?}");
    assert_same_outputs(&on_a, &on_b);
    verify_clean(&b);
}

// ---- 3. tokens ----

#[test]
fn without_a_write_token_nothing_is_written_and_builds_still_succeed() {
    let s = server_env();
    let read = token(&s, "reader", true);
    let writer = token(&s, "writer", false);
    let server = Server::start(&s, &["."], &[]);
    let empty = du(&s);

    // A read-only token: write mode by default (a token is set), refused.
    let a = host();
    let ro = build(&a, &server.url, &[("CI_TOKEN", &read)]);
    let w = ro.expect_warnings(1);
    assert!(w[0].contains("read-only"), "{w:?}");
    assert_eq!(ro.executed().len(), 10);
    // No token and write mode asked for: refused too.
    let b = host();
    let anon = build(&b, &server.url, &[("CI_REMOTE_CACHE_MODE", "write")]);
    let w = anon.expect_warnings(1);
    assert!(w[0].contains("token"), "{w:?}");
    assert_eq!(anon.executed().len(), 10);
    assert_eq!(metric(&server.url, OBJECTS_IN), 0, "no object received");
    assert_eq!(du(&s), empty, "the server's store is as it was");

    // `ci store push` says why, and exits 2.
    let layer = a.add("src");
    let mut cmd = cache_command(&a, ["store", "push", &layer, &server.url]);
    cmd.env("CI_TOKEN", &read);
    a.output(cmd).failure(2).mentions("read-only");
    assert_eq!(du(&s), empty);

    // The endpoint itself: 401 without a token, 403 read-only.
    let upload = "/api/v1/cache/upload";
    let oct = ("Content-Type", "application/octet-stream");
    let r = server.post_raw(upload, b"STRPACK1", &[oct]);
    assert_eq!(r.status, 401, "{}", r.text());
    let bearer = format!("Bearer {read}");
    let r = server.post_raw(upload, b"STRPACK1", &[oct, ("Authorization", &bearer)]);
    assert_eq!(r.status, 403, "{}", r.text());
    // With the write token, a body that is no pack is refused, not stored.
    let bearer = format!("Bearer {writer}");
    let r = server.post_raw(upload, b"not a pack", &[oct, ("Authorization", &bearer)]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(du(&s), empty);
    verify_clean(&s);
}

// ---- 4. a server killed during a push ----

/// A TCP relay to `upstream` that stops relaying once `limit` bytes went up
/// and says so on `reached`; [`Relay::cut`] then closes every connection.
struct Relay {
    url: String,
    reached: mpsc::Receiver<()>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn new(upstream: &str, limit: u64) -> Relay {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http URL")
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, reached) = mpsc::channel();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let up_total = Arc::new(AtomicU64::new(0));
        let signalled = Arc::new(AtomicBool::new(false));
        let conns2 = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                // The server is gone: the client sees its connection closed.
                let Ok(mut server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                {
                    let mut c = conns2.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
                let (total, signalled, tx) = (up_total.clone(), signalled.clone(), tx.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if total.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= limit {
                            // Hold here: the server has part of it, never all.
                            if !signalled.swap(true, Ordering::Relaxed) {
                                let _ = tx.send(());
                            }
                            return;
                        }
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        Relay {
            url,
            reached,
            conns,
        }
    }

    /// Resets every connection (as a host does whose server died): the
    /// client's next write fails at once instead of waiting out its timeout.
    fn cut(&self) {
        use std::os::fd::AsRawFd;
        for c in self.conns.lock().unwrap().drain(..) {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a `linger` of the size given.
            unsafe {
                libc::setsockopt(
                    c.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            // Closing the last descriptor with a zero linger sends RST.
        }
    }
}

#[test]
fn a_server_killed_during_a_push_keeps_no_part_of_the_layer() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &[]);
    let a = host();
    // 200 MB that does not compress: 50 files of 4 MB.
    for i in 0..50u64 {
        write(
            a.work(),
            &format!("big/f{i:02}.bin"),
            pseudo_random(7000 + i, 4 << 20),
        );
    }
    let layer = a.add("big");
    let relay = Relay::new(&server.url, 64 << 20);
    let mut cmd = cache_command(&a, ["store", "push", &layer, &relay.url]);
    cmd.env("CI_TOKEN", &writer)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let push = cmd.spawn().expect("start ci store push");
    relay
        .reached
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("the push never sent 64 MB; server log:\n{}", server.log()));
    server.kill();
    relay.cut();
    let out = push.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "an I/O error (exit 3): {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: ") && err.contains(&relay.url) && !err.contains("panicked"),
        "the push says it failed, and where: {err}"
    );

    // Restarted on the same store: consistent, and no part of the layer.
    let server = Server::start(&s, &["."], &[]);
    verify_clean(&s);
    let held = du(&s);
    assert_eq!(held["layers"], 0, "{held:#}");
    assert_eq!(held["trees"], 0, "{held:#}");
    let fresh = Env::new();
    fresh
        .ci(["store", "pull", &layer, &server.url])
        .failure(2)
        .mentions("no layer");
    let none = du(&fresh);
    assert_eq!(
        (none["layers"].as_u64(), none["trees"].as_u64()),
        (Some(0), Some(0))
    );
    fresh.ci(["store", "show", &layer]).failure(2);

    // Pushed again, it arrives whole; pulled, it is the same layer.
    let mut cmd = cache_command(&a, ["store", "push", &layer, &server.url]);
    cmd.env("CI_TOKEN", &writer);
    a.output(cmd).success().mentions("pushed");
    verify_clean(&s);
    fresh
        .ci(["store", "pull", &layer, &server.url])
        .success()
        .mentions("pulled");
    let listing = |env: &Env| {
        env.ci(["--json", "store", "ls", "-r", &layer])
            .success()
            .json()
    };
    let (la, lf) = (listing(&a), listing(&fresh));
    assert_eq!(la.as_array().map(Vec::len), Some(50), "the 50 files");
    assert_eq!(la, lf, "the pulled layer lists as the pushed one");
    verify_clean(&fresh);
}

// ---- 5. caches that are down or silent ----

/// A port that nothing listens on (the kernel just gave it out, and took it back).
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server that accepts every connection and never answers.
fn silent() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            match c {
                Ok(c) => held.push(c),
                Err(_) => return,
            }
        }
    });
    url
}

#[test]
fn a_cache_that_is_down_or_silent_costs_one_warning_and_no_hang() {
    let down = format!("http://127.0.0.1:{}", dead_port());
    // The silent one in write mode too: nothing is queued for a cache that
    // is down.
    for (what, url, token, why) in [
        ("unreachable", down, None, "Connection refused"),
        ("silent", silent(), Some("anything"), "timeout"),
    ] {
        let env = host();
        let mut vars = vec![("CI_REMOTE_TIMEOUT", "2")];
        vars.extend(token.map(|t| ("CI_TOKEN", t)));
        let started = Instant::now();
        let b = build(&env, &url, &vars);
        let took = started.elapsed();
        let w = b.expect_warnings(1);
        assert!(
            w[0].contains(&url) && w[0].contains(why),
            "{what}: the warning names the cache and says {why:?}: {w:?}"
        );
        assert_eq!(b.executed().len(), 10, "{what}: everything built locally");
        // Not a timing test: proof only that the build did not hang on it.
        assert!(
            took < Duration::from_secs(30),
            "{what}: the build took {took:?}: it waited on the cache"
        );
        let s = b.summary();
        assert_eq!(s.misses, 1, "{what}: one lookup, then no more: {s:?}");
        assert!(
            b.out.stderr_str().contains("stopped asking after"),
            "{what}: the summary says why\n{}",
            b.out.stderr_str()
        );
    }
}

// ---- 6. nginx as a WebDAV cache ----

/// Debian's nginx in the foreground, serving `root` with PUT allowed, on a
/// free port of 127.0.0.1. Killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn nginx_bin() -> PathBuf {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("nginx is not installed: run ./scripts/test (it installs Debian's `nginx`)")
        });
    let v = Command::new(&bin).arg("-V").output().expect("nginx -V");
    let v = String::from_utf8_lossy(&v.stderr);
    assert!(
        v.contains("--with-http_dav_module"),
        "{} has no WebDAV module (`--with-http_dav_module` missing from `nginx -V`): install \
         Debian's `nginx` package\n{v}",
        bin.display()
    );
    bin
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let bin = nginx_bin();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let mut last = String::new();
        // Another process may take the port between our probe and nginx's bind.
        for _ in 0..5 {
            let port = dead_port();
            let d = dir.display();
            let conf = format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
                 pid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n\
                   client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
                   scgi_temp_path {d}/scgi;\n\
                   server {{\n    listen 127.0.0.1:{port};\n    root {d}/root;\n\
                     location / {{\n      dav_methods PUT;\n      create_full_put_path on;\n\
                       dav_access user:rw group:r all:r;\n      client_max_body_size 0;\n    }}\n  }}\n}}\n"
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = Command::new(&bin)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            // Listening, or exited.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx {
                        child,
                        port,
                        dir: dir.to_owned(),
                    };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx did not start; its error log:\n{last}");
    }

    fn url(&self) -> String {
        format!("webdav+http://127.0.0.1:{}/cache", self.port)
    }

    fn files(&self, dir: &str) -> usize {
        std::fs::read_dir(self.dir.join("root/cache").join(dir)).map_or(0, |d| d.count())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master takes its worker with it on SIGTERM; SIGKILL would
        // leave the worker holding the port.
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn nginx_webdav_serves_as_the_cache_for_builds_push_and_pull() {
    let tmp = Env::new();
    let nginx = Nginx::start(&tmp.root().join("nginx"));
    let url = nginx.url();
    let (a, b) = (host(), host());
    let on_a = build(&a, &url, &[("CI_REMOTE_CACHE_MODE", "write")]);
    assert_eq!(
        on_a.summary().sent_results,
        Some(9),
        "{}",
        on_a.out.stderr_str()
    );
    on_a.expect_warnings(0);
    assert_eq!(nginx.files("actions"), 9, "one entry per cacheable task");
    assert!(nginx.files("blobs") > 0 && nginx.files("trees") > 0);

    let on_b = build(&b, &url, &[]);
    assert_eq!(on_b.executed(), set(EFFECTS));
    let sb = on_b.summary();
    assert_eq!((sb.hits, sb.misses), (9, 0), "{sb:?}");
    on_b.expect_warnings(0);
    assert_same_outputs(&on_a, &on_b);
    verify_clean(&b);

    // A layer by hand: pushed, pushed again (nothing to send), pulled.
    gen_tree(&a.path("tree"), 300, &[3 << 20], 42);
    let layer = a.add("tree");
    let push = || a.output(cache_command(&a, ["store", "push", &layer, &url]));
    push().success().mentions("pushed");
    let again = push().success();
    assert!(
        again.stdout_str().contains(": 0 objects sent"),
        "{}",
        again.stdout_str()
    );
    let fresh = Env::new();
    fresh
        .ci(["store", "pull", &layer, &url])
        .success()
        .mentions("pulled");
    let listing = |env: &Env| {
        env.ci(["--json", "store", "ls", "-r", &layer])
            .success()
            .json()
    };
    assert_eq!(listing(&a), listing(&fresh));
    assert_same_export(&a, &fresh, &layer);
    verify_clean(&fresh);
    // A layer nginx does not have: a clean refusal.
    let elsewhere = Env::new();
    sample_tree(&elsewhere.path("only-here"));
    let other = elsewhere.add("only-here");
    Env::new()
        .ci(["store", "pull", &other, &url])
        .failure(2)
        .mentions("no tree");
}

// ---- 7. eviction ----

/// Variant `i` of cproject: another default name in main.c (so the binary
/// and everything after it differ) and 40 KiB of its own data in src/.
fn variant(i: u64) -> Env {
    let env = host();
    let path = env.path("src/main.c");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"world\"", &format!("\"world {i}\""))).unwrap();
    write(env.work(), "src/data.bin", pseudo_random(100 + i, 40 << 10));
    env
}

#[test]
fn a_small_cache_evicts_whole_entries_and_an_evicted_one_is_a_clean_miss() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &["--cache-max-size", "200K"]);
    let mut builds = Vec::new();
    for i in 0..5 {
        let env = variant(i);
        let b = build(&env, &server.url, &[("CI_TOKEN", &writer)]);
        assert_eq!(b.summary().sent_results, Some(9), "{}", b.out.stderr_str());
        builds.push((env, b));
    }
    // Eviction runs after uploads, on the server's own time: wait for it to
    // have run and brought the store under the limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = du(&s);
        let size = held["blob_bytes"].as_u64().unwrap() + held["tree_bytes"].as_u64().unwrap();
        if metric(&server.url, EVICTIONS) > 0 && size <= 200 << 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no eviction brought the store under 200K: {held:#}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    verify_clean(&s);

    // Every entry is whole or gone: a lookup is a pack or a 404, never an
    // entry whose objects went.
    let mut gone = Vec::new();
    for (i, (_, b)) in builds.iter().enumerate() {
        for (label, t) in &b.tasks {
            if EFFECTS.contains(&label.as_str()) {
                continue;
            }
            let r = server.get(&format!("/api/v1/cache/actions/{}", t.key));
            match r.status {
                200 => {}
                404 => gone.push((i, label.clone())),
                s => panic!("{label} of variant {i}: {s} {}", r.text()),
            }
        }
    }
    assert!(!gone.is_empty(), "something was evicted");
    assert!(
        gone.iter().any(|(i, _)| *i == 0),
        "the oldest went first: {gone:?}"
    );
    assert!(
        !server.log().contains("names an object that is gone"),
        "an entry outlived its objects:\n{}",
        server.log()
    );

    // Every variant again, each on a fresh host: what is left is a hit
    // (every object of it still there), what went is a plain miss (no
    // warning), and the outputs are the first builds'.
    for (i, (_, first)) in builds.iter().enumerate() {
        let again = variant(i as u64);
        let b = build(&again, &server.url, &[]);
        b.expect_warnings(0);
        let evicted = gone.iter().filter(|(v, _)| *v == i).count() as u64;
        let sb = b.summary();
        assert_eq!(
            (sb.hits, sb.misses),
            (9 - evicted, evicted),
            "variant {i}; evicted: {gone:?}"
        );
        assert_same_outputs(first, &b);
        verify_clean(&again);
    }
    verify_clean(&s);
}

// ---- 8. lazy fetching: `--remote-fetch=needed` ----

const OBJECTS_OUT: &str = r#"strata_cache_objects_total{protocol="strata",direction="out"}"#;
const BYTES_OUT: &str = r#"strata_cache_bytes_total{protocol="strata",direction="out"}"#;

/// `ci build --remote-cache url --remote-fetch fetch`, which must succeed.
fn build_fetching(env: &Env, url: &str, fetch: &str) -> Build {
    let cmd = cache_command(
        env,
        ["build", "--remote-cache", url, "--remote-fetch", fetch],
    );
    finish_build(env, env.output(cmd))
}

/// What the server sent (objects, bytes) while `f` ran.
fn sent_by(server: &str, f: impl FnOnce() -> Build) -> (Build, u64, u64) {
    let (o, b) = (metric(server, OBJECTS_OUT), metric(server, BYTES_OUT));
    let build = f();
    (
        build,
        metric(server, OBJECTS_OUT) - o,
        metric(server, BYTES_OUT) - b,
    )
}

/// The `N layers fetched on use, M left remote` figures of a lazy build.
fn lazy_figures(b: &Build) -> (u64, u64) {
    let err = b.out.stderr_str();
    let line = err
        .lines()
        .find(|l| l.starts_with("remote cache ") && l.contains(" left remote"))
        .unwrap_or_else(|| b.out.fail("no `… left remote` in the summary line"));
    let number_before = |word: &str| -> u64 {
        let i = line.find(word).unwrap();
        line[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        number_before(" layers fetched on use"),
        number_before(" left remote"),
    )
}

/// A host whose cache is `url` when `ci store` reads a layer held remotely.
fn store_cmd<const N: usize>(env: &Env, url: Option<&str>, args: [&str; N]) -> Output {
    let mut cmd = cache_command(env, args);
    if let Some(url) = url {
        cmd.env("CI_REMOTE_CACHE", url);
    }
    env.output(cmd)
}

#[test]
fn a_lazy_host_fetches_only_what_it_reads_and_store_commands_fetch_on_use() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &[]);
    let url = server.url.as_str();
    let a = host();
    let on_a = build(&a, url, &[("CI_TOKEN", &writer)]);
    assert_eq!(on_a.tasks.len(), 10);

    // The same build on two empty hosts: every object, then only what runs.
    let (full, all_objects, all_bytes) = sent_by(url, || build_fetching(&host(), url, "all"));
    assert_eq!(full.executed(), set(EFFECTS));
    let b = host();
    let (lazy, lazy_objects, lazy_bytes) = sent_by(url, || build_fetching(&b, url, "needed"));
    assert_eq!(
        lazy.executed(),
        set(EFFECTS),
        "B runs only tasks with effects"
    );
    assert_eq!(lazy.cached().len(), 9, "every cacheable result is a hit");
    lazy.expect_warnings(0);
    assert_same_outputs(&on_a, &lazy);
    eprintln!(
        "all-hits build: `all` fetched {all_objects} objects ({all_bytes} B), \
         `needed` {lazy_objects} objects ({lazy_bytes} B)"
    );
    assert!(
        lazy_objects * 2 < all_objects && lazy_bytes * 2 < all_bytes,
        "needed fetches far less: {lazy_objects} objects ({lazy_bytes} B) against \
         {all_objects} ({all_bytes} B)"
    );
    // //release:publish reads //release:tarball: that one layer came.
    let (fetched, left) = lazy_figures(&lazy);
    assert_eq!(fetched, 1, "{}", lazy.out.stderr_str());
    assert!(left >= 5, "the other outputs stay remote: {left}");
    let verified = b.ci(["store", "verify"]).success();
    verified.mentions("held remotely");

    // A layer held remotely, without a cache to fetch it from: a clear error.
    let slim = &on_a.tasks["//release:slim"].output;
    let out = store_cmd(&b, None, ["store", "cat", "//release:slim", "bin/hello"]).failure(2);
    let err = out.stderr_str();
    for needle in [slim.as_str(), url, "ci store pull"] {
        assert!(err.contains(needle), "the error names {needle:?}: {err}");
    }
    let co = b.root().join("checkout");
    store_cmd(
        &b,
        None,
        ["store", "checkout", "//build:docs", co.to_str().unwrap()],
    )
    .failure(2);

    // GC leaves the remote-only layers and their entries alone.
    b.ci(["store", "gc"]).success();
    b.ci(["store", "verify"])
        .success()
        .mentions("held remotely");

    // With a cache: fetched on use, the same bytes as on A.
    let listed = store_cmd(&b, Some(url), ["store", "ls", "-r", "//release:slim"]).success();
    assert_eq!(
        listed.stdout_str(),
        a.ci(["store", "ls", "-r", slim]).success().stdout_str()
    );
    let readme = "share/doc/hello/README.txt";
    let docs = &on_a.tasks["//build:docs"].output;
    let cat = store_cmd(&b, Some(url), ["store", "cat", docs, readme]).success();
    assert_eq!(
        cat.stdout(),
        a.ci(["store", "cat", docs, readme]).success().stdout()
    );
    // Now local: no cache needed.
    store_cmd(&b, None, ["store", "cat", "//release:slim", "bin/hello"]).success();
    verify_clean(&b);
    b.ci(["store", "gc"]).success();
    verify_clean(&b);

    // A rebuild is all hits still, and fetches nothing more.
    let again = build_fetching(&b, url, "needed");
    assert_eq!(again.executed(), set(EFFECTS));
    assert_eq!(lazy_figures(&again).0, 0, "nothing new is read");
}

#[test]
fn a_changed_task_fetches_exactly_its_remote_inputs_and_without_the_server_producers_rerun() {
    let s = server_env();
    let writer = token(&s, "ci", false);
    let server = Server::start(&s, &["."], &[]);
    let url = server.url.clone();
    let a = host();
    let on_a = build(&a, &url, &[("CI_TOKEN", &writer)]);
    let edit_smoke = |env: &Env| {
        let path = env.path("test/BUILD.star");
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replace("'Hello, strata!'\"]", "'Hello, strata!' && true\"]");
        assert_ne!(text, edited, "the edit applies");
        std::fs::write(&path, edited).unwrap();
    };

    // B: all hits, lazily; then //test:smoke changes: it reads //release:slim.
    let (b, c) = (host(), host());
    build_fetching(&b, &url, "needed");
    build_fetching(&c, &url, "needed");
    edit_smoke(&b);
    let edited = build_fetching(&b, &url, "needed");
    assert_eq!(
        edited.executed(),
        set(&["//test:smoke", "//release:publish"]),
        "only the edited task and effects run"
    );
    edited.expect_warnings(0);
    assert_eq!(
        lazy_figures(&edited).0,
        1,
        "one layer fetched: //release:slim\n{}",
        edited.out.stderr_str()
    );
    let slim = &on_a.tasks["//release:slim"].output;
    store_cmd(&b, None, ["store", "ls", slim]).success();
    // //build:binary, which nothing here read, is still remote.
    store_cmd(
        &b,
        None,
        ["store", "ls", &on_a.tasks["//build:binary"].output],
    )
    .failure(2);
    verify_clean(&b);

    // C, the server gone: the producers of what smoke reads run here.
    server.stop();
    edit_smoke(&c);
    let mut cmd = cache_command(
        &c,
        ["build", "--remote-cache", &url, "--remote-fetch", "needed"],
    );
    cmd.env("CI_REMOTE_TIMEOUT", "2");
    let offline = finish_build(&c, c.output(cmd));
    let w = offline.expect_warnings(1);
    assert!(w[0].contains(&url), "the warning names the cache: {w:?}");
    for producer in ["//build:objects", "//build:binary", "//release:slim"] {
        assert!(
            offline.executed().contains(producer),
            "{producer} ran here: {:?}",
            offline.executed()
        );
    }
    assert!(offline.executed().contains("//test:smoke"));
    for label in ["//build:objects", "//release:slim", "//release:tarball"] {
        assert_eq!(
            offline.tasks[label].output, on_a.tasks[label].output,
            "{label}: the same output as on A"
        );
    }
    c.ci([
        "store",
        "cat",
        "//release:slim",
        "share/doc/hello/README.txt",
    ])
    .success();
    verify_clean(&c);
}
