//! The pipeline model: plain serde data, the same whether it came from `BUILD.star`
//! files, from JSON sent to the HTTP API, or from Rust code.
//!
//! Nothing here runs anything. [`Workspace::validate`] is the one gate every model passes
//! before the engine uses it, whatever its origin; the loader calls it too.
//!
//! JSON shape notes: enums are externally tagged (`{"run": {...}}`), never internally
//! tagged or flattened, because the workspace's `serde_json` has `arbitrary_precision`
//! (pulled in by `starlark`), which breaks numbers inside buffered (tagged/flattened) content.
//! Unknown fields are refused, so a typo in an API request is an error, not a silent default.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::label::Label;

/// Where something was declared: a workspace-relative file, 1-based line and column.
///
/// Never part of an action key: moving a declaration must not invalidate caches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    pub file: String,
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// A whole pipeline: settings, tasks by label, stages by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    /// The directory holding `ci.toml`; `None` for a model that did not come from disk
    /// (e.g. submitted to the HTTP API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub tasks: BTreeMap<Label, Task>,
    #[serde(default)]
    pub stages: BTreeMap<String, Stage>,
}

impl Workspace {
    /// The store directory from `ci.toml`, resolved against the workspace root.
    pub fn store_path(&self) -> Option<PathBuf> {
        let store = self.settings.store.as_deref()?;
        Some(match &self.root {
            Some(root) => root.join(store),
            None => Path::new(store).to_owned(),
        })
    }
}

/// Settings from `ci.toml`'s `[build]` table. Command-line flags and environment
/// variables take precedence; `None` means "not set here".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Store directory; a relative path is relative to the workspace root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// How many tasks run at once (default: the number of cores).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<NonZeroU32>,
    /// The executor of tasks that name neither an executor nor an image (default: `host`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
    /// How tasks see their inputs (default: mounted where FUSE works, else copied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<InputMode>,
    /// The largest partial output of a failed attempt that is kept, in MiB
    /// (default [`FAILED_OUTPUT_MAX_MIB`]; 0 keeps none): a failing task
    /// that wrote until the disk was full must not fill the store too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_output_max_mib: Option<u64>,
    /// `name` at the top of `ci.toml`: the workspace's name under `ci serve`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `[server] url` in `ci.toml`: the `ci serve` commands go through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_url: Option<String>,
    /// `[cache] remote` in `ci.toml`: the remote cache builds share results through.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub remote_cache: Option<String>,
    /// `[cache] mode` in `ci.toml`: `read` or `write`.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub remote_cache_mode: Option<String>,
    /// `[cache] fetch` in `ci.toml`: `all` or `needed`.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub remote_cache_fetch: Option<String>,
}

/// The default of [`Settings::failed_output_max_mib`].
pub const FAILED_OUTPUT_MAX_MIB: u64 = 16;

/// How a task's inputs (and previous output) are laid out for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputMode {
    /// Read-only views of one FUSE mount per build: nothing is copied.
    Mount,
    /// Read-only copies checked out for each task.
    Copy,
}

/// A way to run actions. New kinds are added here (remote ones later); names stay fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// A process on this machine, in prepared directories.
    Host,
    /// Containers through the Docker API.
    Docker,
}

impl Executor {
    /// Every executor name, for error messages.
    pub const NAMES: &'static [&'static str] = &["host", "docker"];

    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Host => "host",
            Executor::Docker => "docker",
        }
    }
}

