//! Records kept beside layers: layer records, lineage, refs, action-cache
//! entries, runs and leases. None of them is part of any digest.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Batch, Digest, DigestPrefix, Entry, Error, Family, Flow, Result, Store};

/// Where the events of run `id` start in [`Family::Events`]: the id, then 0
/// (ids never hold a 0 byte, so no run's events sort among another's).
pub(crate) fn events_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 9);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

fn event_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = events_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts over a whole layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LayerStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of the sizes of all files (a file stored twice counts twice).
    pub bytes: u64,
}

/// What the store knows of a layer it recorded (by ingest, import or a task).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub stats: LayerStats,
    /// When the layer was first recorded, seconds since the epoch.
    pub created: u64,
}

/// Which layer a layer was made on top of, and by what.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lineage {
    /// The layer this one was made on top of (a transform's base).
    pub parent: Option<Digest>,
    /// The task that made it, as a label.
    pub task: Option<String>,
    /// How it was made: `add`, `import`, `task`, `merge`…
    pub how: String,
    pub created: u64,
}

/// The engine's own JSON inside a record, kept as text: the store never
/// looks inside, and a reader decodes only the fields it needs (a cache hit
/// wants the output, not the whole preimage).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// Encodes `v`. Fails only for data JSON cannot hold (a map with
    /// non-string keys), which the engine's plain records never have.
    pub fn new<T: Serialize + ?Sized>(v: &T) -> serde_json::Result<Payload> {
        serde_json::value::to_raw_value(v).map(Payload)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Decodes the payload, or the fields of it that `T` names.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.0.get())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.get() == other.get()
    }
}

/// A cached action result, as the store sees it: the layers and blobs it
/// refers to (so GC can keep or drop it) and the engine's own payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionEntry {
    pub layers: Vec<Digest>,
    pub blobs: Vec<Digest>,
    pub payload: Payload,
    pub created: u64,
}

/// A run as the store sees it: the layers and blobs it refers to (GC roots for
/// the most recent runs) and the engine's own record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    pub layers: Vec<Digest>,
    pub blobs: Vec<Digest>,
    pub record: Payload,
    pub created: u64,
}

/// The latest successful output of a task label, with the engine's payload
/// (its action key and preimage, for `ci explain`). A GC root.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelEntry {
    pub layer: Digest,
    pub payload: Payload,
    pub updated: u64,
}

/// A GC root held by a running operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub pid: u32,
    pub layers: Vec<Digest>,
    pub created: u64,
}

/// Keeps its layers alive across GC until dropped.
pub struct LeaseGuard {
    store: Store,
    key: Vec<u8>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut b = Batch::new();
        b.delete(Family::Leases, self.key.clone());
        // Best effort: a lease of a dead process is ignored by GC anyway.
        let _ = self.store.meta().write(b);
    }
}

/// zstd level of stored run records: fast, and most of the gain.
const RUN_ZSTD_LEVEL: i32 = 1;
/// The first bytes of a zstd frame (JSON starts with `{`).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// A run record decompresses to at most this much (a million tasks).
const RUN_JSON_MAX: u64 = 1 << 30;

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|_| Error::CorruptRecord {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Checks a ref name: like git's, `[A-Za-z0-9._/-]`, 1 to 200 characters, no
/// `..`, no leading `-` or `/`, no trailing `/`, and not hexadecimal-only
/// (which would read as a digest prefix).
pub(crate) fn check_ref_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::BadRefName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return bad("a ref name has 1 to 200 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return bad("use only letters, digits, `.`, `_`, `/` and `-`");
    }
    if name.contains("..") || name.contains("//") || name.split('/').any(|c| c == ".") {
        return bad("`..`, `//` and `.` components are not allowed");
    }
    if name.starts_with('-') || name.starts_with('/') || name.ends_with('/') {
        return bad("a ref name may not start with `-` or `/` or end with `/`");
    }
    if name.len() >= 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("a hexadecimal-only name would read as a digest");
    }
    Ok(())
}

impl Store {
    /// Adds a layer record (and its lineage, when given) to `batch`.
    pub(crate) fn stage_layer(
        &self,
        batch: &mut Batch,
        layer: &Digest,
        stats: LayerStats,
        lineage: Option<&Lineage>,
    ) -> Result<()> {
        let created = match self.layer(layer)? {
            Some(existing) => existing.created,
            None => now_secs(),
        };
        batch.put(
            Family::Layers,
            layer.as_bytes().to_vec(),
            encode(&LayerRecord { stats, created }),
        );
        if let Some(l) = lineage {
            batch.put(Family::Lineage, layer.as_bytes().to_vec(), encode(l));
        }
        Ok(())
    }

