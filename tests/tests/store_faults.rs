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
