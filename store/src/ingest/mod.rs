//! Ingest: a directory on disk becomes a layer.
//!
//! The walk is ours, one directory at a time, in parallel over
//! subdirectories (rayon): each entry is `stat`ed once, relative to its
//! directory's open descriptor. The directory cache (`dircache.rs`) makes
//! an unchanged tree cheap: a directory whose own signature matches its
//! record is not read again (the record lists its entries), a file whose
//! signature matches is not read, and a directory whose entries all match
//! keeps its tree digest without encoding or hashing anything. Files that
//! must be read are hashed in parallel, each streamed through BLAKE3 and
//! into a staged blob so memory stays bounded for any file size. Blobs are
//! made durable with one `sync` before the single batch that records the
//! trees, the layer and the new directory records.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::dircache::{has, Cached, DirRecord, StatSig};
use crate::records::check_ref_name;
use crate::{
    Batch, Digest, Entry, Error, Family, LayerStats, Lineage, Name, Result, Store, Target, Tree,
};

mod rules;

use rules::{Options, Rules};

/// Files up to this size are read whole; larger ones are streamed.
const SMALL_FILE: u64 = 1 << 20;
/// Read size when streaming large files.
const CHUNK: usize = 8 << 20;

/// How to ingest a directory.
#[derive(Clone, Debug, Default)]
pub struct IngestOptions {
    /// Honour `.gitignore`, `.git/info/exclude`, `.ignore` and `.ciignore`
    /// files, and leave out `.git` directories (a workspace ingest).
    pub ignore_files: bool,
    /// More patterns to leave out, in gitignore syntax, relative to the root.
    pub exclude: Vec<String>,
    /// Skip the directory cache (the stat cache): read every directory and
    /// hash every file, and record nothing for the next ingest.
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
    /// Files read and hashed (the rest came from the directory cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Blobs that were not in the store before.
    pub new_blobs: u64,
    pub new_blob_bytes: u64,
}

/// A directory record to put (`Some`) or delete (`None`), by its key.
type RecordWrite = (Vec<u8>, Option<Vec<u8>>);

/// A file that was read and hashed.
struct Hashed {
    digest: Digest,
    size: u64,
    new_blob: bool,
    /// The file did not change while it was read: its signature may be cached.
    stable: bool,
}

/// What one directory's visit gives its parent.
struct Visited {
    tree: Digest,
    stats: LayerStats,
    /// Its record was used as it is: nothing below it changed.
    unchanged: bool,
}

/// One kept entry of a directory being visited.
enum Child {
    File {
        sig: StatSig,
        executable: bool,
        digest: Option<Digest>,
    },
    Symlink {
        sig: StatSig,
        target: Option<Vec<u8>>,
    },
    Dir(Option<Visited>),
}

