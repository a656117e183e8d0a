//! LayerFs against real FUSE mounts: every fixture equals its checkout, big
//! files and big directories, concurrency, unmounting while busy, tracing,
//! stale mounts of a killed process, an ordinary user through fusermount3,
//! and FUSE passthrough (reads the kernel does itself) and its fallback.
//!
//! Under `CI=true` a machine without FUSE fails these tests.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use strata_fuse::{mount_layers, Error, Layers, MountOptions, ReadPath, PASSTHROUGH_ENV};
use strata_store::{Digest, Entry, Name, OpenMode, RelPath, Store, StoreUrl, Tree};

fn opts() -> MountOptions {
    MountOptions::default()
}

#[test]
fn every_fixture_mounts_like_its_checkout() {
    if !require_fuse("every_fixture_mounts_like_its_checkout") {
        return;
    }
    let t = TestStore::new();
    for (name, dir) in fixture_trees(&t.mkdir("fixtures")) {
        let layer = t.ingest(&dir);
        let checkout = t.path(&format!("checkout-{name}"));
        t.store.checkout(&layer, &checkout).expect("checkout");
        let mnt = t.mkdir(&format!("mnt-{name}"));
        let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount");
        assert_same_dirs(&checkout, &mnt, true);
        // The root too: a directory, 0755, root-owned, the fixed mtime.
        let meta = fs::metadata(&mnt).expect("stat the root");
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::os::unix::fs::MetadataExt::mtime(&meta),
            strata_store::FIXED_MTIME
        );
        // Read-only.
        let err = fs::write(mnt.join("new-file"), b"x").expect_err("the mount is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        m.unmount().expect("unmount");
        assert!(!is_mounted(&mnt), "{name}: still mounted");
    }
}

#[test]
fn named_layers_mount_as_one_directory_each() {
    if !require_fuse("named_layers_mount_as_one_directory_each") {
        return;
    }
    let t = TestStore::new();
    let fixtures = fixture_trees(&t.mkdir("fixtures"));
    let mut layers = Vec::new();
    for (name, dir) in &fixtures {
        layers.push((format!("out-{name}"), t.ingest(dir)));
    }
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::Named(layers.clone()), &mnt, &opts()).expect("mount");
    let mut listed: Vec<String> = fs::read_dir(&mnt)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = layers.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(listed, want);
    for ((_, dir), (name, _)) in fixtures.iter().zip(&layers) {
        assert_same_dirs(dir, &mnt.join(name), true);
    }
    m.unmount().expect("unmount");

    // Names with `/` nest; bad or clashing names are refused before
    // anything is mounted.
    let nested = Layers::Named(vec![
        ("app/web:build".into(), layers[1].1),
        ("app/web:test".into(), layers[2].1),
        (":root".into(), layers[1].1),
    ]);
    let m = mount_layers(&t.store, &nested, &mnt, &opts()).expect("mount nested names");
    assert_same_dirs(&fixtures[1].1, &mnt.join("app/web:build"), true);
    assert_same_dirs(&fixtures[2].1, &mnt.join("app/web:test"), true);
    assert_same_dirs(&fixtures[1].1, &mnt.join(":root"), true);
    m.unmount().expect("unmount");
    for bad in [
        vec![("a/../b".to_owned(), layers[0].1)],
        vec![("".to_owned(), layers[0].1)],
        vec![("x".to_owned(), layers[0].1), ("x".to_owned(), layers[1].1)],
        vec![
            ("x".to_owned(), layers[0].1),
            ("x/y".to_owned(), layers[1].1),
        ],
    ] {
        match mount_layers(&t.store, &Layers::Named(bad.clone()), &mnt, &opts()) {
            Err(Error::BadLayerName { .. }) => {}
            other => panic!("{bad:?}: expected a refusal, got {other:?}"),
        }
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn views_come_and_go_while_mounted() {
    if !require_fuse("views_come_and_go_while_mounted") {
        return;
    }
    let t = TestStore::new();
    let fixtures = fixture_trees(&t.mkdir("fixtures"));
    let layers: Vec<Digest> = fixtures.iter().map(|(_, d)| t.ingest(d)).collect();
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::Views, &mnt, &opts()).expect("mount views");
    // Tasks read small inputs through views: opens cost no request there.
    assert!(
        matches!(m.read_path(), ReadPath::Served(_)),
        "{:?}",
        m.read_path()
    );
    assert_eq!(fs::read_dir(&mnt).expect("list").count(), 0, "starts empty");
    // A name that is not served yet: the miss must not be cached.
    assert!(!mnt.join("v1").exists());

    let v1 = m
        .add_view(
            "v1",
            &Layers::Named(vec![("src".into(), layers[0]), ("lib".into(), layers[1])]),
        )
        .expect("add a named view");
    assert_eq!(v1, mnt.join("v1"));
    assert_same_dirs(&fixtures[0].1, &v1.join("src"), true);
    assert_same_dirs(&fixtures[1].1, &v1.join("lib"), true);
    let v2 = m
        .add_view("v2", &Layers::One(layers[2]))
        .expect("add a one-layer view");
    assert_same_dirs(&fixtures[2].1, &v2, true);
    let empty = m
        .add_view("v3", &Layers::Named(Vec::new()))
        .expect("an empty view");
    assert_eq!(fs::read_dir(&empty).expect("list").count(), 0);
    let mut listed: Vec<String> = fs::read_dir(&mnt)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, ["v1", "v2", "v3"]);
    let err = fs::write(v1.join("src/new"), b"x").expect_err("views are read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    m.remove_view("v1");
    let listed: Vec<String> = fs::read_dir(&mnt)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!listed.contains(&"v1".to_owned()), "{listed:?}");
    // A name is served once per mount; bad names and missing layers are refused.
    for (name, layers) in [
        ("v1", Layers::One(layers[0])),
        ("a/b", Layers::One(layers[0])),
        ("", Layers::One(layers[0])),
        ("v9", Layers::Views),
        ("v9", Layers::One(Digest::of(b"not a tree"))),
    ] {
        assert!(m.add_view(name, &layers).is_err(), "{name:?} was accepted");
    }
    m.unmount().expect("unmount");

    // A mount that does not serve views refuses them.
    let m = mount_layers(&t.store, &Layers::One(layers[0]), &mnt, &opts()).expect("mount");
    assert!(m.add_view("v1", &Layers::One(layers[1])).is_err());
    m.unmount().expect("unmount");
}

