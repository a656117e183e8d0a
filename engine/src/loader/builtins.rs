//! The built-in functions of `BUILD.star`: `task`, `merge`, `local_source`, `git_source`,
//! `timer`, `webhook`, `stage`, `service`. Their names and parameters are a public contract: pipelines written
//! today must keep working, so parameters are only ever added.
//!
//! Arguments arrive as untyped Starlark values and are decoded here, so a wrong type gets
//! our message (naming the parameter and what to write) rather than a generic one. Every
//! declaration is checked with [`Task::check`] on the spot: its error points at the call.

use std::collections::BTreeMap;

use starlark::environment::GlobalsBuilder;
use starlark::eval::Evaluator;
use starlark::starlark_module;
use starlark::values::dict::DictRef;
use starlark::values::list::ListRef;
use starlark::values::structs::{AllocStruct, StructRef};
use starlark::values::tuple::TupleRef;
use starlark::values::Value;

use super::{location_of, EvalContext};
use crate::error::{Invalid, ModelError};
use crate::label::Label;
use crate::model::{
    Command, Dep, Executor, GitSource, HookKind, LocalSource, Location, Merge, OnConflict, Run,
    Service, Stage, Task, TaskKind, Timer, Webhook,
};
use crate::validate::is_local_relative;

type Res<T> = Result<T, Invalid>;

