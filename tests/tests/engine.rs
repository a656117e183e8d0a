//! The build engine end to end (issue 4): caching and downstream cones,
//! transforms and merges, stages, context, `ci explain`, `ci rerun`,
//! `--check`, Ctrl-C, timeouts, retries, secrets, impure tasks, partial
//! outputs, and the read-only commands over runs. Every test writes its own
//! small workspace and uses the host executor.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_tests::*;

// ---- helpers ----

/// A workspace with `ci.toml` (host executor) and the given files.
fn workspace(files: &[(&str, &str)]) -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    for (rel, text) in files {
        write(env.work(), rel, text);
    }
    env
}

/// The event stream of a `ci --json build|rerun`, whatever its exit code.
struct Events {
    out: Output,
    events: Vec<Value>,
    summary: Value,
}

impl Events {
    #[track_caller]
    fn parse(out: Output) -> Events {
        let mut events = Vec::new();
        let mut summary = None;
        for line in out.lines() {
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => out.fail(&format!("a line of stdout is not JSON ({e}): {line}")),
            };
            match v.get("summary") {
                Some(s) => summary = Some(s.clone()),
                None => events.push(v),
            }
        }
        let Some(summary) = summary else {
            out.fail("expected a `summary` line at the end of the event stream")
        };
        Events {
            out,
            events,
            summary,
        }
    }

    #[track_caller]
    fn fail(&self, why: &str) -> ! {
        self.out.fail(why)
    }

    #[track_caller]
    fn expect(&self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.fail(&why());
        }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (usize, &'a Value)> + 'a {
        self.events
            .iter()
            .enumerate()
            .filter(move |(_, e)| e["event"] == kind)
    }

    /// The `task_finished` event of `label`.
    #[track_caller]
    fn finished(&self, label: &str) -> &Value {
        let mut it = self
            .of_kind("task_finished")
            .filter(|(_, e)| e["label"] == label);
        match (it.next(), it.next()) {
            (Some((_, e)), None) => e,
            _ => self.fail(&format!(
                "expected exactly one `task_finished` event for `{label}`"
            )),
        }
    }

    /// Labels whose task finished with this state and `cached` flag.
    fn labels_where(&self, f: impl Fn(&Value) -> bool) -> BTreeSet<String> {
        self.of_kind("task_finished")
            .filter(|(_, e)| f(e))
            .map(|(_, e)| e["label"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Tasks that did work this run (succeeded or failed, not from a cache).
    fn executed(&self) -> BTreeSet<String> {
        self.labels_where(|e| {
            e["cached"] == false && (e["state"] == "succeeded" || e["state"] == "failed")
        })
    }

    /// Tasks whose output came from the action cache or an earlier run.
    fn cached(&self) -> BTreeSet<String> {
        self.labels_where(|e| e["cached"] == true)
    }

    /// Labels of `task_started` events, in order (one per attempt).
    fn started(&self) -> Vec<String> {
        self.of_kind("task_started")
            .map(|(_, e)| e["label"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn count(&self, field: &str) -> u64 {
        self.summary[field].as_u64().unwrap_or(u64::MAX)
    }

    fn run_id(&self) -> String {
        self.summary["run"].as_str().unwrap_or_default().to_owned()
    }

    #[track_caller]
    fn expect_counts(&self, executed: u64, cached: u64, failed: u64) {
        let got = (
            self.count("executed"),
            self.count("cached"),
            self.count("failed"),
        );
        self.expect(got == (executed, cached, failed), || {
            format!(
                "expected executed/cached/failed = {executed}/{cached}/{failed}, the summary says {}/{}/{}",
                got.0, got.1, got.2
            )
        });
    }

    #[track_caller]
    fn expect_executed(&self, labels: &[&str]) {
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        let got = self.executed();
        self.expect(got == want, || {
            format!("expected exactly {want:?} to execute, got {got:?}")
        });
    }

    #[track_caller]
    fn expect_cached(&self, labels: &[&str]) {
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        let got = self.cached();
        self.expect(got == want, || {
            format!("expected exactly {want:?} to be cached, got {got:?}")
        });
    }
}

/// `ci --json ARGS…` (a build or a rerun), with extra environment variables.
fn json_run(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Events {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    Events::parse(env.ci_env(all, vars))
}

/// `ci --json build ARGS…` that must exit with `code`.
#[track_caller]
fn build_exiting(env: &Env, args: &[&str], code: i32, what: &str) -> Events {
    let mut all = vec!["build"];
    all.extend_from_slice(args);
    let ev = json_run(env, &all, &[]);
    if ev.out.code() != Some(code) {
        ev.fail(what);
    }
    ev
}

/// `ci --json build ARGS…` that must succeed.
#[track_caller]
fn build_ok(env: &Env, args: &[&str]) -> Events {
    build_exiting(env, args, 0, "expected the build to succeed")
}

/// `ci --json build ARGS…` that must fail with exit code 1 (a task failed).
#[track_caller]
fn build_failing(env: &Env, args: &[&str]) -> Events {
    build_exiting(env, args, 1, "expected the build to fail with exit code 1")
}

/// A TCP service on 127.0.0.1 for tasks with `network = True`: host tasks
/// run in a sandbox that shows them none of the test's files, so state
/// outside the workspace (a flaky service, a spy) is a server. Each
/// connection goes to `serve` on a thread of its own, numbered from 1.
fn service(serve: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    serve_on(listener, serve)
}

fn serve_on(
    listener: TcpListener,
    serve: impl Fn(usize, TcpStream) + Send + Sync + 'static,
) -> u16 {
    let port = listener.local_addr().expect("local address").port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { break };
            let serve = serve.clone();
            std::thread::spawn(move || serve(n + 1, conn));
        }
    });
    port
}

/// `ci store cat LAYER PATH` as a string.
#[track_caller]
fn cat(env: &Env, layer: &str, path: &str) -> String {
    env.ci(["store", "cat", layer, path]).success().stdout_str()
}

// ---- caching ----

/// Two sources feeding a diamond-ish graph: `left` reaches a, c, d and top;
/// `right` reaches b, d, e and top.
const CONE: &str = r#"
local_source(name = "left", path = "left")
local_source(name = "right", path = "right")
task(name = "a", deps = [":left"], script = 'cat "$CI_IN/left/x.txt" > a.txt')
task(name = "b", deps = [":right"], script = 'cat "$CI_IN/right/y.txt" > b.txt')
task(name = "c", deps = [":a"], script = 'sed s/^/c:/ "$CI_IN/a/a.txt" > c.txt')
task(name = "d", deps = [":a", ":b"], script = 'cat "$CI_IN/a/a.txt" "$CI_IN/b/b.txt" > d.txt')
task(name = "e", deps = [":b"], script = 'sed s/^/e:/ "$CI_IN/b/b.txt" > e.txt')
task(name = "top", deps = [":c", ":d", ":e"], script = 'cat "$CI_IN/c/c.txt" "$CI_IN/d/d.txt" "$CI_IN/e/e.txt" > top.txt')
"#;

#[test]
fn a_second_build_executes_nothing_and_an_edit_rebuilds_exactly_its_cone() {
    let env = workspace(&[
        ("BUILD.star", CONE),
        ("left/x.txt", "x1\n"),
        ("right/y.txt", "y1\n"),
    ]);
    let all = [
        "//:a", "//:b", "//:c", "//:d", "//:e", "//:left", "//:right", "//:top",
    ];

    let first = build_ok(&env, &[]);
    first.expect_counts(8, 0, 0);
    first.expect_executed(&all);
    assert_eq!(cat(&env, "//:top", "top.txt"), "c:x1\nx1\ny1\ne:y1\n");

    let second = build_ok(&env, &[]);
    second.expect_counts(0, 8, 0);
    second.expect_cached(&all);
    second.expect(second.started().is_empty(), || {
        "a cached task was started".into()
    });

    write(env.work(), "left/x.txt", "x2\n");
    let third = build_ok(&env, &[]);
    third.expect_executed(&["//:left", "//:a", "//:c", "//:d", "//:top"]);
    third.expect_cached(&["//:right", "//:b", "//:e"]);
    third.expect_counts(5, 3, 0);
    assert_eq!(cat(&env, "//:top", "top.txt"), "c:x2\nx2\ny1\ne:y1\n");

    // Asking for a part of the graph is all cached too.
    let part = build_ok(&env, &["//:e"]);
    part.expect_cached(&["//:e", "//:b", "//:right"]);
    part.expect_counts(0, 3, 0);
}

// ---- transforms and merges ----

const FORKS: &str = r#"
task(name = "base", script = 'mkdir -p d keep; echo 1 > d/a; echo 2 > d/b; echo k > keep/k; echo c > common')
task(name = "transformed", transform = ":base", script = 'echo changed > d/a; rm d/b; echo new > d/n')
task(name = "left", transform = ":base", script = 'echo L > left; echo L > common')
task(name = "right", transform = ":base", script = 'echo R > right; echo R > common')
task(name = "right_only", transform = ":base", script = 'echo R > right')
merge(name = "clean", base = ":base", sides = [":left", ":right_only"])
merge(name = "conflict", base = ":base", sides = [":left", ":right"])
merge(name = "ours", base = ":base", sides = [":left", ":right"], on_conflict = "ours")
merge(name = "theirs", base = ":base", sides = [":left", ":right"], on_conflict = "theirs")
"#;

#[test]
fn a_transform_diff_holds_only_what_the_task_changed() {
    let env = workspace(&[("pkg/BUILD.star", FORKS)]);
    build_ok(&env, &["//pkg:transformed"]);
    let diff = env
        .ci(["store", "diff", "//pkg:base", "//pkg:transformed"])
        .success();
    assert_eq!(
        diff.lines(),
        ["M d/a", "D d/b", "A d/n"],
        "{}",
        diff.stdout_str()
    );
    assert_eq!(cat(&env, "//pkg:transformed", "keep/k"), "k\n");
    assert_eq!(cat(&env, "//pkg:transformed", "d/a"), "changed\n");
}

#[test]
fn merges_join_disjoint_changes_and_refuse_or_resolve_conflicts() {
    let env = workspace(&[("pkg/BUILD.star", FORKS)]);

    build_ok(&env, &["//pkg:clean"]);
    assert_eq!(cat(&env, "//pkg:clean", "left"), "L\n");
    assert_eq!(cat(&env, "//pkg:clean", "right"), "R\n");
    assert_eq!(cat(&env, "//pkg:clean", "common"), "L\n");
    assert_eq!(cat(&env, "//pkg:clean", "d/a"), "1\n");
    let diff = env
        .ci(["store", "diff", "//pkg:base", "//pkg:clean"])
        .success();
    assert_eq!(
        diff.lines(),
        ["M common", "A left", "A right"],
        "{}",
        diff.stdout_str()
    );

    let out = env.ci(["build", "//pkg:conflict"]).failure(1);
    let err = out.stderr_str();
    if !(err.contains("`common`") && err.contains("onflict")) {
        out.fail("expected stderr to name the conflicting path `common`");
    }
    if err.contains("`left`") || err.contains("`right`") {
        out.fail("only `common` conflicts");
    }

    build_ok(&env, &["//pkg:ours", "//pkg:theirs"]);
    assert_eq!(cat(&env, "//pkg:ours", "common"), "L\n");
    assert_eq!(cat(&env, "//pkg:theirs", "common"), "R\n");
    for side in ["//pkg:ours", "//pkg:theirs"] {
        assert_eq!(cat(&env, side, "left"), "L\n");
        assert_eq!(cat(&env, side, "right"), "R\n");
    }
}

// ---- stages and context ----

#[test]
fn a_later_stage_starts_after_every_task_of_earlier_stages_finished() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
stage(name = "first")
stage(name = "second", after = ["first"])
stage(name = "third", after = ["second"])
task(name = "f1", script = 'echo 1 > f', stage = "first")
task(name = "f2", script = 'seq 1 50000 > f', stage = "first")
task(name = "f3", script = 'echo 3 > f', stage = "first")
task(name = "s1", script = 'echo s1 > s', stage = "second")
task(name = "s2", script = 'echo s2 > s', stage = "second")
task(name = "t1", script = 'echo t1 > t', stage = "third")
"#,
    )]);
    let ev = build_ok(&env, &["-j", "8"]);
    ev.expect_counts(6, 0, 0);
    let stages: [&[&str]; 3] = [
        &["//:f1", "//:f2", "//:f3"],
        &["//:s1", "//:s2"],
        &["//:t1"],
    ];
    let index = |kind: &str, label: &str| {
        ev.of_kind(kind)
            .find(|(_, e)| e["label"] == label)
            .map(|(i, _)| i)
            .unwrap_or_else(|| ev.fail(&format!("no `{kind}` event for `{label}`")))
    };
    for (i, earlier) in stages.iter().enumerate() {
        for later in &stages[i + 1..] {
            let last_finish = earlier.iter().map(|l| index("task_finished", l)).max();
            let first_start = later.iter().map(|l| index("task_started", l)).min();
            ev.expect(last_finish < first_start, || {
                format!("a task of {later:?} started before every task of {earlier:?} finished")
            });
        }
    }
}

