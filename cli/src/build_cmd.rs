//! `ci build`, `ci rerun`, `ci runs`, `ci run show`, `ci logs`, `ci explain`
//! and `ci graph`: the engine's commands.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use strata_engine::{
    expand, explain_label, render_graph, BuildOptions, Engine, Event, EventSink, GraphFormat,
    Label, Loader, Pattern, RunRecord, TaskState, Workspace,
};
use strata_store::{OpenMode, Store, StoreUrl};
use tokio_util::sync::CancellationToken;

use crate::remote::{seg, Remote};
use crate::{usage, Ctx, Outcome};

/// Where the workspace is and which store to use.
#[derive(Args, Clone)]
pub struct WsArgs {
    /// Run as if started in DIR (the workspace is the nearest ancestor with `ci.toml`)
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Targets: `//pkg:name`, `:name`, `//pkg:all`, `//...` [default: `//...`]
    targets: Vec<String>,
    #[command(flatten)]
    ws: WsArgs,
    /// Tasks run at once [default: `jobs` in ci.toml, else the number of cores]
    #[arg(short, long, value_parser = parse_jobs)]
    jobs: Option<usize>,
    /// Go on with independent tasks after a failure
    #[arg(short, long)]
    keep_going: bool,
    /// Re-run cached pure tasks and fail those whose output differs (non-determinism)
    #[arg(long)]
    check: bool,
    /// Run every task with this executor (`host` or `docker`)
    #[arg(long, value_name = "NAME")]
    executor: Option<String>,
    /// What a `webhook` or `timer` source holds in this build: `//:hook=event.json`
    /// (the file becomes its `payload.json`, or a timer's `tick.json`)
    #[arg(long, value_name = "LABEL=FILE")]
    payload: Vec<String>,
    /// After the build, build again whenever a `local_source` with `watch = True`
    /// (or, when none has it, any local source) changes; Ctrl-C stops
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    cache: crate::cache_cmd::CacheArgs,
}

#[derive(Args)]
pub struct RerunArgs {
    /// The run to re-run: an id, a unique prefix, or `latest`
    run: String,
    #[command(flatten)]
    ws: WsArgs,
    /// Tasks run at once [default: `jobs` in ci.toml, else the number of cores]
    #[arg(short, long, value_parser = parse_jobs)]
    jobs: Option<usize>,
    #[arg(short, long)]
    keep_going: bool,
    #[command(flatten)]
    cache: crate::cache_cmd::CacheArgs,
}

#[derive(Subcommand)]
pub enum RunCommand {
    /// Every task of a run: state, cache, duration, output
    Show {
        /// A run id, a unique prefix, or `latest`
        run: String,
        #[command(flatten)]
        ws: WsArgs,
    },
}

#[derive(Args)]
pub struct LogsArgs {
    /// A run id, a unique prefix, or `latest`
    run: String,
    /// The task whose log to print
    label: String,
    #[command(flatten)]
    ws: WsArgs,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The task: `//pkg:name`
    label: String,
    #[command(flatten)]
    ws: WsArgs,
}

#[derive(Args)]
pub struct GraphArgs {
    /// Targets [default: every task]
    targets: Vec<String>,
    #[command(flatten)]
    ws: WsArgs,
    /// `dot`, `mermaid` or `json` (`--json` is `--format json`)
    #[arg(long, default_value = "dot")]
    format: String,
}

/// `-j N`: at least 1 (as `jobs` in ci.toml).
fn parse_jobs(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("0 would run nothing; give at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a number of tasks")),
    }
}

/// A loaded workspace and the package the user stands in.
struct Loaded {
    ws: Workspace,
    current: Option<String>,
}

fn load(args: &WsArgs, patterns: &[String]) -> anyhow::Result<(Loaded, Vec<Label>)> {
    let start = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("Cannot read the current directory")?,
    };
    let mut loader = Loader::discover(&start)?;
    if let Some(dir) = dirs::cache_dir() {
        loader = loader.with_cache(dir.join("strata").join("loads"));
    }
    let root = loader.root().to_owned();
    let start = std::fs::canonicalize(&start).unwrap_or(start);
    let current = start
        .strip_prefix(std::fs::canonicalize(&root).unwrap_or(root.clone()))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let texts: Vec<String> = if patterns.is_empty() {
        vec!["//...".into()]
    } else {
        patterns.to_vec()
    };
    let mut parsed = Vec::new();
    for t in &texts {
        parsed
            .push(Pattern::parse(t, current.as_deref()).map_err(|e| usage(format!("`{t}`: {e}")))?);
    }
    let ws = loader.load_patterns(&parsed)?;
    let labels = expand(&ws, &parsed)?;
    Ok((Loaded { ws, current }, labels))
}

