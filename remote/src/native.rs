//! The `ci serve` backend: bulk queries and packs, so a hit costs two
//! requests (the entry with its trees, then the blobs the local store
//! lacks) and an upload two (which objects are missing, then one pack),
//! however many files a layer has.
//!
//! The endpoints (all under `/api/v1/cache`, specified in docs/FORMAT.md):
//! `GET actions/{key}` → a pack of the entry and its layers' trees;
//! `POST missing` (digests) → the digests the server lacks;
//! `POST fetch` (digests) → a pack of those objects;
//! `POST trees` (root digests) → a pack of every tree under them;
//! `POST upload` (a pack) → what was stored and refused.

use std::collections::HashSet;
use std::io::Write;

use strata_store::{ActionEntry, Digest, Store};

use crate::http::{Http, Timeouts, Traffic};
use crate::pack::{decode_digests, encode_digests, Kind, PackReader, PackWriter, Receiver};
use crate::{Backend, Received, RemoteError, Sent};

const OCTETS: &str = "application/octet-stream";

pub struct Native {
    http: Http,
}

/// What the server says of an upload.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct UploadReport {
    pub received: Received,
    /// Action keys stored.
    pub stored: Vec<String>,
    /// Action keys refused, with the reason (an object the server lacks).
    pub refused: Vec<Refusal>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    pub key: String,
    pub reason: String,
}

impl Native {
    pub fn new(base: &str, token: Option<String>, timeouts: Timeouts) -> Native {
        Native {
            http: Http::new(base, token, timeouts),
        }
    }

    /// Asks for `digests` and takes the pack into `rx`.
    /// Asks for `key`'s entry, with the trees of its layers when `trees`:
    /// `None` on a miss, else what was received (not committed) and the
    /// entry.
    fn look_up<'s>(
        &self,
        store: &'s Store,
        key: &Digest,
        trees: bool,
    ) -> Result<Option<(Receiver<'s>, ActionEntry)>, RemoteError> {
        let mut path = format!("/api/v1/cache/actions/{}", key.to_hex());
        if !trees {
            path.push_str("?trees=false");
        }
        let res = self.http.call("look up an action", self.http.get(&path))?;
        if res.status().as_u16() == 404 {
            return Ok(None);
        }
        let mut rx = Receiver::new(store);
        let mut pack = PackReader::new(self.http.reader(res))?;
        rx.read(&mut pack)?;
        let entry = rx
            .actions
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e.clone())
            .ok_or_else(|| {
                RemoteError::Corrupt(crate::PackError::BadAction {
                    key: *key,
                    reason: "the answer does not hold the entry asked for".into(),
                })
            })?;
        Ok(Some((rx, entry)))
    }

    fn fetch_into(&self, rx: &mut Receiver<'_>, digests: &[Digest]) -> Result<(), RemoteError> {
        if digests.is_empty() {
            return Ok(());
        }
        let req = self
            .http
            .post("/api/v1/cache/fetch")
            .header("Content-Type", OCTETS);
        let res = self
            .http
            .send("fetch objects", req, &encode_digests(digests))?;
        if res.status().as_u16() == 404 {
            return Err(RemoteError::Unreachable(
                "the server no longer holds objects it named (evicted meanwhile?)".into(),
            ));
        }
        let mut pack = PackReader::new(self.http.reader(res))?;
        rx.read(&mut pack)?;
        Ok(())
    }

    /// `e`, or what the server says the token may do when that is why.
    fn explain_refusal(&self, e: RemoteError) -> RemoteError {
        if !matches!(e, RemoteError::Unreachable(_)) {
            return e;
        }
        let Ok(res) = self.http.call("who am I", self.http.get("/api/v1/whoami")) else {
            return e;
        };
        let access = self
            .http
            .read_small("who am I", res)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["access"].as_str().map(str::to_owned));
        match access.as_deref() {
            Some("anonymous") => {
                RemoteError::Denied("upload: 401 writes need a token and none was sent".into())
            }
            Some("read") => RemoteError::Denied("upload: 403 the token is read-only".into()),
            _ => e,
        }
    }

    /// The digests of `digests` that the server lacks.
    fn missing(&self, digests: &[Digest]) -> Result<HashSet<Digest>, RemoteError> {
        if digests.is_empty() {
            return Ok(HashSet::new());
        }
        let req = self
            .http
            .post("/api/v1/cache/missing")
            .header("Content-Type", OCTETS);
        let res = self
            .http
            .send("ask what is missing", req, &encode_digests(digests))?;
        let body = self.http.read_small("ask what is missing", res)?;
        let missing = decode_digests(&body).ok_or_else(|| {
            RemoteError::Unreachable("the server's list of missing objects is cut".into())
        })?;
        Ok(missing.into_iter().collect())
    }
}

