//! `ci store …` end to end, against real on-disk stores in temporary directories.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use strata_store::{Digest, Entry, Name, Target, Tree};
use strata_tests::*;

/// The sample tree under `work/NAME`, added; returns its digest.
fn sample(env: &Env, name: &str) -> String {
    sample_tree(&env.path(name));
    env.add(name)
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn file(bytes: &[u8], executable: bool) -> Entry {
    Entry::File {
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        executable,
    }
}

// ---- add ----

#[test]
fn add_prints_only_the_digest_and_is_deterministic() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    let out = env.ci(["store", "add", "a"]).success();
    let first = out.digest();
    assert_eq!(
        out.stderr_str(),
        "",
        "no summary when stderr is not a terminal"
    );

    // Again, through the stat cache, and without it.
    assert_eq!(env.add("a"), first);
    let again = env
        .ci(["store", "add", "--no-stat-cache", "a"])
        .success()
        .digest();
    assert_eq!(again, first);

    // The same content elsewhere, into another store.
    let other = Env::new();
    sample_tree(&other.path("elsewhere/b"));
    assert_eq!(other.add("elsewhere/b"), first);
}

#[test]
fn add_digest_follows_the_canonical_encoding() {
    let env = Env::new();
    mkdir(env.work(), "empty");
    assert_eq!(env.add("empty"), Tree::empty().digest().to_hex());

    write(env.work(), "t/hello.txt", "hello\n");
    write(env.work(), "t/sub/run", "#!/bin/sh\n");
    set_executable(env.work(), "t/sub/run", true);
    symlink(env.work(), "t/link", "hello.txt");
    let sub = Tree::from_entries(vec![(name("run"), file(b"#!/bin/sh\n", true))]).unwrap();
    let root = Tree::from_entries(vec![
        (name("hello.txt"), file(b"hello\n", false)),
        (
            name("link"),
            Entry::Symlink {
                target: Target::new("hello.txt").unwrap(),
            },
        ),
        (
            name("sub"),
            Entry::Dir {
                digest: sub.digest(),
            },
        ),
    ])
    .unwrap();
    assert_eq!(env.add("t"), root.digest().to_hex());
}

#[test]
fn add_json_and_verbose_summary() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    let out = env.ci(["store", "add", "-v", "a"]).success();
    assert!(
        out.stderr_str().contains("6 files,") && out.stderr_str().contains("new blobs in"),
        "summary: {}",
        out.stderr_str()
    );
    let digest = out.digest();
    let report = env.ci(["--json", "store", "add", "a"]).success().json();
    assert_eq!(report["layer"], digest);
    assert_eq!(report["stats"]["files"], 6);
    assert_eq!(report["stats"]["dirs"], 5);
    assert_eq!(report["stats"]["symlinks"], 3);
    assert_eq!(report["new_blobs"], 0);
}