/// The store: `--store`, `CI_STORE`, `store` in ci.toml, then the default.
fn store_url(ctx: &Ctx, ws: Option<&Workspace>) -> anyhow::Result<StoreUrl> {
    ctx.url_with(ws.and_then(|w| w.store_path()))
}

fn open_write(ctx: &Ctx, ws: Option<&Workspace>) -> anyhow::Result<Store> {
    let mut on_wait = |msg: &str| {
        let _ = writeln!(std::io::stderr(), "{msg}");
    };
    Ok(Store::open(
        &store_url(ctx, ws)?,
        OpenMode::Write,
        &mut on_wait,
    )?)
}

fn open_read(ctx: &Ctx, ws: Option<&Workspace>) -> anyhow::Result<Store> {
    Ok(Store::open(
        &store_url(ctx, ws)?,
        OpenMode::Read,
        &mut |_| {},
    )?)
}

/// The workspace settings when there is a workspace here (commands that do
/// not need one still use its store setting).
fn try_ws(args: &WsArgs) -> Option<Workspace> {
    let start = args.dir.clone().or_else(|| std::env::current_dir().ok())?;
    let loader = Loader::discover(&start).ok()?;
    let settings = strata_engine::loader::read_settings(loader.root()).ok()?;
    Some(Workspace {
        root: Some(loader.root().to_owned()),
        settings,
        ..Workspace::default()
    })
}

pub fn build(args: BuildArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    if let Some(remote) = remote_for_build(ctx, &args.ws)? {
        if args.cache.remote_cache.is_some() {
            eprintln!(
                "warning: this build runs on {}, whose store is the cache; `--remote-cache` is \
                 for builds on a store of their own",
                remote.base()
            );
        }
        if args.executor.is_some() || !args.payload.is_empty() {
            return Err(usage(
                "`--executor` and `--payload` are not taken through `ci serve`; build without `--server`",
            ));
        }
        let (name, current) = identity(&args.ws)?;
        let mut targets = Vec::new();
        for t in if args.targets.is_empty() {
            vec!["//...".to_owned()]
        } else {
            args.targets.clone()
        } {
            let p =
                Pattern::parse(&t, current.as_deref()).map_err(|e| usage(format!("`{t}`: {e}")))?;
            targets.push(p.to_string());
        }
        let body = serde_json::json!({
            "targets": targets, "jobs": args.jobs, "keep_going": args.keep_going, "check": args.check,
        });
        let reply = remote.post(&format!("/api/v1/workspaces/{}/runs", seg(&name)), &body)?;
        let id = reply.json()?["id"].as_str().unwrap_or_default().to_owned();
        return follow_remote(ctx, remote, id);
    }
    if args.watch {
        return watch(args, ctx);
    }
    let (loaded, targets) = load(&args.ws, &args.targets)?;
    let _ = &loaded.current;
    let executor = match &args.executor {
        Some(e) => Some(
            e.parse()
                .map_err(|_| usage(format!("Unknown executor `{e}`; use `host` or `docker`")))?,
        ),
        None => None,
    };
    let opts = BuildOptions {
        jobs: args
            .jobs
            .or(loaded.ws.settings.jobs.map(|j| j.get() as usize))
            .unwrap_or(BuildOptions::default().jobs),
        keep_going: args.keep_going,
        check: args.check,
        executor,
        payloads: payloads(&args.payload, &loaded.ws, loaded.current.as_deref())?,
        ..BuildOptions::default()
    };
    run_build(ctx, loaded.ws, targets, opts, &args.cache)
}

