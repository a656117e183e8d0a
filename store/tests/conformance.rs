//! The store's conformance suite: every test in the `conformance!` list runs
//! against every backend listed in that macro. A new backend is one more line
//! there, and must pass the whole suite before anything uses it.
//!
//! Tests that only make sense on disk (blob files, reopening, locks, read-only
//! handles) are at the end, outside the list.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use strata_store::{
    ActionEntry, Blob, ChangeKind, Digest, Entry, Error, Family, GcOptions, ImportOptions,
    IngestOptions, Lineage, MergePolicy, Name, OpenMode, Payload, RelPath, RunEntry, Store,
    StoreUrl, Target, Tree, FIXED_MTIME,
};

/// Runs each listed test once per backend: `memory::name`, `rocksdb::name`.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        backend!(memory, crate::common::memory, $($test),*);
        backend!(rocksdb, crate::common::rocksdb, $($test),*);
    };
}

macro_rules! backend {
    ($backend:ident, $new:path, $($test:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $test() {
                    super::$test($new)
                }
            )*
        }
    };
}

conformance!(
    blobs_put_open_read_at_contains_delete,
    blob_writer_stages_until_published,
    trees_put_get_has_lookup,
    ingest_checkout_round_trip,
    checkout_refuses_a_non_empty_directory,
    ingest_twice_same_layer_and_warm_stat_cache,
    stat_cache_detects_changes_of_the_same_size,
    ingest_refuses_fifo_and_socket,
    ingest_honours_ignore_files_and_excludes,
    dircache_file_edited_below_an_unchanged_directory,
    dircache_entry_added,
    dircache_entry_removed,
    dircache_dir_replaced_by_file_and_back,
    dircache_ignore_file_edited_in_place,
    dircache_symlink_mode_and_excludes,
    refs_set_get_delete_list,
    resolve_ref_digest_and_prefix,
    diff_kinds,
    diff_skips_equal_subtrees_without_reading_them,
    apply_diff_gives_target,
    edit_creates_missing_parents,
    merge_disjoint_changes,
    merge_conflicts_and_policies,
    export_import_round_trip,
    gc_keeps_roots_and_drops_the_rest,
    gc_dry_run_deletes_nothing,
    verify_clean_then_missing_blob_and_tree,
    actions_and_runs_round_trip,
    verify_reports_bad_records,
    verify_decodes_every_family_and_gc_stops_on_an_unreadable_root,
    drop_dangling_makes_a_store_with_a_lost_blob_consistent,
    ingest_counts_a_new_blob_once,
    ingest_records_the_given_lineage,
    gc_concurrent_with_ingest_keeps_every_recorded_blob,
);

fn name(s: impl AsRef<[u8]>) -> Name {
    Name::new(s.as_ref().to_vec()).expect("valid name")
}

fn path(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("valid path")
}

/// Reads until `buf` is full or the blob ends; returns the bytes read.
fn read_at_full(blob: &dyn Blob, buf: &mut [u8], mut offset: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let got = blob.read_at(&mut buf[n..], offset).expect("read_at");
        if got == 0 {
            break;
        }
        n += got;
        offset += got as u64;
    }
    n
}

// ---------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------

fn blobs_put_open_read_at_contains_delete(new: Backend) {
    let t = new();
    let bytes = pseudo_random(100_000, 1);
    let (d, new) = t.blobs().put(&bytes).unwrap();
    assert!(new, "the first put stores a new blob");
    assert_eq!(
        d,
        Digest::of(&bytes),
        "a blob is addressed by the BLAKE3 of its bytes"
    );
    assert!(t.blobs().contains(&d).unwrap());
    assert_eq!(
        t.blobs().put(&bytes).unwrap(),
        (d, false),
        "putting twice is a no-op"
    );

    let blob = t.blob(&d).unwrap();
    assert_eq!(blob.size(), bytes.len() as u64);
    let len = bytes.len();
    for (off, want) in [
        (0, 10),
        (1, 4096),
        (4095, 4097),
        (65_536, 1),
        (len - 10, 10),
        (len - 10, 100),
    ] {
        let mut buf = vec![0u8; want];
        let n = read_at_full(&*blob, &mut buf, off as u64);
        let end = (off + want).min(len);
        assert_eq!(&buf[..n], &bytes[off..end], "read_at({off}, {want})");
    }
    let mut buf = [0u8; 16];
    assert_eq!(
        blob.read_at(&mut buf, len as u64).unwrap(),
        0,
        "read_at at the end"
    );
    assert_eq!(
        blob.read_at(&mut buf, len as u64 + 1).unwrap(),
        0,
        "read_at past the end"
    );
    assert_eq!(
        blob.read_at(&mut buf, u64::MAX).unwrap(),
        0,
        "read_at far past the end"
    );
    assert_eq!(t.read_blob(&d).unwrap(), bytes);
    drop(blob);

    // The empty blob is a blob like any other.
    let e = t.put_blob(b"").unwrap();
    assert_eq!(e, Digest::of(b""));
    assert_eq!(t.blob(&e).unwrap().size(), 0);
    assert_eq!(t.read_blob(&e).unwrap(), b"");

    let mut listed = Vec::new();
    t.blobs()
        .for_each(&mut |d, size| {
            listed.push((d, size));
            Ok(())
        })
        .unwrap();
    listed.sort();
    let mut want = vec![(d, bytes.len() as u64), (e, 0)];
    want.sort();
    assert_eq!(listed, want, "for_each lists every blob once with its size");

    let missing = Digest::of(b"never stored");
    assert!(!t.blobs().contains(&missing).unwrap());
    assert!(t.blobs().open(&missing).unwrap().is_none());
    assert!(matches!(t.blob(&missing), Err(Error::MissingBlob(m)) if m == missing));

    assert_eq!(t.blobs().delete(&d).unwrap(), bytes.len() as u64);
    assert!(!t.blobs().contains(&d).unwrap());
    assert!(t.blobs().open(&d).unwrap().is_none());
    assert!(matches!(t.blob(&d), Err(Error::MissingBlob(_))));
    assert_eq!(
        t.blobs().delete(&d).unwrap(),
        0,
        "deleting a missing blob frees nothing"
    );
    assert!(t.blobs().contains(&e).unwrap(), "other blobs stay");
}

fn blob_writer_stages_until_published(new: Backend) {
    let t = new();
    let bytes = pseudo_random(3 << 20, 2); // above the parallel-hash threshold
    let mut w = t.blobs().writer().unwrap();
    for chunk in bytes.chunks(100_000) {
        w.write_all(chunk).unwrap();
    }
    let staged = w.finish().unwrap();
    assert_eq!(staged.digest(), Digest::of(&bytes));
    assert_eq!(staged.size(), bytes.len() as u64);
    assert!(
        !t.blobs().contains(&staged.digest()).unwrap(),
        "staged is not stored"
    );
    drop(staged);
    assert!(!t.blobs().contains(&Digest::of(&bytes)).unwrap());
    assert_eq!(
        t.staging_leftovers(),
        Vec::<std::path::PathBuf>::new(),
        "a dropped staged blob leaves nothing"
    );

    let mut w = t.blobs().writer().unwrap();
    w.write_all(&bytes).unwrap();
    let staged = w.finish().unwrap();
    let d = staged.digest();
    staged.publish().unwrap();
    assert!(t.blobs().contains(&d).unwrap());
    assert_eq!(t.read_blob(&d).unwrap(), bytes);

    // Publishing the same bytes again is a no-op.
    let mut w = t.blobs().writer().unwrap();
    w.write_all(&bytes).unwrap();
    w.finish().unwrap().publish().unwrap();
    assert_eq!(t.read_blob(&d).unwrap(), bytes);
    assert!(t.staging_leftovers().is_empty());
    t.blobs().sync().unwrap();
}

// ---------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------

fn trees_put_get_has_lookup(new: Backend) {
    let t = new();
    let blob = t.put_blob(b"hello\n").unwrap();
    let sub = Tree::empty();
    let tree = Tree::from_entries(vec![
        (
            name("f"),
            Entry::File {
                digest: blob,
                size: 6,
                executable: false,
            },
        ),
        (
            name("l"),
            Entry::Symlink {
                target: Target::new("f").unwrap(),
            },
        ),
        (
            name("d"),
            Entry::Dir {
                digest: sub.digest(),
            },
        ),
    ])
    .unwrap();
    let names: Vec<&[u8]> = tree.entries().iter().map(|(n, _)| n.as_bytes()).collect();
    assert_eq!(names, [&b"d"[..], b"f", b"l"], "entries are sorted by name");

    let root = tree.digest();
    assert!(!t.has_tree(&root).unwrap());
    assert!(matches!(t.tree(&root), Err(Error::MissingTree(d)) if d == root));
    t.put_trees([sub.clone(), tree.clone()]).unwrap();
    assert!(t.has_tree(&root).unwrap());
    assert!(t.has_tree(&sub.digest()).unwrap());
    assert_eq!(t.tree(&root).unwrap(), tree);
    assert_eq!(t.tree(&sub.digest()).unwrap(), sub);
    let before = t.counts();
    t.put_trees([tree.clone(), sub.clone()]).unwrap();
    assert_eq!(
        t.counts(),
        before,
        "putting stored trees again adds nothing"
    );
    assert_eq!(before.trees, 2);

    assert_eq!(
        t.lookup(&root, &RelPath::root()).unwrap(),
        Some(Entry::Dir { digest: root })
    );
    assert_eq!(
        t.lookup(&root, &path("d")).unwrap(),
        Some(Entry::Dir {
            digest: sub.digest()
        })
    );
    assert!(matches!(
        t.lookup(&root, &path("f")).unwrap(),
        Some(Entry::File { size: 6, .. })
    ));
    assert_eq!(
        t.lookup(&root, &path("f/x")).unwrap(),
        None,
        "a path through a file"
    );
    assert_eq!(
        t.lookup(&root, &path("l/x")).unwrap(),
        None,
        "a path through a symlink"
    );
    assert_eq!(t.lookup(&root, &path("d/x")).unwrap(), None);
    assert_eq!(t.lookup(&root, &path("nope")).unwrap(), None);

    assert!(
        Tree::from_entries(vec![
            (
                name("a"),
                Entry::Dir {
                    digest: sub.digest()
                }
            ),
            (
                name("a"),
                Entry::Dir {
                    digest: sub.digest()
                }
            ),
        ])
        .is_err(),
        "a name given twice is refused"
    );
}

