//! The graph view and `ci graph` output, on the fixtures.

use std::collections::BTreeSet;
use std::path::Path;

use strata_engine::graph::stage_order;
use strata_engine::{
    expand, render_graph, Graph, GraphFormat, GraphJson, Invalid, Label, Loader, Pattern, Workspace,
};

fn fixture(name: &str) -> Workspace {
    let root = Path::new(&manifest_dir()).join("../fixtures").join(name);
    Loader::new(root).load().unwrap()
}

fn labels(list: &[&str]) -> Vec<Label> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn strings<'a>(it: impl IntoIterator<Item = &'a Label>) -> Vec<String> {
    it.into_iter().map(|l| l.to_string()).collect()
}

fn patterns(list: &[&str]) -> Vec<Pattern> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn topological_order_is_deterministic() {
    let ws = fixture("cproject");
    let graph = Graph::new(&ws);
    assert_eq!(
        strings(graph.topo_order()),
        [
            "//src:code",
            "//build:objects",
            "//build:binary",
            "//build:docs",
            "//release:dist",
            "//release:slim",
            "//release:tarball",
            "//release:publish",
            "//test:smoke",
            "//test:unit",
        ]
    );
    // Every task comes after its inputs.
    let order = graph.topo_order();
    for (i, label) in order.iter().enumerate() {
        for input in graph.inputs_of(label) {
            assert!(order[..i].contains(&input), "{input} after {label}");
        }
    }
}

#[test]
fn closures_up_and_down() {
    let ws = fixture("cproject");
    let graph = Graph::new(&ws);
    assert_eq!(
        strings(graph.deps_closure(&labels(&["//test:unit"]))),
        ["//build:objects", "//src:code", "//test:unit"]
    );
    assert_eq!(
        strings(graph.downstream(&labels(&["//build:docs"]))),
        [
            "//build:docs",
            "//release:dist",
            "//release:publish",
            "//release:slim",
            "//release:tarball",
            "//test:smoke"
        ]
    );
    assert_eq!(
        graph.downstream(&labels(&["//src:code"])).len(),
        ws.tasks.len()
    );
    assert_eq!(
        strings(graph.users_of(&"//release:slim".parse().unwrap())),
        ["//release:tarball", "//test:smoke"]
    );
    assert_eq!(
        strings(graph.inputs_of(&"//release:dist".parse().unwrap())),
        ["//build:objects", "//build:binary", "//build:docs"]
    );
}

#[test]
fn stage_gates() {
    let ws = fixture("cproject");
    let graph = Graph::new(&ws);
    assert_eq!(stage_order(&ws), ["build", "test", "package"]);
    let unit: Label = "//test:unit".parse().unwrap();
    assert_eq!(
        strings(graph.stage_gates(&unit, None)),
        [
            "//build:binary",
            "//build:docs",
            "//build:objects",
            "//release:dist",
            "//release:slim"
        ]
    );
    let run = graph.deps_closure(std::slice::from_ref(&unit));
    assert_eq!(
        strings(graph.stage_gates(&unit, Some(&run))),
        ["//build:objects"]
    );
    assert!(graph
        .stage_gates(&"//src:code".parse().unwrap(), None)
        .is_empty());
}

#[test]
fn pattern_expansion() {
    let ws = fixture("cproject");
    assert_eq!(
        strings(&expand(&ws, &patterns(&["//release:all"])).unwrap()),
        [
            "//release:dist",
            "//release:publish",
            "//release:slim",
            "//release:tarball"
        ]
    );
    assert_eq!(expand(&ws, &patterns(&["//..."])).unwrap().len(), 10);
    assert_eq!(
        strings(&expand(&ws, &patterns(&["//test/...", "//test:unit", "//src:code"])).unwrap()),
        ["//src:code", "//test:smoke", "//test:unit"]
    );
    let e = expand(&ws, &patterns(&["//build:objcts"])).unwrap_err();
    assert!(
        matches!(&*e.problem, Invalid::UnknownTarget { known, .. } if known == &["binary", "docs", "objects"])
    );
    assert_eq!(
        e.to_string(),
        "Unknown target `//build:objcts`; package `build` defines `binary`, `docs`, `objects`"
    );
    let e = expand(&ws, &patterns(&["//nowhere/..."])).unwrap_err();
    assert_eq!(e.to_string(), "No tasks match `//nowhere/...`");
}

