//! Shared helpers of the store's integration tests: the backends every
//! conformance test runs against, fixture trees described in code, and
//! byte-for-byte comparison of directories.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use strata_store::{Digest, Entry, Name, OpenMode, Store, StoreUrl, Target, Tree, Usage};

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A store under test, with a scratch directory that lives as long as it.
pub struct TestStore {
    // Dropped first: the store must close before its directory goes away.
    pub store: Store,
    /// Which backend, for messages.
    pub kind: &'static str,
    scratch: tempfile::TempDir,
    next: std::cell::Cell<u32>,
}

impl std::ops::Deref for TestStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// Makes a fresh, empty store of one backend.
pub type Backend = fn() -> TestStore;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("strata-test-")
        .tempdir()
        .expect("create a scratch directory")
}

/// `memory://`.
pub fn memory() -> TestStore {
    TestStore {
        store: Store::memory(),
        kind: "memory",
        scratch: scratch(),
        next: Default::default(),
    }
}

/// An on-disk store (blob files + RocksDB) in a fresh temporary directory.
pub fn rocksdb() -> TestStore {
    let scratch = scratch();
    let root = scratch.path().join("store");
    let store = Store::open(&StoreUrl::Local(root), OpenMode::Write, &mut |msg| {
        panic!("a fresh store should not be locked: {msg}")
    })
    .expect("open an on-disk store");
    TestStore {
        store,
        kind: "rocksdb",
        scratch,
        next: Default::default(),
    }
}

