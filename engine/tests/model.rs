//! The model as data: JSON round trips, and validation of models that did not come
//! from Starlark (the HTTP API's input).

use std::collections::BTreeMap;
use std::path::Path;

use strata_engine::{
    Command, Dep, Invalid, Label, Loader, Merge, OnConflict, Run, Task, TaskKind, Workspace,
};

fn fixture(name: &str) -> Workspace {
    Loader::new(Path::new(&manifest_dir()).join("../fixtures").join(name))
        .load()
        .unwrap()
}

fn label(s: &str) -> Label {
    s.parse().unwrap()
}

#[test]
fn json_round_trip() {
    for name in ["hello", "cproject"] {
        let ws = fixture(name);
        let text = serde_json::to_string_pretty(&ws).unwrap();
        let back: Workspace = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ws, "{name}");
        assert_eq!(serde_json::to_string_pretty(&back).unwrap(), text);
        back.validate().unwrap();
    }
}

fn run(name: &str, cmd: &[&str]) -> Task {
    Task {
        label: label(name),
        kind: TaskKind::Run(Run::new(Command::Argv(
            cmd.iter().map(|s| s.to_string()).collect(),
        ))),
        deps: Vec::new(),
        transform: None,
        stage: None,
        location: None,
    }
}

fn workspace(tasks: Vec<Task>) -> Workspace {
    let mut ws = Workspace::default();
    for task in tasks {
        ws.insert_task(task).unwrap();
    }
    ws
}

#[test]
fn models_built_in_code_validate() {
    let mut test = run("//app:test", &["./test"]);
    test.deps.push(Dep {
        mount: "bin".into(),
        label: label("//app:build"),
    });
    let ws = workspace(vec![run("//app:build", &["make"]), test]);
    ws.validate().unwrap();

    let mut dup = Workspace::default();
    dup.insert_task(run("//a:x", &["true"])).unwrap();
    let e = dup.insert_task(run("//a:x", &["true"])).unwrap_err();
    assert!(matches!(*e.problem, Invalid::DuplicateTask { .. }));
}

#[test]
fn api_json_is_checked_like_starlark() {
    let json = r#"{
        "tasks": {
            "//app:build": {"label": "//app:build", "kind": {"run": {"cmd": {"script": "make"}, "retries": 2, "timeout_secs": 600}}},
            "//app:test": {
                "label": "//app:test",
                "kind": {"run": {"cmd": {"argv": ["./test"]}}},
                "deps": [{"mount": "bin", "label": "//app:build"}],
                "stage": "test"
            }
        },
        "stages": {"test": {"name": "test"}}
    }"#;
    let ws: Workspace = serde_json::from_str(json).unwrap();
    ws.validate().unwrap();
    let TaskKind::Run(build) = &ws.tasks[&label("//app:build")].kind else {
        panic!()
    };
    assert_eq!(
        (build.retries, build.timeout_secs, build.pure),
        (2, Some(600), true)
    );

    // The same mistakes as in Starlark, without a location.
    let bad = json.replace(r#""label": "//app:build"}]"#, r#""label": "//app:biuld"}]"#);
    let e = serde_json::from_str::<Workspace>(&bad)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.location.is_none());
    assert_eq!(
        e.to_string(),
        "Unknown target `//app:biuld`, needed by `//app:test`; package `app` defines `build`, `test`"
    );
    let bad = json.replace(r#""stage": "test""#, r#""stage": "tset""#);
    let e = serde_json::from_str::<Workspace>(&bad)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(matches!(*e.problem, Invalid::UnknownStage { .. }), "{e}");
}