#[test]
fn context_reaches_grandchildren_and_changes_their_keys() {
    let env = workspace(&[
        (
            "BUILD.star",
            r#"
local_source(name = "cfg", path = "cfg")
task(name = "writer", deps = [":cfg"], script = 'echo "FLAVOR=$(cat "$CI_IN/cfg/flavor")" >> "$CI_CONTEXT"; echo const > out')
task(name = "child", deps = [":writer"], script = 'echo const > out')
task(name = "grandchild", deps = [":child"], script = 'echo "$FLAVOR" > flavor')
task(name = "bystander", script = 'echo "${FLAVOR:-unset}" > flavor')
"#,
        ),
        ("cfg/flavor", "vanilla\n"),
    ]);
    build_ok(&env, &[]);
    assert_eq!(cat(&env, "//:grandchild", "flavor"), "vanilla\n");
    assert_eq!(cat(&env, "//:bystander", "flavor"), "unset\n");

    write(env.work(), "cfg/flavor", "chocolate\n");
    let ev = build_ok(&env, &[]);
    // The outputs of writer and child did not change: only the context did,
    // and it is part of the keys of every descendant.
    ev.expect_executed(&["//:cfg", "//:writer", "//:child", "//:grandchild"]);
    ev.expect_cached(&["//:bystander"]);
    assert_eq!(cat(&env, "//:grandchild", "flavor"), "chocolate\n");

    for label in ["//:child", "//:grandchild"] {
        let out = env.ci(["explain", label]).success();
        let text = out.stdout_str();
        if !text.contains("context `FLAVOR` changed `vanilla`→`chocolate`") {
            out.fail("expected `ci explain` to name the changed context value");
        }
        if text.contains("input `") {
            out.fail("the inputs of this task did not change");
        }
    }
}