/// The state of one ingest, shared by the directories visited in parallel.
struct Walk<'a> {
    store: &'a Store,
    opts: Options,
    use_cache: bool,
    /// Directory path → its record, as read in one scan before the walk.
    cache: HashMap<Vec<u8>, Vec<u8>>,
    scan_start_ns: i64,
    /// Encoded trees (digest, bytes) and records (key, value) to write.
    trees: Mutex<Vec<(Digest, Vec<u8>)>>,
    records: Mutex<Vec<RecordWrite>>,
    hashed_files: AtomicU64,
    hashed_bytes: AtomicU64,
    /// Blobs new to the store (identical files hashed in parallel each saw
    /// theirs missing: counted once).
    new_blobs: Mutex<HashSet<Digest>>,
    new_blob_bytes: AtomicU64,
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
        let (rule_opts, root_rules) = Options::new(&root, opts.ignore_files, &opts.exclude)?;
        // The records under this root, read in one ordered scan (like git
        // reading its index) rather than one lookup per directory.
        let mut cache: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        if !opts.no_stat_cache {
            let key = root.as_os_str().as_bytes();
            if let Some(v) = self.meta.get(Family::DirCache, key)? {
                cache.insert(key.to_vec(), v);
            }
            let mut prefix = key.to_vec();
            prefix.push(b'/');
            self.meta.scan(Family::DirCache, &prefix, &mut |k, v| {
                cache.insert(k.to_vec(), v.to_vec());
                Ok(crate::Flow::Continue)
            })?;
        }
        let walk = Walk {
            store: self,
            opts: rule_opts,
            use_cache: !opts.no_stat_cache,
            cache,
            scan_start_ns,
            trees: Mutex::new(Vec::new()),
            records: Mutex::new(Vec::new()),
            hashed_files: AtomicU64::new(0),
            hashed_bytes: AtomicU64::new(0),
            new_blobs: Mutex::new(HashSet::new()),
            new_blob_bytes: AtomicU64::new(0),
        };
        let fd = open_dir(None, &root)?;
        let top = walk.visit(fd, root.clone(), &root_rules)?;

        let new_blobs = walk
            .new_blobs
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let report = IngestReport {
            layer: top.tree,
            stats: top.stats,
            hashed_files: walk.hashed_files.into_inner(),
            hashed_bytes: walk.hashed_bytes.into_inner(),
            new_blobs: new_blobs.len() as u64,
            new_blob_bytes: walk.new_blob_bytes.into_inner(),
        };
        if report.new_blobs > 0 {
            // Blobs first, durably; only then the records that name them.
            self.blobs.sync()?;
        }
        let mut batch = Batch::new();
        for (digest, bytes) in walk.trees.into_inner().unwrap_or_else(|p| p.into_inner()) {
            if !self.has_tree(&digest)? {
                batch.put(Family::Trees, digest.as_bytes().to_vec(), bytes);
            }
        }
        for (k, v) in walk.records.into_inner().unwrap_or_else(|p| p.into_inner()) {
            match v {
                Some(v) => batch.put(Family::DirCache, k, v),
                None => batch.delete(Family::DirCache, k),
            }
        }
        let layer = report.layer;
        let lineage = opts.lineage.clone().unwrap_or_else(|| Lineage {
            how: "add".into(),
            created: crate::records::now_secs(),
            ..Lineage::default()
        });
        if batch.is_empty() && self.already_recorded(&layer, &lineage, opts)? {
            // A no-op: the same layer made the same way. Its records stand
            // (with the time it was first made), and nothing is synced.
            return Ok(report);
        }
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
        Ok(report)
    }

    /// Whether `layer` is recorded with `lineage` (but for its time) and
    /// the ref `opts` names already points at it.
    fn already_recorded(
        &self,
        layer: &Digest,
        lineage: &Lineage,
        opts: &IngestOptions,
    ) -> Result<bool> {
        if self.layer(layer)?.is_none() {
            return Ok(false);
        }
        let same = self.lineage(layer)?.is_some_and(|old| {
            old == Lineage {
                created: old.created,
                ..lineage.clone()
            }
        });
        let ref_ok = match &opts.ref_name {
            None => true,
            Some(name) => {
                self.meta.get(Family::Refs, name.as_bytes())?.as_deref()
                    == Some(&layer.as_bytes()[..])
            }
        };
        Ok(same && ref_ok)
    }

    /// Reads and hashes the file at `path`, whose `lstat` gave `sig`, into
    /// the store.
    fn hash_file(&self, path: &Path, sig: &StatSig) -> Result<Hashed> {
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
            .map_err(Error::io("open", path))?;
        let (digest, size, new_blob) = if sig.size <= SMALL_FILE {
            let mut buf = Vec::with_capacity(sig.size as usize);
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
        let after = fstat(&file).map_err(Error::io("stat", path))?;
        Ok(Hashed {
            digest,
            size,
            new_blob,
            stable: StatSig::of_stat(&after) == *sig && size == sig.size,
        })
    }
}

