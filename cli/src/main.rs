//! `ci`, the command of Strata. A thin binary: it parses flags, opens the
//! store, calls the libraries and prints. Everything else lives in them.

mod build_cmd;
mod cache_cmd;
mod docker;
mod mount_cmd;
mod output;
mod remote;
mod serve_cmd;
mod store_cmd;

use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata_store::{OpenMode, Store, StoreUrl};

const EXIT_CODES: &str = "\
Exit codes:
  0    Success
  1    The command ran and found a problem: a task failed (`ci build`), problems
       found (`ci store verify`)
  2    Usage error or bad input: unknown flag, target, layer, ref or path, an error
       in ci.toml or BUILD.star (located file:line:col), invalid digest or ref name,
       unsupported file type, refused archive
  3    Store, engine or I/O error
  130  Interrupted (Ctrl-C or SIGTERM); running tasks were stopped";

#[derive(Parser)]
#[command(
    name = "ci",
    version,
    about = "Strata: a content-addressed build system for CI",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The store: a directory, `rocksdb:///abs/path` or `memory://`
    /// [default: ~/.cache/strata/store]
    #[arg(long, global = true, env = "CI_STORE", value_name = "DIR|URL")]
    store: Option<String>,

    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    json: bool,

    /// Print summaries on stderr even when it is not a terminal
    #[arg(short, long, global = true)]
    verbose: bool,

    /// Go through this `ci serve` (build, rerun, runs, run show, logs, explain,
    /// store ls|cat|show|diff) [default: `[server] url` in ci.toml]; the token is `CI_TOKEN`
    #[arg(long, global = true, env = "CI_SERVER", value_name = "URL")]
    server: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and manage the content-addressed store of layers
    #[command(after_help = EXIT_CODES)]
    Store {
        /// Fetch layers held only remotely (hits of `--remote-fetch=needed`)
        /// from this cache when a command reads them [default: `[cache] remote`
        /// in ci.toml]
        #[arg(long, global = true, env = "CI_REMOTE_CACHE", value_name = "URL")]
        remote_cache: Option<String>,
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
    /// Build targets: run every task they need, at most once per action key
    #[command(after_help = EXIT_CODES)]
    Build(build_cmd::BuildArgs),
    /// Re-run a run: keep every task that succeeded in it, run the rest
    Rerun(build_cmd::RerunArgs),
    /// List runs, newest first
    Runs(build_cmd::WsArgs),
    /// Inspect one run
    Run {
        #[command(subcommand)]
        command: build_cmd::RunCommand,
    },
    /// Print the log of a task in a run
    Logs(build_cmd::LogsArgs),
    /// Say why a task's action key changed since its previous action
    Explain(build_cmd::ExplainArgs),
    /// Print the build graph as DOT, Mermaid or JSON
    Graph(build_cmd::GraphArgs),
    /// Analyse a run: critical path, parallelism, tasks that never hit the cache
    Analyze(build_cmd::AnalyzeArgs),
    #[command(flatten)]
    Mount(mount_cmd::MountCommand),
    /// Serve workspaces over HTTP: the API, live events, tokens and triggers
    #[command(after_help = EXIT_CODES)]
    Serve(serve_cmd::ServeArgs),
}

/// Settings every command sees.
pub struct Ctx {
    store: Option<String>,
    pub json: bool,
    verbose: bool,
    server: Option<String>,
    /// `ci store --remote-cache`: where layers held only remotely are fetched.
    pub remote_cache: Option<String>,
}

impl Ctx {
    /// The workspace around the current directory, if any.
    pub fn workspace_root(&self) -> Option<std::path::PathBuf> {
        let cwd = std::env::current_dir().ok()?;
        strata_engine::find_root(&cwd).ok()
    }

    /// The store: `--store`, `CI_STORE`, `store` in the workspace's ci.toml,
    /// then the default under the user's cache directory.
    pub fn url(&self) -> anyhow::Result<StoreUrl> {
        let from_workspace = self.workspace_root().and_then(|root| {
            let settings = strata_engine::loader::read_settings(&root).ok()?;
            Some(root.join(settings.store?))
        });
        self.url_with(from_workspace)
    }

