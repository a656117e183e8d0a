//! Hostile pipelines (issue 10, part of): deep nesting and long chains
//! that overflowed the stack and aborted `ci` (exit 134) now load; usage
//! errors are usage errors.

use strata_tests::*;

fn workspace(build: &str) -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(env.work(), "BUILD.star", build);
    env
}

#[test]
fn deep_nesting_loads_instead_of_overflowing_the_stack() {
    let parens = format!("x = {}1{}\n", "(".repeat(700), ")".repeat(700));
    let lists = format!("y = {}1{}\n", "[".repeat(320), "]".repeat(320));
    let sum = format!("z = {}\n", vec!["1"; 400].join(" + "));
    let ifs: String = (0..300)
        .map(|i| format!("{}if True:\n", "    ".repeat(i)))
        .collect::<String>()
        + &format!("{}pass\n", "    ".repeat(300));
    let body = format!(
        "{parens}{lists}{sum}def f():\n{}\ntask(name = \"t\", cmd = [\"true\"])\n",
        indent(&ifs)
    );
    let env = workspace(&body);
    let out = env.ci(["graph", "--format", "json"]);
    assert_ne!(out.code(), Some(134), "aborted: {}", out.stderr_str());
    out.success();

    // A chain of 600 `load()`s.
    let env = workspace("load(\"//:l0.star\", \"v\")\ntask(name = \"t\", cmd = [\"true\"])\n");
    for i in 0..600 {
        let text = if i == 599 {
            "v = 1\n".to_owned()
        } else {
            format!("load(\"//:l{}.star\", w = \"v\")\nv = w\n", i + 1)
        };
        write(env.work(), &format!("l{i}.star"), text);
    }
    let out = env.ci(["graph"]);
    assert_ne!(out.code(), Some(134), "aborted: {}", out.stderr_str());
    out.success();
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn zero_jobs_is_a_usage_error() {
    let env = workspace("task(name = \"t\", cmd = [\"true\"])\n");
    let out = env.ci(["build", "-j", "0"]).failure(2);
    assert!(
        out.stderr_str().contains("at least 1"),
        "{}",
        out.stderr_str()
    );
}

#[test]
fn a_task_with_ten_thousand_deps_loads() {
    // `Task::inputs` de-duplicated with `Vec::contains`: 49 s for this graph.
    let env = workspace(
        "[task(name = \"s%d\" % i, cmd = [\"true\"]) for i in range(10000)]\n\
         task(name = \"top\", deps = {\"m%d\" % i: \":s%d\" % i for i in range(10000)}, cmd = [\"true\"])\n",
    );
    let out = env.ci(["graph", "--format", "json", "//:top"]).success();
    let g: serde_json::Value = serde_json::from_str(&out.stdout_str()).unwrap();
    assert_eq!(g["order"].as_array().unwrap().len(), 10001);
}

/// `ci graph` exits 2 with a message naming the file and what it is.
fn refused(env: &Env, want: &str) {
    let out = env.ci(["graph"]).failure(2);
    assert!(
        out.stderr_str().contains(want),
        "wanted `{want}`: {}",
        out.stderr_str()
    );
}

#[test]
fn pipeline_files_that_are_not_files_are_located_errors() {
    // A directory where BUILD.star should be.
    let env = Env::new();
    write(env.work(), "ci.toml", "");
    mkdir(env.work(), "BUILD.star");
    refused(&env, "`BUILD.star` is a directory");

    // A FIFO in a package: refused, never opened (opening would block).
    let env = workspace("task(name = \"t\", cmd = [\"true\"])\n");
    mkdir(env.work(), "sub");
    mkfifo(env.work(), "sub/BUILD.star");
    refused(&env, "`sub/BUILD.star` is a FIFO");

    // A symlink loop, and a symlink to a device that never ends.
    let env = Env::new();
    write(env.work(), "ci.toml", "");
    symlink(env.work(), "BUILD.star", "BUILD.star");
    refused(&env, "leads nowhere");
    let env = Env::new();
    write(env.work(), "ci.toml", "");
    symlink(env.work(), "BUILD.star", "/dev/zero");
    refused(&env, "is a character device");

    // load() of a symlink to /dev/zero.
    let env = workspace("load(\"//:lib.star\", \"x\")\ntask(name = \"t\", cmd = [\"true\"])\n");
    symlink(env.work(), "lib.star", "/dev/zero");
    refused(&env, "`lib.star` is a character device");

    // ci.toml as /dev/zero is not "no ci.toml"; a non-UTF-8 ci.toml is located.
    let env = Env::new();
    symlink(env.work(), "ci.toml", "/dev/zero");
    refused(&env, "`ci.toml` is a character device");
    let env = Env::new();
    write(env.work(), "ci.toml", b"[build]\njobs = \xff\n".as_slice());
    write(env.work(), "BUILD.star", "");
    refused(&env, "ci.toml:2:8");
}

#[test]
fn long_names_and_escaping_sources_are_refused_at_load() {
    // One rule, at load: it used to pass `ci graph` and fail at build time.
    let long = "n".repeat(256);
    let env = workspace(&format!("task(name = \"{long}\", cmd = [\"true\"])\n"));
    refused(&env, "names may be at most 200 bytes");
    // A local source whose path is a symlink out of the workspace.
    let outside = tempfile::tempdir().unwrap();
    let env = workspace("local_source(name = \"src\", path = \"link\")\n");
    symlink(env.work(), "link", outside.path().to_str().unwrap());
    refused(&env, "leaves the workspace");
}

/// `ci graph` of `build` (with `toml` as ci.toml) exits 2 within `secs`
/// seconds, with an error at `at` that names `limit`.
fn limited(build: &str, toml: &str, at: &str, limit: &str, secs: u64) {
    let env = Env::new();
    write(env.work(), "ci.toml", toml);
    write(env.work(), "BUILD.star", build);
    let start = std::time::Instant::now();
    let out = env.ci(["graph"]).failure(2);
    let err = out.stderr_str();
    assert!(
        err.contains(&format!("error: {at}")) && err.contains(limit),
        "wanted `{at}` and `{limit}`: {err}"
    );
    assert!(
        start.elapsed().as_secs() < secs,
        "took {:?}: {err}",
        start.elapsed()
    );
}

const DEFAULTS: &str = "[build]\nexecutor = \"host\"\n";

#[test]
fn a_long_loop_ends_at_the_step_limit() {
    // Used to run until killed.
    limited(
        "for i in range(2000000000):\n    pass\n",
        DEFAULTS,
        "BUILD.star:1:10: `range()` of 2000000000 elements",
        "`max_steps` under `[load]`",
        10,
    );
    limited(
        "def f():\n    for a in range(100000):\n        for b in range(100000):\n            pass\nf()\n",
        DEFAULTS,
        "BUILD.star:3:",
        "took more than 10000000 steps",
        20,
    );
}

#[test]
fn list_repetition_is_refused_before_it_is_made() {
    // 16 GB in one operation: used to take the machine's memory.
    limited(
        "x = [0] * 2000000000\n",
        DEFAULTS,
        "BUILD.star:1:5: Evaluating the pipeline needs more than 1024 MiB",
        "`max_heap_mib` under `[load]`",
        10,
    );
}

#[test]
fn string_repetition_is_refused_before_it_is_made() {
    limited(
        "x = \"x\" * 2000000000\n",
        DEFAULTS,
        "BUILD.star:1:5: Evaluating the pipeline needs more than 1024 MiB",
        "`*` would make a value of 3814 MiB",
        10,
    );
    // `*=` cannot be checked, so it is refused when parsed.
    limited(
        "x = [0]\nx *= 2000000000\n",
        DEFAULTS,
        "BUILD.star:2:1: `*=` is not allowed",
        "write it so",
        10,
    );
}

#[test]
fn a_big_comprehension_ends_at_a_limit() {
    limited(
        "x = [i for i in range(2000000000)]\n",
        DEFAULTS,
        "BUILD.star:1:17: `range()`",
        "`max_steps`",
        10,
    );
    limited(
        "x = [a for a in range(5000) for b in range(5000)]\n",
        DEFAULTS,
        "BUILD.star:1:",
        "took more than 10000000 steps",
        20,
    );
}

#[test]
fn string_doubling_ends_at_the_heap_limit() {
    // 40 doublings took 4 GB in 3.7 s, and then all memory.
    limited(
        "s = \"x\"\nfor i in range(40):\n    s = s + s\n",
        DEFAULTS,
        "BUILD.star:3:",
        "more than 1024 MiB",
        20,
    );
    // In place, without a loop: checked before each statement.
    let doublings: String = (0..40).map(|_| "s += s\n").collect();
    limited(
        &format!("s = \"x\"\n{doublings}"),
        DEFAULTS,
        "BUILD.star:",
        "more than 1024 MiB",
        20,
    );
}

#[test]
fn raising_a_limit_in_ci_toml_lets_a_slightly_bigger_pipeline_load() {
    // 11 million steps, 10% over the default.
    let steps = "def f():\n    for a in range(1100):\n        for b in range(10000):\n            pass\nf()\n\
                 task(name = \"t\", cmd = [\"true\"])\n";
    limited(steps, DEFAULTS, "BUILD.star:", "`max_steps`", 20);
    let env = workspace(steps);
    write(
        env.work(),
        "ci.toml",
        "[build]\nexecutor = \"host\"\n[load]\nmax_steps = 20000000\n",
    );
    env.ci(["graph"]).success();

    // A 600 MB string takes 1.2 GB while it is made, over the default 1 GiB.
    let heap = "x = \"x\" * 600000000\ntask(name = \"t\", cmd = [\"true\"])\n";
    limited(heap, DEFAULTS, "BUILD.star:1:5:", "`max_heap_mib`", 10);
    let env = workspace(heap);
    write(
        env.work(),
        "ci.toml",
        "[build]\nexecutor = \"host\"\n[load]\nmax_heap_mib = 2048\n",
    );
    env.ci(["graph"]).success();
}
