//! The index in RocksDB: one column family per [`Family`].
//!
//! RocksDB types never leave this file.

use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamily, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use super::{Batch, Family, Flow, IndexDamage, MetaStore, Visit};
use crate::{Error, Result};

/// An index in a RocksDB database, opened for writing (one process at a
/// time) or as a read-only secondary that follows the writer.
pub struct RocksMetaStore {
    db: DB,
    read_only: bool,
    // Keeps the secondary's private directory alive as long as the handle.
    _secondary_dir: Option<tempfile::TempDir>,
    /// Tables a reader's view lacks ([`RocksMetaStore::check_view`]):
    /// every read is then refused, as the index would refuse a writer.
    damage: Vec<IndexDamage>,
}

/// Turns RocksDB's error into the store's: a full disk and damage to the
/// index's own files are said as such (naming the file where RocksDB does).
fn db_err<'a>(
    db: &'a Path,
    action: &'static str,
    family: Option<Family>,
) -> impl FnOnce(rocksdb::Error) -> Error + 'a {
    move |e| classify(db, action, family, e)
}

fn classify(db: &Path, action: &'static str, family: Option<Family>, e: rocksdb::Error) -> Error {
    let msg = e.to_string();
    let root = db.parent().unwrap_or(db).to_owned();
    if msg.contains("No space left on device") {
        return Error::DiskFull {
            path: root,
            source: Box::new(e),
        };
    }
    let file = damaged_file(&msg);
    let damaged = e.kind() == rocksdb::ErrorKind::Corruption || file.is_some();
    if !damaged {
        return Error::Db {
            action,
            source: Box::new(e),
        };
    }
    let mut what = match family {
        Some(f) => format!("{action} family `{}` failed", f.name()),
        None => format!("{action} failed"),
    };
    if let Some(file) = file {
        what.push_str(&format!(" on `{file}`"));
    }
    Error::DamagedIndex {
        path: db.to_owned(),
        what,
        source: Some(Box::new(e)),
    }
}

/// The table (else the manifest) a RocksDB message names, as a file name.
fn damaged_file(msg: &str) -> Option<String> {
    let words = || {
        msg.split(|c: char| c.is_whitespace() || c == ':' || c == ',')
            .map(|w| w.trim_end_matches('.'))
            .filter_map(|w| w.rsplit('/').next())
    };
    words()
        .find(|w| w.ends_with(".sst"))
        .or_else(|| words().find(|w| w.starts_with("MANIFEST-") && w.len() > 9))
        .map(str::to_owned)
}

