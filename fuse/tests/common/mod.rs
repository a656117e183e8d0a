//! Shared helpers of the FUSE tests: requiring FUSE, fixture trees, and
//! comparing two directories entry by entry.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata_store::{Digest, IngestOptions, OpenMode, Store, StoreUrl};

/// Whether CI requires every test to run (`CI=true`).
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true" | "TRUE" | "True" | "1" | "yes")
    )
}

/// `true` when FUSE works here; otherwise the test fails, saying why (in CI
/// and out of it: a test that needs FUSE never passes without it).
pub fn require_fuse(test: &str) -> bool {
    match strata_fuse::fuse_problem() {
        None => true,
        Some(p) if in_ci() => panic!("{test}: CI=true and FUSE is unavailable: {p}"),
        Some(p) => panic!("{test}: FUSE is unavailable: {p}; `./scripts/test` sets it up"),
    }
}

/// A store on disk in a temporary directory, open for writing.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: Store,
}

impl TestStore {
    pub fn new() -> TestStore {
        let dir = tempfile::Builder::new()
            .prefix("strata-fuse-test-")
            .tempdir()
            .expect("create a temporary directory");
        let store = Store::open(
            &StoreUrl::Local(dir.path().join("store")),
            OpenMode::Write,
            &mut |_| {},
        )
        .expect("open a store");
        TestStore { dir, store }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A new empty directory under the temporary directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).expect("create a directory");
        p
    }

    pub fn ingest(&self, dir: &Path) -> Digest {
        self.store
            .ingest(
                dir,
                &IngestOptions {
                    no_stat_cache: true,
                    ..IngestOptions::default()
                },
            )
            .expect("ingest")
            .layer
    }
}

pub fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parents");
    }
    fs::write(path, bytes).expect("write a file");
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

/// Fixture trees, each written into a new directory under `root`: every
/// kind of entry, odd names, empty things, depth and width.
pub fn fixture_trees(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut add = |name: &str, build: &dyn Fn(&Path)| {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("create a fixture directory");
        build(&dir);
        out.push((name.to_owned(), dir));
    };
    add("empty", &|_| {});
    add("one-file", &|d| write(&d.join("hello.txt"), b"hello\n"));
    add("kinds", &|d| {
        write(&d.join("plain.txt"), b"plain");
        write(&d.join("empty-file"), b"");
        write(&d.join("run.sh"), b"#!/bin/sh\necho hi\n");
        chmod(&d.join("run.sh"), 0o755);
        write(&d.join("owner-exec-only"), b"x");
        chmod(&d.join("owner-exec-only"), 0o700);
        fs::create_dir(d.join("empty-dir")).expect("mkdir");
        symlink("plain.txt", &d.join("link-to-file"));
        symlink("empty-dir", &d.join("link-to-dir"));
        symlink("does/not/exist", &d.join("dangling"));
        symlink("/etc/hostname", &d.join("absolute"));
        symlink("../kinds/./plain.txt", &d.join("dotted"));
        write(
            &d.join("binary.bin"),
            &(0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
        );
    });
    add("names", &|d| {
        write(&d.join("with space"), b"s");
        write(&d.join("ünïcødé-名前"), b"u");
        write(&d.join(".hidden"), b"h");
        write(&d.join("-dash"), b"d");
        write(&d.join("a".repeat(255)), b"long");
        let raw = std::ffi::OsStr::from_bytes(b"latin1-\xe9\xff");
        write(&d.join(raw), b"non-utf8");
        write(&d.join("new\nline"), b"n");
    });
    add("deep", &|d| {
        let mut p = d.to_path_buf();
        for i in 0..40 {
            p = p.join(format!("level{i}"));
        }
        write(&p.join("bottom.txt"), b"bottom");
        fs::create_dir_all(d.join("x/y/z/empty")).expect("mkdir");
    });
    add("wide", &|d| {
        for i in 0..2000 {
            write(
                &d.join(format!("f{i:05}")),
                format!("file {i}\n").as_bytes(),
            );
        }
        for i in 0..50 {
            write(&d.join(format!("d{i:03}/inner")), b"inner");
        }
    });
    add("dupes", &|d| {
        for i in 0..20 {
            write(&d.join(format!("same{i}")), b"identical content");
            fs::create_dir_all(d.join(format!("twin{i}"))).expect("mkdir");
            write(&d.join(format!("twin{i}/f")), b"twin");
        }
    });
    add("sizes", &|d| {
        for (i, n) in [
            1usize,
            511,
            512,
            4095,
            4096,
            4097,
            131071,
            131072,
            131073,
            1 << 20,
            (1 << 20) + 1,
            3_000_001,
        ]
        .iter()
        .enumerate()
        {
            let bytes: Vec<u8> = (0..*n).map(|j| (j * 31 + i) as u8).collect();
            write(&d.join(format!("size-{n}")), &bytes);
        }
    });
    out
}

/// What one entry of a directory looks like, for comparisons.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    File {
        exec: bool,
        size: u64,
        blake3: String,
    },
    Symlink(Vec<u8>),
    Dir {
        nlink: u64,
    },
}