    /// The store: `--store` or `CI_STORE`, else `ws_store` (the workspace's
    /// `store` setting), else the default.
    pub fn url_with(&self, ws_store: Option<std::path::PathBuf>) -> anyhow::Result<StoreUrl> {
        if self.store.is_none() {
            if let Some(p) = ws_store {
                return Ok(StoreUrl::Local(p));
            }
        }
        match &self.store {
            Some(s) => Ok(StoreUrl::parse(s)?),
            None => match dirs::cache_dir() {
                Some(dir) => Ok(StoreUrl::Local(dir.join("strata").join("store"))),
                None => Err(usage(
                    "Cannot find a cache directory for the default store; pass `--store DIR` or set `CI_STORE`",
                )),
            },
        }
    }

    /// Opens the store for reading: never waits, works while another process writes.
    pub fn open_read(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.url()?, OpenMode::Read, &mut |_| {})?)
    }

    /// Opens the store for writing to free space (`ci store gc`): works on
    /// a full disk, by releasing the store's reserve first.
    pub fn open_reclaim(&self) -> anyhow::Result<Store> {
        let mut on_wait = |msg: &str| {
            let _ = writeln!(std::io::stderr(), "{msg}");
        };
        Ok(Store::open(&self.url()?, OpenMode::Reclaim, &mut on_wait)?)
    }

    /// Opens the store for writing, saying so on stderr when it has to wait.
    pub fn open_write(&self) -> anyhow::Result<Store> {
        let mut on_wait = |msg: &str| {
            let _ = writeln!(std::io::stderr(), "{msg}");
        };
        Ok(Store::open(&self.url()?, OpenMode::Write, &mut on_wait)?)
    }

    /// Resolves a layer as the user wrote it: `//pkg:name` (the latest output
    /// of that task in the workspace around the current directory), a ref, a
    /// digest or a unique prefix.
    pub fn resolve(&self, store: &Store, spec: &str) -> anyhow::Result<strata_store::Digest> {
        if spec.starts_with("//") {
            let label = strata_engine::Label::parse(spec, None)
                .map_err(|e| usage(format!("`{spec}`: {e}")))?;
            let key = strata_engine::workspace_label_key(
                self.workspace_root().as_deref(),
                &label.to_string(),
            );
            return match store.label(&key)? {
                Some(e) => Ok(e.layer),
                None => Err(strata_store::Error::UnknownLabel {
                    label: label.to_string(),
                }
                .into()),
            };
        }
        match store.resolve(spec) {
            Err(e @ strata_store::Error::UnknownLayer { .. }) => {
                cache_cmd::remote_match(store, spec)?.ok_or_else(|| e.into())
            }
            r => Ok(r?),
        }
    }

    /// The server to go through: `--server`, `CI_SERVER`, else `[server] url`
    /// of the workspace around the current directory (or `dir`).
    pub fn remote(&self, dir: Option<&std::path::Path>) -> anyhow::Result<Option<remote::Remote>> {
        if let Some(url) = self.server.as_deref().filter(|s| !s.is_empty()) {
            return remote::Remote::new(url).map(Some);
        }
        let start = match dir {
            Some(d) => d.to_owned(),
            None => match std::env::current_dir() {
                Ok(d) => d,
                Err(_) => return Ok(None),
            },
        };
        let Ok(root) = strata_engine::find_root(&start) else {
            return Ok(None);
        };
        match strata_engine::loader::read_settings(&root)
            .ok()
            .and_then(|s| s.server_url)
        {
            Some(url) => remote::Remote::new(&url).map(Some),
            None => Ok(None),
        }
    }

    /// Prints a human summary on stderr when someone is likely to read it.
    pub fn summary(&self, line: &str) {
        if self.verbose || std::io::stderr().is_terminal() {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

/// Bad input found by the cli itself (exit code 2).
#[derive(Debug)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// What a command that ran to the end found.
pub enum Outcome {
    Clean,
    /// The command ran and found a problem (exit code 1).
    Problems,
    /// Stopped by Ctrl-C or SIGTERM (exit code 130).
    Interrupted,
}

/// Counts what each thread holds, so that loading a pipeline can refuse to
/// take more than its `[load] max_heap_mib` (strata_engine's `limits.rs`).
#[global_allocator]
static ALLOC: strata_engine::CountingAlloc = strata_engine::CountingAlloc;

fn main() -> ExitCode {
    // `ci` is also the host sandbox's helper (engine/src/exec/zygote).
    if let Some(code) = strata_engine::exec::zygote::helper_if_asked() {
        return ExitCode::from(code);
    }
    if let Some(dir) = dirs::cache_dir() {
        strata_engine::exec::host::remember_probes_in(dir.join("strata"));
    }
    let cli = Cli::parse();
    let mut ctx = Ctx {
        store: cli.store,
        json: cli.json,
        verbose: cli.verbose,
        server: cli.server,
        remote_cache: None,
    };
    let result = match cli.command {
        Command::Store {
            remote_cache,
            command,
        } => {
            ctx.remote_cache = remote_cache;
            store_cmd::run(command, &ctx)
        }
        Command::Build(args) => build_cmd::build(args, &ctx),
        Command::Rerun(args) => build_cmd::rerun(args, &ctx),
        Command::Runs(args) => build_cmd::runs(args, &ctx),
        Command::Run { command } => build_cmd::run_cmd(command, &ctx),
        Command::Logs(args) => build_cmd::logs(args, &ctx),
        Command::Explain(args) => build_cmd::explain(args, &ctx),
        Command::Graph(args) => build_cmd::graph(args, &ctx),
        Command::Analyze(args) => build_cmd::analyze(args, &ctx),
        Command::Mount(cmd) => mount_cmd::run(cmd, &ctx),
        Command::Serve(args) => serve_cmd::run(args, &ctx),
    };
    match result {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {err}");
            for cause in err.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

/// A reader of our stdout went away (`ci store cat … | head`): not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(e) = err.downcast_ref::<strata_store::Error>() {
        return store_exit_code(e);
    }
    if let Some(e) = err
        .chain()
        .find_map(|c| c.downcast_ref::<strata_store::Error>())
    {
        return store_exit_code(e);
    }
    if err.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    if err.downcast_ref::<strata_engine::LoadError>().is_some()
        || err.downcast_ref::<strata_engine::ModelError>().is_some()
    {
        return 2;
    }
    if let Some(e) = err.downcast_ref::<strata_engine::BuildError>() {
        return if e.is_user_error() { 2 } else { 3 };
    }
    if let Some(e) = err.downcast_ref::<strata_server::ServerError>() {
        return if e.is_user_error() { 2 } else { 3 };
    }
    3
}

/// 2 for errors in what the user gave us, 3 for failures of the store or the
/// system. Exhaustive on purpose: a new variant must be classified here.
fn store_exit_code(e: &strata_store::Error) -> u8 {
    use strata_store::Error as E;
    match e {
        E::BadDigest { .. }
        | E::BadName { .. }
        | E::UnknownLayer { .. }
        | E::UnknownLabel { .. }
        | E::AmbiguousPrefix { .. }
        | E::NoSuchPath { .. }
        | E::WrongKind { .. }
        | E::UnsupportedFileType { .. }
        | E::NotADirectory { .. }
        | E::BadArchive { .. }
        | E::ArchiveIo { .. }
        | E::BadRefName { .. }
        | E::NoSuchRef(_)
        | E::BadUrl { .. }
        | E::NoStore { .. }
        | E::NotAStore { .. }
        | E::BadPattern { .. } => 2,
        E::Io { .. }
        | E::Db { .. }
        | E::DamagedIndex { .. }
        | E::DiskFull { .. }
        | E::CorruptTree { .. }
        | E::CorruptRecord { .. }
        | E::MissingTree(_)
        | E::MissingBlob(_)
        | E::ReadOnly { .. }
        | E::ArchiveStaging { .. }
        | E::Walk { .. } => 3,
    }
}