/// `ci build --watch`: build, then build again after each change in the
/// watched sources' directories (300 ms of quiet), until interrupted.
fn watch(mut args: BuildArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    use notify::Watcher as _;
    args.watch = false;
    // Changes arrive on a channel; the wait for them also ends at Ctrl-C or
    // SIGTERM (a build catches its own).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    // Made once, before the first build: a signal that arrives between two
    // rounds (while the pipeline loads, or just after "watching" is printed)
    // is kept by these streams until the next wait reads it. A listener made
    // anew for each wait missed it, and ci went on watching.
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let (mut int, mut term) = rt.block_on(async {
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    });
    async fn either(s: &mut Option<Signal>) {
        match s.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    let mut next = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<PathBuf>,
                    quiet: Option<Duration>| {
        rt.block_on(async {
            let got = async {
                match quiet {
                    Some(d) => tokio::time::timeout(d, rx.recv())
                        .await
                        .ok()
                        .flatten()
                        .map(Some)
                        .unwrap_or(None),
                    None => rx.recv().await,
                }
            };
            tokio::select! {
                p = got => Ok(p),
                _ = either(&mut int) => Err(()),
                _ = either(&mut term) => Err(()),
            }
        })
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
        }
    })
    .context("Cannot watch files (inotify)")?;
    let mut watched: Vec<PathBuf> = Vec::new();
    loop {
        // Each round loads the pipeline again: an edit of BUILD.star counts too.
        let (loaded, _) = load(&args.ws, &args.targets)?;
        let root = loaded.ws.root.clone().unwrap_or_else(|| PathBuf::from("."));
        let sources: Vec<(&Label, &strata_engine::model::LocalSource)> = loaded
            .ws
            .tasks
            .iter()
            .filter_map(|(l, t)| match &t.kind {
                strata_engine::model::TaskKind::LocalSource(s) => Some((l, s)),
                _ => None,
            })
            .collect();
        let flagged: Vec<_> = sources.iter().filter(|(_, s)| s.watch).cloned().collect();
        let chosen = if flagged.is_empty() { sources } else { flagged };
        if chosen.is_empty() {
            return Err(usage(
                "`--watch` has nothing to watch: the targets read no `local_source`",
            ));
        }
        let mut dirs: Vec<PathBuf> = chosen.iter().map(|(_, s)| root.join(&s.path)).collect();
        dirs.push(root.join("BUILD.star"));
        if dirs != watched {
            for d in &watched {
                let _ = watcher.unwatch(d);
            }
            for d in &dirs {
                watcher
                    .watch(d, notify::RecursiveMode::Recursive)
                    .with_context(|| format!("Cannot watch `{}`", d.display()))?;
            }
            watched = dirs;
        }
        let store_dir = store_url(ctx, Some(&loaded.ws)).ok().and_then(|u| match u {
            StoreUrl::Local(p) => std::fs::canonicalize(&p).ok(),
            StoreUrl::Memory => None,
        });
        match build(
            BuildArgs {
                targets: args.targets.clone(),
                ws: args.ws.clone(),
                jobs: args.jobs,
                keep_going: args.keep_going,
                check: args.check,
                executor: args.executor.clone(),
                payload: args.payload.clone(),
                watch: false,
                cache: args.cache.clone(),
            },
            ctx,
        ) {
            Ok(Outcome::Interrupted) => return Ok(Outcome::Interrupted),
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e}");
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "watching {} for changes (Ctrl-C stops)",
            chosen
                .iter()
                .map(|(l, _)| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Wait for a change outside the store, then for quiet.
        loop {
            match next(&mut rx, None) {
                Err(()) => return Ok(Outcome::Interrupted),
                Ok(None) => return Err(anyhow::anyhow!("The file watcher stopped")),
                Ok(Some(p)) => {
                    let p = std::fs::canonicalize(&p).unwrap_or(p);
                    if !store_dir.as_ref().is_some_and(|s| p.starts_with(s)) {
                        break;
                    }
                }
            }
        }
        loop {
            match next(&mut rx, Some(Duration::from_millis(300))) {
                Err(()) => return Ok(Outcome::Interrupted),
                Ok(None) => break,
                Ok(Some(_)) => continue,
            }
        }
    }
}

