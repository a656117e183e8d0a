//! The Docker executor against a real daemon: container pipelines with
//! transforms, a merge and a service; memoization counted through the Docker
//! API; read-only inputs; and nothing left behind after a timeout, Ctrl-C or
//! a `ci` killed outright.
//!
//! These tests need a Docker daemon and the image `$STRATA_TEST_IMAGE`
//! (default `strata-test/busybox:latest`, built by `scripts/test`). Without
//! them they fail, loudly: they never skip.
//!
//! Containers are told apart by their labels: every container and network
//! carries `strata.pid=<pid of the ci that made it>`, so tests running at the
//! same time (here or in another checkout) never count each other's.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, TagImageOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use strata_tests::*;

/// Every `ci build` removes what killed `ci` processes left behind. The
/// test that kills one holds this for writing, so that only its own next `ci`
/// finds those leftovers; every other build of these tests holds it for reading.
static STARTING: RwLock<()> = RwLock::new(());

fn builds_may_run() -> std::sync::RwLockReadGuard<'static, ()> {
    STARTING.read().unwrap_or_else(|e| e.into_inner())
}

/// The base image of every test task.
fn image() -> String {
    std::env::var("STRATA_TEST_IMAGE").unwrap_or_else(|_| "strata-test/busybox:latest".to_owned())
}

/// A service serving one file with busybox `httpd`, ready when it answers.
const WEB_SERVICE: &str = r#"service(
        image = IMG,
        cmd = ["sh", "-c", "mkdir -p /www && echo 'served by web' > /www/index.html && exec httpd -f -v -p 8080 -h /www"],
        ready = ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/index.html"],
    )"#;

/// The Docker daemon, through its API (as `ci` sees it).
struct Daemon {
    rt: tokio::runtime::Runtime,
    docker: Docker,
}

impl Daemon {
    /// Connects, or fails the test saying what is missing.
    fn connect() -> Daemon {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("start a runtime");
        let docker = rt.block_on(async {
            let docker = Docker::connect_with_defaults().ok()?;
            tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
                .await
                .ok()?
                .ok()
        });
        let Some(docker) = docker else {
            panic!(
                "\n\nThe Docker daemon does not answer (DOCKER_HOST={:?}). These tests need it: \
                 run `scripts/test`, which starts dockerd and builds the test image, or start \
                 dockerd yourself.\n",
                std::env::var("DOCKER_HOST").ok()
            );
        };
        let d = Daemon { rt, docker };
        let img = image();
        if d.rt.block_on(d.docker.inspect_image(&img)).is_err() {
            panic!("\n\nThe test image `{img}` is missing: run `scripts/test` to build it (no registry needed).\n");
        }
        d
    }

