//! Checks of `ci` that need no store. Their presence also makes
//! `cargo test --workspace` build `target/<profile>/ci`, which the end-to-end
//! tests in `strata-tests` run.

use std::process::Command;

fn ci(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ci"))
        .args(args)
        .output()
        .expect("run ci")
}

#[test]
fn help_documents_exit_codes() {
    let out = ci(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let codes = help
        .split_once("Exit codes:")
        .unwrap_or_else(|| panic!("`ci --help` has no `Exit codes:` section:\n{help}"))
        .1;
    for code in ["0", "1", "2", "3"] {
        assert!(
            codes
                .lines()
                .any(|l| l.split_whitespace().next() == Some(code)),
            "`ci --help` does not document exit code {code}:\n{help}"
        );
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = ci(&["store", "ls", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}
