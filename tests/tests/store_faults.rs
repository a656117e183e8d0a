//! The store under faults (issue 10, part of): what `verify` reports.

use strata_tests::*;

#[test]
fn verify_reports_stray_files_in_blobs_instead_of_failing() {
    let env = Env::new();
    write(env.work(), "d/a.txt", "a\n");
    env.add("d");
    let blobs = env.store().join("blobs");
    write(&blobs, "README", "not a blob\n");
    let shard = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    write(&shard, "notablob", "x");
    let out = env.ci(["store", "verify"]).failure(1);
    let text = out.all_str();
    assert!(
        text.contains("stray file") && text.contains("README") && text.contains("notablob"),
        "{text}"
    );
    std::fs::remove_file(blobs.join("README")).unwrap();
    std::fs::remove_file(shard.join("notablob")).unwrap();
    env.ci(["store", "verify"]).success();
}

// ---- a damaged index ----

/// A workspace whose build runs one host task: every `ci build` records a
/// run (and, through the next writer's open, its records reach a table).
fn workspace() -> Env {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(
        env.work(),
        "BUILD.star",
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"t\", deps = [\":src\"], script = 'cat \"$CI_IN/src/in.txt\" > out')\n",
    );
    write(env.work(), "src/in.txt", "one\n");
    env
}

/// The first table of `family` in the store's index.
#[track_caller]
fn table_of(env: &Env, family: &str) -> String {
    let mut all: Vec<(String, String)> =
        strata_store::meta::rocks::RocksMetaStore::tables(&env.store().join("db"))
            .into_iter()
            .collect();
    all.sort();
    match all.iter().find(|(_, f)| f == family) {
        Some((file, _)) => file.clone(),
        None => panic!("no table of family `{family}` in {all:?}"),
    }
}

/// `n` builds, each a run, then a writer's open (a `ci store gc --dry-run`)
/// that puts what the last one logged into a table.
fn runs_in_tables(env: &Env, n: usize) {
    for i in 0..n {
        write(env.work(), "src/in.txt", format!("{i}\n"));
        env.ci(["build"]).success();
    }
    env.ci(["store", "gc", "--dry-run"]).success();
}

#[test]
fn a_flipped_byte_in_a_table_is_reported_and_never_reads_as_no_runs() {
    // Four bytes flipped in the table's first data block (its checksum
    // fails when read), then in its footer (the table cannot be opened: a
    // reader used to skip it and see no runs at all, exit 0).
    for in_footer in [false, true] {
        let env = workspace();
        runs_in_tables(&env, 6);
        assert_eq!(env.ci(["runs"]).success().lines().len(), 6);

        let file = table_of(&env, "runs");
        let path = env.store().join("db").join(&file);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = if in_footer { bytes.len() - 20 } else { 16 };
        for b in &mut bytes[at..at + 4] {
            *b ^= 0xff;
        }
        std::fs::write(&path, &bytes).unwrap();

        let out = env.ci(["store", "verify"]).failure(1);
        let text = out.stdout_str();
        let names_family = in_footer || text.contains("`runs`");
        if !(text.contains("damaged index") && text.contains(&file) && names_family) {
            out.fail(&format!("expected verify to name `{file}` (family `runs`)"));
        }
        let out = env.ci(["runs"]).failure(3);
        let err = out.stderr_str();
        if !(err.contains("damaged") && err.contains(&file) && err.contains("ci store repair")) {
            out.fail("expected `ci runs` to say the index is damaged, where, and what to do");
        }

        let out = env.ci(["store", "repair"]).success();
        if !out.stdout_str().contains(&file) {
            out.fail(&format!("expected repair to name the lost table `{file}`"));
        }
        env.ci(["store", "verify"]).success();
        let before = env.ci(["runs"]).success().lines().len();
        write(env.work(), "src/in.txt", "after\n");
        env.ci(["build"]).success();
        assert_eq!(env.ci(["runs"]).success().lines().len(), before + 1);
        env.ci(["store", "verify"]).success();
    }
}

