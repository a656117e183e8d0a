//! One command's life: its action (executor, image, argv, key), a job
//! token, its directories (inputs, previous output, work directory), the
//! attempts, and the capture of its output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_fuse::{Layers, WorkDir, WorkDirOptions};
use strata_store::{Digest, Lineage};
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::exec::{ExecOutcome, ExecRequest, Executor, LogSink, TaskDirs};
use crate::key::ActionPreimage;
use crate::model::{self, Command, Task, FAILED_OUTPUT_MAX_MIB};
use crate::record::{now_ms, TaskRecord, TaskState};
use crate::scratch::{Scratch, SlotPaths};
use crate::{BuildError, Label};

use super::cache::Outcome;
use super::{quoted, slug, BuildOptions, CommandAction, Done, Engine};

impl Engine {
    pub(super) fn inherited_context(inputs: &[(Label, Done)]) -> BTreeMap<String, String> {
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

    /// Runs a command task: a cache hit, or up to `retries + 1` attempts.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_command(
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
        let label = task.label.to_string();
        let action = self.command_action(task, r, inputs, opts).await?;
        let key = action.pre.key();
        rec.key = Some(key);
        let cacheable = r.pure && !r.effects;

        // `--check` runs a cached task again and compares.
        let mut cached_output = None;
        if cacheable {
            if let Some(hit) = self.cached_hit(key).await? {
                if !opts.check {
                    return self.command_hit(&label, &action, hit, run_id, rec);
                }
                // Compared with the new output: it must be here.
                self.fetch_inputs(&[hit.output]).await?;
                cached_output = Some(hit.output);
            }
        }
        // Before anything is mounted: an input whose objects are not all
        // stored (a blob removed by hand) would fail the command with EIO.
        self.check_inputs(scratch, inputs, false).await?;
        let secrets = match secrets_of(r) {
            Ok(s) => s,
            Err(why) => {
                rec.state = TaskState::Failed;
                rec.error = Some(why);
                return Ok(());
            }
        };
        let prev = if r.pure {
            None
        } else {
            self.inner
                .store
                .label(&self.label_record_key(&label))?
                .map(|e| Previous {
                    output: e.layer,
                    // An older record that does not decode shows no inputs.
                    inputs: e
                        .payload
                        .decode::<PreviousInputs>()
                        .map(|p| p.preimage.inputs.into_iter().collect())
                        .unwrap_or_default(),
                })
        };
        let mut env = r.env.clone();
        env.extend(action.context.clone());
        let cmd = CommandRun {
            task,
            r,
            label,
            action,
            inputs,
            env,
            secrets,
            prev,
            cached_output,
            cacheable,
            run_id,
            scratch,
            cancel,
        };
        for attempt in 1..=r.retries + 1 {
            rec.attempts = attempt;
            if self.attempt(&cmd, attempt, rec).await? == Ended::ForGood {
                break;
            }
        }
        Ok(())
    }