    /// `(role, task)` of every container start by the `ci` process `pid`
    /// between `since` and `until` (seconds since the epoch).
    fn starts(&self, pid: u32, since: f64, until: f64) -> Vec<(String, String)> {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("event", vec!["start".to_owned()]),
            ("label", vec![format!("strata.pid={pid}")]),
        ]);
        let opts = EventsOptionsBuilder::default()
            .since(&format!("{since:.9}"))
            .until(&format!("{until:.9}"))
            .filters(&filters)
            .build();
        let events: Vec<_> = self.rt.block_on(self.docker.events(Some(opts)).collect());
        let mut out = Vec::new();
        for e in events {
            let e = e.expect("read Docker events");
            let attrs = e.actor.and_then(|a| a.attributes).unwrap_or_default();
            out.push((
                attrs.get("strata.role").cloned().unwrap_or_default(),
                attrs.get("strata.task").cloned().unwrap_or_default(),
            ));
        }
        out.sort();
        out
    }

    /// Waits (on the event stream, at most two minutes) until the `ci`
    /// process `pid` has started the primary container of `task`.
    fn wait_primary_start(&self, pid: u32, task: &str, since: f64) {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("event", vec!["start".to_owned()]),
            (
                "label",
                vec![
                    format!("strata.pid={pid}"),
                    "strata.role=primary".to_owned(),
                    format!("strata.task={task}"),
                ],
            ),
        ]);
        let opts = EventsOptionsBuilder::default()
            .since(&format!("{since:.9}"))
            .filters(&filters)
            .build();
        let first = self.rt.block_on(async {
            let mut events = self.docker.events(Some(opts));
            tokio::time::timeout(Duration::from_secs(120), events.next()).await
        });
        match first {
            Ok(Some(Ok(_))) => {}
            other => panic!("the container of `{task}` (ci pid {pid}) did not start: {other:?}"),
        }
    }

    /// Names of the containers and networks the `ci` process `pid` made that still exist.
    fn leftovers(&self, pid: u32) -> (Vec<String>, Vec<String>) {
        let filters: HashMap<&str, Vec<String>> =
            HashMap::from([("label", vec![format!("strata.pid={pid}")])]);
        let containers = self
            .rt
            .block_on(
                self.docker.list_containers(Some(
                    ListContainersOptionsBuilder::default()
                        .all(true)
                        .filters(&filters)
                        .build(),
                )),
            )
            .expect("list containers");
        let networks = self
            .rt
            .block_on(
                self.docker.list_networks(Some(
                    ListNetworksOptionsBuilder::default()
                        .filters(&filters)
                        .build(),
                )),
            )
            .expect("list networks");
        (
            containers
                .into_iter()
                .map(|c| format!("{:?} {:?}", c.names.unwrap_or_default(), c.state))
                .collect(),
            networks
                .into_iter()
                .map(|n| n.name.unwrap_or_default())
                .collect(),
        )
    }

    fn assert_no_leftovers(&self, pid: u32) {
        let (containers, networks) = self.leftovers(pid);
        assert!(
            containers.is_empty() && networks.is_empty(),
            "`ci` (pid {pid}) left containers {containers:?} and networks {networks:?}"
        );
    }

    /// Points `repo:tag` at `image`.
    fn tag(&self, image: &str, repo: &str, tag: &str) {
        let opts = TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        self.rt
            .block_on(self.docker.tag_image(image, Some(opts)))
            .unwrap_or_else(|e| panic!("tag {image} as {repo}:{tag}: {e}"));
    }

    /// Commits a variant of `image` holding `/variant` as `repo:tag`.
    fn commit_variant(&self, image: &str, repo: &str, tag: &str, content: &str) {
        self.rt.block_on(async {
            let name = format!("strata-test-variant-{}", std::process::id());
            let d = &self.docker;
            let _ = d
                .remove_container(
                    &name,
                    Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                )
                .await;
            d.create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                ContainerCreateBody {
                    image: Some(image.to_owned()),
                    cmd: Some(vec![
                        "sh".into(),
                        "-c".into(),
                        format!("echo {content} > /variant"),
                    ]),
                    network_disabled: Some(true),
                    ..ContainerCreateBody::default()
                },
            )
            .await
            .expect("create the variant container");
            d.start_container(&name, None)
                .await
                .expect("start the variant container");
            let _ = d
                .wait_container(&name, None::<WaitContainerOptions>)
                .collect::<Vec<_>>()
                .await;
            let opts = CommitContainerOptionsBuilder::default()
                .container(&name)
                .repo(repo)
                .tag(tag)
                .build();
            d.commit_container(opts, bollard::models::ContainerConfig::default())
                .await
                .expect("commit the variant");
            d.remove_container(
                &name,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await
            .expect("remove the variant container");
        });
    }

    fn remove_image(&self, reference: &str) {
        let opts = RemoveImageOptionsBuilder::default().force(true).build();
        let _ = self
            .rt
            .block_on(self.docker.remove_image(reference, Some(opts), None));
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// A workspace with `ci.toml` and a `BUILD.star` whose `IMG` is the test image.
fn workspace(build_star: &str) -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\n");
    write(
        env.work(),
        "BUILD.star",
        format!("IMG = {:?}\n{build_star}", image()),
    );
    env
}