#[starlark_module]
pub(crate) fn strata_builtins(builder: &mut GlobalsBuilder) {
    /// Declares a task: a command over input layers, producing one output layer.
    /// Returns its label.
    #[allow(clippy::too_many_arguments)] // every field of a task is a named parameter
    fn task<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] cmd: Option<Value<'v>>,
        #[starlark(require = named)] script: Option<Value<'v>>,
        #[starlark(require = named)] deps: Option<Value<'v>>,
        #[starlark(require = named)] transform: Option<Value<'v>>,
        #[starlark(require = named)] image: Option<Value<'v>>,
        #[starlark(require = named)] env: Option<Value<'v>>,
        #[starlark(require = named)] secret_env: Option<Value<'v>>,
        #[starlark(require = named)] pure: Option<Value<'v>>,
        #[starlark(require = named)] stage: Option<Value<'v>>,
        #[starlark(require = named)] timeout: Option<Value<'v>>,
        #[starlark(require = named)] retries: Option<Value<'v>>,
        #[starlark(require = named)] effects: Option<Value<'v>>,
        #[starlark(require = named)] executor: Option<Value<'v>>,
        #[starlark(require = named)] network: Option<Value<'v>>,
        #[starlark(require = named)] services: Option<Value<'v>>,
        #[starlark(require = named)] workdir: Option<Value<'v>>,
        #[starlark(require = named)] user: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "task")?;
        let result = (|| -> Res<Task> {
            let package = ctx.package.as_str();
            let label = declared_label(package, name)?;
            let cmd = match (given(cmd), given(script)) {
                (Some(cmd), None) => Command::Argv(strings(cmd, "cmd")?),
                (None, Some(script)) => Command::Script(string(script, "script")?),
                (None, None) => return Err(Invalid::NoCommand(label)),
                (Some(_), Some(_)) => return Err(Invalid::CmdAndScript(label)),
            };
            let effects = match given(effects) {
                Some(v) => boolean(v, "effects")?,
                None => false,
            };
            let mut run = Run::new(cmd);
            run.effects = effects;
            // A task with effects is impure unless it says otherwise (then `check` refuses it).
            run.pure = match given(pure) {
                Some(v) => boolean(v, "pure")?,
                None => !effects,
            };
            run.image = given(image).map(|v| string(v, "image")).transpose()?;
            run.env = given(env)
                .map(|v| string_dict(v, "env"))
                .transpose()?
                .unwrap_or_default();
            run.secret_env = given(secret_env)
                .map(|v| strings(v, "secret_env"))
                .transpose()?
                .unwrap_or_default();
            run.timeout_secs = given(timeout).map(|v| duration(v, "timeout")).transpose()?;
            if let Some(v) = given(retries) {
                let n = int(v, "retries")?;
                run.retries = u32::try_from(n).map_err(|_| Invalid::OutOfRange {
                    what: "retries".to_owned(),
                    value: n,
                    expected: "0 or more",
                })?;
            }
            run.executor = given(executor)
                .map(|v| executor_of(v, "executor"))
                .transpose()?;
            if let Some(v) = given(network) {
                run.network = boolean(v, "network")?;
            }
            // What the network gives may change between runs: impure unless it says otherwise.
            run.pure &= !run.network || given(pure).is_some();
            if let Some(v) = given(services) {
                run.services = services_of(v)?;
            }
            run.workdir = given(workdir).map(|v| string(v, "workdir")).transpose()?;
            run.user = given(user).map(|v| string(v, "user")).transpose()?;
            let deps = given(deps)
                .map(|v| deps_of(v, package))
                .transpose()?
                .unwrap_or_default();
            let transform = given(transform)
                .map(|v| label_of(v, "transform", package))
                .transpose()?;
            let stage = given(stage).map(|v| string(v, "stage")).transpose()?;
            Ok(Task {
                label,
                kind: TaskKind::Run(run),
                deps,
                transform,
                stage,
                location: location.clone(),
            })
        })();
        declare(ctx, location, result)
    }

    /// Declares a fork/join: merges the changes each side made on top of `base`.
    fn merge<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] base: Value<'v>,
        #[starlark(require = named)] sides: Value<'v>,
        #[starlark(require = named)] on_conflict: Option<Value<'v>>,
        #[starlark(require = named)] stage: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "merge")?;
        let result = (|| -> Res<Task> {
            let package = ctx.package.as_str();
            let label = declared_label(package, name)?;
            let base = label_of(base, "base", package)?;
            let sides = list_items(sides, "sides", "a list of labels")?
                .into_iter()
                .enumerate()
                .map(|(i, v)| label_of(v, &format!("sides[{i}]"), package))
                .collect::<Res<Vec<_>>>()?;
            let on_conflict = match given(on_conflict) {
                Some(v) => {
                    let text = string(v, "on_conflict")?;
                    text.parse::<OnConflict>()
                        .map_err(|()| Invalid::UnknownOnConflict(text))?
                }
                None => OnConflict::Fail,
            };
            Ok(Task {
                label,
                kind: TaskKind::Merge(Merge {
                    base,
                    sides,
                    on_conflict,
                }),
                deps: Vec::new(),
                transform: None,
                stage: given(stage).map(|v| string(v, "stage")).transpose()?,
                location: location.clone(),
            })
        })();
        declare(ctx, location, result)
    }

    /// Declares a workspace directory (relative to this package) as a source layer.
    fn local_source<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] path: Option<Value<'v>>,
        #[starlark(require = named)] exclude: Option<Value<'v>>,
        #[starlark(require = named)] watch: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "local_source")?;
        let result = (|| -> Res<Task> {
            let package = ctx.package.as_str();
            let label = declared_label(package, name)?;
            let given_path = match given(path) {
                Some(v) => string(v, "path")?,
                None => ".".to_owned(),
            };
            let path = workspace_path("path", &given_path, package)?;
            let dir = if path == "." {
                ctx.root.clone()
            } else {
                ctx.root.join(&path)
            };
            if !dir.is_dir() {
                return Err(Invalid::MissingSourceDir(path));
            }
            // A symlink on the way may lead out of the workspace: refuse
            // what resolves outside it, as `..` is refused.
            if let (Ok(real), Ok(root)) = (dir.canonicalize(), ctx.root.canonicalize()) {
                if !real.starts_with(&root) {
                    return Err(Invalid::EscapingPath {
                        what: "path".to_owned(),
                        path: format!("{path} (a symlink to {})", real.display()),
                        inside: "the workspace",
                    });
                }
            }
            // The evaluation depends on it: the load cache checks it again.
            ctx.dirs.borrow_mut().push(path.clone());
            let exclude = given(exclude)
                .map(|v| strings(v, "exclude"))
                .transpose()?
                .unwrap_or_default();
            let watch = match given(watch) {
                Some(v) => boolean(v, "watch")?,
                None => false,
            };
            Ok(Task {
                label,
                kind: TaskKind::LocalSource(LocalSource {
                    path,
                    exclude,
                    watch,
                }),
                deps: Vec::new(),
                transform: None,
                stage: None,
                location: location.clone(),
            })
        })();
        declare(ctx, location, result)
    }

    /// Declares a git repository at a ref as a source layer. A relative `url` is a path
    /// relative to this package.
    fn git_source<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] url: Value<'v>,
        #[starlark(require = named)] r#ref: Value<'v>,
        #[starlark(require = named)] poll: Option<Value<'v>>,
        #[starlark(require = named)] on: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "git_source")?;
        let result = (|| -> Res<Task> {
            let package = ctx.package.as_str();
            let label = declared_label(package, name)?;
            let mut url = string(url, "url")?;
            if !url.is_empty() && is_local_relative(&url) {
                url = workspace_path("url", &url, package)?;
            }
            let rev = string(r#ref, "ref")?;
            let poll_secs = given(poll).map(|v| duration(v, "poll")).transpose()?;
            let on = given(on)
                .map(|v| -> Res<Label> {
                    let text = string(v, "on")?;
                    Ok(Label::parse(&text, Some(package))?)
                })
                .transpose()?;
            Ok(Task {
                label,
                kind: TaskKind::GitSource(GitSource {
                    url,
                    rev,
                    poll_secs,
                    on,
                }),
                deps: Vec::new(),
                transform: None,
                stage: None,
                location: location.clone(),
            })
        })();
        declare(ctx, location, result)
    }

    /// Declares a clock source: under `ci serve`, each tick (`every` or `cron`, UTC)
    /// starts a run of everything downstream; its output holds `tick.json`.
    fn timer<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] every: Option<Value<'v>>,
        #[starlark(require = named)] cron: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "timer")?;
        let result = (|| -> Res<Task> {
            let label = declared_label(ctx.package.as_str(), name)?;
            let every_secs = given(every).map(|v| duration(v, "every")).transpose()?;
            let cron = given(cron).map(|v| string(v, "cron")).transpose()?;
            Ok(source_task(
                label,
                TaskKind::Timer(Timer { every_secs, cron }),
                &location,
            ))
        })();
        declare(ctx, location, result)
    }

    /// Declares a webhook source: `POST /hooks/<workspace>/<name>` on `ci serve`,
    /// authenticated with the secret in the server's environment variable `secret_env`.
    /// Its output holds `payload.json`, `event` and `delivery`.
    fn webhook<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] secret_env: Value<'v>,
        #[starlark(require = named)] kind: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "webhook")?;
        let result = (|| -> Res<Task> {
            let label = declared_label(ctx.package.as_str(), name)?;
            let secret_env = string(secret_env, "secret_env")?;
            let kind = match given(kind) {
                Some(v) => {
                    let text = string(v, "kind")?;
                    text.parse().map_err(|_| Invalid::UnknownHookKind(text))?
                }
                None => HookKind::default(),
            };
            Ok(source_task(
                label,
                TaskKind::Webhook(Webhook { secret_env, kind }),
                &location,
            ))
        })();
        declare(ctx, location, result)
    }

    /// Declares a stage (only in the root `BUILD.star`): its tasks start after every task
    /// of the stages in `after` has succeeded.
    fn stage<'v>(
        #[starlark(require = named)] name: Value<'v>,
        #[starlark(require = named)] after: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<String> {
        let (ctx, location) = declaring(eval, "stage")?;
        let located =
            |p: Invalid| starlark::Error::new_native(ModelError::new(location.clone(), p));
        let name = string(name, "name").map_err(located)?;
        if !ctx.package.is_empty() {
            return Err(located(Invalid::StageOutsideRoot {
                name,
                file: ctx.file.clone(),
            }));
        }
        if !crate::validate::valid_stage_name(&name) {
            return Err(located(Invalid::BadStageName(name)));
        }
        let after = given(after)
            .map(|v| strings(v, "after"))
            .transpose()
            .map_err(located)?
            .unwrap_or_default();
        let mut stages = ctx.stages.borrow_mut();
        if let Some(first) = stages.get(&name) {
            return Err(located(Invalid::DuplicateStage {
                name,
                first: first.location.clone(),
            }));
        }
        stages.insert(
            name.clone(),
            Stage {
                name: name.clone(),
                after,
                location: location.clone(),
            },
        );
        Ok(name)
    }

    /// Describes a service container for `task(services = {"db": service(...)})`.
    fn service<'v>(
        #[starlark(require = named)] image: Value<'v>,
        #[starlark(require = named)] cmd: Option<Value<'v>>,
        #[starlark(require = named)] env: Option<Value<'v>>,
        #[starlark(require = named)] ready: Option<Value<'v>>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let none = Value::new_none();
        let fields = [
            ("image", image),
            ("cmd", cmd.unwrap_or(none)),
            ("env", env.unwrap_or(none)),
            ("ready", ready.unwrap_or(none)),
        ];
        let value = eval.heap().alloc(AllocStruct(fields));
        // Decode now so a wrong type points at this call.
        if let Err(problem) = service_of(value, "service") {
            let location = eval.call_stack_top_location().map(|s| location_of(&s));
            return Err(starlark::Error::new_native(ModelError::new(
                location, problem,
            )));
        }
        Ok(value)
    }
}