/// xorshift64*: deterministic offsets without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn a_4_gib_file_reads_right_at_any_offset() {
    if !require_fuse("a_4_gib_file_reads_right_at_any_offset") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    let path = src.join("huge.bin");
    let size: u64 = (4 << 30) + 12_345;
    {
        // Sparse, with distinct data around the interesting places
        // (the 4 GiB boundary is where 32-bit offsets would wrap).
        let f = fs::File::create(&path).expect("create");
        f.set_len(size).expect("set_len");
        let mut rng = Rng(0x5eed);
        for at in [
            0u64,
            4095,
            1 << 30,
            (2 << 30) - 7,
            (4 << 30) - 70_000,
            size - 100_000,
        ] {
            let block: Vec<u8> = (0..200_000).map(|_| rng.next() as u8).collect();
            let n = block.len().min((size - at) as usize);
            f.write_all_at(&block[..n], at).expect("write");
        }
    }
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount");
    let mounted = fs::File::open(mnt.join("huge.bin")).expect("open in the mount");
    assert_eq!(mounted.metadata().expect("stat").len(), size);
    let source = fs::File::open(&path).expect("open the source");
    let mut rng = Rng(42);
    let mut want = vec![0u8; 1 << 20];
    let mut got = vec![0u8; 1 << 20];
    let interesting = [
        0u64,
        4090,
        (1 << 30) - 10,
        (4 << 30) - 1,
        (4 << 30) - 65_536,
        size - 1,
        size - 1000,
    ];
    for i in 0..400 {
        let at = match interesting.get(i) {
            Some(a) => *a,
            None => rng.next() % size,
        };
        let len = (rng.next() % (1 << 20)) as usize + 1;
        let a = read_full_at(&source, &mut want[..len], at);
        let b = read_full_at(&mounted, &mut got[..len], at);
        assert_eq!(a, b, "length read at {at}");
        assert!(
            want[..a] == got[..b],
            "bytes at offset {at} (+{len}) differ"
        );
    }
    // Past the end: nothing.
    assert_eq!(
        mounted
            .read_at(&mut got[..10], size + 5)
            .expect("read past the end"),
        0
    );
    drop(mounted);
    m.unmount().expect("unmount");
}

fn read_full_at(f: &fs::File, buf: &mut [u8], at: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], at + done as u64).expect("read");
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

