//! Ingest: a directory on disk becomes a layer.
//!
//! A parallel walk (crate `ignore`) collects every entry; files are hashed
//! in parallel (rayon), each streamed through BLAKE3 and into a staged blob
//! so memory stays bounded for any file size. A stat cache (path, size,
//! mtime, ctime, inode, device → digest) lets an unchanged file skip the read.
//! Blobs are made durable with one `sync` before the single batch that
//! records the trees, the layer and the stat-cache entries.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::builder::TreeBuilder;
use crate::records::check_ref_name;
use crate::{
    Batch, Digest, Entry, Error, Family, LayerStats, Lineage, Name, Result, Store, Target,
};

/// Files up to this size are read whole; larger ones are streamed.
const SMALL_FILE: u64 = 1 << 20;
/// Read size when streaming large files.
const CHUNK: usize = 8 << 20;
/// A stat-cache entry is trusted only for files last changed at least this
/// long before the entry was written (timestamps are coarse; see FORMAT.md).
const RACY_MARGIN_NS: i64 = 1_000_000_000;

/// How to ingest a directory.
#[derive(Clone, Debug, Default)]
pub struct IngestOptions {
    /// Honour `.gitignore`, `.git/info/exclude`, `.ignore` and `.ciignore`
    /// files, and leave out `.git` directories (a workspace ingest).
    pub ignore_files: bool,
    /// More patterns to leave out, in gitignore syntax, relative to the root.
    pub exclude: Vec<String>,
    /// Skip the stat cache: read and hash every file.
    pub no_stat_cache: bool,
    /// Lineage recorded with the new layer.
    pub lineage: Option<Lineage>,
    /// Point this ref at the new layer, in the same write.
    pub ref_name: Option<String>,
}

/// What an ingest did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestReport {
    pub layer: Digest,
    pub stats: LayerStats,
    /// Files read and hashed (the rest came from the stat cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Blobs that were not in the store before.
    pub new_blobs: u64,
    pub new_blob_bytes: u64,
}

struct Item {
    path: PathBuf,
    meta: Metadata,
}

struct Hashed {
    digest: Digest,
    size: u64,
    from_cache: bool,
    new_blob: bool,
    cache_value: Option<Vec<u8>>,
}