#[test]
fn add_exclude_and_ignore_files() {
    let env = Env::new();
    let t = env.path("t");
    write(&t, "keep.rs", "fn main() {}\n");
    write(&t, "debug.log", "noise\n");
    write(&t, ".gitignore", "*.log\n");
    write(&t, ".git/HEAD", "ref: refs/heads/main\n");
    write(&t, "target/out.o", "obj");

    let all = env.add("t");
    let names = |layer: &str| {
        env.ci(["store", "ls", "-r", layer])
            .success()
            .lines()
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(names(&all).contains(&"debug.log".to_owned()));
    assert!(names(&all).contains(&".git/HEAD".to_owned()));

    let ignoring = env
        .ci(["store", "add", "--ignore-files", "t"])
        .success()
        .digest();
    let listed = names(&ignoring);
    assert!(!listed
        .iter()
        .any(|n| n == "debug.log" || n.starts_with(".git/") || n == ".git"));
    assert!(listed.contains(&"keep.rs".to_owned()));
    assert!(listed.contains(&".gitignore".to_owned()));

    let excluding = env
        .ci([
            "store",
            "add",
            "--exclude",
            "target",
            "--exclude",
            "*.rs",
            "t",
        ])
        .success()
        .digest();
    let listed = names(&excluding);
    assert!(
        !listed
            .iter()
            .any(|n| n.starts_with("target") || n == "keep.rs"),
        "{listed:?}"
    );
    assert!(listed.contains(&"debug.log".to_owned()));
}

#[test]
fn store_flag_and_urls() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    let expected = env.add("a");
    let url = format!("rocksdb://{}", env.root().join("url-store").display());
    let via_url = env
        .ci(["--store", url.as_str(), "store", "add", "a"])
        .success()
        .digest();
    assert_eq!(via_url, expected);
    assert!(env.root().join("url-store/blobs").is_dir());
    let plain = env.root().join("plain-store");
    let plain = plain.to_str().unwrap();
    assert_eq!(
        env.ci(["--store", plain, "store", "add", "a"])
            .success()
            .digest(),
        expected
    );
    let mem = env
        .ci(["--store", "memory://", "store", "add", "a"])
        .success()
        .digest();
    assert_eq!(mem, expected);

    env.ci(["--store", "http://example.com/cache", "store", "du"])
        .failure(2)
        .mentions("http://example.com/cache");
    env.ci(["--store", "rocksdb://relative/path", "store", "du"])
        .failure(2);
}

// ---- ls ----

#[test]
fn ls_lists_like_ls_l() {
    let env = Env::new();
    let d = sample(&env, "a");
    let out = env.ci(["store", "ls", &d]).success();
    assert_eq!(
        out.stdout_str(),
        "\
-rw-r--r-- 9 README.md
drwxr-xr-x - bin
lrwxrwxrwx - dangling -> does/not/exist
drwxr-xr-x - empty-dir
-rw-r--r-- 6 hello.txt
lrwxrwxrwx - link-to-hello -> hello.txt
drwxr-xr-x - src
"
    );
    let out = env.ci(["store", "ls", &d, "src"]).success();
    assert_eq!(
        out.stdout_str(),
        "\
drwxr-xr-x  - deep
-rw-r--r--  0 empty.txt
-rw-r--r-- 14 lib.rs
lrwxrwxrwx  - link-to-deep -> deep/er
"
    );
    // One entry: the file itself, named as given.
    let out = env.ci(["store", "ls", &d, "bin/run.sh"]).success();
    assert_eq!(out.stdout_str(), "-rwxr-xr-x 19 bin/run.sh\n");
    let out = env.ci(["store", "ls", &d, "/link-to-hello"]).success();
    assert_eq!(
        out.stdout_str(),
        "lrwxrwxrwx - link-to-hello -> hello.txt\n"
    );
    // The root spelled out, and an empty directory.
    assert_eq!(env.ci(["store", "ls", &d, "."]).success().lines().len(), 7);
    assert_eq!(
        env.ci(["store", "ls", &d, "empty-dir"])
            .success()
            .stdout_str(),
        ""
    );
}

#[test]
fn ls_recursive_and_json() {
    let env = Env::new();
    let d = sample(&env, "a");
    let out = env.ci(["store", "ls", "-r", &d, "src"]).success();
    let names: Vec<String> = out
        .lines()
        .iter()
        .map(|l| {
            l.split(' ')
                .filter(|s| !s.is_empty())
                .nth(2)
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "deep",
            "deep/er",
            "deep/er/file.bin",
            "empty.txt",
            "lib.rs",
            "link-to-deep"
        ]
    );
    assert_eq!(
        env.ci(["store", "ls", "--recursive", &d])
            .success()
            .lines()
            .len(),
        14
    );

    let rows = env.ci(["--json", "store", "ls", &d]).success().json();
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 7);
    let hello = rows.iter().find(|r| r["name"] == "hello.txt").unwrap();
    assert_eq!(hello["kind"], "file");
    assert_eq!(hello["size"], 6);
    assert_eq!(hello["executable"], false);
    assert_eq!(hello["digest"], Digest::of(b"hello\n").to_hex());
    let link = rows.iter().find(|r| r["name"] == "link-to-hello").unwrap();
    assert_eq!(link["kind"], "symlink");
    assert_eq!(link["target"], "hello.txt");
    let dir = rows.iter().find(|r| r["name"] == "src").unwrap();
    assert_eq!(dir["kind"], "dir");
    assert!(is_digest(dir["digest"].as_str().unwrap()));
}