impl Walk<'_> {
    /// Visits the directory open as `fd` at `path`, whose parent's children
    /// are ruled by `rules`: its tree (staged when new) and its stats.
    fn visit(&self, fd: OwnedFd, path: PathBuf, rules: &Rules) -> Result<Visited> {
        let st = fstat_fd(&fd).map_err(Error::io("stat", &path))?;
        let sig = StatSig::of_stat(&st);
        let key = path.as_os_str().as_bytes();
        let old = if self.use_cache {
            self.cache.get(key).and_then(|v| DirRecord::decode(v))
        } else {
            None
        };
        let trusted = old.as_ref().filter(|r| sig.trusts(&r.sig, r.cached_at_ns));
        // A trusted record lists the entries and says which ignore files
        // are there; else the directory is read.
        let (mut listing, present) = match trusted {
            Some(r) => (None, r.ignore_files),
            None => {
                let names = read_dir(&path)?;
                let present = present_of(&names);
                (Some(names), present)
            }
        };
        let rules = rules.child(&self.opts, &path, present)?;
        let from_record = trusted.filter(|r| r.rules == rules.digest);
        // Entries are trusted against the time their record was written.
        let at = old.as_ref().map_or(0, |r| r.cached_at_ns);

        let mut children: Vec<(Vec<u8>, Child)> = Vec::new();
        let mut ok = false;
        if let Some(r) = from_record.filter(|_| listing.is_none()) {
            ok = self.children_from_record(&fd, &path, r, at, &mut children)?;
        }
        if !ok {
            children.clear();
            let known: HashMap<&[u8], &Cached> =
                old.as_ref().map(|r| r.by_name()).unwrap_or_default();
            let names = match listing.take() {
                Some(n) => n,
                None => read_dir(&path)?,
            };
            for name in names {
                let child = path.join(std::ffi::OsStr::from_bytes(&name));
                let st = match stat_at(&fd, &name) {
                    Ok(st) => st,
                    // Removed since the listing: as if it had not been there.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(Error::io("stat", &child)(e)),
                };
                let fmt = st.st_mode & libc::S_IFMT;
                if self
                    .opts
                    .ignored(&rules, &name, &child, fmt == libc::S_IFDIR)
                {
                    continue;
                }
                let c = child_of(&st, &child, known.get(name.as_slice()).copied(), at)?;
                children.push((name, c));
            }
        }
        let from_record = from_record.filter(|_| ok);

        // Hash what must be hashed and visit subdirectories, in parallel.
        let work: Vec<usize> = (0..children.len())
            .filter(|&i| match &children[i].1 {
                Child::File { digest, .. } => digest.is_none(),
                Child::Dir(_) => true,
                Child::Symlink { .. } => false,
            })
            .collect();
        let done: Vec<(usize, Result<Done>)> = work
            .into_par_iter()
            .map(|i| {
                let (name, c) = &children[i];
                let child = path.join(std::ffi::OsStr::from_bytes(name));
                let r = match c {
                    Child::File { sig, .. } => self.hash(&child, sig).map(Done::File),
                    _ => open_dir(Some(&fd), &child)
                        .and_then(|sub| self.visit(sub, child, &rules))
                        .map(Done::Dir),
                };
                (i, r)
            })
            .collect();
        let mut unchanged = from_record.is_some();
        for (i, r) in done {
            match (&mut children[i].1, r?) {
                (Child::File { sig, digest, .. }, Done::File((d, stable))) => {
                    *digest = Some(d);
                    if !stable {
                        *sig = StatSig::NEVER;
                    }
                    unchanged = false;
                }
                (Child::Dir(v), Done::Dir(sub)) => {
                    unchanged &= sub.unchanged;
                    *v = Some(sub);
                }
                _ => {}
            }
        }
        if let (true, Some(r)) = (unchanged, from_record) {
            return Ok(Visited {
                tree: r.tree,
                stats: r.stats,
                unchanged: true,
            });
        }
        self.finish_dir(&path, sig, &rules, present, children, old.as_ref())
    }

    /// The entries a trusted record lists, each `stat`ed again; `false`
    /// when one is gone or changed kind (the directory is then read).
    fn children_from_record(
        &self,
        fd: &OwnedFd,
        path: &Path,
        r: &DirRecord,
        at: i64,
        out: &mut Vec<(Vec<u8>, Child)>,
    ) -> Result<bool> {
        for (name, cached) in &r.entries {
            let st = match stat_at(fd, name) {
                Ok(st) => st,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {
                    return Ok(false)
                }
                Err(e) => {
                    let child = path.join(std::ffi::OsStr::from_bytes(name));
                    return Err(Error::io("stat", &child)(e));
                }
            };
            let fmt = st.st_mode & libc::S_IFMT;
            let same_kind = matches!(
                (cached, fmt),
                (Cached::File { .. }, libc::S_IFREG)
                    | (Cached::Symlink { .. }, libc::S_IFLNK)
                    | (Cached::Dir, libc::S_IFDIR)
            );
            if !same_kind {
                return Ok(false);
            }
            // The path is made only when it is needed (a symlink to read).
            let c = match (cached, fmt) {
                (Cached::File { .. }, _) | (Cached::Dir, _) => {
                    child_of(&st, Path::new(""), Some(cached), at)?
                }
                _ => child_of(
                    &st,
                    &path.join(std::ffi::OsStr::from_bytes(name)),
                    Some(cached),
                    at,
                )?,
            };
            out.push((name.clone(), c));
        }
        Ok(true)
    }
}