impl TestStore {
    /// A new, not yet existing path in the scratch directory.
    pub fn path(&self, hint: &str) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.scratch.path().join(format!("{hint}-{n}"))
    }

    /// The store directory, for on-disk backends.
    pub fn root(&self) -> Option<PathBuf> {
        self.store.root().map(Path::to_owned)
    }

    /// Closes the store, keeping its directory until the returned guard drops.
    pub fn close(self) -> tempfile::TempDir {
        let TestStore { store, scratch, .. } = self;
        drop(store);
        scratch
    }

    /// Closes the store and opens it again (on-disk backends only).
    pub fn reopen(self) -> TestStore {
        let root = self.root().expect("only on-disk stores can be reopened");
        let TestStore {
            store,
            kind,
            scratch,
            next,
        } = self;
        drop(store);
        let store = Store::open(&StoreUrl::Local(root), OpenMode::Write, &mut |msg| {
            panic!("the store should be free: {msg}")
        })
        .expect("reopen the store");
        TestStore {
            store,
            kind,
            scratch,
            next,
        }
    }

    /// Writes `spec` to a new directory and returns its path.
    pub fn materialise(&self, spec: &Dir) -> PathBuf {
        let p = self.path("tree");
        spec.write_to(&p);
        p
    }

    /// Materialises `spec` and ingests it with default options.
    pub fn ingest_spec(&self, spec: &Dir) -> Digest {
        let p = self.materialise(spec);
        self.store
            .ingest(&p, &Default::default())
            .unwrap_or_else(|e| panic!("[{}] ingest failed: {}", self.kind, chain(&e)))
            .layer
    }

    /// Checks out `layer` into a new directory and returns its path.
    pub fn checkout_new(&self, layer: &Digest) -> PathBuf {
        let p = self.path("checkout");
        self.store
            .checkout(layer, &p)
            .unwrap_or_else(|e| panic!("[{}] checkout failed: {}", self.kind, chain(&e)));
        p
    }

    /// Files left in `<root>/tmp/` (always empty for in-memory stores).
    pub fn staging_leftovers(&self) -> Vec<PathBuf> {
        match self.root() {
            Some(root) => fs::read_dir(root.join("tmp"))
                .expect("list tmp/")
                .map(|e| e.expect("list tmp/").path())
                .collect(),
            None => Vec::new(),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts::of(&self.store)
    }

    /// Panics with every problem when `verify` finds any.
    pub fn assert_verified(&self) {
        let report = self.store.verify().expect("verify runs");
        assert!(
            report.problems.is_empty(),
            "[{}] verify found problems:\n{}",
            self.kind,
            report
                .problems
                .iter()
                .map(|p| format!("  {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// What a store holds, for before/after comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub blobs: u64,
    pub trees: u64,
    pub layers: u64,
    pub refs: u64,
    pub runs: u64,
    pub actions: u64,
}

impl Counts {
    pub fn of(store: &Store) -> Counts {
        let Usage {
            blobs,
            trees,
            layers,
            refs,
            runs,
            actions,
            ..
        } = store.usage().expect("usage");
        Counts {
            blobs,
            trees,
            layers,
            refs,
            runs,
            actions,
        }
    }
}

/// An error with its whole `source` chain, for assertion messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------
// Fixture trees described in code
// ---------------------------------------------------------------------------

/// One node of a fixture tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { bytes: Vec<u8>, exec: bool },
    Link(Vec<u8>),
    Dir(Dir),
}

/// A directory of a fixture tree: names (raw bytes) to nodes. The spec is the
/// fixture: tests write it to disk at run time, because git cannot keep exec
/// bits, empty directories, non-UTF-8 names or dangling symlinks reliably.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dir(pub BTreeMap<Vec<u8>, Node>);

impl Dir {
    pub fn new() -> Dir {
        Dir::default()
    }
    pub fn file(mut self, name: impl AsRef<[u8]>, bytes: impl AsRef<[u8]>) -> Dir {
        let node = Node::File {
            bytes: bytes.as_ref().to_vec(),
            exec: false,
        };
        self.0.insert(name.as_ref().to_vec(), node);
        self
    }
    pub fn exec(mut self, name: impl AsRef<[u8]>, bytes: impl AsRef<[u8]>) -> Dir {
        let node = Node::File {
            bytes: bytes.as_ref().to_vec(),
            exec: true,
        };
        self.0.insert(name.as_ref().to_vec(), node);
        self
    }
    pub fn link(mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Dir {
        self.0
            .insert(name.as_ref().to_vec(), Node::Link(target.as_ref().to_vec()));
        self
    }
    pub fn dir(mut self, name: impl AsRef<[u8]>, dir: Dir) -> Dir {
        self.0.insert(name.as_ref().to_vec(), Node::Dir(dir));
        self
    }
    /// Removes the entry at a `/`-separated path.
    pub fn without(mut self, path: &str) -> Dir {
        match path.split_once('/') {
            None => {
                self.0.remove(path.as_bytes());
            }
            Some((first, rest)) => {
                if let Some(Node::Dir(d)) = self.0.remove(first.as_bytes()) {
                    self.0
                        .insert(first.as_bytes().to_vec(), Node::Dir(d.without(rest)));
                }
            }
        }
        self
    }

    /// Writes the tree under `root` (created; must not exist): files 0644 or
    /// 0755, directories 0755, whatever the umask.
    pub fn write_to(&self, root: &Path) {
        fs::create_dir_all(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod");
        for (name, node) in &self.0 {
            let p = root.join(OsStr::from_bytes(name));
            match node {
                Node::File { bytes, exec } => {
                    fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                    let mode = if *exec { 0o755 } else { 0o644 };
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
                }
                Node::Link(target) => std::os::unix::fs::symlink(OsStr::from_bytes(target), &p)
                    .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display())),
                Node::Dir(d) => d.write_to(&p),
            }
        }
    }

    /// What a faithful checkout of this tree looks like.
    pub fn snapshot(&self) -> BTreeMap<Vec<u8>, Snap> {
        let mut out = BTreeMap::new();
        self.snap_into(&mut Vec::new(), &mut out);
        out
    }

    fn snap_into(&self, prefix: &mut Vec<u8>, out: &mut BTreeMap<Vec<u8>, Snap>) {
        for (name, node) in &self.0 {
            let len = prefix.len();
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(name);
            let snap = match node {
                Node::File { bytes, exec } => Snap::File {
                    bytes: bytes.clone(),
                    exec: *exec,
                },
                Node::Link(t) => Snap::Link(t.clone()),
                Node::Dir(d) => {
                    d.snap_into(prefix, out);
                    Snap::Dir
                }
            };
            out.insert(prefix.clone(), snap);
            prefix.truncate(len);
        }
    }

    /// Stores the tree directly (blobs and trees, no layer record) and returns
    /// its root digest: what ingest of the same tree must produce.
    pub fn build(&self, store: &Store) -> Digest {
        let mut entries = Vec::new();
        for (name, node) in &self.0 {
            let entry = match node {
                Node::File { bytes, exec } => Entry::File {
                    digest: store.put_blob(bytes).expect("put_blob"),
                    size: bytes.len() as u64,
                    executable: *exec,
                },
                Node::Link(t) => Entry::Symlink {
                    target: Target::new(t.clone()).expect("valid target"),
                },
                Node::Dir(d) => Entry::Dir {
                    digest: d.build(store),
                },
            };
            entries.push((Name::new(name.clone()).expect("valid name"), entry));
        }
        let tree = Tree::from_entries(entries).expect("unique names");
        let digest = tree.digest();
        store.put_trees([tree]).expect("put_trees");
        digest
    }
}

impl Dir {
    /// The counts ingest must report for this tree.
    pub fn stats(&self) -> strata_store::LayerStats {
        let mut s = strata_store::LayerStats::default();
        for node in self.0.values() {
            match node {
                Node::File { bytes, .. } => {
                    s.files += 1;
                    s.bytes += bytes.len() as u64;
                }
                Node::Link(_) => s.symlinks += 1,
                Node::Dir(d) => {
                    let sub = d.stats();
                    s.dirs += 1 + sub.dirs;
                    s.files += sub.files;
                    s.symlinks += sub.symlinks;
                    s.bytes += sub.bytes;
                }
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------
// The tree encoding, written out by hand (docs/FORMAT.md), independently of
// `Tree::encode`, so tests can build both valid and broken encodings.
// ---------------------------------------------------------------------------

pub const MAGIC: &[u8] = b"strata-tree\x00\x01";

/// A whole encoding: magic, entry count, then the entries as given.
pub fn enc_tree(entries: &[Vec<u8>]) -> Vec<u8> {
    enc_tree_counted(entries.len() as u32, entries)
}

/// Like [`enc_tree`] with any entry count, true or not.
pub fn enc_tree_counted(count: u32, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&count.to_le_bytes());
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

/// One entry: kind byte, name length (u32 LE), name, then `payload`.
pub fn enc_raw(kind: u8, name: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}

/// A file entry: kind 1, executable byte, size (u64 LE), blob digest.
pub fn enc_file(name: &[u8], exec: u8, size: u64, digest: &Digest) -> Vec<u8> {
    let mut p = vec![exec];
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(digest.as_bytes());
    enc_raw(1, name, &p)
}

/// A symlink entry: kind 2, target length (u32 LE), target.
pub fn enc_symlink(name: &[u8], target: &[u8]) -> Vec<u8> {
    let mut p = (target.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(target);
    enc_raw(2, name, &p)
}

/// A directory entry: kind 3, tree digest.
pub fn enc_dir(name: &[u8], digest: &Digest) -> Vec<u8> {
    enc_raw(3, name, digest.as_bytes())
}

/// One path of a directory on disk, as compared by the tests.
#[derive(Clone, PartialEq, Eq)]
pub enum Snap {
    File { bytes: Vec<u8>, exec: bool },
    Link(Vec<u8>),
    Dir,
}

impl std::fmt::Debug for Snap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Snap::File { bytes, exec } => {
                let shown = if bytes.len() <= 48 {
                    format!("{:?}", String::from_utf8_lossy(bytes))
                } else {
                    format!(
                        "{} bytes, blake3 {}",
                        bytes.len(),
                        Digest::of(bytes).short()
                    )
                };
                write!(f, "File({shown}{})", if *exec { ", exec" } else { "" })
            }
            Snap::Link(t) => write!(f, "Link({:?})", String::from_utf8_lossy(t)),
            Snap::Dir => f.write_str("Dir"),
        }
    }
}

/// Walks a directory (never following symlinks): relative path → what is there.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Snap> {
    let mut out = BTreeMap::new();
    snap_dir(root, &mut Vec::new(), &mut out);
    out
}

fn snap_dir(dir: &Path, prefix: &mut Vec<u8>, out: &mut BTreeMap<Vec<u8>, Snap>) {
    let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
    for entry in rd {
        let entry = entry.expect("list");
        let path = entry.path();
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        prefix.extend_from_slice(entry.file_name().as_bytes());
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let ft = meta.file_type();
        let snap = if ft.is_symlink() {
            Snap::Link(
                fs::read_link(&path)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_dir() {
            snap_dir(&path, prefix, out);
            Snap::Dir
        } else if ft.is_file() {
            Snap::File {
                bytes: fs::read(&path).expect("read"),
                exec: meta.mode() & 0o100 != 0,
            }
        } else {
            panic!("unexpected file type at {}", path.display())
        };
        out.insert(prefix.clone(), snap);
        prefix.truncate(len);
    }
}

/// The paths at which two snapshots differ, one line each.
pub fn differences(got: &BTreeMap<Vec<u8>, Snap>, want: &BTreeMap<Vec<u8>, Snap>) -> Vec<String> {
    let mut lines = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => lines.push(format!(
                "  missing {:?}: want {w:?}",
                String::from_utf8_lossy(k)
            )),
            Some(g) if g != w => lines.push(format!(
                "  differs {:?}: got {g:?}, want {w:?}",
                String::from_utf8_lossy(k)
            )),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            lines.push(format!("  extra {:?}: {g:?}", String::from_utf8_lossy(k)));
        }
    }
    lines
}

/// Asserts two snapshots are equal, listing the paths that differ.
pub fn assert_same(what: &str, got: &BTreeMap<Vec<u8>, Snap>, want: &BTreeMap<Vec<u8>, Snap>) {
    let lines = differences(got, want);
    assert!(
        lines.is_empty(),
        "{what}: trees differ\n{}",
        lines.join("\n")
    );
}

/// Every path under `root` (and `root` itself) whose lstat mtime is not
/// exactly `secs` seconds and 0 ns.
pub fn wrong_mtimes(root: &Path, secs: i64) -> Vec<(PathBuf, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).expect("lstat");
        if m.mtime() != secs || m.mtime_nsec() != 0 {
            out.push((p.clone(), m.mtime(), m.mtime_nsec()));
        }
        if m.file_type().is_dir() {
            for e in fs::read_dir(&p).expect("list") {
                stack.push(e.expect("list").path());
            }
        }
    }
    out
}

/// Waits, by watching the clock, until every entry under `root` last changed
/// more than 1.1 s ago: the stat cache distrusts files changed within 1 s of
/// the ingest that cached them (ctime cannot be set, so there is no shortcut).
pub fn wait_until_settled(root: &Path) {
    let mut newest = UNIX_EPOCH;
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).expect("lstat");
        for (s, ns) in [(m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec())] {
            let t = UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.max(0) as u32);
            newest = newest.max(t);
        }
        if m.file_type().is_dir() {
            for e in fs::read_dir(&p).expect("list") {
                stack.push(e.expect("list").path());
            }
        }
    }
    let deadline = newest + Duration::from_millis(1100);
    loop {
        let now = SystemTime::now();
        match deadline.duration_since(now) {
            Ok(left) if !left.is_zero() => std::thread::sleep(left),
            _ => return,
        }
    }
}

