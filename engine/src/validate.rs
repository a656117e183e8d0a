//! The checks every model passes, whether it came from Starlark or JSON.
//!
//! [`Task::check`] looks at one task alone (the loader runs it as each task is declared,
//! so the error points at the call); [`Workspace::validate`] runs it on every task and then
//! checks the graph: references, cycles, stages, merge bases.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::error::{Invalid, ModelError};
use crate::graph::{find_cycle, names_in_package, Graph};
use crate::label::{valid_name, Label};
use crate::model::{Command, Executor, GitSource, Run, Service, Task, TaskKind, Workspace};

impl Workspace {
    /// Checks the whole model. The first problem found is returned, in a fixed order:
    /// stages, each task (label order), references, dependency cycles, stage gating, merge
    /// bases. `Ok` means the engine can plan it: every label resolves and the graph is a DAG.
    pub fn validate(&self) -> Result<(), ModelError> {
        let located =
            |task: &Task, problem: Invalid| ModelError::new(task.location.clone(), problem);

        for (key, stage) in &self.stages {
            let here = || stage.location.clone();
            if *key != stage.name {
                return Err(ModelError::new(
                    here(),
                    Invalid::StageKeyMismatch {
                        key: key.clone(),
                        name: stage.name.clone(),
                    },
                ));
            }
            if !valid_stage_name(&stage.name) {
                return Err(ModelError::new(
                    here(),
                    Invalid::BadStageName(stage.name.clone()),
                ));
            }
            for after in &stage.after {
                if !self.stages.contains_key(after) {
                    return Err(ModelError::new(
                        here(),
                        Invalid::UnknownStage {
                            name: after.clone(),
                            user: format!("stage `{}`", stage.name),
                        },
                    ));
                }
            }
        }
        let stage_names: Vec<&String> = self.stages.keys().collect();
        let stage_index: HashMap<&String, usize> = stage_names
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i))
            .collect();
        let stage_after: Vec<Vec<usize>> = self
            .stages
            .values()
            .map(|s| {
                s.after
                    .iter()
                    .filter_map(|a| stage_index.get(a).copied())
                    .collect()
            })
            .collect();
        if let Some(cycle) = find_cycle(stage_names.len(), |i| &stage_after[i]) {
            let first = &self.stages[stage_names[cycle[0]]];
            return Err(ModelError::new(
                first.location.clone(),
                Invalid::StageCycle(cycle.iter().map(|&i| stage_names[i].clone()).collect()),
            ));
        }

        for (key, task) in &self.tasks {
            if *key != task.label {
                return Err(located(
                    task,
                    Invalid::KeyMismatch {
                        key: key.clone(),
                        label: task.label.clone(),
                    },
                ));
            }
            task.check().map_err(|p| located(task, p))?;
            if let TaskKind::GitSource(GitSource { on: Some(on), .. }) = &task.kind {
                let is_hook = self
                    .tasks
                    .get(on)
                    .is_some_and(|t| matches!(t.kind, TaskKind::Webhook(_)));
                if !is_hook {
                    return Err(located(
                        task,
                        Invalid::OnNotWebhook {
                            label: task.label.clone(),
                            on: on.clone(),
                        },
                    ));
                }
            }
            if let Some(stage) = &task.stage {
                if !self.stages.contains_key(stage) {
                    return Err(located(
                        task,
                        Invalid::UnknownStage {
                            name: stage.clone(),
                            user: format!("task `{}`", task.label),
                        },
                    ));
                }
            }
        }

        // Hashed once: a search of the ordered map per input compares labels
        // string by string, which showed up in profiles of 1,000-task loads.
        let known: HashSet<&Label> = self.tasks.keys().collect();
        for task in self.tasks.values() {
            for input in task.inputs() {
                if !known.contains(input) {
                    return Err(located(
                        task,
                        Invalid::UnknownTarget {
                            from: Some(task.label.clone()),
                            label: input.clone(),
                            known: names_in_package(self, input.package()),
                        },
                    ));
                }
            }
        }

        let graph = Graph::new(self);
        if let Some(cycle) = graph.find_cycle() {
            return Err(located(
                &self.tasks[cycle[0]],
                Invalid::Cycle(cycle.iter().map(|l| l.to_string()).collect()),
            ));
        }
        self.check_gating(&graph, &stage_names, &stage_index)?;

        for task in self.tasks.values() {
            if let TaskKind::Merge(merge) = &task.kind {
                for side in &merge.sides {
                    let mut at = side;
                    while at != &merge.base {
                        match self.tasks.get(at).and_then(|t| t.base()) {
                            Some(next) => at = next,
                            None => {
                                return Err(located(
                                    task,
                                    Invalid::SideOffBase {
                                        merge: task.label.clone(),
                                        side: side.clone(),
                                        base: Box::new(merge.base.clone()),
                                        end: Box::new(at.clone()),
                                    },
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Stage gating must not contradict data dependencies: a task that (transitively)
    /// needs a task of a later stage would wait forever. Checked on one graph whose nodes
    /// are the tasks plus one node per stage ("every task of this stage is done").
    fn check_gating(
        &self,
        graph: &Graph<'_>,
        stage_names: &[&String],
        stage_index: &HashMap<&String, usize>,
    ) -> Result<(), ModelError> {
        if self.stages.is_empty() {
            return Ok(());
        }
        let labels = graph.node_labels();
        let n = labels.len();
        let mut succ: Vec<Vec<usize>> = Vec::with_capacity(n + stage_names.len());
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); stage_names.len()];
        for (i, label) in labels.iter().enumerate() {
            let task = &self.tasks[*label];
            let mut next = graph.node_inputs(i).to_vec();
            if let Some(stage) = task.stage.as_ref().and_then(|s| self.stages.get(s)) {
                next.extend(
                    stage
                        .after
                        .iter()
                        .filter_map(|a| stage_index.get(a))
                        .map(|&s| n + s),
                );
            }
            if let Some(&s) = task.stage.as_ref().and_then(|s| stage_index.get(s)) {
                members[s].push(i);
            }
            succ.push(next);
        }
        succ.extend(members);
        if let Some(cycle) = find_cycle(succ.len(), |i| &succ[i]) {
            let first_task = cycle.iter().find(|&&i| i < n).copied().unwrap_or(0);
            let path = cycle
                .iter()
                .map(|&i| {
                    if i < n {
                        labels[i].to_string()
                    } else {
                        format!("(stage {})", stage_names[i - n])
                    }
                })
                .collect();
            return Err(ModelError::new(
                labels
                    .get(first_task)
                    .and_then(|l| self.tasks[*l].location.clone()),
                Invalid::GateCycle(path),
            ));
        }
        Ok(())
    }

    /// Adds a task, refusing a label already taken (the error names both locations).
    pub fn insert_task(&mut self, task: Task) -> Result<(), ModelError> {
        match self.tasks.entry(task.label.clone()) {
            Entry::Occupied(first) => Err(ModelError::new(
                task.location.clone(),
                Invalid::DuplicateTask {
                    label: task.label.clone(),
                    first: first.get().location.clone(),
                },
            )),
            Entry::Vacant(slot) => {
                slot.insert(task);
                Ok(())
            }
        }
    }
}

impl Task {
    /// Checks what can be checked on this task alone: the fields of its kind, and
    /// that only runs have deps and transforms. Does not look at other tasks.
    pub fn check(&self) -> Result<(), Invalid> {
        let label = &self.label;
        if let Some(stage) = &self.stage {
            if !valid_stage_name(stage) {
                return Err(Invalid::BadStageName(stage.clone()));
            }
        }
        let mut mounts = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for dep in &self.deps {
            if !valid_name(&dep.mount) {
                return Err(Invalid::BadMount(dep.mount.clone()));
            }
            if !mounts.insert(&dep.mount) {
                return Err(Invalid::DuplicateMount {
                    label: label.clone(),
                    mount: dep.mount.clone(),
                });
            }
            if !seen.insert(&dep.label) {
                return Err(Invalid::DuplicateDep {
                    label: label.clone(),
                    dep: dep.label.clone(),
                });
            }
        }
        let run = match &self.kind {
            TaskKind::Run(run) => run,
            other => {
                let kind = self.kind_name();
                if !self.deps.is_empty() {
                    return Err(Invalid::NotForKind {
                        label: label.clone(),
                        field: "deps",
                        kind,
                    });
                }
                if self.transform.is_some() {
                    return Err(Invalid::NotForKind {
                        label: label.clone(),
                        field: "transform",
                        kind,
                    });
                }
                return check_other(label, other);
            }
        };
        check_run(label, run)
    }
}

fn check_run(label: &Label, run: &Run) -> Result<(), Invalid> {
    match &run.cmd {
        Command::Argv(argv) => {
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(Invalid::EmptyCommand(label.clone()));
            }
        }
        Command::Script(script) => {
            if script.trim().is_empty() {
                return Err(Invalid::EmptyCommand(label.clone()));
            }
        }
    }
    if let Some(image) = &run.image {
        check_image("image", image)?;
    }
    check_env("env", &run.env)?;
    let mut secrets = BTreeSet::new();
    for name in &run.secret_env {
        if !valid_env_name(name) {
            return Err(Invalid::BadEnvName {
                what: "secret_env".to_owned(),
                name: name.clone(),
            });
        }
        if !secrets.insert(name) {
            return Err(Invalid::DuplicateSecret(name.clone()));
        }
        if run.env.contains_key(name) {
            return Err(Invalid::SecretAlsoInEnv(name.clone()));
        }
    }
    if run.pure && run.effects {
        return Err(Invalid::PureWithEffects(label.clone()));
    }
    if run.timeout_secs == Some(0) {
        return Err(Invalid::OutOfRange {
            what: "timeout".to_owned(),
            value: 0,
            expected: "at least 1 second",
        });
    }
    if !run.services.is_empty() && run.executor == Some(Executor::Host) {
        return Err(Invalid::ServicesNeedDocker(label.clone()));
    }
    for (name, service) in &run.services {
        check_service(name, service)?;
    }
    if let Some(workdir) = &run.workdir {
        check_relative_path("workdir", workdir, "`/ci/work`", "the work directory")?;
    }
    if let Some(user) = &run.user {
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        let valid = match user.split_once(':') {
            Some((u, g)) => valid_part(u) && valid_part(g),
            None => valid_part(user),
        };
        if !valid {
            return Err(Invalid::HasSpaces {
                what: "user".to_owned(),
                value: user.clone(),
                fix: "write a user name, a uid, or `uid:gid`",
            });
        }
    }
    Ok(())
}

fn check_service(name: &str, service: &Service) -> Result<(), Invalid> {
    let valid = name.len() <= 63
        && name
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(Invalid::BadServiceName(name.to_owned()));
    }
    check_image(&format!("services[\"{name}\"].image"), &service.image)?;
    check_env(&format!("services[\"{name}\"].env"), &service.env)?;
    if let Some(cmd) = &service.cmd {
        if cmd.first().is_none_or(|p| p.is_empty()) {
            return Err(Invalid::Empty {
                what: format!("services[\"{name}\"].cmd"),
                fix: "give the program to run first, or leave `cmd` out to run the image's own",
            });
        }
    }
    if service.ready.first().is_some_and(|p| p.is_empty()) {
        return Err(Invalid::Empty {
            what: format!("services[\"{name}\"].ready[0]"),
            fix: "give the probe program first, e.g. `[\"pg_isready\"]`",
        });
    }
    Ok(())
}

fn check_other(label: &Label, kind: &TaskKind) -> Result<(), Invalid> {
    match kind {
        TaskKind::Run(_) => Ok(()),
        TaskKind::Merge(merge) => {
            if merge.sides.is_empty() {
                return Err(Invalid::MergeNoSides(label.clone()));
            }
            let mut seen = BTreeSet::new();
            for side in &merge.sides {
                if !seen.insert(side) {
                    return Err(Invalid::DuplicateSide {
                        merge: label.clone(),
                        side: side.clone(),
                    });
                }
            }
            Ok(())
        }
        TaskKind::LocalSource(source) => {
            if source.path != "." {
                check_relative_path("path", &source.path, "the workspace root", "the workspace")?;
            }
            for pattern in &source.exclude {
                if pattern.is_empty() {
                    return Err(Invalid::Empty {
                        what: "exclude".to_owned(),
                        fix: "remove the empty pattern",
                    });
                }
            }
            Ok(())
        }
        TaskKind::Timer(timer) => match (timer.every_secs, &timer.cron) {
            (Some(0), None) => Err(Invalid::OutOfRange {
                what: "every".to_owned(),
                value: 0,
                expected: "at least 1 second",
            }),
            (Some(_), None) => Ok(()),
            (None, Some(cron)) => parse_cron(cron).map(drop),
            _ => Err(Invalid::TimerSchedule(label.clone())),
        },
        TaskKind::Webhook(hook) => {
            if !valid_env_name(&hook.secret_env) {
                return Err(Invalid::BadEnvName {
                    what: "secret_env".to_owned(),
                    name: hook.secret_env.clone(),
                });
            }
            Ok(())
        }
        TaskKind::GitSource(git) => {
            if git.poll_secs == Some(0) {
                return Err(Invalid::OutOfRange {
                    what: "poll".to_owned(),
                    value: 0,
                    expected: "at least 1 second",
                });
            }
            check_token("url", &git.url, "give a URL or a path to a repository")?;
            check_token("ref", &git.rev, "give a branch, a tag or a commit id")?;
            if is_local_relative(&git.url) {
                check_relative_path("url", &git.url, "the workspace root", "the workspace")?;
            }
            Ok(())
        }
    }
}

/// Parses a five-field cron expression (UTC), as `timer(cron = ...)` takes it.
pub fn parse_cron(text: &str) -> Result<croner::Cron, Invalid> {
    let bad = |reason: String| Invalid::BadCron {
        value: text.to_owned(),
        reason,
    };
    if text.split_whitespace().count() != 5 {
        return Err(bad(format!(
            "it has {} fields",
            text.split_whitespace().count()
        )));
    }
    croner::Cron::new(text)
        .parse()
        .map_err(|e| bad(e.to_string()))
}

/// Whether a git URL is a relative filesystem path (not `scheme://`, not `host:path`).
pub(crate) fn is_local_relative(url: &str) -> bool {
    if url.starts_with('/') || url.contains("://") {
        return false;
    }
    // scp-like `user@host:path`: a colon before the first slash.
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon > slash,
        (Some(_), None) => false,
        _ => true,
    }
}

fn check_token(what: &str, value: &str, fix: &'static str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::Empty {
            what: what.to_owned(),
            fix,
        });
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Invalid::HasSpaces {
            what: what.to_owned(),
            value: value.to_owned(),
            fix,
        });
    }
    Ok(())
}

