//! Blobs in memory, for tests and throwaway stores.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Blob, BlobStore, BlobWriter, Hasher, StagedBlob};
use crate::{Digest, Result};

type Map = Arc<Mutex<BTreeMap<Digest, Arc<[u8]>>>>;

/// Blob storage in memory.
#[derive(Default, Clone)]
pub struct MemoryBlobStore {
    blobs: Map,
}

fn lock(map: &Map) -> MutexGuard<'_, BTreeMap<Digest, Arc<[u8]>>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBlobStore {
    pub fn new() -> MemoryBlobStore {
        MemoryBlobStore::default()
    }
}

struct MemBlob(Arc<[u8]>);

impl Blob for MemBlob {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

struct MemWriter {
    map: Map,
    bytes: Vec<u8>,
    hasher: Hasher,
}

impl Write for MemWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemWriter {
    fn finish(self: Box<Self>) -> Result<Box<dyn StagedBlob>> {
        let (digest, _) = self.hasher.finish();
        Ok(Box::new(MemStaged {
            map: self.map,
            digest,
            bytes: self.bytes.into(),
        }))
    }
}

struct MemStaged {
    map: Map,
    digest: Digest,
    bytes: Arc<[u8]>,
}

impl StagedBlob for MemStaged {
    fn digest(&self) -> Digest {
        self.digest
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn publish(self: Box<Self>) -> Result<()> {
        lock(&self.map).entry(self.digest).or_insert(self.bytes);
        Ok(())
    }
}

impl BlobStore for MemoryBlobStore {
    fn writer(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(MemWriter {
            map: self.blobs.clone(),
            bytes: Vec::new(),
            hasher: Hasher::new(),
        }))
    }
    fn put_hashed(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        let mut map = lock(&self.blobs);
        if map.contains_key(digest) {
            return Ok(false);
        }
        map.insert(*digest, bytes.into());
        Ok(true)
    }

    fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(lock(&self.blobs).contains_key(digest))
    }
    fn open(&self, digest: &Digest) -> Result<Option<Box<dyn Blob>>> {
        Ok(lock(&self.blobs)
            .get(digest)
            .map(|b| Box::new(MemBlob(b.clone())) as Box<dyn Blob>))
    }
    fn file_path(&self, _digest: &Digest) -> Option<PathBuf> {
        None
    }
    fn for_each(&self, f: &mut dyn FnMut(Digest, u64) -> Result<()>) -> Result<()> {
        let all: Vec<(Digest, u64)> = lock(&self.blobs)
            .iter()
            .map(|(d, b)| (*d, b.len() as u64))
            .collect();
        for (d, n) in all {
            f(d, n)?;
        }
        Ok(())
    }
    fn delete(&self, digest: &Digest) -> Result<u64> {
        Ok(lock(&self.blobs)
            .remove(digest)
            .map_or(0, |b| b.len() as u64))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}
