//! The run manager: accepts runs (from the API, triggers and reruns), keeps
//! one queue per workspace with a limit on runs at once, drives the engine,
//! and records every event through the [`Hub`].
//!
//! Every run is in the store from the moment it is accepted (state
//! `queued`), so a restart finds it; one that was queued or running when the
//! server died is marked `interrupted` by the next server.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use strata_engine::exec::Executor;
use strata_engine::{
    expand, new_run_id, BuildOptions, Engine, Event, EventSink, Label, Loader, Pattern, RunRecord,
    TaskState, Trigger, Workspace,
};
use strata_store::Store;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{chain, ApiError, ApiResult};
use crate::hub::Hub;

/// A workspace the server serves.
#[derive(Clone, Debug)]
pub struct WorkspaceConf {
    pub name: String,
    pub root: PathBuf,
}

/// What to run.
pub struct Submit {
    /// A served workspace by name, or `None` with `model` for an inline pipeline.
    pub workspace: Option<String>,
    pub model: Option<Workspace>,
    pub targets: Vec<String>,
    pub jobs: Option<usize>,
    pub keep_going: bool,
    pub check: bool,
    pub trigger: Trigger,
    pub payloads: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub rerun_of: Option<RunRecord>,
    /// Runs with the same key that are still queued are one run: a second
    /// trigger joins the first.
    pub dedup: Option<String>,
}

impl Submit {
    pub fn new(workspace: Option<String>, targets: Vec<String>, trigger: Trigger) -> Submit {
        Submit {
            workspace,
            model: None,
            targets,
            jobs: None,
            keep_going: false,
            check: false,
            trigger,
            payloads: BTreeMap::new(),
            rerun_of: None,
            dedup: None,
        }
    }
}

/// What the manager knows of a run it accepted.
struct Active {
    cancel: CancellationToken,
    workspace: String,
    queued: bool,
}

/// Counters for `/metrics`, fed from the runs' events.
#[derive(Default)]
pub struct RunCounters {
    pub tasks_executed: AtomicU64,
    pub tasks_cached: AtomicU64,
    pub tasks_failed: AtomicU64,
    pub runs_started: AtomicU64,
}

pub struct Manager {
    store: Store,
    hub: Arc<Hub>,
    workspaces: BTreeMap<String, WorkspaceConf>,
    queues: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_runs: usize,
    active: Mutex<HashMap<String, Active>>,
    dedup: Mutex<HashMap<String, String>>,
    handles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    docker: Option<Arc<dyn Executor>>,
    load_cache: Option<PathBuf>,
    default_jobs: usize,
    pub counters: RunCounters,
}

/// The name the queue of inline runs goes by.
const INLINE: &str = "(inline)";