#[test]
fn explain_names_the_changed_env_value_and_input() {
    let build = |v: &str| {
        format!(
            r#"
local_source(name = "src", path = "src")
task(name = "t", deps = [":src"], env = {{"V": "{v}"}}, script = 'cat "$CI_IN/src/in.txt" > out; echo "$V" >> out')
"#
        )
    };
    let env = workspace(&[("BUILD.star", &build("1")), ("src/in.txt", "one\n")]);
    build_ok(&env, &[]);
    let out = env.ci(["explain", "//:t"]).success();
    if !out.stdout_str().contains("never re-keyed") {
        out.fail("a task that ran once has no earlier key to compare with");
    }

    write(env.work(), "BUILD.star", build("2"));
    build_ok(&env, &[]).expect_executed(&["//:t"]);
    let out = env.ci(["explain", "//:t"]).success();
    let text = out.stdout_str();
    if !text.contains("env `V` changed `1`→`2`") || text.contains("input `") {
        out.fail("expected `ci explain` to name exactly the env change");
    }

    write(env.work(), "src/in.txt", "two\n");
    build_ok(&env, &[]).expect_executed(&["//:src", "//:t"]);
    let out = env.ci(["explain", "//:t"]).success();
    let text = out.stdout_str();
    if !text.contains("input `//:src` changed") || text.contains("env `V`") {
        out.fail("expected `ci explain` to name exactly the input change");
    }
    let json = env.ci(["--json", "explain", "//:t"]).success().json();
    assert_eq!(json["label"], "//:t");
    assert_eq!(json["changes"].as_array().map(Vec::len), Some(1), "{json}");
}

// ---- failures, rerun, check ----

#[test]
fn rerun_runs_only_the_failed_task_and_its_dependants() {
    let env = Env::new();
    // The failure depends on something outside the workspace, a service
    // that is down and then up: a rerun keeps the source snapshot of the
    // run it re-runs. (The port is free until the service starts on it.)
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(
        env.work(),
        "BUILD.star",
        format!(
            r#"
task(name = "ok", script = 'echo ok > ok')
task(name = "independent", script = 'echo i > i')
task(name = "gate", deps = [":ok"], network = True, env = {{"PORT": "{port}"}}, script = 'echo partial > partial; bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT"; echo passed > passed')
task(name = "after", deps = [":gate"], script = 'cp "$CI_IN/gate/passed" .')
"#
        ),
    );
    let first = build_failing(&env, &["-k"]);
    assert_eq!(first.finished("//:gate")["state"], "failed");
    assert_eq!(first.finished("//:after")["state"], "skipped");
    let failed_run = first.run_id();

    serve_on(
        TcpListener::bind(("127.0.0.1", port)).expect("bind the service's port"),
        |_, _| {},
    );
    let again = json_run(&env, &["rerun", &failed_run], &[]);
    if again.out.code() != Some(0) {
        again.fail("expected the rerun to succeed");
    }
    let mut started = again.started();
    started.sort();
    again.expect(started == ["//:after", "//:gate"], || {
        format!("expected only `//:gate` and `//:after` to start, got {started:?}")
    });
    again.expect_executed(&["//:gate", "//:after"]);
    again.expect_cached(&["//:ok", "//:independent"]);
    again.expect_counts(2, 0, 0);
    again.expect(again.count("kept") == 2, || {
        "expected the summary to count 2 kept tasks".into()
    });
    assert_eq!(cat(&env, "//:after", "passed"), "passed\n");

    let show = env.ci(["run", "show", &again.run_id()]).success();
    if !show
        .stdout_str()
        .contains(&format!("re-run of {failed_run}"))
    {
        show.fail("expected `ci run show` to say which run this re-ran");
    }
}

