//! Opening stores: URLs, the on-disk layout, and the write lock.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blob::fs::FsBlobStore;
use crate::meta::rocks::RocksMetaStore;
use crate::{Error, Result, Store};

/// The first line of `FORMAT` in a store directory.
const FORMAT_LINE: &str = "strata-store 1";

/// Where a store lives, parsed from a URL or a plain path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `rocksdb:///abs/path` or a plain path: blobs as files, RocksDB index.
    Local(PathBuf),
    /// `memory://`: nothing persists.
    Memory,
}

impl StoreUrl {
    pub fn parse(s: &str) -> Result<StoreUrl> {
        if s == "memory://" || s == "memory:" {
            return Ok(StoreUrl::Memory);
        }
        if let Some(rest) = s.strip_prefix("rocksdb://") {
            if !rest.starts_with('/') {
                return Err(Error::BadUrl {
                    url: s.to_owned(),
                    reason: "use an absolute path, as in `rocksdb:///var/cache/strata`",
                });
            }
            return Ok(StoreUrl::Local(PathBuf::from(rest)));
        }
        if s.contains("://") {
            return Err(Error::BadUrl {
                url: s.to_owned(),
                reason: "known schemes are `rocksdb://` and `memory://`",
            });
        }
        if s.is_empty() {
            return Err(Error::BadUrl {
                url: s.to_owned(),
                reason: "the path is empty",
            });
        }
        Ok(StoreUrl::Local(PathBuf::from(s)))
    }
}

/// How a process uses the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Exclusive writer: waits for the write lock, sweeps `tmp/`.
    Write,
    /// Reader: never waits, works while another process writes.
    Read,
    /// A writer that frees space (`ci store gc`): releases the store's
    /// reserve file before it opens the index, so that it opens on a full
    /// disk; [`Store::gc`] makes the reserve again when there is room.
    Reclaim,
}

/// The size of `<store>/reserve`: space held back from everything else on
/// the store's filesystem, released by a [`OpenMode::Reclaim`] open. It
/// covers what RocksDB needs to open read-write (a new log, manifest,
/// options and info-log file, the previous log replayed into a table) and
/// GC's batch of deletions, for a store of some hundred thousand records.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// The reserve is made only when the filesystem has this many times its
/// size free: it must never be what fills the disk.
const RESERVE_ROOM: u64 = 4;

/// The held write lock of a store directory (an `flock` on `lock`).
pub(crate) struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Takes the write lock of the store at `root` (creating the store when
    /// the directory is new or empty), waiting for another writer.
    fn acquire(root: &Path, on_wait: &mut dyn FnMut(&str)) -> Result<StoreLock> {
        fs::create_dir_all(root).map_err(Error::io("create the store directory", root))?;
        // Refuse a directory that is not a store before writing anything in it.
        check_format(root, false)?;
        let lock_path = root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(Error::io("open", &lock_path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("`{holder}`")
                };
                on_wait(&format!(
                    "Waiting for the store at `{}`, held by {who}",
                    root.display()
                ));
                file.lock().map_err(Error::io("lock", &lock_path))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path)(e)),
        }
        let me = format!(
            "pid {} ({})",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(me.as_bytes());

        // Under the lock: two writers creating one store at once must not
        // both decide it is new (or read the other's half-written FORMAT).
        check_format(root, true)?;
        Ok(StoreLock { _file: file })
    }
}

/// What [`Store::repair`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Tables RocksDB could not read whole, set aside (kept for inspection).
    pub lost_tables: Vec<LostTable>,
    /// Records dropped because an object they name is gone.
    pub dropped: Vec<crate::Problem>,
}

/// A table set aside by a repair.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LostTable {
    /// Its path inside the store.
    pub file: String,
    /// The family it held, when the manifest could still be read.
    pub family: Option<String>,
    /// Moved to `db/lost/` because it could not be read whole; `false`:
    /// it was missing already.
    pub set_aside: bool,
}

fn list_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes free to an unprivileged writer on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Makes `<store>/reserve` ([`RESERVE_BYTES`], allocated, not sparse)
/// when it is missing and the filesystem has room for it several times
/// over. Returns whether the reserve is there.
pub(crate) fn make_reserve(root: &Path) -> Result<bool> {
    use std::os::unix::io::AsRawFd;
    let path = root.join("reserve");
    if path.exists() {
        return Ok(true);
    }
    if free_bytes(root).is_none_or(|free| free < RESERVE_ROOM * RESERVE_BYTES) {
        return Ok(false);
    }
    let tmp = root.join("reserve.tmp");
    let file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    // SAFETY: a valid descriptor, offset and length.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) };
    if rc != 0 {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("allocate", &tmp)(
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    drop(file);
    fs::rename(&tmp, &path).map_err(Error::io("write", &path))?;
    Ok(true)
}

/// Removes `<store>/reserve`, giving its space back to the filesystem.
fn release_reserve(root: &Path) -> Result<()> {
    for name in ["reserve", "reserve.tmp"] {
        let path = root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path)(e)),
        }
    }
    Ok(())
}

impl Store {
    /// Opens the store at `url`. In [`OpenMode::Write`], when another process
    /// holds the store, `on_wait` is called once with a message saying who,
    /// and the call blocks until the store is free.
    pub fn open(url: &StoreUrl, mode: OpenMode, on_wait: &mut dyn FnMut(&str)) -> Result<Store> {
        match url {
            StoreUrl::Memory => Ok(Store::memory()),
            StoreUrl::Local(root) => match mode {
                OpenMode::Write => Store::open_write(root, on_wait, false),
                OpenMode::Reclaim => Store::open_write(root, on_wait, true),
                OpenMode::Read => Store::open_read(root),
            },
        }
    }

