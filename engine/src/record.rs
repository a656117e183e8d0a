//! Run records: what a run did, task by task. Stored in the store's run
//! family; `ci runs`, `ci run show`, `ci logs` and `ci rerun` read them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_store::{Digest, Payload, RunEntry, Store};

use crate::BuildError;

/// The state of a task, or of a whole run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not run because something it needs failed.
    Skipped,
    /// Stopped by Ctrl-C or fail-fast.
    Cancelled,
    /// A run accepted by `ci serve`, waiting for its turn in the workspace's queue.
    Queued,
    /// A run whose process died before it ended (found so when a server or
    /// build next opened the store).
    Interrupted,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Skipped => "skipped",
            TaskState::Cancelled => "cancelled",
            TaskState::Queued => "queued",
            TaskState::Interrupted => "interrupted",
        }
    }

    /// Every state, in the order of [`TaskState::as_str`].
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Skipped,
        TaskState::Cancelled,
        TaskState::Queued,
        TaskState::Interrupted,
    ];

    /// Whether a run in this state will not change any more.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            TaskState::Pending | TaskState::Running | TaskState::Queued
        )
    }
}

impl std::str::FromStr for TaskState {
    type Err = ();
    fn from_str(s: &str) -> Result<TaskState, ()> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(())
    }
}

/// What started a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Trigger {
    /// `cli`, `api`, `rerun`, `git`, `timer`, `webhook` or `watch`.
    pub kind: String,
    /// The source that fired, as a label (for `git`, `timer`, `webhook`, `watch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What fired: a commit id, a tick's time, a delivery id, a changed path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The name of the token that asked for the run (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// What happened to one task in one run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskRecord {
    pub state: TaskState,
    /// The output came from the action cache (nothing ran).
    pub cached: bool,
    /// The output was kept from an earlier run by `ci rerun`.
    #[serde(default)]
    pub reused: bool,
    pub key: Option<Digest>,
    /// The output layer; for a failed task, its partial output.
    pub output: Option<Digest>,
    /// stdout and stderr, interleaved, as a blob.
    pub log: Option<Digest>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Context this task passes to its descendants (inherited + written).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    pub started_ms: u64,
    /// Time the task worked, waiting for a job token excluded.
    pub duration_ms: u64,
    /// Time the task waited for a job token (`-j`), started or not.
    #[serde(default)]
    pub queued_ms: u64,
    pub attempts: u32,
}

impl TaskRecord {
    pub fn pending() -> TaskRecord {
        TaskRecord {
            state: TaskState::Pending,
            cached: false,
            reused: false,
            key: None,
            output: None,
            log: None,
            exit_code: None,
            error: None,
            context: BTreeMap::new(),
            started_ms: 0,
            duration_ms: 0,
            queued_ms: 0,
            attempts: 0,
        }
    }
}

/// One invocation of `ci build` (or `ci rerun`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunRecord {
    /// Sortable: `YYYYMMDDTHHMMSS.mmm-xxxx`.
    pub id: String,
    pub targets: Vec<String>,
    pub state: TaskState,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// The run this one re-ran, for `ci rerun`.
    pub rerun_of: Option<String>,
    pub tasks: BTreeMap<String, TaskRecord>,
    /// The workspace's name, for runs started by `ci serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// What started the run; `None` for a plain `ci build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
}

/// One line of a run list (`ci runs`, `GET /api/v1/runs`): the record
/// without its tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunSummary {
    pub id: String,
    pub state: TaskState,
    #[serde(default)]
    pub workspace: Option<String>,
    pub targets: Vec<String>,
    #[serde(default)]
    pub started_ms: u64,
    pub duration_ms: u64,
    pub tasks: usize,
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    #[serde(default)]
    pub skipped: usize,
    pub rerun_of: Option<String>,
    #[serde(default)]
    pub trigger: Option<Trigger>,
}

