//! Events: every state change and log line of a run, on one stream. The
//! terminal view, the run record and (later) the HTTP API's live feed all
//! read it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use strata_store::Digest;

use crate::record::TaskState;

/// Which output stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One thing that happened during a run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: String,
        targets: Vec<String>,
        tasks: usize,
    },
    /// Something the user should read once (e.g. the work-directory strategy).
    Note { message: String },
    TaskStarted {
        label: String,
        attempt: u32,
        executor: String,
    },
    TaskLog {
        label: String,
        stream: Stream,
        line: String,
    },
    TaskFinished {
        label: String,
        state: TaskState,
        cached: bool,
        output: Option<Digest>,
        duration_ms: u64,
        exit_code: Option<i32>,
        error: Option<String>,
        /// The action key (a pure task's cache key).
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<Digest>,
        /// The log blob.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<Digest>,
        /// What the task passes to its descendants: with the rest, a run's
        /// events alone can rebuild its record (a server killed mid-run).
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        context: BTreeMap<String, String>,
        attempts: u32,
    },
    RunFinished {
        run: String,
        state: TaskState,
        executed: usize,
        cached: usize,
        failed: usize,
        skipped: usize,
        duration_ms: u64,
    },
}

impl Event {
    /// The event's kind, as its JSON `event` field says it (the SSE name).
    pub fn name(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::Note { .. } => "note",
            Event::TaskStarted { .. } => "task_started",
            Event::TaskLog { .. } => "task_log",
            Event::TaskFinished { .. } => "task_finished",
            Event::RunFinished { .. } => "run_finished",
        }
    }
}

/// Where events go. Cheap to clone; must not block.
#[derive(Clone)]
pub struct EventSink {
    send: Arc<dyn Fn(Event) + Send + Sync>,
    /// Keys of the notes sent once ([`EventSink::note_once`]).
    once: Arc<Mutex<BTreeSet<String>>>,
}

impl EventSink {
    pub fn new(f: impl Fn(Event) + Send + Sync + 'static) -> EventSink {
        EventSink {
            send: Arc::new(f),
            once: Arc::default(),
        }
    }

    /// A [`Event::Note`] sent only the first time `key` is given to this
    /// sink or a clone of it (one sink serves one run).
    pub fn note_once(&self, key: &str, message: String) {
        let first = self
            .once
            .lock()
            .map(|mut seen| seen.insert(key.to_owned()))
            .unwrap_or(false);
        if first {
            self.send(Event::Note { message });
        }
    }

    /// Drops every event.
    pub fn none() -> EventSink {
        EventSink::new(|_| {})
    }

    pub fn send(&self, e: Event) {
        (self.send)(e)
    }
}