#[test]
fn a_directory_of_100_000_entries_lists_completely() {
    if !require_fuse("a_directory_of_100_000_entries_lists_completely") {
        return;
    }
    let t = TestStore::new();
    let blob = t.store.put_blob(b"x").expect("put a blob");
    let n = 100_000;
    let names: Vec<String> = (0..n).map(|i| format!("entry-{i:06}")).collect();
    let big = Tree::from_entries(
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let entry = if i % 1000 == 0 {
                    Entry::Dir {
                        digest: Tree::empty().digest(),
                    }
                } else {
                    Entry::File {
                        digest: blob,
                        size: 1,
                        executable: i % 7 == 0,
                    }
                };
                (Name::new(name.as_bytes()).expect("name"), entry)
            })
            .collect(),
    )
    .expect("tree");
    let big_digest = big.digest();
    let root = Tree::from_entries(vec![(
        Name::new("big").expect("name"),
        Entry::Dir { digest: big_digest },
    )])
    .expect("tree");
    let root_digest = root.digest();
    t.store
        .put_trees([Tree::empty(), big, root])
        .expect("put trees");

    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::One(root_digest), &mnt, &opts()).expect("mount");
    let dir = mnt.join("big");
    let mut listed: Vec<String> = fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(listed.len(), n, "entries listed");
    listed.sort();
    assert_eq!(listed, names);
    // 2 + the 100 sub-directories.
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&fs::metadata(&dir).expect("stat")),
        102
    );

    // Resuming from an offset (telldir/seekdir) gives the same entries again.
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: plain libc directory calls on a handle we own and close.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null(), "opendir");
        for _ in 0..54_321 {
            assert!(!libc::readdir(d).is_null());
        }
        let pos = libc::telldir(d);
        let first: Vec<Vec<u8>> = (0..100)
            .map(|_| {
                std::ffi::CStr::from_ptr((*libc::readdir(d)).d_name.as_ptr())
                    .to_bytes()
                    .to_vec()
            })
            .collect();
        libc::seekdir(d, pos);
        let again: Vec<Vec<u8>> = (0..100)
            .map(|_| {
                std::ffi::CStr::from_ptr((*libc::readdir(d)).d_name.as_ptr())
                    .to_bytes()
                    .to_vec()
            })
            .collect();
        libc::closedir(d);
        assert_eq!(first, again);
    }
    m.unmount().expect("unmount");
}

#[test]
fn concurrent_readers_see_the_same_bytes() {
    if !require_fuse("concurrent_readers_see_the_same_bytes") {
        return;
    }
    let t = TestStore::new();
    let fixtures = fixture_trees(&t.mkdir("fixtures"));
    let (_, sizes) = fixtures
        .iter()
        .find(|(n, _)| n == "sizes")
        .expect("sizes fixture");
    let (_, wide) = fixtures
        .iter()
        .find(|(n, _)| n == "wide")
        .expect("wide fixture");
    let layers = vec![
        ("sizes".to_owned(), t.ingest(sizes)),
        ("wide".to_owned(), t.ingest(wide)),
    ];
    let expected_sizes = walk(sizes, false);
    let expected_wide = walk(wide, false);
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::Named(layers), &mnt, &opts()).expect("mount");
    std::thread::scope(|s| {
        for i in 0..8 {
            let mnt = &mnt;
            let (es, ew) = (&expected_sizes, &expected_wide);
            s.spawn(move || {
                // Half start on each tree, so first reads race each other.
                let order = if i % 2 == 0 {
                    ["sizes", "wide"]
                } else {
                    ["wide", "sizes"]
                };
                for name in order {
                    let got = walk(&mnt.join(name), true);
                    assert_eq!(
                        &got,
                        if name == "sizes" { es } else { ew },
                        "reader {i}, {name}"
                    );
                }
            });
        }
    });
    m.unmount().expect("unmount");
}

#[test]
fn unmounting_with_a_file_open_does_not_hang() {
    if !require_fuse("unmounting_with_a_file_open_does_not_hang") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("f"), &vec![7u8; 3 << 20]);
    fs::create_dir(src.join("d")).expect("mkdir");
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount");
    let mut f = fs::File::open(mnt.join("f")).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact(&mut buf).expect("read");
    // A second user: a process whose working directory is inside.
    let mut sleeper = Command::new("sleep")
        .arg("600")
        .current_dir(mnt.join("d"))
        .spawn()
        .expect("start a process inside the mount");

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(m.unmount().map_err(|e| e.to_string()));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("unmount hung with a file open");
    res.expect("unmount");
    assert!(!is_mounted(&mnt), "still mounted");
    // The open file now fails or serves cached pages; it never hangs.
    let _ = f.read(&mut buf);
    drop(f);
    sleeper.kill().expect("kill");
    sleeper.wait().expect("wait");
    // The mount point is usable again.
    let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount again");
    assert_eq!(fs::read(mnt.join("f")).expect("read").len(), 3 << 20);
    drop(m);
    assert!(!is_mounted(&mnt), "dropping the handle unmounts");
}

