//! Building: the [`Engine`], what a build is given ([`BuildOptions`]) and
//! what it keeps ([`ActionPayload`]). The work is split by concern:
//! `schedule` (the scheduler: which task runs when), `command` (one
//! command's life: key, directories, attempts, capture), `cache` (lookups
//! and records under action keys), `builtin` (merges and sources, which run
//! no command) and `plan` (what a build would do, before it runs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_store::{ActionCache, Digest, Store};

use crate::events::EventSink;
use crate::exec::host::HostExecutor;
use crate::exec::Executor;
use crate::key::ActionPreimage;
use crate::model::{self, Workspace};
use crate::record::{RunRecord, TaskRecord, TaskState};
use crate::BuildError;

mod builtin;
mod cache;
mod command;
mod plan;
mod schedule;

pub use builtin::resolve_git_source;
pub use plan::Prediction;

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Tasks run at once (at least 1).
    pub jobs: usize,
    /// Go on with independent tasks after a failure.
    pub keep_going: bool,
    /// Re-run cached pure tasks and fail those whose output differs.
    pub check: bool,
    /// Overrides every task's executor (`--executor`).
    pub executor: Option<model::Executor>,
    /// `ci rerun`: the run whose succeeded tasks are kept as they were.
    pub rerun_of: Option<RunRecord>,
    /// The run's id, when the caller made it beforehand ([`crate::new_run_id`]): a
    /// server answers with it before the run starts. `None`: a new one.
    pub run_id: Option<String>,
    /// The workspace's name, recorded with the run (`ci serve`).
    pub workspace: Option<String>,
    /// What started the run, recorded with it.
    pub trigger: Option<crate::Trigger>,
    /// What event sources (`timer`, `webhook`) hold in this run, by label: file
    /// name → bytes. A source without one holds its default (see [`model::Timer`]).
    pub payloads: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            keep_going: false,
            check: false,
            executor: None,
            rerun_of: None,
            run_id: None,
            workspace: None,
            trigger: None,
            payloads: BTreeMap::new(),
        }
    }
}

/// What the engine keeps with a cached action and a label's latest output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionPayload {
    pub output: Digest,
    pub context: BTreeMap<String, String>,
    pub log: Option<Digest>,
    pub key: Digest,
    pub preimage: ActionPreimage,
    /// Input mount → the label that produced it (for `ci explain`).
    #[serde(default)]
    pub input_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub run: String,
    /// For a label's latest output: the preimage of the action before it,
    /// when its key differed (what `ci explain` compares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<ActionPreimage>>,
}

/// Builds targets of one workspace against one store.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// Where action results are looked up and shared: the store itself, or
    /// a remote cache wrapped around it.
    cache: Arc<dyn ActionCache>,
    ws: Workspace,
    host: Arc<dyn Executor>,
    docker: Option<Arc<dyn Executor>>,
    events: EventSink,
    /// What label keys start with ([`workspace_label_key`]), resolved once.
    label_prefix: String,
    /// Work-directory strategies already announced (each is printed once).
    announced: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The result of an input: what a dependant needs.
#[derive(Clone, Debug)]
pub(crate) struct Done {
    pub(crate) output: Digest,
    pub(crate) context: BTreeMap<String, String>,
}

/// A command's action, resolved ([`Engine::command_action`]).
pub(crate) struct CommandAction {
    pub(crate) pre: ActionPreimage,
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) image: Option<String>,
    pub(crate) argv: Vec<String>,
    pub(crate) context: BTreeMap<String, String>,
    pub(crate) input_labels: BTreeMap<String, String>,
}

