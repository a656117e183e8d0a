//! The pack: how objects travel between a store and a cache server, in one
//! zstd stream per request (never one request per file).
//!
//! ```text
//! pack   = zstd( "STRPACK1" frame* end )
//! frame  = kind:u8 digest:[u8; 32] len:u64be data:[u8; len]
//! kind   = 'B' blob | 'T' tree (canonical encoding) | 'A' action entry (JSON; digest = action key)
//!        | 'L' layer (no data; digest = a root tree to record as a layer)
//! end    = 'E' [0; 32] count:u64be          count = frames before it
//! ```
//!
//! A pack cut short (a server killed mid-stream) has no `end` and is refused
//! whole. [`Receiver`] takes a pack into a store: every blob is re-hashed as
//! it is written, every tree re-hashed and decoded, and nothing becomes
//! visible until all of it has checked out (see [`Receiver::commit`]).

use std::collections::HashSet;
use std::io::{self, BufReader, Read, Write};

use strata_store::{ActionEntry, Digest, Entry, HoldGuard, Store, Tree, DIGEST_LEN};

const MAGIC: &[u8; 8] = b"STRPACK1";
const HEADER_LEN: usize = 1 + DIGEST_LEN + 8;
/// A tree or an action entry larger than this is refused (a directory of
/// ~500,000 entries).
pub const MAX_RECORD: u64 = 64 << 20;
/// The zstd level packs are written at: fast enough to keep up with a
/// loopback link on one core.
pub const LEVEL: i32 = 1;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Tree,
    Action,
    Layer,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Blob => b'B',
            Kind::Tree => b'T',
            Kind::Action => b'A',
            Kind::Layer => b'L',
        }
    }
}

/// Why a pack was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("the pack could not be read: {0}")]
    Io(#[from] io::Error),
    #[error("the stream is not a Strata pack (no `STRPACK1` header)")]
    NotAPack,
    #[error("the pack ends before its end frame (cut short after {0} objects)")]
    Truncated(u64),
    #[error("frame {index} has the unknown kind {kind:#04x}")]
    BadKind { index: u64, kind: u8 },
    #[error("{what} {digest} is {len} bytes, over the limit of {MAX_RECORD}")]
    TooLarge {
        what: &'static str,
        digest: Digest,
        len: u64,
    },
    #[error("the bytes sent as {what} {digest} hash to {actual}")]
    Mismatch {
        what: &'static str,
        digest: Digest,
        actual: Digest,
    },
    #[error("tree {digest} does not decode: {reason}")]
    BadTree { digest: Digest, reason: String },
    #[error("action entry {key} is not valid JSON: {reason}")]
    BadAction { key: Digest, reason: String },
    #[error("tree {tree} names {missing}, which neither the pack nor the store holds")]
    Incomplete { tree: Digest, missing: Digest },
    #[error("the end frame counts {said} objects, the pack held {seen}")]
    BadCount { said: u64, seen: u64 },
    #[error(transparent)]
    Store(#[from] strata_store::Error),
}

impl PackError {
    /// The digest of an object whose bytes were wrong, if that is the error.
    pub fn mismatched(&self) -> Option<Digest> {
        match self {
            PackError::Mismatch { digest, .. } => Some(*digest),
            _ => None,
        }
    }
}

/// Writes a pack.
pub struct PackWriter<W: Write> {
    enc: zstd::Encoder<'static, W>,
    count: u64,
    bytes: u64,
}

impl<W: Write> PackWriter<W> {
    pub fn new(w: W) -> io::Result<PackWriter<W>> {
        let mut enc = zstd::Encoder::new(w, LEVEL)?;
        enc.write_all(MAGIC)?;
        Ok(PackWriter {
            enc,
            count: 0,
            bytes: 0,
        })
    }

    fn header(&mut self, kind: u8, digest: &Digest, len: u64) -> io::Result<()> {
        let mut h = [0u8; HEADER_LEN];
        h[0] = kind;
        h[1..1 + DIGEST_LEN].copy_from_slice(digest.as_bytes());
        h[1 + DIGEST_LEN..].copy_from_slice(&len.to_be_bytes());
        self.enc.write_all(&h)
    }

    /// One object whose bytes are in memory.
    pub fn record(&mut self, kind: Kind, digest: &Digest, data: &[u8]) -> io::Result<()> {
        self.header(kind.byte(), digest, data.len() as u64)?;
        self.enc.write_all(data)?;
        self.count += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// One blob of `len` bytes read from `r` (which must yield exactly that).
    pub fn blob(&mut self, digest: &Digest, len: u64, r: &mut dyn Read) -> io::Result<()> {
        self.header(Kind::Blob.byte(), digest, len)?;
        let copied = io::copy(&mut r.take(len), &mut self.enc)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob {digest} gave {copied} of its {len} bytes"),
            ));
        }
        self.count += 1;
        self.bytes += len;
        Ok(())
    }

    /// Objects and their bytes written so far.
    pub fn written(&self) -> (u64, u64) {
        (self.count, self.bytes)
    }

    /// Writes the end frame and ends the zstd stream.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(b'E', &Digest::from_bytes([0u8; DIGEST_LEN]), self.count)?;
        self.enc.finish()
    }

    /// Writes every blob of `digests` from `store` (each is read as it is
    /// sent; a blob that is gone is an error before anything of it is sent).
    pub fn blobs_from(&mut self, store: &Store, digests: &[Digest]) -> io::Result<()> {
        for d in digests {
            let blob = store.blob(d).map_err(io::Error::other)?;
            let size = blob.size();
            let mut r = strata_store::blob::BlobReader::new(&*blob);
            self.blob(d, size, &mut r)?;
        }
        Ok(())
    }
}