#[test]
fn tree_decode_accepts_exactly_the_canonical_encoding() {
    let d = Digest::of(b"x");
    let empty = enc_tree(&[]);
    assert_eq!(Tree::decode(&empty).unwrap(), Tree::empty());
    assert_eq!(Tree::empty().encode(), empty);

    let valid = enc_tree(&[
        enc_dir(b"d", &d),
        enc_file(b"f", 0, 3, &d),
        enc_symlink(b"l", b"f"),
        enc_file(b"x", 1, u64::MAX, &d),
    ]);
    let tree = Tree::decode(&valid).unwrap();
    assert_eq!(tree.len(), 4);
    assert_eq!(
        tree.encode(),
        valid,
        "decode then encode gives the same bytes"
    );
    assert_eq!(strata_store::TREE_MAGIC, MAGIC);
}

#[test]
fn tree_decode_rejects_bad_encodings() {
    let d = Digest::of(b"x");
    let f = |n: &[u8]| enc_file(n, 0, 1, &d);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("no bytes", vec![]),
        ("magic only, truncated", MAGIC[..5].to_vec()),
        ("no entry count", MAGIC.to_vec()),
        ("short entry count", [MAGIC, &[0u8, 0]].concat()),
        ("another version", {
            let mut v = enc_tree(&[]);
            v[MAGIC.len() - 1] = 2;
            v
        }),
        ("another magic", {
            let mut v = enc_tree(&[]);
            v[0] = b'S';
            v
        }),
        ("count larger than the entries", enc_tree_counted(1, &[])),
        (
            "count smaller than the entries",
            enc_tree_counted(1, &[f(b"a"), f(b"b")]),
        ),
        ("huge count", enc_tree_counted(u32::MAX, &[])),
        ("trailing byte", [enc_tree(&[]), vec![0]].concat()),
        (
            "trailing byte after entries",
            [enc_tree(&[f(b"a")]), vec![0]].concat(),
        ),
        ("unsorted", enc_tree(&[f(b"b"), f(b"a")])),
        (
            "unsorted by bytes, not by UTF-8 or case",
            enc_tree(&[f(b"a"), f(b"B")]),
        ),
        ("duplicate names", enc_tree(&[f(b"a"), f(b"a")])),
        (
            "duplicate names of different kinds",
            enc_tree(&[enc_dir(b"a", &d), f(b"a")]),
        ),
        ("empty name", enc_tree(&[f(b"")])),
        ("name `.`", enc_tree(&[f(b".")])),
        ("name `..`", enc_tree(&[f(b"..")])),
        ("name with `/`", enc_tree(&[f(b"a/b")])),
        ("name with NUL", enc_tree(&[f(b"a\0b")])),
        ("name of 256 bytes", enc_tree(&[f(&[b'x'; 256])])),
        ("kind 0", enc_tree(&[enc_raw(0, b"a", &[0; 41])])),
        ("kind 4", enc_tree(&[enc_raw(4, b"a", &[0; 41])])),
        ("executable flag 2", enc_tree(&[enc_file(b"a", 2, 1, &d)])),
        ("truncated file digest", {
            let mut v = enc_tree(&[f(b"a")]);
            v.pop();
            v
        }),
        ("truncated dir digest", {
            let mut v = enc_tree(&[enc_dir(b"a", &d)]);
            v.truncate(v.len() - 31);
            v
        }),
        (
            "name length past the end",
            enc_tree(&[[&[1u8][..], &u32::MAX.to_le_bytes(), b"abc"].concat()]),
        ),
        ("empty symlink target", enc_tree(&[enc_symlink(b"l", b"")])),
        (
            "symlink target with NUL",
            enc_tree(&[enc_symlink(b"l", b"a\0b")]),
        ),
        (
            "symlink target of 4096 bytes",
            enc_tree(&[enc_symlink(b"l", &[b'x'; 4096])]),
        ),
        ("symlink target length past the end", {
            let mut e = enc_raw(2, b"l", &u32::MAX.to_le_bytes());
            e.extend_from_slice(b"abc");
            enc_tree(&[e])
        }),
    ];
    // Every strict prefix of a valid encoding is refused too.
    let valid = enc_tree(&[enc_dir(b"d", &d), f(b"f"), enc_symlink(b"l", b"target")]);
    assert!(Tree::decode(&valid).is_ok());
    for cut in 0..valid.len() {
        cases.push(("a strict prefix of a valid encoding", valid[..cut].to_vec()));
    }
    let mut accepted = Vec::new();
    for (what, bytes) in &cases {
        match Tree::decode(bytes) {
            Err(Error::CorruptTree { .. }) => {}
            Err(e) => panic!("{what}: refused with the wrong error: {e}"),
            Ok(t) => accepted.push(format!("{what}: decoded as {t:?}")),
        }
    }
    assert!(
        accepted.is_empty(),
        "bad encodings accepted:\n{}",
        accepted.join("\n")
    );
}

#[test]
fn names_and_targets_are_validated() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0", &[b'x'; 256]] {
        assert!(
            Name::new(bad.to_vec()).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    for good in [
        &b"a"[..],
        b"...",
        b".hidden",
        b"\xff\xfe",
        b" ",
        b"a\nb",
        &[b'x'; 255],
    ] {
        assert!(
            Name::new(good.to_vec()).is_ok(),
            "{:?}",
            String::from_utf8_lossy(good)
        );
    }
    for bad in [&b""[..], b"a\0b", &[b'x'; 4096]] {
        assert!(Target::new(bad.to_vec()).is_err());
    }
    for good in [&b"/"[..], b"..", b"../../x", b"\xff", &[b'x'; 4095]] {
        assert!(Target::new(good.to_vec()).is_ok());
    }
    assert!(RelPath::parse(b"a/../b").is_err());
    assert_eq!(RelPath::parse(b"./a//b/").unwrap(), path("a/b"));
}

// ---------------------------------------------------------------------------
// Ingest and checkout
// ---------------------------------------------------------------------------

fn ingest_checkout_round_trip(new: Backend) {
    let t = new();
    let spec = everything();
    let src = t.materialise(&spec);
    assert_same(
        "the materialised fixture",
        &snapshot(&src),
        &spec.snapshot(),
    );

    let report = t.ingest(&src, &IngestOptions::default()).unwrap();
    let layer = report.layer;
    assert_eq!(report.stats, spec.stats());
    assert_eq!(report.hashed_files, spec.stats().files);
    assert_eq!(report.stats.files, 11);
    assert_eq!(report.stats.symlinks, 6);
    assert_eq!(report.stats.dirs, 6);
    assert_eq!(
        layer,
        spec.build(&t),
        "ingest gives the digest of the tree built by hand"
    );

    let record = t.layer(&layer).unwrap().expect("the layer is recorded");
    assert_eq!(record.stats, report.stats);
    assert_eq!(t.lineage(&layer).unwrap().expect("lineage").how, "add");

    let out = t.checkout_new(&layer);
    assert_same(
        &format!("[{}] checkout", t.kind),
        &snapshot(&out),
        &spec.snapshot(),
    );
    let wrong = wrong_mtimes(&out, FIXED_MTIME);
    assert!(
        wrong.is_empty(),
        "[{}] mtimes other than FIXED_MTIME (lstat): {wrong:#?}",
        t.kind
    );

    // Modes are exactly 0644 / 0755: no setuid, no group or world write.
    for (rel, snap) in snapshot(&out) {
        use std::os::unix::ffi::OsStrExt;
        let p = out.join(std::ffi::OsStr::from_bytes(&rel));
        let mode = fs::symlink_metadata(&p).unwrap().mode() & 0o7777;
        match snap {
            Snap::File { exec: true, .. } | Snap::Dir => assert_eq!(mode, 0o755, "{}", p.display()),
            Snap::File { exec: false, .. } => assert_eq!(mode, 0o644, "{}", p.display()),
            Snap::Link(_) => {}
        }
    }

    // The checkout ingests back to the same layer.
    let again = t.ingest(&out, &IngestOptions::default()).unwrap();
    assert_eq!(again.layer, layer);
    assert_eq!(again.new_blobs, 0);

    // An empty directory is a layer too, and checks out into an existing empty dir.
    let empty_src = t.materialise(&Dir::new());
    let empty = t
        .ingest(&empty_src, &IngestOptions::default())
        .unwrap()
        .layer;
    assert_eq!(empty, Tree::empty().digest());
    let dest = t.path("empty-dest");
    fs::create_dir(&dest).unwrap();
    t.checkout(&empty, &dest).unwrap();
    assert!(snapshot(&dest).is_empty());
    assert!(wrong_mtimes(&dest, FIXED_MTIME).is_empty());
}

fn checkout_refuses_a_non_empty_directory(new: Backend) {
    let t = new();
    let layer = t.ingest_spec(&Dir::new().file("a", "a"));
    let dest = t.path("busy");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("precious"), "keep me").unwrap();
    let err = t.checkout(&layer, &dest).unwrap_err();
    assert!(
        err.to_string().contains(&dest.display().to_string()),
        "{err}"
    );
    assert_eq!(fs::read(dest.join("precious")).unwrap(), b"keep me");
    assert!(!dest.join("a").exists());

    let missing = Digest::of(b"no such layer");
    let err = t.checkout(&missing, &t.path("x")).unwrap_err();
    assert!(matches!(err, Error::MissingTree(_)), "{err}");

    let err = t
        .ingest(&t.path("does-not-exist"), &IngestOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let file = t.path("plain-file");
    fs::write(&file, "x").unwrap();
    let err = t.ingest(&file, &IngestOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NotADirectory { .. }), "{err}");
}

