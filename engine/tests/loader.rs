//! Loading real workspaces: the good fixtures load, every malformed one fails with a
//! located error and never panics.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use strata_engine::{
    find_root, Command, Executor, Invalid, Label, LoadError, Loader, OnConflict, Pattern, TaskKind,
    Workspace,
};

fn fixtures() -> PathBuf {
    Path::new(&manifest_dir()).join("../fixtures")
}

fn label(s: &str) -> Label {
    s.parse().unwrap()
}

fn load(dir: &Path) -> Workspace {
    Loader::new(dir)
        .load()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A workspace in a temporary directory from `(path, contents)` pairs.
fn workspace(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ci.toml"), "").unwrap();
    for (path, contents) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }
    dir
}

fn load_err(files: &[(&str, &str)]) -> LoadError {
    let dir = workspace(files);
    match Loader::new(dir.path()).load() {
        Ok(ws) => panic!("loaded: {:?}", ws.tasks.keys().collect::<Vec<_>>()),
        Err(e) => e,
    }
}

#[test]
fn every_bad_fixture_gives_a_located_user_error_without_panicking() {
    let bad = fixtures().join("bad");
    let mut cases: Vec<PathBuf> = fs::read_dir(&bad)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 35,
        "only {} malformed workspaces",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expected = fs::read_to_string(case.join("expected.txt"))
            .unwrap_or_else(|_| panic!("{name}: no expected.txt"));
        let outcome = catch_unwind(AssertUnwindSafe(|| Loader::new(case).load()));
        let err = match outcome {
            Err(_) => {
                failures.push(format!("{name}: panicked"));
                continue;
            }
            Ok(Ok(_)) => {
                failures.push(format!("{name}: loaded without error"));
                continue;
            }
            Ok(Err(e)) => e,
        };
        let message = err.to_string();
        let Some(location) = err.location() else {
            failures.push(format!("{name}: no location in `{message}`"));
            continue;
        };
        if !message.starts_with(&format!("{location}: ")) || location.line == 0 || location.col == 0
        {
            failures.push(format!(
                "{name}: `{message}` does not start with its location"
            ));
        }
        if !err.is_user_error() {
            failures.push(format!("{name}: not a user error: `{message}`"));
        }
        for want in expected.lines().filter(|l| !l.is_empty()) {
            if !message.contains(want) {
                failures.push(format!("{name}: `{message}` lacks `{want}`"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn hello_loads() {
    let ws = load(&fixtures().join("hello"));
    let names: Vec<String> = ws.tasks.keys().map(|l| l.to_string()).collect();
    assert_eq!(names, ["//:greeting", "//:src", "//:stamped", "//:test"]);
    assert_eq!(ws.settings.executor, Some(Executor::Host));
    assert_eq!(ws.stages["test"].after, ["build"]);

    let stamped = &ws.tasks[&label("//:stamped")];
    assert_eq!(stamped.transform, Some(label("//:greeting")));
    assert_eq!(stamped.stage.as_deref(), Some("build"));
    let loc = stamped.location.as_ref().unwrap();
    assert_eq!(
        (loc.file.as_str(), loc.line, loc.col),
        ("BUILD.star", 25, 1)
    );

    let test = &ws.tasks[&label("//:test")];
    assert_eq!(test.deps.len(), 1);
    assert_eq!(
        (test.deps[0].mount.as_str(), &test.deps[0].label),
        ("app", &label("//:stamped"))
    );
    let TaskKind::Run(run) = &test.kind else {
        panic!("not a run")
    };
    assert!(matches!(&run.cmd, Command::Argv(argv) if argv[0] == "/bin/sh"));
    assert!(run.pure && !run.effects && !run.network);

    let greeting = &ws.tasks[&label("//:greeting")];
    assert_eq!(
        greeting.deps[0].mount, "src",
        "list deps mount under the target's name"
    );
    let TaskKind::LocalSource(src) = &ws.tasks[&label("//:src")].kind else {
        panic!()
    };
    assert_eq!(src.path, "src");
}

#[test]
fn cproject_loads() {
    let ws = load(&fixtures().join("cproject"));
    assert_eq!(ws.tasks.len(), 10);
    assert_eq!(ws.settings.jobs.map(|j| j.get()), Some(2));
    let stages: Vec<&String> = ws.stages.keys().collect();
    assert_eq!(stages, ["build", "package", "test"]);

    let TaskKind::Merge(dist) = &ws.tasks[&label("//release:dist")].kind else {
        panic!()
    };
    assert_eq!(dist.base, label("//build:objects"));
    assert_eq!(dist.sides, [label("//build:binary"), label("//build:docs")]);
    assert_eq!(dist.on_conflict, OnConflict::Fail);

    // Declared by a macro from //tools:c.star: located where the macro is used.
    let unit = &ws.tasks[&label("//test:unit")];
    let loc = unit.location.as_ref().unwrap();
    assert_eq!((loc.file.as_str(), loc.line), ("test/BUILD.star", 3));
    let mounts: Vec<&str> = unit.deps.iter().map(|d| d.mount.as_str()).collect();
    assert_eq!(mounts, ["src", "build"]);

    let TaskKind::Run(publish) = &ws.tasks[&label("//release:publish")].kind else {
        panic!()
    };
    assert!(
        publish.effects && !publish.pure,
        "effects make a task impure by default"
    );
    assert_eq!(publish.retries, 2);
    let TaskKind::Run(tarball) = &ws.tasks[&label("//release:tarball")].kind else {
        panic!()
    };
    assert_eq!(tarball.timeout_secs, Some(300));

    let TaskKind::LocalSource(code) = &ws.tasks[&label("//src:code")].kind else {
        panic!()
    };
    assert_eq!(
        (code.path.as_str(), code.exclude.as_slice()),
        ("src", &["BUILD.star".to_owned()][..])
    );
}

#[test]
fn lazy_loading_reads_only_needed_packages() {
    let root = fixtures().join("cproject");
    let loader = Loader::new(&root);
    let ws = loader
        .load_patterns(&[label("//build:binary").into()])
        .unwrap();
    let mut packages: Vec<&str> = ws.tasks.keys().map(|l| l.package()).collect();
    packages.dedup();
    assert_eq!(
        packages,
        ["build", "src"],
        "test/ and release/ are not needed"
    );
    assert_eq!(
        ws.stages.len(),
        3,
        "the root package (stages) is always read"
    );

    let ws = loader
        .load_patterns(&["//test:all".parse().unwrap()])
        .unwrap();
    assert!(ws.tasks.contains_key(&label("//release:dist")));

    let all = loader.load().unwrap();
    let some = loader
        .load_patterns(&["//release:tarball".parse().unwrap()])
        .unwrap();
    for (l, t) in &some.tasks {
        assert_eq!(&all.tasks[l], t, "lazy and full loads agree on {l}");
    }
}

#[test]
fn lazy_loading_refuses_missing_packages() {
    let loader = Loader::new(fixtures().join("cproject"));
    let e = loader
        .load_patterns(&["//nope:x".parse().unwrap()])
        .unwrap_err();
    assert!(
        e.to_string().contains("there is no `nope/BUILD.star`"),
        "{e}"
    );
    assert!(e.is_user_error());
    let e = loader
        .load_patterns(&["//nope:all".parse().unwrap()])
        .unwrap_err();
    assert!(e.to_string().contains("No tasks match `//nope:all`"), "{e}");
}

#[test]
fn finds_the_root_from_below() {
    let root = fixtures().join("cproject");
    assert_eq!(find_root(&root.join("src")).unwrap(), root);
    let dir = tempfile::tempdir().unwrap();
    let e = find_root(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::NoWorkspace { .. }));
    assert!(e.to_string().starts_with("No `ci.toml` in"), "{e}");
}

#[test]
fn package_walk_skips_hidden_target_and_nested_workspaces() {
    let dir = workspace(&[
        ("BUILD.star", ""),
        ("a/BUILD.star", "task(name = \"x\", cmd = [\"true\"])"),
        ("a/b/BUILD.star", ""),
        (".hidden/BUILD.star", "fail(\"read a hidden dir\")"),
        ("target/BUILD.star", "fail(\"read target/\")"),
        ("node_modules/m/BUILD.star", "fail(\"read node_modules/\")"),
        ("nested/ci.toml", ""),
        ("nested/BUILD.star", "fail(\"read a nested workspace\")"),
    ]);
    let loader = Loader::new(dir.path());
    assert_eq!(loader.find_packages("").unwrap(), ["", "a", "a/b"]);
    assert_eq!(loader.find_packages("a").unwrap(), ["a", "a/b"]);
    let ws = loader.load().unwrap();
    assert_eq!(
        ws.tasks.keys().map(|l| l.to_string()).collect::<Vec<_>>(),
        ["//a:x"]
    );
}

#[test]
fn builtins_return_labels_and_macros_work() {
    let dir = workspace(&[
        (
            "defs.star",
            "def chain(prefix, n):\n    last = None\n    for i in range(n):\n        last = task(name = '%s%d' % (prefix, i), cmd = ['true'], deps = [last] if last else [])\n    return last\n",
        ),
        (
            "app/BUILD.star",
            "load('//:defs.star', 'chain')\nend = chain('step', 3)\ntask(name = 'final', script = 'true', transform = end)\n",
        ),
    ]);
    let ws = Loader::new(dir.path()).load().unwrap();
    assert_eq!(ws.tasks.len(), 4);
    let last = &ws.tasks[&label("//app:final")];
    assert_eq!(last.transform, Some(label("//app:step2")));
    assert_eq!(
        ws.tasks[&label("//app:step1")].deps[0].label,
        label("//app:step0")
    );
}

#[test]
fn relative_paths_resolve_from_the_package() {
    let dir = workspace(&[
        ("data/x.txt", "x"),
        ("pkg/sub/BUILD.star", "local_source(name = 'data', path = '../../data')\ngit_source(name = 'lib', url = '../../vendor/lib', ref = 'main')\ngit_source(name = 'remote', url = 'git@example.invalid:org/repo.git', ref = 'v1')"),
    ]);
    let ws = Loader::new(dir.path()).load().unwrap();
    let TaskKind::LocalSource(s) = &ws.tasks[&label("//pkg/sub:data")].kind else {
        panic!()
    };
    assert_eq!(s.path, "data");
    let TaskKind::GitSource(g) = &ws.tasks[&label("//pkg/sub:lib")].kind else {
        panic!()
    };
    assert_eq!((g.url.as_str(), g.rev.as_str()), ("vendor/lib", "main"));
    let TaskKind::GitSource(g) = &ws.tasks[&label("//pkg/sub:remote")].kind else {
        panic!()
    };
    assert_eq!(g.url, "git@example.invalid:org/repo.git");
}

#[test]
fn later_task_options_are_typed_now() {
    let dir = workspace(&[(
        "BUILD.star",
        r#"
task(
    name = "itest",
    cmd = ["./itest"],
    image = "debian:bookworm",
    executor = "docker",
    network = True,
    workdir = "app/tests",
    user = "1000:1000",
    timeout = 90,
    services = {
        "db": service(image = "postgres:16", env = {"POSTGRES_PASSWORD": "x"}, ready = ["pg_isready"]),
        "cache": service(image = "redis:7", cmd = ["redis-server", "--save", ""]),
    },
)
"#,
    )]);
    let ws = Loader::new(dir.path()).load().unwrap();
    let TaskKind::Run(run) = &ws.tasks[&label("//:itest")].kind else {
        panic!()
    };
    assert_eq!(run.executor, Some(Executor::Docker));
    assert!(run.network);
    assert!(
        !run.pure,
        "`network = True` makes a task impure unless it says `pure = True`"
    );
    assert_eq!(run.workdir.as_deref(), Some("app/tests"));
    assert_eq!(run.user.as_deref(), Some("1000:1000"));
    assert_eq!(run.timeout_secs, Some(90));
    assert_eq!(run.services["db"].ready, ["pg_isready"]);
    assert_eq!(run.services["db"].env["POSTGRES_PASSWORD"], "x");
    assert_eq!(
        run.services["cache"].cmd.as_deref().unwrap()[0],
        "redis-server"
    );
    assert_eq!(run.services["cache"].image, "redis:7");
}

#[test]
fn none_means_default() {
    let dir = workspace(&[(
        "BUILD.star",
        "task(name = 'a', cmd = ['true'], image = None, stage = None, timeout = None, deps = None, env = None)",
    )]);
    let ws = Loader::new(dir.path()).load().unwrap();
    let TaskKind::Run(run) = &ws.tasks[&label("//:a")].kind else {
        panic!()
    };
    assert_eq!((run.image.as_ref(), run.timeout_secs), (None, None));
}

#[test]
fn errors_in_loaded_files_point_into_them() {
    let e = load_err(&[
        ("BUILD.star", "load('//lib:defs.star', 'f')\nf()\n"),
        (
            "lib/defs.star",
            "def f():\n    d = {}\n    return d[\"missing\"]\n",
        ),
    ]);
    assert_eq!(e.location().unwrap().file, "lib/defs.star", "{e}");
}

#[test]
fn type_errors_name_the_parameter() {
    for (src, want) in [
        (
            "task(name = 1, cmd = ['x'])",
            "`name` must be a string, not `int`",
        ),
        (
            "task(name = 'a', cmd = ['x', 2])",
            "`cmd[1]` must be a string, not `int`",
        ),
        (
            "task(name = 'a', cmd = ['x'], env = ['A'])",
            "`env` must be a dict of strings, not `list`",
        ),
        (
            "task(name = 'a', cmd = ['x'], pure = 'yes')",
            "`pure` must be `True` or `False`, not `string`",
        ),
        (
            "task(name = 'a', cmd = ['x'], secret_env = 'TOKEN')",
            "`secret_env` must be a list of strings, not `string`",
        ),
        (
            "task(name = 'a', cmd = ['x'], deps = {'m': 3})",
            "`deps[\"m\"]` must be a label string",
        ),
        (
            "service(image = 3)",
            "`service.image` must be a string, not `int`",
        ),
        (
            "local_source(name = 's', exclude = 'x')",
            "`exclude` must be a list of strings",
        ),
        (
            "stage(name = 's', after = 'x')",
            "`after` must be a list of strings",
        ),
    ] {
        let e = load_err(&[("BUILD.star", src)]).to_string();
        assert!(e.starts_with("BUILD.star:1:1: "), "{src}: {e}");
        assert!(e.contains(want), "{src}: {e}");
    }
}

#[test]
fn a_thousand_tasks_load_lazily_in_tens_of_milliseconds() {
    let dir = workspace(&[("BUILD.star", "stage(name = 'build')\n")]);
    for p in 0..100 {
        let mut src = String::new();
        for t in 0..10 {
            let dep = if t > 0 {
                format!("deps = [':t{}'],", t - 1)
            } else {
                String::new()
            };
            src.push_str(&format!(
                "task(name = 't{t}', {dep} cmd = ['sh', '-c', 'echo {t}'], env = {{'X': '{t}'}}, stage = 'build')\n"
            ));
        }
        let pkg = dir.path().join(format!("pkg{p:03}"));
        fs::create_dir_all(&pkg).unwrap();
        fs::write(pkg.join("BUILD.star"), src).unwrap();
    }
    let loader = Loader::new(dir.path());
    let all = loader.load().unwrap();
    assert_eq!(all.tasks.len(), 1000);
    let target: Pattern = "//pkg042:t9".parse().unwrap();
    let start = Instant::now();
    let ws = loader.load_patterns(&[target]).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(ws.tasks.len(), 10);
    // Generous for unoptimized builds on a busy machine; an optimized build takes a few ms.
    assert!(elapsed.as_millis() < 500, "took {elapsed:?}");
}

#[test]
fn model_errors_are_typed() {
    let e = load_err(&[("BUILD.star", "task(name = 'a', cmd = ['x'], deps = [':a'])")]);
    match e {
        LoadError::Model(m) => assert_eq!(
            *m.problem,
            Invalid::Cycle(vec!["//:a".into(), "//:a".into()])
        ),
        other => panic!("{other:?}"),
    }
}

/// The package directory. Read at run time (cargo sets it for tests): the
/// compile-time value names whichever checkout built a binary that a shared
/// target directory reuses.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
