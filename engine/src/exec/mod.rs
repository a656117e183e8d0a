//! Executors: pluggable ways to run an action. One trait; `host` runs a
//! process in prepared directories (the default where Docker is absent).
//!
//! An executor returns an [`ExecOutcome`] for anything the task did, success
//! or failure: a failed task is data. An `Err` means the executor itself
//! could not work (e.g. Docker is unreachable).

pub mod docker;
pub mod host;
pub mod zygote;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink, Stream};
use crate::BuildError;

/// The prepared directories of one task, as host paths.
#[derive(Clone, Debug)]
pub struct TaskDirs {
    /// One read-only entry per input mount name (`CI_IN`).
    pub inputs: PathBuf,
    /// The writable work directory, captured as the output (`CI_WORK`).
    pub work: PathBuf,
    /// The previous output, read-only, for impure tasks (`CI_PREV`).
    pub prev: Option<PathBuf>,
    /// The previous run's inputs, one read-only entry per input mount name
    /// that the previous run had (`CI_PREV_IN`), for impure tasks.
    pub prev_in: Option<PathBuf>,
    /// The file where the task may write `KEY=VALUE` context (`CI_CONTEXT`).
    pub context: PathBuf,
    /// Host directories a task must not see (the store, the run's scratch):
    /// a sandbox that shows a host directory holding one of them hides it.
    pub private: Vec<PathBuf>,
}

/// One fully resolved action, ready to run.
pub struct ExecRequest {
    pub label: String,
    pub argv: Vec<String>,
    /// Declared environment plus inherited context (no `CI_*` paths: the
    /// executor sets those for its own namespace).
    pub env: BTreeMap<String, String>,
    /// Secret values; never logged (the log sink redacts them).
    pub secrets: BTreeMap<String, String>,
    pub image: Option<String>,
    pub dirs: TaskDirs,
    /// Starting directory relative to the work directory.
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub network: bool,
    /// Service containers started first on a private network (container executors).
    pub services: BTreeMap<String, crate::model::Service>,
    pub timeout: Option<Duration>,
    pub cancel: CancellationToken,
    pub log: LogSink,
}

/// How a task's process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cancelled: bool,
    /// Why the command could not start, when it could not.
    pub spawn_error: Option<String>,
}

impl ExecOutcome {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled
    }

    /// A one-line reason for a failure.
    pub fn describe(&self, timeout: Option<Duration>) -> String {
        if let Some(e) = &self.spawn_error {
            return e.clone();
        }
        if self.cancelled {
            return "cancelled".into();
        }
        if self.timed_out {
            return format!("timed out after {}s", timeout.map_or(0, |t| t.as_secs()));
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended without a status".into(),
        }
    }
}

/// Runs actions.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// The executor's name (`host`, `docker`).
    fn name(&self) -> &'static str;
    /// Part of every action key: where and how commands run.
    fn platform(&self) -> String;
    /// Resolves an image reference to its content id (for the action key).
    async fn resolve_image(&self, image: &str) -> Result<String, BuildError>;
    /// Runs one action to its end (or its timeout or cancellation).
    async fn run(&self, req: ExecRequest) -> Result<ExecOutcome, BuildError>;
}

/// Lines a failed task shows in the summary.
pub const LOG_TAIL: usize = 20;
/// Longest line sent as one event; longer lines are cut (the log blob keeps all).
const MAX_EVENT_LINE: usize = 4096;

/// Receives a task's output: redacts secrets, sends each line as an event,
/// appends it to the log file, and keeps the last lines for the summary.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<LogInner>,
}

struct LogInner {
    label: String,
    events: EventSink,
    secrets: Vec<String>,
    file: Mutex<std::fs::File>,
    tail: Mutex<VecDeque<String>>,
}

impl LogSink {
    pub fn new(
        label: &str,
        events: EventSink,
        secrets: Vec<String>,
        file: std::fs::File,
    ) -> LogSink {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Longest first, so a secret containing another is redacted whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        LogSink {
            inner: Arc::new(LogInner {
                label: label.to_owned(),
                events,
                secrets,
                file: Mutex::new(file),
                tail: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// One line of output (without its newline).
    pub fn line(&self, stream: Stream, bytes: &[u8]) {
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        for s in &self.inner.secrets {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "***");
            }
        }
        if let Ok(mut f) = self.inner.file.lock() {
            let _ = f.write_all(text.as_bytes());
            let _ = f.write_all(b"\n");
        }
        if let Ok(mut t) = self.inner.tail.lock() {
            if t.len() == LOG_TAIL {
                t.pop_front();
            }
            t.push_back(text.clone());
        }
        let mut shown = text;
        if shown.len() > MAX_EVENT_LINE {
            let mut cut = MAX_EVENT_LINE;
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            shown.push('…');
        }
        self.inner.events.send(Event::TaskLog {
            label: self.inner.label.clone(),
            stream,
            line: shown,
        });
    }

    /// Sends `message` as a note of the run, once per run for each `key`
    /// (however many tasks say it).
    pub fn warn_once(&self, key: &str, message: String) {
        self.inner.events.note_once(key, message);
    }

    /// The last lines seen.
    pub fn tail(&self) -> Vec<String> {
        self.inner
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Reads `r` line by line into `log` until end of file.
pub(crate) async fn pump<R: tokio::io::AsyncRead + Unpin>(r: R, stream: Stream, log: LogSink) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                log.line(stream, &buf);
            }
        }
    }
}