/// One `ci --json build`: its output, each task's `task_finished` event,
/// and the containers it started (counted by the daemon).
struct Build {
    out: Output,
    pid: u32,
    tasks: BTreeMap<String, serde_json::Value>,
    starts: Vec<(String, String)>,
}

impl Build {
    fn run(d: &Daemon, env: &Env, args: &[&str]) -> Build {
        let since = now();
        let mut all = vec!["--json", "build"];
        all.extend_from_slice(args);
        let _guard = builds_may_run();
        let running = env.spawn(all);
        let pid = running.id();
        let out = running.wait();
        let until = now();
        let starts = d.starts(pid, since, until);
        let mut tasks = BTreeMap::new();
        for line in out.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] == "task_finished" {
                tasks.insert(v["label"].as_str().unwrap_or_default().to_owned(), v);
            }
        }
        Build {
            out,
            pid,
            tasks,
            starts,
        }
    }

    /// The output layer of `label`.
    #[track_caller]
    fn output(&self, label: &str) -> String {
        match self.tasks.get(label).and_then(|t| t["output"].as_str()) {
            Some(o) => o.to_owned(),
            None => self.out.fail(&format!("no output for {label}")),
        }
    }

    #[track_caller]
    fn state(&self, label: &str) -> String {
        match self.tasks.get(label).and_then(|t| t["state"].as_str()) {
            Some(s) => s.to_owned(),
            None => self.out.fail(&format!("no state for {label}")),
        }
    }

    fn error(&self, label: &str) -> String {
        self.tasks
            .get(label)
            .and_then(|t| t["error"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    fn cached(&self, label: &str) -> bool {
        self.tasks.get(label).is_some_and(|t| t["cached"] == true)
    }

    fn run_id(&self) -> String {
        self.out
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "run_started")
            .and_then(|v| v["run"].as_str().map(str::to_owned))
            .unwrap_or_else(|| self.out.fail("no run_started event"))
    }
}

fn cat(env: &Env, layer: &str, path: &str) -> String {
    env.ci(["store", "cat", layer, path]).success().stdout_str()
}

/// The lines of /proc/mounts that mention `dir`.
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .filter(|l| l.contains(&*dir))
        .map(str::to_owned)
        .collect()
}

#[test]
fn pipeline_with_transforms_a_merge_and_a_service() {
    let d = Daemon::connect();
    let env = workspace(&format!(
        r#"
local_source(name = "src", path = "src")
task(name = "gen", image = IMG, deps = {{"src": ":src"}}, script = """
mkdir -p site
cp "$CI_IN/src/msg.txt" site/msg.txt
echo VERSION=1.2 >> "$CI_CONTEXT"
""")
task(name = "upper", image = IMG, transform = ":gen", script = "tr a-z A-Z < site/msg.txt > site/upper.txt")
task(name = "count", image = IMG, transform = ":gen", script = "wc -c < site/msg.txt | tr -d ' ' > site/count.txt; echo $VERSION > site/version.txt")
merge(name = "site", base = ":gen", sides = [":upper", ":count"])
task(
    name = "fetch",
    image = IMG,
    deps = {{"site": ":site"}},
    services = {{"web": {WEB_SERVICE}}},
    script = """
wget -q -O fetched.txt http://web:8080/index.html
cp "$CI_IN/site/site/upper.txt" "$CI_IN/site/site/version.txt" .
echo fetched
""",
)
"#
    ));
    write(env.work(), "src/msg.txt", "hello\n");

    let first = Build::run(&d, &env, &["//..."]);
    let first_out = &first.out;
    if first_out.code() != Some(0) {
        first_out.fail("expected success");
    }
    // Four primaries and one service, each started once.
    let primary = |t: &str| ("primary".to_owned(), t.to_owned());
    let mut expected = vec![
        primary("//:gen"),
        primary("//:upper"),
        primary("//:count"),
        primary("//:fetch"),
        ("service".to_owned(), "//:fetch".to_owned()),
    ];
    expected.sort();
    assert_eq!(
        first.starts, expected,
        "container starts of the first build"
    );

    let site = first.output("//:site");
    assert_eq!(cat(&env, &site, "site/msg.txt"), "hello\n");
    assert_eq!(cat(&env, &site, "site/upper.txt"), "HELLO\n");
    assert_eq!(cat(&env, &site, "site/count.txt"), "6\n");
    assert_eq!(cat(&env, &site, "site/version.txt"), "1.2\n");
    let fetch = first.output("//:fetch");
    assert_eq!(cat(&env, &fetch, "fetched.txt"), "served by web\n");
    assert_eq!(cat(&env, &fetch, "upper.txt"), "HELLO\n");
    // The service's log is kept with the task's.
    let log = env
        .ci(["logs", &first.run_id(), "//:fetch"])
        .success()
        .stdout_str();
    assert!(log.contains("fetched"), "log of //:fetch: {log}");
    assert!(log.contains("[svc web] "), "log of //:fetch: {log}");
    d.assert_no_leftovers(first.pid);
    assert_eq!(mounts_under(env.root()), Vec::<String>::new());

    // Nothing changed: no container starts at all.
    let second = Build::run(&d, &env, &["//..."]);
    if second.out.code() != Some(0) {
        second.out.fail("expected success");
    }
    assert_eq!(
        second.starts,
        Vec::<(String, String)>::new(),
        "container starts of the second build"
    );
    for label in ["//:gen", "//:upper", "//:count", "//:site", "//:fetch"] {
        assert!(second.cached(label), "{label} was not cached");
        assert_eq!(second.output(label), first.output(label), "{label}");
    }
}