/// The evaluation context and the location of the declaration being made: the innermost
/// call site in the `BUILD.star` being evaluated (so a task declared by a macro points at
/// the macro's use, not inside the library).
fn declaring<'a>(
    eval: &Evaluator<'_, 'a, '_>,
    builtin: &'static str,
) -> starlark::Result<(&'a EvalContext, Option<Location>)> {
    let ctx = eval
        .extra
        .and_then(|e| e.downcast_ref::<EvalContext>())
        .ok_or_else(|| {
            starlark::Error::new_native(ModelError::new(
                None,
                Invalid::BuiltinOutsideBuild {
                    builtin,
                    file: "?".to_owned(),
                },
            ))
        })?;
    let stack = eval.call_stack();
    let location = stack
        .frames
        .iter()
        .rev()
        .filter_map(|f| f.location.as_ref())
        .find(|span| span.filename() == ctx.file)
        .map(location_of)
        .or_else(|| eval.call_stack_top_location().map(|s| location_of(&s)));
    if !ctx.is_build {
        return Err(starlark::Error::new_native(ModelError::new(
            location,
            Invalid::BuiltinOutsideBuild {
                builtin,
                file: ctx.file.clone(),
            },
        )));
    }
    Ok((ctx, location))
}

/// Checks a declared task and adds it to its package, or turns the problem into a
/// located Starlark error. Returns the task's label for use in other declarations.
fn declare(
    ctx: &EvalContext,
    location: Option<Location>,
    task: Res<Task>,
) -> starlark::Result<String> {
    let located = |p: Invalid| starlark::Error::new_native(ModelError::new(location.clone(), p));
    let task = task.map_err(located)?;
    task.check().map_err(located)?;
    let mut tasks = ctx.tasks.borrow_mut();
    if let Some(first) = tasks.get(task.label.name()) {
        return Err(located(Invalid::DuplicateTask {
            label: task.label.clone(),
            first: first.location.clone(),
        }));
    }
    let label = task.label.to_string();
    tasks.insert(task.label.name().to_owned(), task);
    Ok(label)
}

