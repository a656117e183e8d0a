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