#[test]
fn a_retagged_image_re_executes_the_tasks_that_use_it() {
    let d = Daemon::connect();
    let repo = format!("strata-test/retag-{}", std::process::id());
    let tagged = format!("{repo}:v");
    d.tag(&image(), &repo, "v");
    let env = workspace(&format!(
        r#"
task(name = "a", image = "{tagged}", script = "if [ -e /variant ]; then cat /variant; else echo base; fi > out.txt")
task(name = "b", image = IMG, script = "echo b > out.txt")
"#
    ));
    let first = Build::run(&d, &env, &["//..."]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(first.starts.len(), 2, "{:?}", first.starts);
        assert_eq!(cat(&env, &first.output("//:a"), "out.txt"), "base\n");

        let second = Build::run(&d, &env, &["//..."]);
        assert_eq!(second.starts, Vec::<(String, String)>::new());

        // Same tag, different content: `a` runs again, `b` does not.
        d.commit_variant(&image(), &repo, "v", "variant-2");
        let third = Build::run(&d, &env, &["//..."]);
        assert_eq!(
            third.starts,
            vec![("primary".to_owned(), "//:a".to_owned())],
            "container starts after the retag"
        );
        assert!(third.cached("//:b"));
        assert_eq!(cat(&env, &third.output("//:a"), "out.txt"), "variant-2\n");
        // `ci explain` says why.
        env.ci(["explain", "//:a"]).success().mentions("image");
    }));
    d.remove_image(&tagged);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn writing_under_ci_in_fails_and_the_store_stays_intact() {
    let d = Daemon::connect();
    let env = workspace(
        r#"
local_source(name = "src", path = "src")
task(name = "overwrite", image = IMG, deps = {"src": ":src"}, script = 'echo changed > "$CI_IN/src/msg.txt"')
task(name = "create", image = IMG, deps = {"src": ":src"}, script = 'touch "$CI_IN/src/new.txt"')
task(name = "remove", image = IMG, deps = {"src": ":src"}, script = 'rm -f "$CI_IN/src/msg.txt"')
task(name = "top", image = IMG, deps = {"src": ":src"}, script = 'mkdir "$CI_IN/extra"')
"#,
    );
    write(env.work(), "src/msg.txt", "original\n");
    let b = Build::run(&d, &env, &["--keep-going", "//..."]);
    assert_eq!(b.out.code(), Some(1), "{}", b.out.all_str());
    for label in ["//:overwrite", "//:create", "//:remove", "//:top"] {
        assert_eq!(b.state(label), "failed", "{label}");
        assert!(
            b.error(label).contains("Read-only file system"),
            "{label}: {}",
            b.error(label)
        );
    }
    env.ci(["store", "verify"]).success();
    let src = b.output("//:src");
    assert_eq!(cat(&env, &src, "msg.txt"), "original\n");
    let listed = env.ci(["store", "ls", &src]).success().lines();
    assert_eq!(listed.len(), 1, "{listed:?}");
    d.assert_no_leftovers(b.pid);
}

