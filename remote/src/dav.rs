//! A plain HTTP file server as the cache (WebDAV's GET, PUT and HEAD; e.g.
//! nginx with `dav_methods PUT` and `create_full_put_path on`), for teams
//! without a `ci serve`.
//!
//! Layout under the base URL: `blobs/<hex>`, `trees/<hex>` (canonical
//! encoding) and `actions/<hex>` (the entry as JSON). Such a server answers
//! no bulk query: "which are missing" becomes parallel HEADs, and objects
//! move one request each (parallel, [`WORKERS`] at a time). Every object is
//! checked on arrival as with `ci serve`, and an entry is written only after
//! every object it needs, so a reader never sees an entry whose objects are
//! not there yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use strata_store::{ActionEntry, Digest, Entry, Store, Tree};

use crate::http::{Http, Timeouts, Traffic};
use crate::pack::{receive_blob, PackError, Receiver};
use crate::{Backend, Received, RemoteError, Sent};

/// Requests in flight at once.
pub const WORKERS: usize = 8;

pub struct Dav {
    http: Http,
}

impl Dav {
    pub fn new(base: &str, token: Option<String>, timeouts: Timeouts) -> Dav {
        Dav {
            http: Http::new(base, token, timeouts),
        }
    }

    /// Whether the server holds `path`.
    fn exists(&self, path: &str) -> Result<bool, RemoteError> {
        let res = self.http.call("HEAD", self.http.head(path))?;
        Ok(res.status().as_u16() != 404)
    }

    fn get_small(&self, path: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        let res = self.http.call("GET", self.http.get(path))?;
        if res.status().as_u16() == 404 {
            return Ok(None);
        }
        self.http.read_small(path, res).map(Some)
    }

    /// The entry stored under `key`, decoded; `None` when there is none.
    fn get_entry(&self, key: &Digest) -> Result<Option<ActionEntry>, RemoteError> {
        let Some(json) = self.get_small(&format!("/actions/{}", key.to_hex()))? else {
            return Ok(None);
        };
        serde_json::from_slice(&json).map(Some).map_err(|e| {
            RemoteError::Corrupt(PackError::BadAction {
                key: *key,
                reason: e.to_string(),
            })
        })
    }

    /// Every tree under `roots` that the store lacks, into `rx`, a level of
    /// the trees at a time.
    fn trees_into(&self, rx: &Mutex<Receiver<'_>>, roots: &[Digest]) -> Result<(), RemoteError> {
        let mut level: Vec<Digest> = Vec::new();
        for r in roots {
            if !rx.lock().has_tree(r)? {
                level.push(*r);
            }
        }
        let mut asked: HashSet<Digest> = level.iter().copied().collect();
        while !level.is_empty() {
            let got = parallel(&level, |d| {
                let path = format!("/trees/{}", d.to_hex());
                let bytes = self.get_small(&path)?.ok_or_else(|| {
                    RemoteError::Refused(format!("the server has no tree {}", d.short()))
                })?;
                let tree = Tree::decode(&bytes).map_err(|e| {
                    RemoteError::Corrupt(PackError::BadTree {
                        digest: *d,
                        reason: e.to_string(),
                    })
                })?;
                rx.lock().tree(*d, &bytes)?;
                Ok(tree)
            })?;
            let mut next = Vec::new();
            for tree in got {
                for (_, e) in tree.entries() {
                    if let Entry::Dir { digest } = e {
                        if asked.insert(*digest) && !rx.lock().has_tree(digest)? {
                            next.push(*digest);
                        }
                    }
                }
            }
            level = next;
        }
        Ok(())
    }

    fn blobs_into(
        &self,
        rx: &Mutex<Receiver<'_>>,
        store: &Store,
        digests: &[Digest],
    ) -> Result<(), RemoteError> {
        parallel(digests, |d| {
            let path = format!("/blobs/{}", d.to_hex());
            let res = self.http.call("GET", self.http.get(&path))?;
            if res.status().as_u16() == 404 {
                return Err(RemoteError::Refused(format!(
                    "the server has no blob {}",
                    d.short()
                )));
            }
            let len = res
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let mut body = self.http.reader(res);
            let new = receive_blob(store, d, &mut |w| {
                std::io::copy(&mut body, w)?;
                Ok(())
            })?;
            rx.lock().counted_blob(len, new);
            Ok(())
        })?;
        Ok(())
    }
}

impl Backend for Dav {
    fn url(&self) -> &str {
        &self.http.base
    }

    fn traffic(&self) -> &Traffic {
        &self.http.traffic
    }

    fn fetch_action(
        &self,
        store: &Store,
        key: &Digest,
    ) -> Result<Option<ActionEntry>, RemoteError> {
        let Some(entry) = self.get_entry(key)? else {
            return Ok(None);
        };
        let rx = Mutex::new(Receiver::new(store));
        match self.trees_into(&rx, &entry.layers) {
            // An entry whose objects are gone is a miss.
            Err(RemoteError::Refused(_)) => return Ok(None),
            r => r?,
        }
        let missing = rx.lock().missing_blobs(&entry.blobs)?;
        match self.blobs_into(&rx, store, &missing) {
            Err(RemoteError::Refused(_)) => return Ok(None),
            r => r?,
        }
        rx.into_inner().commit()?;
        Ok(Some(entry))
    }