impl FromStr for Executor {
    type Err = ();
    fn from_str(s: &str) -> Result<Executor, ()> {
        match s {
            "host" => Ok(Executor::Host),
            "docker" => Ok(Executor::Docker),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named group of tasks. A task of this stage starts only after every task (of the
/// same run) in the stages listed in `after` has succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

/// One node of the build graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub label: Label,
    pub kind: TaskKind,
    /// Inputs mounted read-only at `/ci/in/<mount>`. Only [`TaskKind::Run`] has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<Dep>,
    /// The task whose output is this task's writable base (`/ci/work`); the output is a
    /// new layer on top of it. Only [`TaskKind::Run`] has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

impl Task {
    /// Every task this one reads, each once, in a fixed order: deps, transform, merge
    /// base, merge sides.
    pub fn inputs(&self) -> Vec<&Label> {
        let merge = match &self.kind {
            TaskKind::Merge(m) => Some(m),
            _ => None,
        };
        let all = self
            .deps
            .iter()
            .map(|d| &d.label)
            .chain(self.transform.iter())
            .chain(merge.map(|m| &m.base))
            .chain(merge.into_iter().flat_map(|m| m.sides.iter()));
        // Kept in first-seen order; a set of what was seen keeps a task with
        // thousands of deps linear (a `Vec::contains` made it quadratic).
        let mut out: Vec<&Label> = Vec::new();
        let mut seen: std::collections::HashSet<&Label> = std::collections::HashSet::new();
        for label in all {
            if seen.insert(label) {
                out.push(label);
            }
        }
        out
    }

    /// The layer this task's output is built on top of: the transform of a run, the base
    /// of a merge; `None` when the output starts empty (or is a source).
    pub fn base(&self) -> Option<&Label> {
        match &self.kind {
            TaskKind::Merge(m) => Some(&m.base),
            _ => self.transform.as_ref(),
        }
    }

    /// Sources bring outside state in and have no inputs.
    pub fn is_source(&self) -> bool {
        matches!(
            self.kind,
            TaskKind::LocalSource(_)
                | TaskKind::GitSource(_)
                | TaskKind::Timer(_)
                | TaskKind::Webhook(_)
        )
    }

    /// A short word for the kind, for graph output and messages.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            TaskKind::Run(_) => "run",
            TaskKind::Merge(_) => "merge",
            TaskKind::LocalSource(_) => "local_source",
            TaskKind::GitSource(_) => "git_source",
            TaskKind::Timer(_) => "timer",
            TaskKind::Webhook(_) => "webhook",
        }
    }
}

/// What a task is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A command over input layers (`task(...)`).
    Run(Run),
    /// A three-way merge of transforms of a common base (`merge(...)`).
    Merge(Merge),
    /// A workspace directory ingested as a layer (`local_source(...)`).
    LocalSource(LocalSource),
    /// A git repository at a ref; the resolved commit id is the key (`git_source(...)`).
    GitSource(GitSource),
    /// A clock: under `ci serve` each tick starts a run (`timer(...)`).
    Timer(Timer),
    /// An HTTP delivery to `ci serve` (`webhook(...)`); its payload is the output.
    Webhook(Webhook),
}

/// A command run over input layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub cmd: Command,
    /// Container image (a tag or digest); resolved to a digest before keying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names of variables whose values come from the environment of `ci` (or the
    /// server's secret store) at run time. Values never enter keys or logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    /// Pure tasks are memoized by their action key.
    #[serde(default = "yes")]
    pub pure: bool,
    /// Tasks with outside effects (deploys) run once per run and are never cached.
    /// Never both `pure` and `effects`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub effects: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// `None`: the workspace default ([`Settings::executor`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
    /// Whether the task may reach the network.
    #[serde(default, skip_serializing_if = "is_false")]
    pub network: bool,
    /// Service containers started beside the task on a private network, by host name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
    /// Working directory of the command, relative to `/ci/work`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User to run as in the container (`name`, `uid` or `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Run {
    /// A pure run of `cmd` with every option at its default.
    pub fn new(cmd: Command) -> Run {
        Run {
            cmd,
            image: None,
            env: BTreeMap::new(),
            secret_env: Vec::new(),
            pure: true,
            effects: false,
            timeout_secs: None,
            retries: 0,
            executor: None,
            network: false,
            services: BTreeMap::new(),
            workdir: None,
            user: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The command of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Executed directly, no shell.
    Argv(Vec<String>),
    /// Run by `/bin/sh -e`.
    Script(String),
}

/// A service container (e.g. a database for integration tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub image: String,
    /// `None`: the image's own command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A command run in the service container until it exits 0; the task starts then.
    /// Empty: the task starts as soon as the container does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready: Vec<String>,
}

/// A fork/join: each side is a transform chain on `base`; their changes are merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    pub base: Label,
    pub sides: Vec<Label>,
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// What a merge does with a path that two sides changed differently.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// The task fails and lists the conflicting paths.
    #[default]
    Fail,
    /// The earlier side in `sides` wins.
    Ours,
    /// The later side in `sides` wins.
    Theirs,
}

impl OnConflict {
    pub const NAMES: &'static [&'static str] = &["fail", "ours", "theirs"];
}

impl FromStr for OnConflict {
    type Err = ();
    fn from_str(s: &str) -> Result<OnConflict, ()> {
        match s {
            "fail" => Ok(OnConflict::Fail),
            "ours" => Ok(OnConflict::Ours),
            "theirs" => Ok(OnConflict::Theirs),
            _ => Err(()),
        }
    }
}

/// A workspace directory ingested as a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSource {
    /// Relative to the workspace root, normalized (`"."` is the root itself).
    pub path: String,
    /// Gitignore-style patterns, relative to `path`, of what not to ingest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Under `ci serve` (and `ci build --watch`), a change in the directory starts a run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub watch: bool,
}

/// A git repository at a ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// A URL (`https://…`, `ssh://…`, `user@host:path`), an absolute path, or a path
    /// relative to the workspace root.
    pub url: String,
    /// A branch, tag or commit id (`ref` in `BUILD.star`).
    pub rev: String,
    /// Under `ci serve`: re-resolve the ref this often (seconds); a new commit starts a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_secs: Option<u64>,
    /// Under `ci serve`: re-resolve the ref when this webhook source fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Label>,
}

/// A clock source. Exactly one of `every_secs` and `cron` is set.
///
/// Its output is a small layer holding the tick (`tick.json`); under plain `ci build`
/// it holds what `--payload` gives, else an empty object, so a build without the
/// server stays reproducible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_secs: Option<u64>,
    /// A cron expression of five fields (minute hour day-of-month month day-of-week), UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
}

/// A webhook source: `POST /hooks/{workspace}/{name}` on `ci serve`.
///
/// Its output holds `payload.json` (the body as sent), `event` and `delivery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The variable of the server's environment that holds the shared secret.
    pub secret_env: String,
    #[serde(default)]
    pub kind: HookKind,
}

/// How a webhook delivery is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>`.
    Github,
    /// `X-Gitlab-Token: <secret>`.
    Gitlab,
    /// `X-Signature-256: sha256=<HMAC-SHA256 of the body>` (hex; `sha256=` optional).
    #[default]
    Generic,
}

impl HookKind {
    pub const NAMES: &'static [&'static str] = &["github", "gitlab", "generic"];

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Github => "github",
            HookKind::Gitlab => "gitlab",
            HookKind::Generic => "generic",
        }
    }
}

impl FromStr for HookKind {
    type Err = ();
    fn from_str(s: &str) -> Result<HookKind, ()> {
        match s {
            "github" => Ok(HookKind::Github),
            "gitlab" => Ok(HookKind::Gitlab),
            "generic" => Ok(HookKind::Generic),
            _ => Err(()),
        }
    }
}

/// One input of a run, mounted read-only at `/ci/in/<mount>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dep {
    pub mount: String,
    pub label: Label,
}
