//! Property tests: random trees through ingest and checkout, the tree
//! encoding, diff/apply and merge laws, and archive import of any input.
//!
//! Most run on the in-memory backend for speed (64 cases by default; set
//! `PROPTEST_CASES` for a longer soak); the on-disk backend runs a smaller
//! number of the filesystem and archive cases.

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use common::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use strata_store::{
    Digest, Entry, Error, ImportOptions, IngestOptions, MergePolicy, Name, RelPath, Store, Target,
    Tree, FIXED_MTIME,
};

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Any valid entry name: raw bytes, no `/` or NUL, not `.` or `..`, 1 to 255
/// bytes; mostly short, sometimes readable, sometimes the longest allowed.
fn entry_name() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_filter("no `/` or NUL", |b| *b != b'/' && *b != 0);
    prop_oneof![
        4 => "[a-z][a-z0-9._-]{0,7}".prop_map(String::into_bytes),
        4 => vec(byte.clone(), 1..12),
        1 => vec(byte, 250..=255),
    ]
    .prop_filter("not `.` or `..`", |n| n != b"." && n != b"..")
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_filter("no NUL", |b| *b != 0);
    prop_oneof![
        3 => vec(byte, 1..40),
        3 => "[a-z./]{1,20}".prop_map(String::into_bytes),
        1 => Just(b"/etc/passwd".to_vec()),
        1 => Just(b"../..".to_vec()),
        1 => Just(b"does/not/exist".to_vec()),
    ]
}

/// File contents: random (up to 4 KiB), or from a small set so that blobs repeat.
fn contents() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (0usize..=4096, any::<u64>()).prop_map(|(len, seed)| pseudo_random(len, seed)),
        1 => prop::sample::select(vec![&b""[..], b"a", b"same\n"]).prop_map(<[u8]>::to_vec),
    ]
}

fn leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (contents(), any::<bool>()).prop_map(|(bytes, exec)| Node::File { bytes, exec }),
        2 => target().prop_map(Node::Link),
        1 => Just(Node::Dir(Dir::new())),
    ]
}

/// A random tree: nested directories up to depth 4 below the root.
fn tree() -> impl Strategy<Value = Dir> {
    let node = leaf().prop_recursive(3, 48, 6, |inner| {
        btree_map(entry_name(), inner, 0..6).prop_map(|m| Node::Dir(Dir(m)))
    });
    btree_map(entry_name(), node, 0..8).prop_map(Dir)
}

/// Trees over a tiny universe (names `a`–`c`, three contents, two targets), so
/// that independent draws overlap: what diff and merge laws need.
fn small_tree() -> impl Strategy<Value = Dir> {
    let name = prop::sample::select(vec!["a", "b", "c"]).prop_map(|s| s.as_bytes().to_vec());
    let leaf = prop_oneof![
        4 => (prop::sample::select(vec!["", "1", "2"]), any::<bool>())
            .prop_map(|(c, exec)| Node::File { bytes: c.as_bytes().to_vec(), exec }),
        1 => prop::sample::select(vec!["a", "../x"]).prop_map(|t| Node::Link(t.as_bytes().to_vec())),
        1 => Just(Node::Dir(Dir::new())),
    ];
    let node = leaf.prop_recursive(2, 24, 3, move |inner| {
        btree_map(
            prop::sample::select(vec!["a", "b", "c"]).prop_map(|s| s.as_bytes().to_vec()),
            inner,
            0..3,
        )
        .prop_map(|m| Node::Dir(Dir(m)))
    });
    btree_map(name, node, 0..4).prop_map(Dir)
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let digest = any::<[u8; 32]>().prop_map(Digest::from_bytes);
    prop_oneof![
        (digest.clone(), any::<u64>(), any::<bool>()).prop_map(|(digest, size, executable)| {
            Entry::File {
                digest,
                size,
                executable,
            }
        }),
        target().prop_map(|t| Entry::Symlink {
            target: Target::new(t).unwrap()
        }),
        digest.prop_map(|digest| Entry::Dir { digest }),
    ]
}