impl Manager {
    pub fn new(
        store: Store,
        hub: Arc<Hub>,
        workspaces: BTreeMap<String, WorkspaceConf>,
        max_runs: usize,
        docker: Option<Arc<dyn Executor>>,
        load_cache: Option<PathBuf>,
        default_jobs: usize,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            store,
            hub,
            workspaces,
            queues: Mutex::new(HashMap::new()),
            max_runs: max_runs.max(1),
            active: Mutex::new(HashMap::new()),
            dedup: Mutex::new(HashMap::new()),
            handles: Mutex::new(Vec::new()),
            docker,
            load_cache,
            default_jobs,
            counters: RunCounters::default(),
        })
    }

    /// The store directory of an on-disk store.
    pub fn store_root(&self) -> Option<PathBuf> {
        self.store.root().map(|p| p.to_owned())
    }

    pub fn workspaces(&self) -> &BTreeMap<String, WorkspaceConf> {
        &self.workspaces
    }

    pub fn workspace(&self, name: &str) -> ApiResult<&WorkspaceConf> {
        self.workspaces.get(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "No workspace `{name}`; this server serves {}",
                self.workspaces
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Loads a served workspace as it is on disk now (the load cache makes
    /// an unchanged one cheap).
    pub fn load(&self, name: &str, patterns: &[Pattern]) -> ApiResult<Workspace> {
        let conf = self.workspace(name)?;
        let mut loader = Loader::discover(&conf.root)?;
        if let Some(dir) = &self.load_cache {
            loader = loader.with_cache(dir.clone());
        }
        Ok(loader.load_patterns(patterns)?)
    }

    /// What building `patterns` of workspace `name` would do, task by task
    /// (blocking: it loads, ingests sources and resolves git refs).
    pub fn plan(
        &self,
        name: &str,
        patterns: &[Pattern],
    ) -> ApiResult<BTreeMap<String, strata_engine::Prediction>> {
        let ws = self.load(name, patterns)?;
        let targets = expand(&ws, patterns)?;
        let mut engine = Engine::new(self.store.clone(), ws, EventSink::none());
        if let Some(d) = &self.docker {
            engine = engine.with_docker(d.clone());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ApiError::internal(format!("Cannot start a runtime: {e}")))?;
        Ok(rt.block_on(engine.plan(&targets, &BuildOptions::default()))?)
    }

    /// Runs queued or running now.
    pub fn queue_len(&self) -> usize {
        self.active.lock().values().filter(|a| a.queued).count()
    }

    pub fn running(&self) -> usize {
        self.active.lock().values().filter(|a| !a.queued).count()
    }

    /// Accepts a run: checks it, records it as queued and returns its id.
    /// Errors are the caller's (a 400 naming what is wrong) or the store's.
    pub fn submit(self: &Arc<Self>, s: Submit) -> ApiResult<String> {
        let patterns = parse_patterns(&s.targets)?;
        let (ws, ws_name) = match (&s.workspace, s.model) {
            (Some(name), None) => (self.load(name, &patterns)?, name.clone()),
            (None, Some(model)) => {
                model.validate()?;
                (model, INLINE.to_owned())
            }
            _ => {
                return Err(ApiError::bad_request(
                    "Give a workspace or an inline pipeline",
                ))
            }
        };
        let targets = expand(&ws, &patterns)?;
        if let Some(key) = &s.dedup {
            let dedup = self.dedup.lock();
            if let Some(id) = dedup.get(key) {
                if self.active.lock().get(id).is_some_and(|a| a.queued) {
                    return Ok(id.clone());
                }
            }
        }
        let id = new_run_id();
        let record = RunRecord {
            id: id.clone(),
            targets: targets.iter().map(|l| l.to_string()).collect(),
            state: TaskState::Queued,
            started_ms: now_ms(),
            duration_ms: 0,
            rerun_of: s.rerun_of.as_ref().map(|r| r.id.clone()),
            tasks: BTreeMap::new(),
            workspace: s.workspace.clone(),
            trigger: Some(s.trigger.clone()),
        };
        record.save(&self.store)?;
        self.hub.record(
            &id,
            "run_queued",
            serde_json::json!({
                "event": "run_queued",
                "run": id,
                "workspace": s.workspace,
                "targets": record.targets,
                "trigger": s.trigger,
            })
            .to_string(),
        );
        let cancel = CancellationToken::new();
        self.active.lock().insert(
            id.clone(),
            Active {
                cancel: cancel.clone(),
                workspace: ws_name.clone(),
                queued: true,
            },
        );
        if let Some(key) = &s.dedup {
            self.dedup.lock().insert(key.clone(), id.clone());
        }
        let opts = BuildOptions {
            jobs: s.jobs.unwrap_or_else(|| {
                ws.settings
                    .jobs
                    .map_or(self.default_jobs, |j| j.get() as usize)
            }),
            keep_going: s.keep_going,
            check: s.check,
            executor: None,
            rerun_of: s.rerun_of,
            run_id: Some(id.clone()),
            workspace: s.workspace,
            trigger: Some(s.trigger),
            payloads: s.payloads,
        };
        let me = self.clone();
        let run_id = id.clone();
        let dedup_key = s.dedup;
        let handle = tokio::spawn(async move {
            me.drive(run_id, ws_name, ws, targets, opts, cancel, dedup_key)
                .await;
        });
        let mut handles = self.handles.lock();
        handles.retain(|h| !h.is_finished());
        handles.push(handle);
        Ok(id)
    }

    fn queue(&self, ws: &str) -> Arc<Semaphore> {
        self.queues
            .lock()
            .entry(ws.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_runs)))
            .clone()
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self: Arc<Self>,
        id: String,
        ws_name: String,
        ws: Workspace,
        targets: Vec<Label>,
        opts: BuildOptions,
        cancel: CancellationToken,
        dedup: Option<String>,
    ) {
        let queue = self.queue(&ws_name);
        let permit = tokio::select! {
            p = queue.acquire_owned() => p.ok(),
            _ = cancel.cancelled() => None,
        };
        if let Some(key) = &dedup {
            let mut d = self.dedup.lock();
            if d.get(key) == Some(&id) {
                d.remove(key);
            }
        }
        let Some(permit) = permit else {
            self.end_unstarted(&id, &opts, TaskState::Cancelled, "cancelled while queued");
            return;
        };
        if let Some(a) = self.active.lock().get_mut(&id) {
            a.queued = false;
        }
        self.counters.runs_started.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let run_id = id.clone();
        let opts2 = opts.clone();
        // Each run has a thread and a current-thread runtime of its own, as
        // under `ci build`: its scheduling never waits on another run's.
        let result = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("Cannot start a runtime for the run: {e}"))?;
            let hub = me.hub.clone();
            let sink_run = run_id.clone();
            let me2 = me.clone();
            let events = EventSink::new(move |e: Event| {
                me2.count(&e);
                let name = e.name();
                match serde_json::to_string(&e) {
                    Ok(json) => hub.record(&sink_run, name, json),
                    Err(err) => eprintln!("warning: cannot encode an event: {err}"),
                }
            });
            let mut engine = Engine::new(me.store.clone(), ws, events);
            if let Some(d) = &me.docker {
                engine = engine.with_docker(d.clone());
            }
            rt.block_on(engine.build(&targets, &opts2, cancel))
                .map_err(|e| chain(&e))
        })
        .await;
        drop(permit);
        match result {
            Ok(Ok(_run)) => {}
            Ok(Err(message)) => self.end_unstarted(&id, &opts, TaskState::Failed, &message),
            Err(join) => self.end_unstarted(
                &id,
                &opts,
                TaskState::Failed,
                &format!("The run stopped unexpectedly: {join}"),
            ),
        }
        self.active.lock().remove(&id);
        self.hub.finish(&id);
    }

    /// Ends a run that the engine did not carry to its end (cancelled while
    /// queued, or the build could not be carried out): its record says so.
    fn end_unstarted(&self, id: &str, opts: &BuildOptions, state: TaskState, message: &str) {
        let mut record = match RunRecord::load(&self.store, id) {
            Ok(r) => r,
            Err(_) => return,
        };
        if record.state.is_final() {
            return;
        }
        record.state = state;
        record.duration_ms = now_ms().saturating_sub(record.started_ms);
        record.trigger = record.trigger.or_else(|| opts.trigger.clone());
        if let Err(e) = record.save(&self.store) {
            eprintln!("warning: cannot record the end of run {id}: {e}");
        }
        self.hub.record(
            id,
            "run_finished",
            serde_json::json!({
                "event": "run_finished",
                "run": id,
                "state": state,
                "executed": 0, "cached": 0, "failed": 0, "skipped": 0,
                "duration_ms": record.duration_ms,
                "error": message,
            })
            .to_string(),
        );
        self.active.lock().remove(id);
        self.hub.finish(id);
    }

    fn count(&self, e: &Event) {
        if let Event::TaskFinished { cached, state, .. } = e {
            let c = &self.counters;
            if *cached {
                c.tasks_cached.fetch_add(1, Ordering::Relaxed);
            } else if *state == TaskState::Succeeded {
                c.tasks_executed.fetch_add(1, Ordering::Relaxed);
            } else if *state == TaskState::Failed {
                c.tasks_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Cancels a queued or running run. `Ok(false)`: it had ended already.
    pub fn cancel(&self, id: &str) -> bool {
        match self.active.lock().get(id) {
            Some(a) => {
                a.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The workspace a live run belongs to.
    pub fn live_workspace(&self, id: &str) -> Option<String> {
        self.active.lock().get(id).map(|a| a.workspace.clone())
    }

    /// Cancels every run and waits for them to end (shutdown).
    pub async fn shutdown(&self) {
        for a in self.active.lock().values() {
            a.cancel.cancel();
        }
        let handles: Vec<_> = std::mem::take(&mut *self.handles.lock());
        for h in handles {
            let _ = h.await;
        }
    }

    /// Marks the runs that a dead process left queued or running as
    /// interrupted (at startup, when this process is the store's writer).
    pub fn mark_interrupted(&self) -> Result<Vec<String>, strata_engine::BuildError> {
        let mut marked = Vec::new();
        for id in self.store.run_ids()? {
            let Ok(mut record) = RunRecord::load(&self.store, &id) else {
                continue;
            };
            if record.state.is_final() {
                continue;
            }
            // Tasks that ended after the record's last save are in the events.
            for t in finished_tasks(&self.store, &id) {
                record.tasks.entry(t.0).or_insert(t.1);
            }
            record.state = TaskState::Interrupted;
            record.save(&self.store)?;
            self.hub.record(
                &id,
                "run_finished",
                serde_json::json!({
                    "event": "run_finished",
                    "run": id,
                    "state": "interrupted",
                    "executed": record.executed(), "cached": record.cached(),
                    "failed": record.failed(), "skipped": record.skipped(),
                    "duration_ms": record.duration_ms,
                    "error": "the process running it stopped before it ended",
                })
                .to_string(),
            );
            self.hub.finish(&id);
            marked.push(id);
        }
        Ok(marked)
    }
}

/// The tasks a run's stored events say ended, as records.
fn finished_tasks(store: &Store, run: &str) -> Vec<(String, strata_engine::TaskRecord)> {
    #[derive(serde::Deserialize)]
    struct Finished {
        event: String,
        #[serde(default)]
        label: String,
        #[serde(default)]
        state: Option<TaskState>,
        #[serde(default)]
        cached: bool,
        #[serde(default)]
        output: Option<strata_store::Digest>,
        #[serde(default)]
        duration_ms: u64,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        key: Option<strata_store::Digest>,
        #[serde(default)]
        log: Option<strata_store::Digest>,
        #[serde(default)]
        context: BTreeMap<String, String>,
        #[serde(default)]
        attempts: u32,
    }
    let mut out = Vec::new();
    let mut from = 0;
    while let Ok(page) = store.events(run, from, 1024) {
        let Some(last) = page.last().map(|(s, _)| *s) else {
            break;
        };
        for (_, bytes) in &page {
            let Ok(f) = serde_json::from_slice::<Finished>(bytes) else {
                continue;
            };
            let Some(state) = f.state.filter(|_| f.event == "task_finished") else {
                continue;
            };
            let mut rec = strata_engine::TaskRecord::pending();
            rec.state = state;
            rec.cached = f.cached;
            rec.output = f.output;
            rec.duration_ms = f.duration_ms;
            rec.exit_code = f.exit_code;
            rec.error = f.error;
            rec.key = f.key;
            rec.log = f.log;
            rec.context = f.context;
            rec.attempts = f.attempts;
            out.push((f.label, rec));
        }
        from = last + 1;
    }
    out
}

pub fn parse_patterns(targets: &[String]) -> ApiResult<Vec<Pattern>> {
    let texts: Vec<String> = if targets.is_empty() {
        vec!["//...".to_owned()]
    } else {
        targets.to_vec()
    };
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Pattern::parse(t, None)
                .map_err(|e| ApiError::bad_request(format!("`targets[{i}]` is `{t}`: {e}")))
        })
        .collect()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
