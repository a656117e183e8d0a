//! Sources that start runs by themselves: timers, polled git refs and
//! watched directories. Each is a task on the server's runtime that submits
//! a run of the source's downstream cone when it has a new value; a run of
//! the same source still queued is joined, not doubled. A supervisor per
//! workspace starts them again when the pipeline's sources change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use strata_engine::{Graph, Label, Pattern, TaskKind, Trigger, Workspace};
use tokio_util::sync::CancellationToken;

use crate::error::ServerError;
use crate::runs::{Manager, Submit};

/// How long a watched directory must be quiet before a run starts.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// How often a workspace's pipeline is looked at again for sources that
/// were added, removed or changed (the load cache makes an unchanged one a
/// few stats and hashes).
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Starts, for every workspace, a supervisor of its sources: it starts them
/// from the pipeline as it is, and starts them again whenever the sources
/// declared in it change (an edit of `BUILD.star` adds a timer: no restart).
pub fn start(mgr: &Arc<Manager>, shutdown: &CancellationToken) -> Result<(), ServerError> {
    for (name, conf) in mgr.workspaces().clone() {
        tokio::spawn(supervise(mgr.clone(), shutdown.clone(), name, conf.root));
    }
    Ok(())
}

/// What the running sources of a workspace were started from.
struct Running {
    fingerprint: String,
    stop: CancellationToken,
    _watchers: Vec<notify::RecommendedWatcher>,
}

async fn supervise(mgr: Arc<Manager>, shutdown: CancellationToken, name: String, root: PathBuf) {
    let mut running: Option<Running> = None;
    let mut warned = false;
    loop {
        let (m2, n2) = (mgr.clone(), name.clone());
        let loaded =
            tokio::task::spawn_blocking(move || m2.load(&n2, &[Pattern::Recursive(String::new())]))
                .await;
        match loaded {
            Ok(Ok(model)) => {
                warned = false;
                let fingerprint = fingerprint(&model);
                if running.as_ref().map(|r| &r.fingerprint) != Some(&fingerprint) {
                    if let Some(old) = running.take() {
                        old.stop.cancel();
                        eprintln!(
                            "note: the sources of workspace `{name}` changed; restarting them"
                        );
                    }
                    let stop = shutdown.child_token();
                    match start_workspace(&mgr, &stop, &name, &root, &model) {
                        Ok(watchers) => {
                            running = Some(Running {
                                fingerprint,
                                stop,
                                _watchers: watchers,
                            })
                        }
                        Err(e) => {
                            stop.cancel();
                            eprintln!(
                                "warning: the sources of workspace `{name}` cannot start: {e}"
                            );
                        }
                    }
                }
            }
            Ok(Err(e)) if !warned => {
                warned = true;
                eprintln!(
                    "warning: workspace `{name}` does not load ({}); its sources keep what they were until it does",
                    e.message
                );
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The sources that start runs, with their settings and cones: when this
/// changes, the sources are started again.
fn fingerprint(model: &Workspace) -> String {
    let mut parts = Vec::new();
    for (label, task) in &model.tasks {
        let fires = match &task.kind {
            TaskKind::Timer(_) => true,
            TaskKind::GitSource(g) => g.poll_secs.is_some() && g.on.is_none(),
            TaskKind::LocalSource(s) => s.watch,
            _ => false,
        };
        if fires {
            parts.push(serde_json::json!({
                "label": label.to_string(),
                "kind": serde_json::to_value(&task.kind).unwrap_or_default(),
                "cone": cone(model, label),
            }));
        }
    }
    serde_json::Value::Array(parts).to_string()
}

/// Starts the sources of one loaded workspace; they stop with `stop`.
/// Returns what keeps its watchers alive.
fn start_workspace(
    mgr: &Arc<Manager>,
    stop: &CancellationToken,
    name: &str,
    root: &std::path::Path,
    model: &Workspace,
) -> Result<Vec<notify::RecommendedWatcher>, ServerError> {
    let mut watchers = Vec::new();
    let (name, shutdown) = (name.to_owned(), stop);
    for (label, task) in &model.tasks {
        let cone = cone(model, label);
        match &task.kind {
            TaskKind::Timer(t) => {
                let schedule = match (&t.cron, t.every_secs) {
                    (Some(c), _) => match strata_engine::parse_cron(c) {
                        Ok(cron) => Schedule::Cron(Box::new(cron)),
                        Err(_) => continue,
                    },
                    (None, Some(s)) => Schedule::Every(Duration::from_secs(s)),
                    _ => continue,
                };
                tokio::spawn(timer(
                    mgr.clone(),
                    shutdown.clone(),
                    name.clone(),
                    label.clone(),
                    cone,
                    schedule,
                ));
            }
            TaskKind::GitSource(g) if g.poll_secs.is_some() && g.on.is_none() => {
                tokio::spawn(poll_git(
                    mgr.clone(),
                    shutdown.clone(),
                    name.clone(),
                    root.to_owned(),
                    label.clone(),
                    g.clone(),
                    cone,
                ));
            }
            TaskKind::LocalSource(s) if s.watch => {
                let dir = if s.path == "." {
                    root.to_owned()
                } else {
                    root.join(&s.path)
                };
                watchers.push(watch(
                    mgr.clone(),
                    shutdown.clone(),
                    name.clone(),
                    label.clone(),
                    dir,
                    cone,
                )?);
            }
            _ => {}
        }
    }
    Ok(watchers)
}

/// The tasks downstream of `label` (itself included): what a new value reruns.
fn cone(model: &Workspace, label: &Label) -> Vec<String> {
    Graph::new(model)
        .downstream(std::slice::from_ref(label))
        .into_iter()
        .map(|l| l.to_string())
        .collect()
}

fn fire(
    mgr: &Arc<Manager>,
    ws: &str,
    label: &Label,
    cone: &[String],
    kind: &str,
    detail: String,
    payload: Option<BTreeMap<String, Vec<u8>>>,
) {
    let mut s = Submit::new(
        Some(ws.to_owned()),
        cone.to_vec(),
        Trigger {
            kind: kind.to_owned(),
            source: Some(label.to_string()),
            detail: Some(detail),
            by: None,
        },
    );
    s.dedup = Some(format!("{ws}\0{label}"));
    if let Some(files) = payload {
        s.payloads.insert(label.to_string(), files);
    }
    if let Err(e) = mgr.submit(s) {
        eprintln!(
            "warning: {kind} source `{label}` of workspace `{ws}` could not start a run: {}",
            e.message
        );
    }
}

enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// How long until the next tick, from now.
    fn next(&self) -> Option<Duration> {
        match self {
            Schedule::Every(d) => Some(*d),
            Schedule::Cron(c) => {
                let now = chrono::Utc::now();
                let next = c.find_next_occurrence(&now, false).ok()?;
                (next - now).to_std().ok()
            }
        }
    }
}

async fn timer(
    mgr: Arc<Manager>,
    shutdown: CancellationToken,
    ws: String,
    label: Label,
    cone: Vec<String>,
    schedule: Schedule,
) {
    loop {
        let Some(wait) = schedule.next() else {
            eprintln!("warning: timer `{label}` has no next tick; it stops");
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = chrono::Utc::now();
        let time = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let tick = serde_json::json!({ "time": time, "unix": now.timestamp() });
        let mut files = BTreeMap::new();
        files.insert("tick.json".to_owned(), tick.to_string().into_bytes());
        let mgr2 = mgr.clone();
        let (ws2, label2, cone2) = (ws.clone(), label.clone(), cone.clone());
        let handle = tokio::runtime::Handle::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _g = handle.enter();
            fire(&mgr2, &ws2, &label2, &cone2, "timer", time, Some(files));
        })
        .await;
    }
}

async fn poll_git(
    mgr: Arc<Manager>,
    shutdown: CancellationToken,
    ws: String,
    root: PathBuf,
    label: Label,
    git: strata_engine::GitSource,
    cone: Vec<String>,
) {
    let every = Duration::from_secs(git.poll_secs.unwrap_or(60).max(1));
    let mut last = strata_engine::resolve_git_source(&root, &git).await.ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let commit = match strata_engine::resolve_git_source(&root, &git).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "warning: cannot resolve `{}` of git source `{label}`: {e}",
                    git.rev
                );
                continue;
            }
        };
        if last.as_ref() == Some(&commit) {
            continue;
        }
        last = Some(commit.clone());
        let mgr2 = mgr.clone();
        let (ws2, label2, cone2) = (ws.clone(), label.clone(), cone.clone());
        let handle = tokio::runtime::Handle::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _g = handle.enter();
            fire(&mgr2, &ws2, &label2, &cone2, "git", commit, None);
        })
        .await;
    }
}