#[test]
fn ls_missing_path_is_a_usage_error() {
    let env = Env::new();
    let d = sample(&env, "a");
    env.ci(["store", "ls", &d, "no/such"])
        .failure(2)
        .mentions("no/such");
    env.ci(["store", "ls", &d, "hello.txt/below"]).failure(2);
    env.ci(["store", "ls", &d, "../up"]).failure(2);
}

// ---- cat ----

#[test]
fn cat_writes_the_bytes() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    let big = pseudo_random(7, 3 << 20);
    write(&env.path("a"), "big.bin", &big);
    let d = env.add("a");
    assert_eq!(
        env.ci(["store", "cat", &d, "hello.txt"]).success().stdout(),
        b"hello\n"
    );
    assert_eq!(
        env.ci(["store", "cat", &d, "src/deep/er/file.bin"])
            .success()
            .stdout(),
        [0u8, 1, 2, 255, 254]
    );
    assert_eq!(
        env.ci(["store", "cat", &d, "src/empty.txt"])
            .success()
            .stdout(),
        b""
    );
    assert!(env.ci(["store", "cat", &d, "big.bin"]).success().stdout() == big.as_slice());

    env.ci(["store", "cat", &d, "src"])
        .failure(2)
        .mentions("directory");
    env.ci(["store", "cat", &d, "link-to-hello"])
        .failure(2)
        .mentions("symlink");
    env.ci(["store", "cat", &d, "nope.txt"])
        .failure(2)
        .mentions("nope.txt");
}

// ---- show ----

#[test]
fn show_describes_a_layer() {
    let env = Env::new();
    let d = sample(&env, "a");
    env.ci(["store", "ref", "set", "main", &d]).success();
    let out = env.ci(["store", "show", &d]).success();
    let text = out.stdout_str();
    for needle in [
        format!("layer     {d}"),
        "size      ".to_owned(),
        "files     6".to_owned(),
        "dirs      5".to_owned(),
        "symlinks  3".to_owned(),
        "created   20".to_owned(),
        "how       add".to_owned(),
        "refs      main".to_owned(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
    let json = env.ci(["--json", "store", "show", "main"]).success().json();
    assert_eq!(json["layer"], d);
    assert_eq!(json["stats"]["files"], 6);
    assert_eq!(json["stats"]["bytes"], 9 + 6 + 19 + 14 + 5);
    assert_eq!(json["lineage"]["how"], "add");
    assert_eq!(json["refs"][0], "main");
    assert!(json["created"].as_u64().unwrap() > 1_700_000_000);
}

#[test]
fn show_a_subtree_not_recorded_as_a_layer() {
    let env = Env::new();
    let d = sample(&env, "a");
    let rows = env.ci(["--json", "store", "ls", &d]).success().json();
    let src = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "src")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.ci(["store", "show", &src]).success();
    assert!(
        out.stdout_str().contains("files     3"),
        "{}",
        out.stdout_str()
    );
    assert!(
        out.stdout_str().contains("not recorded"),
        "{}",
        out.stdout_str()
    );
}

// ---- diff ----

#[test]
fn diff_lists_changes() {
    let env = Env::new();
    let a = sample(&env, "a");
    sample_tree(&env.path("b"));
    let b = env.path("b");
    write(&b, "hello.txt", "hello, world\n");
    fs::remove_file(b.join("README.md")).unwrap();
    write(&b, "new.txt", "new\n");
    fs::remove_file(b.join("link-to-hello")).unwrap();
    write(&b, "link-to-hello", "now a file\n");
    write(&b, "newdir/x", "x\n");
    fs::remove_dir(b.join("empty-dir")).unwrap();
    set_executable(&b, "src/lib.rs", true);
    let b = env.add("b");

    let out = env.ci(["store", "diff", &a, &b]).success();
    assert_eq!(
        out.stdout_str(),
        "\
D README.md
D empty-dir/
M hello.txt
T link-to-hello
A new.txt
A newdir/
M src/lib.rs
"
    );
    assert_eq!(env.ci(["store", "diff", &a, &a]).success().stdout_str(), "");
    let back = env.ci(["store", "diff", &b, &a]).success().lines();
    assert_eq!(back[0], "A README.md");

    let rows = env.ci(["--json", "store", "diff", &a, &b]).success().json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[1]["path"], "empty-dir");
    assert_eq!(rows[1]["change"], "removed");
    assert_eq!(rows[1]["old_kind"], "dir");
    assert_eq!(rows[3]["change"], "type_changed");
    assert_eq!(rows[3]["old_kind"], "symlink");
    assert_eq!(rows[3]["new_kind"], "file");
}