#[test]
fn tracing_records_what_was_used() {
    if !require_fuse("tracing_records_what_was_used") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("read-me"), b"r");
    write(&src.join("stat-me"), b"s");
    write(&src.join("ignore-me"), b"i");
    write(&src.join("list-me/a"), b"a");
    write(&src.join("untouched/b"), b"b");
    symlink("read-me", &src.join("link"));
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let traced = MountOptions {
        trace: true,
        ..MountOptions::default()
    };
    let m = mount_layers(
        &t.store,
        &Layers::Named(vec![("in".into(), layer), ("other".into(), layer)]),
        &mnt,
        &traced,
    )
    .expect("mount");
    fs::read(mnt.join("in/read-me")).expect("read");
    fs::metadata(mnt.join("in/stat-me")).expect("stat");
    fs::read_dir(mnt.join("in/list-me"))
        .expect("list")
        .for_each(drop);
    fs::read_link(mnt.join("in/link")).expect("readlink");
    let trace = m.trace().expect("a trace");
    let p = |s: &str| RelPath::parse(s.as_bytes()).expect("path");
    assert!(trace.get(&p("in/read-me")).expect("read-me traced").read);
    let stat = trace.get(&p("in/stat-me")).expect("stat-me traced");
    assert!(stat.looked_up && !stat.read);
    assert!(trace.get(&p("in/list-me")).expect("list-me traced").listed);
    assert!(trace.get(&p("in/link")).expect("link traced").read);
    assert!(trace.get(&p("in/ignore-me")).is_none());
    assert!(trace.get(&p("in/untouched")).is_none());
    assert!(trace.used_below(&p("in")));
    assert!(!trace.used_below(&p("other")));
    m.unmount().expect("unmount");

    let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount");
    assert!(m.trace().is_none(), "untraced mounts have no trace");
}

#[test]
fn mounting_refuses_bad_mountpoints() {
    if !require_fuse("mounting_refuses_bad_mountpoints") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("f"), b"f");
    let layer = t.ingest(&src);
    let full = t.mkdir("full");
    write(&full.join("x"), b"x");
    for (path, what) in [
        (full.clone(), "not empty"),
        (t.path("missing"), "does not exist"),
        (full.join("x"), "not a directory"),
    ] {
        match mount_layers(&t.store, &Layers::One(layer), &path, &opts()) {
            Err(Error::BadMountpoint { reason, .. }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{}: expected a refusal, got {other:?}", path.display()),
        }
    }
    let missing = Digest::of(b"no such tree");
    assert!(matches!(
        mount_layers(&t.store, &Layers::One(missing), &t.mkdir("empty"), &opts()),
        Err(Error::Store(strata_store::Error::MissingTree(_)))
    ));
}

/// Child side of the helper tests; does nothing unless the parent set
/// `STRATA_FUSE_HELPER`.
#[test]
fn helper_process() {
    let Ok(spec) = std::env::var("STRATA_FUSE_HELPER") else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let (mode, store_dir, layer, mnt) = (parts[0], parts[1], parts[2], Path::new(parts[3]));
    let store = Store::open(
        &StoreUrl::Local(PathBuf::from(store_dir)),
        OpenMode::Read,
        &mut |_| {},
    )
    .expect("open the store read-only");
    let layer: Digest = layer.parse().expect("digest");
    let m = mount_layers(&store, &Layers::One(layer), mnt, &MountOptions::default())
        .expect("helper: mount");
    match mode {
        "hang" => {
            say("ready");
            loop {
                std::thread::park();
            }
        }
        "served" => {
            // The parent set CI_FUSE_PASSTHROUGH=0.
            let path = m.read_path();
            assert_eq!(path, ReadPath::Served(format!("{PASSTHROUGH_ENV}=0")));
            let content = fs::read(mnt.join("big.bin")).expect("read through a served mount");
            assert!(m.read_requests() > 0, "reads are requests when served");
            say(&format!("blake3={}", blake3::hash(&content).to_hex()));
            m.unmount().expect("unmount");
            say("ok");
        }
        "user" => {
            assert!(
                !m.privileged(),
                "an ordinary user mounts through fusermount3"
            );
            // No CAP_SYS_ADMIN: the probe is refused, reads are served.
            let path = m.read_path();
            assert!(
                matches!(&path, ReadPath::Served(why) if why.contains("CAP_SYS_ADMIN")),
                "{path:?}"
            );
            let content = fs::read(mnt.join("hello.txt")).expect("read through the user's mount");
            assert_eq!(content, b"hello\n");
            assert!(m.read_requests() > 0, "served reads are requests");
            say(&format!("allow_other={}", m.allow_other()));
            m.unmount().expect("unmount as a user");
            say("ok");
        }
        _ => panic!("unknown helper mode {mode}"),
    }
}

