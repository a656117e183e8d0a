//! The server side of the remote cache, for every protocol it speaks: the
//! native one (`/api/v1/cache`, [`native`]) and Bazel's (see `crate::bazel`).
//!
//! All of them keep their entries in the server's own store, so one
//! `--cache-max-size` and one eviction cover them all. [`CacheState`] holds
//! what the protocols share: when each entry was last used (for eviction by
//! last use) and the figures `/metrics` shows.

use std::collections::HashMap;

pub mod evict;
pub mod native;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::registry::Registry;
use strata_store::Family;

/// Which protocol a figure is about.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    /// `ci build --remote-cache` and `ci store push|pull`.
    Strata,
    /// Bazel's HTTP cache protocol (`/ac/`, `/cas/`).
    BazelHttp,
    /// The Remote Execution API's cache services over gRPC.
    Reapi,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Strata => "strata",
            Protocol::BazelHttp => "bazel-http",
            Protocol::Reapi => "reapi",
        }
    }
}

/// How one action lookup or upload ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    /// An entry or object was stored.
    Stored,
    /// An upload was refused: a digest did not match, or an entry named an
    /// object the server lacks.
    Refused,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stored => "stored",
            Outcome::Refused => "refused",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    protocol: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    protocol: &'static str,
    /// `in` (uploaded to the server) or `out` (sent to a client).
    direction: &'static str,
}

/// What the cache protocols share.
pub struct CacheState {
    /// Evict (least recently used entries first) while the store is larger.
    pub max_size: Option<u64>,
    last_use: Mutex<HashMap<(Family, Vec<u8>), u64>>,
    /// Wakes eviction after an upload.
    pub(crate) wake: tokio::sync::Notify,
    requests: MetricFamily<LookupLabels, Counter>,
    bytes: MetricFamily<FlowLabels, Counter>,
    objects: MetricFamily<FlowLabels, Counter>,
    evictions: Counter,
}

impl CacheState {
    pub fn new(max_size: Option<u64>) -> CacheState {
        CacheState {
            max_size,
            last_use: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            requests: MetricFamily::default(),
            bytes: MetricFamily::default(),
            objects: MetricFamily::default(),
            evictions: Counter::default(),
        }
    }

    /// Adds the cache's figures to `/metrics`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_requests",
            "Action-cache lookups and uploads by protocol and result (hit, miss, stored, refused)",
            self.requests.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes of objects moved by the cache, by protocol and direction (in: uploaded)",
            self.bytes.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects (blobs and trees) moved by the cache, by protocol and direction",
            self.objects.clone(),
        );
        registry.register(
            "cache_evictions",
            "Action entries dropped to keep the store under --cache-max-size",
            self.evictions.clone(),
        );
    }

    /// Counts one lookup or upload.
    pub fn count(&self, protocol: Protocol, outcome: Outcome) {
        self.requests
            .get_or_create(&LookupLabels {
                protocol: protocol.name(),
                result: outcome.name(),
            })
            .inc();
    }

    /// Counts objects received (`inbound`) or sent, and their bytes.
    pub fn moved(&self, protocol: Protocol, inbound: bool, objects: u64, bytes: u64) {
        let labels = FlowLabels {
            protocol: protocol.name(),
            direction: if inbound { "in" } else { "out" },
        };
        self.objects.get_or_create(&labels).inc_by(objects);
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Something was stored: eviction checks the size.
    pub fn uploaded(&self) {
        if self.max_size.is_some() {
            self.wake.notify_one();
        }
    }

    pub(crate) fn evicted(&self, n: u64) {
        self.evictions.inc_by(n);
    }

    /// Notes that the entry `key` of `family` (an action entry of any
    /// protocol) was just used, so eviction keeps it longer.
    pub fn touch(&self, family: Family, key: &[u8]) {
        self.last_use
            .lock()
            .insert((family, key.to_vec()), crate::runs::now_ms());
    }

    /// When the entry was last used in this process, if it was.
    pub(crate) fn last_use(&self, family: Family, key: &[u8]) -> Option<u64> {
        self.last_use.lock().get(&(family, key.to_vec())).copied()
    }

    pub(crate) fn forget(&self, family: Family, key: &[u8]) {
        self.last_use.lock().remove(&(family, key.to_vec()));
    }
}
