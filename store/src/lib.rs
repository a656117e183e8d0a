//! The Strata store: an immutable, content-addressed store of directory
//! snapshots ("layers").
//!
//! A [`Store`] joins a [`BlobStore`] (file contents) and a [`MetaStore`]
//! (trees, layer records, lineage, refs, action cache, runs, leases, stat
//! cache). Everything above the store sees these traits only; RocksDB types
//! never leave `meta/rocks.rs`. The on-disk format is specified in
//! `docs/FORMAT.md`.

mod archive;
pub mod blob;
mod builder;
mod cas;
mod checkout;
mod closure;
mod diff;
mod digest;
pub mod dircache;
mod error;
mod gc;
mod ingest;
mod lazy;
pub mod meta;
mod open;
mod path;
mod records;
mod tree;

pub use archive::{ArchiveLimits, ExportReport, ImportOptions, ImportReport};
pub use blob::{hash_reader, Adopted, Blob, BlobStore};
pub use cas::{BazelAction, BazelActionKind, CasDigest, CasWriter, Committed, DigestFunction};
pub use checkout::CheckoutReport;
pub use closure::{ActionCache, Closure};
pub use diff::{Change, ChangeKind, ChangeRow, MergeOutcome, MergePolicy};
pub use digest::{Digest, DigestPrefix, DIGEST_LEN, MIN_PREFIX_LEN};
pub use error::{special_file_kind, Error, Result};
pub use gc::{GcOptions, GcReport, Problem, Usage, VerifyReport};
pub use ingest::{IngestOptions, IngestReport};
pub use lazy::RemoteLayer;
pub use meta::{Batch, Family, Flow, IndexDamage, MetaStore};
pub use open::{LostTable, OpenMode, RepairReport, StoreUrl, RESERVE_BYTES};
pub use path::RelPath;
pub use records::{
    ActionEntry, LabelEntry, LayerRecord, LayerStats, Lease, LeaseGuard, Lineage, Payload, RunEntry,
};
pub use tree::{Entry, Kind, Listed, Name, Target, Tree, NAME_MAX, TARGET_MAX, TREE_MAGIC};

use std::path::PathBuf;
use std::sync::Arc;

/// Every file checked out or mounted from the store shows this modification
/// time (seconds since the epoch), so that checkouts are reproducible.
pub const FIXED_MTIME: i64 = 1;

/// A content-addressed store of layers.
///
/// Cheap to clone; clones share the backends.
#[derive(Clone)]
pub struct Store {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    /// The store directory, for on-disk stores.
    root: Option<PathBuf>,
    /// The write lock, held for the life of a writing handle.
    _lock: Option<Arc<open::StoreLock>>,
    /// Shared by clones: operations that publish blobs and then record them
    /// hold it shared; GC holds it exclusively, so it never sweeps a blob
    /// between its publication and the record that names it.
    publishing: Arc<parking_lot::RwLock<()>>,
}