// ---- checkout ----

#[test]
fn checkout_round_trip() {
    let env = Env::new();
    let d = sample(&env, "a");
    env.ci(["store", "checkout", &d, "out"]).success();
    assert_same_tree(&env.path("a"), &env.path("out"));
    assert_mtimes(&env.path("out"), 1);
    let mode = fs::metadata(env.path("out/bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let mode = fs::metadata(env.path("out/hello.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    // Adding the checkout gives the same layer.
    assert_eq!(env.add("out"), d);

    // Into an existing empty directory.
    mkdir(env.work(), "empty");
    env.ci(["store", "checkout", &d, "empty"]).success();
    assert_same_tree(&env.path("a"), &env.path("empty"));

    // Never over existing files.
    env.ci(["store", "checkout", &d, "out"])
        .failure(2)
        .mentions("not empty");
    env.ci(["store", "checkout", &d, "a/hello.txt"]).failure(2);
    assert_eq!(fs::read(env.path("a/hello.txt")).unwrap(), b"hello\n");
}

#[test]
fn checkout_json_report() {
    let env = Env::new();
    let d = sample(&env, "a");
    let report = env
        .ci(["--json", "store", "checkout", &d, "out"])
        .success()
        .json();
    assert_eq!(report["files"], 6);
    assert_eq!(report["symlinks"], 3);
}

// ---- export / import ----

#[test]
fn export_import_round_trip() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    write(&env.path("a"), "big.bin", pseudo_random(3, 2 << 20));
    let d = env.add("a");

    env.ci(["store", "export", &d, "-o", "one.tar.zst"])
        .success();
    env.ci(["store", "export", &d[..12], "--output", "two.tar.zst"])
        .success();
    let one = fs::read(env.path("one.tar.zst")).unwrap();
    let two = fs::read(env.path("two.tar.zst")).unwrap();
    assert!(!one.is_empty());
    assert!(one == two, "two exports of one layer differ");
    assert!(!env.path("one.tar.zst.tmp").exists());

    // The archive to stdout is the same bytes.
    let stdout = env.ci(["store", "export", &d, "-o", "-"]).success();
    assert!(stdout.stdout() == one.as_slice());

    // Into a second store: same digest, same export.
    let other = env.root().join("other-store");
    let other = other.to_str().unwrap();
    let imported = env
        .ci([
            "--store",
            other,
            "store",
            "import",
            "one.tar.zst",
            "--ref",
            "imported",
        ])
        .success()
        .digest();
    assert_eq!(imported, d);
    env.ci([
        "--store",
        other,
        "store",
        "export",
        "imported",
        "-o",
        "three.tar.zst",
    ])
    .success();
    assert!(fs::read(env.path("three.tar.zst")).unwrap() == one);
    env.ci(["--store", other, "store", "verify"]).success();
    env.ci(["--store", other, "store", "checkout", "imported", "out"])
        .success();
    assert_same_tree(&env.path("a"), &env.path("out"));

    // From stdin, into a third store.
    let third = env.root().join("third-store");
    let third = third.to_str().unwrap();
    let from_stdin = env
        .ci_stdin(["--store", third, "store", "import", "-"], &one)
        .success()
        .digest();
    assert_eq!(from_stdin, d);
}

#[test]
fn export_import_json() {
    let env = Env::new();
    let d = sample(&env, "a");
    let report = env
        .ci(["--json", "store", "export", &d, "-o", "a.tar.zst"])
        .success()
        .json();
    assert!(report["entries"].as_u64().unwrap() >= 14, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0);
    let other = env.root().join("other");
    let report = env
        .ci([
            "--json",
            "--store",
            other.to_str().unwrap(),
            "store",
            "import",
            "a.tar.zst",
        ])
        .success()
        .json();
    assert_eq!(report["layer"], d);
    assert_eq!(report["stats"]["files"], 6);
    assert_eq!(report["new_blobs"], 6);
    env.ci(["--json", "store", "export", &d, "-o", "-"])
        .failure(2);
}

#[test]
fn import_refuses_bad_archives() {
    let env = Env::new();
    let d = sample(&env, "a");
    write(env.work(), "garbage.tar.zst", pseudo_random(1, 10_000));
    env.ci(["store", "import", "garbage.tar.zst"])
        .failure(2)
        .mentions("garbage.tar.zst");
    env.ci(["store", "import", "missing.tar.zst"])
        .failure(2)
        .mentions("missing.tar.zst");

    // A truncated archive is refused whole and leaves the store as it was.
    env.ci(["store", "export", &d, "-o", "a.tar.zst"]).success();
    let full = fs::read(env.path("a.tar.zst")).unwrap();
    write(env.work(), "cut.tar.zst", &full[..full.len() / 2]);
    let other = env.root().join("other");
    let other = other.to_str().unwrap();
    env.ci(["--store", other, "store", "import", "cut.tar.zst"])
        .failure(2);
    env.ci(["--store", other, "store", "ls", &d]).failure(2);
    env.ci(["--store", other, "store", "verify"]).success();
    env.ci_stdin(["store", "import", "-"], b"").failure(2);
}

/// The archive of layer `d`, as `-o -` writes it.
fn archive_of(env: &Env, d: &str) -> Vec<u8> {
    env.ci(["store", "export", d, "-o", "-"])
        .success()
        .stdout()
        .to_vec()
}

#[test]
fn export_streams_into_a_fifo() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::new();
    let d = sample(&env, "a");
    let want = archive_of(&env, &d);
    mkfifo(env.work(), "pipe");
    let pipe = env.path("pipe");
    // Held open for writing too, so that the reader's open never waits and
    // its end of file comes only once this is dropped: a `ci` that never
    // writes into the FIFO makes the test fail, not hang.
    let keeper = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pipe)
        .unwrap();
    let reader = {
        let pipe = pipe.clone();
        std::thread::spawn(move || fs::read(pipe).unwrap())
    };
    env.ci(["store", "export", &d, "-o", "pipe"]).success();
    drop(keeper);
    let got = reader.join().unwrap();
    assert!(
        got == want,
        "the FIFO carried {} bytes, not the {} of the archive",
        got.len(),
        want.len()
    );
    assert!(
        fs::symlink_metadata(&pipe).unwrap().file_type().is_fifo(),
        "the FIFO is still a FIFO"
    );
}