/// A fixture with one of everything the format can hold.
pub fn everything() -> Dir {
    Dir::new()
        .file("README.md", "# Fixture\n\nOne of everything.\n")
        .file("empty-file", "")
        .exec("run.sh", "#!/bin/sh\necho hello\n")
        .file(b"caf\xe9-latin1.txt", "not UTF-8 in the name\n")
        .file("caf\u{e9}-utf8.txt", "UTF-8 in the name\n")
        .file(" spaces and\nnewline ", "odd name\n")
        .link("link-to-readme", "README.md")
        .link("dangling", "does/not/exist")
        .link("absolute", "/etc/passwd")
        .link("dir-link", "src")
        .link("up-and-back", "../up-and-back-target")
        .dir("empty-dir", Dir::new())
        .dir(
            "src",
            Dir::new()
                .file("main.rs", "fn main() {}\n")
                .exec("build.sh", "#!/bin/sh\ncargo build\n")
                .dir(
                    "deep",
                    Dir::new().dir(
                        "deeper",
                        Dir::new()
                            .file("leaf.txt", "leaf\n")
                            .dir("empty", Dir::new())
                            .link(b"\xff\xfe-link", b"\xff\xfe-target"),
                    ),
                ),
        )
        .dir(b"dir-\x80\x81", Dir::new().file("x", "x"))
        .file("big.bin", pseudo_random(3 << 20, 7))
}

/// Deterministic bytes (xorshift), so fixtures are the same on every run.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