/// `ci rerun` keeps every task that succeeded, sources included: it re-runs
/// the same inputs (like re-running a CI job on the same commit), so an edit
/// of the workspace is seen by `ci build`, not by `ci rerun`.
#[test]
fn rerun_keeps_the_source_snapshot_of_the_run_it_reruns() {
    let env = workspace(&[
        ("src/README", "no marker yet\n"),
        (
            "BUILD.star",
            r#"
local_source(name = "src", path = "src")
task(name = "gate", deps = [":src"], script = 'test -f "$CI_IN/src/marker"; echo passed > passed')
"#,
        ),
    ]);
    let failed_run = build_failing(&env, &[]).run_id();
    write(env.work(), "src/marker", "");

    let again = json_run(&env, &["rerun", &failed_run], &[]);
    again.expect(again.out.code() == Some(1), || {
        "expected the rerun to fail again".into()
    });
    again.expect_executed(&["//:gate"]);
    again.expect_cached(&["//:src"]);

    let fixed = build_ok(&env, &[]);
    fixed.expect_executed(&["//:src", "//:gate"]);
}

#[test]
fn check_flags_a_task_whose_output_differs() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
task(name = "random", script = 'head -c 16 /dev/urandom > out')
task(name = "steady", script = 'echo same > out')
"#,
    )]);
    build_ok(&env, &[]);
    // --keep-going: without it, `random` failing first cancels `steady`
    // when both run at once.
    let ev = build_failing(&env, &["--check", "--keep-going"]);
    let random = ev.finished("//:random");
    assert_eq!(random["state"], "failed");
    let error = random["error"].as_str().unwrap_or_default();
    ev.expect(error.contains("`out`"), || {
        "expected the error to name `out`".into()
    });
    assert_eq!(ev.finished("//:steady")["state"], "succeeded");

    let human = env.ci(["build", "--check", "--keep-going"]).failure(1);
    let err = human.stderr_str();
    if !(err.contains("//:random") && err.contains("`out`")) || err.contains("FAILED //:steady") {
        human.fail("expected stderr to name exactly `//:random` and the path `out`");
    }
}

#[test]
fn a_failed_task_keeps_its_partial_output() {
    let env = workspace(&[(
        "BUILD.star",
        "task(name = \"broken\", script = 'echo half > partial; echo oops >&2; exit 3')\n",
    )]);
    let ev = build_failing(&env, &[]);
    let fin = ev.finished("//:broken");
    assert_eq!(fin["exit_code"], 3);
    let output = fin["output"].as_str().unwrap_or_default().to_owned();
    assert!(is_digest(&output), "{fin}");
    assert_eq!(cat(&env, &output, "partial"), "half\n");

    let show = env.ci(["run", "show", "latest"]).success();
    let line = show
        .lines()
        .into_iter()
        .find(|l| l.starts_with("  ") && l.ends_with(" //:broken"))
        .unwrap_or_else(|| show.fail("expected `ci run show` to list `//:broken`"));
    if !(line.contains("failed") && line.contains(&output[..12])) {
        show.fail("expected the failed task's line to show its partial output");
    }
    let logs = env.ci(["logs", "latest", "//:broken"]).success();
    assert_eq!(logs.stdout_str(), "oops\n");
}

#[test]
fn a_task_past_its_timeout_fails_with_timed_out() {
    let env = workspace(&[(
        "BUILD.star",
        "task(name = \"slow\", script = 'sleep 30', timeout = 1)\n",
    )]);
    let started = Instant::now();
    let ev = build_failing(&env, &[]);
    let error = ev.finished("//:slow")["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ev.expect(error.contains("timed out"), || {
        "expected `timed out`".into()
    });
    ev.expect(started.elapsed() < Duration::from_secs(20), || {
        "the timeout did not stop the task".into()
    });
}

#[test]
fn retries_run_a_failed_attempt_again_within_the_build() {
    let env = Env::new();
    // A flaky service: it answers each connection with its number, and the
    // task fails on the first.
    let port = service(|n, mut conn| {
        let _ = writeln!(conn, "{n}");
    });
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(
        env.work(),
        "BUILD.star",
        format!(
            r#"
task(
    name = "flaky",
    network = True,
    env = {{"PORT": "{port}"}},
    script = 'n=$(bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT; head -n1 <&3"); test "$n" -ge 2; echo $n > attempt',
    retries = 2,
)
task(name = "hopeless", script = 'exit 1', retries = 1)
"#
        ),
    );
    let ev = build_failing(&env, &["-k"]);
    let attempts = |label: &str| -> Vec<u64> {
        ev.of_kind("task_started")
            .filter(|(_, e)| e["label"] == label)
            .map(|(_, e)| e["attempt"].as_u64().unwrap_or(0))
            .collect()
    };
    assert_eq!(attempts("//:flaky"), [1, 2]);
    assert_eq!(ev.finished("//:flaky")["state"], "succeeded");
    assert_eq!(cat(&env, "//:flaky", "attempt"), "2\n");
    assert_eq!(attempts("//:hopeless"), [1, 2]);
    assert_eq!(ev.finished("//:hopeless")["state"], "failed");
}

