//! The engine's Rust API example (`engine/examples/pipeline.rs`), built by
//! `cargo test --workspace`, runs and prints its outputs.

use std::process::Command;

#[test]
fn the_rust_api_example_builds_a_pipeline_declared_in_code() {
    let bin = strata_tests::ci_bin()
        .parent()
        .expect("the target directory")
        .join("examples")
        .join("pipeline");
    let out = Command::new(&bin)
        .env("TMPDIR", std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("count.txt: 3"), "{stdout}");
    let digests = stdout
        .lines()
        .filter(|l| {
            l.starts_with("//:") && l.split(' ').nth(1).is_some_and(strata_tests::is_digest)
        })
        .count();
    assert_eq!(digests, 2, "{stdout}");
}