/// One entry from its `lstat`, with what the old record knew of it when its
/// signature is trusted. `path` is read only for a symlink whose target is
/// not known and to name an entry of an unsupported kind.
fn child_of(st: &libc::stat, path: &Path, cached: Option<&Cached>, at: i64) -> Result<Child> {
    let sig = StatSig::of_stat(st);
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let executable = st.st_mode & 0o100 != 0;
            let digest = match cached {
                Some(Cached::File {
                    sig: s,
                    executable: x,
                    digest,
                }) if *x == executable && sig.trusts(s, at) => Some(*digest),
                _ => None,
            };
            Child::File {
                sig,
                executable,
                digest,
            }
        }
        libc::S_IFLNK => {
            let target = match cached {
                Some(Cached::Symlink { sig: s, target }) if sig.trusts(s, at) => {
                    Some(target.clone())
                }
                _ => None,
            };
            let target = match target {
                Some(t) => t,
                None => std::fs::read_link(path)
                    .map_err(Error::io("read the symlink", path))?
                    .into_os_string()
                    .into_vec(),
            };
            Child::Symlink {
                sig,
                target: Some(target),
            }
        }
        libc::S_IFDIR => Child::Dir(None),
        _ => {
            let meta = std::fs::symlink_metadata(path).map_err(Error::io("stat", path))?;
            return Err(Error::unsupported_file(path, meta.file_type()));
        }
    })
}

impl Walk<'_> {
    /// Hashes one file, counting it.
    fn hash(&self, path: &Path, sig: &StatSig) -> Result<(Digest, bool)> {
        let h = self.store.hash_file(path, sig)?;
        self.hashed_files.fetch_add(1, Ordering::Relaxed);
        self.hashed_bytes.fetch_add(h.size, Ordering::Relaxed);
        if h.new_blob
            && self
                .new_blobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(h.digest)
        {
            self.new_blob_bytes.fetch_add(h.size, Ordering::Relaxed);
        }
        Ok((h.digest, h.stable && h.size == sig.size))
    }

    /// Builds the tree of a directory that changed (or had no record),
    /// stages it, and stages its new record.
    fn finish_dir(
        &self,
        path: &Path,
        sig: StatSig,
        rules: &Rules,
        present: u8,
        children: Vec<(Vec<u8>, Child)>,
        old: Option<&DirRecord>,
    ) -> Result<Visited> {
        let bad_name = |name: &[u8]| {
            let shown = path.join(std::ffi::OsStr::from_bytes(name));
            move |e: Error| match e {
                Error::BadName { reason, .. } => Error::BadName {
                    name: shown.display().to_string(),
                    reason,
                },
                other => other,
            }
        };
        let mut stats = LayerStats::default();
        let mut entries = Vec::with_capacity(children.len());
        let mut cached = Vec::with_capacity(children.len());
        for (name, c) in children {
            let (entry, record) = match c {
                Child::File {
                    sig,
                    executable,
                    digest: Some(digest),
                } => {
                    stats.files += 1;
                    stats.bytes += sig.size;
                    (
                        Entry::File {
                            digest,
                            size: sig.size,
                            executable,
                        },
                        Cached::File {
                            sig,
                            executable,
                            digest,
                        },
                    )
                }
                Child::Symlink {
                    sig,
                    target: Some(target),
                } => {
                    stats.symlinks += 1;
                    let t = Target::new(target.clone()).map_err(bad_name(&name))?;
                    (
                        Entry::Symlink { target: t },
                        Cached::Symlink { sig, target },
                    )
                }
                Child::Dir(Some(sub)) => {
                    stats.dirs += 1 + sub.stats.dirs;
                    stats.files += sub.stats.files;
                    stats.symlinks += sub.stats.symlinks;
                    stats.bytes += sub.stats.bytes;
                    (Entry::Dir { digest: sub.tree }, Cached::Dir)
                }
                _ => {
                    return Err(Error::CorruptTree {
                        reason: "an entry was left unresolved by the walk",
                    })
                }
            };
            let n = Name::new(name.clone()).map_err(bad_name(&name))?;
            entries.push((n, entry));
            cached.push((name, record));
        }
        // Sizes come from `stat`; a file that changed size while it was read
        // keeps the size of the bytes hashed.
        let tree = Tree::from_entries(entries).map_err(|e| match e {
            Error::BadName { name, reason } => Error::BadName {
                name: path.join(name).display().to_string(),
                reason,
            },
            other => other,
        })?;
        let bytes = tree.encode();
        let digest = Digest::of(&bytes);
        self.trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((digest, bytes));
        if self.use_cache {
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            // Subdirectories that are gone take their records with them.
            if let Some(old) = old {
                for (name, c) in &old.entries {
                    let still = cached
                        .iter()
                        .any(|(n, k)| n == name && matches!(k, Cached::Dir));
                    if matches!(c, Cached::Dir) && !still {
                        let mut gone = path.as_os_str().as_bytes().to_vec();
                        gone.push(b'/');
                        gone.extend_from_slice(name);
                        let mut below = gone.clone();
                        below.push(b'/');
                        for k in self.cache.keys().filter(|k| k.starts_with(&below)) {
                            records.push((k.clone(), None));
                        }
                        records.push((gone, None));
                    }
                }
            }
            cached.sort_by(|a, b| a.0.cmp(&b.0));
            let record = DirRecord {
                cached_at_ns: self.scan_start_ns,
                rules: rules.digest,
                sig,
                tree: digest,
                stats,
                ignore_files: present,
                entries: cached,
            };
            records.push((path.as_os_str().as_bytes().to_vec(), Some(record.encode())));
        }
        Ok(Visited {
            tree: digest,
            stats,
            unchanged: false,
        })
    }
}