fn arb_tree() -> impl Strategy<Value = Tree> {
    btree_map(entry_name(), arb_entry(), 0..12).prop_map(|m| {
        Tree::from_entries(
            m.into_iter()
                .map(|(n, e)| (Name::new(n).unwrap(), e))
                .collect(),
        )
        .unwrap()
    })
}

// ---------------------------------------------------------------------------
// Ingest → checkout
// ---------------------------------------------------------------------------

fn round_trip(t: &TestStore, spec: &Dir) -> Result<(), TestCaseError> {
    let src = t.materialise(spec);
    let want = spec.snapshot();
    prop_assert_eq!(
        &snapshot(&src),
        &want,
        "the fixture was not written faithfully"
    );
    let report = t
        .ingest(&src, &IngestOptions::default())
        .map_err(|e| TestCaseError::fail(format!("ingest: {}", chain(&e))))?;
    prop_assert_eq!(report.stats, spec.stats());
    prop_assert_eq!(
        report.layer,
        spec.build(t),
        "ingest and a hand-built tree disagree"
    );
    let out = t.path("checkout");
    t.checkout(&report.layer, &out)
        .map_err(|e| TestCaseError::fail(format!("checkout: {}", chain(&e))))?;
    let diffs = differences(&snapshot(&out), &want);
    prop_assert!(
        diffs.is_empty(),
        "checkout differs from the tree:\n{}",
        diffs.join("\n")
    );
    let wrong = wrong_mtimes(&out, FIXED_MTIME);
    prop_assert!(wrong.is_empty(), "mtimes: {:?}", wrong);
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn ingest_then_checkout_gives_the_same_tree(spec in tree()) {
        round_trip(&memory(), &spec)?;
    }
}

proptest! {
    #![proptest_config(config(8))]

    #[test]
    fn ingest_then_checkout_gives_the_same_tree_on_disk(spec in tree()) {
        round_trip(&rocksdb(), &spec)?;
    }
}

// ---------------------------------------------------------------------------
// The encoding
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tree_encoding_round_trips(t in arb_tree()) {
        let bytes = t.encode();
        prop_assert_eq!(Tree::decode(&bytes).unwrap(), t.clone());
        prop_assert_eq!(t.digest(), Digest::of(&bytes));
    }

    /// Any bytes: refused, or decoded to a tree whose encoding is exactly
    /// those bytes (one tree, one encoding). Never a panic.
    #[test]
    fn decode_of_any_bytes_is_canonical(
        magic in any::<bool>(),
        rest in vec(any::<u8>(), 0..200),
    ) {
        let bytes = if magic { [MAGIC, &rest].concat() } else { rest };
        if let Ok(t) = Tree::decode(&bytes) {
            prop_assert_eq!(t.encode(), bytes);
        }
    }

    #[test]
    fn decode_of_a_mutated_encoding_is_canonical(
        t in arb_tree(),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut bytes = t.encode();
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Ok(t2) = Tree::decode(&bytes) {
            prop_assert_eq!(t2.encode(), bytes);
        }
    }
}

// ---------------------------------------------------------------------------
// Diff, apply and merge laws
// ---------------------------------------------------------------------------

/// The paths of a diff, as component lists.
fn change_paths(store: &Store, a: &Digest, b: &Digest) -> Vec<(RelPath, Option<Entry>)> {
    store
        .diff(a, b)
        .unwrap()
        .into_iter()
        .map(|c| (c.path, c.new))
        .collect()
}