#[test]
fn a_truncated_or_deleted_table_is_a_clear_error_and_repair_recovers() {
    for cut in [true, false] {
        let env = workspace();
        runs_in_tables(&env, 4);
        let file = table_of(&env, "trees");
        let path = env.store().join("db").join(&file);
        if cut {
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        let what = if cut { "cut short" } else { "missing" };

        let out = env.ci(["store", "verify"]).failure(1);
        if !(out.stdout_str().contains(&file) && out.stdout_str().contains(what)) {
            out.fail(&format!("expected verify to say `{file}` is {what}"));
        }
        write(env.work(), "src/in.txt", "next\n");
        let out = env.ci(["build"]).failure(3);
        let err = out.stderr_str();
        if !(err.contains(&file) && err.contains(what) && err.contains("ci store repair")) {
            out.fail(&format!(
                "expected the build to say `{file}` is {what} and how to repair"
            ));
        }

        let out = env.ci(["store", "repair"]).success();
        if !out.stdout_str().contains(&file) {
            out.fail(&format!("expected repair to name the lost table `{file}`"));
        }
        env.ci(["store", "verify"]).success();
        env.ci(["build"]).success();
        env.ci(["store", "verify"]).success();
        let out = env.ci(["store", "cat", "//:t", "out"]).success();
        assert_eq!(out.stdout_str(), "next\n");
    }
}

// ---- a full disk ----

/// A size-limited tmpfs mounted for the test (root only), unmounted when
/// dropped, whatever the test did.
struct SmallFs {
    dir: std::path::PathBuf,
}

impl SmallFs {
    #[track_caller]
    fn mount(dir: std::path::PathBuf, mib: u64) -> SmallFs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {mib} MiB tmpfs and must run as root: mount said {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    fn free_bytes(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a zeroed out-struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Writes `name` until the filesystem is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join(name)).unwrap();
        let chunk = vec![0u8; 1 << 16];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the filesystem: {e}"),
            }
        }
        // The last bytes that fit, a page at a time.
        let page = vec![0u8; 4096];
        while f.write(&page).is_ok_and(|n| n > 0) {}
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn a_full_disk_caps_partial_outputs_and_gc_frees_it() {
    let env = Env::new();
    let fs = SmallFs::mount(env.root().join("small"), 128);
    let store = fs.dir.join("store");
    let ci = |args: &[&str]| {
        let mut cmd = env.command(args);
        cmd.env("CI_STORE", &store);
        env.output(cmd)
    };
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(
        env.work(),
        "BUILD.star",
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"fill\", script = 'dd if=/dev/zero of=big bs=1M count=400 2>/dev/null; exit 1')\n\
         task(name = \"ok\", deps = [\":src\"], script = 'cp \"$CI_IN/src/in.txt\" out')\n",
    );
    write(env.work(), "src/in.txt", "one\n");
    ci(&["build", "//:ok"]).success();

    // A failing task writes until the disk is full: its partial output is
    // over the cap, not kept, and its space comes back.
    let out = ci(&["build", "//:fill"]).failure(1);
    if !out.all_str().contains("partial output was not kept") {
        out.fail("expected the failed task's huge partial output to be refused");
    }
    let du = ci(&["--json", "store", "du"]).success().json();
    assert!(du["blob_bytes"].as_u64().unwrap() < 1 << 20, "{du}");
    ci(&["store", "verify"]).success();

    // The store fills the disk: an unreferenced 40 MiB layer, then a file
    // beside the store takes the rest.
    write(env.work(), "junk/big.bin", pseudo_random(7, 40 << 20));
    ci(&["store", "add", "junk"]).success();
    fs.fill("filler");
    assert!(fs.free_bytes() < 1 << 20, "{} bytes free", fs.free_bytes());
    write(env.work(), "src/in.txt", "two\n");
    let out = ci(&["build", "//:ok"]);
    if out.code() != Some(0) {
        let err = out.stderr_str();
        if !(err.contains("full") && err.contains("ci store gc")) {
            out.fail("expected a build on a full disk to say so and what to do");
        }
    }
    ci(&["store", "verify"]).success();

    // GC opens on the full disk and frees the layer; the next build works.
    let out = ci(&["--json", "store", "gc"]).success();
    let freed = out.json()["bytes_freed"].as_u64().unwrap();
    assert!(freed >= 40 << 20, "freed {freed} bytes");
    ci(&["build", "//:ok"]).success();
    let out = ci(&["store", "cat", "//:ok", "out"]).success();
    assert_eq!(out.stdout_str(), "two\n");
    ci(&["store", "verify"]).success();
    drop(fs);
}

// ---- a blob deleted by hand ----

/// The path of a blob in the store.
fn blob_path(env: &Env, bytes: &[u8]) -> std::path::PathBuf {
    let hex = strata_store::Digest::of(bytes).to_hex();
    env.store().join("blobs").join(&hex[..2]).join(&hex[2..])
}

/// Moves every directory-cache record's "cached at" 10 s later: entries of
/// files changed just before are then trusted, as they are once the file
/// has been left alone a while.
fn settle_stat_cache(env: &Env) {
    use strata_store::dircache::CACHED_AT_OFFSET as AT;
    use strata_store::{Batch, Family, Flow, OpenMode, Store, StoreUrl};
    let store = Store::open(
        &StoreUrl::Local(env.store().to_owned()),
        OpenMode::Write,
        &mut |_| {},
    )
    .unwrap();
    let mut batch = Batch::new();
    store
        .meta()
        .scan(Family::DirCache, &[], &mut |k, v| {
            let mut v = v.to_vec();
            let at = i64::from_le_bytes(v[AT..AT + 8].try_into().unwrap()) + 10_000_000_000;
            v[AT..AT + 8].copy_from_slice(&at.to_le_bytes());
            batch.put(Family::DirCache, k.to_vec(), v);
            Ok(Flow::Continue)
        })
        .unwrap();
    assert!(!batch.is_empty(), "no directory-cache records");
    store.meta().write(batch).unwrap();
    store.sync().unwrap();
}

/// Whether `ci --json build` ran `label`'s command (not a cache hit).
fn executed(out: &Output, label: &str) -> bool {
    out.lines().iter().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        v["event"] == "task_finished" && v["label"] == label && v["cached"] == false
    })
}

