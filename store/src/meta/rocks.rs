//! The index in RocksDB: one column family per [`Family`].
//!
//! RocksDB types never leave this file.

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamily, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::{Batch, Family, Flow, MetaStore, Visit};
use crate::{Error, Result};

/// An index in a RocksDB database, opened for writing (one process at a
/// time) or as a read-only secondary that follows the writer.
pub struct RocksMetaStore {
    db: DB,
    read_only: bool,
    // Keeps the secondary's private directory alive as long as the handle.
    _secondary_dir: Option<tempfile::TempDir>,
}

fn db_err(action: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
    move |e| Error::Db {
        action,
        source: Box::new(e),
    }
}

fn options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_keep_log_file_num(4);
    // Tables are opened when first read, not all at open: a short command
    // (a no-op build, `ci store ls`) pays only for the tables it reads, and
    // the open time does not grow with the number of recorded runs.
    opts.set_max_open_files(512);
    opts.set_skip_stats_update_on_db_open(true);
    // Point lookups (trees by digest, layer records) dominate: bloom filters
    // spare a read of every level's blocks for a key that is not there.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    opts.set_block_based_table_factory(&table);
    opts
}

fn cf_names() -> Vec<&'static str> {
    Family::ALL.iter().map(|f| f.name()).collect()
}

impl RocksMetaStore {
    /// Opens (creating when missing) the database at `path` for writing.
    /// The caller must hold the store's write lock.
    pub fn open(path: &Path) -> Result<RocksMetaStore> {
        let db = DB::open_cf(&options(), path, cf_names()).map_err(db_err("opening"))?;
        Ok(RocksMetaStore {
            db,
            read_only: false,
            _secondary_dir: None,
        })
    }

    /// Opens the database at `path` read-only, as a secondary instance: works
    /// while another process writes, and sees its writes after [`MetaStore::refresh`].
    pub fn open_secondary(path: &Path) -> Result<RocksMetaStore> {
        let dir = tempfile::Builder::new()
            .prefix("strata-reader-")
            .tempdir()
            .map_err(Error::io("create a directory in", std::env::temp_dir()))?;
        let mut opts = options();
        opts.create_if_missing(false);
        opts.create_missing_column_families(false);
        // A store written by an earlier version may lack a family that was
        // added since (the writer creates it on its next open): a reader
        // opens what is there, and a missing family reads as empty.
        let existing = DB::list_cf(&opts, path).map_err(db_err("opening read-only"))?;
        let names: Vec<&str> = cf_names()
            .into_iter()
            .filter(|n| existing.iter().any(|e| e == n))
            .collect();
        let db = DB::open_cf_as_secondary(&opts, path, dir.path(), names)
            .map_err(db_err("opening read-only"))?;
        Ok(RocksMetaStore {
            db,
            read_only: true,
            _secondary_dir: Some(dir),
        })
    }

    fn cf(&self, family: Family) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(family.name())
            .ok_or(Error::CorruptRecord {
                what: "column family",
                key: family.name().to_owned(),
            })
    }

    /// A family that a read-only handle found missing (an older store).
    fn absent(&self, family: Family) -> bool {
        self.read_only && self.db.cf_handle(family.name()).is_none()
    }

    pub fn path(&self) -> PathBuf {
        self.db.path().to_owned()
    }
}

impl MetaStore for RocksMetaStore {
    fn get(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.absent(family) {
            return Ok(None);
        }
        self.db
            .get_cf(self.cf(family)?, key)
            .map_err(db_err("reading"))
    }

    fn write(&self, batch: Batch) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly { path: self.path() });
        }
        let mut wb = WriteBatch::default();
        for (family, key, value) in &batch.ops {
            let cf = self.cf(*family)?;
            match value {
                Some(v) => wb.put_cf(cf, key, v),
                None => wb.delete_cf(cf, key),
            }
        }
        // Not synced here: the WAL is sequential, so one `sync` (one fsync)
        // makes every earlier batch durable at once. See FORMAT.md.
        self.db
            .write_opt(wb, &WriteOptions::default())
            .map_err(db_err("writing"))
    }

    fn sync(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.db.flush_wal(true).map_err(db_err("syncing the log"))
    }

    fn scan_from(
        &self,
        family: Family,
        prefix: &[u8],
        start: &[u8],
        f: &mut Visit<'_>,
    ) -> Result<()> {
        if self.absent(family) {
            return Ok(());
        }
        let start = start.max(prefix);
        let iter = self.db.iterator_cf(
            self.cf(family)?,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(db_err("scanning"))?;
            if !k.starts_with(prefix) {
                break;
            }
            if let Flow::Stop = f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn refresh(&self) -> Result<()> {
        if self.read_only {
            self.db
                .try_catch_up_with_primary()
                .map_err(db_err("catching up with the writer"))?;
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Memtables larger than this are flushed when a writer closes.
const FLUSH_ON_CLOSE: u64 = 1 << 20;

impl Drop for RocksMetaStore {
    /// After a command that wrote much (a cold build: every tree, layer,
    /// action and label), flushes the memtables into tables, so the next
    /// command opens without replaying and flushing this one's log (about
    /// 35 ms after a 1,000-task build, paid by the no-op build that
    /// follows). A command that wrote little leaves its few records in the
    /// log. Failures only cost the next open that work.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let families: Vec<&ColumnFamily> = Family::ALL
            .iter()
            .filter_map(|f| self.db.cf_handle(f.name()))
            .collect();
        let size: u64 = families
            .iter()
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(*cf, "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
            })
            .sum();
        if size > FLUSH_ON_CLOSE {
            let _ = self
                .db
                .flush_cfs_opt(&families, &rocksdb::FlushOptions::default());
        }
    }
}