/// One frame's header, read.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub kind: Kind,
    pub digest: Digest,
    pub len: u64,
}

/// Reads a pack frame by frame.
pub struct PackReader<R: Read> {
    dec: zstd::Decoder<'static, BufReader<R>>,
    seen: u64,
}

impl<R: Read> PackReader<R> {
    pub fn new(r: R) -> Result<PackReader<R>, PackError> {
        let mut dec = zstd::Decoder::new(r)?;
        let mut magic = [0u8; 8];
        read_full(&mut dec, &mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => PackError::NotAPack,
            _ => PackError::Io(e),
        })?;
        if &magic != MAGIC {
            return Err(PackError::NotAPack);
        }
        Ok(PackReader { dec, seen: 0 })
    }

    /// The next frame's header; `None` after the end frame. The caller
    /// then reads exactly `len` bytes with [`PackReader::data`] or
    /// [`PackReader::copy`].
    pub fn next_frame(&mut self) -> Result<Option<Header>, PackError> {
        let mut h = [0u8; HEADER_LEN];
        read_full(&mut self.dec, &mut h).map_err(|e| self.cut(e))?;
        let mut d = [0u8; DIGEST_LEN];
        d.copy_from_slice(&h[1..1 + DIGEST_LEN]);
        let digest = Digest::from_bytes(d);
        let mut n = [0u8; 8];
        n.copy_from_slice(&h[1 + DIGEST_LEN..]);
        let len = u64::from_be_bytes(n);
        let kind = match h[0] {
            b'B' => Kind::Blob,
            b'T' => Kind::Tree,
            b'A' => Kind::Action,
            b'L' if len == 0 => Kind::Layer,
            b'E' if len == self.seen => return Ok(None),
            b'E' => {
                return Err(PackError::BadCount {
                    said: len,
                    seen: self.seen,
                })
            }
            kind => {
                return Err(PackError::BadKind {
                    index: self.seen,
                    kind,
                })
            }
        };
        self.seen += 1;
        Ok(Some(Header { kind, digest, len }))
    }

    fn cut(&self, e: io::Error) -> PackError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => PackError::Truncated(self.seen),
            _ => PackError::Io(e),
        }
    }

    /// The frame's bytes, when they are a record kept in memory.
    pub fn data(&mut self, h: &Header, what: &'static str) -> Result<Vec<u8>, PackError> {
        if h.len > MAX_RECORD {
            return Err(PackError::TooLarge {
                what,
                digest: h.digest,
                len: h.len,
            });
        }
        let mut buf = vec![0u8; h.len as usize];
        read_full(&mut self.dec, &mut buf).map_err(|e| self.cut(e))?;
        Ok(buf)
    }

    /// Copies the frame's bytes to `w`.
    pub fn copy(&mut self, h: &Header, w: &mut dyn Write) -> Result<(), PackError> {
        let copied = io::copy(&mut (&mut self.dec).take(h.len), w)?;
        if copied != h.len {
            return Err(PackError::Truncated(self.seen));
        }
        Ok(())
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    r.read_exact(buf)
}

