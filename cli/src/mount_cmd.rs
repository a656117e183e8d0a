//! `ci mount` and `ci umount`: layers as ordinary directories (crate
//! `strata-fuse` does the work).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::{Args, Subcommand};
use strata_fuse::{AllowOther, Layers, MountOptions, Stop, Unmounted};

use crate::{usage, Ctx, Outcome};

/// What `ci mount --background` waits for on its child's stdout.
const READY: &str = "strata-mount-ready";

#[derive(Subcommand)]
pub enum MountCommand {
    /// Mount a layer, a task's latest output or a whole run, read-only, on an
    /// empty directory
    ///
    /// Serves in the foreground until Ctrl-C, SIGTERM or `ci umount DIR`.
    Mount(MountArgs),
    /// Unmount what `ci mount` (or a work directory) mounted on DIR, also
    /// when the process serving it has died
    Umount(UmountArgs),
}

#[derive(Args)]
pub struct MountArgs {
    /// A layer digest or unique prefix (8+ hex characters), a ref,
    /// `//pkg:task` (that task's latest output) or `run:ID` (every task
    /// output of a run, one directory per task; `run:latest` for the last)
    target: String,
    /// An existing empty directory
    dir: PathBuf,
    /// Return once the mount is ready and keep serving in the background
    #[arg(long)]
    background: bool,
    /// Only this user may access the mount (by default everyone may, where
    /// permitted: always for root, for others with `user_allow_other` in
    /// /etc/fuse.conf)
    #[arg(long)]
    private: bool,
    /// Record which paths were used and write them to FILE (JSON) at unmount
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// The child process of `--background`
    #[arg(long, hide = true)]
    serve_detached: bool,
}

#[derive(Args)]
pub struct UmountArgs {
    /// The mount point
    dir: PathBuf,
}

pub fn run(cmd: MountCommand, ctx: &Ctx) -> anyhow::Result<Outcome> {
    match cmd {
        MountCommand::Mount(args) => mount(args, ctx),
        MountCommand::Umount(args) => umount(args, ctx),
    }
}

/// Errors of the user's making exit with 2, like the cli's own.
fn fuse_err(e: strata_fuse::Error) -> anyhow::Error {
    if e.is_user_error() && std::error::Error::source(&e).is_none() {
        usage(e.to_string())
    } else {
        e.into()
    }
}

fn resolve(ctx: &Ctx, target: &str) -> anyhow::Result<(Layers, String)> {
    let store = ctx.open_read()?;
    // `run:ID`, or a bare run id (`20261128T134959.327-66ba`, or a prefix of one).
    let bare_run = target.len() >= 9
        && target.as_bytes()[..8].iter().all(u8::is_ascii_digit)
        && target.as_bytes()[8] == b'T';
    let run_id = target.strip_prefix("run:").or(bare_run.then_some(target));
    if let Some(id) = run_id {
        let run = strata_engine::RunRecord::load(&store, id)?;
        let layers: Vec<(String, strata_store::Digest)> = run
            .tasks
            .iter()
            // `//app/web:build` → `app/web:build/`: a directory per package.
            .filter_map(|(label, t)| {
                t.output
                    .map(|o| (label.trim_start_matches("//").to_owned(), o))
            })
            .collect();
        if layers.is_empty() {
            return Err(usage(format!(
                "Run `{}` has no task outputs to mount",
                run.id
            )));
        }
        let digests: Vec<strata_store::Digest> = layers.iter().map(|(_, d)| *d).collect();
        crate::cache_cmd::ensure_local(ctx, &store, &digests)?;
        let what = format!("the {} task outputs of run {}", layers.len(), run.id);
        return Ok((Layers::Named(layers), what));
    }
    let d = ctx.resolve(&store, target)?;
    crate::cache_cmd::ensure_local(ctx, &store, &[d])?;
    Ok((Layers::One(d), format!("layer {}", d.short())))
}

