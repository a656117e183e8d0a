//! Bazel's content-addressed storage and action cache, kept in the store.
//!
//! Bazel, ccache and other REAPI clients name content by SHA-256 (or BLAKE3)
//! and look actions up by a digest of their own encoding. Their blobs are
//! ordinary blobs of the blob store, under their BLAKE3 digest (so a BLAKE3
//! client's digests are the store's own); a SHA-256 digest is mapped to the
//! BLAKE3 one by the `sha256` family. Their action entries are rows of the
//! `bazel_actions` family that list every object they name, so the store can
//! answer only complete entries and GC can keep or drop them without
//! decoding protocol buffers. Formats: docs/FORMAT.md.

use std::io::{self, Write};

use sha2::Digest as _;

use crate::blob::{BlobWriter, StagedBlob};
use crate::{Batch, Digest, Error, Family, Flow, Problem, Result, Store};

/// The digest functions a client may name content with. The tags are the
/// numbers of REAPI's `DigestFunction.Value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    /// The tag kept in records (REAPI's number for the function).
    pub fn tag(self) -> u8 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Blake3 => 9,
        }
    }

    pub fn from_tag(tag: u8) -> Option<DigestFunction> {
        match tag {
            1 => Some(DigestFunction::Sha256),
            9 => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// The lowercase name REAPI uses in resource names.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }
}

/// A content hash in one digest function (both give 32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CasDigest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
}

impl CasDigest {
    pub fn new(function: DigestFunction, hash: [u8; 32]) -> CasDigest {
        CasDigest { function, hash }
    }

    /// Parses 64 hex digits (either case).
    pub fn parse_hex(function: DigestFunction, hex: &str) -> Option<CasDigest> {
        if hex.len() != 64 {
            return None;
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex, &mut hash).ok()?;
        Some(CasDigest { function, hash })
    }

    /// The digest of `bytes` in `function`.
    pub fn of(function: DigestFunction, bytes: &[u8]) -> CasDigest {
        let hash = match function {
            DigestFunction::Sha256 => sha2::Sha256::digest(bytes).into(),
            DigestFunction::Blake3 => *blake3::hash(bytes).as_bytes(),
        };
        CasDigest { function, hash }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.hash)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.function.tag());
        out.extend_from_slice(&self.hash);
    }
}

impl std::fmt::Display for CasDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.function.name(), self.to_hex())
    }
}

/// How an upload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The bytes are stored (or were already) as blob `blob`.
    Stored { blob: Digest, size: u64 },
    /// The bytes do not have the digest (or size) they were sent under;
    /// nothing was stored. `got` is their digest in the same function.
    Mismatch { got: CasDigest, size: u64 },
}

/// An upload under way: bytes are staged in the blob store while they are
/// hashed with BLAKE3 and, for a SHA-256 digest, with SHA-256 too. Memory
/// stays bounded for any size. Dropping it discards the bytes.
pub struct CasWriter {
    inner: Box<dyn BlobWriter>,
    sha: Option<sha2::Sha256>,
}

impl Write for CasWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A staged upload whose digest has been checked, not yet published.
struct Checked {
    staged: Box<dyn StagedBlob>,
    sha: Option<[u8; 32]>,
}

impl CasWriter {
    /// Checks the bytes against `expect` (and `size`, when the client said
    /// it) and stages them for publication.
    fn check(self, expect: &CasDigest, size: Option<u64>) -> Result<Result<Checked, Committed>> {
        let sha = self.sha.map(|s| <[u8; 32]>::from(s.finalize()));
        let staged = self.inner.finish()?;
        let got = match expect.function {
            DigestFunction::Sha256 => {
                CasDigest::new(DigestFunction::Sha256, sha.unwrap_or_default())
            }
            DigestFunction::Blake3 => {
                CasDigest::new(DigestFunction::Blake3, *staged.digest().as_bytes())
            }
        };
        if &got != expect || size.is_some_and(|s| s != staged.size()) {
            return Ok(Err(Committed::Mismatch {
                got,
                size: staged.size(),
            }));
        }
        Ok(Ok(Checked { staged, sha }))
    }

    /// Ends the upload: when the bytes match `expect` (and `size`), publishes
    /// the blob durably and records its SHA-256; otherwise stores nothing.
    pub fn commit(self, store: &Store, expect: &CasDigest, size: Option<u64>) -> Result<Committed> {
        let checked = match self.check(expect, size)? {
            Ok(c) => c,
            Err(refused) => return Ok(refused),
        };
        let mut done = store.publish_checked(vec![checked])?;
        Ok(done.pop().unwrap_or(Committed::Mismatch {
            got: *expect,
            size: 0,
        }))
    }
}