    fn fetch_entry(&self, store: &Store, key: &Digest) -> Result<Option<ActionEntry>, RemoteError> {
        let Some(entry) = self.get_entry(key)? else {
            return Ok(None);
        };
        // Entries are written after their objects: the roots are enough.
        if !self.holds(&entry.layers)? {
            return Ok(None);
        }
        let rx = Mutex::new(Receiver::new(store));
        let missing = rx.lock().missing_blobs(&entry.blobs)?;
        match self.blobs_into(&rx, store, &missing) {
            Err(RemoteError::Refused(_)) => return Ok(None),
            r => r?,
        }
        rx.into_inner().commit()?;
        Ok(Some(entry))
    }

    fn holds(&self, layers: &[Digest]) -> Result<bool, RemoteError> {
        let there = parallel(layers, |d| self.exists(&format!("/trees/{}", d.to_hex())))?;
        Ok(there.iter().all(|t| *t))
    }

    fn send(
        &self,
        store: &Store,
        layers: &[Digest],
        actions: &[(Digest, ActionEntry)],
    ) -> Result<Sent, RemoteError> {
        let closure = store.closure(layers)?;
        let mut blobs: Vec<Digest> = closure.blobs.iter().map(|(d, _)| *d).collect();
        let mut seen: HashSet<Digest> = blobs.iter().copied().collect();
        for (_, e) in actions {
            blobs.extend(e.blobs.iter().filter(|b| seen.insert(**b)));
        }
        let trees: Vec<&(Digest, Vec<u8>)> = closure.trees.iter().collect();
        // Which are missing: a HEAD each.
        let blob_missing = parallel(&blobs, |d| {
            Ok(!self.exists(&format!("/blobs/{}", d.to_hex()))?)
        })?;
        let tree_missing = parallel(&trees, |(d, _)| {
            Ok(!self.exists(&format!("/trees/{}", d.to_hex()))?)
        })?;
        let send_blobs: Vec<Digest> = blobs
            .iter()
            .zip(&blob_missing)
            .filter(|(_, m)| **m)
            .map(|(d, _)| *d)
            .collect();
        let send_trees: Vec<&(Digest, Vec<u8>)> = trees
            .iter()
            .zip(&tree_missing)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect();
        let mut sent = Sent {
            present: (blobs.len() + trees.len() - send_blobs.len() - send_trees.len()) as u64,
            ..Sent::default()
        };
        let sizes = parallel(&send_blobs, |d| {
            let blob = store.blob(d)?;
            let size = blob.size();
            let mut r = strata_store::blob::BlobReader::new(&*blob);
            let req = self.http.put(&format!("/blobs/{}", d.to_hex()));
            self.http.send_stream("PUT a blob", req, &mut r)?;
            Ok(size)
        })?;
        sent.bytes += sizes.iter().sum::<u64>();
        // Trees after the blobs, children before parents.
        for (d, bytes) in &send_trees {
            let req = self.http.put(&format!("/trees/{}", d.to_hex()));
            self.http.send("PUT a tree", req, bytes)?;
            sent.bytes += bytes.len() as u64;
        }
        sent.objects = (send_blobs.len() + send_trees.len()) as u64;
        // Entries last: a reader never sees one before its objects.
        for (key, entry) in actions {
            let json =
                serde_json::to_vec(entry).map_err(|e| RemoteError::Refused(e.to_string()))?;
            let req = self
                .http
                .put(&format!("/actions/{}", key.to_hex()))
                .header("Content-Type", "application/json");
            self.http.send("PUT an action entry", req, &json)?;
            sent.actions += 1;
        }
        Ok(sent)
    }

    fn pull(&self, store: &Store, layers: &[Digest]) -> Result<Received, RemoteError> {
        let rx = Mutex::new(Receiver::new(store));
        self.trees_into(&rx, layers)?;
        let missing = rx.lock().missing_blobs(&[])?;
        self.blobs_into(&rx, store, &missing)?;
        let mut rx = rx.into_inner();
        rx.layers = layers.to_vec();
        let (received, _) = rx.commit()?;
        Ok(received)
    }
}

/// `f` over `items`, [`WORKERS`] at a time; the results in order, or the
/// first error.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, RemoteError> + Sync,
) -> Result<Vec<R>, RemoteError> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<R, RemoteError>>>> =
        items.iter().map(|_| Mutex::new(None)).collect();
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = f(&items[i]);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                *results[i].lock() = Some(r);
            });
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        match r.into_inner() {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if out.len() != items.len() {
        return Err(RemoteError::Unreachable("a transfer was abandoned".into()));
    }
    Ok(out)
}
