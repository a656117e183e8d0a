//! Several `ci` processes on one store at once.

use strata_tests::*;

#[test]
fn two_writers_at_once_both_succeed() {
    let env = Env::new();
    gen_tree(&env.path("one"), 600, &[], 1);
    gen_tree(&env.path("two"), 600, &[], 2);
    // Learn the digests in stores of their own.
    let (expected_one, expected_two) = {
        let solo = Env::new();
        gen_tree(&solo.path("one"), 600, &[], 1);
        gen_tree(&solo.path("two"), 600, &[], 2);
        (solo.add("one"), solo.add("two"))
    };
    assert_ne!(expected_one, expected_two);

    let a = env.spawn(["store", "add", "one"]);
    let b = env.spawn(["store", "add", "two"]);
    let (a, b) = (a.wait().success(), b.wait().success());
    assert_eq!(a.digest(), expected_one);
    assert_eq!(b.digest(), expected_two);
    // Whoever waited said so; nobody printed anything else.
    for out in [&a, &b] {
        let err = out.stderr_str();
        assert!(
            err.is_empty() || err.starts_with("Waiting for the store"),
            "unexpected stderr: {err}"
        );
    }

    env.ci(["store", "verify"]).success();
    for d in [&expected_one, &expected_two] {
        let listed = env.ci(["store", "ls", "-r", d]).success();
        assert!(listed.lines().len() > 600);
    }
}

#[test]
fn readers_work_while_a_writer_runs() {
    let env = Env::new();
    gen_tree(&env.path("small"), 50, &[], 3);
    env.ci(["store", "add", "--ref", "old", "small"]).success();
    let expected = env.ci(["store", "ls", "old"]).success().stdout_str();

    gen_tree(&env.path("large"), 3000, &[1 << 20], 4);
    let mut writer = env.spawn(["store", "add", "--ref", "new", "large"]);
    let mut reads = 0;
    loop {
        let done = writer.has_exited();
        let out = env.ci(["store", "ls", "old"]).success();
        assert_eq!(out.stdout_str(), expected);
        reads += 1;
        if done {
            break;
        }
    }
    writer.wait().success();
    assert!(
        reads >= 2,
        "the writer finished before any read overlapped it"
    );
    env.ci(["store", "ls", "new", "big"]).success();
    env.ci(["store", "verify"]).success();
}