#[test]
fn dot_output() {
    let ws = fixture("hello");
    let dot = render_graph(&ws, &[], GraphFormat::Dot);
    assert_eq!(
        dot,
        r#"digraph strata {
  rankdir=LR;
  node [shape=box, fontname="monospace"];
  "//:src" [label="//:src\nlocal_source", shape=folder];
  subgraph "cluster_build" {
    label="stage build";
    "//:greeting" [label="//:greeting\nrun", shape=box];
    "//:stamped" [label="//:stamped\nrun", shape=box];
  }
  subgraph "cluster_test" {
    label="stage test (after build)";
    "//:test" [label="//:test\nrun", shape=box];
  }
  "//:src" -> "//:greeting" [label="src"];
  "//:greeting" -> "//:stamped" [label="transform", style=bold];
  "//:stamped" -> "//:test" [label="app"];
}
"#
    );
}

#[test]
fn mermaid_output() {
    let ws = fixture("hello");
    let mermaid = render_graph(&ws, &labels(&["//:stamped"]), GraphFormat::Mermaid);
    assert_eq!(
        mermaid,
        r#"flowchart LR
  t1[/"//:src"/]
  subgraph s0 ["stage build"]
    t0["//:greeting"]
    t2["//:stamped"]
  end
  t1 -->|src| t0
  t0 ==>|transform| t2
"#
    );
    let full = render_graph(&fixture("cproject"), &[], GraphFormat::Mermaid);
    assert!(full.contains("{{\"//release:dist\"}}"), "{full}");
    assert!(full.contains("-.->|side|"), "{full}");
    assert!(
        full.contains("s0 -.->|then| s2"),
        "build then test:\n{full}"
    );
}

#[test]
fn json_output_is_the_model() {
    let ws = fixture("cproject");
    let text = render_graph(&ws, &labels(&["//test:smoke"]), GraphFormat::Json);
    let json: GraphJson = serde_json::from_str(&text).unwrap();
    assert_eq!(strings(&json.targets), ["//test:smoke"]);
    assert_eq!(
        strings(&json.order),
        [
            "//src:code",
            "//build:objects",
            "//build:binary",
            "//build:docs",
            "//release:dist",
            "//release:slim",
            "//test:smoke"
        ]
    );
    for (label, task) in &json.tasks {
        assert_eq!(&ws.tasks[label], task);
    }
    assert_eq!(json.stages, ws.stages);
    // Byte-for-byte stable across loads.
    assert_eq!(
        text,
        render_graph(
            &fixture("cproject"),
            &labels(&["//test:smoke"]),
            GraphFormat::Json
        )
    );
}

#[test]
fn output_is_stable() {
    for format in [GraphFormat::Dot, GraphFormat::Mermaid, GraphFormat::Json] {
        let a = render_graph(&fixture("cproject"), &[], format);
        let b = render_graph(&fixture("cproject"), &[], format);
        assert_eq!(a, b);
    }
    assert_eq!("mermaid".parse::<GraphFormat>(), Ok(GraphFormat::Mermaid));
    assert!("svg".parse::<GraphFormat>().is_err());
}

#[test]
fn topo_order_of_subset() {
    let ws = fixture("cproject");
    let graph = Graph::new(&ws);
    let subset: BTreeSet<&Label> = ws
        .tasks
        .keys()
        .filter(|l| l.package() == "release")
        .collect();
    assert_eq!(
        strings(graph.topo_order_of(&subset)),
        [
            "//release:dist",
            "//release:slim",
            "//release:tarball",
            "//release:publish"
        ]
    );
}

/// The package directory. Read at run time (cargo sets it for tests): the
/// compile-time value names whichever checkout built a binary that a shared
/// target directory reuses.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