impl Store {
    /// Snapshots the directory `dir` as a layer and records it.
    ///
    /// Symlinks are stored as links and never followed; sockets, FIFOs and
    /// devices are refused with [`Error::UnsupportedFileType`] naming the path.
    /// On any error nothing is recorded (blobs already written stay as
    /// unreferenced garbage for GC).
    pub fn ingest(&self, dir: &Path, opts: &IngestOptions) -> Result<IngestReport> {
        if let Some(name) = &opts.ref_name {
            check_ref_name(name)?;
        }
        self.check_writable()?;
        let _hold = self.hold();
        let root = std::fs::canonicalize(dir).map_err(Error::io("open", dir))?;
        let root_meta = std::fs::metadata(&root).map_err(Error::io("stat", &root))?;
        if !root_meta.is_dir() {
            return Err(Error::NotADirectory {
                path: dir.to_owned(),
            });
        }
        let scan_start_ns = now_ns();
        let items = walk(&root, opts)?;

        let mut builder = TreeBuilder::new();
        let root_len = root.as_os_str().as_bytes().len();
        let mut files: Vec<(&[u8], Name, &Item)> = Vec::new();
        for item in &items {
            // `root/a/b/c` → `a/b/c`: the walk only yields paths below the root.
            let full = item.path.as_os_str().as_bytes();
            let rel = full.get(root_len + 1..).unwrap_or_default();
            let (parent, name) = match rel.iter().rposition(|b| *b == b'/') {
                Some(i) => (&rel[..i], &rel[i + 1..]),
                None => (&b""[..], rel),
            };
            let ft = item.meta.file_type();
            if ft.is_dir() {
                builder.add_dir_bytes(rel);
                continue;
            }
            let name = Name::new(name).map_err(|e| match e {
                Error::BadName { reason, .. } => Error::BadName {
                    name: item.path.display().to_string(),
                    reason,
                },
                other => other,
            })?;
            if ft.is_symlink() {
                let target = std::fs::read_link(&item.path)
                    .map_err(Error::io("read the symlink", &item.path))?;
                let target = Target::new(target.as_os_str().as_bytes()).map_err(|e| match e {
                    Error::BadName { reason, .. } => Error::BadName {
                        name: item.path.display().to_string(),
                        reason,
                    },
                    other => other,
                })?;
                builder.add_at(parent, name, Entry::Symlink { target });
            } else if ft.is_file() {
                files.push((parent, name, item));
            } else {
                return Err(Error::unsupported_file(&item.path, ft));
            }
        }

        // The stat-cache entries under this root, read in one ordered scan
        // (like git reading its index) rather than one lookup per file.
        let mut cache: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        if !opts.no_stat_cache {
            let mut prefix = root.as_os_str().as_bytes().to_vec();
            prefix.push(b'/');
            self.meta.scan(Family::StatCache, &prefix, &mut |k, v| {
                cache.insert(k.to_vec(), v.to_vec());
                Ok(crate::Flow::Continue)
            })?;
        }
        let hashed: Vec<Result<Hashed>> = files
            .par_iter()
            .map(|(_, _, item)| self.hash_file(item, &cache, opts, scan_start_ns))
            .collect();

        let mut report = IngestReport {
            layer: Digest::of(b""),
            stats: LayerStats::default(),
            hashed_files: 0,
            hashed_bytes: 0,
            new_blobs: 0,
            new_blob_bytes: 0,
        };
        let mut batch = Batch::new();
        // Identical new files hashed in parallel each saw their blob missing.
        let mut counted = std::collections::HashSet::new();
        for ((parent, name, item), h) in files.into_iter().zip(hashed) {
            let h = h?;
            if !h.from_cache {
                report.hashed_files += 1;
                report.hashed_bytes += h.size;
            }
            if h.new_blob && counted.insert(h.digest) {
                report.new_blobs += 1;
                report.new_blob_bytes += h.size;
            }
            if let Some(v) = h.cache_value {
                batch.put(
                    Family::StatCache,
                    item.path.as_os_str().as_bytes().to_vec(),
                    v,
                );
            }
            let executable = item.meta.mode() & 0o100 != 0;
            builder.add_at(
                parent,
                name,
                Entry::File {
                    digest: h.digest,
                    size: h.size,
                    executable,
                },
            );
        }
        if report.new_blobs > 0 {
            // Blobs first, durably; only then the records that name them.
            self.blobs.sync()?;
        }
        report.stats = builder.stats();
        let layer = builder.finish(self, &mut batch)?;
        let lineage = opts.lineage.clone().unwrap_or_else(|| Lineage {
            how: "add".into(),
            created: crate::records::now_secs(),
            ..Lineage::default()
        });
        self.stage_layer(&mut batch, &layer, report.stats, Some(&lineage))?;
        if let Some(name) = &opts.ref_name {
            batch.put(
                Family::Refs,
                name.as_bytes().to_vec(),
                layer.as_bytes().to_vec(),
            );
        }
        self.meta.write(batch)?;
        self.meta.sync()?;
        report.layer = layer;
        Ok(report)
    }