// ---- secrets and impure tasks ----

#[test]
fn a_secret_reaches_the_task_but_not_its_log_or_key() {
    const SECRET: &str = "s3cr3t-value-42";
    const OTHER: &str = "another-secret-value";
    let env = workspace(&[(
        "BUILD.star",
        r#"
task(name = "deploy", secret_env = ["TOKEN"], script = 'echo "token=$TOKEN"; echo ${#TOKEN} > length')
task(name = "needs", secret_env = ["MISSING_SECRET_FOR_TEST"], script = 'true')
"#,
    )]);
    let ev = json_run(&env, &["build", "//:deploy"], &[("TOKEN", SECRET)]);
    ev.expect(ev.out.code() == Some(0), || {
        "expected the build to succeed".into()
    });
    ev.expect(!ev.out.all_str().contains(SECRET), || {
        "the secret leaked into the output".into()
    });
    assert_eq!(
        cat(&env, "//:deploy", "length"),
        format!("{}\n", SECRET.len())
    );

    let logs = env.ci(["logs", "latest", "//:deploy"]).success();
    assert_eq!(logs.stdout_str(), "token=***\n");
    for args in [
        vec!["--json", "run", "show", "latest"],
        vec!["--json", "explain", "//:deploy"],
    ] {
        let out = env.ci(args).success();
        if out.stdout_str().contains(SECRET) {
            out.fail("the secret leaked");
        }
    }
    let leaked = store_contains(env.store(), SECRET.as_bytes());
    assert!(leaked.is_empty(), "the secret is stored in {leaked:?}");

    // Another value: same key, nothing runs.
    let ev = json_run(&env, &["build", "//:deploy"], &[("TOKEN", OTHER)]);
    ev.expect(ev.out.code() == Some(0), || {
        "expected the build to succeed".into()
    });
    ev.expect_cached(&["//:deploy"]);
    ev.expect_counts(0, 1, 0);

    // A task whose secret is not set cannot run, and says what to do.
    let out = env.ci(["build", "//:needs"]).failure(1);
    if !out.stderr_str().contains("`MISSING_SECRET_FOR_TEST`") {
        out.fail("expected the error to name the missing secret");
    }
}

/// Files below `dir` whose bytes contain `needle`.
fn store_contains(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    walk(dir, dir, &mut |rel, path, meta| {
        if meta.is_file() {
            let bytes = std::fs::read(path).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(rel.to_owned());
            }
        }
    });
    found
}

#[test]
fn an_impure_task_sees_its_previous_output() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
task(
    name = "counter",
    pure = False,
    script = 'if [ -f "$CI_PREV/n" ]; then echo $(( $(cat "$CI_PREV/n") + 1 )) > n; else echo 1 > n; fi',
)
"#,
    )]);
    build_ok(&env, &[]).expect_executed(&["//:counter"]);
    assert_eq!(cat(&env, "//:counter", "n"), "1\n");
    let second = build_ok(&env, &[]);
    second.expect_executed(&["//:counter"]);
    second.expect_counts(1, 0, 0);
    assert_eq!(cat(&env, "//:counter", "n"), "2\n");
}

// ---- inputs ----

const READS_INPUTS: &str = r#"
task(name = "a", script = 'mkdir -p d; echo A > d/a; ln -s d/a link')
task(name = "b", script = 'echo B > b')
task(
    name = "reader",
    deps = {"first": ":a", "second": ":b"},
    script = 'ls "$CI_IN" > mounts; cat "$CI_IN/first/d/a" "$CI_IN/first/link" "$CI_IN/second/b" > all',
)
task(
    name = "writer",
    deps = [":a"],
    script = 'if echo x > "$CI_IN/a/d/new" 2>/dev/null || rm -f "$CI_IN/a/d/a" 2>/dev/null; then echo wrote > verdict; else echo refused > verdict; fi; test -f "$CI_IN/a/d/a"',
)
task(
    name = "counter",
    deps = [":b"],
    pure = False,
    script = 'n=0; if [ -f "$CI_PREV/n" ]; then n=$(cat "$CI_PREV/n"); fi; echo $((n + 1)) > n; if [ -n "${CI_PREV:-}" ]; then echo x > "$CI_PREV/n" 2>/dev/null || true; fi',
)
"#;

/// Inputs are FUSE views by default and copies with `inputs = "copy"`: the
/// same outputs either way, and a task cannot change its inputs (even as
/// root, where FUSE is the only thing that says no).
#[test]
fn inputs_read_the_same_mounted_or_copied_and_stay_read_only() {
    if !fuse_or_fail("inputs_read_the_same_mounted_or_copied_and_stay_read_only") {
        return;
    }
    let mut outputs = Vec::new();
    for mode in ["mount", "copy"] {
        let env = workspace(&[("BUILD.star", READS_INPUTS)]);
        write(
            env.work(),
            "ci.toml",
            format!("[build]\nexecutor = \"host\"\ninputs = \"{mode}\"\n"),
        );
        let ev = build_ok(&env, &[]);
        let note = ev
            .of_kind("note")
            .map(|(_, e)| e["message"].as_str().unwrap_or_default().to_owned())
            .find(|m| m.starts_with("inputs: "))
            .unwrap_or_else(|| ev.fail("expected a note saying how inputs are laid out"));
        let want = if mode == "mount" {
            "FUSE views"
        } else {
            "copies"
        };
        ev.expect(note.contains(want), || format!("{mode}: {note}"));
        assert_eq!(
            cat(&env, "//:reader", "mounts"),
            "first\nsecond\n",
            "{mode}"
        );
        assert_eq!(cat(&env, "//:reader", "all"), "A\nA\nB\n", "{mode}");
        if mode == "mount" {
            assert_eq!(cat(&env, "//:writer", "verdict"), "refused\n");
        }
        // The previous output is read-only too, and the counter counts.
        build_ok(&env, &[]).expect_executed(&["//:counter"]);
        assert_eq!(cat(&env, "//:counter", "n"), "2\n", "{mode}");
        // Nothing is left mounted or on disk once the build is over.
        let work = env.store().join("work");
        let left: Vec<_> = std::fs::read_dir(&work)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{mode}: left behind: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        assert!(
            !mounts.contains(&env.store().display().to_string()),
            "{mode}: a mount is left in the store:\n{mounts}"
        );
        outputs.push(
            env.ci(["--json", "run", "show", "latest"]).success().json()["tasks"]["//:reader"]
                ["output"]
                .clone(),
        );
    }
    assert_eq!(outputs[0], outputs[1], "the same layer either way");
}