/// `--payload LABEL=FILE`: the files an event source holds in this build.
fn payloads(
    given: &[String],
    ws: &Workspace,
    current: Option<&str>,
) -> anyhow::Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<u8>>>>
{
    let mut out = std::collections::BTreeMap::new();
    for g in given {
        let Some((label, file)) = g.split_once('=') else {
            return Err(usage(format!(
                "`--payload {g}`: write `LABEL=FILE`, e.g. `--payload //:push=event.json`"
            )));
        };
        let label =
            Label::parse(label, current).map_err(|e| usage(format!("`--payload {g}`: {e}")))?;
        let name = match ws.tasks.get(&label).map(|t| &t.kind) {
            Some(strata_engine::TaskKind::Webhook(_)) => "payload.json",
            Some(strata_engine::TaskKind::Timer(_)) => "tick.json",
            _ => {
                return Err(usage(format!(
                "`--payload {g}`: `{label}` is not a `webhook` or `timer` source of this workspace"
            )))
            }
        };
        let bytes = std::fs::read(file)
            .with_context(|| format!("Cannot read `{file}`, given to `--payload`"))?;
        let mut files = std::collections::BTreeMap::new();
        files.insert(name.to_owned(), bytes);
        if name == "payload.json" {
            files.insert("event".to_owned(), Vec::new());
            files.insert("delivery".to_owned(), Vec::new());
        }
        out.insert(label.to_string(), files);
    }
    Ok(out)
}

pub fn rerun(args: RerunArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    if let Some(remote) = remote_for_build(ctx, &args.ws)? {
        let reply = remote.post(
            &format!("/api/v1/runs/{}/rerun", seg(&args.run)),
            &serde_json::json!({}),
        )?;
        let id = reply.json()?["id"].as_str().unwrap_or_default().to_owned();
        return follow_remote(ctx, remote, id);
    }
    let ws0 = try_ws(&args.ws);
    let previous = {
        let store = open_read(ctx, ws0.as_ref())?;
        RunRecord::load(&store, &args.run)?
    };
    let (loaded, targets) = load(&args.ws, &previous.targets)?;
    let opts = BuildOptions {
        jobs: args
            .jobs
            .or(loaded.ws.settings.jobs.map(|j| j.get() as usize))
            .unwrap_or(BuildOptions::default().jobs),
        keep_going: args.keep_going,
        rerun_of: Some(previous),
        ..BuildOptions::default()
    };
    run_build(ctx, loaded.ws, targets, opts, &args.cache)
}

/// The server a build goes through: `--server`, `CI_SERVER` or `[server] url`;
/// else the `ci serve` that owns this store (it wrote its address there),
/// said once, rather than waiting for its lock.
fn remote_for_build(ctx: &Ctx, args: &WsArgs) -> anyhow::Result<Option<Remote>> {
    if let Some(r) = ctx.remote(args.dir.as_deref())? {
        return Ok(Some(r));
    }
    let ws = try_ws(args);
    if let StoreUrl::Local(root) = store_url(ctx, ws.as_ref())? {
        if let Some(url) = strata_server::running_server(&root) {
            let _ = writeln!(
                std::io::stderr(),
                "note: `ci serve` at {url} owns the store `{}`; the build goes through it",
                root.display()
            );
            let local = strata_server::auth::read_local_token(&root);
            return Remote::new(&url).map(|r| Some(r.with_default_token(local)));
        }
    }
    Ok(None)
}

