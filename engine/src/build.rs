//! The scheduler: runs every ready task of the requested targets, in
//! parallel up to `jobs`, at most once per action key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_fuse::{Layers, WorkDir, WorkDirOptions};
use strata_store::{
    ActionCache, ActionEntry, Digest, IngestOptions, LabelEntry, Lineage, MergePolicy, Payload,
    Store,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink};
use crate::exec::host::HostExecutor;
use crate::exec::{ExecOutcome, ExecRequest, Executor, LogSink, TaskDirs};
use crate::key::ActionPreimage;
use crate::model::{self, Command, OnConflict, Task, TaskKind, Workspace};
use crate::record::{new_run_id, now_ms, RunRecord, TaskRecord, TaskState};
use crate::scratch::{Scratch, SlotPaths};
use crate::{BuildError, Graph, Label};

mod plan;
pub use plan::Prediction;

/// How often a running build saves its run record (with the tasks ended so
/// far): a build killed outright still shows what it did in `ci runs`, and
/// each save (a log sync) makes every record before it durable.
const RUN_SAVE_EVERY: Duration = Duration::from_secs(1);

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

/// What a timer or webhook holds when the run was given nothing for it: an
/// empty tick or payload, the same every time, so plain builds are reproducible.
fn default_payload(kind: &TaskKind) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    match kind {
        TaskKind::Webhook(_) => {
            files.insert("payload.json".to_owned(), b"{}".to_vec());
            files.insert("event".to_owned(), Vec::new());
            files.insert("delivery".to_owned(), Vec::new());
        }
        _ => {
            files.insert("tick.json".to_owned(), b"{}".to_vec());
        }
    }
    files
}

/// The fields of an [`ActionPayload`] a cache hit needs.
#[derive(Deserialize)]
struct Hit {
    output: Digest,
    #[serde(default)]
    context: BTreeMap<String, String>,
    #[serde(default)]
    log: Option<Digest>,
}

/// The fields of a label's [`ActionPayload`] that say whether it changed.
#[derive(Deserialize)]
struct LabelHead {
    key: Digest,
    output: Digest,
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

/// The scheduler's bookkeeping, by task number (position in topological order).
struct Sched<'a> {
    order: &'a [Label],
    run: &'a mut RunRecord,
    state: &'a mut [TaskState],
    users: &'a [Vec<usize>],
    unmet: &'a mut [usize],
    ready: &'a mut BTreeSet<usize>,
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