impl CasWriter {
    /// Ends the upload whatever the bytes are: publishes them durably under
    /// their own digest (BLAKE3), which is returned.
    pub fn commit_any(self, store: &Store) -> Result<CasDigest> {
        let sha = self.sha.map(|s| <[u8; 32]>::from(s.finalize()));
        let staged = self.inner.finish()?;
        let digest = CasDigest::new(DigestFunction::Blake3, *staged.digest().as_bytes());
        store.publish_checked(vec![Checked { staged, sha }])?;
        Ok(digest)
    }
}

/// What the `bazel_actions` family holds for one action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BazelAction {
    /// When it was stored, milliseconds since the epoch.
    pub created_ms: u64,
    pub kind: BazelActionKind,
    /// Every object the entry needs. For [`BazelActionKind::Opaque`] the
    /// first is the blob holding the entry's bytes.
    pub refs: Vec<CasDigest>,
    /// The `ActionResult` message as sent (empty for opaque entries).
    pub bytes: Vec<u8>,
}

/// What an action entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BazelActionKind {
    /// A REAPI `ActionResult` message, kept in the row.
    Result,
    /// Bytes the server does not interpret (ccache stores its own entries
    /// under `/ac/`), kept as a blob.
    Opaque,
}

const KIND_RESULT: u8 = 1;
const KIND_OPAQUE: u8 = 2;

impl BazelAction {
    /// The row key of action `key`: its digest function's tag, then its hash.
    pub fn row_key(key: &CasDigest) -> Vec<u8> {
        let mut k = Vec::with_capacity(33);
        key.encode(&mut k);
        k
    }

    /// The action a row key names.
    pub fn parse_key(row: &[u8]) -> Option<CasDigest> {
        decode_digest(row).filter(|_| row.len() == 33)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.refs.len() * 33 + self.bytes.len());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.push(match self.kind {
            BazelActionKind::Result => KIND_RESULT,
            BazelActionKind::Opaque => KIND_OPAQUE,
        });
        out.extend_from_slice(&(self.refs.len() as u32).to_be_bytes());
        for r in &self.refs {
            r.encode(&mut out);
        }
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Decodes a row; `None` when it is not one this version writes.
    pub fn decode(v: &[u8]) -> Option<BazelAction> {
        let created_ms = u64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
        let kind = match *v.get(8)? {
            KIND_RESULT => BazelActionKind::Result,
            KIND_OPAQUE => BazelActionKind::Opaque,
            _ => return None,
        };
        let count = u32::from_be_bytes(v.get(9..13)?.try_into().ok()?) as usize;
        let end = count.checked_mul(33)?.checked_add(13)?;
        let refs = v
            .get(13..end)?
            .chunks_exact(33)
            .map(decode_digest)
            .collect::<Option<Vec<_>>>()?;
        if kind == BazelActionKind::Opaque && refs.is_empty() {
            return None;
        }
        Some(BazelAction {
            created_ms,
            kind,
            refs,
            bytes: v[end..].to_vec(),
        })
    }
}