/// The workspace's name under `ci serve` (as the server names it) and the
/// package the user stands in.
fn identity(args: &WsArgs) -> anyhow::Result<(String, Option<String>)> {
    let start = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("Cannot read the current directory")?,
    };
    let root = strata_engine::find_root(&start)?;
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    let settings = strata_engine::loader::read_settings(&root)?;
    let name = settings.name.unwrap_or_else(|| {
        root.file_name()
            .map_or_else(|| "root".to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let start = std::fs::canonicalize(&start).unwrap_or(start);
    let current = start
        .strip_prefix(&root)
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    Ok((name, current))
}

/// Shows a run of the server in the terminal view as it happens (Ctrl-C
/// cancels it there); the exit code is what a local build would give.
fn follow_remote(ctx: &Ctx, remote: Remote, id: String) -> anyhow::Result<Outcome> {
    let remote = Arc::new(remote);
    let interrupted = crate::remote::cancel_on_interrupt(remote.clone(), id.clone());
    let mut view = View::new(ctx.json, ctx.verbose);
    remote.follow(&id, &mut |e| view.event(&e))?;
    let run = remote.run(&id)?;
    view.finish(&run);
    Ok(match run.state {
        TaskState::Succeeded => Outcome::Clean,
        TaskState::Cancelled if interrupted.load(std::sync::atomic::Ordering::SeqCst) => {
            Outcome::Interrupted
        }
        _ => Outcome::Problems,
    })
}

fn run_build(
    ctx: &Ctx,
    ws: Workspace,
    targets: Vec<Label>,
    opts: BuildOptions,
    cache: &crate::cache_cmd::CacheArgs,
) -> anyhow::Result<Outcome> {
    let store = open_write(ctx, Some(&ws))?;
    let remote_cache = crate::cache_cmd::open(cache, &ws.settings, &store)?;
    let view = Arc::new(Mutex::new(View::new(ctx.json, ctx.verbose)));
    let v2 = view.clone();
    let events = EventSink::new(move |e| {
        if let Ok(mut v) = v2.lock() {
            v.event(&e);
        }
    });
    // One thread drives the scheduler, the commands' pipes and exits: that
    // work is short, and on a multi-threaded runtime waking a second worker
    // for every task cost more than it. Whatever blocks (preparing,
    // capturing, ingesting) goes to the runtime's blocking threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    // Connecting to Docker (and clearing what a killed run left there) is
    // for builds that may use it: a host-only build does not wait for it.
    let docker_wanted = wants_docker(&ws, &opts);
    let run = rt.block_on(async {
        let engine = Engine::new(store.clone(), ws, events);
        let docker = match docker_wanted {
            true => crate::docker::connect().await,
            false => None,
        };
        let engine = match docker {
            Some(d) => engine.with_docker(d),
            None => engine,
        };
        let engine = match &remote_cache {
            Some(c) => engine.with_cache(c.clone()),
            None => engine,
        };
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
            let _ = writeln!(std::io::stderr(), "Interrupted: stopping running tasks…");
            c2.cancel();
        });
        engine.build(&targets, &opts, cancel).await
    })?;
    if let Some(c) = &remote_cache {
        crate::cache_cmd::finish(c);
    }
    if let Ok(mut v) = view.lock() {
        v.finish(&run);
    }
    Ok(match run.state {
        TaskState::Succeeded => Outcome::Clean,
        TaskState::Cancelled => Outcome::Interrupted,
        _ => Outcome::Problems,
    })
}

/// Whether any task of `ws` may run in a container: an image, services, or
/// the Docker executor named by the task, `ci.toml` or `--executor`.
fn wants_docker(ws: &Workspace, opts: &BuildOptions) -> bool {
    let docker = Some(strata_engine::model::Executor::Docker);
    opts.executor == docker
        || ws.settings.executor == docker
        || ws.tasks.values().any(|t| match &t.kind {
            strata_engine::model::TaskKind::Run(r) => {
                r.image.is_some() || !r.services.is_empty() || r.executor == docker
            }
            _ => false,
        })
}

/// The terminal view of a run: a live view on a TTY, plain lines otherwise,
/// JSON lines with `--json`.
struct View {
    json: bool,
    verbose: bool,
    live: Option<Live>,
    started: Instant,
}

struct Live {
    multi: indicatif::MultiProgress,
    header: indicatif::ProgressBar,
    tasks: std::collections::BTreeMap<String, indicatif::ProgressBar>,
    total: usize,
    done: usize,
    cached: usize,
    failed: usize,
}

impl View {
    fn new(json: bool, verbose: bool) -> View {
        let tty = std::io::stderr().is_terminal() && !json;
        let live = tty.then(|| {
            let multi = indicatif::MultiProgress::new();
            let header = multi.add(indicatif::ProgressBar::new_spinner());
            header.enable_steady_tick(Duration::from_millis(120));
            Live {
                multi,
                header,
                tasks: Default::default(),
                total: 0,
                done: 0,
                cached: 0,
                failed: 0,
            }
        });
        View {
            json,
            verbose,
            live,
            started: Instant::now(),
        }
    }