    fn hash_file(
        &self,
        item: &Item,
        cache: &HashMap<Vec<u8>, Vec<u8>>,
        opts: &IngestOptions,
        scan_start_ns: i64,
    ) -> Result<Hashed> {
        let key = item.path.as_os_str().as_bytes();
        let stat = StatKey::of(&item.meta);
        if !opts.no_stat_cache {
            if let Some(v) = cache.get(key) {
                if let Some(digest) = stat.matches(v) {
                    return Ok(Hashed {
                        digest,
                        size: stat.size,
                        from_cache: true,
                        new_blob: false,
                        cache_value: None,
                    });
                }
            }
        }
        let path = &item.path;
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
            .map_err(Error::io("open", path))?;
        let (digest, size, new_blob) = if stat.size <= SMALL_FILE {
            let mut buf = Vec::with_capacity(stat.size as usize);
            file.read_to_end(&mut buf)
                .map_err(Error::io("read", path))?;
            // Hashed once: the store is told the digest rather than re-hashing.
            let digest = Digest::of(&buf);
            let new_blob = self.blobs.put_hashed(&digest, &buf)?;
            (digest, buf.len() as u64, new_blob)
        } else {
            let mut w = self.blobs.writer()?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf).map_err(Error::io("read", path))?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])
                    .map_err(Error::io("write the blob of", path))?;
            }
            let staged = w.finish()?;
            let (digest, size) = (staged.digest(), staged.size());
            let new_blob = !self.blobs.contains(&digest)?;
            staged.publish()?;
            (digest, size, new_blob)
        };
        // Cache only what did not change while we read it.
        let after = file.metadata().map_err(Error::io("stat", path))?;
        let cache_value = (!opts.no_stat_cache && StatKey::of(&after) == stat && size == stat.size)
            .then(|| stat.encode(scan_start_ns, &digest));
        Ok(Hashed {
            digest,
            size,
            from_cache: false,
            new_blob,
            cache_value,
        })
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The stat fields that must all match for a cached digest to be trusted.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StatKey {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

impl StatKey {
    fn of(m: &Metadata) -> StatKey {
        StatKey {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// Value layout: size, mtime, ctime, inode, device, cached-at (each 8
    /// bytes little-endian), then the 32-byte digest.
    fn encode(&self, cached_at_ns: i64, digest: &Digest) -> Vec<u8> {
        let mut v = Vec::with_capacity(80);
        for x in [
            self.size,
            self.mtime_ns as u64,
            self.ctime_ns as u64,
            self.ino,
            self.dev,
            cached_at_ns as u64,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(digest.as_bytes());
        v
    }

    fn matches(&self, v: &[u8]) -> Option<Digest> {
        if v.len() != 80 {
            return None;
        }
        let f = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let cached_at = f(5) as i64;
        let same = f(0) == self.size
            && f(1) as i64 == self.mtime_ns
            && f(2) as i64 == self.ctime_ns
            && f(3) == self.ino
            && f(4) == self.dev;
        // A file changed within the margin before the entry was written could
        // have changed again without moving its timestamps: not trusted.
        let settled = self.mtime_ns.max(self.ctime_ns) < cached_at - RACY_MARGIN_NS;
        (same && settled)
            .then(|| Digest::from_slice(&v[48..80]))
            .flatten()
    }
}

/// Walks `root` in parallel; returns every entry below it with its `lstat`.
fn walk(root: &Path, opts: &IngestOptions) -> Result<Vec<Item>> {
    let mut wb = ignore::WalkBuilder::new(root);
    wb.standard_filters(false)
        .follow_links(false)
        .threads(rayon::current_num_threads());
    if opts.ignore_files {
        wb.git_ignore(true)
            .git_exclude(true)
            .ignore(true)
            .require_git(false)
            .add_custom_ignore_filename(".ciignore")
            .filter_entry(|e| e.file_name() != ".git");
    }
    if !opts.exclude.is_empty() {
        let mut ob = ignore::overrides::OverrideBuilder::new(root);
        for p in &opts.exclude {
            ob.add(&format!("!{p}"))
                .map_err(|source| Error::BadPattern {
                    pattern: p.clone(),
                    source,
                })?;
        }
        let ov = ob.build().map_err(|source| Error::BadPattern {
            pattern: opts.exclude.join(", "),
            source,
        })?;
        wb.overrides(ov);
    }
    let items = Mutex::new(Vec::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    wb.build_parallel().run(|| {
        Box::new(|res| {
            let fail = |e: Error| {
                let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert(e);
                ignore::WalkState::Quit
            };
            let entry = match res {
                Ok(e) => e,
                Err(source) => return fail(Error::Walk { source }),
            };
            if entry.depth() == 0 {
                return ignore::WalkState::Continue;
            }
            let meta = match std::fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) => return fail(Error::io("stat", entry.path())(e)),
            };
            items.lock().unwrap_or_else(|p| p.into_inner()).push(Item {
                path: entry.into_path(),
                meta,
            });
            ignore::WalkState::Continue
        })
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(items.into_inner().unwrap_or_else(|p| p.into_inner()))
}