fn helper(mode: &str, exe: &Path, store: &Path, layer: &Digest, mnt: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_process", "--test-threads=1"])
        .env(
            "STRATA_FUSE_HELPER",
            format!("{mode}|{}|{layer}|{}", store.display(), mnt.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

#[test]
fn a_killed_server_leaves_a_stale_mount_that_is_reported_and_cleaned() {
    if !require_fuse("a_killed_server_leaves_a_stale_mount_that_is_reported_and_cleaned") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("hello.txt"), b"hello\n");
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = KillOnDrop(
        helper("hang", &exe, &t.store_path(), &layer, &mnt)
            .spawn()
            .expect("start the helper"),
    );
    let out = child.0.stdout.take().expect("stdout");
    let ready = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| heard(&l) == Some("ready"));
    assert!(ready, "the helper did not mount");
    assert_eq!(fs::read(mnt.join("hello.txt")).expect("read"), b"hello\n");
    child.0.kill().expect("kill -9 the helper");
    child.0.wait().expect("wait");
    let pid = child.0.id();

    // The mount point is now dead: using it says so, with the cure.
    match mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()) {
        Err(e @ Error::StaleMount { .. }) => assert!(e.to_string().contains("ci umount"), "{e}"),
        other => panic!("expected a stale-mount error, got {other:?}"),
    }
    let cleaned = strata_fuse::cleanup_stale().expect("cleanup");
    let mine = cleaned
        .iter()
        .find(|c| c.pid == pid)
        .unwrap_or_else(|| panic!("the dead helper's mount was not cleaned: {cleaned:?}"));
    assert_eq!(mine.unmounted, vec![mnt.clone()]);
    assert!(mine.to_string().contains("died"), "{mine}");
    assert!(!is_mounted(&mnt));
    // And it works again.
    let m =
        mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount after cleanup");
    assert_eq!(fs::read(mnt.join("hello.txt")).expect("read"), b"hello\n");
    m.unmount().expect("unmount");
}

#[test]
fn an_ordinary_user_mounts_through_fusermount3() {
    if !require_fuse("an_ordinary_user_mounts_through_fusermount3") {
        return;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Already an ordinary user: the other tests covered this path.
        return;
    }
    const NOBODY: u32 = 65534;
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("hello.txt"), b"hello\n");
    let layer = t.ingest(&src);
    // `nobody` must be able to reach the store, the binary and the mount point.
    for p in [t.dir.path().to_path_buf(), t.store_path()] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let exe = t.path("test-binary");
    fs::copy(std::env::current_exe().expect("test binary"), &exe).expect("copy the test binary");
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).expect("chmod");
    let mnt = t.mkdir("user-mnt");
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid path; chown has no other preconditions.
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) },
        0,
        "chown"
    );
    // Distributions make /dev/fuse 0666 (fusermount3 opens it with the
    // user's rights); a machine that restricts it to root gets that mode
    // for the length of this test.
    let dev_mode = fs::metadata("/dev/fuse")
        .expect("stat /dev/fuse")
        .permissions()
        .mode();
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
        }
    }
    let _restore = (dev_mode & 0o006 != 0o006).then(|| {
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/fuse");
        Restore(dev_mode & 0o7777)
    });
    let mut cmd = helper("user", &exe, &t.store_path(), &layer, &mnt);
    std::os::unix::process::CommandExt::uid(&mut cmd, NOBODY);
    std::os::unix::process::CommandExt::gid(&mut cmd, NOBODY);
    cmd.env_remove("XDG_RUNTIME_DIR")
        .env("HOME", "/nonexistent");
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .expect("run the helper as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| heard(l) == Some("ok")),
        "helper as nobody failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // allow_other only where /etc/fuse.conf permits it.
    let permitted = fs::read_to_string("/etc/fuse.conf")
        .map(|s| s.lines().any(|l| l.trim() == "user_allow_other"))
        .unwrap_or(false);
    assert!(
        stdout.contains(&format!("allow_other={permitted}")),
        "{stdout}"
    );
    assert!(!is_mounted(&mnt));
}

