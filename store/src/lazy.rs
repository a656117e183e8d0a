//! Layers this store holds only remotely, and the action entries that name
//! them: what a remote cache that fetches lazily (`--remote-fetch=needed`)
//! records on a hit, so the layers come only when something reads them.
//!
//! A layer is *remote-only* when it has a [`Family::Remote`] record and no
//! tree here; once its tree is stored (pulled, or built again) it is an
//! ordinary layer, whatever the record says. Entries recorded without their
//! layers live in [`Family::LazyActions`], apart from the action cache, so
//! [`Store::action`] still answers only entries whose objects are here.

use serde::{Deserialize, Serialize};

use crate::records::now_secs;
use crate::{ActionEntry, Batch, Digest, Error, Family, Flow, Result, Store};

/// Where a layer held only remotely can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The cache it was found at (`http://HOST:PORT`, `webdav+http://…`).
    pub url: String,
    /// When it was recorded, seconds since the epoch.
    pub since: u64,
}

fn corrupt(what: &'static str, key: &[u8]) -> Error {
    Error::CorruptRecord {
        what,
        key: match Digest::from_slice(key) {
            Some(d) => d.to_hex(),
            None => String::from_utf8_lossy(key).into_owned(),
        },
    }
}

impl Store {
    /// Records `entry` under `key` although its layers are not stored here:
    /// each layer that is not is recorded as held at `url`. The entry's
    /// blobs (its log) must be stored ([`Error::MissingBlob`]). One batch.
    pub fn put_lazy_action(&self, key: &Digest, entry: &ActionEntry, url: &str) -> Result<()> {
        for blob in &entry.blobs {
            if !self.blobs().contains(blob)? {
                return Err(Error::MissingBlob(*blob));
            }
        }
        let mut b = Batch::new();
        let record = serde_json::to_vec(&RemoteLayer {
            url: url.to_owned(),
            since: now_secs(),
        })
        .unwrap_or_default();
        for l in &entry.layers {
            if !self.has_tree(l)? {
                b.put(Family::Remote, l.as_bytes().to_vec(), record.clone());
            }
        }
        b.put(
            Family::LazyActions,
            key.as_bytes().to_vec(),
            serde_json::to_vec(entry).unwrap_or_default(),
        );
        self.meta.write(b)
    }

    /// The entry recorded under `key` without its layers, `None` when there
    /// is none. Its layers may be remote-only, or stored by now.
    pub fn lazy_action(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        let Some(v) = self.meta.get(Family::LazyActions, key.as_bytes())? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|_| corrupt("lazy action", key.as_bytes()))
    }

    /// The lazy entry under `key` when every layer it names is stored by
    /// now: it is moved into the action cache first (so the next lookup is
    /// [`Store::action`]'s). `None` when there is no such entry or a layer
    /// is still remote-only.
    pub fn promote_action(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        let Some(entry) = self.lazy_action(key)? else {
            return Ok(None);
        };
        for l in &entry.layers {
            if !self.has_tree(l)? {
                return Ok(None);
            }
        }
        self.put_action(key, &entry)?;
        let mut b = Batch::new();
        b.delete(Family::LazyActions, key.as_bytes().to_vec());
        self.meta.write(b)?;
        Ok(Some(entry))
    }

    /// Where `layer` is held, when this store holds it only remotely; `None`
    /// when it is stored here or was never recorded as remote.
    pub fn remote_layer(&self, layer: &Digest) -> Result<Option<RemoteLayer>> {
        let Some(v) = self.meta.get(Family::Remote, layer.as_bytes())? else {
            return Ok(None);
        };
        if self.has_tree(layer)? {
            return Ok(None);
        }
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|_| corrupt("remote layer", layer.as_bytes()))
    }

    /// Every layer this store holds only remotely, in digest order.
    pub fn remote_layers(&self) -> Result<Vec<(Digest, RemoteLayer)>> {
        let mut raw = Vec::new();
        self.meta.scan(Family::Remote, &[], &mut |k, v| {
            let d = Digest::from_slice(k).ok_or_else(|| corrupt("remote layer", k))?;
            let r: RemoteLayer =
                serde_json::from_slice(v).map_err(|_| corrupt("remote layer", k))?;
            raw.push((d, r));
            Ok(Flow::Continue)
        })?;
        let mut out = Vec::with_capacity(raw.len());
        for (d, r) in raw {
            if !self.has_tree(&d)? {
                out.push((d, r));
            }
        }
        Ok(out)
    }

    /// Forgets that `layers` were held only remotely (they were pulled).
    pub fn forget_remote(&self, layers: &[Digest]) -> Result<()> {
        let mut b = Batch::new();
        for l in layers {
            b.delete(Family::Remote, l.as_bytes().to_vec());
        }
        self.meta.write(b)
    }

    /// Every lazy entry, for GC and verify: `(key, entry or None when it
    /// does not decode)`.
    pub(crate) fn lazy_actions(&self) -> Result<Vec<(Digest, Option<ActionEntry>)>> {
        let mut out = Vec::new();
        self.meta.scan(Family::LazyActions, &[], &mut |k, v| {
            let d = Digest::from_slice(k).ok_or_else(|| corrupt("lazy action", k))?;
            out.push((d, serde_json::from_slice(v).ok()));
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }
}