    /// The cached result of `key`: the store's own when it has one (no
    /// thread hop for the common hit), else what the cache finds, off the
    /// async threads (a remote cache waits on the network).
    async fn cached(&self, key: Digest) -> Result<Option<ActionEntry>, BuildError> {
        if let Some(hit) = self.inner.store.action(&key)? {
            return Ok(Some(hit));
        }
        let cache = self.inner.cache.clone();
        tokio::task::spawn_blocking(move || cache.lookup(&key))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))?
            .map_err(BuildError::from)
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

    /// Builds `targets` and everything they need. Returns the run record (also
    /// saved in the store) whatever the tasks did; `Err` only when the build
    /// itself could not be carried out. Cancelling `cancel` stops running
    /// tasks (their processes and mounts are cleaned up) and starts no more.
    pub async fn build(
        &self,
        targets: &[Label],
        opts: &BuildOptions,
        cancel: CancellationToken,
    ) -> Result<RunRecord, BuildError> {
        let inner = &self.inner;
        let graph = Graph::new(&inner.ws);
        let closure = graph.deps_closure(targets);
        let order: Vec<Label> = graph.topo_order_of(&closure).into_iter().cloned().collect();
        let started = Instant::now();
        let mut run = RunRecord {
            id: opts.run_id.clone().unwrap_or_else(new_run_id),
            targets: targets.iter().map(|l| l.to_string()).collect(),
            state: TaskState::Running,
            started_ms: now_ms(),
            duration_ms: 0,
            rerun_of: opts.rerun_of.as_ref().map(|r| r.id.clone()),
            // Filled in as tasks end; saved at most every RUN_SAVE_EVERY
            // while tasks end, and whole when the run ends. The record saved
            // now says that the run started (and, if this process dies, that
            // it never finished, with the tasks ended by its last save).
            tasks: BTreeMap::new(),
            workspace: opts.workspace.clone(),
            trigger: opts.trigger.clone(),
        };
        run.save(&inner.store)?;
        inner.events.send(Event::RunStarted {
            run: run.id.clone(),
            targets: run.targets.clone(),
            tasks: order.len(),
        });

        for c in strata_fuse::cleanup_stale()? {
            inner.events.send(Event::Note {
                message: c.to_string(),
            });
        }
        let jobs = opts.jobs.max(1);
        let scratch_root = inner.store.scratch_dir();
        // Runs of this process (a server runs several at once) keep their
        // scratch; what is left of runs of dead processes is removed.
        let _active = ActiveScratch::register(scratch_root.join(&run.id));
        clean_scratch(&scratch_root, &inner.events);
        let scratch = Arc::new(Scratch::new(
            inner.store.clone(),
            scratch_root.join(&run.id),
            inner.ws.settings.inputs,
            inner.events.clone(),
            jobs,
        ));

        let run_cancel = cancel.child_token();
        // Up to `jobs` commands run at once (the scratch's job tokens); twice
        // as many tasks are under way, so the next ones prepare and the last
        // ones capture while commands run.
        let in_flight = jobs * 2;

        // Tasks are numbered in topological order; what each waits for (its
        // inputs and its stage gates), who waits for it and how many of its
        // needs are unmet are computed once, so each completion costs only
        // its own dependants.
        let index: HashMap<&Label, usize> = order.iter().enumerate().map(|(i, l)| (l, i)).collect();
        let tasks: Vec<&Task> = order.iter().map(|l| &inner.ws.tasks[l]).collect();
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); order.len()];
        let mut unmet: Vec<usize> = vec![0; order.len()];
        for (i, label) in order.iter().enumerate() {
            let task = tasks[i];
            let mut n: Vec<usize> = task.inputs().into_iter().map(|l| index[l]).collect();
            if task.stage.is_some() {
                n.extend(
                    graph
                        .stage_gates(label, Some(&closure))
                        .into_iter()
                        .map(|l| index[l]),
                );
            }
            n.sort_unstable();
            n.dedup();
            for &x in &n {
                users[x].push(i);
            }
            unmet[i] = n.len();
        }
        // Ready tasks, launched in topological order.
        let mut ready: BTreeSet<usize> = (0..order.len()).filter(|&i| unmet[i] == 0).collect();
        let mut done: Vec<Option<Done>> = vec![None; order.len()];
        let mut state: Vec<TaskState> = vec![TaskState::Pending; order.len()];
        let mut running: JoinSet<(usize, TaskRecord)> = JoinSet::new();
        let mut last_save = Instant::now();
        // The periodic save (a sync of the index's log, up to hundreds of ms
        // on a busy disk) runs on a blocking thread: this thread keeps
        // reading the tasks' output and sending events meanwhile.
        let mut saving: Option<tokio::task::JoinHandle<Result<(), BuildError>>> = None;
        let mut stopping = false;
        let mut sched = Sched {
            order: &order,
            run: &mut run,
            state: &mut state,
            users: &users,
            unmet: &mut unmet,
            ready: &mut ready,
        };

        loop {
            // Launch what is ready (or settle it at once: reused from a re-run,
            // or cancelled because the run is stopping).
            while let Some(i) = sched.ready.pop_first() {
                let label = &order[i];
                if stopping {
                    let rec = not_run(TaskState::Cancelled, "cancelled before it started");
                    sched.state[i] = TaskState::Cancelled;
                    self.finish_event(label, &rec);
                    sched.run.tasks.insert(label.to_string(), rec);
                    continue;
                }
                if let Some(prev) = opts
                    .rerun_of
                    .as_ref()
                    .and_then(|r| r.tasks.get(&label.to_string()))
                    .filter(|t| t.state == TaskState::Succeeded && t.output.is_some())
                {
                    let mut rec = prev.clone();
                    rec.reused = true;
                    rec.duration_ms = 0;
                    if let Some(output) = rec.output {
                        done[i] = Some(Done {
                            output,
                            context: rec.context.clone(),
                        });
                    }
                    self.settle_state(i, rec, &mut sched);
                    continue;
                }
                if running.len() >= in_flight {
                    sched.ready.insert(i);
                    break;
                }
                let task = tasks[i];
                let inputs: Vec<(Label, Done)> = task
                    .inputs()
                    .into_iter()
                    .filter_map(|l| done[index[l]].clone().map(|d| (l.clone(), d)))
                    .collect();
                sched.state[i] = TaskState::Running;
                let me = self.clone();
                let task = task.clone();
                let cancel = run_cancel.clone();
                let scratch = scratch.clone();
                let opts = opts.clone();
                let run_id = sched.run.id.clone();
                running.spawn(async move {
                    let rec = me
                        .run_task(&task, inputs, &scratch, &opts, &run_id, cancel)
                        .await;
                    (i, rec)
                });
            }
            if running.is_empty() {
                break;
            }
            let joined = tokio::select! {
                j = running.join_next() => j,
                _ = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    run_cancel.cancel();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            let (i, rec) = joined.map_err(|e| BuildError::Join(e.to_string()))?;
            if rec.state == TaskState::Succeeded {
                if let Some(output) = rec.output {
                    done[i] = Some(Done {
                        output,
                        context: rec.context.clone(),
                    });
                }
            } else if !opts.keep_going && !stopping {
                stopping = true;
                run_cancel.cancel();
            }
            self.settle_state(i, rec, &mut sched);
            if last_save.elapsed() >= RUN_SAVE_EVERY
                && saving.as_ref().is_none_or(|h| h.is_finished())
            {
                if let Some(done) = saving.take() {
                    done.await.map_err(|e| BuildError::Join(e.to_string()))??;
                }
                let (record, store) = (sched.run.clone(), inner.store.clone());
                saving = Some(tokio::task::spawn_blocking(move || record.save(&store)));
                last_save = Instant::now();
            }
        }
        // A progress save still under way must land before the final one.
        if let Some(done) = saving.take() {
            done.await.map_err(|e| BuildError::Join(e.to_string()))??;
        }
        // Whatever never became ready waited on something that did not succeed.
        for (i, label) in order.iter().enumerate() {
            if state[i] == TaskState::Pending {
                let rec = if stopping {
                    not_run(TaskState::Cancelled, "not started: the build stopped")
                } else {
                    not_run(
                        TaskState::Skipped,
                        "skipped: a task it needs did not succeed",
                    )
                };
                self.finish_event(label, &rec);
                run.tasks.insert(label.to_string(), rec);
            }
        }

        // Every task is done with it: unmounts the inputs, removes the directory.
        drop(scratch);
        run.duration_ms = started.elapsed().as_millis() as u64;
        run.state = if run.tasks.values().all(|t| t.state == TaskState::Succeeded) {
            TaskState::Succeeded
        } else if cancel.is_cancelled() {
            TaskState::Cancelled
        } else {
            TaskState::Failed
        };
        run.save(&inner.store)?;
        inner.events.send(Event::RunFinished {
            run: run.id.clone(),
            state: run.state,
            executed: run.executed(),
            cached: run.cached(),
            failed: run.failed(),
            skipped: run.skipped(),
            duration_ms: run.duration_ms,
        });
        Ok(run)
    }

    /// Records a task's end and makes its dependants ready (on success) or
    /// skipped (otherwise, transitively).
    fn settle_state(&self, i: usize, rec: TaskRecord, s: &mut Sched<'_>) {
        let ok = rec.state == TaskState::Succeeded;
        s.state[i] = rec.state;
        self.finish_event(&s.order[i], &rec);
        s.run.tasks.insert(s.order[i].to_string(), rec);
        let mut stack = vec![(i, ok)];
        while let Some((t, ok)) = stack.pop() {
            for &u in &s.users[t] {
                if s.state[u] != TaskState::Pending {
                    continue;
                }
                if ok {
                    s.unmet[u] -= 1;
                    if s.unmet[u] == 0 {
                        s.ready.insert(u);
                    }
                } else {
                    let rec = not_run(
                        TaskState::Skipped,
                        "skipped: a task it needs did not succeed",
                    );
                    s.state[u] = TaskState::Skipped;
                    self.finish_event(&s.order[u], &rec);
                    s.run.tasks.insert(s.order[u].to_string(), rec);
                    stack.push((u, false));
                }
            }
        }
    }

    fn finish_event(&self, label: &Label, rec: &TaskRecord) {
        self.inner.events.send(Event::TaskFinished {
            label: label.to_string(),
            state: rec.state,
            cached: rec.cached || rec.reused,
            output: rec.output,
            duration_ms: rec.duration_ms,
            exit_code: rec.exit_code,
            error: rec.error.clone(),
            key: rec.key,
            log: rec.log,
            context: rec.context.clone(),
            attempts: rec.attempts,
        });
    }

    /// Runs one task to a record; never fails (a problem is a failed record).
    async fn run_task(
        &self,
        task: &Task,
        inputs: Vec<(Label, Done)>,
        scratch: &Arc<Scratch>,
        opts: &BuildOptions,
        run_id: &str,
        cancel: CancellationToken,
    ) -> TaskRecord {
        let started = Instant::now();
        let mut rec = TaskRecord::pending();
        rec.started_ms = now_ms();
        let res = match &task.kind {
            TaskKind::Run(r) => {
                self.run_command(task, r, &inputs, scratch, opts, run_id, cancel, &mut rec)
                    .await
            }
            TaskKind::Merge(m) => {
                self.run_merge(task, m, &inputs, scratch, &cancel, run_id, &mut rec)
                    .await
            }
            TaskKind::LocalSource(s) => {
                self.run_local_source(task, s, scratch, &cancel, run_id, &mut rec)
                    .await
            }
            TaskKind::GitSource(g) => {
                self.run_git_source(task, g, scratch, &cancel, run_id, &mut rec)
                    .await
            }
            TaskKind::Timer(_) | TaskKind::Webhook(_) => {
                self.run_event_source(task, opts, scratch, run_id, &mut rec)
                    .await
            }
        };
        if let Err(e) = res {
            rec.state = TaskState::Failed;
            rec.error = Some(error_chain(&e));
        }
        rec.duration_ms = (started.elapsed().as_millis() as u64).saturating_sub(rec.queued_ms);
        rec
    }

    fn inherited_context(inputs: &[(Label, Done)]) -> BTreeMap<String, String> {
        let mut ctx = BTreeMap::new();
        for (_, d) in inputs {
            for (k, v) in &d.context {
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx
    }

    fn executor_for(
        &self,
        r: &model::Run,
        opts: &BuildOptions,
    ) -> Result<Arc<dyn Executor>, BuildError> {
        let inner = &self.inner;
        let wanted = opts
            .executor
            .or(r.executor)
            .or(if r.image.is_some() || !r.services.is_empty() {
                Some(model::Executor::Docker)
            } else {
                None
            })
            .or(inner.ws.settings.executor)
            .unwrap_or(if inner.docker.is_some() && r.image.is_some() {
                model::Executor::Docker
            } else {
                model::Executor::Host
            });
        match wanted {
            model::Executor::Host => Ok(inner.host.clone()),
            model::Executor::Docker => inner.docker.clone().ok_or_else(|| match &r.image {
                Some(image) => BuildError::ImageNeedsDocker {
                    image: image.clone(),
                },
                None => BuildError::ExecutorUnavailable {
                    executor: "docker".into(),
                    reason:
                        "Docker is not reachable; start it (`dockerd &`) or use `--executor host`"
                            .into(),
                },
            }),
        }
    }

    /// Everything that goes into a command's action key, from its resolved
    /// inputs: what `run_command` runs and what `plan` predicts with.
    pub(crate) async fn command_action(
        &self,
        task: &Task,
        r: &model::Run,
        inputs: &[(Label, Done)],
        opts: &BuildOptions,
    ) -> Result<CommandAction, BuildError> {
        let executor = self.executor_for(r, opts)?;
        let image = match &r.image {
            Some(i) => Some(executor.resolve_image(i).await?),
            None => None,
        };
        let context = Self::inherited_context(inputs);
        let argv = match &r.cmd {
            Command::Argv(a) => a.clone(),
            Command::Script(s) => vec!["/bin/sh".into(), "-ec".into(), s.clone()],
        };
        let by_label: BTreeMap<&Label, &Done> = inputs.iter().map(|(l, d)| (l, d)).collect();
        let base = task.transform.as_ref().map(|l| by_label[l].output);
        let mut pre = ActionPreimage::new("run", &executor.platform());
        pre.image = image.clone();
        pre.command = argv.clone();
        pre.env = r.env.clone();
        pre.secret_names = r.secret_env.clone();
        pre.context = context.clone();
        pre.inputs = task
            .deps
            .iter()
            .map(|d| (d.mount.clone(), by_label[&d.label].output))
            .collect();
        pre.base = base;
        pre.workdir = r.workdir.clone();
        pre.user = r.user.clone();
        pre.network = r.network;
        if !r.services.is_empty() {
            // Service images are keyed by content too: a retagged image changes the key.
            let mut services = r.services.clone();
            for s in services.values_mut() {
                s.image = executor.resolve_image(&s.image).await?;
            }
            pre.extra.insert(
                "services".into(),
                serde_json::to_string(&services).unwrap_or_default(),
            );
        }
        let input_labels: BTreeMap<String, String> = task
            .deps
            .iter()
            .map(|d| (d.mount.clone(), d.label.to_string()))
            .collect();
        Ok(CommandAction {
            pre,
            executor,
            image,
            argv,
            context,
            input_labels,
        })
    }

    /// A merge's action key preimage and the labels of its sides.
    pub(crate) fn merge_action(
        m: &model::Merge,
        inputs: &[(Label, Done)],
    ) -> (ActionPreimage, BTreeMap<String, String>) {
        let by_label: BTreeMap<&Label, &Done> = inputs.iter().map(|(l, d)| (l, d)).collect();
        let base = by_label[&m.base].output;
        let sides: Vec<Digest> = m.sides.iter().map(|s| by_label[s].output).collect();
        let mut pre = ActionPreimage::new("merge", "store");
        pre.base = Some(base);
        pre.context = Self::inherited_context(inputs);
        for (i, s) in sides.iter().enumerate() {
            pre.inputs.insert(format!("side{i:03}"), *s);
        }
        pre.extra.insert(
            "on_conflict".into(),
            format!("{:?}", m.on_conflict).to_lowercase(),
        );
        let input_labels: BTreeMap<String, String> = m
            .sides
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("side{i:03}"), s.to_string()))
            .collect();
        (pre, input_labels)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_command(
        &self,
        task: &Task,
        r: &model::Run,
        inputs: &[(Label, Done)],
        scratch: &Arc<Scratch>,
        opts: &BuildOptions,
        run_id: &str,
        cancel: CancellationToken,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let inner = &self.inner;
        let store = &inner.store;
        let label = task.label.to_string();
        let CommandAction {
            pre,
            executor,
            image,
            argv,
            context,
            input_labels,
        } = self.command_action(task, r, inputs, opts).await?;
        let base = pre.base;
        let key = pre.key();
        rec.key = Some(key);
        let cacheable = r.pure && !r.effects;

        let mut cached_output = None;
        if cacheable {
            if let Some(hit) = self.cached(key).await? {
                if let Ok(p) = hit.payload.decode::<Hit>() {
                    if !opts.check {
                        rec.state = TaskState::Succeeded;
                        rec.cached = true;
                        rec.output = Some(p.output);
                        rec.log = p.log;
                        rec.context = p.context.clone();
                        rec.exit_code = Some(0);
                        let done = Outcome {
                            output: p.output,
                            context: &p.context,
                            log: p.log,
                        };
                        self.record_success(&label, &pre, key, &input_labels, done, run_id, false)?;
                        return Ok(());
                    }
                    cached_output = Some(p.output);
                }
            }
        }

        let prev = if r.pure {
            None
        } else {
            store
                .label(&self.label_record_key(&label))?
                .map(|e| e.layer)
        };
        let secrets: BTreeMap<String, String> = r
            .secret_env
            .iter()
            .filter_map(|n| std::env::var(n).ok().map(|v| (n.clone(), v)))
            .collect();
        let missing: Vec<&String> = r
            .secret_env
            .iter()
            .filter(|n| !secrets.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            rec.state = TaskState::Failed;
            rec.error = Some(format!(
                "Secret {} is not set in the environment of `ci`; export it and build again",
                quoted(&missing)
            ));
            return Ok(());
        }
        let mut env = r.env.clone();
        env.extend(context.clone());

        let attempts = r.retries + 1;
        for attempt in 1..=attempts {
            rec.attempts = attempt;
            inner.events.send(Event::TaskStarted {
                label: label.clone(),
                attempt,
                executor: executor.name().into(),
            });
            let mut slot = scratch.slot()?;
            let view = scratch.view_name(&slug(&label));
            let prepared = self
                .prepare(scratch, slot.paths(), view, task, inputs, base, prev)
                .await?;
            let first = inner
                .announced
                .lock()
                .map(|mut a| a.insert(prepared.strategy.clone()))
                .unwrap_or(false);
            if first {
                inner.events.send(Event::Note {
                    message: format!("work directories: {}", prepared.note),
                });
            }
            // Truncated, not made anew: the slot's file is reused.
            let log_path = slot.paths().log;
            let log_file =
                std::fs::File::create(&log_path).map_err(BuildError::io("create", &log_path))?;
            let log = LogSink::new(
                &label,
                inner.events.clone(),
                secrets.values().cloned().collect(),
                log_file,
            );
            let req = ExecRequest {
                label: label.clone(),
                argv: argv.clone(),
                env: env.clone(),
                secrets: secrets.clone(),
                image: image.clone(),
                dirs: prepared.dirs.clone(),
                workdir: r.workdir.clone(),
                user: r.user.clone(),
                network: r.network,
                services: r.services.clone(),
                timeout: r.timeout_secs.map(Duration::from_secs),
                cancel: cancel.clone(),
                log: log.clone(),
            };
            let outcome = match self.job(scratch, &cancel, rec).await {
                Some(_token) => executor.run(req).await,
                None => Ok(ExecOutcome {
                    cancelled: true,
                    ..ExecOutcome::default()
                }),
            };
            // Capture even a failed attempt: its partial output is kept.
            let finished = self
                .finish_attempt(scratch, prepared, slot.paths(), &label, base)
                .await;
            let outcome = outcome?;
            let (output, log_blob, written) = finished?;
            slot.reusable();
            rec.output = Some(output);
            rec.log = log_blob;
            rec.exit_code = outcome.exit_code;
            if outcome.success() {
                let mut ctx = context.clone();
                match written {
                    Ok(w) => ctx.extend(w),
                    Err(msg) => {
                        rec.state = TaskState::Failed;
                        rec.error = Some(msg);
                        return Ok(());
                    }
                }
                rec.context = ctx.clone();
                if let Some(expected) = cached_output {
                    if expected != output {
                        let changes = store.diff(&expected, &output)?;
                        let paths: Vec<String> =
                            changes.iter().map(|c| c.path.to_string()).collect();
                        rec.state = TaskState::Failed;
                        rec.error = Some(format!(
                            "Not deterministic: the output differs from the cached one at {}",
                            quoted(&paths)
                        ));
                        return Ok(());
                    }
                }
                rec.state = TaskState::Succeeded;
                rec.error = None;
                let done = Outcome {
                    output,
                    context: &ctx,
                    log: log_blob,
                };
                self.record_success(&label, &pre, key, &input_labels, done, run_id, cacheable)?;
                return Ok(());
            }
            rec.state = if outcome.cancelled {
                TaskState::Cancelled
            } else {
                TaskState::Failed
            };
            let mut why = outcome.describe(r.timeout_secs.map(Duration::from_secs));
            let tail = log.tail();
            if !tail.is_empty() && !outcome.cancelled {
                why.push('\n');
                why.push_str(&tail.join("\n"));
            }
            rec.error = Some(why);
            if outcome.cancelled || cancel.is_cancelled() {
                break;
            }
        }
        Ok(())
    }

    /// Waits for a job token, counting the wait in `rec.queued_ms`; `None`
    /// when the run is cancelled first.
    async fn job<'s>(
        &self,
        scratch: &'s Scratch,
        cancel: &CancellationToken,
        rec: &mut TaskRecord,
    ) -> Option<tokio::sync::SemaphorePermit<'s>> {
        let waiting = Instant::now();
        let token = scratch.job(cancel).await;
        rec.queued_ms += waiting.elapsed().as_millis() as u64;
        token
    }

    /// Lays out one attempt's directories in its slot: the inputs (a view of
    /// the inputs mount, or read-only copies), the previous output likewise,
    /// the work directory over the base, the context file.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        scratch: &Arc<Scratch>,
        slot: SlotPaths,
        view: String,
        task: &Task,
        inputs: &[(Label, Done)],
        base: Option<Digest>,
        prev: Option<Digest>,
    ) -> Result<Prepared, BuildError> {
        let store = self.inner.store.clone();
        let scratch = scratch.clone();
        let mounts: Vec<(String, Digest)> = task
            .deps
            .iter()
            .filter_map(|d| {
                inputs
                    .iter()
                    .find(|(l, _)| *l == d.label)
                    .map(|(_, done)| (d.mount.clone(), done.output))
            })
            .collect();
        let reads = !mounts.is_empty() || prev.is_some();
        // Most often nothing here blocks for long: views are added to a
        // mount already made and the work directory is the slot's empty
        // one. That is done in place; mounting, copying and overlays go to
        // a blocking thread.
        let quick = base.is_none() && (!reads || scratch.inputs_mounted());
        let work = move || -> Result<Prepared, BuildError> {
            let mut views = Vec::new();
            // A task that reads nothing gets the slot's empty `in/`: no mount
            // is made for a pipeline whose tasks have no inputs.
            let mount = if reads { scratch.inputs()? } else { None };
            let copied = mount.is_none() && reads;
            let (in_dir, prev_dir) = match mount {
                Some(m) => {
                    let in_dir = m.add_view(&view, &Layers::Named(mounts))?;
                    views.push(view.clone());
                    let prev_dir = match prev {
                        Some(p) => {
                            let name = format!("{view}.prev");
                            let d = m.add_view(&name, &Layers::One(p))?;
                            views.push(name);
                            Some(d)
                        }
                        None => None,
                    };
                    (in_dir, prev_dir)
                }
                None => {
                    let in_dir = slot.inputs.clone();
                    std::fs::create_dir_all(&in_dir).map_err(BuildError::io("create", &in_dir))?;
                    for (mount, layer) in &mounts {
                        let p = in_dir.join(mount);
                        store.checkout(layer, &p)?;
                        make_read_only(&p);
                    }
                    let prev_dir = match prev {
                        Some(p) => {
                            let pd = slot.prev.clone();
                            store.checkout(&p, &pd)?;
                            make_read_only(&pd);
                            Some(pd)
                        }
                        None => None,
                    };
                    (in_dir, prev_dir)
                }
            };
            let context = slot.context.clone();
            std::fs::write(&context, b"").map_err(BuildError::io("create", &context))?;
            let work = match base {
                None => WorkDir::empty_in(&store, &slot.work)?,
                Some(_) => WorkDir::create(&store, base, &slot.dir, &WorkDirOptions::default())?,
            };
            let strategy = work.strategy().to_string();
            let note = match work.note() {
                Some(n) => format!("{strategy} ({n})"),
                None => strategy.clone(),
            };
            Ok(Prepared {
                dirs: TaskDirs {
                    inputs: in_dir,
                    work: work.path().to_owned(),
                    prev: prev_dir,
                    context,
                },
                work,
                strategy,
                note,
                views,
                copied,
            })
        };
        if quick {
            work()
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| BuildError::Join(e.to_string()))?
        }
    }

    /// Captures the work directory, stores the log, reads the context file,
    /// and leaves the slot as it was found (work directory empty, views
    /// removed, copies deleted).
    async fn finish_attempt(
        &self,
        scratch: &Arc<Scratch>,
        prepared: Prepared,
        slot: SlotPaths,
        label: &str,
        base: Option<Digest>,
    ) -> Result<
        (
            Digest,
            Option<Digest>,
            Result<BTreeMap<String, String>, String>,
        ),
        BuildError,
    > {
        let store = self.inner.store.clone();
        let scratch = scratch.clone();
        let label = label.to_owned();
        tokio::task::spawn_blocking(move || {
            // GC in this process must not sweep between publication and record.
            let _hold = store.hold();
            if !prepared.views.is_empty() {
                if let Some(m) = scratch.inputs()? {
                    for v in &prepared.views {
                        m.remove_view(v);
                    }
                }
            }
            // Copied inputs and the previous output are done with: delete
            // them before the capture syncs, so their pages are dropped
            // rather than written out only to be deleted.
            if prepared.copied {
                strata_fuse::remove_tree(&slot.prev)
                    .map_err(BuildError::io("remove", &slot.prev))?;
            }
            // The slot's own `in/` must be empty for the next task: it holds
            // the copies, and on the host a task that reads nothing may have
            // written into it (root ignores its mode).
            if prepared.dirs.inputs == slot.inputs {
                strata_fuse::empty_dir(&slot.inputs)?;
            }
            // The log first: the capture always ends with a sync of new
            // blobs, which makes it durable before any record names it.
            let log_path = slot.log;
            let log_bytes = std::fs::read(&log_path).map_err(BuildError::io("read", &log_path))?;
            let log = if log_bytes.is_empty() {
                None
            } else {
                Some(store.blobs().put(&log_bytes)?.0)
            };
            let output = prepared.work.capture_and_close(&store)?;
            store.record_layer(
                &output,
                Some(&Lineage {
                    parent: base,
                    task: Some(label),
                    how: "task".into(),
                    created: now_ms() / 1000,
                }),
            )?;
            let ctx_path = &prepared.dirs.context;
            let written = match std::fs::read(ctx_path) {
                Ok(bytes) => parse_context(&bytes),
                Err(e) => Err(format!("Cannot read the context file: {e}")),
            };
            Ok((output, log, written))
        })
        .await
        .map_err(|e| BuildError::Join(e.to_string()))?
    }

    /// Records a successful action: in the action cache when `cacheable`,
    /// and as the label's latest output (left as it is when neither the key
    /// nor the output changed, so a fully cached build writes nothing per task).
    #[allow(clippy::too_many_arguments)]
    fn record_success(
        &self,
        label: &str,
        pre: &ActionPreimage,
        key: Digest,
        input_labels: &BTreeMap<String, String>,
        done: Outcome<'_>,
        run_id: &str,
        cacheable: bool,
    ) -> Result<(), BuildError> {
        let store = &self.inner.store;
        let payload = |previous| ActionPayload {
            output: done.output,
            context: done.context.clone(),
            log: done.log,
            key,
            preimage: pre.clone(),
            input_labels: input_labels.clone(),
            run: run_id.to_owned(),
            previous,
        };
        let key_name = self.label_record_key(label);
        let before = store.label(&key_name)?;
        // Most often (a cached build) the label already names this action
        // and output: the two fields are all that is decoded, and nothing
        // else is built.
        let head = before
            .as_ref()
            .and_then(|b| b.payload.decode::<LabelHead>().ok());
        let label_unchanged = matches!(&head, Some(h) if h.key == key && h.output == done.output);
        if label_unchanged && !cacheable {
            return Ok(());
        }
        let previous = match head {
            Some(_) if !label_unchanged => before
                .and_then(|b| b.payload.decode::<ActionPayload>().ok())
                .and_then(|b| {
                    if b.key != key {
                        Some(Box::new(b.preimage))
                    } else {
                        b.previous
                    }
                }),
            _ => None,
        };
        // One encoding serves both records unless the label keeps a
        // previous preimage.
        let plain = Payload::new(&payload(None)).map_err(BuildError::encode("an action"))?;
        let action = cacheable.then(|| ActionEntry {
            layers: vec![done.output],
            blobs: done.log.into_iter().collect(),
            payload: plain.clone(),
            created: now_ms() / 1000,
        });
        let label_entry = match (label_unchanged, previous) {
            (true, _) => None,
            (false, None) => Some(LabelEntry {
                layer: done.output,
                payload: plain,
                updated: now_ms() / 1000,
            }),
            (false, Some(previous)) => Some(LabelEntry {
                layer: done.output,
                payload: Payload::new(&payload(Some(previous)))
                    .map_err(BuildError::encode("a label record"))?,
                updated: now_ms() / 1000,
            }),
        };
        store.put_action_and_label(
            action.as_ref().map(|a| (&key, a)),
            label_entry.as_ref().map(|l| (key_name.as_str(), l)),
        )?;
        if let Some(a) = &action {
            self.inner.cache.recorded(&key, a);
        }
        Ok(())
    }

    /// Looks up `pre`; on a hit fills `rec` and returns true.
    async fn try_cache(
        &self,
        label: &str,
        pre: &ActionPreimage,
        input_labels: &BTreeMap<String, String>,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<bool, BuildError> {
        let key = pre.key();
        rec.key = Some(key);
        if let Some(hit) = self.cached(key).await? {
            if let Ok(p) = hit.payload.decode::<Hit>() {
                rec.state = TaskState::Succeeded;
                rec.cached = true;
                rec.output = Some(p.output);
                rec.context = p.context.clone();
                let done = Outcome {
                    output: p.output,
                    context: &p.context,
                    log: None,
                };
                self.record_success(label, pre, key, input_labels, done, run_id, false)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records a computed output of a non-command task (merge, source).
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        label: &str,
        pre: &ActionPreimage,
        input_labels: &BTreeMap<String, String>,
        output: Digest,
        context: BTreeMap<String, String>,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let done = Outcome {
            output,
            context: &context,
            log: None,
        };
        // `try_cache` computed the key before the work was done.
        let key = rec.key.unwrap_or_else(|| pre.key());
        self.record_success(label, pre, key, input_labels, done, run_id, true)?;
        rec.state = TaskState::Succeeded;
        rec.output = Some(output);
        rec.context = context;
        rec.attempts = 1;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_merge(
        &self,
        task: &Task,
        m: &model::Merge,
        inputs: &[(Label, Done)],
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let by_label: BTreeMap<&Label, &Done> = inputs.iter().map(|(l, d)| (l, d)).collect();
        let base = by_label[&m.base].output;
        let sides: Vec<Digest> = m.sides.iter().map(|s| by_label[s].output).collect();
        let policy = match m.on_conflict {
            OnConflict::Fail => MergePolicy::Fail,
            OnConflict::Ours => MergePolicy::Ours,
            OnConflict::Theirs => MergePolicy::Theirs,
        };
        let (pre, input_labels) = Self::merge_action(m, inputs);
        if self
            .try_cache(&label, &pre, &input_labels, run_id, rec)
            .await?
        {
            return Ok(());
        }
        let Some(_token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let store = self.inner.store.clone();
        let merged = tokio::task::spawn_blocking(
            move || -> Result<Result<Digest, Vec<String>>, BuildError> {
                let mut acc = sides[0];
                let mut conflicts = Vec::new();
                for side in &sides[1..] {
                    let out = store.merge(&base, &acc, side, policy)?;
                    conflicts.extend(out.conflicts.iter().map(|p| p.to_string()));
                    match out.merged {
                        Some(d) => acc = d,
                        None => return Ok(Err(conflicts)),
                    }
                }
                store.record_layer(
                    &acc,
                    Some(&Lineage {
                        parent: Some(base),
                        task: None,
                        how: "merge".into(),
                        created: now_ms() / 1000,
                    }),
                )?;
                Ok(Ok(acc))
            },
        )
        .await
        .map_err(|e| BuildError::Join(e.to_string()))??;
        match merged {
            Ok(out) => self.settle(
                &label,
                &pre,
                &input_labels,
                out,
                pre.context.clone(),
                run_id,
                rec,
            ),
            Err(conflicts) => {
                rec.state = TaskState::Failed;
                rec.attempts = 1;
                rec.error = Some(format!(
                    "Merge conflict: both sides changed {} differently; reconcile them or set `on_conflict = \"ours\"` or `\"theirs\"`",
                    quoted(&conflicts)
                ));
                Ok(())
            }
        }
    }

    /// Where a local source's directory is and how it is ingested.
    pub(crate) fn local_source_ingest(
        &self,
        label: &str,
        s: &model::LocalSource,
    ) -> (PathBuf, IngestOptions) {
        let dir = self.workspace_root().join(&s.path);
        let mut exclude = s.exclude.clone();
        // Never ingest the store itself when it lives in the workspace.
        if let Some(store_root) = self.inner.store.root() {
            if let (Ok(d), Ok(st)) = (
                std::fs::canonicalize(&dir),
                std::fs::canonicalize(store_root),
            ) {
                if let Ok(rel) = st.strip_prefix(&d) {
                    if !rel.as_os_str().is_empty() {
                        exclude.push(format!("/{}", rel.display()));
                    }
                }
            }
        }
        let opts = IngestOptions {
            ignore_files: true,
            exclude,
            lineage: Some(Lineage {
                parent: None,
                task: Some(label.to_owned()),
                how: "source".into(),
                created: now_ms() / 1000,
            }),
            ..IngestOptions::default()
        };
        (dir, opts)
    }

    /// The preimage of a git source whose ref resolved to `commit`.
    pub(crate) fn git_source_preimage(g: &model::GitSource, commit: &str) -> ActionPreimage {
        let mut pre = ActionPreimage::new("git_source", "store");
        pre.extra.insert("url".into(), g.url.clone());
        pre.extra.insert("commit".into(), commit.to_owned());
        pre
    }

    /// The preimage of a local source whose directory ingested as `layer`.
    pub(crate) fn local_source_preimage(s: &model::LocalSource, layer: Digest) -> ActionPreimage {
        let mut pre = ActionPreimage::new("local_source", "store");
        pre.base = Some(layer);
        pre.extra.insert("path".into(), s.path.clone());
        pre.extra.insert("exclude".into(), s.exclude.join("\n"));
        pre
    }

    async fn run_local_source(
        &self,
        task: &Task,
        s: &model::LocalSource,
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let (dir, opts) = self.local_source_ingest(&label, s);
        let store = self.inner.store.clone();
        let Some(token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let report = tokio::task::spawn_blocking(move || store.ingest(&dir, &opts))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))??;
        drop(token);
        let pre = Self::local_source_preimage(s, report.layer);
        if self
            .try_cache(&label, &pre, &BTreeMap::new(), run_id, rec)
            .await?
        {
            return Ok(());
        }
        self.settle(
            &label,
            &pre,
            &BTreeMap::new(),
            report.layer,
            BTreeMap::new(),
            run_id,
            rec,
        )
    }

    /// A timer or webhook: its output is the payload this run was given (the
    /// tick, the delivery), written as files and ingested; its key is that
    /// layer, so the same payload twice is a cache hit downstream.
    async fn run_event_source(
        &self,
        task: &Task,
        opts: &BuildOptions,
        scratch: &Scratch,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let files = match opts.payloads.get(&label) {
            Some(files) => files.clone(),
            None => default_payload(&task.kind),
        };
        let dir = scratch.root().join(format!("{}-payload", slug(&label)));
        let write = |dir: &Path| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            for (name, bytes) in &files {
                std::fs::write(dir.join(name), bytes)?;
            }
            Ok(())
        };
        write(&dir).map_err(|source| BuildError::Io {
            action: "write the payload of",
            path: dir.clone(),
            source,
        })?;
        let layer = self
            .ingest_scratch(&label, dir, "event", Vec::new())
            .await?;
        let mut pre = ActionPreimage::new(task.kind_name(), "store");
        pre.base = Some(layer);
        if self
            .try_cache(&label, &pre, &BTreeMap::new(), run_id, rec)
            .await?
        {
            return Ok(());
        }
        self.settle(
            &label,
            &pre,
            &BTreeMap::new(),
            layer,
            BTreeMap::new(),
            run_id,
            rec,
        )
    }

    /// Ingests a directory this run made in its scratch (a fetched
    /// repository, a payload) as `label`'s layer, then removes it.
    async fn ingest_scratch(
        &self,
        label: &str,
        dir: PathBuf,
        how: &str,
        exclude: Vec<String>,
    ) -> Result<Digest, BuildError> {
        let store = self.inner.store.clone();
        let opts = IngestOptions {
            exclude,
            no_stat_cache: true,
            lineage: Some(Lineage {
                parent: None,
                task: Some(label.to_owned()),
                how: how.into(),
                created: now_ms() / 1000,
            }),
            ..IngestOptions::default()
        };
        let d2 = dir.clone();
        let report = tokio::task::spawn_blocking(move || store.ingest(&d2, &opts))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))??;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(report.layer)
    }

    async fn run_git_source(
        &self,
        task: &Task,
        g: &model::GitSource,
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let url = git_url(&self.workspace_root(), g);
        let commit = crate::git::resolve(&url, &g.rev).await?;
        let pre = Self::git_source_preimage(g, &commit);
        if self
            .try_cache(&label, &pre, &BTreeMap::new(), run_id, rec)
            .await?
        {
            return Ok(());
        }
        let Some(_token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let dir = scratch.root().join(format!("{}-git", slug(&label)));
        crate::git::fetch(&url, &commit, &dir).await?;
        let layer = self
            .ingest_scratch(&label, dir, "git", vec!["/.git".into()])
            .await?;
        let mut ctx = BTreeMap::new();
        ctx.insert("CI_GIT_COMMIT".to_owned(), commit);
        self.settle(&label, &pre, &BTreeMap::new(), layer, ctx, run_id, rec)
    }
}

/// What a successful action produced.
struct Outcome<'a> {
    output: Digest,
    context: &'a BTreeMap<String, String>,
    log: Option<Digest>,
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

struct Prepared {
    dirs: TaskDirs,
    work: WorkDir,
    strategy: String,
    note: String,
    /// Views of the inputs mount made for the attempt.
    views: Vec<String>,
    /// Inputs and previous output were copied into the slot (`in/`, `prev`).
    copied: bool,
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

/// Parses `KEY=VALUE` lines; blank lines and `#` comments are ignored.
fn parse_context(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| "The context file is not UTF-8".to_owned())?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "Context file line {}: expected `KEY=VALUE`, got `{line}`",
                i + 1
            ));
        };
        let valid = !k.is_empty()
            && k.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "Context file line {}: `{k}` is not a variable name (letters, digits, `_`)",
                i + 1
            ));
        }
        if k.starts_with("CI_") && matches!(k, "CI_IN" | "CI_WORK" | "CI_PREV" | "CI_CONTEXT") {
            return Err(format!("Context file line {}: `{k}` is reserved", i + 1));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Clears the write bits of a checked-out tree (symlinks untouched).
fn make_read_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_symlink() {
        return;
    }
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                make_read_only(&e.path());
            }
        }
    }
    let mode = meta.permissions().mode() & !0o222;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Removes work directories of runs that ended without cleaning up (the
/// store's write lock guarantees no other build is using them).
/// Where a git source's repository is: its URL, or its path against the
/// workspace root.
fn git_url(root: &Path, g: &model::GitSource) -> String {
    if g.url.contains("://") || g.url.contains('@') || Path::new(&g.url).is_absolute() {
        g.url.clone()
    } else {
        root.join(&g.url).display().to_string()
    }
}

/// The commit a git source's ref names now (what its next build would fetch).
pub async fn resolve_git_source(root: &Path, g: &model::GitSource) -> Result<String, BuildError> {
    crate::git::resolve(&git_url(root, g), &g.rev).await
}

/// The scratch directories of the runs under way in this process.
static ACTIVE_SCRATCH: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());

/// Marks a run's scratch directory as in use until dropped.
struct ActiveScratch(PathBuf);

impl ActiveScratch {
    fn register(dir: PathBuf) -> ActiveScratch {
        if let Ok(mut set) = ACTIVE_SCRATCH.lock() {
            set.insert(dir.clone());
        }
        ActiveScratch(dir)
    }
}

impl Drop for ActiveScratch {
    fn drop(&mut self) {
        if let Ok(mut set) = ACTIVE_SCRATCH.lock() {
            set.remove(&self.0);
        }
    }
}

fn clean_scratch(root: &Path, events: &EventSink) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if ACTIVE_SCRATCH.lock().is_ok_and(|set| set.contains(&p)) {
            continue;
        }
        if matches!(strata_fuse::remove_tree(&p), Ok(true)) {
            events.send(Event::Note {
                message: format!(
                    "Removed leftover work directory `{}` of an interrupted run",
                    p.display()
                ),
            });
        }
    }
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
