//! Strata's remote cache, client side: what one machine built, every other
//! machine reuses without running it.
//!
//! [`RemoteCache`] wraps the local store's action cache (the sccache
//! pattern: a decorator implementing the same [`ActionCache`] trait, never an
//! `if remote` in the engine). A lookup asks the local store first, then the
//! remote; a remote hit brings the entry and the objects the local store
//! lacks, checks every one, stores them, and records the entry locally, so
//! the next lookup is local. In write mode, every entry the build records is
//! sent in the background: first which of its objects the server lacks (one
//! request), then only those and the entry (one stream).
//!
//! With [`Fetch::Needed`] a remote hit brings the entry (and its log) but
//! none of its layers: the local store records them as held remotely
//! (`Store::put_lazy_action`), and [`ActionCache::fetch`] brings the ones a
//! task that runs here is about to read, all in one transfer. A lazy entry
//! found locally is trusted only once the cache says it still holds its
//! layers (one small request), so a cache that is down makes its producer
//! run here instead.
//!
//! Two backends: `ci serve` ([`native`], the pack protocol of [`pack`]) and
//! any HTTP server that takes GET, PUT and HEAD (WebDAV, e.g. nginx; see
//! [`dav`]), which has no bulk queries, so it costs a request per object.
//!
//! A cache that is unreachable, slow or wrong never stops a build and never
//! makes it wrong: the first failure is one warning and the build goes on
//! locally; wrong bytes are a miss naming the digest, and nothing wrong is
//! stored.

pub mod dav;
mod http;
pub mod native;
pub mod pack;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use strata_store::{ActionCache, ActionEntry, Digest, Store};

pub use http::{Timeouts, Traffic};
pub use pack::{PackError, Received};

/// Whether a build may write to the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Look up only (untrusted builds).
    Read,
    /// Look up, and send what this build makes.
    Write,
}

/// Which objects a hit brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Every object of the output, at the hit (`--remote-fetch=all`).
    All,
    /// The entry and its log; layers only when a task here reads them
    /// (`--remote-fetch=needed`).
    Needed,
}

/// Why a request to the cache failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Down, slow, cut off or failing (5xx): the build stops asking it.
    #[error("{0}")]
    Unreachable(String),
    /// 401 or 403.
    #[error("{0}")]
    Denied(String),
    /// Another 4xx: the server refused this request.
    #[error("{0}")]
    Refused(String),
    /// Bytes that were not what they claimed: a miss, and nothing stored.
    #[error("{0}")]
    Corrupt(PackError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] strata_store::Error),
}

impl From<PackError> for RemoteError {
    fn from(e: PackError) -> RemoteError {
        match e {
            PackError::Store(e) => RemoteError::Store(e),
            PackError::Io(e) => RemoteError::Unreachable(format!("the transfer failed: {e}")),
            PackError::Truncated(_) => RemoteError::Unreachable(e.to_string()),
            e => RemoteError::Corrupt(e),
        }
    }
}

/// What one transfer to the cache sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sent {
    /// Objects sent (the ones the server lacked).
    pub objects: u64,
    pub bytes: u64,
    /// Objects the server had already.
    pub present: u64,
    /// Action entries the server stored.
    pub actions: u64,
}

/// A cache server, as the client talks to it.
pub trait Backend: Send + Sync {
    /// Where it is, for messages.
    fn url(&self) -> &str;
    /// Requests and bytes so far.
    fn traffic(&self) -> &Traffic;
    /// The entry under `key` with its objects brought into `store` (checked,
    /// stored, recorded as layers), or `None` on a miss.
    fn fetch_action(&self, store: &Store, key: &Digest)
        -> Result<Option<ActionEntry>, RemoteError>;
    /// The entry under `key` with its blobs (the log) brought into `store`
    /// but none of its layers (the server is asked that it holds them), or
    /// `None` on a miss.
    fn fetch_entry(&self, store: &Store, key: &Digest) -> Result<Option<ActionEntry>, RemoteError>;
    /// Whether the server holds the layers rooted at `layers`.
    fn holds(&self, layers: &[Digest]) -> Result<bool, RemoteError>;
    /// Sends what the server lacks of `layers` and of the entries' objects,
    /// then the entries (`layers` are recorded as layers there).
    fn send(
        &self,
        store: &Store,
        layers: &[Digest],
        actions: &[(Digest, ActionEntry)],
    ) -> Result<Sent, RemoteError>;
    /// Brings `layers` into `store`.
    fn pull(&self, store: &Store, layers: &[Digest]) -> Result<Received, RemoteError>;
    /// The layer `spec` names there: a full digest anywhere, and on a
    /// server that can say, a unique prefix or a ref too.
    fn resolve(&self, spec: &str) -> Result<Digest, RemoteError> {
        parse_digest(spec).ok_or_else(|| {
            RemoteError::Refused(format!(
                "`{}` is not a layer digest: this server takes full digests (64 hex digits) only",
                clip(spec, 80)
            ))
        })
    }
}

