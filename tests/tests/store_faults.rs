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