fn decode_digest(b: &[u8]) -> Option<CasDigest> {
    let function = DigestFunction::from_tag(*b.first()?)?;
    let hash = b.get(1..33)?.try_into().ok()?;
    Some(CasDigest { function, hash })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Starts an upload of content that will be named in `function`.
    pub fn cas_writer(&self, function: DigestFunction) -> Result<CasWriter> {
        self.check_writable()?;
        Ok(CasWriter {
            inner: self.blobs.writer()?,
            sha: (function == DigestFunction::Sha256).then(sha2::Sha256::new),
        })
    }

    /// Stores several small uploads with one sync: each is checked against
    /// its digest and size on its own (a mismatch refuses that one only).
    pub fn put_cas(&self, items: &[(CasDigest, &[u8])]) -> Result<Vec<Committed>> {
        let mut out: Vec<Option<Committed>> = vec![None; items.len()];
        let mut checked = Vec::new();
        let mut slots = Vec::new();
        for (i, (digest, bytes)) in items.iter().enumerate() {
            let mut w = self.cas_writer(digest.function)?;
            w.write_all(bytes)
                .map_err(Error::io("stage an upload in", "tmp"))?;
            match w.check(digest, Some(bytes.len() as u64))? {
                Ok(c) => {
                    checked.push(c);
                    slots.push(i);
                }
                Err(refused) => out[i] = Some(refused),
            }
        }
        for (i, c) in slots.into_iter().zip(self.publish_checked(checked)?) {
            out[i] = Some(c);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Publishes checked uploads, makes them durable, then records their
    /// SHA-256 digests in one batch.
    fn publish_checked(&self, checked: Vec<Checked>) -> Result<Vec<Committed>> {
        let _hold = self.hold();
        let mut batch = Batch::new();
        let mut out = Vec::with_capacity(checked.len());
        for c in checked {
            let (blob, size) = (c.staged.digest(), c.staged.size());
            c.staged.publish()?;
            if let Some(sha) = c.sha {
                batch.put(Family::Sha256, sha.to_vec(), blob.as_bytes().to_vec());
            }
            out.push(Committed::Stored { blob, size });
        }
        self.blobs.sync()?;
        if !batch.is_empty() {
            self.meta.write(batch)?;
        }
        Ok(out)
    }

    /// The blob holding the content `digest` names; `Ok(None)` when it is
    /// not stored (never a mapping whose blob is gone).
    pub fn cas_blob(&self, digest: &CasDigest) -> Result<Option<Digest>> {
        let blob = match digest.function {
            DigestFunction::Blake3 => blake(digest.hash),
            DigestFunction::Sha256 => match self.meta.get(Family::Sha256, &digest.hash)? {
                Some(v) => match Digest::from_slice(&v) {
                    Some(d) => d,
                    None => {
                        return Err(Error::CorruptRecord {
                            what: "sha256",
                            key: digest.to_hex(),
                        })
                    }
                },
                None => return Ok(None),
            },
        };
        Ok(self.blobs.contains(&blob)?.then_some(blob))
    }

    /// Records the entry of action `key`, which needs every object in
    /// `refs`. Returns `Ok(Err(missing))`, recording nothing, when an object
    /// is not stored: an entry is never kept without what it names. For an
    /// opaque entry `refs[0]` is the blob of its bytes and `bytes` is empty.
    pub fn put_bazel_action(
        &self,
        key: &CasDigest,
        kind: BazelActionKind,
        refs: Vec<CasDigest>,
        bytes: Vec<u8>,
    ) -> Result<std::result::Result<(), CasDigest>> {
        self.check_writable()?;
        // GC must not sweep an object between the check and the write.
        let _hold = self.hold();
        for r in &refs {
            if self.cas_blob(r)?.is_none() {
                return Ok(Err(*r));
            }
        }
        let entry = BazelAction {
            created_ms: now_ms(),
            kind,
            refs,
            bytes,
        };
        let mut batch = Batch::new();
        batch.put(
            Family::BazelActions,
            BazelAction::row_key(key),
            entry.encode(),
        );
        self.meta.write(batch)?;
        Ok(Ok(()))
    }

    /// The entry of action `key` when it and every object it names are
    /// stored. An entry that lost an object is dropped and reads as absent.
    pub fn bazel_action(&self, key: &CasDigest) -> Result<Option<BazelAction>> {
        let row = BazelAction::row_key(key);
        let Some(v) = self.meta.get(Family::BazelActions, &row)? else {
            return Ok(None);
        };
        let complete = match BazelAction::decode(&v) {
            Some(a) => {
                let mut all = true;
                for r in &a.refs {
                    if self.cas_blob(r)?.is_none() {
                        all = false;
                        break;
                    }
                }
                all.then_some(a)
            }
            None => None,
        };
        if complete.is_none() && !self.is_read_only() {
            let mut batch = Batch::new();
            batch.delete(Family::BazelActions, row);
            self.meta.write(batch)?;
        }
        Ok(complete)
    }

    /// With `keep_cache`, GC's roots include every blob a SHA-256 row maps
    /// and every object a Bazel action entry names.
    pub(crate) fn cas_roots(&self, live: &mut std::collections::HashSet<Digest>) -> Result<()> {
        self.meta.scan(Family::Sha256, &[], &mut |_, v| {
            if let Some(d) = Digest::from_slice(v) {
                live.insert(d);
            }
            Ok(Flow::Continue)
        })?;
        self.meta.scan(Family::BazelActions, &[], &mut |_, v| {
            for r in BazelAction::decode(v).map(|a| a.refs).unwrap_or_default() {
                if r.function == DigestFunction::Blake3 {
                    live.insert(blake(r.hash));
                }
            }
            Ok(Flow::Continue)
        })
    }

    /// GC's sweep of the two families, before any blob file goes: a SHA-256
    /// row whose blob is not `live` is deleted, and so is an action entry
    /// naming an object that will be gone. Returns the entries dropped.
    pub(crate) fn cas_sweep(
        &self,
        live: &std::collections::HashSet<Digest>,
        batch: &mut Batch,
    ) -> Result<u64> {
        let mut kept_sha: std::collections::HashSet<[u8; 32]> = Default::default();
        self.meta.scan(Family::Sha256, &[], &mut |k, v| {
            match (<[u8; 32]>::try_from(k), Digest::from_slice(v)) {
                (Ok(sha), Some(d)) if live.contains(&d) => {
                    kept_sha.insert(sha);
                }
                _ => batch.delete(Family::Sha256, k.to_vec()),
            }
            Ok(Flow::Continue)
        })?;
        let mut dropped = 0;
        self.meta.scan(Family::BazelActions, &[], &mut |k, v| {
            let keep = BazelAction::decode(v).is_some_and(|a| {
                a.refs.iter().all(|r| match r.function {
                    DigestFunction::Sha256 => kept_sha.contains(&r.hash),
                    DigestFunction::Blake3 => live.contains(&blake(r.hash)),
                })
            });
            if !keep {
                batch.delete(Family::BazelActions, k.to_vec());
                dropped += 1;
            }
            Ok(Flow::Continue)
        })?;
        Ok(dropped)
    }

    /// `verify`'s checks of the two families: a SHA-256 row must map to a
    /// stored blob whose bytes hash to it; an action entry must decode and
    /// name only stored objects.
    pub(crate) fn cas_verify(
        &self,
        blobs: &std::collections::HashMap<Digest, u64>,
        problems: &mut Vec<Problem>,
    ) -> Result<()> {
        let mut rows = Vec::new();
        self.meta.scan(Family::Sha256, &[], &mut |k, v| {
            rows.push((k.to_vec(), v.to_vec()));
            Ok(Flow::Continue)
        })?;
        let mut known: std::collections::HashSet<[u8; 32]> = Default::default();
        // Re-hashing is the slow part: on every core, as for blobs.
        use rayon::prelude::*;
        let checked: Vec<(Option<[u8; 32]>, Option<Problem>)> = rows
            .par_iter()
            .map(|(k, v)| {
                let key = hex::encode(k);
                let (Ok(sha), Some(d)) = (<[u8; 32]>::try_from(&k[..]), Digest::from_slice(v))
                else {
                    return (
                        None,
                        Some(Problem {
                            what: "corrupt record".into(),
                            detail: format!("sha256 `{key}`"),
                        }),
                    );
                };
                if !blobs.contains_key(&d) {
                    return (
                        None,
                        Some(Problem {
                            what: "missing blob".into(),
                            detail: format!("`{d}` (sha256 `{key}`)"),
                        }),
                    );
                }
                match self.sha256_of_blob(&d) {
                    Ok(got) if got == sha => (Some(sha), None),
                    Ok(got) => (
                        None,
                        Some(Problem {
                            what: "wrong sha256".into(),
                            detail: format!(
                                "blob `{d}` hashes to sha256 `{}`, recorded as `{key}`",
                                hex::encode(got)
                            ),
                        }),
                    ),
                    Err(e) => (
                        None,
                        Some(Problem {
                            what: "corrupt blob".into(),
                            detail: format!("`{d}` cannot be read: {e}"),
                        }),
                    ),
                }
            })
            .collect();
        for (sha, problem) in checked {
            known.extend(sha);
            problems.extend(problem);
        }
        self.meta.scan(Family::BazelActions, &[], &mut |k, v| {
            let key = hex::encode(k.get(1..).unwrap_or_default());
            let short = &key[..key.len().min(12)];
            let Some(a) = BazelAction::decode(v).filter(|_| BazelAction::parse_key(k).is_some())
            else {
                problems.push(Problem {
                    what: "corrupt record".into(),
                    detail: format!("bazel action `{key}`"),
                });
                return Ok(Flow::Continue);
            };
            for r in &a.refs {
                let present = match r.function {
                    DigestFunction::Sha256 => known.contains(&r.hash),
                    DigestFunction::Blake3 => blobs.contains_key(&blake(r.hash)),
                };
                if !present {
                    problems.push(Problem {
                        what: "missing blob".into(),
                        detail: format!("`{r}` (bazel action `{short}`)"),
                    });
                }
            }
            Ok(Flow::Continue)
        })
    }

    fn sha256_of_blob(&self, d: &Digest) -> io::Result<[u8; 32]> {
        let blob = self
            .blobs
            .open(d)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other("vanished while verifying"))?;
        let mut sha = sha2::Sha256::new();
        io::copy(&mut crate::blob::BlobReader::new(&*blob), &mut sha)?;
        Ok(sha.finalize().into())
    }

    /// Counts the rows of the two families: (sha256 rows, action entries).
    pub(crate) fn cas_usage(&self) -> Result<(u64, u64)> {
        let mut counts = (0u64, 0u64);
        self.meta.scan(Family::Sha256, &[], &mut |_, _| {
            counts.0 += 1;
            Ok(Flow::Continue)
        })?;
        self.meta.scan(Family::BazelActions, &[], &mut |_, _| {
            counts.1 += 1;
            Ok(Flow::Continue)
        })?;
        Ok(counts)
    }
}

/// The store digest of a BLAKE3 hash.
fn blake(hash: [u8; 32]) -> Digest {
    blake3::Hash::from_bytes(hash).into()
}