/// Every entry below `root` by relative path: types, the executable bit,
/// sizes, contents (hashed), symlink targets, directory link counts.
/// Also checks that every mtime is the store's fixed one when `fixed_mtime`.
pub fn walk(root: &Path, fixed_mtime: bool) -> BTreeMap<Vec<u8>, Seen> {
    let mut out = BTreeMap::new();
    walk_into(root, root, fixed_mtime, &mut out);
    out
}

fn walk_into(root: &Path, dir: &Path, fixed_mtime: bool, out: &mut BTreeMap<Vec<u8>, Seen>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("list").file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .expect("below root")
            .as_os_str()
            .as_bytes()
            .to_vec();
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        if fixed_mtime {
            assert_eq!(
                meta.mtime(),
                strata_store::FIXED_MTIME,
                "mtime of {}",
                path.display()
            );
        }
        let ft = meta.file_type();
        let seen = if ft.is_dir() {
            walk_into(root, &path, fixed_mtime, out);
            Seen::Dir {
                nlink: meta.nlink(),
            }
        } else if ft.is_symlink() {
            Seen::Symlink(
                fs::read_link(&path)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            let mut f =
                fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Seen::File {
                exec: meta.mode() & 0o100 != 0,
                size: meta.len(),
                blake3: h.finalize().to_hex().to_string(),
            }
        };
        out.insert(rel, seen);
    }
}

/// Asserts two directories have the same entries (see [`walk`]).
pub fn assert_same_dirs(expected: &Path, actual: &Path, fixed_mtime: bool) {
    compare(
        expected,
        walk(expected, false),
        actual,
        walk(actual, fixed_mtime),
    );
}

/// Like [`assert_same_dirs`] but ignoring directory link counts (an
/// overlay reports 1 for merged directories).
pub fn assert_same_content(expected: &Path, actual: &Path) {
    let strip = |m: BTreeMap<Vec<u8>, Seen>| {
        m.into_iter()
            .map(|(k, v)| match v {
                Seen::Dir { .. } => (k, Seen::Dir { nlink: 0 }),
                other => (k, other),
            })
            .collect()
    };
    compare(
        expected,
        strip(walk(expected, false)),
        actual,
        strip(walk(actual, false)),
    );
}

fn compare(expected: &Path, a: BTreeMap<Vec<u8>, Seen>, actual: &Path, b: BTreeMap<Vec<u8>, Seen>) {
    if a != b {
        let only_a: Vec<_> = a
            .keys()
            .filter(|k| !b.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k))
            .collect();
        let only_b: Vec<_> = b
            .keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k))
            .collect();
        let differ: Vec<_> = a
            .iter()
            .filter_map(|(k, v)| match b.get(k) {
                Some(w) if w != v => {
                    Some(format!("{}: {v:?} vs {w:?}", String::from_utf8_lossy(k)))
                }
                _ => None,
            })
            .collect();
        panic!(
            "`{}` and `{}` differ\nonly in the first: {only_a:?}\nonly in the second: {only_b:?}\ndiffering: {differ:#?}",
            expected.display(),
            actual.display()
        );
    }
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = path.as_os_str().as_bytes();
    text.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == want))
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Writes a line straight to file descriptor 1, past libtest's output
/// capture: helper processes talk to their parent test this way.
pub fn say(line: &str) {
    // libtest may have printed `test NAME ... ` without a newline yet.
    let bytes = format!("\n{HELPER_MARK}{line}\n");
    // SAFETY: writes from a valid buffer of the given length.
    let n = unsafe { libc::write(1, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
    assert_eq!(n, bytes.len() as isize, "write to stdout");
}

const HELPER_MARK: &str = "strata-helper: ";

/// The message of a line written by [`say`], if it is one.
pub fn heard(line: &str) -> Option<&str> {
    line.strip_prefix(HELPER_MARK)
}

/// A helper process, killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves no process serving a mount behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