/// A task without inputs gets an empty `$CI_IN`, and no FUSE mount is made
/// for it; what a task leaves there never reaches the next task of its slot.
#[test]
fn tasks_without_inputs_get_an_empty_ci_in_and_no_mount() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
stage(name = "first")
stage(name = "second", after = ["first"])
task(name = "litter", stage = "first", script = 'echo junk > "$CI_IN/junk" 2>/dev/null || true; echo done > out')
task(name = "look", stage = "second", script = 'ls -A "$CI_IN" > listing')
"#,
    )]);
    let ev = build_ok(&env, &["-j", "1"]);
    assert_eq!(cat(&env, "//:look", "listing"), "");
    let mounted = ev.of_kind("note").any(|(_, e)| {
        e["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("inputs: ")
    });
    ev.expect(!mounted, || {
        "no task reads inputs: nothing to mount or announce".into()
    });
}

// ---- Ctrl-C ----

/// A number of seconds nothing else on the machine runs `sleep` with, so
/// the task's process can be found by its command line.
fn sleep_marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("1000.{}{:09}", std::process::id(), nanos)
}

#[test]
fn ctrl_c_leaves_no_process_and_no_mount() {
    let marker = sleep_marker();
    let env = workspace(&[(
        "BUILD.star",
        &format!(
            r#"
task(name = "base", script = 'echo b > b')
task(name = "sleeper", transform = ":base", script = 'echo ready; sleep {marker}')
"#
        ),
    )]);
    let mut running = env.spawn(["--json", "build"]);
    let mut lines = BufReader::new(running.take_stdout()).lines();
    let mut seen = Vec::new();
    let mut next_event = |seen: &mut Vec<String>| -> Option<Value> {
        let line = lines.next()?.expect("read the event stream");
        seen.push(line.clone());
        Some(serde_json::from_str(&line).unwrap_or(Value::Null))
    };
    // Wait for the task's first line of output: its process runs.
    loop {
        let Some(event) = next_event(&mut seen) else {
            panic!("the build ended before the task ran:\n{}", seen.join("\n"));
        };
        if event["event"] == "task_log"
            && event["label"] == "//:sleeper"
            && event["line"] == "ready"
        {
            break;
        }
    }
    assert!(
        !processes_with(&marker).is_empty(),
        "the task's process is not running"
    );

    running.signal(libc::SIGINT);
    let mut last = Value::Null;
    while let Some(event) = next_event(&mut seen) {
        last = event;
    }
    let out = running.wait();
    let seen = seen.join("\n");
    if out.code() != Some(130) {
        out.fail(&format!(
            "expected exit code 130 after SIGINT; events:\n{seen}"
        ));
    }
    if last["summary"]["state"] != "cancelled"
        || !seen.contains(r#""label":"//:sleeper","state":"cancelled""#)
    {
        out.fail(&format!(
            "expected the task and the run to be cancelled; events:\n{seen}"
        ));
    }
    let left = processes_with(&marker);
    if !left.is_empty() {
        out.fail(&format!("processes outlived the build: {left:?}"));
    }
    let work = env.store().join("work");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let under: Vec<&str> = mounts
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(1)
                .is_some_and(|m| Path::new(m).starts_with(&work))
        })
        .collect();
    if !under.is_empty() {
        out.fail(&format!(
            "mounts left under `{}`: {under:?}",
            work.display()
        ));
    }
    let leftovers: Vec<_> = std::fs::read_dir(&work)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if !leftovers.is_empty() {
        out.fail(&format!(
            "work directories left in `{}`: {leftovers:?}",
            work.display()
        ));
    }
    let runs = env.ci(["runs"]).success().stdout_str();
    assert!(runs.contains(" cancelled "), "{runs}");
}

#[test]
fn jobs_bound_the_commands_running_at_once() {
    // Each command tells a spy when it enters its critical part and when it
    // leaves (and waits for the answer, so the count is exact); the spy
    // counts the commands inside on each entry. -j 2 must never let a third in.
    let env = workspace(&[]);
    let inside = Arc::new(Mutex::new((0u32, Vec::new())));
    let spy = inside.clone();
    let port = service(move |_, conn| {
        let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
        let mut conn = conn;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Ok(mut s) = spy.lock() {
                match line.trim() {
                    "enter" => {
                        s.0 += 1;
                        let now = s.0;
                        s.1.push(now);
                    }
                    _ => s.0 -= 1,
                }
            }
            let _ = conn.write_all(b"ok\n");
            line.clear();
        }
    });
    let mut build = String::new();
    for i in 0..6 {
        build.push_str(&format!(
            "task(name = \"t{i}\", network = True, cmd = [\"bash\", \"-ec\", \"exec 3<>/dev/tcp/127.0.0.1/{port}; echo enter >&3; read -r ack <&3; sleep 0.3; echo leave >&3; read -r ack <&3; echo {i} > out\"])\n"
        ));
    }
    write(env.work(), "BUILD.star", &build);
    build_ok(&env, &["-j", "2"]);
    let counts = inside.lock().expect("the spy's counts").1.clone();
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert_eq!(
        counts.iter().max(),
        Some(&2),
        "at most and at some point 2 at once: {counts:?}"
    );
}