    /// One attempt: directories, a job token, the command, the capture of
    /// its output (a failed attempt's too: its partial output is kept), and
    /// the record. Says whether another attempt may follow.
    async fn attempt(
        &self,
        cmd: &CommandRun<'_>,
        attempt: u32,
        rec: &mut TaskRecord,
    ) -> Result<Ended, BuildError> {
        let inner = &self.inner;
        let (label, scratch) = (&cmd.label, cmd.scratch);
        let base = cmd.action.pre.base;
        inner.events.send(Event::TaskStarted {
            label: label.clone(),
            attempt,
            executor: cmd.action.executor.name().into(),
        });
        let mut slot = scratch.slot()?;
        let view = scratch.view_name(&slug(label));
        let prepared = self
            .prepare(
                scratch,
                slot.paths(),
                view,
                cmd.task,
                cmd.inputs,
                base,
                cmd.prev.as_ref(),
            )
            .await?;
        self.announce(&prepared);
        // Truncated, not made anew: the slot's file is reused.
        let log_path = slot.paths().log;
        let log_file =
            std::fs::File::create(&log_path).map_err(BuildError::io("create", &log_path))?;
        let log = LogSink::new(
            label,
            inner.events.clone(),
            cmd.secrets.values().cloned().collect(),
            log_file,
        );
        let r = cmd.r;
        let req = ExecRequest {
            label: label.clone(),
            argv: cmd.action.argv.clone(),
            env: cmd.env.clone(),
            secrets: cmd.secrets.clone(),
            image: cmd.action.image.clone(),
            dirs: prepared.dirs.clone(),
            workdir: r.workdir.clone(),
            user: r.user.clone(),
            network: r.network,
            services: r.services.clone(),
            timeout: r.timeout_secs.map(Duration::from_secs),
            cancel: cmd.cancel.clone(),
            log: log.clone(),
        };
        let outcome = match self.job(scratch, &cmd.cancel, rec).await {
            Some(_token) => cmd.action.executor.run(req).await,
            None => Ok(ExecOutcome {
                cancelled: true,
                ..ExecOutcome::default()
            }),
        };
        // Capture even a failed attempt: its partial output is kept, up to
        // the workspace's cap.
        let failed = !matches!(&outcome, Ok(o) if o.success());
        let cap = failed.then(|| {
            inner
                .ws
                .settings
                .failed_output_max_mib
                .unwrap_or(FAILED_OUTPUT_MAX_MIB)
                .saturating_mul(1 << 20)
        });
        let finished = self
            .finish_attempt(scratch, prepared, slot.paths(), label, base, cap)
            .await;
        let outcome = outcome?;
        let Finished {
            output,
            log: log_blob,
            written,
            dropped,
        } = finished?;
        slot.reusable();
        rec.output = output;
        rec.log = log_blob;
        rec.exit_code = outcome.exit_code;
        if outcome.success() {
            if let Some(output) = output {
                // A blob that went missing while the command ran read as
                // EIO through the mount: such a success is not recorded.
                // Checked when the mount has failed a read at all.
                if scratch.mount_failed() {
                    self.check_inputs(scratch, cmd.inputs, true).await?;
                }
                self.command_succeeded(cmd, output, log_blob, written, rec)?;
                return Ok(Ended::ForGood);
            }
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
        if dropped {
            why.push_str(&format!(
                "\nIts partial output was not kept: it is over {} MiB (`failed_output_max_mib` in `ci.toml`'s `[build]`)",
                cap.unwrap_or(0) >> 20
            ));
        }
        rec.error = Some(why);
        if outcome.cancelled || cmd.cancel.is_cancelled() {
            return Ok(Ended::ForGood);
        }
        Ok(Ended::MayRetry)
    }

    /// A command that exited 0: its context file must parse, under
    /// `--check` its output must be the cached one, and then it is recorded.
    fn command_succeeded(
        &self,
        cmd: &CommandRun<'_>,
        output: Digest,
        log: Option<Digest>,
        written: Result<BTreeMap<String, String>, String>,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let mut ctx = cmd.action.context.clone();
        match written {
            Ok(w) => ctx.extend(w),
            Err(msg) => {
                rec.state = TaskState::Failed;
                rec.error = Some(msg);
                return Ok(());
            }
        }
        rec.context = ctx.clone();
        if let Some(expected) = cmd.cached_output {
            if expected != output {
                let changes = self.inner.store.diff(&expected, &output)?;
                let paths: Vec<String> = changes.iter().map(|c| c.path.to_string()).collect();
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
            log,
        };
        let a = &cmd.action;
        self.record_success(
            &cmd.label,
            &a.pre,
            a.pre.key(),
            &a.input_labels,
            done,
            cmd.run_id,
            cmd.cacheable,
        )
    }

    /// Whether every object of the inputs' outputs is stored (trees read,
    /// blob files checked to exist; `again`: after the command, see
    /// [`Scratch::first_missing`]); the first that is not is
    /// [`BuildError::IncompleteInput`].
    pub(super) async fn check_inputs(
        &self,
        scratch: &Arc<Scratch>,
        inputs: &[(Label, Done)],
        again: bool,
    ) -> Result<(), BuildError> {
        if inputs.is_empty() {
            return Ok(());
        }
        let scratch = scratch.clone();
        let inputs: Vec<(Label, Digest)> =
            inputs.iter().map(|(l, d)| (l.clone(), d.output)).collect();
        tokio::task::spawn_blocking(move || {
            for (input, layer) in inputs {
                if let Some(object) = scratch.first_missing(layer, again)? {
                    return Err(BuildError::IncompleteInput { input, object });
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| BuildError::Join(e.to_string()))?
    }

    /// Says once per engine which work-directory strategy tasks get.
    fn announce(&self, prepared: &Prepared) {
        let first = self
            .inner
            .announced
            .lock()
            .map(|mut a| a.insert(prepared.strategy.clone()))
            .unwrap_or(false);
        if first {
            self.inner.events.send(Event::Note {
                message: format!("work directories: {}", prepared.note),
            });
        }
    }

    /// Waits for a job token, counting the wait in `rec.queued_ms`; `None`
    /// when the run is cancelled first.
    pub(super) async fn job<'s>(
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
        prev: Option<&Previous>,
    ) -> Result<Prepared, BuildError> {
        let store = self.inner.store.clone();
        let private: Vec<PathBuf> = store
            .root()
            .into_iter()
            .chain([scratch.root()])
            .map(Path::to_path_buf)
            .collect();
        let prev = prev.cloned();
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
        let read: Vec<Digest> =
            mounts
                .iter()
                .map(|(_, l)| *l)
                .chain(base)
                .chain(prev.iter().flat_map(|p| {
                    std::iter::once(p.output).chain(p.inputs.iter().map(|(_, l)| *l))
                }))
                .collect();
        self.fetch_inputs(&read).await?;
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
            let (in_dir, prev_dir, prev_in_dir) = match mount {
                Some(m) => {
                    let in_dir = m.add_view(&view, &Layers::Named(mounts))?;
                    views.push(view.clone());
                    let (prev_dir, prev_in_dir) = match prev {
                        Some(p) => {
                            let name = format!("{view}.prev");
                            let d = m.add_view(&name, &Layers::One(p.output))?;
                            views.push(name);
                            // The previous inputs: another view of the same mount.
                            let name = format!("{view}.prev-in");
                            let di = m.add_view(&name, &Layers::Named(p.inputs))?;
                            views.push(name);
                            (Some(d), Some(di))
                        }
                        None => (None, None),
                    };
                    (in_dir, prev_dir, prev_in_dir)
                }
                None => {
                    let in_dir = slot.inputs.clone();
                    std::fs::create_dir_all(&in_dir).map_err(BuildError::io("create", &in_dir))?;
                    for (mount, layer) in &mounts {
                        let p = in_dir.join(mount);
                        store.checkout(layer, &p)?;
                        make_read_only(&p);
                    }
                    let (prev_dir, prev_in_dir) = match prev {
                        Some(p) => {
                            let pd = slot.prev.clone();
                            store.checkout(&p.output, &pd)?;
                            make_read_only(&pd);
                            let pi = slot.prev_in.clone();
                            std::fs::create_dir_all(&pi).map_err(BuildError::io("create", &pi))?;
                            for (mount, layer) in &p.inputs {
                                let d = pi.join(mount);
                                store.checkout(layer, &d)?;
                                make_read_only(&d);
                            }
                            (Some(pd), Some(pi))
                        }
                        None => (None, None),
                    };
                    (in_dir, prev_dir, prev_in_dir)
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
                    prev_in: prev_in_dir,
                    context,
                    private,
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

    /// Captures the work directory (unless `cap` is given and what the
    /// attempt wrote beyond its base is larger), stores the log, reads the
    /// context file, and leaves the slot as it was found (work directory
    /// empty, views removed, copies deleted).
    async fn finish_attempt(
        &self,
        scratch: &Arc<Scratch>,
        prepared: Prepared,
        slot: SlotPaths,
        label: &str,
        base: Option<Digest>,
        cap: Option<u64>,
    ) -> Result<Finished, BuildError> {
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
                for p in [&slot.prev, &slot.prev_in] {
                    strata_fuse::remove_tree(p).map_err(BuildError::io("remove", p))?;
                }
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
            let ctx_path = prepared.dirs.context.clone();
            let written = match std::fs::read(&ctx_path) {
                Ok(bytes) => parse_context(&bytes),
                Err(e) => Err(format!("Cannot read the context file: {e}")),
            };
            if let Some(cap) = cap {
                let base_bytes = match base {
                    Some(b) => store.layer(&b)?.map_or(0, |r| r.stats.bytes),
                    None => 0,
                };
                let wrote = bytes_under(prepared.work.path(), cap.saturating_add(base_bytes))
                    .saturating_sub(base_bytes);
                if wrote > cap {
                    prepared.work.close()?;
                    return Ok(Finished {
                        output: None,
                        log,
                        written,
                        dropped: true,
                    });
                }
            }
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
            Ok(Finished {
                output: Some(output),
                log,
                written,
                dropped: false,
            })
        })
        .await
        .map_err(|e| BuildError::Join(e.to_string()))?
    }
}

/// What an attempt left: its output layer (`None` when a failed attempt
/// wrote more than the cap: `dropped`), its log, and the context it wrote.
struct Finished {
    output: Option<Digest>,
    log: Option<Digest>,
    written: Result<BTreeMap<String, String>, String>,
    dropped: bool,
}

/// The bytes of the regular files under `dir` (symlinks not followed),
/// counted until they pass `limit`.
fn bytes_under(dir: &Path, limit: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
                if total > limit {
                    return total;
                }
            }
        }
    }
    total
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

/// What stays the same across a command's attempts.
struct CommandRun<'a> {
    task: &'a Task,
    r: &'a model::Run,
    label: String,
    action: CommandAction,
    inputs: &'a [(Label, Done)],
    /// The task's `env` over the context it inherits.
    env: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    /// The previous output and inputs, for an impure task.
    prev: Option<Previous>,
    /// Under `--check`, the output the cache holds.
    cached_output: Option<Digest>,
    cacheable: bool,
    run_id: &'a str,
    scratch: &'a Arc<Scratch>,
    cancel: CancellationToken,
}

/// What an impure task's previous run left: its output (`CI_PREV`) and the
/// inputs it read, by mount name (`CI_PREV_IN`).
#[derive(Clone, Debug)]
struct Previous {
    output: Digest,
    inputs: Vec<(String, Digest)>,
}

/// The one field of a label record's payload that [`Previous`] needs.
#[derive(serde::Deserialize)]
struct PreviousInputs {
    preimage: crate::key::ActionPreimage,
}

/// How an attempt ended, for the loop over attempts.
#[derive(PartialEq, Eq)]
enum Ended {
    /// Succeeded, failed in a way a retry cannot change, or cancelled.
    ForGood,
    /// The command failed: another attempt may follow.
    MayRetry,
}

/// The task's `secret_env`, read from the environment of `ci`; every one
/// must be set.
fn secrets_of(r: &model::Run) -> Result<BTreeMap<String, String>, String> {
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
    if missing.is_empty() {
        Ok(secrets)
    } else {
        Err(format!(
            "Secret {} is not set in the environment of `ci`; export it and build again",
            quoted(&missing)
        ))
    }
}