    /// Records that the tree `root` (already stored) is a layer, with its
    /// lineage. Returns the layer's stats.
    pub fn record_layer(&self, root: &Digest, lineage: Option<&Lineage>) -> Result<LayerStats> {
        let stats = self.stats(root)?;
        let mut batch = Batch::new();
        self.stage_layer(&mut batch, root, stats, lineage)?;
        self.meta.write(batch)?;
        Ok(stats)
    }

    /// The record of a layer, `None` when the digest was never recorded as one.
    pub fn layer(&self, digest: &Digest) -> Result<Option<LayerRecord>> {
        self.meta
            .get(Family::Layers, digest.as_bytes())?
            .map(|v| decode("layer", digest.to_hex().as_bytes(), &v))
            .transpose()
    }

    pub fn lineage(&self, digest: &Digest) -> Result<Option<Lineage>> {
        self.meta
            .get(Family::Lineage, digest.as_bytes())?
            .map(|v| decode("lineage", digest.to_hex().as_bytes(), &v))
            .transpose()
    }

    /// Every recorded layer, in digest order.
    pub fn layers(&self) -> Result<Vec<(Digest, LayerRecord)>> {
        let mut out = Vec::new();
        self.meta.scan(Family::Layers, &[], &mut |k, v| {
            if let Some(d) = Digest::from_slice(k) {
                out.push((d, decode("layer", k, v)?));
            }
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }

    /// Counts files, directories, symlinks and bytes under a tree, visiting
    /// each distinct subtree once per occurrence.
    pub fn stats(&self, root: &Digest) -> Result<LayerStats> {
        let mut memo: BTreeMap<Digest, LayerStats> = BTreeMap::new();
        self.stats_memo(root, &mut memo)
    }

    fn stats_memo(
        &self,
        d: &Digest,
        memo: &mut BTreeMap<Digest, LayerStats>,
    ) -> Result<LayerStats> {
        if let Some(s) = memo.get(d) {
            return Ok(*s);
        }
        let mut s = LayerStats::default();
        for (_, e) in self.tree(d)?.entries() {
            match e {
                Entry::File { size, .. } => {
                    s.files += 1;
                    s.bytes += size;
                }
                Entry::Symlink { .. } => s.symlinks += 1,
                Entry::Dir { digest } => {
                    let sub = self.stats_memo(digest, memo)?;
                    s.dirs += 1 + sub.dirs;
                    s.files += sub.files;
                    s.symlinks += sub.symlinks;
                    s.bytes += sub.bytes;
                }
            }
        }
        memo.insert(*d, s);
        Ok(s)
    }

    // ---- refs ----

    /// Points the ref `name` at `layer` (which must be a stored tree).
    pub fn set_ref(&self, name: &str, layer: &Digest) -> Result<()> {
        check_ref_name(name)?;
        if !self.has_tree(layer)? {
            return Err(Error::MissingTree(*layer));
        }
        let mut b = Batch::new();
        b.put(
            Family::Refs,
            name.as_bytes().to_vec(),
            layer.as_bytes().to_vec(),
        );
        if self.layer(layer)?.is_none() {
            self.stage_layer(&mut b, layer, self.stats(layer)?, None)?;
        }
        self.meta.write(b)?;
        self.meta.sync()
    }

    /// The layer a ref points at.
    pub fn get_ref(&self, name: &str) -> Result<Option<Digest>> {
        match self.meta.get(Family::Refs, name.as_bytes())? {
            None => Ok(None),
            Some(v) => Digest::from_slice(&v)
                .map(Some)
                .ok_or_else(|| Error::CorruptRecord {
                    what: "ref",
                    key: name.to_owned(),
                }),
        }
    }

    /// Removes a ref; [`Error::NoSuchRef`] when there is none.
    pub fn delete_ref(&self, name: &str) -> Result<Digest> {
        let d = self
            .get_ref(name)?
            .ok_or_else(|| Error::NoSuchRef(name.to_owned()))?;
        let mut b = Batch::new();
        b.delete(Family::Refs, name.as_bytes().to_vec());
        self.meta.write(b)?;
        self.meta.sync()?;
        Ok(d)
    }

    /// Every ref, sorted by name.
    pub fn refs(&self) -> Result<Vec<(String, Digest)>> {
        let mut out = Vec::new();
        self.meta.scan(Family::Refs, &[], &mut |k, v| {
            let name = String::from_utf8_lossy(k).into_owned();
            // A ref that cannot be read is an error, never a ref that is not
            // there: GC would sweep what it pins.
            let Some(d) = Digest::from_slice(v) else {
                return Err(Error::CorruptRecord {
                    what: "ref",
                    key: name,
                });
            };
            out.push((name, d));
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }

    /// Resolves what a user typed where a layer is expected: a task label
    /// (`//pkg:name`, its latest successful output), a ref name, a full
    /// digest, or a unique prefix of 8+ hex characters of a recorded layer
    /// (or, failing that, of any stored tree).
    pub fn resolve(&self, spec: &str) -> Result<Digest> {
        if spec.starts_with("//") {
            return match self.label(spec)? {
                Some(e) => Ok(e.layer),
                None => Err(Error::UnknownLabel {
                    label: spec.to_owned(),
                }),
            };
        }
        if let Some(d) = self.get_ref(spec)? {
            return Ok(d);
        }
        let prefix = match DigestPrefix::parse(spec) {
            Ok(p) => p,
            Err(e) => {
                let short_hex = !spec.is_empty()
                    && spec.len() < crate::MIN_PREFIX_LEN
                    && spec.bytes().all(|b| b.is_ascii_hexdigit());
                return Err(if short_hex {
                    e
                } else {
                    Error::UnknownLayer {
                        input: spec.to_owned(),
                    }
                });
            }
        };
        if let Some(full) = prefix.as_full() {
            if self.has_tree(&full)? {
                return Ok(full);
            }
            return Err(Error::UnknownLayer {
                input: spec.to_owned(),
            });
        }
        for family in [Family::Layers, Family::Trees] {
            let mut found = Vec::new();
            self.meta.scan(family, &prefix.byte_prefix(), &mut |k, _| {
                if let Some(d) = Digest::from_slice(k) {
                    if prefix.matches(&d) {
                        found.push(d);
                    }
                }
                Ok(if found.len() > 16 {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            })?;
            match found.len() {
                0 => continue,
                1 => return Ok(found[0]),
                _ => {
                    return Err(Error::AmbiguousPrefix {
                        input: spec.to_owned(),
                        candidates: found,
                    })
                }
            }
        }
        Err(Error::UnknownLayer {
            input: spec.to_owned(),
        })
    }

    // ---- labels ----

    /// Records `entry` as the latest successful output of the task `label`.
    pub fn put_label(&self, label: &str, entry: &LabelEntry) -> Result<()> {
        self.put_action_and_label(None, Some((label, entry)))
    }

    /// The latest successful output of the task `label`.
    pub fn label(&self, label: &str) -> Result<Option<LabelEntry>> {
        self.meta
            .get(Family::Labels, label.as_bytes())?
            .map(|v| decode("label", label.as_bytes(), &v))
            .transpose()
    }

    /// Every label with a recorded output, sorted.
    pub fn labels(&self) -> Result<Vec<(String, LabelEntry)>> {
        let mut out = Vec::new();
        self.meta.scan(Family::Labels, &[], &mut |k, v| {
            out.push((
                String::from_utf8_lossy(k).into_owned(),
                decode("label", k, v)?,
            ));
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }

    // ---- action cache ----

    /// Records the result of an action under its key. Refuses an entry
    /// naming a layer or blob that is not stored ([`Error::MissingTree`],
    /// [`Error::MissingBlob`]): a cache hit is then usable as it is read,
    /// and GC drops an entry in the same batch as its layers.
    pub fn put_action(&self, key: &Digest, entry: &ActionEntry) -> Result<()> {
        self.put_action_and_label(Some((key, entry)), None)
    }

    /// [`Store::put_action`] and [`Store::put_label`] in one batch (a task's
    /// success records both): either may be absent.
    pub fn put_action_and_label(
        &self,
        action: Option<(&Digest, &ActionEntry)>,
        label: Option<(&str, &LabelEntry)>,
    ) -> Result<()> {
        let mut b = Batch::new();
        if let Some((key, entry)) = action {
            for l in &entry.layers {
                if !self.has_tree(l)? {
                    return Err(Error::MissingTree(*l));
                }
            }
            for blob in &entry.blobs {
                if !self.blobs().contains(blob)? {
                    return Err(Error::MissingBlob(*blob));
                }
            }
            b.put(Family::Actions, key.as_bytes().to_vec(), encode(entry));
        }
        if let Some((name, entry)) = label {
            b.put(Family::Labels, name.as_bytes().to_vec(), encode(entry));
        }
        self.meta.write(b)
    }

    /// Removes the cached result of an action (an entry whose output turned
    /// out incomplete): the next lookup misses and the action runs again.
    pub fn drop_action(&self, key: &Digest) -> Result<()> {
        let mut b = Batch::new();
        b.delete(Family::Actions, key.as_bytes().to_vec());
        self.meta.write(b)
    }

    /// The cached result of an action, `None` on a miss. Its layers and blobs
    /// are stored: [`Store::put_action`] checks them, and GC removes an entry
    /// with them.
    pub fn action(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        let Some(v) = self.meta.get(Family::Actions, key.as_bytes())? else {
            return Ok(None);
        };
        Ok(Some(decode("action", key.to_hex().as_bytes(), &v)?))
    }

    // ---- runs ----

    /// Records a run under `id`, durably (with every record written before
    /// it). Ids sort in the order runs started.
    /// A run's JSON (a few hundred bytes per task, mostly digests and
    /// repeated field names) is stored as one zstd frame, a fifth of its
    /// size: less to write, to sync, and to replay from the log when the
    /// next command opens the store.
    pub fn put_run(&self, id: &str, entry: &RunEntry) -> Result<()> {
        let json = encode(entry);
        let value = zstd::bulk::compress(&json, RUN_ZSTD_LEVEL).unwrap_or(json);
        let mut b = Batch::new();
        b.put(Family::Runs, id.as_bytes().to_vec(), value);
        self.meta.write(b)?;
        self.meta.sync()
    }

    pub fn run(&self, id: &str) -> Result<Option<RunEntry>> {
        let Some(v) = self.meta.get(Family::Runs, id.as_bytes())? else {
            return Ok(None);
        };
        if !v.starts_with(&ZSTD_MAGIC) {
            // Written uncompressed (by an earlier version): plain JSON.
            return decode("run", id.as_bytes(), &v).map(Some);
        }
        let corrupt = || Error::CorruptRecord {
            what: "run",
            key: id.to_owned(),
        };
        let mut json = Vec::new();
        let mut dec = zstd::stream::read::Decoder::new(&v[..]).map_err(|_| corrupt())?;
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut dec, RUN_JSON_MAX), &mut json)
            .map_err(|_| corrupt())?;
        decode("run", id.as_bytes(), &json).map(Some)
    }

    /// Run ids, oldest first.
    pub fn run_ids(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.meta.scan(Family::Runs, &[], &mut |k, _| {
            out.push(String::from_utf8_lossy(k).into_owned());
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }

    // ---- events ----

    /// Appends events of run `id`, numbered from `first_seq` on, in one
    /// batch (not synced: the next sync, or the run's own record, makes them
    /// durable; a process killed outright keeps what reached the log).
    /// The store never looks inside an event.
    pub fn append_events(&self, id: &str, first_seq: u64, events: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        let mut b = Batch::new();
        for (i, e) in events.iter().enumerate() {
            b.put(
                Family::Events,
                event_key(id, first_seq + i as u64),
                e.to_vec(),
            );
        }
        self.meta.write(b)
    }

    /// Up to `limit` events of run `id` with a sequence number of at least
    /// `from`, in order, as `(sequence number, bytes)`.
    pub fn events(&self, id: &str, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let prefix = events_prefix(id);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let start = event_key(id, from);
        self.meta
            .scan_from(Family::Events, &prefix, &start, &mut |k, v| {
                let Some(seq) = k[prefix.len()..].try_into().ok().map(u64::from_be_bytes) else {
                    return Err(Error::CorruptRecord {
                        what: "event",
                        key: String::from_utf8_lossy(k).into_owned(),
                    });
                };
                out.push((seq, v.to_vec()));
                Ok(if out.len() >= limit {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            })?;
        Ok(out)
    }

    /// The sequence number after the last stored event of run `id` (0 when
    /// it has none).
    pub fn next_event_seq(&self, id: &str) -> Result<u64> {
        let prefix = events_prefix(id);
        let mut next = 0;
        self.meta.scan(Family::Events, &prefix, &mut |k, _| {
            if let Some(seq) = k[prefix.len()..].try_into().ok().map(u64::from_be_bytes) {
                next = seq + 1;
            }
            Ok(Flow::Continue)
        })?;
        Ok(next)
    }

    // ---- leases ----

    /// Keeps `layers` alive across GC until the returned guard is dropped (or
    /// this process dies).
    pub fn lease(&self, layers: &[Digest]) -> Result<LeaseGuard> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let key = format!(
            "{pid}-{}-{}",
            now_secs(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let lease = Lease {
            pid,
            layers: layers.to_vec(),
            created: now_secs(),
        };
        let mut b = Batch::new();
        b.put(Family::Leases, key.as_bytes().to_vec(), encode(&lease));
        self.meta.write(b)?;
        Ok(LeaseGuard {
            store: self.clone(),
            key: key.into_bytes(),
        })
    }

    pub(crate) fn leases(&self) -> Result<Vec<(Vec<u8>, Lease)>> {
        let mut out = Vec::new();
        self.meta.scan(Family::Leases, &[], &mut |k, v| {
            out.push((k.to_vec(), decode("lease", k, v)?));
            Ok(Flow::Continue)
        })?;
        Ok(out)
    }
}