/// `None` for an absent argument and for an explicit `None`.
/// A source task: no deps, no transform, no stage.
fn source_task(label: Label, kind: TaskKind, location: &Option<Location>) -> Task {
    Task {
        label,
        kind,
        deps: Vec::new(),
        transform: None,
        stage: None,
        location: location.clone(),
    }
}

fn given(v: Option<Value<'_>>) -> Option<Value<'_>> {
    v.filter(|v| !v.is_none())
}

fn wrong(what: &str, expected: &'static str, got: Value<'_>, fix: &'static str) -> Invalid {
    Invalid::WrongType {
        what: what.to_owned(),
        expected,
        got: got.get_type().to_owned(),
        fix,
    }
}

fn declared_label(package: &str, name: Value<'_>) -> Res<Label> {
    let name = string(name, "name")?;
    Ok(Label::new(package, name)?)
}

fn string(v: Value<'_>, what: &str) -> Res<String> {
    v.unpack_str()
        .map(str::to_owned)
        .ok_or_else(|| wrong(what, "a string", v, "write it in quotes"))
}

fn boolean(v: Value<'_>, what: &str) -> Res<bool> {
    v.unpack_bool()
        .ok_or_else(|| wrong(what, "`True` or `False`", v, ""))
}

fn int(v: Value<'_>, what: &str) -> Res<i64> {
    v.unpack_i32()
        .map(i64::from)
        .ok_or_else(|| wrong(what, "a whole number", v, ""))
}

/// The elements of a list or tuple.
fn list_items<'v>(v: Value<'v>, what: &str, expected: &'static str) -> Res<Vec<Value<'v>>> {
    if let Some(list) = ListRef::from_value(v) {
        Ok(list.content().to_vec())
    } else if let Some(tuple) = TupleRef::from_value(v) {
        Ok(tuple.content().to_vec())
    } else {
        Err(wrong(what, expected, v, "write it in `[...]`"))
    }
}

fn strings(v: Value<'_>, what: &str) -> Res<Vec<String>> {
    list_items(v, what, "a list of strings")?
        .into_iter()
        .enumerate()
        .map(|(i, item)| string(item, &format!("{what}[{i}]")))
        .collect()
}

fn dict_items<'v>(
    v: Value<'v>,
    what: &str,
    expected: &'static str,
) -> Res<Vec<(Value<'v>, Value<'v>)>> {
    DictRef::from_value(v)
        .map(|d| d.iter().collect())
        .ok_or_else(|| wrong(what, expected, v, "write it as `{\"KEY\": \"value\"}`"))
}