#[test]
fn variables_workdir_user_and_network() {
    let d = Daemon::connect();
    let env = workspace(
        r#"
local_source(name = "src", path = "src")
task(name = "vars", image = IMG, deps = {"src": ":src"}, env = {"GREETING": "hi"}, script = """
echo "$CI_IN|$CI_WORK|$CI_CONTEXT|${CI_PREV-unset}|$GREETING|$(pwd)|$(id -u)|$CI" > vars.txt
ls /ci/in > inputs.txt
ls /sys/class/net | tr '\\n' ' ' > net.txt
mkdir sub
""")
task(name = "wd", image = IMG, transform = ":vars", workdir = "sub", script = "pwd > here.txt")
task(name = "nobody", image = IMG, user = "65534", script = "id -u > uid.txt")
task(name = "online", image = IMG, network = True, script = """
ls /sys/class/net | tr '\\n' ' ' > net.txt
echo "${CI_PREV-unset}" > prev.txt
if [ -n "${CI_PREV-}" ]; then cat "$CI_PREV/net.txt" > seen.txt; fi
""")
"#,
    );
    write(env.work(), "src/msg.txt", "x\n");
    let first = Build::run(&d, &env, &["//..."]);
    if first.out.code() != Some(0) {
        first.out.fail("expected success");
    }
    let vars = first.output("//:vars");
    assert_eq!(
        cat(&env, &vars, "vars.txt"),
        "/ci/in|/ci/work|/ci/context|unset|hi|/ci/work|0|true\n"
    );
    assert_eq!(cat(&env, &vars, "inputs.txt"), "src\n");
    assert_eq!(
        cat(&env, &vars, "net.txt"),
        "lo ",
        "no network unless asked"
    );
    assert_eq!(
        cat(&env, &first.output("//:wd"), "sub/here.txt"),
        "/ci/work/sub\n"
    );
    assert_eq!(cat(&env, &first.output("//:nobody"), "uid.txt"), "65534\n");
    let online = first.output("//:online");
    assert!(cat(&env, &online, "net.txt").contains("eth0"));
    assert_eq!(cat(&env, &online, "prev.txt"), "unset\n");

    // `network = True` makes a task impure: it runs again, and sees its previous output.
    let second = Build::run(&d, &env, &["//..."]);
    if second.out.code() != Some(0) {
        second.out.fail("expected success");
    }
    assert_eq!(
        second.starts,
        vec![("primary".to_owned(), "//:online".to_owned())]
    );
    let online = second.output("//:online");
    assert_eq!(cat(&env, &online, "prev.txt"), "/ci/prev\n");
    assert!(cat(&env, &online, "seen.txt").contains("eth0"));
}