/// A full digest in hex.
pub fn parse_digest(s: &str) -> Option<Digest> {
    let bytes = hex::decode(s).ok()?;
    Digest::from_slice(&bytes)
}

/// Opens the backend a URL names: `webdav+http://…` (or `webdav+https://`)
/// is a plain HTTP/WebDAV server, any other `http(s)://` URL is `ci serve`.
pub fn connect(
    url: &str,
    token: Option<String>,
    timeouts: Timeouts,
) -> Result<Box<dyn Backend>, String> {
    let (dav, base) = match url.strip_prefix("webdav+") {
        Some(rest) => (true, rest),
        None => (false, url),
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(format!(
            "`{url}` is not a cache URL; write `http://HOST:PORT` for `ci serve`, \
             or `webdav+http://HOST:PORT/PATH` for a plain WebDAV server"
        ));
    }
    Ok(match dav {
        true => Box::new(dav::Dav::new(base, token, timeouts)),
        false => Box::new(native::Native::new(base, token, timeouts)),
    })
}

/// `s` cut to `max` characters, marked when cut (error messages quote what
/// a server said, and a server may say a lot).
pub(crate) fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[derive(Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    fetched_bytes: AtomicU64,
    /// Layers fetched on use (lazy hits' layers a task here read).
    fetched_layers: AtomicU64,
    sent_objects: AtomicU64,
    sent_bytes: AtomicU64,
    sent_actions: AtomicU64,
}

struct Shared {
    local: Store,
    backend: Box<dyn Backend>,
    counts: Counts,
    /// Set at the first failure: the reason, shown once; the cache is not
    /// asked again in this process.
    down: Mutex<Option<String>>,
    /// Set when the server refuses writes (a read-only token).
    writes_refused: Mutex<Option<String>>,
    /// Layers of this build's hits left at the cache (lazy fetching).
    left_remote: Mutex<HashSet<Digest>>,
}

impl Shared {
    fn warn_down(&self, e: &RemoteError) {
        let mut down = self.down.lock();
        if down.is_none() {
            eprintln!(
                "warning: remote cache {}: {e}; building on without it",
                self.backend.url()
            );
            *down = Some(e.to_string());
        }
    }

    fn is_down(&self) -> bool {
        self.down.lock().is_some()
    }

    /// Sends a batch of entries; failures are warnings.
    fn share(&self, batch: &[(Digest, ActionEntry)]) {
        if self.is_down() || self.writes_refused.lock().is_some() {
            return;
        }
        let layers: Vec<Digest> = batch.iter().flat_map(|(_, e)| e.layers.clone()).collect();
        match self.backend.send(&self.local, &layers, batch) {
            Ok(sent) => {
                let c = &self.counts;
                c.sent_objects.fetch_add(sent.objects, Ordering::Relaxed);
                c.sent_bytes.fetch_add(sent.bytes, Ordering::Relaxed);
                c.sent_actions.fetch_add(sent.actions, Ordering::Relaxed);
            }
            Err(RemoteError::Denied(m)) | Err(RemoteError::Refused(m)) => {
                let mut refused = self.writes_refused.lock();
                if refused.is_none() {
                    eprintln!(
                        "warning: remote cache {} refuses what this build sends: {m}; results \
                         stay local (`--remote-cache-mode read` makes a build only read)",
                        self.backend.url()
                    );
                    *refused = Some(m);
                }
            }
            Err(e @ RemoteError::Store(_)) => {
                eprintln!(
                    "warning: remote cache {}: cannot read what to send: {e}",
                    self.backend.url()
                );
            }
            Err(e) => self.warn_down(&e),
        }
    }
}

/// The local action cache with a remote one behind it; see the crate doc.
pub struct RemoteCache {
    shared: Arc<Shared>,
    mode: Mode,
    fetch: Fetch,
    uploads: Mutex<Option<Uploader>>,
}

struct Uploader {
    tx: mpsc::Sender<(Digest, ActionEntry)>,
    thread: std::thread::JoinHandle<()>,
}

/// Entries sent in one transfer, at most.
const BATCH: usize = 256;
/// How long the uploader waits for more entries before it sends a batch.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

impl RemoteCache {
    pub fn new(local: Store, backend: Box<dyn Backend>, mode: Mode) -> RemoteCache {
        RemoteCache {
            shared: Arc::new(Shared {
                local,
                backend,
                counts: Counts::default(),
                down: Mutex::default(),
                writes_refused: Mutex::default(),
                left_remote: Mutex::default(),
            }),
            mode,
            fetch: Fetch::All,
            uploads: Mutex::default(),
        }
    }

    /// Fetches hits lazily (`Fetch::Needed`) or whole (the default).
    pub fn with_fetch(mut self, fetch: Fetch) -> RemoteCache {
        self.fetch = fetch;
        self
    }

    pub fn url(&self) -> &str {
        self.shared.backend.url()
    }

    /// A lazy entry recorded here earlier, if the cache still holds the
    /// layers it lacks locally: `Ok(None)` sends the lookup on to the cache.
    fn local_lazy(&self, key: &Digest) -> strata_store::Result<Option<ActionEntry>> {
        let s = &*self.shared;
        let Some(entry) = s.local.lazy_action(key)? else {
            return Ok(None);
        };
        let mut remote = Vec::new();
        for l in &entry.layers {
            if s.local.has_tree(l)? {
                continue;
            }
            if s.local.remote_layer(l)?.is_none() {
                return Ok(None);
            }
            remote.push(*l);
        }
        match s.backend.holds(&remote) {
            Ok(true) => {
                s.counts.hits.fetch_add(1, Ordering::Relaxed);
                s.left_remote.lock().extend(remote);
                Ok(Some(entry))
            }
            Ok(false) => Ok(None),
            Err(RemoteError::Store(e)) => Err(e),
            Err(e) => {
                s.warn_down(&e);
                Ok(None)
            }
        }
    }

    fn uploader(&self) -> mpsc::Sender<(Digest, ActionEntry)> {
        let mut g = self.uploads.lock();
        if let Some(u) = &*g {
            return u.tx.clone();
        }
        let (tx, rx) = mpsc::channel::<(Digest, ActionEntry)>();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("remote-cache-upload".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Entries that end close together go in one transfer.
                    let mut batch = vec![first];
                    let until = std::time::Instant::now() + LINGER;
                    while batch.len() < BATCH {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    shared.share(&batch);
                }
            })
            .expect("spawn the upload thread");
        *g = Some(Uploader {
            tx: tx.clone(),
            thread,
        });
        tx
    }
}

