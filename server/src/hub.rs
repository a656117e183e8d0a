//! The event hub: every event of every run gets the run's next sequence
//! number, is written to the store (so a restart loses nothing), and is
//! fanned out to live subscribers: the run's own stream and, without log
//! lines, the global feed.
//!
//! A subscriber never misses or repeats an event: it subscribes under the
//! run's lock, learns the next sequence number at that instant, replays the
//! store up to it, then takes the live stream from it on. One that falls
//! behind the live channel re-reads the store from where it was.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use strata_store::Store;
use tokio::sync::broadcast;

/// How many events a live subscriber may fall behind before it re-reads
/// the store.
const RUN_CHANNEL: usize = 4096;
const FEED_CHANNEL: usize = 1024;

/// One recorded event.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub run: Arc<str>,
    pub seq: u64,
    /// The SSE event name (`task_started`, …).
    pub name: Arc<str>,
    /// The event as JSON.
    pub json: Arc<str>,
}

/// What a live run's channel carries.
#[derive(Clone, Debug)]
pub enum Live {
    Event(Recorded),
    /// The run ended: nothing follows.
    End,
}

struct RunLine {
    next: u64,
    finished: bool,
    tx: broadcast::Sender<Live>,
}

/// What a subscriber gets: events up to `next` are in the store; the
/// channel (when the run is live) carries everything from `next` on.
pub struct Subscription {
    pub next: u64,
    pub rx: Option<broadcast::Receiver<Live>>,
}

pub struct Hub {
    store: Store,
    runs: Mutex<HashMap<String, Arc<Mutex<RunLine>>>>,
    feed: broadcast::Sender<Recorded>,
    /// Live SSE clients, for `/metrics`.
    pub sse_clients: AtomicUsize,
}

impl Hub {
    pub fn new(store: Store) -> Arc<Hub> {
        Arc::new(Hub {
            store,
            runs: Mutex::new(HashMap::new()),
            feed: broadcast::channel(FEED_CHANNEL).0,
            sse_clients: AtomicUsize::new(0),
        })
    }

    fn line(&self, run: &str) -> Arc<Mutex<RunLine>> {
        let mut runs = self.runs.lock();
        runs.entry(run.to_owned())
            .or_insert_with(|| {
                let next = self.store.next_event_seq(run).unwrap_or(0);
                Arc::new(Mutex::new(RunLine {
                    next,
                    finished: false,
                    tx: broadcast::channel(RUN_CHANNEL).0,
                }))
            })
            .clone()
    }

    /// Records one event of `run`. `name` is its kind; `json` the event.
    /// Log lines (`task_log`) stay off the global feed.
    pub fn record(&self, run: &str, name: &str, json: String) {
        // Every stored event says when it happened (ms since the epoch).
        let json = match json.strip_prefix('{') {
            Some(rest) => format!("{{\"at_ms\":{},{rest}", crate::runs::now_ms()),
            None => json,
        };
        let line = self.line(run);
        let mut l = line.lock();
        let seq = l.next;
        if let Err(e) = self.store.append_events(run, seq, &[json.as_bytes()]) {
            // The event still goes out live; the run's record keeps the outcome.
            eprintln!("warning: cannot store event {seq} of run {run}: {e}");
        }
        l.next += 1;
        let rec = Recorded {
            run: Arc::from(run),
            seq,
            name: Arc::from(name),
            json: Arc::from(json),
        };
        if name != "task_log" {
            let _ = self.feed.send(rec.clone());
        }
        let _ = l.tx.send(Live::Event(rec));
    }

    /// Marks `run` ended: subscribers get [`Live::End`] after its last event.
    pub fn finish(&self, run: &str) {
        let line = self.runs.lock().remove(run);
        if let Some(line) = line {
            let mut l = line.lock();
            l.finished = true;
            let _ = l.tx.send(Live::End);
        }
    }

    /// Whether `run` is being recorded now (queued or running here).
    pub fn is_live(&self, run: &str) -> bool {
        self.runs.lock().contains_key(run)
    }

    /// Subscribes to `run`: see [`Subscription`]. A run not live here has
    /// no channel: the store holds all of it.
    pub fn subscribe(&self, run: &str) -> Subscription {
        let line = self.runs.lock().get(run).cloned();
        match line {
            Some(line) => {
                let l = line.lock();
                Subscription {
                    next: l.next,
                    rx: (!l.finished).then(|| l.tx.subscribe()),
                }
            }
            None => Subscription {
                next: u64::MAX,
                rx: None,
            },
        }
    }

    /// The feed of every run's and task's state changes.
    pub fn feed(&self) -> broadcast::Receiver<Recorded> {
        self.feed.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn clients(&self) -> usize {
        self.sse_clients.load(Ordering::Relaxed)
    }
}

/// Counts a live SSE client while alive.
pub struct ClientGuard(pub Arc<Hub>);

impl ClientGuard {
    pub fn new(hub: Arc<Hub>) -> ClientGuard {
        hub.sse_clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(hub)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.sse_clients.fetch_sub(1, Ordering::Relaxed);
    }
}
