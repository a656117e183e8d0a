//! Golden digests: the canonical tree encoding and the layer digests of a few
//! fixture trees are frozen in `fixtures/golden.json` (name → hex digest).
//!
//! Two kinds of fixture trees:
//! - specs in this file, written to a temporary directory at run time, because
//!   git cannot keep exec bits reliably, empty directories, non-UTF-8 names or
//!   dangling symlinks. The spec is the fixture: editing one changes its digest.
//! - plain-file trees committed under `fixtures/trees/`.
//!
//! A mismatch means the encoding (or ingest) changed. That is a format change:
//! bump the tree version in `TREE_MAGIC` and say so in `docs/FORMAT.md`, then
//! rewrite the file with `STRATA_BLESS_GOLDEN=1 cargo test --workspace --test golden`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use strata_store::{Digest, Entry, IngestOptions, Name, Store, Target, Tree};

const FORMAT_CHANGE: &str = "changing a golden digest is a format change: bump the tree version \
     and say so in docs/FORMAT.md (then rewrite fixtures/golden.json with \
     `STRATA_BLESS_GOLDEN=1 cargo test --workspace --test golden`)";

fn fixtures() -> PathBuf {
    Path::new(&manifest_dir()).join("../fixtures")
}

fn golden_path() -> PathBuf {
    fixtures().join("golden.json")
}

fn blessing() -> bool {
    std::env::var_os("STRATA_BLESS_GOLDEN").is_some_and(|v| v == "1")
}

fn name(s: impl AsRef<[u8]>) -> Name {
    Name::new(s.as_ref().to_vec()).unwrap()
}

// ---------------------------------------------------------------------------
// The fixtures
// ---------------------------------------------------------------------------