impl RunRecord {
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            id: self.id.clone(),
            state: self.state,
            workspace: self.workspace.clone(),
            targets: self.targets.clone(),
            started_ms: self.started_ms,
            duration_ms: self.duration_ms,
            tasks: self.tasks.len(),
            executed: self.executed(),
            cached: self.cached(),
            failed: self.failed(),
            skipped: self.skipped(),
            rerun_of: self.rerun_of.clone(),
            trigger: self.trigger.clone(),
        }
    }

    pub fn count(&self, f: impl Fn(&TaskRecord) -> bool) -> usize {
        self.tasks.values().filter(|t| f(t)).count()
    }

    /// Tasks whose command actually ran.
    pub fn executed(&self) -> usize {
        self.count(|t| !t.cached && !t.reused && t.attempts > 0)
    }

    pub fn cached(&self) -> usize {
        self.count(|t| t.cached)
    }

    /// Tasks whose output `ci rerun` kept from the run it re-ran.
    pub fn kept(&self) -> usize {
        self.count(|t| t.reused)
    }

    pub fn failed(&self) -> usize {
        self.count(|t| t.state == TaskState::Failed)
    }

    pub fn skipped(&self) -> usize {
        self.count(|t| matches!(t.state, TaskState::Skipped | TaskState::Cancelled))
    }

    /// Saves the record in the store; its outputs and logs become GC roots
    /// while the run is among the most recent.
    pub fn save(&self, store: &Store) -> Result<(), BuildError> {
        let mut layers: Vec<Digest> = self.tasks.values().filter_map(|t| t.output).collect();
        layers.sort();
        layers.dedup();
        let blobs: Vec<Digest> = self.tasks.values().filter_map(|t| t.log).collect();
        let record = Payload::new(self).map_err(|e| BuildError::Record {
            run: self.id.clone(),
            reason: e.to_string(),
        })?;
        store.put_run(
            &self.id,
            &RunEntry {
                layers,
                blobs,
                record,
                created: self.started_ms / 1000,
            },
        )?;
        Ok(())
    }

    /// Loads a run by id, or by a unique prefix of its id; `latest` (or
    /// `last`) is the most recent run.
    pub fn load(store: &Store, id: &str) -> Result<RunRecord, BuildError> {
        // A full id is one point lookup; only a prefix or `latest` lists ids
        // (`list`, and a server answering for one run, load full ids).
        if let Some(entry) = store.run(id)? {
            return Self::decode(id, &entry);
        }
        let ids = store.run_ids()?;
        let found: Vec<&String> = if id == "latest" || id == "last" {
            ids.last().into_iter().collect()
        } else if ids.iter().any(|i| i == id) {
            ids.iter().filter(|i| *i == id).collect()
        } else {
            ids.iter().filter(|i| i.starts_with(id)).collect()
        };
        let id = match found.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(BuildError::UnknownRun { run: id.to_owned() }),
            many => {
                return Err(BuildError::AmbiguousRun {
                    run: id.to_owned(),
                    candidates: many.iter().map(|s| s.to_string()).collect(),
                })
            }
        };
        let entry = store
            .run(&id)?
            .ok_or_else(|| BuildError::UnknownRun { run: id.clone() })?;
        Self::decode(&id, &entry)
    }

    fn decode(id: &str, entry: &RunEntry) -> Result<RunRecord, BuildError> {
        entry.record.decode().map_err(|e| BuildError::Record {
            run: id.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Every run, oldest first.
    pub fn list(store: &Store) -> Result<Vec<RunRecord>, BuildError> {
        let mut out = Vec::new();
        for id in store.run_ids()? {
            out.push(RunRecord::load(store, &id)?);
        }
        Ok(out)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new run id that sorts in start order: UTC time to the millisecond
/// plus 4 hex digits that tell apart runs started in the same millisecond.
pub fn new_run_id() -> String {
    let ms = now_ms();
    let secs = (ms / 1000) as i64;
    let (y, mo, d, h, mi, s) = civil(secs);
    let rand = Digest::of(format!("{ms}-{}", std::process::id()).as_bytes()).to_hex();
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{:03}-{}",
        ms % 1000,
        &rand[..4]
    )
}

/// Seconds since the epoch → UTC calendar fields (Howard Hinnant's algorithm).
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}
