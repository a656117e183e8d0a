//! Errors of loading and validating pipelines.
//!
//! Every message follows one style: capital first, names in backticks, no trailing period,
//! and a user error says what to do. A located error displays as `file:line:col: message`.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::label::{Label, LabelError};
use crate::model::Location;

/// Anything that stops a workspace from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No `ci.toml` in the start directory or any ancestor.
    #[error("No `ci.toml` in `{}` or any parent directory; create one at the root of your workspace", start.display())]
    NoWorkspace { start: PathBuf },
    /// A file or directory could not be read (not a mistake in the pipeline).
    #[error("Cannot read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Starlark refused the code: a syntax error, an undefined name, a failed `fail()`,
    /// a bad call. The message is Starlark's own (its error type is not `std::error::Error`,
    /// so it cannot be kept as a source).
    #[error("{}{message}", LocationPrefix(location.as_ref()))]
    Starlark {
        location: Option<Location>,
        message: String,
    },
    /// `ci.toml` is not valid TOML or has unknown or mistyped settings.
    #[error("{location}: {message}")]
    Settings { location: Location, message: String },
    /// The pipeline is well-formed Starlark but describes an invalid graph or task.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl LoadError {
    /// Whether the user can fix this by editing their workspace (the CLI exits with status 2
    /// for these), as opposed to an environment failure such as an unreadable file.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, LoadError::Io { .. })
    }

    /// Where the error is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            LoadError::Starlark { location, .. } => location.as_ref(),
            LoadError::Settings { location, .. } => Some(location),
            LoadError::Model(e) => e.location.as_ref(),
            LoadError::NoWorkspace { .. } | LoadError::Io { .. } => None,
        }
    }
}

struct LocationPrefix<'a>(Option<&'a Location>);

impl fmt::Display for LocationPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(location) => write!(f, "{location}: "),
            None => Ok(()),
        }
    }
}

/// An invalid model, with where it was declared when known. Returned by
/// [`Workspace::validate`](crate::model::Workspace::validate) for models from any source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", LocationPrefix(location.as_ref()))]
pub struct ModelError {
    pub location: Option<Location>,
    /// Not a `#[source]`: the message already shows it, and error chains would repeat it.
    /// Boxed: errors travel in every `Result` of the loader, and most variants are large.
    pub problem: Box<Invalid>,
}

impl ModelError {
    pub fn new(location: Option<Location>, problem: Invalid) -> ModelError {
        ModelError {
            location,
            problem: Box::new(problem),
        }
    }
}

fn arrows(path: &[String]) -> String {
    path.join(" -> ")
}