impl Engine {
    pub fn new(store: Store, ws: Workspace, events: EventSink) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                cache: Arc::new(store.clone()),
                store,
                label_prefix: workspace_label_key(ws.root.as_deref(), ""),
                ws,
                host: Arc::new(HostExecutor),
                docker: None,
                events,
                announced: Default::default(),
            }),
        }
    }

    /// Adds a container executor (used for tasks with an `image`).
    pub fn with_docker(self, docker: Arc<dyn Executor>) -> Engine {
        self.rebuilt(|inner| inner.docker = Some(docker))
    }

    /// Looks action results up in `cache` (and shares the ones this build
    /// makes there) instead of the store alone: e.g. a remote cache wrapped
    /// around the store.
    pub fn with_cache(self, cache: Arc<dyn ActionCache>) -> Engine {
        self.rebuilt(|inner| inner.cache = cache)
    }

    fn rebuilt(self, change: impl FnOnce(&mut Inner)) -> Engine {
        let mut inner = Inner {
            store: self.inner.store.clone(),
            cache: self.inner.cache.clone(),
            ws: self.inner.ws.clone(),
            host: self.inner.host.clone(),
            docker: self.inner.docker.clone(),
            events: self.inner.events.clone(),
            label_prefix: self.inner.label_prefix.clone(),
            announced: Default::default(),
        };
        change(&mut inner);
        Engine {
            inner: Arc::new(inner),
        }
    }

    pub fn workspace(&self) -> &Workspace {
        &self.inner.ws
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The store's key for `label`'s record in this workspace
    /// ([`workspace_label_key`], the root resolved once per engine).
    fn label_record_key(&self, label: &str) -> String {
        format!("{}{label}", self.inner.label_prefix)
    }

    /// Where relative paths of the workspace start (the current directory
    /// for a model that did not come from disk).
    fn workspace_root(&self) -> PathBuf {
        self.inner
            .ws
            .root
            .clone()
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// `a`, `b`, `c` for messages.
fn quoted(items: &[impl std::fmt::Display]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The record of a task that never started.
/// Marks a task the run stopped before it got a job token.
fn cancelled(rec: &mut TaskRecord) {
    rec.state = TaskState::Cancelled;
    rec.error = Some("cancelled before it started".into());
}

fn not_run(state: TaskState, why: &str) -> TaskRecord {
    let mut rec = TaskRecord::pending();
    rec.state = state;
    rec.error = Some(why.to_owned());
    rec
}

/// A file-name-safe form of a label.
pub(crate) fn slug(label: &str) -> String {
    let slug: String = label
        .trim_start_matches("//")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // A file name is at most 255 bytes, and a deep package makes a long
    // label: keep the start, readable, and a digest that tells labels apart.
    if slug.len() <= 120 {
        return slug;
    }
    format!(
        "{}-{}",
        &slug[..100],
        &Digest::of(label.as_bytes()).to_hex()[..16]
    )
}

/// An error with its causes, `: `-separated (one line for a record or an answer).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The name under which the store keeps a label's latest output: the label
/// prefixed with the canonical workspace root (`None` for a model that did
/// not come from disk), so two workspaces sharing a store never see each
/// other's `//:name`.
pub fn workspace_label_key(root: Option<&Path>, label: &str) -> String {
    match root {
        Some(r) => format!(
            "{}{label}",
            std::fs::canonicalize(r)
                .unwrap_or_else(|_| r.to_owned())
                .display()
        ),
        None => label.to_owned(),
    }
}

/// The latest action recorded under a label key ([`workspace_label_key`]), if any.
pub fn previous_payload(store: &Store, label: &str) -> Result<Option<ActionPayload>, BuildError> {
    Ok(store
        .label(label)?
        .and_then(|e| e.payload.decode::<ActionPayload>().ok()))
}

/// Why the latest action under a label key ([`workspace_label_key`]) had a different key from the one before
/// it: one line per changed field. `Ok(None)` when the label never ran;
/// an empty list when there was no earlier, different action.
pub fn explain_label(
    store: &Store,
    label: &str,
) -> Result<Option<(ActionPayload, Vec<String>)>, BuildError> {
    let Some(p) = previous_payload(store, label)? else {
        return Ok(None);
    };
    let lines = match &p.previous {
        Some(prev) => crate::key::explain(prev, &p.preimage, &p.input_labels),
        None => Vec::new(),
    };
    Ok(Some((p, lines)))
}