fn mount(args: MountArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    for c in strata_fuse::cleanup_stale()? {
        eprintln!("{c}");
    }
    if args.background && !args.serve_detached {
        return mount_background(&args, ctx);
    }
    let (layers, what) = resolve(ctx, &args.target)?;
    let store = ctx.open_read()?;
    let opts = MountOptions {
        allow_other: if args.private {
            AllowOther::No
        } else {
            AllowOther::IfPermitted
        },
        trace: args.trace.is_some(),
        stop_on_sigterm: true,
    };
    let handle = strata_fuse::mount_layers(&store, &layers, &args.dir, &opts).map_err(fuse_err)?;
    let dir = handle.mountpoint().to_owned();
    if args.serve_detached {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}")?;
        out.flush()?;
        drop(out);
        strata_fuse::detach_stdio()?;
    } else if ctx.json {
        crate::output::json(
            &mut std::io::stdout().lock(),
            &serde_json::json!({"mounted": dir, "what": what, "pid": std::process::id()}),
        )?;
    } else {
        if ctx.verbose {
            eprintln!("File reads: {}", handle.read_path());
        }
        eprintln!(
            "Mounted {what} at `{}`; Ctrl-C or `ci umount {}` unmounts it",
            dir.display(),
            args.dir.display()
        );
    }
    let stop = handle.wait()?;
    if let Some(file) = &args.trace {
        if let Some(trace) = handle.trace() {
            let f = std::fs::File::create(file)?;
            let mut w = std::io::BufWriter::new(f);
            serde_json::to_writer_pretty(&mut w, &trace)?;
            w.flush()?;
        }
    }
    let last_error = handle.last_error();
    handle.unmount().map_err(fuse_err)?;
    if !args.serve_detached {
        let why = match stop {
            Stop::Interrupt => "interrupted",
            Stop::Terminate => "terminated",
            Stop::Unmounted => "unmounted from outside",
        };
        ctx.summary(&format!("Unmounted `{}` ({why})", dir.display()));
        if let Some(e) = last_error {
            eprintln!("warning: the mount answered an error to a reader: {e}");
        }
    }
    Ok(Outcome::Clean)
}

/// Starts `ci mount … --serve-detached` in its own session and returns once
/// it says the mount is ready (or reports why it failed).
fn mount_background(args: &MountArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    if let Some(s) = &ctx.store {
        cmd.arg("--store").arg(s);
    }
    cmd.arg("mount")
        .arg(&args.target)
        .arg(&args.dir)
        .arg("--serve-detached");
    if args.private {
        cmd.arg("--private");
    }
    if let Some(t) = &args.trace {
        cmd.arg("--trace").arg(std::path::absolute(t)?);
    }
    // Its own process group: a Ctrl-C at this terminal is not for it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout from the mount process"))?;
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == READY);
    if ready {
        let dir = std::path::absolute(&args.dir)?;
        if ctx.json {
            crate::output::json(
                &mut std::io::stdout().lock(),
                &serde_json::json!({"mounted": dir, "pid": child.id()}),
            )?;
        } else {
            eprintln!(
                "Mounted `{}` at `{}` in the background (pid {}); `ci umount {}` unmounts it",
                args.target,
                dir.display(),
                child.id(),
                args.dir.display()
            );
        }
        return Ok(Outcome::Clean);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    let _ = std::io::stderr().write_all(err.as_bytes());
    std::process::exit(status.code().unwrap_or(3));
}

fn umount(args: UmountArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let how = strata_fuse::unmount_path(&args.dir).map_err(fuse_err)?;
    if ctx.json {
        let pid = match how {
            Unmounted::Stopped { pid } => Some(pid),
            Unmounted::Direct { .. } => None,
        };
        crate::output::json(
            &mut std::io::stdout().lock(),
            &serde_json::json!({"unmounted": args.dir, "stopped_pid": pid}),
        )?;
    } else {
        let detail = match how {
            Unmounted::Stopped { pid } => format!("stopped `ci mount`, pid {pid}"),
            Unmounted::Direct { stale: true } => "its server had died".to_owned(),
            Unmounted::Direct { stale: false } => "unmounted directly".to_owned(),
        };
        ctx.summary(&format!("Unmounted `{}` ({detail})", args.dir.display()));
    }
    Ok(Outcome::Clean)
}