/// What a [`Receiver`] took in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Received {
    /// Objects in the pack.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects the store did not hold before.
    pub new: u64,
}

/// Takes packs into a store, checking every object; see the module doc.
pub struct Receiver<'s> {
    store: &'s Store,
    _hold: HoldGuard<'s>,
    trees: Vec<(Digest, Tree)>,
    tree_set: HashSet<Digest>,
    /// Action entries the packs carried, in order.
    pub actions: Vec<(Digest, ActionEntry)>,
    /// Roots to record as layers.
    pub layers: Vec<Digest>,
    pub received: Received,
}

impl<'s> Receiver<'s> {
    pub fn new(store: &'s Store) -> Receiver<'s> {
        Receiver {
            store,
            _hold: store.hold(),
            trees: Vec::new(),
            tree_set: HashSet::new(),
            actions: Vec::new(),
            layers: Vec::new(),
            received: Received::default(),
        }
    }

    /// Reads a whole pack. Blobs are published as they check out (an
    /// unreferenced blob is harmless: GC takes it); trees and actions wait
    /// for [`Receiver::commit`]. Any error leaves nothing new visible but
    /// blobs whose bytes were right.
    pub fn read<R: Read>(&mut self, pack: &mut PackReader<R>) -> Result<(), PackError> {
        while let Some(h) = pack.next_frame()? {
            match h.kind {
                Kind::Blob => self.blob(pack, &h)?,
                Kind::Tree => {
                    let bytes = pack.data(&h, "tree")?;
                    self.tree(h.digest, &bytes)?;
                }
                Kind::Action => {
                    let bytes = pack.data(&h, "action entry")?;
                    let entry: ActionEntry =
                        serde_json::from_slice(&bytes).map_err(|e| PackError::BadAction {
                            key: h.digest,
                            reason: e.to_string(),
                        })?;
                    self.actions.push((h.digest, entry));
                }
                Kind::Layer => self.layers.push(h.digest),
            }
        }
        Ok(())
    }

    fn blob<R: Read>(&mut self, pack: &mut PackReader<R>, h: &Header) -> Result<(), PackError> {
        let new = receive_blob(self.store, &h.digest, &mut |w| pack.copy(h, w))?;
        self.counted_blob(h.len, new);
        Ok(())
    }

    /// Counts a blob that arrived some other way (already stored with
    /// [`receive_blob`]).
    pub fn counted_blob(&mut self, len: u64, new: bool) {
        self.received.objects += 1;
        self.received.bytes += len;
        self.received.new += u64::from(new);
    }

    /// Blobs that the received trees (and `extra`) name and the store lacks.
    pub fn missing_blobs(&self, extra: &[Digest]) -> Result<Vec<Digest>, PackError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let named = self.trees.iter().flat_map(|(_, t)| {
            t.entries().iter().filter_map(|(_, e)| match e {
                Entry::File { digest, .. } => Some(*digest),
                _ => None,
            })
        });
        for d in named.chain(extra.iter().copied()) {
            if seen.insert(d) && !self.store.blobs().contains(&d)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Notes a tree that arrived some other way (a backend that sends
    /// objects one by one), checked like a pack's.
    pub fn tree(&mut self, digest: Digest, bytes: &[u8]) -> Result<(), PackError> {
        self.received.objects += 1;
        self.received.bytes += bytes.len() as u64;
        let actual = Digest::of(bytes);
        if actual != digest {
            return Err(PackError::Mismatch {
                what: "tree",
                digest,
                actual,
            });
        }
        let tree = Tree::decode(bytes).map_err(|e| PackError::BadTree {
            digest,
            reason: e.to_string(),
        })?;
        if self.tree_set.insert(digest) && !self.store.has_tree(&digest)? {
            self.received.new += 1;
            self.trees.push((digest, tree));
        }
        Ok(())
    }

    /// The trees received so far that the store lacked, with what they name.
    pub fn pending_trees(&self) -> impl Iterator<Item = &Tree> {
        self.trees.iter().map(|(_, t)| t)
    }

    /// Whether the tree is stored or was received.
    pub fn has_tree(&self, digest: &Digest) -> Result<bool, PackError> {
        Ok(self.tree_set.contains(digest) || self.store.has_tree(digest)?)
    }

    /// Makes the received trees visible, once every object they name is
    /// here (in the packs or already stored): blobs first, durably, then
    /// the trees in one batch. Returns the action entries to record.
    pub fn commit(self) -> Result<(Received, Vec<(Digest, ActionEntry)>), PackError> {
        for (digest, tree) in &self.trees {
            for (_, entry) in tree.entries() {
                let missing = match entry {
                    Entry::Dir { digest: d } => {
                        (!self.tree_set.contains(d) && !self.store.has_tree(d)?).then_some(*d)
                    }
                    Entry::File { digest: d, .. } => {
                        (!self.store.blobs().contains(d)?).then_some(*d)
                    }
                    Entry::Symlink { .. } => None,
                };
                if let Some(missing) = missing {
                    return Err(PackError::Incomplete {
                        tree: *digest,
                        missing,
                    });
                }
            }
        }
        self.store.blobs().sync()?;
        self.store
            .put_trees(self.trees.into_iter().map(|(_, t)| t))?;
        let roots = self
            .layers
            .iter()
            .chain(self.actions.iter().flat_map(|(_, a)| &a.layers));
        for root in roots {
            if self.store.layer(root)?.is_none() && self.store.has_tree(root)? {
                self.store.record_layer(root, None)?;
            }
        }
        Ok((self.received, self.actions))
    }
}

/// Stores the blob that `copy` writes, if its bytes hash to `digest`;
/// returns whether it was new. A blob already stored is still read and
/// checked (a stream goes on after it) but not written again.
pub fn receive_blob(
    store: &Store,
    digest: &Digest,
    copy: &mut dyn FnMut(&mut dyn Write) -> Result<(), PackError>,
) -> Result<bool, PackError> {
    if store.blobs().contains(digest)? {
        let mut hasher = HashingSink::default();
        copy(&mut hasher)?;
        let actual = Digest::from(hasher.0.finalize());
        return match actual == *digest {
            true => Ok(false),
            false => Err(PackError::Mismatch {
                what: "blob",
                digest: *digest,
                actual,
            }),
        };
    }
    let mut w = store.blobs().writer()?;
    copy(&mut w)?;
    let staged = w.finish()?;
    if staged.digest() != *digest {
        // Dropping the staged blob discards its bytes.
        return Err(PackError::Mismatch {
            what: "blob",
            digest: *digest,
            actual: staged.digest(),
        });
    }
    staged.publish()?;
    Ok(true)
}

/// Hashes what is written to it.
#[derive(Default)]
struct HashingSink(blake3::Hasher);

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Digests as the bulk endpoints take them: 32 bytes each, back to back.
pub fn encode_digests(digests: &[Digest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(digests.len() * DIGEST_LEN);
    for d in digests {
        out.extend_from_slice(d.as_bytes());
    }
    out
}

/// The inverse of [`encode_digests`]; `None` when the length is not a
/// multiple of 32.
pub fn decode_digests(bytes: &[u8]) -> Option<Vec<Digest>> {
    if !bytes.len().is_multiple_of(DIGEST_LEN) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(DIGEST_LEN)
            .filter_map(Digest::from_slice)
            .collect(),
    )
}
