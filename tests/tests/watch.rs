//! `ci build --watch`: a build, then one more after each edit of a watched
//! source, until interrupted.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use strata_tests::*;

#[test]
fn build_watch_rebuilds_after_an_edit() {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(
        env.work(),
        "BUILD.star",
        "local_source(name = \"src\", path = \"src\", watch = True)\ntask(name = \"copy\", deps = [\":src\"], script = \"cp $CI_IN/src/a.txt a.txt\")\n",
    );
    write(env.work(), "src/a.txt", "one\n");
    let mut cmd = env.command(["build", "--watch"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("ci build --watch");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |what: &str| loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(what) => return,
            Ok(_) => continue,
            Err(_) => panic!("`ci build --watch` never printed `{what}`"),
        }
    };
    wait_for("watching //:src");
    write(env.work(), "src/a.txt", "two\n");
    wait_for("Succeeded");
    wait_for("watching //:src");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "Ctrl-C ends the watch");
    let out = env.ci(["store", "cat", "//:copy", "a.txt"]).success();
    assert_eq!(out.stdout_str(), "two\n");
    let runs = env.ci(["--json", "runs"]).success().json();
    assert_eq!(runs.as_array().unwrap().len(), 2, "one build, one rebuild");
}