#[test]
fn export_to_a_full_device_fails_with_its_error() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let env = Env::new();
    let d = sample(&env, "a");
    let full = std::path::Path::new("/dev/full");
    let before = fs::symlink_metadata(full).expect("this machine has /dev/full");
    assert!(before.file_type().is_char_device());
    env.ci(["store", "export", &d, "-o", "/dev/full"])
        .failure(3)
        .mentions("/dev/full")
        .mentions("No space left on device");
    let after = fs::symlink_metadata(full).unwrap();
    assert!(
        after.file_type().is_char_device() && after.rdev() == before.rdev(),
        "/dev/full is still the device"
    );
    assert!(
        fs::read_dir("/dev").unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".full")),
        "nothing staged beside the device"
    );
}

#[test]
fn export_through_a_symlink_writes_its_target() {
    let env = Env::new();
    let d = sample(&env, "a");
    let want = archive_of(&env, &d);
    write(env.work(), "real.tar.zst", "old contents");
    symlink(env.work(), "link.tar.zst", "real.tar.zst");
    env.ci(["store", "export", &d, "-o", "link.tar.zst"])
        .success();
    let link = fs::symlink_metadata(env.path("link.tar.zst")).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "the symlink is still a symlink"
    );
    assert_eq!(
        fs::read_link(env.path("link.tar.zst")).unwrap(),
        std::path::Path::new("real.tar.zst")
    );
    assert!(fs::read(env.path("real.tar.zst")).unwrap() == want);
    // A dangling symlink: its target is created.
    symlink(env.work(), "dangling.tar.zst", "made.tar.zst");
    env.ci(["store", "export", &d, "-o", "dangling.tar.zst"])
        .success();
    assert!(fs::symlink_metadata(env.path("dangling.tar.zst"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read(env.path("made.tar.zst")).unwrap() == want);
}

#[test]
fn export_replaces_a_regular_file_atomically() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let d = sample(&env, "a");
    let want = archive_of(&env, &d);
    fs::create_dir(env.path("out")).unwrap();
    write(&env.path("out"), "a.tar.zst", "old contents");
    fs::set_permissions(env.path("out/a.tar.zst"), fs::Permissions::from_mode(0o640)).unwrap();
    // A second name for the old file: replaced, not rewritten, it keeps
    // the old bytes.
    fs::hard_link(env.path("out/a.tar.zst"), env.path("out/old")).unwrap();
    let old_ino = fs::metadata(env.path("out/a.tar.zst")).unwrap().ino();
    env.ci(["store", "export", &d, "-o", "out/a.tar.zst"])
        .success();
    let new = fs::metadata(env.path("out/a.tar.zst")).unwrap();
    assert!(fs::read(env.path("out/a.tar.zst")).unwrap() == want);
    assert_ne!(new.ino(), old_ino, "a new file renamed into place");
    assert_eq!(new.permissions().mode() & 0o777, 0o640, "the mode is kept");
    assert_eq!(fs::read(env.path("out/old")).unwrap(), b"old contents");
    let mut names: Vec<String> = fs::read_dir(env.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.tar.zst", "old"], "nothing left beside it");
    // A directory is not replaced.
    env.ci(["store", "export", &d, "-o", "out"])
        .failure(2)
        .mentions("directory");
    assert!(env.path("out").is_dir());
}

// ---- resolving layers ----

#[test]
fn layers_resolve_by_prefix_ref_or_digest() {
    let env = Env::new();
    let d = sample(&env, "a");
    let ls = env.ci(["store", "ls", &d]).success().stdout_str();
    assert_eq!(env.ci(["store", "ls", &d[..8]]).success().stdout_str(), ls);
    assert_eq!(
        env.ci(["store", "ls", &d[..20].to_uppercase()])
            .success()
            .stdout_str(),
        ls
    );

    env.ci(["store", "ls", &d[..7]])
        .failure(2)
        .mentions(&d[..7]);
    // A prefix of nothing stored.
    let flipped = format!("{}{}", if d.starts_with('0') { '1' } else { '0' }, &d[1..8]);
    env.ci(["store", "ls", &flipped])
        .failure(2)
        .mentions(&flipped);
    let full = format!("{}{}", if d.starts_with('f') { 'e' } else { 'f' }, &d[1..]);
    env.ci(["store", "show", &full]).failure(2);
    env.ci(["store", "ls", "no-such-ref"])
        .failure(2)
        .mentions("no-such-ref");
    env.ci(["store", "diff", &d, "zzzzzzzzzz"]).failure(2);
}

// ---- refs ----

#[test]
fn refs_set_list_remove() {
    let env = Env::new();
    let a = sample(&env, "a");
    write(env.work(), "b/only.txt", "b\n");
    let b = env
        .ci(["store", "add", "--ref", "release/1.0", "b"])
        .success()
        .digest();

    env.ci(["store", "ref", "set", "main", &a[..10]]).success();
    assert_eq!(
        env.ci(["store", "ref", "ls"]).success().stdout_str(),
        format!("main {a}\nrelease/1.0 {b}\n")
    );
    let json = env.ci(["--json", "store", "ref", "ls"]).success().json();
    assert_eq!(json[0]["name"], "main");
    assert_eq!(json[0]["layer"], a);

    // Moving a ref, using refs as layers.
    env.ci(["store", "ref", "set", "main", "release/1.0"])
        .success();
    assert_eq!(
        env.ci(["store", "cat", "main", "only.txt"])
            .success()
            .stdout(),
        b"b\n"
    );

    env.ci(["store", "ref", "rm", "main"]).success();
    assert_eq!(
        env.ci(["store", "ref", "ls"]).success().stdout_str(),
        format!("release/1.0 {b}\n")
    );
    env.ci(["store", "ref", "rm", "main"])
        .failure(2)
        .mentions("main");
    env.ci(["store", "ref", "set", "bad name", &a])
        .failure(2)
        .mentions("bad name");
    env.ci(["store", "ref", "set", "deadbeef00", &a]).failure(2);
    env.ci(["store", "ref", "set", "x", "unknown-layer"])
        .failure(2);
    env.ci(["store", "add", "--ref", "-bad", "a"]).failure(2);
}

// ---- gc ----

#[test]
fn gc_frees_unreferenced_layers_only() {
    let env = Env::new();
    let kept = sample(&env, "a");
    env.ci(["store", "ref", "set", "keep", &kept]).success();
    write(env.work(), "junk/unique.txt", "only in the junk layer\n");
    let junk = env.add("junk");
    let unique_blob = Digest::of(b"only in the junk layer\n").to_hex();
    let blob_path = env
        .store()
        .join("blobs")
        .join(&unique_blob[..2])
        .join(&unique_blob[2..]);
    assert!(blob_path.exists());

    let dry = env
        .ci(["--json", "store", "gc", "--dry-run"])
        .success()
        .json();
    assert!(dry["layers_freed"].as_u64().unwrap() >= 1, "{dry}");
    assert!(blob_path.exists(), "a dry run deletes nothing");
    env.ci(["store", "ls", &junk]).success();

    let out = env.ci(["store", "gc", "--keep-runs", "3"]).success();
    assert!(
        out.stdout_str().starts_with("freed 1 layers"),
        "{}",
        out.stdout_str()
    );
    assert!(!blob_path.exists());
    env.ci(["store", "ls", &junk]).failure(2);
    env.ci(["store", "cat", "keep", "hello.txt"]).success();
    env.ci(["store", "verify"]).success();

    let again = env.ci(["--json", "store", "gc"]).success().json();
    assert_eq!(again["layers_freed"], 0);
    assert_eq!(again["blobs_freed"], 0);
    assert!(again["blobs_kept"].as_u64().unwrap() >= 5);
}

// ---- verify ----

#[test]
fn verify_finds_a_corrupt_blob() {
    let env = Env::new();
    sample(&env, "a");
    let out = env.ci(["store", "verify"]).success();
    assert!(out.stdout_str().starts_with("ok: "), "{}", out.stdout_str());
    assert!(out.stdout_str().contains("blobs,") && out.stdout_str().contains("trees checked"));
    let json = env.ci(["--json", "store", "verify"]).success().json();
    assert_eq!(json["problems"].as_array().unwrap().len(), 0);

    let hex = Digest::of(b"hello\n").to_hex();
    let path = env.store().join("blobs").join(&hex[..2]).join(&hex[2..]);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 0x20;
    fs::write(&path, bytes).unwrap();

    env.ci(["store", "verify"]).failure(1).mentions(&hex[..12]);
    let json = env.ci(["--json", "store", "verify"]).failure(1).json();
    let problems = json["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{json}");
    assert!(
        problems[0]["detail"].as_str().unwrap().contains(&hex[..12]),
        "{json}"
    );
}

#[test]
fn verify_finds_a_missing_blob() {
    let env = Env::new();
    sample(&env, "a");
    let hex = Digest::of(b"hello\n").to_hex();
    fs::remove_file(env.store().join("blobs").join(&hex[..2]).join(&hex[2..])).unwrap();
    env.ci(["store", "verify"]).failure(1).mentions(&hex[..12]);
}

// ---- du ----

#[test]
fn du_reports_usage() {
    let env = Env::new();
    sample(&env, "a");
    write(env.work(), "b/x", "x");
    let b = env.add("b");
    env.ci(["store", "ref", "set", "b", &b]).success();
    let out = env.ci(["store", "du"]).success();
    assert!(
        out.stdout_str().starts_with("blobs "),
        "{}",
        out.stdout_str()
    );
    let u = env.ci(["--json", "store", "du"]).success().json();
    assert_eq!(u["layers"], 2);
    assert_eq!(u["refs"], 1);
    // hello, README, run.sh, lib.rs, file.bin, the empty file, x.
    assert_eq!(u["blobs"], 7);
    assert_eq!(u["blob_bytes"], 9 + 6 + 19 + 14 + 5 + 1);
    assert!(u["trees"].as_u64().unwrap() >= 6);
}

// ---- bad input ----

#[test]
fn bad_input_exits_2_without_panicking() {
    let env = Env::new();
    env.ci(["store", "add", "does-not-exist"])
        .failure(2)
        .mentions("does-not-exist");
    write(env.work(), "plain.txt", "x");
    env.ci(["store", "add", "plain.txt"])
        .failure(2)
        .mentions("plain.txt");

    write(env.work(), "t/ok.txt", "fine\n");
    mkfifo(&env.path("t"), "pipe");
    let out = env.ci(["store", "add", "t"]).failure(2).mentions("pipe");
    assert!(out.stderr_str().contains("FIFO"), "{}", out.stderr_str());
    // …and leaving it out works.
    env.ci(["store", "add", "--exclude", "pipe", "t"])
        .success()
        .digest();

    env.ci(["store", "add", "--exclude", "[", "t"]).failure(2);
    env.ci(["store", "ls", "no-such-ref"])
        .failure(2)
        .mentions("no-such-ref");
    env.ci(["store", "frobnicate"]).failure(2);
    env.ci(["store", "gc", "--keep-runs", "many"]).failure(2);
}

#[test]
fn missing_or_foreign_store_is_a_usage_error() {
    let env = Env::new();
    // No store yet: read-only commands say how to make one.
    env.ci(["store", "ls", "main"])
        .failure(2)
        .mentions("ci store add");
    env.ci(["store", "verify"]).failure(2);
    assert!(
        !env.store().exists(),
        "a read-only command created the store"
    );

    // A directory with other things in it is not taken over.
    write(env.root(), "not-a-store/precious.txt", "keep me");
    let foreign = env.root().join("not-a-store");
    sample_tree(&env.path("a"));
    env.ci(["--store", foreign.to_str().unwrap(), "store", "add", "a"])
        .failure(2)
        .mentions("not-a-store");
    assert_eq!(fs::read_dir(&foreign).unwrap().count(), 1);
}

#[test]
fn broken_pipe_is_not_an_error() {
    let env = Env::new();
    sample_tree(&env.path("a"));
    write(&env.path("a"), "big.bin", pseudo_random(9, 4 << 20));
    let d = env.add("a");
    let mut cmd = env.command(["store", "cat", &d, "big.bin"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Read nothing and close the pipe: `ci store cat … | head -c 0`.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
