//! What a host task can reach (issue 10, part of): no descriptor of `ci`
//! beyond stdin, stdout and stderr — not the store's lock or index, not
//! `/dev/fuse` of the inputs mount, not a server's sockets, and not one
//! that `ci` inherited from whoever started it.

use strata_tests::*;

#[test]
fn a_host_task_inherits_only_stdio() {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    write(env.work(), "src/a.txt", "a\n");
    // Reads an input, so the run's FUSE inputs mount exists while it runs.
    write(
        env.work(),
        "BUILD.star",
        "local_source(name = \"src\", path = \"src\")\n\
         task(name = \"fds\", deps = [\":src\"], script = \"cat $CI_IN/src/a.txt >/dev/null; for f in /proc/$$/fd/*; do echo \\\"${f##*/} $(readlink $f)\\\"; done > fds.txt\")\n",
    );
    // `ci` itself inherits an open descriptor (fd 9, not close-on-exec),
    // as from a careless parent: the task must not see it.
    let marker = env.root().join("inherited-marker");
    std::fs::write(&marker, "").unwrap();
    let file = std::fs::File::open(&marker).unwrap();
    let mut cmd = env.command(["build"]);
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = file.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; the new fd 9 has no CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 9) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    env.output(cmd).success();
    drop(file);
    let fds = env
        .ci(["store", "cat", "//:fds", "fds.txt"])
        .success()
        .stdout_str();
    let store = env.store().display().to_string();
    let work = env.store().join("work").display().to_string();
    let mut seen = 0;
    for line in fds.lines() {
        let (_, target) = line.split_once(' ').unwrap_or((line, ""));
        seen += 1;
        // Pipes and /dev/null are the shell's own stdio; a file in its work
        // directory is its redirection. Nothing else of `ci` may be open.
        let ok = target.starts_with("pipe:")
            || target == "/dev/null"
            || target.starts_with(&work)
            || !target.starts_with(&store)
                && !target.starts_with("/dev/fuse")
                && !target.starts_with("socket:")
                && !target.starts_with("anon_inode:");
        assert!(ok, "the task inherited {line}:\n{fds}");
        assert!(
            !target.starts_with(&format!("{store}/db")) && !target.ends_with("/lock"),
            "{line}\n{fds}"
        );
    }
    assert!(seen >= 3, "{fds}");
    assert!(
        !fds.contains(marker.to_str().unwrap()),
        "the task inherited the descriptor `ci` was given:\n{fds}"
    );
}