#[test]
fn a_killed_build_still_shows_the_tasks_it_finished() {
    let marker = sleep_marker();
    // `quick` ends after the run record's first periodic save is due.
    let env = workspace(&[(
        "BUILD.star",
        &format!(
            r#"
task(name = "quick", script = 'sleep 1.2; echo q > q')
task(name = "hang", script = 'echo ready; sleep {marker}')
"#
        ),
    )]);
    let mut running = env.spawn(["--json", "build", "-j", "2"]);
    let mut lines = BufReader::new(running.take_stdout()).lines();
    let mut seen = Vec::new();
    let (mut run, mut quick_done, mut hang_runs) = (String::new(), false, false);
    while !(quick_done && hang_runs) {
        let Some(line) = lines.next() else {
            panic!("the build ended early:\n{}", seen.join("\n"));
        };
        let line = line.expect("read the event stream");
        let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        seen.push(line);
        match event["event"].as_str() {
            Some("run_started") => run = event["run"].as_str().unwrap_or_default().to_owned(),
            Some("task_finished") if event["label"] == "//:quick" => quick_done = true,
            Some("task_log") if event["label"] == "//:hang" => hang_runs = true,
            _ => {}
        }
    }
    // The save follows the event: wait until a reader sees it (it is due,
    // so it comes within moments), then kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let r = env.ci(["--json", "run", "show", &run]).success().json();
        if r["tasks"]["//:quick"]["state"] == "succeeded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed outright: nothing runs at its end.
    assert!(
        running.kill_after(Duration::ZERO).is_none(),
        "the build ended on its own:\n{}",
        seen.join("\n")
    );
    for pid in processes_with(&marker) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
    }
    let shown = env.ci(["--json", "run", "show", &run]).success();
    let record = shown.json();
    if record["state"] != "running" || record["tasks"]["//:quick"]["state"] != "succeeded" {
        shown.fail(&format!(
            "expected the killed run to show `quick` succeeded; events:\n{}",
            seen.join("\n")
        ));
    }
    // The next build cleans up after it; `quick` is a cache hit.
    write(
        env.work(),
        "BUILD.star",
        "task(name = \"quick\", script = 'sleep 1.2; echo q > q')\n",
    );
    let events = build_ok(&env, &[]);
    assert_eq!(events.summary["cached"], 1, "{}", events.out.all_str());
}

/// Pids of processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may be gone by now: that is fine.
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("{name}: {text}"));
        }
    }
    found
}

// ---- reading runs ----

const SMALL: &str = r#"
task(name = "hello", script = 'echo "hello out"; echo "hello err" >&2; echo hi > greeting')
task(name = "world", deps = {"h": ":hello"}, script = 'cat "$CI_IN/h/greeting" > both; echo world >> both')
"#;

#[test]
fn graph_prints_mermaid_dot_and_json() {
    let env = workspace(&[
        (
            "BUILD.star",
            "stage(name = \"build\")\nstage(name = \"test\", after = [\"build\"])\n",
        ),
        (
            "pkg/BUILD.star",
            &SMALL.replace("script", "stage = \"build\", script"),
        ),
    ]);
    let mermaid = env
        .ci(["graph", "--format", "mermaid"])
        .success()
        .stdout_str();
    assert!(mermaid.starts_with("flowchart"), "{mermaid}");
    assert!(
        mermaid.contains("\"//pkg:hello\"") && mermaid.contains("\"//pkg:world\""),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("-->|h|"),
        "expected an edge named by its mount:\n{mermaid}"
    );
    assert!(mermaid.contains("stage build"), "{mermaid}");

    let dot = env.ci(["graph"]).success().stdout_str();
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("\"//pkg:hello\" -> \"//pkg:world\""), "{dot}");

    for args in [vec!["--json", "graph"], vec!["graph", "--format", "json"]] {
        let json = env.ci(args).success().json();
        assert!(json["tasks"]["//pkg:hello"].is_object(), "{json}");
        assert!(json["tasks"]["//pkg:world"].is_object(), "{json}");
        assert_eq!(
            json["order"],
            serde_json::json!(["//pkg:hello", "//pkg:world"])
        );
    }

    // Targets narrow the graph to their dependencies.
    let only = env.ci(["--json", "graph", "//pkg:hello"]).success().json();
    assert!(only["tasks"]["//pkg:world"].is_null(), "{only}");
    env.ci(["graph", "--format", "png"]).failure(2);
}

/// The model `ci --json graph` prints, without the workspace root.
fn graph_json(env: &Env) -> Value {
    let mut json = env.ci(["--json", "graph"]).success().json();
    json.as_object_mut().map(|o| o.remove("root"));
    json
}

