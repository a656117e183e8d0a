//! Blob storage: the bytes of files, addressed by their BLAKE3 digest.
//!
//! One trait, one file per backend: [`fs::FsBlobStore`] keeps each blob as a
//! read-only file under `blobs/ab/cdef…`; [`memory::MemoryBlobStore`] keeps them
//! in memory for tests.

pub mod fs;
pub mod memory;

use std::io::{self, Read, Write};

use std::path::PathBuf;

use crate::{Digest, Result};

/// Bytes of one stored blob, readable at any offset.
pub trait Blob: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at or past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The open file holding exactly these bytes, for a reader that hands
    /// the file itself to the kernel (FUSE passthrough); `None` when the
    /// backend keeps no such file (memory).
    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A blob being written: bytes go in, the digest is computed on the way.
pub trait BlobWriter: Write + Send {
    /// Ends the write. The blob is staged, not yet visible: publish it, or drop
    /// it to discard the bytes.
    fn finish(self: Box<Self>) -> Result<Box<dyn StagedBlob>>;
}

/// A fully written blob that is not yet part of the store.
pub trait StagedBlob: Send {
    fn digest(&self) -> Digest;
    fn size(&self) -> u64;
    /// Makes the blob visible under its digest (a no-op when it already was).
    /// Durability comes from [`BlobStore::sync`], called before any record
    /// refers to the blob.
    fn publish(self: Box<Self>) -> Result<()>;
}

/// Where blobs live.
pub trait BlobStore: Send + Sync {
    /// Starts writing a new blob.
    fn writer(&self) -> Result<Box<dyn BlobWriter>>;
    /// Whether a blob with this digest is stored.
    fn contains(&self, digest: &Digest) -> Result<bool>;
    /// Opens a blob; `Ok(None)` when it is not stored.
    fn open(&self, digest: &Digest) -> Result<Option<Box<dyn Blob>>>;
    /// The file holding the blob, when the backend keeps blobs as files
    /// (lets checkout reflink and FUSE read without copies).
    fn file_path(&self, digest: &Digest) -> Option<PathBuf>;
    /// Calls `f` with every stored digest and its size in bytes. What is
    /// not a blob (a stray file or directory) is skipped here and listed by
    /// [`BlobStore::strays`].
    fn for_each(&self, f: &mut dyn FnMut(Digest, u64) -> Result<()>) -> Result<()>;
    /// Paths in the blob area that are not blobs (for `verify` to report).
    fn strays(&self) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    /// Deletes a blob; returns the bytes freed (0 when it was not there).
    fn delete(&self, digest: &Digest) -> Result<u64>;
    /// Makes every published blob durable. Called once per operation, before
    /// the records that refer to the new blobs are written.
    fn sync(&self) -> Result<()>;

    /// Stores `bytes`, whose digest the caller has just computed as `digest`,
    /// without hashing them again. Returns whether the blob was new.
    fn put_hashed(&self, digest: &Digest, bytes: &[u8]) -> Result<bool>;

    /// Takes the file at `path` as the blob `digest` by moving it into the
    /// store: no copy, no new file. The caller vouches that `path` is a
    /// regular file holding exactly the bytes of `digest`, with no other link
    /// and nothing else holding it open (a work directory's capture checks
    /// this with a write lease while it hashes). The file's mode becomes
    /// read-only. Durability as for [`BlobStore::put_hashed`]: after the next
    /// [`BlobStore::sync`].
    fn adopt(&self, digest: &Digest, path: &std::path::Path) -> Result<Adopted> {
        let _ = (digest, path);
        Ok(Adopted::Unsupported)
    }

    /// Stores `bytes` as a blob; returns its digest and whether it was new.
    fn put(&self, bytes: &[u8]) -> Result<(Digest, bool)> {
        let digest = Digest::of(bytes);
        let new = self.put_hashed(&digest, bytes)?;
        Ok((digest, new))
    }
}

/// What [`BlobStore::adopt`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// The file is now the blob.
    Moved,
    /// The blob was stored already; the file is left where it was.
    Exists,
    /// This backend or filesystem cannot take files (another filesystem,
    /// blobs kept in memory); the file is left where it was: copy it.
    Unsupported,
}

/// Reads a whole blob into memory.
pub fn read_all(blob: &dyn Blob) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(blob.size() as usize);
    BlobReader::new(blob).read_to_end(&mut out)?;
    Ok(out)
}

/// Sequential reader over a [`Blob`].
pub struct BlobReader<'a> {
    blob: &'a dyn Blob,
    pos: u64,
}

impl<'a> BlobReader<'a> {
    pub fn new(blob: &'a dyn Blob) -> BlobReader<'a> {
        BlobReader { blob, pos: 0 }
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.blob.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The digest and length of everything `r` yields, read in chunks of
/// `chunk` bytes (large chunks are hashed on every core).
pub fn hash_reader(r: &mut dyn Read, chunk: usize) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Hashes with BLAKE3, using every core for large writes.
pub(crate) struct Hasher {
    inner: blake3::Hasher,
    len: u64,
}

/// Writes at least this large are hashed with the multithreaded API.
const PARALLEL_HASH_MIN: usize = 1 << 20;

impl Hasher {
    pub(crate) fn new() -> Hasher {
        Hasher {
            inner: blake3::Hasher::new(),
            len: 0,
        }
    }
    pub(crate) fn update(&mut self, buf: &[u8]) {
        if buf.len() >= PARALLEL_HASH_MIN {
            self.inner.update_rayon(buf);
        } else {
            self.inner.update(buf);
        }
        self.len += buf.len() as u64;
    }
    pub(crate) fn finish(&self) -> (Digest, u64) {
        (self.inner.finalize().into(), self.len)
    }
}
