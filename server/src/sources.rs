//! Sources that start runs by themselves: timers, polled git refs and
//! watched directories. Each is a task on the server's runtime that submits
//! a run of the source's downstream cone when it has a new value; a run of
//! the same source still queued is joined, not doubled.

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

/// Starts every source of every workspace. Returns what keeps watchers alive.
pub fn start(
    mgr: &Arc<Manager>,
    shutdown: &CancellationToken,
) -> Result<Vec<notify::RecommendedWatcher>, ServerError> {
    let mut watchers = Vec::new();
    for (name, conf) in mgr.workspaces().clone() {
        let model = match mgr.load(&name, &[Pattern::Recursive(String::new())]) {
            Ok(m) => m,
            Err(e) => {
                eprintln!(
                    "warning: workspace `{name}` does not load ({}); its sources start nothing until the server restarts",
                    e.message
                );
                continue;
            }
        };
        for (label, task) in &model.tasks {
            let cone = cone(&model, label);
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
                        conf.root.clone(),
                        label.clone(),
                        g.clone(),
                        cone,
                    ));
                }
                TaskKind::LocalSource(s) if s.watch => {
                    let dir = if s.path == "." {
                        conf.root.clone()
                    } else {
                        conf.root.join(&s.path)
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
                eprintln!("warning: cannot resolve `{}` of git source `{label}`: {e}", git.rev);
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
    mgr.store_root().map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}
