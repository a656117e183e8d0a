//! Strata's build engine, front half: the pipeline model, labels, the Starlark loader
//! and the build graph.
//!
//! - [`model`]: plain serde types describing a pipeline; what the loader produces, what the
//!   HTTP API accepts, what the scheduler consumes. [`model::Workspace::validate`] is the
//!   one gate for models of any origin.
//! - [`label`]: validated labels (`//dir:name`) and patterns (`//dir:all`, `//...`).
//! - [`loader`]: `ci.toml` and `BUILD.star` files into a [`model::Workspace`].
//! - [`graph`]: order, closures, stage gating, and `ci graph` output.
//!
//! Architecture invariant: nothing in this half touches the store or runs a command;
//! loading only reads `ci.toml`, `BUILD.star` and loaded `.star` files (and checks that
//! local source directories exist).

pub mod analyze;
mod build;
mod build_error;
pub mod error;
pub mod events;
pub mod exec;
mod git;
pub mod graph;
pub mod key;
pub mod label;
pub mod loader;
pub mod model;
pub mod record;
mod scratch;
mod validate;

pub use build::{
    error_chain, explain_label, previous_payload, resolve_git_source, workspace_label_key,
    ActionPayload, BuildOptions, Engine, Prediction,
};
pub use build_error::BuildError;
pub use error::{Invalid, LoadError, ModelError};
pub use events::{Event, EventSink, Stream};
pub use graph::{expand, render_graph, Graph, GraphFormat, GraphJson};
pub use label::{Label, LabelError, Pattern};
pub use loader::{find_root, CountingAlloc, LoadLimits, Loader};
pub use model::{
    Command, Dep, Executor, GitSource, HookKind, InputMode, LocalSource, Location, Merge,
    OnConflict, Run, Service, Settings, Stage, Task, TaskKind, Timer, Webhook, Workspace,
};
pub use record::{new_run_id, RunRecord, RunSummary, TaskRecord, TaskState, Trigger};
pub use validate::parse_cron;