/// Files of every interesting size, written to `src`; returns their names
/// and contents.
fn passthrough_files(src: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Rng(0xb10b);
    let mut bytes = |n: usize| (0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>();
    let files = vec![
        ("big.bin", bytes((48 << 20) + 4097)),
        ("odd.bin", bytes(300_001)),
        ("small.txt", b"hello\n".to_vec()),
        ("empty", Vec::new()),
    ];
    for (name, content) in &files {
        write(&src.join(name), content);
    }
    files
}

/// The backing ids held once the kernel has sent every release queued so
/// far: the lookup of a name never seen is answered after them (one
/// session thread, requests in order).
fn backing_ids_settled(m: &strata_fuse::MountHandle, probe: &str) -> usize {
    let _ = fs::metadata(m.mountpoint().join(probe));
    m.backing_ids()
}

#[test]
fn passthrough_reads_make_no_requests_and_give_the_right_bytes() {
    if !require_fuse("passthrough_reads_make_no_requests_and_give_the_right_bytes") {
        return;
    }
    assert!(
        std::env::var_os(PASSTHROUGH_ENV).is_none(),
        "unset {PASSTHROUGH_ENV} to run this test"
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "FUSE passthrough needs CAP_SYS_ADMIN: run the FUSE tests as root (`./scripts/test` does)"
    );
    let t = TestStore::new();
    let src = t.mkdir("src");
    let files = passthrough_files(&src);
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let m = mount_layers(&t.store, &Layers::One(layer), &mnt, &opts()).expect("mount");
    assert_eq!(
        m.read_path(),
        ReadPath::Passthrough,
        "this kernel (6.9+) passes reads through"
    );

    for (name, want) in &files {
        assert!(
            fs::read(mnt.join(name)).expect("read") == *want,
            "{name} reads whole"
        );
    }
    let big = &files[0].1;
    let f = fs::File::open(mnt.join("big.bin")).expect("open");
    let again = fs::File::open(mnt.join("big.bin")).expect("open again");
    let small = fs::File::open(mnt.join("small.txt")).expect("open small");
    assert_eq!(
        m.backing_ids(),
        2,
        "one backing id per open inode, shared by its opens"
    );
    let mut buf = vec![0u8; 1 << 20];
    for at in [
        0u64,
        1,
        4095,
        4096,
        1 << 20,
        (big.len() - 1) as u64,
        (big.len() - 70_000) as u64,
    ] {
        let n = read_full_at(&again, &mut buf, at);
        let end = (at as usize + buf.len()).min(big.len());
        assert_eq!(n, end - at as usize, "length read at {at}");
        assert!(buf[..n] == big[at as usize..end], "bytes at {at}");
    }
    assert_eq!(
        f.read_at(&mut buf[..10], big.len() as u64 + 3)
            .expect("read past the end"),
        0
    );
    let mut s = String::new();
    (&small).read_to_string(&mut s).expect("read small");
    assert_eq!(s, "hello\n");
    assert_eq!(m.read_requests(), 0, "the kernel read every file itself");

    drop((f, small));
    assert_eq!(
        backing_ids_settled(&m, "nothing-1"),
        1,
        "big.bin is still open once"
    );
    drop(again);
    assert_eq!(
        backing_ids_settled(&m, "nothing-2"),
        0,
        "the last release closes the backing id"
    );
    assert!(m.last_error().is_none(), "{:?}", m.last_error());
    m.unmount().expect("unmount");
}

#[test]
fn with_passthrough_off_every_read_is_served_by_layerfs() {
    if !require_fuse("with_passthrough_off_every_read_is_served_by_layerfs") {
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    let files = passthrough_files(&src);
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let exe = std::env::current_exe().expect("test binary");
    let out = helper("served", &exe, &t.store_path(), &layer, &mnt)
        .env(PASSTHROUGH_ENV, "0")
        .output()
        .expect("run the helper");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("blake3={}", blake3::hash(&files[0].1).to_hex());
    assert!(
        said.contains(&want),
        "the served mount reads big.bin right: {said}"
    );
    assert!(said.contains("ok"), "{said}");
}