/// Hand-built trees whose encodings are frozen.
fn encodings() -> Vec<(&'static str, Tree, Vec<u8>)> {
    let hello = Digest::of(b"hello\n");
    let script = b"#!/bin/sh\necho hi\n";
    let empty = Tree::empty();
    let one_of_each = Tree::from_entries(vec![
        (
            name("hello.txt"),
            Entry::File {
                digest: hello,
                size: 6,
                executable: false,
            },
        ),
        (
            name("run.sh"),
            Entry::File {
                digest: Digest::of(script),
                size: script.len() as u64,
                executable: true,
            },
        ),
        (
            name("link"),
            Entry::Symlink {
                target: Target::new("hello.txt").unwrap(),
            },
        ),
        (
            name("sub"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
    ])
    .unwrap();
    let one_of_each_bytes = enc_tree(&[
        enc_file(b"hello.txt", 0, 6, &hello),
        enc_symlink(b"link", b"hello.txt"),
        enc_file(b"run.sh", 1, script.len() as u64, &Digest::of(script)),
        enc_dir(b"sub", &empty.digest()),
    ]);
    let odd_names = Tree::from_entries(vec![
        (
            name(b"\xff"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
        (
            name("a"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
        (
            name("B"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
        (
            name(b"\x01"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
        (
            name("a.b"),
            Entry::Dir {
                digest: empty.digest(),
            },
        ),
    ])
    .unwrap();
    let odd_names_bytes = enc_tree(&[
        enc_dir(b"\x01", &empty.digest()),
        enc_dir(b"B", &empty.digest()),
        enc_dir(b"a", &empty.digest()),
        enc_dir(b"a.b", &empty.digest()),
        enc_dir(b"\xff", &empty.digest()),
    ]);
    vec![
        ("encoding/empty-tree", empty, enc_tree(&[])),
        ("encoding/one-of-each", one_of_each, one_of_each_bytes),
        ("encoding/names-sorted-as-bytes", odd_names, odd_names_bytes),
    ]
}

/// Fixture trees described in code, written to disk at run time.
fn specs() -> Vec<(&'static str, Dir)> {
    let long_name = vec![b'n'; 255];
    let long_target = "../".repeat(1000) + "target";
    vec![
        ("spec/empty", Dir::new()),
        (
            "spec/modes",
            Dir::new()
                .file("plain", "same bytes\n")
                .exec("executable", "same bytes\n")
                .file("empty", "")
                .exec("empty-exec", ""),
        ),
        (
            "spec/empty-dirs",
            Dir::new()
                .dir("a", Dir::new())
                .dir("b", Dir::new().dir("c", Dir::new().dir("d", Dir::new()))),
        ),
        (
            "spec/names",
            Dir::new()
                .file(b"latin1-caf\xe9", "1")
                .file("utf8-caf\u{e9}", "2")
                .file(b"\x01control", "3")
                .file(b"\xff\xfe\xfd", "4")
                .file("B", "5")
                .file("a", "6")
                .file("a.b", "7")
                .file(" lead and trail ", "8")
                .file("new\nline", "9")
                .file(".hidden", "10")
                .file("...", "11")
                .file(long_name, "12")
                .dir(b"dir-\x80", Dir::new().file(b"\x80", "13")),
        ),
        (
            "spec/links",
            Dir::new()
                .file("target", "t")
                .link("relative", "target")
                .link("dangling", "no/such/file")
                .link("absolute", "/etc/passwd")
                .link("escaping", "../../outside")
                .link("to-dir", "sub")
                .link("self", "self")
                .link(b"non-utf8", b"\xff\xfe")
                .link("long", long_target)
                .dir("sub", Dir::new().link("up", "../target")),
        ),
        (
            "spec/nested",
            Dir::new()
                .dir(
                    "l1",
                    Dir::new().exec("tool", "#!/bin/sh\n").dir(
                        "l2",
                        Dir::new().dir(
                            "l3",
                            Dir::new().dir("l4", Dir::new().file("leaf", "leaf\n")),
                        ),
                    ),
                )
                .dir("shared-1", Dir::new().file("same", "same subtree\n"))
                .dir("shared-2", Dir::new().file("same", "same subtree\n"))
                .file("big", pseudo_random(1_500_000, 42)),
        ),
    ]
}

/// Trees committed under `fixtures/trees/` (plain files only).
const COMMITTED: &[&str] = &["hello", "nested"];

// ---------------------------------------------------------------------------
// Computing
// ---------------------------------------------------------------------------

fn ingest(store: &Store, dir: &Path) -> Digest {
    store
        .ingest(dir, &IngestOptions::default())
        .unwrap_or_else(|e| panic!("ingest {}: {}", dir.display(), chain(&e)))
        .layer
}

fn computed_encodings() -> BTreeMap<String, Digest> {
    let mut out = BTreeMap::new();
    for (n, tree, bytes) in encodings() {
        assert!(
            tree.encode() == bytes,
            "{n}: the encoding differs from the layout written out in this test; {FORMAT_CHANGE}"
        );
        assert_eq!(Tree::decode(&bytes).unwrap(), tree, "{n}: decode");
        assert_eq!(
            tree.digest(),
            Digest::of(&bytes),
            "{n}: a tree's digest is BLAKE3 of its encoding"
        );
        out.insert(n.to_owned(), tree.digest());
    }
    out
}

fn computed_specs() -> BTreeMap<String, Digest> {
    let mem = memory();
    let disk = rocksdb();
    let mut out = BTreeMap::new();
    for (n, spec) in specs() {
        let dir = mem.materialise(&spec);
        assert_same(n, &snapshot(&dir), &spec.snapshot());
        let layer = ingest(&mem, &dir);
        assert_eq!(
            layer,
            spec.build(&mem),
            "{n}: ingest and a hand-built tree agree"
        );
        assert_eq!(
            ingest(&disk, &dir),
            layer,
            "{n}: every backend gives the same digest"
        );
        out.insert(n.to_owned(), layer);
    }
    out
}

fn computed_committed() -> BTreeMap<String, Digest> {
    let mem = memory();
    let mut out = BTreeMap::new();
    for n in COMMITTED {
        let dir = fixtures().join("trees").join(n);
        assert!(dir.is_dir(), "missing fixture tree {}", dir.display());
        out.insert(format!("trees/{n}"), ingest(&mem, &dir));
    }
    out
}

/// The tar inside an export of `spec/links` and `spec/names`: exports are
/// deterministic, and other tools may rely on their exact bytes. (The zstd
/// bytes are not frozen: they may change with the zstd library.)
fn computed_exports() -> BTreeMap<String, Digest> {
    let mem = memory();
    let mut out = BTreeMap::new();
    for (n, spec) in specs() {
        if n != "spec/links" && n != "spec/names" && n != "spec/modes" {
            continue;
        }
        let layer = spec.build(&mem);
        let mut archive = Vec::new();
        mem.export(&layer, &mut archive).unwrap();
        let tar = zstd::decode_all(&archive[..]).unwrap();
        out.insert(
            format!("export-tar/{}", &n["spec/".len()..]),
            Digest::of(&tar),
        );
    }
    out
}

fn golden() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(golden_path())
        .unwrap_or_else(|e| panic!("read {}: {e}", golden_path().display()));
    serde_json::from_str(&text).expect("fixtures/golden.json is a JSON object of name → hex digest")
}

fn check(what: &str, got: BTreeMap<String, Digest>, advice: &str) {
    if blessing() {
        return; // `golden_file_lists_exactly_the_computed_names` writes the file.
    }
    let want = golden();
    let mut bad = Vec::new();
    for (n, d) in &got {
        match want.get(n) {
            Some(w) if *w == d.to_hex() => {}
            Some(w) => bad.push(format!("  {n}: computed {d}, golden {w}")),
            None => bad.push(format!("  {n}: computed {d}, not in golden.json")),
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: golden digests differ\n{}\n{advice}",
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn tree_encodings_match_golden() {
    check("tree encodings", computed_encodings(), FORMAT_CHANGE);
}

#[test]
fn spec_layers_match_golden() {
    check(
        "fixture trees built from specs",
        computed_specs(),
        FORMAT_CHANGE,
    );
}

#[test]
fn committed_trees_match_golden() {
    check(
        "committed fixture trees",
        computed_committed(),
        &format!(
            "{FORMAT_CHANGE}. If a file under fixtures/trees/ changed instead, \
             restore it or rewrite golden.json in the same change"
        ),
    );
}

#[test]
fn exported_tars_match_golden() {
    check(
        "exported archives (tar inside the zstd)",
        computed_exports(),
        "changing the bytes of an export is a format change of archives: say so in docs/FORMAT.md",
    );
}

#[test]
fn golden_file_lists_exactly_the_computed_names() {
    let mut all = computed_encodings();
    all.extend(computed_specs());
    all.extend(computed_committed());
    all.extend(computed_exports());
    if blessing() {
        let map: BTreeMap<String, String> =
            all.iter().map(|(k, v)| (k.clone(), v.to_hex())).collect();
        let text = serde_json::to_string_pretty(&map).unwrap() + "\n";
        std::fs::write(golden_path(), text).unwrap();
        return;
    }
    let want = golden();
    let got: Vec<&String> = all.keys().collect();
    let have: Vec<&String> = want.keys().collect();
    assert_eq!(
        got, have,
        "fixtures/golden.json names a fixture that no test computes, or misses one"
    );
    for (n, hex) in &want {
        assert!(
            hex.parse::<Digest>().is_ok(),
            "{n}: `{hex}` is not a digest"
        );
    }
}

/// The package directory. Read at run time (cargo sets it for tests): the
/// compile-time value names whichever checkout built a binary that a shared
/// target directory reuses.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