fn ticked(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn defines(package: &str, known: &[String]) -> String {
    let package = if package.is_empty() {
        "the root package".to_owned()
    } else {
        format!("package `{package}`")
    };
    const SHOWN: usize = 12;
    match known.len() {
        0 => format!("{package} defines no tasks"),
        n if n <= SHOWN => format!("{package} defines {}", ticked(known)),
        n => format!(
            "{package} defines {} and {} more",
            ticked(&known[..SHOWN]),
            n - SHOWN
        ),
    }
}

fn needed_by(from: &Option<Label>) -> String {
    match from {
        Some(from) => format!(", needed by `{from}`"),
        None => String::new(),
    }
}

fn at(location: &Option<Location>) -> String {
    match location {
        Some(location) => format!(" (the first is at {location})"),
        None => String::new(),
    }
}

/// What is wrong with a model. The variants are the contract; the texts are for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("`{what}` must be {expected}, not `{got}`{}", if fix.is_empty() { String::new() } else { format!("; {fix}") })]
    WrongType {
        what: String,
        expected: &'static str,
        got: String,
        fix: &'static str,
    },
    #[error("Timer `{0}` needs exactly one of `every` and `cron`; e.g. `every = \"10m\"` or `cron = \"0 3 * * *\"`")]
    TimerSchedule(Label),
    #[error("`cron` is `{value}`, which is not a cron expression ({reason}); write five fields: minute hour day-of-month month day-of-week, e.g. `0 3 * * *`")]
    BadCron { value: String, reason: String },
    #[error("Unknown webhook `kind` `{0}`; use `github`, `gitlab` or `generic`")]
    UnknownHookKind(String),
    #[error("`on` of `{label}` is `{on}`, which is not a `webhook(...)`; name a webhook source")]
    OnNotWebhook { label: Label, on: Label },
    #[error("`{file}` is {what}, not a file; a pipeline file must be a regular file (or a symlink to one)")]
    NotAFile { file: String, what: &'static str },
    #[error("`{file}` is {bytes} bytes; pipeline files may be at most {max} bytes")]
    FileTooLarge { file: String, bytes: u64, max: u64 },
    #[error("Task `{0}` has neither `cmd` nor `script`; give it one of them")]
    NoCommand(Label),
    #[error("Task `{0}` has both `cmd` and `script`; keep one of them")]
    CmdAndScript(Label),
    #[error("Task `{0}` has an empty command; give `cmd` the program to run first, or a non-empty `script`")]
    EmptyCommand(Label),
    #[error("`{what}` is {value}; it must be {expected}")]
    OutOfRange {
        what: String,
        value: i64,
        expected: &'static str,
    },
    #[error("`{what}` is `{value}`, which is not a duration; write seconds (`300`) or `90s`, `5m`, `1h`, `1h30m`")]
    BadDuration { what: String, value: String },
    #[error("Unknown executor `{0}`; use `host` or `docker`")]
    UnknownExecutor(String),
    #[error("Unknown `on_conflict` policy `{0}`; use `fail`, `ours` or `theirs`")]
    UnknownOnConflict(String),
    #[error("`{what}` name `{name}` is not a valid variable name; use letters, digits and `_`, not starting with a digit")]
    BadEnvName { what: String, name: String },
    #[error("`{0}` is in both `env` and `secret_env`; keep it in one of them")]
    SecretAlsoInEnv(String),
    #[error("`{0}` is listed twice in `secret_env`; list it once")]
    DuplicateSecret(String),
    #[error("Task `{0}` is pure but has `effects`: tasks with outside effects are never cached; drop `pure=True`")]
    PureWithEffects(Label),
    #[error("Task `{0}` has `services` but runs on the `host` executor; services need `executor=\"docker\"`")]
    ServicesNeedDocker(Label),
    #[error("Service name `{0}` is not a valid host name; use `a-z`, `0-9` and `-`, starting with a letter")]
    BadServiceName(String),
    #[error("`{what}` is `{value}`, which is not an image reference; write e.g. `debian:bookworm` or `alpine@sha256:...`")]
    BadImage { what: String, value: String },
    #[error("`{what}` is empty; {fix}")]
    Empty { what: String, fix: &'static str },
    #[error("`{what}` is `{value}`, which has spaces or control characters; {fix}")]
    HasSpaces {
        what: String,
        value: String,
        fix: &'static str,
    },
    #[error("`{what}` is the absolute path `{path}`; give a path relative to {relative_to}")]
    AbsolutePath {
        what: String,
        path: String,
        relative_to: &'static str,
    },
    #[error("`{what}` is `{path}`, which leaves {inside}; name a path inside it")]
    EscapingPath {
        what: String,
        path: String,
        inside: &'static str,
    },
    #[error("`{what}` is `{path}`; write it without empty or `.` segments")]
    NotNormal { what: String, path: String },
    #[error("Source directory `{0}` does not exist; create it or fix `path`")]
    MissingSourceDir(String),
    #[error("`{field}` is only for `task(...)`, but `{label}` is a `{kind}`; remove it")]
    NotForKind {
        label: Label,
        field: &'static str,
        kind: &'static str,
    },
    #[error("Mount name `{0}` is not valid; use `A-Z a-z 0-9 . _ + -`, not only dots")]
    BadMount(String),
    #[error("Two deps of `{label}` mount at `/ci/in/{mount}`; give them different names with a dict: `deps={{\"{mount}\": ..., \"other\": ...}}`")]
    DuplicateMount { label: Label, mount: String },
    #[error("`{label}` lists `{dep}` twice in `deps`; list it once")]
    DuplicateDep { label: Label, dep: Label },
    #[error("Merge `{0}` has no `sides`; list the transforms of `base` to merge")]
    MergeNoSides(Label),
    #[error("Merge `{merge}` lists side `{side}` twice; list it once")]
    DuplicateSide { merge: Label, side: Label },
    #[error("Side `{side}` of merge `{merge}` is not built on its base `{base}`: its transform chain ends at `{end}`; start its chain of `transform`s at `{base}`")]
    SideOffBase {
        merge: Label,
        side: Label,
        /// Boxed, like `end`: four labels would make every `Invalid` large.
        base: Box<Label>,
        end: Box<Label>,
    },
    #[error("Task under key `{key}` says its label is `{label}`; make them the same")]
    KeyMismatch { key: Label, label: Label },
    #[error("Stage under key `{key}` says its name is `{name}`; make them the same")]
    StageKeyMismatch { key: String, name: String },
    #[error("Stage name `{0}` is not valid; use `A-Z a-z 0-9 _ -`")]
    BadStageName(String),
    #[error("Unknown target `{label}`{}; {}", needed_by(from), defines(label.package(), known))]
    UnknownTarget {
        from: Option<Label>,
        label: Label,
        known: Vec<String>,
    },
    #[error("Unknown package `{}` in `{label}`{}: there is no `{}`; create it or fix the label", label.package(), needed_by(from), build_file(label.package()))]
    UnknownPackage { from: Option<Label>, label: Label },
    #[error("No tasks match `{0}`")]
    NoMatch(String),
    #[error("Dependency cycle: {}; remove one of these dependencies", arrows(.0))]
    Cycle(Vec<String>),
    #[error("Stages and dependencies wait on each other: {}; a task cannot depend on a task of a stage that runs after its own", arrows(.0))]
    GateCycle(Vec<String>),
    #[error("Duplicate task `{label}`{}; rename one of them", at(first))]
    DuplicateTask {
        label: Label,
        first: Option<Location>,
    },
    #[error("Duplicate stage `{name}`{}; rename one of them", at(first))]
    DuplicateStage {
        name: String,
        first: Option<Location>,
    },
    #[error("Stage cycle: {}; remove one of these `after` entries", arrows(.0))]
    StageCycle(Vec<String>),
    #[error("Unknown stage `{name}`, used by {user}; declare it with `stage(name = \"{name}\")` in the root `BUILD.star`")]
    UnknownStage { name: String, user: String },
    #[error("Stage `{name}` is declared in `{file}`; declare stages in the root `BUILD.star`")]
    StageOutsideRoot { name: String, file: String },
    #[error("`{builtin}()` was called while loading the library `{file}`; call it from a function that a `BUILD.star` calls")]
    BuiltinOutsideBuild { builtin: &'static str, file: String },
    #[error("Cannot load `{0}`: write `//DIR:FILE.star` or `:FILE.star`")]
    BadLoadPath(String),
    #[error("Cannot load `{0}`: only `.star` libraries can be loaded, not `BUILD.star` files")]
    LoadBuildFile(String),
    #[error("Cannot load `{label}`: `{file}` does not exist")]
    LoadMissing { label: String, file: String },
    #[error("`{0}` is not valid UTF-8; save it as UTF-8")]
    NotUtf8(String),
    #[error("Load cycle: {}; remove one of these `load` statements", arrows(.0))]
    LoadCycle(Vec<String>),
    #[error("Directory `{0}` holds a `BUILD.star`, but its path cannot be a package name; rename it using `A-Z a-z 0-9 . _ -`")]
    BadPackageDir(String),
    /// The load's step budget (`[load] max_steps`) ran out.
    #[error("Evaluating the pipeline took more than {max} steps (loop iterations and calls), the limit; if it really needs more, raise `max_steps` under `[load]` in `ci.toml`")]
    StepLimit { max: u64 },
    /// The load's heap budget (`[load] max_heap_mib`) would be or was exceeded.
    #[error("Evaluating the pipeline needs more than {max_mib} MiB, the limit: {what}; if it really needs more, raise `max_heap_mib` under `[load]` in `ci.toml`")]
    HeapLimit { max_mib: u64, what: String },
    /// A `range()` longer than the step budget.
    #[error("`range()` of {len} elements is longer than the limit of {max} steps, so going through it would exceed it; if the pipeline really needs it, raise `max_steps` under `[load]` in `ci.toml`")]
    RangeOverSteps { len: u64, max: u64 },
    /// `x *= n`, which repeats without a size check.
    #[error("`*=` is not allowed in pipelines: a repetition is checked against the memory limit only when written `x = x * n`; write it so")]
    RepeatAssign,
}

fn build_file(package: &str) -> String {
    if package.is_empty() {
        "BUILD.star".to_owned()
    } else {
        format!("{package}/BUILD.star")
    }
}