#[test]
fn a_timeout_leaves_no_container_network_or_mount() {
    let d = Daemon::connect();
    let env = workspace(&format!(
        r#"
task(name = "slow", image = IMG, timeout = 2, services = {{"web": {WEB_SERVICE}}}, cmd = ["sleep", "600"])
"#
    ));
    let started = Instant::now();
    let b = Build::run(&d, &env, &["//:slow"]);
    assert_eq!(b.out.code(), Some(1), "{}", b.out.all_str());
    assert!(
        b.error("//:slow").contains("timed out after 2s"),
        "{}",
        b.error("//:slow")
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(b.starts.len(), 2, "{:?}", b.starts);
    d.assert_no_leftovers(b.pid);
    assert_eq!(mounts_under(env.root()), Vec::<String>::new());
}

#[test]
fn ctrl_c_leaves_no_container_network_or_mount() {
    let d = Daemon::connect();
    let env = workspace(&format!(
        r#"
task(name = "src_like", image = IMG, script = "echo a > a.txt")
task(name = "slow", image = IMG, deps = {{"a": ":src_like"}}, services = {{"web": {WEB_SERVICE}}}, cmd = ["sleep", "600"])
"#
    ));
    let _guard = builds_may_run();
    let since = now();
    let running = env.spawn(["build", "//:slow"]);
    let pid = running.id();
    d.wait_primary_start(pid, "//:slow", since);
    let sent_at = Instant::now();
    // SAFETY: kill sends a signal to our own, not yet reaped, child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    let out = running.wait();
    assert_eq!(out.code(), Some(130), "{}", out.all_str());
    assert!(
        sent_at.elapsed() < Duration::from_secs(30),
        "stopping took {:?}",
        sent_at.elapsed()
    );
    d.assert_no_leftovers(pid);
    assert_eq!(mounts_under(env.root()), Vec::<String>::new());
}

#[test]
fn leftovers_of_a_killed_ci_are_removed_by_the_next() {
    let d = Daemon::connect();
    let env = workspace(&format!(
        r#"
task(name = "slow", image = IMG, services = {{"web": {WEB_SERVICE}}}, cmd = ["sleep", "600"])
task(name = "quick", image = IMG, script = "echo quick > q.txt")
"#
    ));
    let _only_us = STARTING.write().unwrap_or_else(|e| e.into_inner());
    let since = now();
    let running = env.spawn(["build", "//:slow"]);
    let pid = running.id();
    d.wait_primary_start(pid, "//:slow", since);
    assert!(
        running.kill_after(Duration::ZERO).is_none(),
        "`ci` ended before it was killed"
    );
    let (containers, networks) = d.leftovers(pid);
    assert_eq!(containers.len(), 2, "{containers:?}");
    assert_eq!(networks.len(), 1, "{networks:?}");

    let next = env.ci(["build", "//:quick"]).success();
    let err = next.stderr_str();
    assert!(err.contains("Removed container"), "{err}");
    assert!(err.contains("Removed network"), "{err}");
    d.assert_no_leftovers(pid);
    assert_eq!(mounts_under(env.root()), Vec::<String>::new());
}

#[test]
fn a_missing_image_fails_fast_and_names_it() {
    let d = Daemon::connect();
    let missing = format!("strata-test/absent-{}:1", std::process::id());
    let env = workspace(&format!(
        r#"task(name = "t", image = "{missing}", script = "true")"#
    ));
    let started = Instant::now();
    let b = Build::run(&d, &env, &["//:t"]);
    assert_eq!(b.out.code(), Some(1), "{}", b.out.all_str());
    let error = b.error("//:t");
    assert!(error.contains(&format!("`{missing}`")), "{error}");
    assert!(error.contains("could not be pulled"), "{error}");
    assert!(error.contains("docker build"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
    assert!(b.starts.is_empty());
}

#[test]
fn without_docker_image_tasks_say_so_and_host_tasks_run() {
    // The daemon is needed here too: this test must not pass on a machine
    // where the others cannot run.
    let _d = Daemon::connect();
    let env = workspace(
        r#"
task(name = "boxed", image = IMG, script = "true")
task(name = "plain", script = "echo plain > p.txt")
"#,
    );
    let mut cmd: Command = env.command(["build", "--keep-going", "//..."]);
    cmd.env(
        "DOCKER_HOST",
        format!("unix://{}/no-docker.sock", env.root().display()),
    );
    let out = env.output(cmd);
    assert_eq!(out.code(), Some(1), "{}", out.all_str());
    let text = out.all_str();
    assert!(text.contains("needs Docker"), "{text}");
    assert!(text.contains("dockerd"), "{text}");
    assert!(text.contains("//:plain"), "{text}");
    let listed = {
        let _guard = builds_may_run();
        env.ci(["--json", "build", "//:plain"]).success()
    };
    assert!(
        listed.stdout_str().contains("\"cached\":true"),
        "{}",
        listed.stdout_str()
    );
}