fn string_dict(v: Value<'_>, what: &str) -> Res<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, val) in dict_items(v, what, "a dict of strings")? {
        let key = k
            .unpack_str()
            .ok_or_else(|| wrong(&format!("{what} key"), "a string", k, "write it in quotes"))?;
        let value = string(val, &format!("{what}[\"{key}\"]"))?;
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

fn label_of(v: Value<'_>, what: &str, package: &str) -> Res<Label> {
    let text = v
        .unpack_str()
        .ok_or_else(|| wrong(what, "a label string such as `\":name\"`", v, ""))?;
    Ok(Label::parse(text, Some(package))?)
}

/// `deps = [labels]` (each mounted under its target's name) or `{"mount": label}`.
fn deps_of(v: Value<'_>, package: &str) -> Res<Vec<Dep>> {
    if DictRef::from_value(v).is_some() {
        let mut out = Vec::new();
        for (k, val) in dict_items(v, "deps", "a list or dict")? {
            let mount = k
                .unpack_str()
                .ok_or_else(|| wrong("deps key", "a mount name string", k, "write it in quotes"))?;
            let label = label_of(val, &format!("deps[\"{mount}\"]"), package)?;
            out.push(Dep {
                mount: mount.to_owned(),
                label,
            });
        }
        return Ok(out);
    }
    let items = list_items(
        v,
        "deps",
        "a list of labels or a dict of mount names to labels",
    )?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let label = label_of(item, &format!("deps[{i}]"), package)?;
            Ok(Dep {
                mount: label.name().to_owned(),
                label,
            })
        })
        .collect()
}