#[test]
fn a_deleted_blob_makes_its_producer_run_again() {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    let build_star = |p_script: &str| {
        format!(
            "local_source(name = \"src\", path = \"src\")\n\
             local_source(name = \"other\", path = \"other\")\n\
             task(name = \"p\", deps = [\":src\"], script = '{p_script}')\n\
             task(name = \"c\", deps = [\":p\", \":other\"], script = 'cat \"$CI_IN/p/out\" \"$CI_IN/other/x\" > res')\n"
        )
    };
    write(
        env.work(),
        "BUILD.star",
        build_star("cp \"$CI_IN/src/in.txt\" out; echo made >> out"),
    );
    write(env.work(), "src/in.txt", "one\n");
    write(env.work(), "other/x", "1\n");
    env.ci(["build"]).success();

    // The producer's output blob goes; the consumer must run (its other
    // input changed) while the producer is a cache hit.
    std::fs::remove_file(blob_path(&env, b"one\nmade\n")).unwrap();
    write(env.work(), "other/x", "2\n");
    let out = env.ci(["--json", "build"]).success();
    if !(executed(&out, "//:p") && executed(&out, "//:c")) {
        out.fail("expected `//:p` to run again, then `//:c`");
    }
    let res = env.ci(["store", "cat", "//:c", "res"]).success();
    assert_eq!(res.stdout_str(), "one\nmade\n2\n");
    env.ci(["store", "verify"]).success();

    // A source's blob cannot be made again by the build once its stat-cache
    // entry is trusted (here: dated as written 10 s after the file changed,
    // instead of waiting): the error names the object and the command that
    // repairs it.
    settle_stat_cache(&env);
    std::fs::remove_file(blob_path(&env, b"one\n")).unwrap();
    write(
        env.work(),
        "BUILD.star",
        build_star("cp \"$CI_IN/src/in.txt\" out; echo made again >> out"),
    );
    let out = env.ci(["build"]).failure(1);
    let digest = strata_store::Digest::of(b"one\n").to_hex();
    if !(out.all_str().contains(&digest) && out.all_str().contains("ci store repair")) {
        out.fail("expected the error to name the missing blob and `ci store repair`");
    }
    env.ci(["store", "repair"]).success();
    env.ci(["store", "verify"]).success();
    env.ci(["build"]).success();
    let res = env.ci(["store", "cat", "//:c", "res"]).success();
    assert_eq!(res.stdout_str(), "one\nmade again\n2\n");
    env.ci(["store", "verify"]).success();
}