    fn event(&mut self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            return;
        }
        if let Some(live) = &mut self.live {
            live.event(e);
            return;
        }
        let line = match e {
            Event::RunStarted { run, tasks, .. } => Some(format!("run {run}: {tasks} tasks")),
            Event::Note { message } => Some(format!("note: {message}")),
            Event::TaskStarted {
                label,
                attempt,
                executor,
            } => Some(if *attempt > 1 {
                format!("start {label} (attempt {attempt}, {executor})")
            } else {
                format!("start {label} ({executor})")
            }),
            Event::TaskLog { label, line, .. } if self.verbose => Some(format!("{label}| {line}")),
            Event::TaskLog { .. } => None,
            Event::TaskFinished {
                label,
                state,
                cached,
                duration_ms,
                ..
            } => Some(format!(
                "{} {label}{} {}",
                state.as_str(),
                if *cached { " (cached)" } else { "" },
                secs(*duration_ms)
            )),
            Event::RunFinished { .. } => None,
        };
        if let Some(l) = line {
            let _ = writeln!(std::io::stderr(), "{l}");
        }
    }

    fn finish(&mut self, run: &RunRecord) {
        if let Some(live) = self.live.take() {
            live.header.finish_and_clear();
            let _ = live.multi.clear();
        }
        if self.json {
            let summary = serde_json::json!({
                "summary": {
                    "run": run.id,
                    "state": run.state,
                    "executed": run.executed(),
                    "cached": run.cached(),
                    "kept": run.kept(),
                    "failed": run.failed(),
                    "skipped": run.skipped(),
                    "total": run.tasks.len(),
                    "duration_ms": run.duration_ms,
                }
            });
            let _ = writeln!(std::io::stdout(), "{summary}");
            return;
        }
        let mut err = std::io::stderr().lock();
        for (label, t) in &run.tasks {
            if t.state == TaskState::Failed {
                let _ = writeln!(err, "\nFAILED {label}");
                if let Some(e) = &t.error {
                    for l in e.lines() {
                        let _ = writeln!(err, "  {l}");
                    }
                }
                if let Some(out) = t.output {
                    let _ = writeln!(err, "  partial output: {}", out.short());
                }
            }
        }
        let kept = match run.kept() {
            0 => String::new(),
            n => format!(", {n} kept"),
        };
        let _ = writeln!(
            err,
            "\n{} {}: {} tasks, {} executed, {} cached{kept}, {} failed, {} skipped in {}",
            match run.state {
                TaskState::Succeeded => "Succeeded",
                TaskState::Cancelled => "Cancelled",
                _ => "Failed",
            },
            run.id,
            run.tasks.len(),
            run.executed(),
            run.cached(),
            run.failed(),
            run.skipped(),
            secs(self.started.elapsed().as_millis() as u64),
        );
    }
}

impl Live {
    fn event(&mut self, e: &Event) {
        match e {
            Event::RunStarted { tasks, run, .. } => {
                self.total = *tasks;
                self.header.set_message(format!("run {run}"));
            }
            Event::Note { message } => {
                let _ = self.multi.println(format!("note: {message}"));
            }
            Event::TaskStarted { label, .. } => {
                let bar = self.multi.add(indicatif::ProgressBar::new_spinner());
                bar.set_style(
                    indicatif::ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar.set_message(label.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.tasks.insert(label.clone(), bar);
            }
            Event::TaskLog { .. } => {}
            Event::TaskFinished {
                label,
                state,
                cached,
                duration_ms,
                ..
            } => {
                if let Some(bar) = self.tasks.remove(label) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                self.done += 1;
                if *cached {
                    self.cached += 1;
                }
                if *state == TaskState::Failed {
                    self.failed += 1;
                    let _ = self
                        .multi
                        .println(format!("FAILED {label} {}", secs(*duration_ms)));
                }
            }
            Event::RunFinished { .. } => {}
        }
        self.header.set_message(format!(
            "{}/{} done, {} cached, {} failed, {} running",
            self.done,
            self.total,
            self.cached,
            self.failed,
            self.tasks.len()
        ));
    }
}

fn secs(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// One line of `ci runs`, from a local record or the server's list.
type RunRow = strata_engine::RunSummary;

pub fn runs(ws: WsArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    // Newest first.
    let rows: Vec<RunRow> = match ctx.remote(ws.dir.as_deref())? {
        Some(remote) => {
            let mut rows = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/api/v1/runs?limit=500&cursor={}", seg(c)),
                    None => "/api/v1/runs?limit=500".to_owned(),
                };
                let page = remote.get(&path)?.json()?;
                for r in page["runs"].as_array().into_iter().flatten() {
                    rows.push(
                        serde_json::from_value(r.clone())
                            .context("The server sent a run we cannot read")?,
                    );
                }
                match page["next"].as_str() {
                    Some(n) => cursor = Some(n.to_owned()),
                    None => break,
                }
            }
            rows
        }
        None => {
            let store = open_read(ctx, try_ws(&ws).as_ref())?;
            RunRecord::list(&store)?
                .iter()
                .rev()
                .map(RunRecord::summary)
                .collect()
        }
    };
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(Outcome::Clean);
    }
    let mut out = std::io::stdout().lock();
    for r in &rows {
        writeln!(
            out,
            "{}  {:<9}  {:>4} tasks  {:>4} executed  {:>4} cached  {:>3} failed  {:>8}  {}",
            r.id,
            r.state.as_str(),
            r.tasks,
            r.executed,
            r.cached,
            r.failed,
            secs(r.duration_ms),
            r.targets.join(" ")
        )?;
    }
    Ok(Outcome::Clean)
}