/// What the parallel part of a directory's visit gives back.
enum Done {
    File((Digest, bool)),
    Dir(Visited),
}

/// Which ignore files (and `.git`) are among `names`.
fn present_of(names: &[Vec<u8>]) -> u8 {
    let mut p = 0;
    for n in names {
        p |= match n.as_slice() {
            b".gitignore" => has::GITIGNORE,
            b".ignore" => has::IGNORE,
            b".ciignore" => has::CIIGNORE,
            b".git" => has::GIT,
            _ => 0,
        };
    }
    p
}

/// Every name in the directory at `path`.
fn read_dir(path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(path).map_err(Error::io("read the directory", path))? {
        let e = e.map_err(Error::io("read the directory", path))?;
        names.push(e.file_name().into_vec());
    }
    Ok(names)
}

/// Opens a directory (relative to `parent` when given) without following
/// a symlink in its last component.
fn open_dir(parent: Option<&OwnedFd>, path: &Path) -> Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let (dirfd, name) = match parent {
        Some(p) => (p.as_raw_fd(), path.file_name().unwrap_or(path.as_os_str())),
        None => (libc::AT_FDCWD, path.as_os_str()),
    };
    let c = CString::new(name.as_bytes()).map_err(|_| Error::BadName {
        name: path.display().to_string(),
        reason: "the name holds a NUL byte",
    })?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::io("open", path)(std::io::Error::last_os_error()));
    }
    // SAFETY: `openat` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `lstat` of `name` in the directory open as `dir`.
fn stat_at(dir: &OwnedFd, name: &[u8]) -> std::io::Result<libc::stat> {
    let c = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` is large enough for a `stat`.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fstatat` succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

fn fstat_raw(fd: i32) -> std::io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is large enough for a `stat`; a bad descriptor is EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fstat` succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

fn fstat(f: &File) -> std::io::Result<libc::stat> {
    fstat_raw(f.as_raw_fd())
}

fn fstat_fd(f: &OwnedFd) -> std::io::Result<libc::stat> {
    fstat_raw(f.as_raw_fd())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
