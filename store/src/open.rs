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
}

/// The held write lock of a store directory (an `flock` on `lock`).
pub(crate) struct StoreLock {
    _file: File,
}

impl Store {
    /// Opens the store at `url`. In [`OpenMode::Write`], when another process
    /// holds the store, `on_wait` is called once with a message saying who,
    /// and the call blocks until the store is free.
    pub fn open(url: &StoreUrl, mode: OpenMode, on_wait: &mut dyn FnMut(&str)) -> Result<Store> {
        match url {
            StoreUrl::Memory => Ok(Store::memory()),
            StoreUrl::Local(root) => match mode {
                OpenMode::Write => Store::open_write(root, on_wait),
                OpenMode::Read => Store::open_read(root),
            },
        }
    }

    fn open_write(root: &Path, on_wait: &mut dyn FnMut(&str)) -> Result<Store> {
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
        let blobs = FsBlobStore::open(root)?;
        blobs.sweep_staging()?;
        let meta = RocksMetaStore::open(&root.join("db"))?;
        Ok(Store {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            root: Some(root.to_owned()),
            _lock: Some(Arc::new(StoreLock { _file: file })),
            publishing: Default::default(),
        })
    }

    fn open_read(root: &Path) -> Result<Store> {
        if !root.join("db").join("CURRENT").exists() {
            return Err(Error::NoStore {
                path: root.to_owned(),
            });
        }
        check_format(root, false)?;
        let blobs = FsBlobStore::open_read_only(root);
        let meta = RocksMetaStore::open_secondary(&root.join("db"))?;
        meta_refresh(&meta)?;
        Ok(Store {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            root: Some(root.to_owned()),
            _lock: None,
            publishing: Default::default(),
        })
    }
}

fn meta_refresh(meta: &RocksMetaStore) -> Result<()> {
    use crate::MetaStore;
    meta.refresh()
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