#[test]
fn json_refuses_unknown_fields_and_bad_labels() {
    assert!(serde_json::from_str::<Workspace>(r#"{"tasks": {}, "taks": {}}"#).is_err());
    let e = serde_json::from_str::<Workspace>(
        r#"{"tasks": {"app:x": {"label": "app:x", "kind": {"run": {"cmd": {"script": "x"}}}}}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("must start with `//`"), "{e}");
    let e = serde_json::from_str::<Workspace>(
        r#"{"tasks": {"//a:x": {"label": "//a:x", "kind": {"run": {"cmd": {"script": "x"}, "retries": -1}}}}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("-1"), "{e}");
}

#[test]
fn json_checks_what_starlark_cannot_express() {
    // A key that disagrees with its task.
    let mut ws = workspace(vec![run("//a:x", &["true"])]);
    let task = ws.tasks.remove(&label("//a:x")).unwrap();
    ws.tasks.insert(label("//a:y"), task);
    assert!(matches!(
        *ws.validate().unwrap_err().problem,
        Invalid::KeyMismatch { .. }
    ));

    // Deps on a source.
    let mut src = run("//a:src", &["true"]);
    src.kind = TaskKind::LocalSource(strata_engine::LocalSource {
        path: "a".into(),
        exclude: vec![],
        watch: false,
    });
    src.transform = Some(label("//a:x"));
    let ws = workspace(vec![run("//a:x", &["true"]), src]);
    let e = ws.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "`transform` is only for `task(...)`, but `//a:src` is a `local_source`; remove it"
    );

    // Paths in sources must be normalized and inside the workspace.
    for (path, want) in [
        ("../x", "leaves the workspace"),
        ("/etc", "absolute path"),
        ("a//b", "without empty"),
    ] {
        let mut src = run("//a:src", &["true"]);
        src.kind = TaskKind::LocalSource(strata_engine::LocalSource {
            path: path.into(),
            exclude: vec![],
            watch: false,
        });
        let e = workspace(vec![src]).validate().unwrap_err().to_string();
        assert!(e.contains(want), "{path}: {e}");
    }

    // A zero timeout.
    let mut t = run("//a:t", &["true"]);
    if let TaskKind::Run(r) = &mut t.kind {
        r.timeout_secs = Some(0);
    }
    assert!(matches!(
        *workspace(vec![t]).validate().unwrap_err().problem,
        Invalid::OutOfRange { .. }
    ));
}

#[test]
fn merges_need_sides_on_their_base() {
    let base = run("//m:base", &["true"]);
    let mut left = run("//m:left", &["true"]);
    left.transform = Some(label("//m:base"));
    let mut deeper = run("//m:deeper", &["true"]);
    deeper.transform = Some(label("//m:left"));
    let other = run("//m:other", &["true"]);
    let merge = |sides: &[&str]| Task {
        label: label("//m:join"),
        kind: TaskKind::Merge(Merge {
            base: label("//m:base"),
            sides: sides.iter().map(|s| label(s)).collect(),
            on_conflict: OnConflict::Ours,
        }),
        deps: vec![],
        transform: None,
        stage: None,
        location: None,
    };
    let tasks = vec![base, left, deeper, other];
    let mut ok = tasks.clone();
    ok.push(merge(&["//m:left", "//m:deeper"]));
    workspace(ok).validate().unwrap();

    let mut bad = tasks;
    bad.push(merge(&["//m:deeper", "//m:other"]));
    let e = workspace(bad).validate().unwrap_err();
    assert!(
        matches!(&*e.problem, Invalid::SideOffBase { side, end, .. } if side == &label("//m:other") && **end == label("//m:other")),
        "{e}"
    );
}

#[test]
fn inputs_are_deduplicated_in_order() {
    let mut t = run("//a:t", &["true"]);
    t.deps = vec![
        Dep {
            mount: "x".into(),
            label: label("//a:x"),
        },
        Dep {
            mount: "y".into(),
            label: label("//a:y"),
        },
    ];
    t.transform = Some(label("//a:x"));
    let inputs: Vec<String> = t.inputs().iter().map(|l| l.to_string()).collect();
    assert_eq!(inputs, ["//a:x", "//a:y"]);
    assert_eq!(t.base(), Some(&label("//a:x")));
}

#[test]
fn run_defaults_in_json() {
    let run: Run = serde_json::from_str(r#"{"cmd": {"argv": ["true"]}}"#).unwrap();
    assert_eq!(run, Run::new(Command::Argv(vec!["true".into()])));
    assert_eq!(
        serde_json::to_string(&run).unwrap(),
        r#"{"cmd":{"argv":["true"]},"pure":true}"#
    );
    let _: BTreeMap<String, String> = run.env;
}

/// The package directory. Read at run time (cargo sets it for tests): the
/// compile-time value names whichever checkout built a binary that a shared
/// target directory reuses.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
