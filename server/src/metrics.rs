//! `/metrics` in the Prometheus text format (OpenMetrics): runs by state,
//! tasks executed and cached, the queue, live SSE clients, and request
//! latencies by route.

use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use strata_engine::{RunRecord, TaskState};

use crate::api::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type Latency = Family<RequestLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Latency,
    runs: Family<StateLabels, Gauge>,
    tasks_executed: Gauge,
    tasks_cached: Gauge,
    tasks_failed: Gauge,
    queue: Gauge,
    running: Gauge,
    sse: Gauge,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("strata");
        let requests: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request (to its first byte for streams)",
            requests.clone(),
        );
        let runs = Family::<StateLabels, Gauge>::default();
        registry.register("runs", "Runs in the store by state", runs.clone());
        let tasks_executed = Gauge::default();
        registry.register(
            "tasks_executed",
            "Tasks whose command ran, since the server started",
            tasks_executed.clone(),
        );
        let tasks_cached = Gauge::default();
        registry.register(
            "tasks_cached",
            "Tasks taken from the action cache, since the server started",
            tasks_cached.clone(),
        );
        let tasks_failed = Gauge::default();
        registry.register(
            "tasks_failed",
            "Tasks that failed, since the server started",
            tasks_failed.clone(),
        );
        let queue = Gauge::default();
        registry.register("queue_length", "Runs waiting for their turn", queue.clone());
        let running = Gauge::default();
        registry.register("runs_running", "Runs under way now", running.clone());
        let sse = Gauge::default();
        registry.register("sse_clients", "Live event-stream clients", sse.clone());
        Metrics {
            registry: Mutex::new(registry),
            requests,
            runs,
            tasks_executed,
            tasks_cached,
            tasks_failed,
            queue,
            running,
            sse,
        }
    }

    /// Lets another part of the server add its figures.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock());
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .observe(took.as_secs_f64());
    }

    pub async fn render(&self, state: &AppState) -> String {
        let store = state.store.clone();
        // Counting runs reads their records: off the async threads.
        let counts = tokio::task::spawn_blocking(move || {
            let mut counts = std::collections::BTreeMap::new();
            for s in TaskState::ALL {
                counts.insert(s.as_str(), 0i64);
            }
            for id in store.run_ids().unwrap_or_default() {
                if let Ok(r) = RunRecord::load(&store, &id) {
                    *counts.entry(r.state.as_str()).or_default() += 1;
                }
            }
            counts
        })
        .await
        .unwrap_or_default();
        for (state_name, n) in counts {
            self.runs
                .get_or_create(&StateLabels {
                    state: state_name.to_owned(),
                })
                .set(n);
        }
        let c = &state.mgr.counters;
        self.tasks_executed
            .set(c.tasks_executed.load(Ordering::Relaxed) as i64);
        self.tasks_cached
            .set(c.tasks_cached.load(Ordering::Relaxed) as i64);
        self.tasks_failed
            .set(c.tasks_failed.load(Ordering::Relaxed) as i64);
        self.queue.set(state.mgr.queue_len() as i64);
        self.running.set(state.mgr.running() as i64);
        self.sse.set(state.hub.clients() as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock());
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
