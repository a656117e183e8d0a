//! The index: trees, layer records, lineage, refs, action cache, runs,
//! leases and the stat cache, as ordered key-value families.
//!
//! One trait, one file per backend: [`rocks::RocksMetaStore`] (RocksDB, one
//! column family per [`Family`]) and [`memory::MemoryMetaStore`] for tests.

pub mod memory;
pub mod rocks;

use crate::Result;

/// The key spaces of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// tree digest → canonical tree encoding
    Trees,
    /// layer digest → layer record (JSON)
    Layers,
    /// layer digest → lineage (JSON)
    Lineage,
    /// ref name → layer digest
    Refs,
    /// action key → action entry (JSON)
    Actions,
    /// run id → run entry (JSON)
    Runs,
    /// lease id → lease (JSON)
    Leases,
    /// absolute path → stat fields and content digest: the file-level stat
    /// cache of stores made before the directory cache; no longer written
    /// or read (GC drops its records)
    StatCache,
    /// task label → its latest successful output (JSON)
    Labels,
    /// run id, 0, sequence number (u64 big-endian) → one event of the run (JSON)
    Events,
    /// SHA-256 of a blob's bytes (32 bytes) → its BLAKE3 digest (Bazel's CAS)
    Sha256,
    /// digest-function tag, action digest → a Bazel action entry (`cas.rs`)
    BazelActions,
    /// layer digest → where it is held when this store holds it only
    /// remotely (JSON, `lazy.rs`)
    Remote,
    /// action key → an action entry recorded without its layers (JSON,
    /// `lazy.rs`): a hit of a cache that fetches layers when they are read
    LazyActions,
    /// absolute directory path → what an ingest saw of that directory
    /// (`dircache.rs`): the directory cache
    DirCache,
}

impl Family {
    pub const ALL: [Family; 15] = [
        Family::Trees,
        Family::Layers,
        Family::Lineage,
        Family::Refs,
        Family::Actions,
        Family::Runs,
        Family::Leases,
        Family::StatCache,
        Family::Labels,
        Family::Events,
        Family::Sha256,
        Family::BazelActions,
        Family::Remote,
        Family::LazyActions,
        Family::DirCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Trees => "trees",
            Family::Layers => "layers",
            Family::Lineage => "lineage",
            Family::Refs => "refs",
            Family::Actions => "actions",
            Family::Runs => "runs",
            Family::Leases => "leases",
            Family::StatCache => "statcache",
            Family::Labels => "labels",
            Family::Events => "events",
            Family::Sha256 => "sha256",
            Family::BazelActions => "bazel_actions",
            Family::Remote => "remote",
            Family::LazyActions => "lazy_actions",
            Family::DirCache => "dircache",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Writes applied together or not at all.
#[derive(Default, Debug)]
pub struct Batch {
    pub(crate) ops: Vec<(Family, Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn put(&mut self, family: Family, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((family, key.into(), Some(value.into())));
    }
    pub fn delete(&mut self, family: Family, key: impl Into<Vec<u8>>) {
        self.ops.push((family, key.into(), None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Damage to the index's own files, found by [`MetaStore::check_integrity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexDamage {
    /// The family whose records the damage hides, when known.
    pub family: Option<String>,
    /// The damaged file (e.g. `000012.sst`), when known.
    pub file: Option<String>,
    /// What is wrong, in words.
    pub detail: String,
}

impl std::fmt::Display for IndexDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, &self.family) {
            (Some(file), Some(family)) => write!(f, "`{file}` (family `{family}`): ")?,
            (Some(file), None) => write!(f, "`{file}`: ")?,
            (None, Some(family)) => write!(f, "family `{family}`: ")?,
            (None, None) => {}
        }
        f.write_str(&self.detail)
    }
}

/// What a scan callback wants next.
pub enum Flow {
    Continue,
    Stop,
}

/// A scan callback: called with each key and value, says whether to go on.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<Flow> + 'a;

/// The ordered key-value index of a store.
pub trait MetaStore: Send + Sync {
    /// The value under `key`, or `None`.
    fn get(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Applies every write of `batch` atomically. Writes become durable in
    /// order: after [`MetaStore::sync`] every earlier write is durable, and a
    /// crash never keeps a write while losing an earlier one.
    fn write(&self, batch: Batch) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Calls `f` for each entry whose key starts with `prefix`, in key order.
    fn scan(&self, family: Family, prefix: &[u8], f: &mut Visit<'_>) -> Result<()> {
        self.scan_from(family, prefix, prefix, f)
    }
    /// Like [`MetaStore::scan`], starting at the first key at or after
    /// `start` (which should itself start with `prefix`): a caller resuming
    /// part-way through a prefix does not read what it has seen.
    fn scan_from(
        &self,
        family: Family,
        prefix: &[u8],
        start: &[u8],
        f: &mut Visit<'_>,
    ) -> Result<()>;
    /// Brings a read-only view up to date with the writer (no-op elsewhere).
    fn refresh(&self) -> Result<()> {
        Ok(())
    }
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Checks the index's own files: every table it needs is there and
    /// whole, and every entry of every family reads back with its checksums
    /// verified. Returns one item per damaged file or family, none when the
    /// index is whole; `Err` only when the check itself cannot run. Backends
    /// without files of their own have nothing to check.
    fn check_integrity(&self) -> Result<Vec<IndexDamage>> {
        Ok(Vec::new())
    }
}