impl ActionCache for RemoteCache {
    fn lookup(&self, key: &Digest) -> strata_store::Result<Option<ActionEntry>> {
        let s = &*self.shared;
        if let Some(hit) = s.local.action(key)? {
            return Ok(Some(hit));
        }
        if s.is_down() {
            return Ok(None);
        }
        if self.fetch == Fetch::Needed {
            if let Some(hit) = s.local.promote_action(key)? {
                return Ok(Some(hit));
            }
            if let Some(hit) = self.local_lazy(key)? {
                return Ok(Some(hit));
            }
            if s.is_down() {
                return Ok(None);
            }
        }
        let before = s.backend.traffic().bytes_received.load(Ordering::Relaxed);
        let found = match self.fetch {
            Fetch::All => s.backend.fetch_action(&s.local, key),
            Fetch::Needed => s.backend.fetch_entry(&s.local, key),
        };
        match found {
            Ok(Some(entry)) => {
                let mut remote = Vec::new();
                for l in &entry.layers {
                    if !s.local.has_tree(l)? {
                        remote.push(*l);
                    }
                }
                match remote.is_empty() {
                    true => s.local.put_action(key, &entry)?,
                    false => s.local.put_lazy_action(key, &entry, s.backend.url())?,
                }
                s.left_remote.lock().extend(remote);
                s.counts.hits.fetch_add(1, Ordering::Relaxed);
                let after = s.backend.traffic().bytes_received.load(Ordering::Relaxed);
                s.counts
                    .fetched_bytes
                    .fetch_add(after - before, Ordering::Relaxed);
                Ok(Some(entry))
            }
            Ok(None) => {
                s.counts.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(RemoteError::Corrupt(e)) => {
                s.counts.misses.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "warning: remote cache {}: {e}; taken as a miss for action {}, nothing of it \
                     stored",
                    s.backend.url(),
                    key.short()
                );
                Ok(None)
            }
            Err(RemoteError::Store(e)) => Err(e),
            Err(e) => {
                s.counts.misses.fetch_add(1, Ordering::Relaxed);
                s.warn_down(&e);
                Ok(None)
            }
        }
    }