/// What is wrong with a table, said from RocksDB's message.
fn table_problem(msg: &str) -> String {
    if let Some(rest) = msg.split("Expected ").nth(1) {
        let nums: Vec<u64> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [expected, actual, ..] = nums[..] {
            return if actual < expected {
                format!("the table is cut short: {actual} of its {expected} bytes are there")
            } else {
                format!("the table is {actual} bytes, the index records {expected}")
            };
        }
    }
    if msg.contains("No such file") || msg.contains("not found") || msg.contains("missing") {
        return "the table is missing".to_owned();
    }
    format!("the table cannot be read: {msg}")
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
    // Opening loads a few tables of each family, by default on 16 new
    // threads per family: some 180 thread starts for a dozen families and
    // ~20 small tables, a quarter of a no-op build's time. One thread (the
    // caller's) does it faster.
    opts.set_max_file_opening_threads(1);
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

/// Options for opening the index at `path` without writing, and the
/// families to open: a store written by an earlier version may lack a
/// family that was added since (the writer creates it on its next open), so
/// a reader opens what is there, and a missing family reads as empty.
fn read_only_options(path: &Path) -> Result<(Options, Vec<&'static str>)> {
    let mut opts = options();
    opts.create_if_missing(false);
    opts.create_missing_column_families(false);
    let existing = DB::list_cf(&opts, path).map_err(db_err(path, "opening read-only", None))?;
    let names = cf_names()
        .into_iter()
        .filter(|n| existing.iter().any(|e| e == n))
        .collect();
    Ok((opts, names))
}

impl RocksMetaStore {
    /// Opens (creating when missing) the database at `path` for writing.
    /// The caller must hold the store's write lock.
    /// A damaged index is [`Error::DamagedIndex`] naming what is missing or
    /// cut short; a full disk is [`Error::DiskFull`].
    pub fn open(path: &Path) -> Result<RocksMetaStore> {
        let db = match DB::open_cf(&options(), path, cf_names()) {
            Ok(db) => db,
            Err(e) => {
                return Err(explain_open_failure(
                    path,
                    classify(path, "opening", None, e),
                ))
            }
        };
        Ok(RocksMetaStore {
            db,
            read_only: false,
            _secondary_dir: None,
            damage: Vec::new(),
        })
    }

    /// Opens the database at `path` read-only, as a secondary instance: works
    /// while another process writes, and sees its writes after [`MetaStore::refresh`].
    pub fn open_secondary(path: &Path) -> Result<RocksMetaStore> {
        let dir = tempfile::Builder::new()
            .prefix("strata-reader-")
            .tempdir()
            .map_err(Error::io("create a directory in", std::env::temp_dir()))?;
        let (opts, names) = read_only_options(path)?;
        let db = DB::open_cf_as_secondary(&opts, path, dir.path(), names).map_err(db_err(
            path,
            "opening read-only",
            None,
        ))?;
        Ok(RocksMetaStore {
            db,
            read_only: true,
            _secondary_dir: Some(dir),
            damage: Vec::new(),
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

    /// The tables the index's manifest lists that are missing from the
    /// directory or of another size than it records.
    fn missing_tables(&self) -> Result<Vec<IndexDamage>> {
        let files =
            self.db
                .live_files()
                .map_err(db_err(self.db.path(), "listing the tables", None))?;
        let mut out = Vec::new();
        for f in files {
            let name = f.name.trim_start_matches('/').to_owned();
            let path = self.db.path().join(&name);
            let detail = match std::fs::metadata(&path) {
                Ok(m) if m.len() == f.size as u64 => continue,
                Ok(m) if m.len() < f.size as u64 => format!(
                    "the table is cut short: {} of its {} bytes are there",
                    m.len(),
                    f.size
                ),
                Ok(m) => format!(
                    "the table is {} bytes, the index records {}",
                    m.len(),
                    f.size
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    "the table is missing".to_owned()
                }
                Err(e) => format!("the table cannot be read: {e}"),
            };
            out.push(IndexDamage {
                family: Some(f.column_family_name),
                file: Some(name),
                detail,
            });
        }
        Ok(out)
    }

    /// Opens the database at `path` read-only as a plain instance (not a
    /// secondary) and returns the tables its manifest lists that are not
    /// there whole. A secondary tolerates missing and unreadable tables (a
    /// writer may be removing them): it goes back to the last state whose
    /// tables are all there, and what was written since reads as absent. A
    /// plain instance refuses such an index: its error (naming the table)
    /// is the damage. It may also report a table that a running writer has
    /// just compacted away; a second check then finds nothing.
    pub fn check_tables(path: &Path) -> Result<Vec<IndexDamage>> {
        let (opts, names) = read_only_options(path)?;
        match DB::open_cf_for_read_only(&opts, path, names, false) {
            Ok(db) => {
                let store = RocksMetaStore {
                    db,
                    read_only: true,
                    _secondary_dir: None,
                    damage: Vec::new(),
                };
                store.missing_tables()
            }
            Err(e) => {
                let msg = e.to_string();
                let file = damaged_file(&msg);
                let family = file
                    .as_ref()
                    .and_then(|f| RocksMetaStore::tables(path).remove(f));
                Ok(vec![IndexDamage {
                    family,
                    detail: match &file {
                        Some(f) if f.ends_with(".sst") => table_problem(&msg),
                        _ => format!("the index does not open: {msg}"),
                    },
                    file,
                }])
            }
        }
    }

    /// Checks that a reader sees the whole index. A secondary skips
    /// tables that are missing or cannot be opened (going back to the
    /// last state whose tables are all there): tables in the directory
    /// that it does not list are the sign. They may also be a writer's
    /// work in flight, so the reader catches up once and, if they are
    /// still there, [`RocksMetaStore::check_tables`] decides. A view that
    /// lacks tables refuses every read with [`Error::DamagedIndex`]; only
    /// [`MetaStore::check_integrity`] answers, with the damage.
    pub fn check_view(&mut self) -> Result<()> {
        let unlisted = || -> Result<bool> {
            let live: std::collections::HashSet<String> = self
                .db
                .live_files()
                .map_err(db_err(self.db.path(), "listing the tables", None))?
                .into_iter()
                .map(|f| f.name.trim_start_matches('/').to_owned())
                .collect();
            let dir = self.db.path();
            let entries = std::fs::read_dir(dir).map_err(Error::io("list", dir))?;
            Ok(entries.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.ends_with(".sst") && !live.contains(&name)
            }))
        };
        if !unlisted()? {
            return Ok(());
        }
        self.refresh()?;
        if !unlisted()? {
            return Ok(());
        }
        self.damage = RocksMetaStore::check_tables(self.db.path())?;
        Ok(())
    }

    /// Refuses reads through a view that lacks tables.
    fn check_whole(&self) -> Result<()> {
        if self.damage.is_empty() {
            return Ok(());
        }
        Err(Error::DamagedIndex {
            path: self.db.path().to_owned(),
            what: join_damage(&self.damage),
            source: None,
        })
    }

    /// Each table of the database at `path` (file name → family), as its
    /// manifest lists them; empty when the manifest cannot be read.
    pub fn tables(path: &Path) -> std::collections::HashMap<String, String> {
        let Ok(reader) = RocksMetaStore::open_secondary(path) else {
            return Default::default();
        };
        reader
            .db
            .live_files()
            .map(|files| {
                files
                    .into_iter()
                    .map(|f| {
                        (
                            f.name.trim_start_matches('/').to_owned(),
                            f.column_family_name,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs RocksDB's repair on the database at `path`: tables that cannot
    /// be read whole, and the logs, are moved to `lost/` after what can be
    /// read from them is kept; a new manifest lists what remains. The
    /// caller must hold the store's write lock.
    pub fn repair(path: &Path) -> Result<()> {
        let mut opts = options();
        opts.create_if_missing(false);
        DB::repair(&opts, path).map_err(db_err(path, "repairing", None))
    }
}

fn join_damage(damage: &[IndexDamage]) -> String {
    damage
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A failed open, said better when the tables are to blame: which table
/// of which family is missing or cut short.
fn explain_open_failure(path: &Path, err: Error) -> Error {
    if matches!(err, Error::DiskFull { .. }) {
        return err;
    }
    match RocksMetaStore::check_tables(path) {
        Ok(damage) if !damage.is_empty() => Error::DamagedIndex {
            path: path.to_owned(),
            what: join_damage(&damage),
            source: match err {
                Error::DamagedIndex { source, .. } => source,
                other => Some(Box::new(other)),
            },
        },
        _ => err,
    }
}

impl MetaStore for RocksMetaStore {
    fn get(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_whole()?;
        if self.absent(family) {
            return Ok(None);
        }
        self.db.get_cf(self.cf(family)?, key).map_err(db_err(
            self.db.path(),
            "reading",
            Some(family),
        ))
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
            .map_err(db_err(self.db.path(), "writing", None))
    }

    fn sync(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.db
            .flush_wal(true)
            .map_err(db_err(self.db.path(), "syncing the log", None))
    }

    fn scan_from(
        &self,
        family: Family,
        prefix: &[u8],
        start: &[u8],
        f: &mut Visit<'_>,
    ) -> Result<()> {
        self.check_whole()?;
        if self.absent(family) {
            return Ok(());
        }
        let start = start.max(prefix);
        let iter = self.db.iterator_cf(
            self.cf(family)?,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(db_err(self.db.path(), "scanning", Some(family)))?;
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
            self.db.try_catch_up_with_primary().map_err(db_err(
                self.db.path(),
                "catching up with the writer",
                None,
            ))?;
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check_integrity(&self) -> Result<Vec<IndexDamage>> {
        if !self.damage.is_empty() {
            return Ok(self.damage.clone());
        }
        let mut damage = if self.read_only {
            RocksMetaStore::check_tables(self.db.path())?
        } else {
            self.missing_tables()?
        };
        for family in Family::ALL {
            let Some(cf) = self.db.cf_handle(family.name()) else {
                continue;
            };
            // Every block read is checked against its checksum, and none
            // is kept in the cache (a check reads everything once).
            let mut ro = ReadOptions::default();
            ro.set_verify_checksums(true);
            ro.fill_cache(false);
            let mut iter = self.db.raw_iterator_cf_opt(cf, ro);
            iter.seek_to_first();
            while iter.valid() {
                iter.next();
            }
            if let Err(e) = iter.status() {
                let msg = e.to_string();
                let file = damaged_file(&msg);
                // A table already reported missing or cut short says it.
                if file.is_some() && damage.iter().any(|d| d.file == file) {
                    continue;
                }
                damage.push(IndexDamage {
                    family: Some(family.name().to_owned()),
                    file,
                    detail: format!("its records cannot be read: {msg}"),
                });
            }
        }
        Ok(damage)
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