pub fn run_cmd(cmd: RunCommand, ctx: &Ctx) -> anyhow::Result<Outcome> {
    match cmd {
        RunCommand::Show { run, ws } => {
            let r = match ctx.remote(ws.dir.as_deref())? {
                Some(remote) => remote.run(&run)?,
                None => {
                    let store = open_read(ctx, try_ws(&ws).as_ref())?;
                    RunRecord::load(&store, &run)?
                }
            };
            if ctx.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(Outcome::Clean);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "run {}  {}  targets: {}",
                r.id,
                r.state.as_str(),
                r.targets.join(" ")
            )?;
            if let Some(of) = &r.rerun_of {
                writeln!(out, "re-run of {of}")?;
            }
            for (label, t) in &r.tasks {
                writeln!(
                    out,
                    "  {:<9} {:<7} {:>8}  {}  {}",
                    t.state.as_str(),
                    if t.cached {
                        "cached"
                    } else if t.reused {
                        "kept"
                    } else {
                        ""
                    },
                    secs(t.duration_ms),
                    t.output.map_or_else(|| "-".repeat(12), |d| d.short()),
                    label
                )?;
            }
            Ok(Outcome::Clean)
        }
    }
}

pub fn logs(args: LogsArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    if let Some(remote) = ctx.remote(args.ws.dir.as_deref())? {
        let label = normalize_label(&args.label)?;
        let reply = remote.get(&format!(
            "/api/v1/runs/{}/tasks/{}/log",
            seg(&args.run),
            seg(&label)
        ))?;
        std::io::stdout().lock().write_all(&reply.body)?;
        return Ok(Outcome::Clean);
    }
    let store = open_read(ctx, try_ws(&args.ws).as_ref())?;
    let r = RunRecord::load(&store, &args.run)?;
    let label = normalize_label(&args.label)?;
    let t = r.tasks.get(&label).ok_or_else(|| {
        usage(format!(
            "Run `{}` has no task `{label}`; `ci run show {}` lists its tasks",
            r.id, r.id
        ))
    })?;
    if let Some(log) = t.log {
        let bytes = store.read_blob(&log)?;
        std::io::stdout().lock().write_all(&bytes)?;
    }
    Ok(Outcome::Clean)
}

fn normalize_label(text: &str) -> anyhow::Result<String> {
    Label::parse(text, None)
        .map(|l| l.to_string())
        .map_err(|e| usage(format!("`{text}`: {e}")))
}