    fn open_write(root: &Path, on_wait: &mut dyn FnMut(&str), reclaim: bool) -> Result<Store> {
        let lock = StoreLock::acquire(root, on_wait)?;
        if reclaim {
            release_reserve(root)?;
        }
        let blobs = FsBlobStore::open(root)?;
        blobs.sweep_staging()?;
        let meta = RocksMetaStore::open(&root.join("db"))?;
        if !reclaim {
            // Best effort: a store without its reserve still works, and
            // GC makes it again.
            let _ = make_reserve(root);
        }
        Ok(Store {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            root: Some(root.to_owned()),
            _lock: Some(Arc::new(lock)),
            publishing: Default::default(),
        })
    }

    /// Rebuilds the index of the store at `root` from what is readable
    /// (RocksDB's repair: tables that cannot be read whole, and the logs
    /// once replayed, are set aside in `db/lost/`), then drops every record
    /// that names an object no longer there, so that the index is
    /// consistent again. Says what was set aside and dropped.
    pub fn repair(root: &Path, on_wait: &mut dyn FnMut(&str)) -> Result<RepairReport> {
        if !root.join("db").join("CURRENT").exists() && !root.join("db").exists() {
            return Err(Error::NoStore {
                path: root.to_owned(),
            });
        }
        let lock = StoreLock::acquire(root, on_wait)?;
        // Repair writes a new manifest and tables: it needs the space too.
        release_reserve(root)?;
        let db = root.join("db");
        let lost_dir = db.join("lost");
        // What is damaged, and every table there is: after the repair, a
        // table no longer in `db/` was lost (set aside in `lost/`, or
        // missing already).
        let damaged = RocksMetaStore::check_tables(&db).unwrap_or_default();
        let families = RocksMetaStore::tables(&db);
        let mut before: Vec<String> = list_names(&db)
            .into_iter()
            .filter(|n| n.ends_with(".sst"))
            .collect();
        before.extend(damaged.iter().filter_map(|d| d.file.clone()));
        before.sort();
        before.dedup();
        let lost_before = list_names(&lost_dir);
        RocksMetaStore::repair(&db)?;
        let mut report = RepairReport::default();
        let lost_now = list_names(&lost_dir);
        for name in before {
            if !name.ends_with(".sst") || db.join(&name).exists() {
                continue;
            }
            let set_aside = lost_now.contains(&name) && !lost_before.contains(&name);
            report.lost_tables.push(LostTable {
                file: if set_aside {
                    format!("db/lost/{name}")
                } else {
                    format!("db/{name}")
                },
                family: families.get(&name).cloned(),
                set_aside,
            });
        }
        let blobs = FsBlobStore::open(root)?;
        blobs.sweep_staging()?;
        let meta = RocksMetaStore::open(&db)?;
        let store = Store {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            root: Some(root.to_owned()),
            _lock: Some(Arc::new(lock)),
            publishing: Default::default(),
        };
        report.dropped = store.drop_dangling()?;
        let _ = make_reserve(root);
        Ok(report)
    }

    fn open_read(root: &Path) -> Result<Store> {
        if !root.join("db").join("CURRENT").exists() {
            return Err(Error::NoStore {
                path: root.to_owned(),
            });
        }
        check_format(root, false)?;
        let blobs = FsBlobStore::open_read_only(root);
        let mut meta = RocksMetaStore::open_secondary(&root.join("db"))?;
        meta_refresh(&mut meta)?;
        Ok(Store {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            root: Some(root.to_owned()),
            _lock: None,
            publishing: Default::default(),
        })
    }
}

fn meta_refresh(meta: &mut RocksMetaStore) -> Result<()> {
    use crate::MetaStore;
    meta.refresh()?;
    // A reader must not take a damaged index for a smaller one.
    meta.check_view()
}

/// Checks the `FORMAT` file: a directory without one must be empty (but
/// for the lock), and then a writer holding the lock (`create`) writes it.
fn check_format(root: &Path, create: bool) -> Result<()> {
    let path = root.join("FORMAT");
    match fs::read_to_string(&path) {
        Ok(s) if s.lines().next() == Some(FORMAT_LINE) => Ok(()),
        Ok(s) => Err(Error::NotAStore {
            path: root.to_owned(),
            reason: format!(
                "its format is `{}`, this `ci` understands `{FORMAT_LINE}`; use a matching `ci` or another store",
                s.lines().next().unwrap_or("")
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let nonempty = fs::read_dir(root)
                .map_err(Error::io("list", root))?
                .any(|e| {
                    e.map(|e| !matches!(e.file_name().to_str(), Some("lock" | "FORMAT.tmp")))
                        .unwrap_or(true)
                });
            // A writer creating the store renames FORMAT in before it makes
            // anything else: content without FORMAT is a store made since
            // the read above only if FORMAT is there now.
            if nonempty && path.exists() {
                return check_format(root, create);
            }
            if nonempty {
                return Err(Error::NotAStore {
                    path: root.to_owned(),
                    reason: "the directory is not empty and is not a Strata store; choose an empty or new directory".to_owned(),
                });
            }
            if !create {
                return Ok(());
            }
            // Whole or absent, for readers that do not take the lock.
            let tmp = root.join("FORMAT.tmp");
            fs::write(&tmp, format!("{FORMAT_LINE}\n")).map_err(Error::io("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(Error::io("write", &path))
        }
        Err(e) => Err(Error::io("read", path)(e)),
    }
}