impl Backend for Native {
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
        let Some((mut rx, entry)) = self.look_up(store, key, true)? else {
            return Ok(None);
        };
        for layer in &entry.layers {
            if !rx.has_tree(layer)? {
                return Err(RemoteError::Corrupt(crate::PackError::Incomplete {
                    tree: *layer,
                    missing: *layer,
                }));
            }
        }
        let missing = rx.missing_blobs(&entry.blobs)?;
        self.fetch_into(&mut rx, &missing)?;
        rx.commit()?;
        Ok(Some(entry))
    }

    fn fetch_entry(&self, store: &Store, key: &Digest) -> Result<Option<ActionEntry>, RemoteError> {
        // Without the trees: the server answers only entries it holds
        // whole, and the layers come when they are read. What was read is
        // never committed: the entry goes in the store as a lazy one, and
        // trees an older server sends anyway are dropped.
        let Some((_, entry)) = self.look_up(store, key, false)? else {
            return Ok(None);
        };
        let mut rx = Receiver::new(store);
        let missing = rx.missing_blobs(&entry.blobs)?;
        self.fetch_into(&mut rx, &missing)?;
        rx.commit()?;
        Ok(Some(entry))
    }

    fn holds(&self, layers: &[Digest]) -> Result<bool, RemoteError> {
        Ok(self.missing(layers)?.is_empty())
    }

    fn send(
        &self,
        store: &Store,
        layers: &[Digest],
        actions: &[(Digest, ActionEntry)],
    ) -> Result<Sent, RemoteError> {
        let closure = store.closure(layers)?;
        let mut digests: Vec<Digest> = closure.trees.iter().map(|(d, _)| *d).collect();
        digests.extend(closure.blobs.iter().map(|(d, _)| *d));
        let mut seen: HashSet<Digest> = digests.iter().copied().collect();
        for (_, e) in actions {
            digests.extend(e.blobs.iter().filter(|b| seen.insert(**b)));
        }
        let missing = self.missing(&digests)?;
        let trees: HashSet<Digest> = closure.trees.iter().map(|(d, _)| *d).collect();
        let blobs: Vec<Digest> = digests
            .iter()
            .filter(|d| missing.contains(d) && !trees.contains(d))
            .copied()
            .collect();
        let mut sent = Sent {
            present: (digests.len() - missing.len()) as u64,
            ..Sent::default()
        };
        let (mut reader, writer) = std::io::pipe()
            .map_err(|e| RemoteError::Unreachable(format!("cannot make a pipe: {e}")))?;
        let report = std::thread::scope(|scope| {
            let producer = scope.spawn(move || -> std::io::Result<(u64, u64)> {
                let mut pack =
                    PackWriter::new(std::io::BufWriter::with_capacity(256 << 10, writer))?;
                pack.blobs_from(store, &blobs)?;
                for (d, bytes) in &closure.trees {
                    if missing.contains(d) {
                        pack.record(Kind::Tree, d, bytes)?;
                    }
                }
                for l in layers {
                    pack.record(Kind::Layer, l, &[])?;
                }
                for (key, entry) in actions {
                    let json = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
                    pack.record(Kind::Action, key, &json)?;
                }
                let written = pack.written();
                pack.finish()?.flush()?;
                Ok(written)
            });
            let req = self
                .http
                .post("/api/v1/cache/upload")
                .header("Content-Type", OCTETS);
            let res = self.http.send_stream("upload", req, &mut reader);
            drop(reader);
            let produced = producer.join();
            // A server that refuses the token answers before it reads the
            // body, so the client sees a broken pipe: ask what it allows.
            let res = res.map_err(|e| self.explain_refusal(e))?;
            match produced {
                Ok(Ok((objects, bytes))) => {
                    sent.objects = objects.saturating_sub((layers.len() + actions.len()) as u64);
                    sent.bytes = bytes;
                }
                Ok(Err(e)) => {
                    return Err(RemoteError::Unreachable(format!("the upload failed: {e}")));
                }
                Err(_) => return Err(RemoteError::Unreachable("the upload thread failed".into())),
            }
            let body = self.http.read_small("upload", res)?;
            serde_json::from_slice::<UploadReport>(&body).map_err(|e| {
                RemoteError::Unreachable(format!(
                    "the server's answer to an upload is not JSON: {e}"
                ))
            })
        })?;
        sent.actions = report.stored.len() as u64;
        if let Some(r) = report.refused.first() {
            return Err(RemoteError::Refused(format!(
                "the server refused the entry of action {}: {}",
                &r.key[..r.key.len().min(12)],
                r.reason
            )));
        }
        Ok(sent)
    }

    fn resolve(&self, spec: &str) -> Result<Digest, RemoteError> {
        if let Some(d) = crate::parse_digest(spec) {
            return Ok(d);
        }
        let path = format!("/api/v1/layers/{}", encode_segment(spec));
        let res = self.http.call("resolve a layer", self.http.get(&path))?;
        if res.status().as_u16() == 404 {
            return Err(RemoteError::Refused(format!(
                "the server knows no layer `{}`",
                crate::clip(spec, 80)
            )));
        }
        let body = self.http.read_small("resolve a layer", res)?;
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["layer"].as_str().and_then(crate::parse_digest))
            .ok_or_else(|| {
                RemoteError::Unreachable("the server's layer record has no digest".into())
            })
    }

    fn pull(&self, store: &Store, layers: &[Digest]) -> Result<Received, RemoteError> {
        let mut rx = Receiver::new(store);
        let wanted: Vec<Digest> = layers
            .iter()
            .filter(|l| !store.has_tree(l).unwrap_or(false))
            .copied()
            .collect();
        if !wanted.is_empty() {
            let req = self
                .http
                .post("/api/v1/cache/trees")
                .header("Content-Type", OCTETS);
            let res = self
                .http
                .send("fetch trees", req, &encode_digests(&wanted))?;
            if res.status().as_u16() == 404 {
                return Err(RemoteError::Refused(format!(
                    "the server has no layer {}",
                    wanted[0].short()
                )));
            }
            let mut pack = PackReader::new(self.http.reader(res))?;
            rx.read(&mut pack)?;
        }
        let missing = rx.missing_blobs(&[])?;
        self.fetch_into(&mut rx, &missing)?;
        rx.layers = layers.to_vec();
        let (received, _) = rx.commit()?;
        Ok(received)
    }
}

/// `s` as one path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