    fn fetch(&self, layers: &[Digest]) -> strata_store::Result<Vec<Digest>> {
        let s = &*self.shared;
        if !s.is_down() && !layers.is_empty() {
            let before = s.backend.traffic().bytes_received.load(Ordering::Relaxed);
            match s.backend.pull(&s.local, layers) {
                Ok(_) => {
                    s.local.forget_remote(layers)?;
                    let after = s.backend.traffic().bytes_received.load(Ordering::Relaxed);
                    s.counts
                        .fetched_bytes
                        .fetch_add(after - before, Ordering::Relaxed);
                    s.counts
                        .fetched_layers
                        .fetch_add(layers.len() as u64, Ordering::Relaxed);
                    let mut left = s.left_remote.lock();
                    for l in layers {
                        left.remove(l);
                    }
                }
                Err(RemoteError::Store(e)) => return Err(e),
                Err(RemoteError::Corrupt(e)) => eprintln!(
                    "warning: remote cache {}: {e}; layer {} not fetched, nothing of it stored",
                    s.backend.url(),
                    layers[0].short()
                ),
                Err(e) => s.warn_down(&e),
            }
        }
        let mut still = Vec::new();
        for l in layers {
            if !s.local.has_tree(l)? {
                still.push(*l);
            }
        }
        Ok(still)
    }

    fn recorded(&self, key: &Digest, entry: &ActionEntry) {
        if self.mode == Mode::Write && !self.shared.is_down() {
            let _ = self.uploader().send((*key, entry.clone()));
        }
    }

    fn finish(&self) -> Option<String> {
        if let Some(u) = self.uploads.lock().take() {
            drop(u.tx);
            let _ = u.thread.join();
        }
        let c = &self.shared.counts;
        let t = self.shared.backend.traffic();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut line = format!(
            "remote cache {}: {} hits, {} misses",
            self.url(),
            get(&c.hits),
            get(&c.misses)
        );
        if get(&c.hits) > 0 || get(&c.fetched_layers) > 0 {
            line += &format!(", {} fetched", human_bytes(get(&c.fetched_bytes)));
        }
        if self.fetch == Fetch::Needed {
            line += &format!(
                "; {} layers fetched on use, {} left remote",
                get(&c.fetched_layers),
                self.shared.left_remote.lock().len()
            );
        }
        if self.mode == Mode::Write {
            line += &format!(
                "; sent {} objects ({}) and {} results",
                get(&c.sent_objects),
                human_bytes(get(&c.sent_bytes)),
                get(&c.sent_actions)
            );
        }
        line += &format!("; {} requests", get(&t.requests));
        if let Some(why) = &*self.shared.down.lock() {
            line += &format!(" (stopped asking after: {})", clip(why, 200));
        }
        Some(line)
    }
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}