fn watch(
    mgr: Arc<Manager>,
    shutdown: CancellationToken,
    ws: String,
    label: Label,
    dir: PathBuf,
    cone: Vec<String>,
) -> Result<notify::RecommendedWatcher, ServerError> {
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let store_dir = mgr_store_dir(&mgr);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            for p in ev.paths {
                // The store may live in the workspace: its writes are ours.
                if store_dir.as_ref().is_some_and(|s| p.starts_with(s)) {
                    continue;
                }
                let _ = tx.send(p);
            }
        }
    })
    .map_err(|source| ServerError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .map_err(|source| ServerError::Watch {
            path: dir.clone(),
            source,
        })?;
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                p = rx.recv() => p,
                _ = shutdown.cancelled() => return,
            };
            let Some(mut changed) = first else { return };
            // Debounce: wait until the directory has been quiet a moment.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(p)) => changed = p,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let detail = changed.display().to_string();
            let mgr2 = mgr.clone();
            let (ws2, label2, cone2) = (ws.clone(), label.clone(), cone.clone());
            let handle = tokio::runtime::Handle::current();
            let _ = tokio::task::spawn_blocking(move || {
                let _g = handle.enter();
                fire(&mgr2, &ws2, &label2, &cone2, "watch", detail, None);
            })
            .await;
        }
    });
    Ok(watcher)
}

fn mgr_store_dir(mgr: &Manager) -> Option<PathBuf> {
    mgr.store_root()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}
