//! The scheduler: runs every ready task of the requested targets, in
//! parallel up to `jobs`, at most once per action key, and settles each
//! task's end (its dependants become ready, or are skipped).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink};
use crate::model::{Task, TaskKind};
use crate::record::{new_run_id, now_ms, RunRecord, TaskRecord, TaskState};
use crate::scratch::Scratch;
use crate::{BuildError, Graph, Label};

use super::{error_chain, not_run, BuildOptions, Done, Engine};

impl Engine {
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
        let mut running: JoinSet<(usize, TaskRecord, Option<Incomplete>)> = JoinSet::new();
        // Producers run again in this run because an output of theirs
        // turned out incomplete (at most once each).
        let mut remade: Vec<bool> = vec![false; order.len()];
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
                    let (rec, incomplete) = me
                        .run_task(&task, inputs, &scratch, &opts, &run_id, cancel)
                        .await;
                    (i, rec, incomplete)
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
            let (i, rec, incomplete) = joined.map_err(|e| BuildError::Join(e.to_string()))?;
            // An input lacking an object (a blob removed by hand): its
            // producer's cache entry is dropped and the producer runs again,
            // then this task. A source cannot be made again: the task fails
            // with the object and the command that repairs it.
            if let (Some(Incomplete { input, object }), false) = (incomplete, stopping) {
                let j = index[&input];
                let remakeable = matches!(tasks[j].kind, TaskKind::Run(_) | TaskKind::Merge(_));
                if remakeable && !remade[j] {
                    remade[j] = true;
                    if let Some(key) = sched.run.tasks.get(&input.to_string()).and_then(|t| t.key) {
                        inner.store.drop_action(&key)?;
                    }
                    inner.events.send(Event::Note {
                        message: format!(
                            "The output of `{input}` lacks `{object}`, which is no longer in the store: running `{input}` again, then `{}`",
                            order[i]
                        ),
                    });
                    // Whoever still waits for it waits for the new output.
                    done[j] = None;
                    sched.state[j] = TaskState::Pending;
                    for &u in &users[j] {
                        if sched.state[u] == TaskState::Pending {
                            sched.unmet[u] += 1;
                        }
                    }
                    sched.ready.insert(j);
                    sched.state[i] = TaskState::Pending;
                    sched.unmet[i] += 1;
                    continue;
                }
                if remade[j] && matches!(sched.state[j], TaskState::Pending | TaskState::Running) {
                    // Being made again for another task: wait for it too.
                    sched.state[i] = TaskState::Pending;
                    sched.unmet[i] += 1;
                    continue;
                }
            }
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
    /// Says which input lacked an object, when that is why it failed.
    async fn run_task(
        &self,
        task: &Task,
        inputs: Vec<(Label, Done)>,
        scratch: &Arc<Scratch>,
        opts: &BuildOptions,
        run_id: &str,
        cancel: CancellationToken,
    ) -> (TaskRecord, Option<Incomplete>) {
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
        let mut incomplete = None;
        if let Err(e) = res {
            if let BuildError::IncompleteInput { input, object } = &e {
                incomplete = Some(Incomplete {
                    input: input.clone(),
                    object: *object,
                });
            }
            rec.state = TaskState::Failed;
            rec.error = Some(error_chain(&e));
        }
        rec.duration_ms = (started.elapsed().as_millis() as u64).saturating_sub(rec.queued_ms);
        (rec, incomplete)
    }
}

/// How often a running build saves its run record (with the tasks ended so
/// far): a build killed outright still shows what it did in `ci runs`, and
/// each save (a log sync) makes every record before it durable.
const RUN_SAVE_EVERY: Duration = Duration::from_secs(1);

/// An input of a task whose output lacks an object.
struct Incomplete {
    input: Label,
    object: strata_store::Digest,
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