#[test]
fn the_load_cache_sees_every_edit_that_changes_the_model() {
    let env = workspace(&[
        (
            "BUILD.star",
            "load(\"//lib:defs.star\", \"greet\")\ngreet(\"a\")\nlocal_source(name = \"tree\", path = \"data\")\n",
        ),
        (
            "lib/defs.star",
            "def greet(n):\n    task(name = n, script = 'echo one > out')\n",
        ),
        ("data/keep", "x"),
    ]);
    let cache = env.root().join("cache").join("strata").join("loads");
    let first = graph_json(&env);
    let entries = || std::fs::read_dir(&cache).map_or(0, |d| d.count());
    assert_eq!(entries(), 1, "a load writes one cache entry");
    assert_eq!(
        graph_json(&env),
        first,
        "a cached load gives the same model"
    );
    // And it is the cache that gives it: with every file unchanged, an edit
    // of the cached model itself shows (no test can do this to a real one).
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let real = std::fs::read_to_string(&entry).unwrap();
    std::fs::write(&entry, real.replace("echo one", "echo from-cache")).unwrap();
    assert!(graph_json(&env).to_string().contains("echo from-cache"));
    std::fs::write(&entry, real).unwrap();

    // A load()ed library changes.
    write(
        env.work(),
        "lib/defs.star",
        "def greet(n):\n    task(name = n, script = 'echo two > out')\n",
    );
    let lib = graph_json(&env);
    assert!(lib.to_string().contains("echo two"), "{lib}");

    // A new package appears under //...
    write(
        env.work(),
        "new/BUILD.star",
        "task(name = \"n\", script = 'true')\n",
    );
    let added = graph_json(&env);
    assert!(added["tasks"]["//new:n"].is_object(), "{added}");

    // A BUILD.star becomes invalid: the error, not the cached model; fixed
    // again, the same model as before.
    write(
        env.work(),
        "new/BUILD.star",
        "task(name = \"n\", script = \n",
    );
    env.ci(["graph"]).failure(2).mentions("new/BUILD.star");
    write(
        env.work(),
        "new/BUILD.star",
        "task(name = \"n\", script = 'true')\n",
    );
    assert_eq!(graph_json(&env), added);

    // ci.toml is read too.
    write(env.work(), "ci.toml", "[build]\nexecutor = \"nowhere\"\n");
    env.ci(["graph"]).failure(2).mentions("ci.toml");
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    assert_eq!(graph_json(&env), added);

    // The directory of a local_source goes: refused as without a cache.
    std::fs::remove_dir_all(env.work().join("data")).unwrap();
    env.ci(["graph"]).failure(2).mentions("data");
    mkdir(env.work(), "data");

    // A package goes.
    std::fs::remove_dir_all(env.work().join("new")).unwrap();
    assert!(graph_json(&env)["tasks"]["//new:n"].is_null());

    // A damaged cache entry is a miss, not an error.
    for e in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(e.unwrap().path(), b"{ not json").unwrap();
    }
    assert_eq!(graph_json(&env), lib);
}

#[test]
fn runs_are_listed_newest_first() {
    let env = workspace(&[("BUILD.star", SMALL)]);
    let mut ids = Vec::new();
    for target in ["//:hello", "//:world", "//..."] {
        ids.push(build_ok(&env, &[target]).run_id());
    }
    let listed: Vec<String> = env
        .ci(["runs"])
        .success()
        .lines()
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    let json = env.ci(["--json", "runs"]).success().json();
    let listed: Vec<&str> = json
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, newest_first);

    // `latest` and unique prefixes name runs.
    let show = env.ci(["run", "show", "latest"]).success();
    assert!(show.stdout_str().starts_with(&format!("run {}", ids[2])));
    let json = env.ci(["--json", "run", "show", &ids[0]]).success().json();
    assert_eq!(json["id"], ids[0].as_str());
    env.ci(["run", "show", "no-such-run"]).failure(2);
}

#[test]
fn logs_print_a_tasks_output() {
    let env = workspace(&[("BUILD.star", SMALL)]);
    let run = build_ok(&env, &[]).run_id();
    let logs = env.ci(["logs", &run, "//:hello"]).success().stdout_str();
    assert!(
        logs.contains("hello out\n") && logs.contains("hello err\n"),
        "{logs}"
    );
    let prefix = &run[..run.len() - 3];
    let again = env.ci(["logs", prefix, "//:hello"]).success().stdout_str();
    assert_eq!(again, logs);
    // A task that printed nothing has an empty log.
    assert_eq!(
        env.ci(["logs", "latest", "//:world"])
            .success()
            .stdout_str(),
        ""
    );
    env.ci(["logs", "latest", "//:nope"]).failure(2);
}

#[test]
fn store_commands_take_task_labels() {
    let env = workspace(&[("pkg/BUILD.star", SMALL)]);
    build_ok(&env, &[]);
    let ls = env
        .ci(["store", "ls", "//pkg:world"])
        .success()
        .stdout_str();
    assert!(ls.contains(" both\n"), "{ls}");
    assert_eq!(cat(&env, "//pkg:world", "both"), "hi\nworld\n");
    let digest = env.ci(["--json", "run", "show", "latest"]).success().json()["tasks"]
        ["//pkg:world"]["output"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(env.ci(["store", "ls", &digest]).success().stdout_str(), ls);
    env.ci(["store", "ls", "//pkg:never-built"]).failure(2);
}

// ---- the C fixture ----

/// Copies a directory tree (files and directories only).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for e in std::fs::read_dir(from).expect("list the fixture") {
        let e = e.expect("list the fixture");
        let target = to.join(e.file_name());
        if e.file_type().expect("stat").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy a fixture file");
        }
    }
}

fn has_cc() -> bool {
    std::process::Command::new("cc")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_c_fixture_builds_and_a_second_build_is_cached() {
    // No silent skip: scripts/test installs build-essential.
    assert!(
        has_cc(),
        "`cc` is missing: install a C compiler (`apt-get install build-essential`)"
    );
    let env = Env::new();
    let fixture = Path::new(&manifest_dir()).join("../fixtures/cproject");
    copy_tree(&fixture, env.work());
    let token = [("UPLOAD_TOKEN", "t0ken")];

    let first = json_run(&env, &["build"], &token);
    first.expect(first.out.code() == Some(0), || {
        "expected the C project to build".into()
    });
    first.expect_counts(10, 0, 0);
    let listing = env
        .ci(["store", "ls", "-r", "//release:slim"])
        .success()
        .stdout_str();
    assert!(
        listing.contains(" bin/hello\n") && !listing.contains("obj"),
        "{listing}"
    );
    let tar = env
        .ci(["store", "ls", "//release:tarball"])
        .success()
        .stdout_str();
    assert!(tar.contains("hello.tar"), "{tar}");

    // Everything pure is cached; the task with effects runs once per run.
    let second = json_run(&env, &["build"], &token);
    second.expect(second.out.code() == Some(0), || {
        "expected the second build to succeed".into()
    });
    second.expect_executed(&["//release:publish"]);
    second.expect_counts(1, 9, 0);
    let log = env
        .ci(["logs", "latest", "//release:publish"])
        .success()
        .stdout_str();
    assert!(log.starts_with("would upload hello.tar ("), "{log}");
}

/// The package directory. Read at run time (cargo sets it for tests): the
/// compile-time value names whichever checkout built a binary that a shared
/// target directory reuses.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