fn ingest_twice_same_layer_and_warm_stat_cache(new: Backend) {
    let t = new();
    let spec = Dir::new()
        .file("a", "aaaa")
        .exec("b", "bbbb")
        .dir(
            "sub",
            Dir::new()
                .file("c", "cccc")
                .file("d", pseudo_random(2 << 20, 3)),
        )
        .link("l", "a");
    let src = t.materialise(&spec);
    wait_until_settled(&src);
    let opts = IngestOptions::default();

    let first = t.ingest(&src, &opts).unwrap();
    assert_eq!(first.hashed_files, 4);
    assert_eq!(first.new_blobs, 4);
    let second = t.ingest(&src, &opts).unwrap();
    assert_eq!(second.layer, first.layer, "same tree, same layer");
    assert_eq!(
        second.hashed_files, 0,
        "[{}] an unchanged, settled tree is not re-read",
        t.kind
    );
    assert_eq!(second.new_blobs, 0);
    let uncached = t
        .ingest(
            &src,
            &IngestOptions {
                no_stat_cache: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(uncached.layer, first.layer);
    assert_eq!(
        uncached.hashed_files, 4,
        "`no_stat_cache` hashes every file"
    );

    // Edit one file: exactly that file is read again.
    fs::write(src.join("sub/c"), "c, changed").unwrap();
    let third = t.ingest(&src, &opts).unwrap();
    assert_eq!(
        third.hashed_files, 1,
        "[{}] only the edited file is re-hashed",
        t.kind
    );
    assert_eq!(third.new_blobs, 1);
    let spec2 = spec.clone().dir(
        "sub",
        Dir::new()
            .file("c", "c, changed")
            .file("d", pseudo_random(2 << 20, 3)),
    );
    assert_eq!(third.layer, spec2.build(&t));
    assert_ne!(third.layer, first.layer);
}

fn stat_cache_detects_changes_of_the_same_size(new: Backend) {
    let t = new();
    let spec = Dir::new()
        .file("moved-mtime", "1111")
        .file("kept-mtime", "2222")
        .dir("swap", Dir::new().file("x", "xxxx").file("y", "yyyy"))
        .file("untouched", "3333");
    let src = t.materialise(&spec);
    wait_until_settled(&src);
    let opts = IngestOptions::default();
    t.ingest(&src, &opts).unwrap();
    assert_eq!(
        t.ingest(&src, &opts).unwrap().hashed_files,
        0,
        "the cache is warm"
    );

    // Same size, new content; the mtime moves.
    fs::write(src.join("moved-mtime"), "1112").unwrap();
    // Same size, new content, and the old mtime put back: only ctime tells.
    let p = src.join("kept-mtime");
    let old = filetime::FileTime::from_last_modification_time(&fs::metadata(&p).unwrap());
    fs::write(&p, "2223").unwrap();
    filetime::set_file_mtime(&p, old).unwrap();
    assert_eq!(
        filetime::FileTime::from_last_modification_time(&fs::metadata(&p).unwrap()),
        old
    );
    // Two files of the same size swap places (other inodes under each path).
    fs::rename(src.join("swap/x"), src.join("swap/tmp")).unwrap();
    fs::rename(src.join("swap/y"), src.join("swap/x")).unwrap();
    fs::rename(src.join("swap/tmp"), src.join("swap/y")).unwrap();

    let report = t.ingest(&src, &opts).unwrap();
    let want = Dir::new()
        .file("moved-mtime", "1112")
        .file("kept-mtime", "2223")
        .dir("swap", Dir::new().file("x", "yyyy").file("y", "xxxx"))
        .file("untouched", "3333");
    assert_eq!(
        report.layer,
        want.build(&t),
        "[{}] a stale stat-cache entry was trusted",
        t.kind
    );
    assert_eq!(
        report.hashed_files, 4,
        "every changed file, and only those, is re-hashed"
    );
    let out = t.checkout_new(&report.layer);
    assert_same(
        "checkout after same-size edits",
        &snapshot(&out),
        &want.snapshot(),
    );
}

fn ingest_refuses_fifo_and_socket(new: Backend) {
    let t = new();
    let baseline = t.ingest_spec(&Dir::new().file("seed", "seed"));
    t.set_ref("baseline", &baseline).unwrap();
    for kind in ["FIFO", "socket"] {
        let src = t.materialise(
            &Dir::new()
                .file("ok", "fine")
                .dir("sub", Dir::new().file("also-ok", "x")),
        );
        let special = src.join("sub").join(format!("the-{kind}"));
        let _listener;
        if kind == "FIFO" {
            let c = std::ffi::CString::new(special.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
        } else {
            _listener = std::os::unix::net::UnixListener::bind(&special).expect("bind a socket");
        }
        let before = t.counts();
        let err = t.ingest(&src, &IngestOptions::default()).unwrap_err();
        match &err {
            Error::UnsupportedFileType { path, kind: k } => {
                assert!(
                    path.ends_with(format!("sub/the-{kind}")),
                    "{}",
                    path.display()
                );
                assert_eq!(*k, kind);
            }
            other => panic!("[{}] {kind}: wrong error: {other}", t.kind),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("the-{kind}")),
            "the message names the path: {msg}"
        );
        let after = t.counts();
        assert_eq!(after.layers, before.layers, "{kind}: no layer recorded");
        assert_eq!(after.trees, before.trees, "{kind}: no tree recorded");
        assert_eq!(after.refs, before.refs);
    }
    t.assert_verified();
}

fn ingest_honours_ignore_files_and_excludes(new: Backend) {
    let t = new();
    let spec = Dir::new()
        .file(".gitignore", "*.log\nbuild/\n")
        .file(".ciignore", "secret.txt\n")
        .dir(".git", Dir::new().file("HEAD", "ref: refs/heads/main\n"))
        .file("app.log", "log")
        .dir("build", Dir::new().file("out.bin", "bin"))
        .file("secret.txt", "s")
        .file("keep.txt", "k")
        .file("notes.tmp", "t")
        .dir(
            "src",
            Dir::new()
                .file("main.rs", "fn main() {}\n")
                .file(".gitignore", "gen.rs\n")
                .file("gen.rs", "generated")
                .file("debug.log", "dbg"),
        )
        .dir("docs", Dir::new().file("readme.md", "r"));
    let src = t.materialise(&spec);

    let plain = t.ingest(&src, &IngestOptions::default()).unwrap().layer;
    assert_eq!(plain, spec.build(&t), "by default nothing is left out");

    let ws = t
        .ingest(
            &src,
            &IngestOptions {
                ignore_files: true,
                ..Default::default()
            },
        )
        .unwrap()
        .layer;
    let want_ws = spec
        .clone()
        .without(".git")
        .without("app.log")
        .without("build")
        .without("secret.txt")
        .without("src/gen.rs")
        .without("src/debug.log");
    assert_same(
        "ignore_files",
        &snapshot(&t.checkout_new(&ws)),
        &want_ws.snapshot(),
    );

    let both = t
        .ingest(
            &src,
            &IngestOptions {
                ignore_files: true,
                exclude: vec!["*.tmp".into(), "docs/".into()],
                ..Default::default()
            },
        )
        .unwrap()
        .layer;
    let want_both = want_ws.clone().without("notes.tmp").without("docs");
    assert_same(
        "ignore_files + exclude",
        &snapshot(&t.checkout_new(&both)),
        &want_both.snapshot(),
    );

    let only_exclude = t
        .ingest(
            &src,
            &IngestOptions {
                exclude: vec!["*.log".into(), "/keep.txt".into()],
                ..Default::default()
            },
        )
        .unwrap()
        .layer;
    let want_ex = spec
        .clone()
        .without("app.log")
        .without("src/debug.log")
        .without("keep.txt");
    assert_eq!(
        only_exclude,
        want_ex.build(&t),
        "exclude patterns without ignore files"
    );

    let err = t
        .ingest(
            &src,
            &IngestOptions {
                exclude: vec!["a[".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::BadPattern { .. }), "{err}");
}

// ---------------------------------------------------------------------------
// Refs and resolve
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// The directory cache: each change below must give the tree of what is on
// disk although every record was trusted (settled) before it.
// ---------------------------------------------------------------------------

/// A nested tree, materialised, settled and ingested twice (the second time
/// from the directory cache alone).
fn warm(t: &TestStore, spec: &Dir, opts: &IngestOptions) -> std::path::PathBuf {
    let src = t.materialise(spec);
    wait_until_settled(&src);
    let first = t.ingest(&src, opts).unwrap();
    let again = t.ingest(&src, opts).unwrap();
    assert_eq!(again.layer, first.layer);
    assert_eq!(
        again.hashed_files, 0,
        "[{}] a settled tree comes from the directory cache",
        t.kind
    );
    src
}

/// Ingests `src` and checks it gives `want`'s tree and stats; returns the
/// files hashed.
fn ingest_gives(
    t: &TestStore,
    src: &std::path::Path,
    opts: &IngestOptions,
    want: &Dir,
    what: &str,
) -> u64 {
    let r = t.ingest(src, opts).unwrap();
    assert_same(
        &format!("[{}] {what}", t.kind),
        &snapshot(&t.checkout_new(&r.layer)),
        &want.snapshot(),
    );
    assert_eq!(r.layer, want.build(t), "[{}] {what}: the layer", t.kind);
    assert_eq!(r.stats, want.stats(), "[{}] {what}: the stats", t.kind);
    // And once more: what the changed ingest recorded is right too.
    let again = t.ingest(src, opts).unwrap();
    assert_eq!(again.layer, r.layer, "[{}] {what}: ingested again", t.kind);
    assert_eq!(again.stats, r.stats);
    r.hashed_files
}

fn nested() -> Dir {
    Dir::new().file("top", "t").dir(
        "a",
        Dir::new().file("x", "x").dir(
            "b",
            Dir::new()
                .file("deep", "deep")
                .exec("run", "#!/bin/sh\n")
                .link("to-deep", "deep")
                .dir("c", Dir::new().file("leaf", "leaf")),
        ),
    )
}

fn dircache_file_edited_below_an_unchanged_directory(new: Backend) {
    let t = new();
    let opts = IngestOptions::default();
    let src = warm(&t, &nested(), &opts);
    // Written in place: no directory's mtime moves, only the file's.
    let dirs = ["", "a", "a/b", "a/b/c"].map(|d| src.join(d));
    let before: Vec<_> = dirs
        .iter()
        .map(|d| fs::metadata(d).unwrap().mtime_nsec())
        .collect();
    fs::write(src.join("a/b/c/leaf"), "leaf, longer now").unwrap();
    let after: Vec<_> = dirs
        .iter()
        .map(|d| fs::metadata(d).unwrap().mtime_nsec())
        .collect();
    assert_eq!(before, after, "an edit in place leaves directories alone");
    let want = nested().dir(
        "a",
        Dir::new().file("x", "x").dir(
            "b",
            Dir::new()
                .file("deep", "deep")
                .exec("run", "#!/bin/sh\n")
                .link("to-deep", "deep")
                .dir("c", Dir::new().file("leaf", "leaf, longer now")),
        ),
    );
    let hashed = ingest_gives(&t, &src, &opts, &want, "a file edited three levels down");
    assert_eq!(hashed, 1, "only the edited file is read");
}

fn dircache_entry_added(new: Backend) {
    let t = new();
    let opts = IngestOptions::default();
    let src = warm(&t, &nested(), &opts);
    fs::write(src.join("a/b/new"), "new").unwrap();
    fs::create_dir(src.join("a/b/c/empty")).unwrap();
    let mut want = nested();
    if let Some(Node::Dir(a)) = want.0.get_mut(&b"a"[..]) {
        if let Some(Node::Dir(b)) = a.0.get_mut(&b"b"[..]) {
            *b = b.clone().file("new", "new");
            if let Some(Node::Dir(c)) = b.0.get_mut(&b"c"[..]) {
                *c = c.clone().dir("empty", Dir::new());
            }
        }
    }
    let hashed = ingest_gives(&t, &src, &opts, &want, "a file and a directory added");
    assert_eq!(hashed, 1, "only the new file is read");
}

fn dircache_entry_removed(new: Backend) {
    let t = new();
    let opts = IngestOptions::default();
    let src = warm(&t, &nested(), &opts);
    fs::remove_file(src.join("a/b/deep")).unwrap();
    fs::remove_dir_all(src.join("a/b/c")).unwrap();
    let want = nested().without("a/b/deep").without("a/b/c");
    let hashed = ingest_gives(&t, &src, &opts, &want, "a file and a directory removed");
    assert_eq!(hashed, 0, "nothing left needs reading");
}

fn dircache_dir_replaced_by_file_and_back(new: Backend) {
    let t = new();
    let opts = IngestOptions::default();
    let src = warm(&t, &nested(), &opts);
    fs::remove_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b"), "a file now").unwrap();
    let want = nested()
        .without("a/b")
        .dir("a", Dir::new().file("x", "x").file("b", "a file now"));
    ingest_gives(&t, &src, &opts, &want, "a directory replaced by a file");
    // And a directory again under the same path, with other content.
    fs::remove_file(src.join("a/b")).unwrap();
    fs::create_dir(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/other"), "other").unwrap();
    let want = want.dir(
        "a",
        Dir::new()
            .file("x", "x")
            .dir("b", Dir::new().file("other", "other")),
    );
    ingest_gives(&t, &src, &opts, &want, "a file replaced by a directory");
}

fn dircache_ignore_file_edited_in_place(new: Backend) {
    let t = new();
    let opts = IngestOptions {
        ignore_files: true,
        ..Default::default()
    };
    let spec = Dir::new().file(".gitignore", "*.log\n").dir(
        "sub",
        Dir::new()
            .file(".gitignore", "*.tmp\n")
            .file("a.log", "log")
            .file("b.tmp", "tmp")
            .file("c.txt", "txt")
            .dir("d", Dir::new().file("e.log", "e").file("f.tmp", "f")),
    );
    let src = warm(&t, &spec, &opts);
    // The same size, the old mtime put back: only the content tells.
    let p = src.join("sub/.gitignore");
    let old = filetime::FileTime::from_last_modification_time(&fs::metadata(&p).unwrap());
    fs::write(&p, "*.txt\n").unwrap();
    filetime::set_file_mtime(&p, old).unwrap();
    let want = spec.clone().dir(
        "sub",
        Dir::new()
            .file(".gitignore", "*.txt\n")
            .file("b.tmp", "tmp")
            .dir("d", Dir::new().file("f.tmp", "f")),
    );
    ingest_gives(&t, &src, &opts, &want, "a .gitignore edited in place");
    // The root's rules apply below too: un-ignoring `*.log` there brings
    // back files two levels down.
    fs::write(src.join(".gitignore"), "\n").unwrap();
    let want = want.file(".gitignore", "\n").dir(
        "sub",
        Dir::new()
            .file(".gitignore", "*.txt\n")
            .file("a.log", "log")
            .file("b.tmp", "tmp")
            .dir("d", Dir::new().file("e.log", "e").file("f.tmp", "f")),
    );
    ingest_gives(&t, &src, &opts, &want, "the root's .gitignore edited");
    // A new ignore file where there was none.
    fs::write(src.join("sub/d/.ignore"), "f.tmp\n").unwrap();
    let want = want.dir(
        "sub",
        Dir::new()
            .file(".gitignore", "*.txt\n")
            .file("a.log", "log")
            .file("b.tmp", "tmp")
            .dir(
                "d",
                Dir::new().file(".ignore", "f.tmp\n").file("e.log", "e"),
            ),
    );
    ingest_gives(&t, &src, &opts, &want, "a new .ignore");
}

fn dircache_symlink_mode_and_excludes(new: Backend) {
    let t = new();
    let opts = IngestOptions::default();
    let src = warm(&t, &nested(), &opts);
    fs::remove_file(src.join("a/b/to-deep")).unwrap();
    std::os::unix::fs::symlink("c/leaf", src.join("a/b/to-deep")).unwrap();
    fs::set_permissions(src.join("a/x"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("a/b/run"), fs::Permissions::from_mode(0o644)).unwrap();
    let want = nested().dir(
        "a",
        Dir::new().exec("x", "x").dir(
            "b",
            Dir::new()
                .file("deep", "deep")
                .file("run", "#!/bin/sh\n")
                .link("to-deep", "c/leaf")
                .dir("c", Dir::new().file("leaf", "leaf")),
        ),
    );
    ingest_gives(
        &t,
        &src,
        &opts,
        &want,
        "a symlink retargeted, exec bits flipped",
    );
    // Settled again, so that the records below are trusted.
    wait_until_settled(&src);
    t.ingest(&src, &opts).unwrap();
    assert_eq!(t.ingest(&src, &opts).unwrap().hashed_files, 0);
    // The same directories under other options: other rules, other records.
    let ex = IngestOptions {
        exclude: vec!["a/b/c/".into()],
        ..Default::default()
    };
    ingest_gives(
        &t,
        &src,
        &ex,
        &want.clone().without("a/b/c"),
        "an exclude added",
    );
    ingest_gives(&t, &src, &opts, &want, "the exclude gone again");
}

fn refs_set_get_delete_list(new: Backend) {
    let t = new();
    let a = t.ingest_spec(&Dir::new().file("a", "1"));
    let b = t.ingest_spec(&Dir::new().file("b", "2"));
    t.set_ref("main", &a).unwrap();
    t.set_ref("release/v1.0", &b).unwrap();
    t.set_ref("feature_x-2", &a).unwrap();
    assert_eq!(t.get_ref("main").unwrap(), Some(a));
    assert_eq!(t.get_ref("nope").unwrap(), None);
    assert_eq!(
        t.refs().unwrap(),
        vec![
            ("feature_x-2".to_owned(), a),
            ("main".to_owned(), a),
            ("release/v1.0".to_owned(), b)
        ]
    );
    t.set_ref("main", &b).unwrap();
    assert_eq!(t.get_ref("main").unwrap(), Some(b), "set_ref moves a ref");
    assert_eq!(t.delete_ref("main").unwrap(), b);
    assert_eq!(t.get_ref("main").unwrap(), None);
    assert!(matches!(t.delete_ref("main"), Err(Error::NoSuchRef(n)) if n == "main"));

    let long = "x".repeat(201);
    let bad = [
        "",
        "-x",
        "/x",
        "x/",
        "a..b",
        "a//b",
        "deadbeef",
        "DEADBEEF00",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "has space",
        "tab\t",
        "new\nline",
        "ünïcode",
        "a~b",
        "a:b",
        "a*b",
        "HEAD^",
        long.as_str(),
    ];
    let before = t.counts();
    for name in bad {
        match t.set_ref(name, &a) {
            Err(Error::BadRefName { .. }) => {}
            other => panic!("ref name {name:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(t.counts(), before, "refused ref names record nothing");
    let long_ok = "x".repeat(200);
    for good in [
        "a",
        "abc",
        "v1.2.3",
        "team/app/prod",
        "_x",
        long_ok.as_str(),
    ] {
        t.set_ref(good, &a)
            .unwrap_or_else(|e| panic!("{good:?}: {e}"));
        assert_eq!(t.get_ref(good).unwrap(), Some(a));
    }

    let nowhere = Digest::of(b"no such tree");
    assert!(matches!(
        t.set_ref("dangling", &nowhere),
        Err(Error::MissingTree(_))
    ));
    assert_eq!(t.get_ref("dangling").unwrap(), None);

    // Ingest with a ref: the ref and the layer in one write; a bad name records nothing.
    let src = t.materialise(&Dir::new().file("c", "3"));
    let before = t.counts();
    let err = t
        .ingest(
            &src,
            &IngestOptions {
                ref_name: Some("bad name".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::BadRefName { .. }), "{err}");
    assert_eq!(t.counts(), before);
    let c = t
        .ingest(
            &src,
            &IngestOptions {
                ref_name: Some("via-ingest".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .layer;
    assert_eq!(t.get_ref("via-ingest").unwrap(), Some(c));
}

fn resolve_ref_digest_and_prefix(new: Backend) {
    let t = new();
    let a = t.ingest_spec(
        &Dir::new()
            .file("a", "1")
            .dir("sub", Dir::new().file("s", "s")),
    );
    t.set_ref("main", &a).unwrap();
    let hex = a.to_hex();
    assert_eq!(t.resolve("main").unwrap(), a);
    assert_eq!(t.resolve(&hex).unwrap(), a);
    assert_eq!(
        t.resolve(&hex.to_uppercase()).unwrap(),
        a,
        "hex in either case"
    );
    assert_eq!(t.resolve(&hex[..8]).unwrap(), a, "an 8-character prefix");
    assert_eq!(t.resolve(&hex[..9]).unwrap(), a, "an odd-length prefix");
    assert_eq!(t.resolve(&hex[..8].to_uppercase()).unwrap(), a);

    // A stored subtree resolves by prefix too (it is a tree, if not a recorded layer).
    let sub = t
        .lookup(&a, &path("sub"))
        .unwrap()
        .unwrap()
        .dir_digest()
        .unwrap();
    assert_eq!(t.resolve(&sub.to_hex()[..10]).unwrap(), sub);

    let mut unknown = String::from("00000000");
    for first in "0123456789abcdef".chars() {
        let cand: String = std::iter::repeat_n(first, 8).collect();
        if !hex.starts_with(&cand) && !sub.to_hex().starts_with(&cand) {
            unknown = cand;
            break;
        }
    }
    for spec in [unknown.as_str(), "not-a-ref", "zzzzzzzz"] {
        match t.resolve(spec) {
            Err(Error::UnknownLayer { input }) => assert_eq!(input, spec),
            other => panic!("resolve({spec:?}) = {other:?}"),
        }
    }
    // A hex prefix that is too short says how long it must be.
    match t.resolve("abc") {
        Err(e @ Error::BadDigest { .. }) => assert!(e.to_string().contains("8 to 64"), "{e}"),
        other => panic!("resolve(\"abc\") = {other:?}"),
    }
    let full_unknown = Digest::of(b"never stored").to_hex();
    assert!(matches!(
        t.resolve(&full_unknown),
        Err(Error::UnknownLayer { .. })
    ));

    // Two recorded layers sharing 8 hex characters: ambiguous. (Fake records,
    // written straight into the index: finding a real collision takes 2^32 tries.)
    let mut k1 = [0u8; 32];
    k1[..4].copy_from_slice(&[0xab, 0xcd, 0xef, 0x01]);
    let mut k2 = k1;
    k2[4] = 0x10;
    let mut batch = strata_store::Batch::new();
    for k in [k1, k2] {
        batch.put(
            Family::Layers,
            k.to_vec(),
            br#"{"stats":{"files":0,"dirs":0,"symlinks":0,"bytes":0},"created":0}"#.to_vec(),
        );
    }
    t.meta().write(batch).unwrap();
    match t.resolve("abcdef01") {
        Err(Error::AmbiguousPrefix { candidates, .. }) => {
            assert_eq!(
                candidates.into_iter().collect::<BTreeSet<_>>(),
                BTreeSet::from([Digest::from_bytes(k1), Digest::from_bytes(k2)])
            );
        }
        other => panic!("ambiguous prefix: {other:?}"),
    }
    let err = t.resolve("abcdef01").unwrap_err().to_string();
    assert!(
        err.contains("abcdef0100"),
        "the message lists the candidates: {err}"
    );
    assert_eq!(t.resolve("abcdef010").unwrap(), Digest::from_bytes(k1));
    assert_eq!(t.resolve("abcdef011").unwrap(), Digest::from_bytes(k2));
}

// ---------------------------------------------------------------------------
// Diff, apply, merge
// ---------------------------------------------------------------------------

fn diff_base() -> Dir {
    Dir::new()
        .file("a.txt", "alpha")
        .file("b.txt", "bravo")
        .file("c", "charlie")
        .link("d", "a.txt")
        .dir("sub", Dir::new().file("x", "x").file("y", "y"))
        .dir(
            "untouched",
            Dir::new().dir("deep", Dir::new().file("z", "z")),
        )
        .dir("gone", Dir::new().file("1", "1").file("2", "2"))
}

fn diff_target() -> Dir {
    diff_base()
        .file("a.txt", "alpha, modified")
        .without("b.txt")
        .dir("c", Dir::new().file("inner", "i"))
        .link("d", "b.txt")
        .file("new.txt", "new")
        .dir("newdir", Dir::new().file("f", "f").dir("g", Dir::new()))
        .dir("sub", Dir::new().exec("x", "x").file("y", "y"))
        .without("gone")
}

fn diff_kinds(new: Backend) {
    let t = new();
    let base = diff_base().build(&t);
    let target = diff_target().build(&t);
    let changes = t.diff(&base, &target).unwrap();
    let got: Vec<(String, ChangeKind)> = changes
        .iter()
        .map(|c| (c.path.to_string(), c.kind))
        .collect();
    use ChangeKind::*;
    let want: Vec<(String, ChangeKind)> = [
        ("a.txt", Modified),
        ("b.txt", Removed),
        ("c", TypeChanged),
        ("d", Modified),
        ("gone", Removed),
        ("new.txt", Added),
        ("newdir", Added),
        ("sub/x", Modified),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_owned(), k))
    .collect();
    assert_eq!(
        got, want,
        "one change per path, sorted by path; `untouched` is not listed"
    );
    let letters: String = changes.iter().map(|c| c.letter()).collect();
    assert_eq!(letters, "MDTMDAAM");
    for c in &changes {
        assert_eq!(
            c.old,
            t.lookup(&base, &c.path).unwrap(),
            "old side of {}",
            c.path
        );
        assert_eq!(
            c.new,
            t.lookup(&target, &c.path).unwrap(),
            "new side of {}",
            c.path
        );
    }
    assert!(t.diff(&base, &base).unwrap().is_empty());
    let back: Vec<(String, ChangeKind)> = t
        .diff(&target, &base)
        .unwrap()
        .iter()
        .map(|c| (c.path.to_string(), c.kind))
        .collect();
    let want_back: Vec<(String, ChangeKind)> = want
        .iter()
        .map(|(p, k)| {
            let k = match k {
                Added => Removed,
                Removed => Added,
                k => *k,
            };
            (p.clone(), k)
        })
        .collect();
    assert_eq!(back, want_back, "the reverse diff swaps added and removed");
}

fn diff_skips_equal_subtrees_without_reading_them(new: Backend) {
    let t = new();
    let base = diff_base().build(&t);
    let target = diff_target().build(&t);
    // Remove the shared subtree from the index: a diff that never reads
    // equal subtrees does not notice.
    let untouched = t
        .lookup(&base, &path("untouched"))
        .unwrap()
        .unwrap()
        .dir_digest()
        .unwrap();
    let deep = t
        .lookup(&base, &path("untouched/deep"))
        .unwrap()
        .unwrap()
        .dir_digest()
        .unwrap();
    let mut batch = strata_store::Batch::new();
    batch.delete(Family::Trees, untouched.as_bytes().to_vec());
    batch.delete(Family::Trees, deep.as_bytes().to_vec());
    t.meta().write(batch).unwrap();
    assert_eq!(t.diff(&base, &target).unwrap().len(), 8);
}

fn apply_diff_gives_target(new: Backend) {
    let t = new();
    let base = diff_base().build(&t);
    let target = diff_target().build(&t);
    let forward = t.diff(&base, &target).unwrap();
    assert_eq!(t.apply(&base, &forward).unwrap(), target);
    let backward = t.diff(&target, &base).unwrap();
    assert_eq!(t.apply(&target, &backward).unwrap(), base);
    assert_eq!(t.apply(&base, &[]).unwrap(), base);
    // The trees apply created are stored: the result checks out.
    let applied = t.apply(&base, &forward).unwrap();
    let out = t.checkout_new(&applied);
    assert_same("apply", &snapshot(&out), &diff_target().snapshot());
}

fn edit_creates_missing_parents(new: Backend) {
    let t = new();
    let empty = Dir::new().build(&t);
    let blob = t.put_blob(b"deep").unwrap();
    let file = Entry::File {
        digest: blob,
        size: 4,
        executable: true,
    };
    let edited = t
        .edit(
            &empty,
            &[
                (path("a/b/c"), Some(file.clone())),
                (
                    path("a/l"),
                    Some(Entry::Symlink {
                        target: Target::new("b/c").unwrap(),
                    }),
                ),
                (path("gone"), None),
            ],
        )
        .unwrap();
    let want = Dir::new().dir(
        "a",
        Dir::new()
            .dir("b", Dir::new().exec("c", "deep"))
            .link("l", "b/c"),
    );
    assert_eq!(edited, want.build(&t));
    // Removing the last entry of a directory keeps the (now empty) directory.
    let removed = t.edit(&edited, &[(path("a/b/c"), None)]).unwrap();
    let want = Dir::new().dir("a", Dir::new().dir("b", Dir::new()).link("l", "b/c"));
    assert_eq!(removed, want.build(&t));
    assert!(
        t.edit(&edited, &[(RelPath::root(), None)]).is_err(),
        "the root cannot be edited away"
    );
}

fn merge_base() -> Dir {
    Dir::new()
        .file("a", "1")
        .file("b", "1")
        .dir("sub", Dir::new().file("c", "1").file("d", "1"))
        .file("e", "1")
}

fn merge_disjoint_changes(new: Backend) {
    let t = new();
    let base = merge_base().build(&t);
    let ours = merge_base()
        .file("a", "ours")
        .dir("sub", Dir::new().file("c", "ours").file("d", "1"))
        .build(&t);
    let theirs = merge_base()
        .file("b", "theirs")
        .dir("sub", Dir::new().file("c", "1").file("new", "n"))
        .file("t", "added by theirs")
        .build(&t);
    let want = merge_base()
        .file("a", "ours")
        .file("b", "theirs")
        .dir("sub", Dir::new().file("c", "ours").file("new", "n"))
        .file("t", "added by theirs");
    for policy in [MergePolicy::Fail, MergePolicy::Ours, MergePolicy::Theirs] {
        let out = t.merge(&base, &ours, &theirs, policy).unwrap();
        assert!(out.conflicts.is_empty(), "{policy:?}: {:?}", out.conflicts);
        let merged = out.merged.expect("merged");
        assert_eq!(merged, want.build(&t), "{policy:?}");
        // The merged trees are stored.
        assert_same(
            "merge",
            &snapshot(&t.checkout_new(&merged)),
            &want.snapshot(),
        );
    }
    let swapped = t.merge(&base, &theirs, &ours, MergePolicy::Fail).unwrap();
    assert_eq!(swapped.merged, Some(want.build(&t)), "merge is symmetric");
    assert_eq!(
        t.merge(&base, &base, &base, MergePolicy::Fail)
            .unwrap()
            .merged,
        Some(base)
    );
    assert_eq!(
        t.merge(&base, &ours, &base, MergePolicy::Fail)
            .unwrap()
            .merged,
        Some(ours)
    );
    assert_eq!(
        t.merge(&base, &base, &theirs, MergePolicy::Fail)
            .unwrap()
            .merged,
        Some(theirs)
    );
}

fn merge_conflicts_and_policies(new: Backend) {
    let t = new();
    let base = merge_base().build(&t);
    let ours = merge_base()
        .file("a", "ours")
        .without("b")
        .file("c-new", "same on both sides")
        .dir("sub", Dir::new().file("c", "o").file("d", "1"))
        .build(&t);
    let theirs = merge_base()
        .file("a", "theirs")
        .file("b", "changed by theirs")
        .file("c-new", "same on both sides")
        .dir("sub", Dir::new().file("c", "t").file("d", "1"))
        .file("e", "theirs only")
        .build(&t);
    let before = t.counts();
    let out = t.merge(&base, &ours, &theirs, MergePolicy::Fail).unwrap();
    assert_eq!(out.merged, None);
    let conflicts: Vec<String> = out.conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(
        conflicts,
        ["a", "b", "sub/c"],
        "every conflicting path, and only those"
    );
    assert_eq!(t.counts(), before, "a failed merge stores nothing");

    let ours_wins = t.merge(&base, &ours, &theirs, MergePolicy::Ours).unwrap();
    assert_eq!(ours_wins.conflicts, out.conflicts);
    let want_ours = merge_base()
        .file("a", "ours")
        .without("b")
        .file("c-new", "same on both sides")
        .dir("sub", Dir::new().file("c", "o").file("d", "1"))
        .file("e", "theirs only");
    assert_eq!(ours_wins.merged, Some(want_ours.build(&t)));

    let theirs_wins = t.merge(&base, &ours, &theirs, MergePolicy::Theirs).unwrap();
    assert_eq!(theirs_wins.conflicts, out.conflicts);
    let want_theirs = merge_base()
        .file("a", "theirs")
        .file("b", "changed by theirs")
        .file("c-new", "same on both sides")
        .dir("sub", Dir::new().file("c", "t").file("d", "1"))
        .file("e", "theirs only");
    assert_eq!(theirs_wins.merged, Some(want_theirs.build(&t)));

    // A file on one side and a directory on the other is a conflict at that path.
    let o = merge_base().dir("x", Dir::new().file("f", "f")).build(&t);
    let th = merge_base().file("x", "a file").build(&t);
    let out = t.merge(&base, &o, &th, MergePolicy::Fail).unwrap();
    assert_eq!(out.conflicts, vec![path("x")]);
}

// ---------------------------------------------------------------------------
// Export and import
// ---------------------------------------------------------------------------

fn export_import_round_trip(new: Backend) {
    let t = new();
    let spec = everything();
    let layer = t.ingest_spec(&spec);
    let mut a = Vec::new();
    let report = t.export(&layer, &mut a).unwrap();
    assert_eq!(report.bytes, spec.stats().bytes);
    let mut b = Vec::new();
    t.export(&layer, &mut b).unwrap();
    assert!(a == b, "two exports of one layer are byte-identical");

    let fresh = new();
    // The fixture holds absolute and escaping symlinks (`absolute`,
    // `up-and-back`): refused by default, whole, with nothing recorded.
    let before = fresh.counts();
    match fresh.import(&mut &a[..], "everything.tar.zst", &ImportOptions::default()) {
        Err(Error::BadArchive { entry, .. }) => {
            assert!(entry == "absolute" || entry == "up-and-back", "{entry}")
        }
        other => panic!(
            "[{}] escaping symlinks accepted by default: {other:?}",
            t.kind
        ),
    }
    assert_eq!(fresh.counts(), before);
    assert!(fresh.staging_leftovers().is_empty());
    let imported = fresh
        .import(
            &mut &a[..],
            "everything.tar.zst",
            &ImportOptions {
                ref_name: Some("imported".into()),
                allow_escaping_symlinks: true,
            },
        )
        .unwrap_or_else(|e| panic!("[{}] import: {}", t.kind, chain(&e)));
    assert_eq!(imported.layer, layer, "the same layer in a fresh store");
    assert_eq!(imported.stats, spec.stats());
    assert_eq!(fresh.get_ref("imported").unwrap(), Some(layer));
    assert_eq!(fresh.lineage(&layer).unwrap().unwrap().how, "import");
    assert_same(
        "checkout of the imported layer",
        &snapshot(&fresh.checkout_new(&layer)),
        &spec.snapshot(),
    );
    let mut c = Vec::new();
    fresh.export(&layer, &mut c).unwrap();
    assert!(a == c, "the fresh store exports the same bytes");
    fresh.assert_verified();

    let allow = ImportOptions {
        allow_escaping_symlinks: true,
        ..Default::default()
    };
    let again = fresh.import(&mut &a[..], "again", &allow).unwrap();
    assert_eq!(again.layer, layer);
    assert_eq!(again.new_blobs, 0, "importing twice stores nothing new");

    // The archive is a plain tar inside zstd, readable by any tar reader.
    let tar_bytes = zstd::decode_all(&a[..]).unwrap();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut paths = Vec::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().mtime().unwrap(), FIXED_MTIME as u64);
        assert_eq!(e.header().uid().unwrap(), 0);
        assert_eq!(e.header().gid().unwrap(), 0);
        let mut p = e.path_bytes().into_owned();
        if p.last() == Some(&b'/') {
            p.pop();
        }
        paths.push(p);
    }
    let want: Vec<Vec<u8>> = spec.snapshot().into_keys().collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(sorted, want, "one entry per path");
}

// ---------------------------------------------------------------------------
// GC and verify
// ---------------------------------------------------------------------------

fn run_entry(layer: Digest, blobs: Vec<Digest>) -> RunEntry {
    RunEntry {
        layers: vec![layer],
        blobs,
        record: Payload::new(&serde_json::json!({"state": "done"})).unwrap(),
        created: 0,
    }
}

struct GcWorld {
    unref: Digest,
    unref_blob: Digest,
    unref_subtree: Digest,
    shared_blob: Digest,
    reffed: Digest,
    parent: Digest,
    child: Digest,
    leased: Digest,
    runs: [Digest; 3],
    run1_log: Digest,
    run3_log: Digest,
    action_gone: Digest,
    action_kept: Digest,
    log_gone: Digest,
    log_kept: Digest,
}

fn gc_world(t: &TestStore) -> GcWorld {
    let unref_spec = Dir::new()
        .file("shared", "shared by two layers")
        .file("unique", "only in the unreferenced layer")
        .dir(
            "only-here",
            Dir::new().file("deep", "deep and unreferenced"),
        );
    let unref = t.ingest_spec(&unref_spec);
    let reffed = t.ingest_spec(
        &Dir::new()
            .file("shared", "shared by two layers")
            .file("r", "reffed"),
    );
    t.set_ref("keep", &reffed).unwrap();
    let parent = t.ingest_spec(&Dir::new().file("p", "parent only"));
    let child = t.ingest_spec(&Dir::new().file("p", "parent only").file("c", "child only"));
    t.record_layer(
        &child,
        Some(&Lineage {
            parent: Some(parent),
            task: Some("//app:build".into()),
            how: "task".into(),
            created: 0,
        }),
    )
    .unwrap();
    t.set_ref("keep/child", &child).unwrap();
    let leased = t.ingest_spec(&Dir::new().file("l", "leased only"));
    let mut runs = [Digest::of(b""); 3];
    for (i, r) in runs.iter_mut().enumerate() {
        *r = Dir::new()
            .file("run", format!("output of run {i}"))
            .build(t);
        t.record_layer(r, None).unwrap();
    }
    let run1_log = t.put_blob(b"log of run 1").unwrap();
    let run3_log = t.put_blob(b"log of run 3").unwrap();
    t.put_run("run-0001", &run_entry(runs[0], vec![run1_log]))
        .unwrap();
    t.put_run("run-0002", &run_entry(runs[1], vec![])).unwrap();
    t.put_run("run-0003", &run_entry(runs[2], vec![run3_log]))
        .unwrap();

    let log_gone = t.put_blob(b"log of an action on a dropped layer").unwrap();
    let log_kept = t.put_blob(b"log of an action on a kept layer").unwrap();
    let action_gone = Digest::of(b"action on unref");
    let action_kept = Digest::of(b"action on reffed");
    t.put_action(
        &action_gone,
        &ActionEntry {
            layers: vec![unref],
            blobs: vec![log_gone],
            payload: Payload::new(&serde_json::json!({"exit": 0})).unwrap(),
            created: 0,
        },
    )
    .unwrap();
    t.put_action(
        &action_kept,
        &ActionEntry {
            layers: vec![reffed],
            blobs: vec![log_kept],
            payload: Payload::new(&serde_json::json!({"exit": 0})).unwrap(),
            created: 0,
        },
    )
    .unwrap();
    GcWorld {
        unref,
        unref_blob: Digest::of(b"only in the unreferenced layer"),
        unref_subtree: t
            .lookup(&unref, &path("only-here"))
            .unwrap()
            .unwrap()
            .dir_digest()
            .unwrap(),
        shared_blob: Digest::of(b"shared by two layers"),
        reffed,
        parent,
        child,
        leased,
        runs,
        run1_log,
        run3_log,
        action_gone,
        action_kept,
        log_gone,
        log_kept,
    }
}

fn gc_keeps_roots_and_drops_the_rest(new: Backend) {
    let t = new();
    let w = gc_world(&t);
    let lease = t.lease(&[w.leased]).unwrap();
    t.assert_verified();

    let report = t
        .gc(&GcOptions {
            keep_runs: 2,
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        report.layers_freed, 2,
        "the unreferenced layer and the oldest run's: {report:?}"
    );
    assert_eq!(report.runs_dropped, 1, "{report:?}");
    assert_eq!(report.actions_dropped, 1, "{report:?}");

    // Dropped.
    assert!(!t.has_tree(&w.unref).unwrap(), "unreferenced layer");
    assert!(t.layer(&w.unref).unwrap().is_none(), "its layer record");
    assert!(t.lineage(&w.unref).unwrap().is_none(), "its lineage record");
    assert!(!t.has_tree(&w.unref_subtree).unwrap(), "its unique subtree");
    assert!(
        !t.blobs().contains(&w.unref_blob).unwrap(),
        "its unique blob"
    );
    assert!(!t
        .blobs()
        .contains(&Digest::of(b"deep and unreferenced"))
        .unwrap());
    assert!(!t.has_tree(&w.runs[0]).unwrap(), "the oldest run's layer");
    assert!(
        !t.blobs().contains(&w.run1_log).unwrap(),
        "the oldest run's log"
    );
    assert_eq!(t.run_ids().unwrap(), ["run-0002", "run-0003"]);
    assert!(
        t.action(&w.action_gone).unwrap().is_none(),
        "an action whose layer is gone"
    );
    assert!(t
        .meta()
        .get(Family::Actions, w.action_gone.as_bytes())
        .unwrap()
        .is_none());
    assert!(!t.blobs().contains(&w.log_gone).unwrap(), "its log");

    // Kept.
    assert!(
        t.blobs().contains(&w.shared_blob).unwrap(),
        "a blob also in a kept layer"
    );
    for (what, l) in [
        ("ref'd layer", w.reffed),
        ("lineage parent of a ref'd layer", w.parent),
        ("ref'd child", w.child),
        ("leased layer", w.leased),
        ("second run", w.runs[1]),
        ("third run", w.runs[2]),
    ] {
        assert!(t.has_tree(&l).unwrap(), "{what}");
        assert!(t.layer(&l).unwrap().is_some(), "{what}: record");
        t.checkout_new(&l); // every blob still there
    }
    assert_eq!(t.lineage(&w.child).unwrap().unwrap().parent, Some(w.parent));
    assert!(t.blobs().contains(&w.run3_log).unwrap());
    assert!(t.action(&w.action_kept).unwrap().is_some());
    assert!(t.blobs().contains(&w.log_kept).unwrap());
    t.assert_verified();

    // Once the lease is dropped, its layer goes.
    drop(lease);
    let report = t
        .gc(&GcOptions {
            keep_runs: 2,
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.layers_freed, 1, "{report:?}");
    assert!(!t.has_tree(&w.leased).unwrap());
    assert!(!t.blobs().contains(&Digest::of(b"leased only")).unwrap());
    t.assert_verified();

    // Nothing left to collect.
    let report = t
        .gc(&GcOptions {
            keep_runs: 2,
            dry_run: false,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (report.layers_freed, report.trees_freed, report.blobs_freed),
        (0, 0, 0),
        "{report:?}"
    );
}

fn gc_dry_run_deletes_nothing(new: Backend) {
    let t = new();
    let w = gc_world(&t);
    let before = t.counts();
    let report = t
        .gc(&GcOptions {
            keep_runs: 2,
            dry_run: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        report.layers_freed, 3,
        "unref, oldest run, unleased: {report:?}"
    );
    assert!(report.blobs_freed > 0);
    assert_eq!(t.counts(), before, "a dry run deletes nothing");
    assert!(t.has_tree(&w.unref).unwrap());
    assert!(t.action(&w.action_gone).unwrap().is_some());
}

fn verify_clean_then_missing_blob_and_tree(new: Backend) {
    let t = new();
    let layer = t.ingest_spec(
        &Dir::new()
            .file("a", "a")
            .file("b", "b")
            .dir("sub", Dir::new().dir("deeper", Dir::new().file("c", "c"))),
    );
    let report = t.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.blobs_checked, 3);
    assert_eq!(report.trees_checked, 3);

    let b = Digest::of(b"b");
    match t.root() {
        Some(root) => {
            let hex = b.to_hex();
            fs::remove_file(root.join("blobs").join(&hex[..2]).join(&hex[2..])).unwrap();
        }
        None => {
            t.blobs().delete(&b).unwrap();
        }
    }
    let report = t.verify().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what == "missing blob" && p.detail.contains(&b.to_hex())),
        "[{}] {:?}",
        t.kind,
        report.problems
    );

    let deeper = t
        .lookup(&layer, &path("sub/deeper"))
        .unwrap()
        .unwrap()
        .dir_digest()
        .unwrap();
    let mut batch = strata_store::Batch::new();
    batch.delete(Family::Trees, deeper.as_bytes().to_vec());
    t.meta().write(batch).unwrap();
    let report = t.verify().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what == "missing tree" && p.detail.contains(&deeper.to_hex())),
        "[{}] {:?}",
        t.kind,
        report.problems
    );
}

fn verify_reports_bad_records(new: Backend) {
    let t = new();
    let good = t.ingest_spec(&Dir::new().file("a", "four"));
    t.set_ref("good", &good).unwrap();
    t.assert_verified();
    let problems = |t: &TestStore| -> Vec<(String, String)> {
        t.verify()
            .unwrap()
            .problems
            .into_iter()
            .map(|p| (p.what, p.detail))
            .collect()
    };
    let has = |ps: &[(String, String)], what: &str, needle: &str| {
        ps.iter().any(|(w, d)| w == what && d.contains(needle))
    };

    // A tree naming an existing blob with the wrong size.
    let liar = Tree::from_entries(vec![(
        Name::new("a").unwrap(),
        Entry::File {
            digest: Digest::of(b"four"),
            size: 5,
            executable: false,
        },
    )])
    .unwrap();
    t.put_trees([liar.clone()]).unwrap();
    let ps = problems(&t);
    assert!(
        has(&ps, "wrong blob size", &Digest::of(b"four").to_hex()),
        "{ps:?}"
    );

    // A tree stored under another tree's digest, and bytes that are no tree.
    let t = new();
    t.ingest_spec(&Dir::new().file("a", "four"));
    let wrong_key = Digest::of(b"not the digest of what follows");
    let garbage_key = Digest::of(b"garbage");
    let mut batch = strata_store::Batch::new();
    batch.put(
        Family::Trees,
        wrong_key.as_bytes().to_vec(),
        Tree::empty().encode(),
    );
    batch.put(
        Family::Trees,
        garbage_key.as_bytes().to_vec(),
        b"garbage".to_vec(),
    );
    t.meta().write(batch).unwrap();
    let ps = problems(&t);
    assert!(has(&ps, "corrupt tree", &wrong_key.to_hex()), "{ps:?}");
    assert!(has(&ps, "corrupt tree", &garbage_key.to_hex()), "{ps:?}");

    // A ref and a layer record whose tree is gone.
    let t = new();
    let l = t.ingest_spec(&Dir::new().file("a", "four"));
    t.set_ref("dangling", &l).unwrap();
    let mut batch = strata_store::Batch::new();
    batch.delete(Family::Trees, l.as_bytes().to_vec());
    t.meta().write(batch).unwrap();
    let ps = problems(&t);
    assert!(has(&ps, "missing tree", "ref `dangling`"), "{ps:?}");
    assert!(has(&ps, "missing tree", "a recorded layer"), "{ps:?}");
}

/// The families whose records are keyed by a digest and hold JSON (or a
/// fixed layout): one bad record each in the test below.
const DIGEST_KEYED: [Family; 8] = [
    Family::Layers,
    Family::Lineage,
    Family::Labels,
    Family::Actions,
    Family::LazyActions,
    Family::Remote,
    Family::Runs,
    Family::Leases,
];

fn verify_decodes_every_family_and_gc_stops_on_an_unreadable_root(new: Backend) {
    let t = new();
    let good = t.ingest_spec(&Dir::new().file("a", "four"));
    t.set_ref("good", &good).unwrap();
    t.assert_verified();
    let mut batch = strata_store::Batch::new();
    for family in DIGEST_KEYED {
        batch.put(
            family,
            Digest::of(b"k").as_bytes().to_vec(),
            b"{not json".to_vec(),
        );
    }
    batch.put(Family::Refs, b"broken".to_vec(), b"short".to_vec());
    batch.put(
        Family::Events,
        b"run\0\0\0\0\0\0\0\0\x01".to_vec(),
        b"{".to_vec(),
    );
    t.meta().write(batch).unwrap();
    let problems = t.verify().unwrap().problems;
    for family in [
        "layers",
        "lineage",
        "labels",
        "actions",
        "lazy_actions",
        "remote",
        "runs",
        "leases",
        "refs",
        "events",
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.what == "corrupt record" && p.detail.contains(&format!("`{family}`"))),
            "no corrupt record reported for `{family}`: {problems:?}"
        );
    }
    // An unreadable ref might pin anything: GC stops rather than sweep.
    let mut batch = strata_store::Batch::new();
    for family in DIGEST_KEYED {
        batch.delete(family, Digest::of(b"k").as_bytes().to_vec());
    }
    t.meta().write(batch).unwrap();
    match t.gc(&GcOptions::default()) {
        Err(Error::CorruptRecord { what: "ref", key }) => assert_eq!(key, "broken"),
        other => panic!("expected GC to stop on the unreadable ref, got {other:?}"),
    }
    assert!(t.has_tree(&good).unwrap());
}

fn drop_dangling_makes_a_store_with_a_lost_blob_consistent(new: Backend) {
    let t = new();
    let kept = t.ingest_spec(&Dir::new().file("k", "kept"));
    let lost = t.ingest_spec(
        &Dir::new()
            .dir("sub", Dir::new().file("a", "lost"))
            .file("k", "kept"),
    );
    t.set_ref("kept", &kept).unwrap();
    t.set_ref("lost", &lost).unwrap();
    t.blobs().delete(&Digest::of(b"lost")).unwrap();
    assert!(!t.verify().unwrap().problems.is_empty());
    let dropped = t.drop_dangling().unwrap();
    let text: Vec<String> = dropped.iter().map(|p| p.to_string()).collect();
    assert!(text.iter().any(|d| d.contains("ref `lost`")), "{text:?}");
    assert!(!text.iter().any(|d| d.contains("ref `kept`")), "{text:?}");
    t.assert_verified();
    assert_eq!(t.get_ref("kept").unwrap(), Some(kept));
    assert_eq!(t.get_ref("lost").unwrap(), None);
    assert!(!t.has_tree(&lost).unwrap());
}

fn ingest_counts_a_new_blob_once(new: Backend) {
    // Files are hashed in parallel: identical new files race to be "new".
    // A few fresh stores make a miscount show up reliably.
    let bytes = pseudo_random(64_000, 5);
    let mut spec = Dir::new();
    for i in 0..48 {
        spec = spec.file(format!("copy-{i}"), &bytes);
    }
    let mut counts = Vec::new();
    for _ in 0..12 {
        let t = new();
        let report = t
            .ingest(&t.materialise(&spec), &IngestOptions::default())
            .unwrap();
        assert_eq!(report.stats.files, 48);
        assert_eq!(t.counts().blobs, 1);
        counts.push((report.new_blobs, report.new_blob_bytes));
    }
    assert!(
        counts.iter().all(|c| *c == (1, 64_000)),
        "`new_blobs` counts blobs that were not in the store, each once: got {counts:?}"
    );
}

fn ingest_records_the_given_lineage(new: Backend) {
    let t = new();
    let base = t.ingest_spec(&Dir::new().file("a", "a"));
    let lineage = Lineage {
        parent: Some(base),
        task: Some("//app:build".into()),
        how: "task".into(),
        created: 7,
    };
    let src = t.materialise(&Dir::new().file("a", "a").file("b", "b"));
    let layer = t
        .ingest(
            &src,
            &IngestOptions {
                lineage: Some(lineage.clone()),
                ..Default::default()
            },
        )
        .unwrap()
        .layer;
    assert_eq!(t.lineage(&layer).unwrap(), Some(lineage));
    assert_eq!(t.lineage(&base).unwrap().unwrap().parent, None);
}

fn actions_and_runs_round_trip(new: Backend) {
    let t = new();
    let layer = t.ingest_spec(&Dir::new().file("o", "out"));
    let key = Digest::of(b"action key");
    assert!(t.action(&key).unwrap().is_none());
    let entry = ActionEntry {
        layers: vec![layer],
        blobs: vec![],
        payload: Payload::new(&serde_json::json!({"exit_code": 0, "stdout": "ok"})).unwrap(),
        created: 42,
    };
    t.put_action(&key, &entry).unwrap();
    assert_eq!(t.action(&key).unwrap(), Some(entry.clone()));
    // An entry naming a layer or blob that is not stored is refused, and
    // nothing is recorded.
    let gone = Digest::of(b"no such layer");
    let err = t
        .put_action(
            &Digest::of(b"k2"),
            &ActionEntry {
                layers: vec![gone],
                ..entry.clone()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::MissingTree(d) if d == gone), "{err}");
    let no_blob = Digest::of(b"no such log");
    let err = t
        .put_action(
            &Digest::of(b"k3"),
            &ActionEntry {
                blobs: vec![no_blob],
                ..entry
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::MissingBlob(d) if d == no_blob),
        "{err}"
    );
    assert!(t.action(&Digest::of(b"k2")).unwrap().is_none());
    assert!(t.action(&Digest::of(b"k3")).unwrap().is_none());

    assert!(t.run_ids().unwrap().is_empty());
    t.put_run("2024-01-02T00:00:00Z-b", &run_entry(layer, vec![]))
        .unwrap();
    t.put_run("2024-01-01T00:00:00Z-a", &run_entry(layer, vec![]))
        .unwrap();
    assert_eq!(
        t.run_ids().unwrap(),
        ["2024-01-01T00:00:00Z-a", "2024-01-02T00:00:00Z-b"],
        "run ids are listed oldest first"
    );
    assert_eq!(
        t.run("2024-01-01T00:00:00Z-a").unwrap(),
        Some(run_entry(layer, vec![]))
    );
    assert_eq!(t.run("nope").unwrap(), None);
}

/// `Store` is shared between threads (`ci serve` runs builds and GC in one
/// process): a GC running while an ingest writes must never delete a blob
/// that the ingest then records. Each ingest roots its layer with a ref in
/// the same write, so every blob of it must exist once `ingest` returns.
fn gc_concurrent_with_ingest_keeps_every_recorded_blob(new: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let t = new();
    let store = t.store.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0u32;
            while !stop.load(Ordering::Relaxed) || runs == 0 {
                store
                    .gc(&GcOptions {
                        keep_runs: 0,
                        dry_run: false,
                        ..Default::default()
                    })
                    .expect("gc");
                runs += 1;
            }
            runs
        })
    };
    let mut bad = Vec::new();
    for round in 0..20 {
        let mut spec = Dir::new();
        for i in 0..50 {
            spec = spec.file(format!("f{i}"), format!("round {round} file {i}"));
        }
        let src = t.materialise(&spec);
        let opts = IngestOptions {
            ref_name: Some(format!("round-{round}")),
            ..Default::default()
        };
        let layer = store.ingest(&src, &opts).expect("ingest").layer;
        let tree = store.tree(&layer).expect("the ref'd layer's tree");
        let missing = tree
            .entries()
            .iter()
            .filter(|(_, e)| match e {
                Entry::File { digest, .. } => !store.blobs().contains(digest).unwrap(),
                _ => false,
            })
            .count();
        if missing > 0 {
            bad.push(format!("round {round}: {missing} of 50 blobs missing"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().expect("the GC thread");
    assert!(
        bad.is_empty(),
        "[{}] a concurrent GC deleted blobs of layers recorded with a ref ({runs} GC runs):\n{}",
        t.kind,
        bad.join("\n")
    );
    t.assert_verified();
}

// ---------------------------------------------------------------------------
// On-disk only
// ---------------------------------------------------------------------------

fn blob_file(t: &TestStore, d: &Digest) -> std::path::PathBuf {
    let hex = d.to_hex();
    t.root()
        .unwrap()
        .join("blobs")
        .join(&hex[..2])
        .join(&hex[2..])
}

#[test]
fn rocksdb_blob_files_are_read_only_and_named_by_digest() {
    let t = rocksdb();
    let d = t.put_blob(b"on disk").unwrap();
    let p = blob_file(&t, &d);
    assert_eq!(fs::read(&p).unwrap(), b"on disk");
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o222,
        0,
        "blob files are read-only"
    );
    assert_eq!(t.blobs().file_path(&d), Some(p));
    assert!(t.staging_leftovers().is_empty());
}

#[test]
fn rocksdb_verify_reports_a_corrupt_blob() {
    let t = rocksdb();
    t.ingest_spec(&Dir::new().file("a", "good bytes").file("b", "other"));
    t.assert_verified();
    let d = Digest::of(b"good bytes");
    let p = blob_file(&t, &d);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&p).unwrap();
    bytes[3] ^= 0x20;
    fs::write(&p, &bytes).unwrap();
    let report = t.verify().unwrap();
    let hits: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.what == "corrupt blob" && p.detail.contains(&d.to_hex()))
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", report.problems);
    assert_eq!(
        report.problems.len(),
        1,
        "only that blob: {:?}",
        report.problems
    );
}

#[test]
fn rocksdb_reopen_keeps_everything_and_sweeps_tmp() {
    let t = rocksdb();
    let spec = everything();
    let layer = t.ingest_spec(&spec);
    t.set_ref("main", &layer).unwrap();
    t.put_run("run-1", &run_entry(layer, vec![])).unwrap();
    let root = t.root().unwrap();
    fs::write(root.join("tmp").join("blob-leftover"), "half a blob").unwrap();
    fs::create_dir(root.join("tmp").join("dir-leftover")).unwrap();
    let before = t.counts();

    let t = t.reopen();
    assert!(
        t.staging_leftovers().is_empty(),
        "opening for writing sweeps tmp/"
    );
    assert_eq!(t.counts(), before);
    assert_eq!(t.resolve("main").unwrap(), layer);
    assert_eq!(t.run_ids().unwrap(), ["run-1"]);
    assert_same(
        "after reopening",
        &snapshot(&t.checkout_new(&layer)),
        &spec.snapshot(),
    );
    t.assert_verified();
}

#[test]
fn rocksdb_read_only_handle_sees_writes_and_refuses_its_own() {
    let t = rocksdb();
    let a = t.ingest_spec(&Dir::new().file("a", "a"));
    t.set_ref("a", &a).unwrap();
    let root = t.root().unwrap();
    let reader = Store::open(&StoreUrl::Local(root.clone()), OpenMode::Read, &mut |m| {
        panic!("a reader never waits: {m}")
    })
    .unwrap();
    assert!(reader.is_read_only());
    assert_eq!(reader.resolve("a").unwrap(), a);
    assert_eq!(reader.read_blob(&Digest::of(b"a")).unwrap(), b"a");

    let b = t.ingest_spec(&Dir::new().file("b", "b"));
    t.set_ref("b", &b).unwrap();
    reader.refresh().unwrap();
    assert_eq!(
        reader.get_ref("b").unwrap(),
        Some(b),
        "refresh catches up with the writer"
    );

    let blobs_before = t.counts().blobs;
    let src = t.materialise(&Dir::new().file("c", "written through a reader"));
    let err = reader.ingest(&src, &IngestOptions::default()).unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    assert!(matches!(
        reader.set_ref("c", &a),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(
        t.counts().blobs,
        blobs_before,
        "a read-only handle writes no blob files either (it holds no lock)"
    );
}

#[test]
fn rocksdb_second_writer_waits_for_the_first() {
    let t = rocksdb();
    let root = t.root().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let waiter = std::thread::spawn(move || {
        let store = Store::open(&StoreUrl::Local(root), OpenMode::Write, &mut |msg| {
            tx.send(msg.to_owned()).unwrap();
        })
        .unwrap();
        store.refs().unwrap().len()
    });
    let msg = rx.recv().expect("the second writer reports that it waits");
    assert!(msg.contains("Waiting for the store"), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "names the holder: {msg}"
    );
    t.set_ref("before-release", &t.ingest_spec(&Dir::new()))
        .unwrap();
    let _dir = t.close(); // releases the lock, keeps the directory
    assert_eq!(
        waiter.join().unwrap(),
        1,
        "the waiter opens once the first writer closes"
    );
}

#[test]
fn rocksdb_open_refuses_what_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("unrelated"), "x").unwrap();
    let err = Store::open(
        &StoreUrl::Local(dir.path().to_owned()),
        OpenMode::Write,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotAStore { .. }), "{err}");
    assert!(dir.path().join("unrelated").exists());
    let err = Store::open(
        &StoreUrl::Local(dir.path().join("nothing")),
        OpenMode::Read,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoStore { .. }), "{err}");
    assert!(
        !dir.path().join("nothing").exists(),
        "a reader creates nothing"
    );
}

#[test]
fn store_urls() {
    assert_eq!(StoreUrl::parse("memory://").unwrap(), StoreUrl::Memory);
    assert_eq!(
        StoreUrl::parse("rocksdb:///var/cache/strata").unwrap(),
        StoreUrl::Local("/var/cache/strata".into())
    );
    assert_eq!(
        StoreUrl::parse("some/dir").unwrap(),
        StoreUrl::Local("some/dir".into())
    );
    for bad in ["", "rocksdb://relative", "http://host/cache", "s3://bucket"] {
        assert!(
            matches!(StoreUrl::parse(bad), Err(Error::BadUrl { .. })),
            "{bad:?}"
        );
    }
}