pub fn explain(args: ExplainArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let label = normalize_label(&args.label)?;
    let (key, run, output, has_previous, lines, preimage) =
        match ctx.remote(args.ws.dir.as_deref())? {
            Some(remote) => {
                let (name, _) = identity(&args.ws)?;
                let v = remote
                    .get(&format!(
                        "/api/v1/workspaces/{}/explain/{}",
                        seg(&name),
                        seg(&label)
                    ))?
                    .json()?;
                let digest = |k: &str| -> anyhow::Result<strata_store::Digest> {
                    Ok(v[k].as_str().unwrap_or_default().parse()?)
                };
                (
                    digest("key")?,
                    v["run"].as_str().unwrap_or_default().to_owned(),
                    digest("output")?,
                    v["has_previous"].as_bool().unwrap_or(false),
                    serde_json::from_value::<Vec<String>>(v["changes"].clone()).unwrap_or_default(),
                    v["preimage"].clone(),
                )
            }
            None => {
                let ws = try_ws(&args.ws);
                let store = open_read(ctx, ws.as_ref())?;
                let key = strata_engine::workspace_label_key(
                    ws.as_ref().and_then(|w| w.root.as_deref()),
                    &label,
                );
                let Some((p, lines)) = explain_label(&store, &key)? else {
                    return Err(usage(format!(
                        "`{label}` has not run in this store; `ci build {label}` first"
                    )));
                };
                let preimage = serde_json::to_value(&p.preimage)?;
                (
                    p.key,
                    p.run,
                    p.output,
                    p.previous.is_some(),
                    lines,
                    preimage,
                )
            }
        };
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "label": label, "key": key, "output": output, "run": run,
                "changes": lines, "preimage": preimage,
            }))?
        );
        return Ok(Outcome::Clean);
    }
    println!(
        "{label}: key {} (run {run}), output {}",
        key.short(),
        output.short()
    );
    if !has_previous {
        println!("  no earlier action with a different key: the task was never re-keyed");
    } else if lines.is_empty() {
        println!("  the key changed, but no field differs (a change of the key format)");
    } else {
        println!("  since the previous action:");
        for l in lines {
            println!("  - {l}");
        }
    }
    Ok(Outcome::Clean)
}

pub fn graph(args: GraphArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let (loaded, targets) = load(&args.ws, &args.targets)?;
    let format: GraphFormat = if ctx.json {
        GraphFormat::Json
    } else {
        args.format.parse().map_err(usage)?
    };
    let targets = if args.targets.is_empty() {
        Vec::new()
    } else {
        targets
    };
    print!("{}", render_graph(&loaded.ws, &targets, format));
    Ok(Outcome::Clean)
}

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A run id, a unique prefix, or `latest` [default: `latest`]
    run: Option<String>,
    #[command(flatten)]
    ws: WsArgs,
}

/// `ci analyze`: the critical path of a run, parallelism per level, pure
/// tasks that never hit the cache, impure tasks on the critical path.
pub fn analyze(args: AnalyzeArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let (loaded, _) = load(&args.ws, &[])?;
    let store = open_read(ctx, Some(&loaded.ws))?;
    let run = RunRecord::load(&store, args.run.as_deref().unwrap_or("latest"))?;
    let history = RunRecord::list(&store)?;
    let a = strata_engine::analyze::analyze(&loaded.ws, &run, &history);
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&a)?);
        return Ok(Outcome::Clean);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "run {}: {} wall, {} tasks, parallelism {:.2}",
        a.run,
        secs(a.duration_ms),
        run.tasks.len(),
        a.parallelism
    )?;
    writeln!(out, "critical path ({}):", secs(a.critical_ms))?;
    for p in &a.critical_path {
        let note = if p.cached {
            " (cached)"
        } else if p.state != TaskState::Succeeded {
            " (not succeeded)"
        } else {
            ""
        };
        writeln!(out, "  {:>9}  {}{note}", secs(p.duration_ms), p.label)?;
    }
    writeln!(out, "levels:")?;
    for l in &a.levels {
        writeln!(
            out,
            "  {:>3}: {:>4} tasks, {:>4} executed, {:>9} of work",
            l.level,
            l.tasks,
            l.executed,
            secs(l.duration_ms)
        )?;
    }
    if a.never_cached.is_empty() {
        writeln!(out, "pure tasks that never hit the cache: none")?;
    } else {
        writeln!(out, "pure tasks that never hit the cache, though their inputs did not change (`ci explain` says what changes):")?;
        for n in &a.never_cached {
            writeln!(out, "  {} (ran in {} runs)", n.label, n.runs)?;
        }
    }
    if a.impure_on_critical_path.is_empty() {
        writeln!(out, "impure tasks on the critical path: none")?;
    } else {
        writeln!(
            out,
            "impure tasks on the critical path: {}",
            a.impure_on_critical_path.join(", ")
        )?;
    }
    if !a.unknown_tasks.is_empty() {
        writeln!(
            out,
            "tasks the pipeline no longer has (left out): {}",
            a.unknown_tasks.join(", ")
        )?;
    }
    writeln!(
        out,
        "unused inputs: not known (input access is not traced for builds yet)"
    )?;
    Ok(Outcome::Clean)
}