/// Keeps GC (in this process) from sweeping until dropped; see [`Store::hold`].
pub struct HoldGuard<'a>(#[allow(dead_code)] parking_lot::RwLockReadGuard<'a, ()>);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// A store held in memory, for tests.
    pub fn memory() -> Store {
        Store::from_parts(
            Arc::new(blob::memory::MemoryBlobStore::new()),
            Arc::new(meta::memory::MemoryMetaStore::new()),
        )
    }

    /// A store over any pair of backends.
    pub fn from_parts(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>) -> Store {
        Store {
            blobs,
            meta,
            root: None,
            _lock: None,
            publishing: Default::default(),
        }
    }

    /// Holds off GC in this process while the caller publishes blobs or trees
    /// and then records what names them (a chain of calls that must not be
    /// swept half-way). Re-entrant: store operations take it too.
    pub fn hold(&self) -> HoldGuard<'_> {
        HoldGuard(self.publishing.read_recursive())
    }

    /// Refuses writes through a read-only handle before any work is done.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.meta.is_read_only() {
            return Err(Error::ReadOnly {
                path: self.root.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    pub fn blobs(&self) -> &dyn BlobStore {
        &*self.blobs
    }

    pub fn meta(&self) -> &dyn MetaStore {
        &*self.meta
    }

    /// The store directory of an on-disk store.
    pub fn root(&self) -> Option<&std::path::Path> {
        self.root.as_deref()
    }

    pub fn is_read_only(&self) -> bool {
        self.meta.is_read_only()
    }

    /// Reads a tree; a missing tree is [`Error::MissingTree`].
    pub fn tree(&self, digest: &Digest) -> Result<Tree> {
        match self.meta.get(Family::Trees, digest.as_bytes())? {
            Some(bytes) => Tree::decode(&bytes),
            None => Err(Error::MissingTree(*digest)),
        }
    }

    /// Whether a tree with this digest is stored.
    pub fn has_tree(&self, digest: &Digest) -> Result<bool> {
        Ok(self.meta.get(Family::Trees, digest.as_bytes())?.is_some())
    }

    /// Opens a blob; a missing blob is [`Error::MissingBlob`].
    pub fn blob(&self, digest: &Digest) -> Result<Box<dyn Blob>> {
        self.blobs.open(digest)?.ok_or(Error::MissingBlob(*digest))
    }

    /// Reads a whole blob into memory.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let blob = self.blob(digest)?;
        blob::read_all(&*blob).map_err(Error::io("read blob", digest.to_hex()))
    }

    /// Makes every record written so far durable (one fsync of the index's
    /// log). Operations that a user waits on end with it; records written
    /// without it are still ordered and never refer to a missing blob.
    pub fn sync(&self) -> Result<()> {
        self.meta.sync()
    }

    /// Stores bytes as a blob, durably, and returns the digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        self.check_writable()?;
        let _hold = self.hold();
        let (d, _) = self.blobs.put(bytes)?;
        self.blobs.sync()?;
        Ok(d)
    }

    /// Stores trees (and nothing else), except those already present.
    /// The blobs the trees name must already be durable.
    pub fn put_trees(&self, trees: impl IntoIterator<Item = Tree>) -> Result<()> {
        let _hold = self.hold();
        let mut batch = Batch::new();
        for tree in trees {
            self.stage_tree(&mut batch, &tree)?;
        }
        self.meta.write(batch)
    }

    /// Adds `tree` to `batch` unless it is stored already; returns its digest.
    pub(crate) fn stage_tree(&self, batch: &mut Batch, tree: &Tree) -> Result<Digest> {
        let bytes = tree.encode();
        let digest = Digest::of(&bytes);
        if !self.has_tree(&digest)? {
            batch.put(Family::Trees, digest.as_bytes().to_vec(), bytes);
        }
        Ok(digest)
    }

    /// The entry at `path` inside the layer rooted at `root`; the empty path
    /// is the root directory itself. `Ok(None)` when no such path exists.
    pub fn lookup(&self, root: &Digest, path: &RelPath) -> Result<Option<Entry>> {
        let mut entry = Entry::Dir { digest: *root };
        for name in path.components() {
            let Entry::Dir { digest } = entry else {
                return Ok(None);
            };
            match self.tree(&digest)?.get(name.as_bytes()) {
                Some(e) => entry = e.clone(),
                None => return Ok(None),
            }
        }
        Ok(Some(entry))
    }

    /// A directory for scratch space (task work directories) on the store's
    /// filesystem: `<store>/work`, or a directory under the system temporary
    /// directory for an in-memory store. Never holds store content.
    pub fn scratch_dir(&self) -> PathBuf {
        match &self.root {
            Some(root) => root.join("work"),
            None => std::env::temp_dir().join(format!("strata-work-{}", std::process::id())),
        }
    }

    /// Brings a read-only handle up to date with the writing process.
    pub fn refresh(&self) -> Result<()> {
        self.meta.refresh()
    }
}