fn check_image(what: &str, image: &str) -> Result<(), Invalid> {
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Invalid::BadImage {
            what: what.to_owned(),
            value: image.to_owned(),
        });
    }
    Ok(())
}

fn check_env(what: &str, env: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for name in env.keys() {
        if !valid_env_name(name) {
            return Err(Invalid::BadEnvName {
                what: what.to_owned(),
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// A relative path that stays inside its directory: no leading `/`, no `..`, no empty
/// segments. `.` segments are refused too, so each path has one spelling.
fn check_relative_path(
    what: &str,
    path: &str,
    relative_to: &'static str,
    inside: &'static str,
) -> Result<(), Invalid> {
    if path.is_empty() {
        return Err(Invalid::Empty {
            what: what.to_owned(),
            fix: "give a relative path, or leave it out",
        });
    }
    if path.starts_with('/') {
        return Err(Invalid::AbsolutePath {
            what: what.to_owned(),
            path: path.to_owned(),
            relative_to,
        });
    }
    if path.split('/').any(|s| s == "..") {
        return Err(Invalid::EscapingPath {
            what: what.to_owned(),
            path: path.to_owned(),
            inside,
        });
    }
    if path.split('/').any(|s| s.is_empty() || s == ".") || path.contains('\0') {
        return Err(Invalid::NotNormal {
            what: what.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[A-Za-z0-9_-]+`.
pub(crate) fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}