fn executor_of(v: Value<'_>, what: &str) -> Res<Executor> {
    let text = string(v, what)?;
    text.parse().map_err(|()| Invalid::UnknownExecutor(text))
}

/// Seconds as a positive int, or a string such as `"90s"`, `"5m"`, `"1h30m"`.
fn duration(v: Value<'_>, what: &str) -> Res<u64> {
    if let Some(text) = v.unpack_str() {
        return parse_duration(text).ok_or_else(|| Invalid::BadDuration {
            what: what.to_owned(),
            value: text.to_owned(),
        });
    }
    let n = v
        .unpack_i32()
        .map(i64::from)
        .ok_or_else(|| wrong(what, "a number of seconds or a string like `\"5m\"`", v, ""))?;
    if n <= 0 {
        return Err(Invalid::OutOfRange {
            what: what.to_owned(),
            value: n,
            expected: "at least 1 second",
        });
    }
    Ok(n as u64)
}

pub(crate) fn parse_duration(text: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        };
        let n: u64 = number.parse().ok()?;
        number.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
        any = true;
    }
    if !number.is_empty() {
        // A bare number is seconds; after a unit it is a mistake ("1h30").
        if any {
            return None;
        }
        total = number.parse().ok()?;
        any = true;
    }
    (any && total > 0).then_some(total)
}

fn services_of(v: Value<'_>) -> Res<BTreeMap<String, Service>> {
    let mut out = BTreeMap::new();
    for (k, val) in dict_items(v, "services", "a dict of names to `service(...)`")? {
        let name = k
            .unpack_str()
            .ok_or_else(|| wrong("services key", "a string", k, "write it in quotes"))?;
        let what = format!("services[\"{name}\"]");
        out.insert(name.to_owned(), service_of(val, &what)?);
    }
    Ok(out)
}

fn service_of(v: Value<'_>, what: &str) -> Res<Service> {
    let fields = StructRef::from_value(v).ok_or_else(|| {
        wrong(
            what,
            "a `service(...)`",
            v,
            "write `service(image = \"...\")`",
        )
    })?;
    let mut service = Service {
        image: String::new(),
        cmd: None,
        env: BTreeMap::new(),
        ready: Vec::new(),
    };
    for (key, value) in fields.iter() {
        if value.is_none() {
            continue;
        }
        match key.as_str() {
            "image" => service.image = string(value, &format!("{what}.image"))?,
            "cmd" => service.cmd = Some(strings(value, &format!("{what}.cmd"))?),
            "env" => service.env = string_dict(value, &format!("{what}.env"))?,
            "ready" => service.ready = strings(value, &format!("{what}.ready"))?,
            _ => {}
        }
    }
    Ok(service)
}

/// A path written relative to `package`, as a normalized workspace-relative path (`"."`
/// for the root). Refuses absolute paths and paths that leave the workspace.
fn workspace_path(what: &str, path: &str, package: &str) -> Res<String> {
    if path.starts_with('/') {
        return Err(Invalid::AbsolutePath {
            what: what.to_owned(),
            path: path.to_owned(),
            relative_to: "the package directory",
        });
    }
    let mut parts: Vec<&str> = package.split('/').filter(|s| !s.is_empty()).collect();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(Invalid::EscapingPath {
                        what: what.to_owned(),
                        path: path.to_owned(),
                        inside: "the workspace",
                    });
                }
            }
            s => parts.push(s),
        }
    }
    Ok(if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        for bad in ["", "0", "0s", "1h30", "5 minutes", "-1", "m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn workspace_paths() {
        assert_eq!(workspace_path("p", ".", "a/b").unwrap(), "a/b");
        assert_eq!(workspace_path("p", "../c", "a/b").unwrap(), "a/c");
        assert_eq!(workspace_path("p", "..", "a").unwrap(), ".");
        assert!(workspace_path("p", "../..", "a").is_err());
        assert!(workspace_path("p", "/etc", "a").is_err());
    }
}
