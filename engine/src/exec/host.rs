//! The host executor: runs the command as a process on this machine, in
//! the task's prepared directories, in its own process group.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use super::{pump, ExecOutcome, ExecRequest, Executor};
use crate::events::Stream;
use crate::BuildError;

/// PATH given to host tasks: the environment of `ci` does not leak in.
pub const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a process group gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// Runs tasks as host processes.
#[derive(Clone, Debug, Default)]
pub struct HostExecutor;

#[async_trait::async_trait]
impl Executor for HostExecutor {
    fn name(&self) -> &'static str {
        "host"
    }

    fn platform(&self) -> String {
        format!("host/{}-{}", std::env::consts::OS, std::env::consts::ARCH)
    }

    async fn resolve_image(&self, image: &str) -> Result<String, BuildError> {
        Err(BuildError::ImageNeedsDocker {
            image: image.to_owned(),
        })
    }

    async fn run(&self, req: ExecRequest) -> Result<ExecOutcome, BuildError> {
        let Some(program) = req.argv.first() else {
            return Ok(ExecOutcome {
                spawn_error: Some("the command is empty".into()),
                ..ExecOutcome::default()
            });
        };
        let dir = match &req.workdir {
            Some(w) => req.dirs.work.join(w),
            None => req.dirs.work.clone(),
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&req.argv[1..])
            .env_clear()
            .env("PATH", HOST_PATH)
            .env("HOME", &req.dirs.work)
            .env("TMPDIR", std::env::temp_dir())
            .env("LANG", "C.UTF-8")
            .envs(&req.env)
            .envs(&req.secrets)
            .env("CI", "true")
            .env("CI_IN", &req.dirs.inputs)
            .env("CI_WORK", &req.dirs.work)
            .env("CI_CONTEXT", &req.dirs.context)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(prev) = &req.dirs.prev {
            cmd.env("CI_PREV", prev);
        }
        // A task inherits stdin, stdout and stderr only: descriptors this
        // process holds (the store's lock and index, `/dev/fuse` of its
        // mounts, a server's sockets) are marked close-on-exec in the child,
        // whether or not whoever opened them said so.
        // SAFETY: close_range is async-signal-safe and touches only the
        // child's descriptor table; an old kernel without it (ENOSYS)
        // leaves the descriptors as they were.
        unsafe {
            cmd.pre_exec(|| {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("Cannot start `{program}`: {e}");
                req.log.line(Stream::Stderr, msg.as_bytes());
                return Ok(ExecOutcome {
                    spawn_error: Some(msg),
                    ..ExecOutcome::default()
                });
            }
        };
        let pgid = child.id().map(|p| p as i32);
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, Stream::Stdout, req.log.clone())));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, Stream::Stderr, req.log.clone())));

        let timeout = async {
            match req.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut outcome = ExecOutcome::default();
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = timeout => { outcome.timed_out = true; None }
            _ = req.cancel.cancelled() => { outcome.cancelled = true; None }
        };
        let status = match status {
            Some(s) => s,
            None => {
                signal_group(pgid, libc::SIGTERM);
                match tokio::time::timeout(GRACE, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        signal_group(pgid, libc::SIGKILL);
                        child.wait().await
                    }
                }
            }
        };
        // Whatever the command left running in its group goes too: no
        // process outlives its task, and the pipes close.
        signal_group(pgid, libc::SIGKILL);
        for h in [out, err].into_iter().flatten() {
            let _ = h.await;
        }
        match status {
            Ok(s) => {
                outcome.exit_code = s.code();
                outcome.signal = s.signal();
            }
            Err(e) => outcome.spawn_error = Some(format!("Lost track of `{program}`: {e}")),
        }
        Ok(outcome)
    }
}

fn signal_group(pgid: Option<i32>, sig: i32) {
    if let Some(pgid) = pgid {
        // SAFETY: killpg only sends a signal; a gone group gives ESRCH.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}