fn related(p: &RelPath, q: &RelPath) -> bool {
    let (p, q) = (p.components(), q.components());
    let n = p.len().min(q.len());
    p[..n] == q[..n]
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn diff_then_apply_gives_the_target(a in tree(), b in tree()) {
        let t = memory();
        let (a, b) = (a.build(&t), b.build(&t));
        let d = t.diff(&a, &b).unwrap();
        prop_assert_eq!(t.apply(&a, &d).unwrap(), b);
        prop_assert_eq!(d.is_empty(), a == b);
        prop_assert!(t.diff(&a, &a).unwrap().is_empty());
    }

    #[test]
    fn diff_then_apply_gives_the_target_small(a in small_tree(), b in small_tree()) {
        let t = memory();
        let (a, b) = (a.build(&t), b.build(&t));
        let d = t.diff(&a, &b).unwrap();
        prop_assert_eq!(t.apply(&a, &d).unwrap(), b);
        let paths: Vec<&RelPath> = d.iter().map(|c| &c.path).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(paths, sorted, "a diff is sorted by path, each path once");
        for c in &d {
            prop_assert_eq!(c.old.clone(), t.lookup(&a, &c.path).unwrap());
            prop_assert_eq!(c.new.clone(), t.lookup(&b, &c.path).unwrap());
        }
    }

    #[test]
    fn merge_laws(b in small_tree(), x in small_tree(), y in small_tree()) {
        let t = memory();
        let (b, x, y) = (b.build(&t), x.build(&t), y.build(&t));
        for p in [MergePolicy::Fail, MergePolicy::Ours, MergePolicy::Theirs] {
            let m = |base, ours, theirs| t.merge(&base, &ours, &theirs, p).unwrap();
            prop_assert_eq!(m(x, x, x).merged, Some(x), "merge(a, a, a) = a");
            prop_assert_eq!(m(b, x, b).merged, Some(x), "merge(b, x, b) = x");
            prop_assert_eq!(m(b, b, x).merged, Some(x), "merge(b, b, x) = x");
            prop_assert_eq!(m(b, x, x).merged, Some(x), "merge(b, x, x) = x");
        }

        let fail = t.merge(&b, &x, &y, MergePolicy::Fail).unwrap();
        let ours = t.merge(&b, &x, &y, MergePolicy::Ours).unwrap();
        let theirs = t.merge(&b, &x, &y, MergePolicy::Theirs).unwrap();
        let swapped = t.merge(&b, &y, &x, MergePolicy::Theirs).unwrap();
        prop_assert_eq!(ours.merged, swapped.merged, "merge(b, x, y, ours) = merge(b, y, x, theirs)");
        let set = |v: &[RelPath]| v.iter().cloned().collect::<BTreeSet<_>>();
        prop_assert_eq!(set(&ours.conflicts), set(&swapped.conflicts));
        prop_assert_eq!(set(&fail.conflicts), set(&ours.conflicts));
        prop_assert_eq!(fail.merged.is_none(), !fail.conflicts.is_empty());
        if fail.conflicts.is_empty() {
            prop_assert_eq!(fail.merged, ours.merged);
            prop_assert_eq!(fail.merged, theirs.merged);
        }

        let (om, tm) = (ours.merged.unwrap(), theirs.merged.unwrap());
        for c in &fail.conflicts {
            let (eb, ex, ey) = (
                t.lookup(&b, c).unwrap(),
                t.lookup(&x, c).unwrap(),
                t.lookup(&y, c).unwrap(),
            );
            prop_assert!(eb != ex && eb != ey && ex != ey, "`{}` is a conflict only when all three differ", c);
            prop_assert_eq!(t.lookup(&om, c).unwrap(), ex, "ours takes our side at `{}`", c);
            prop_assert_eq!(t.lookup(&tm, c).unwrap(), ey, "theirs takes their side at `{}`", c);
        }

        // A change made by one side only, away from anything the other side
        // changed, is in the merge whatever the policy.
        let dx = change_paths(&t, &b, &x);
        let dy = change_paths(&t, &b, &y);
        for (mine, other) in [(&dx, &dy), (&dy, &dx)] {
            for (p, new) in mine {
                if other.iter().any(|(q, _)| related(p, q)) {
                    continue;
                }
                prop_assert_eq!(&t.lookup(&om, p).unwrap(), new, "ours at `{}`", p);
                prop_assert_eq!(&t.lookup(&tm, p).unwrap(), new, "theirs at `{}`", p);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Archive import of any input
// ---------------------------------------------------------------------------

/// A layer whose export exercises GNU long names and long links.
fn archive_spec() -> Dir {
    Dir::new()
        .file("a", "alpha\n")
        .exec("run", "#!/bin/sh\n")
        .link("l", "a")
        .dir(
            "d",
            Dir::new()
                .file("f", pseudo_random(1500, 9))
                .dir("e", Dir::new()),
        )
        .file(vec![b'n'; 150], "long name\n")
        .link("long-link", "x/".repeat(80))
}

fn valid_archive() -> &'static (Vec<u8>, Vec<u8>) {
    static A: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    A.get_or_init(|| {
        let t = memory();
        let layer = archive_spec().build(&t);
        let mut zst = Vec::new();
        t.export(&layer, &mut zst).unwrap();
        let tar = zstd::decode_all(&zst[..]).unwrap();
        (zst, tar)
    })
}

#[derive(Clone, Debug)]
enum Input {
    Bytes(Vec<u8>),
    ZstdOf(Vec<u8>),
    FlipZstd(Vec<(prop::sample::Index, u8)>),
    FlipTar(Vec<(prop::sample::Index, u8)>),
    CutZstd(prop::sample::Index),
    CutTar(prop::sample::Index),
}

fn input() -> impl Strategy<Value = Input> {
    let flips = || vec((any::<prop::sample::Index>(), 1u8..=255), 1..5);
    prop_oneof![
        vec(any::<u8>(), 0..2048).prop_map(Input::Bytes),
        vec(any::<u8>(), 0..4096).prop_map(Input::ZstdOf),
        flips().prop_map(Input::FlipZstd),
        flips().prop_map(Input::FlipTar),
        any::<prop::sample::Index>().prop_map(Input::CutZstd),
        any::<prop::sample::Index>().prop_map(Input::CutTar),
    ]
}

fn zstd_of(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

fn bytes_of(input: &Input) -> Vec<u8> {
    let (zst, tar) = valid_archive();
    let flip = |src: &[u8], flips: &[(prop::sample::Index, u8)]| {
        let mut v = src.to_vec();
        for (i, x) in flips {
            let i = i.index(v.len());
            v[i] ^= x;
        }
        v
    };
    match input {
        Input::Bytes(b) => b.clone(),
        Input::ZstdOf(b) => zstd_of(b),
        Input::FlipZstd(f) => flip(zst, f),
        Input::FlipTar(f) => zstd_of(&flip(tar, f)),
        Input::CutZstd(i) => zst[..i.index(zst.len())].to_vec(),
        Input::CutTar(i) => zstd_of(&tar[..i.index(tar.len())]),
    }
}

fn import_any(t: &TestStore, input: &Input) -> Result<(), TestCaseError> {
    let bytes = bytes_of(input);
    // Seed the store with the archive's own layer, so "nothing new" means something.
    let (zst, _) = valid_archive();
    t.import(&mut &zst[..], "seed", &ImportOptions::default())
        .unwrap();
    let before = t.counts();
    match t.import(&mut &bytes[..], "fuzzed.tar.zst", &ImportOptions::default()) {
        Ok(report) => {
            // Imported: the layer is whole.
            prop_assert!(t.has_tree(&report.layer).unwrap());
            // The zstd frame carries a checksum of the whole tar: a damaged
            // or cut frame never imports as some other layer.
            if matches!(input, Input::FlipZstd(_) | Input::CutZstd(_)) {
                let original = archive_spec().build(&Store::memory());
                prop_assert_eq!(
                    report.layer,
                    original,
                    "a damaged zstd frame was imported as another layer"
                );
            }
            let out = t.path("checkout");
            t.checkout(&report.layer, &out)
                .map_err(|e| TestCaseError::fail(chain(&e)))?;
        }
        Err(e) => {
            prop_assert!(
                matches!(e, Error::BadArchive { .. } | Error::ArchiveIo { .. }),
                "refused with an unexpected error: {}",
                chain(&e)
            );
            prop_assert_eq!(
                t.counts(),
                before,
                "a refused archive records nothing: {}",
                e
            );
        }
    }
    let left = t.staging_leftovers();
    prop_assert!(left.is_empty(), "left in tmp/: {:?}", left);
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn import_of_any_input_is_refused_or_imported(input in input()) {
        import_any(&memory(), &input)?;
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn import_of_any_input_is_refused_or_imported_on_disk(input in input()) {
        let t = rocksdb();
        import_any(&t, &input)?;
        let report = t.verify().unwrap();
        prop_assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

#[test]
fn the_valid_archive_imports() {
    let t = memory();
    let (zst, _) = valid_archive();
    let r = t
        .import(&mut &zst[..], "valid", &ImportOptions::default())
        .unwrap();
    assert_eq!(r.layer, archive_spec().build(&t));
}
