//! Capture: a work directory becomes a layer.
//!
//! For an overlay the upper directory holds exactly the changes: whiteouts
//! (deleted paths), opaque directories (replaced wholesale) and copied-up or
//! new entries. Those become edits of the base tree ([`Store::edit`]). For a
//! plain copy the whole directory is read, like an ingest.
//!
//! Either way the result is the tree an ingest of the final directory would
//! give: same encoding, executable bit = owner-exec bit, symlinks as links,
//! empty directories kept, hard links as separate copies. Blobs are made
//! durable with one `sync` before any tree naming them is written.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use strata_store::{Adopted, Digest, Entry, Name, RelPath, Store, Target, Tree};

use crate::{sys, Error, Result};

/// Captures with fewer files than this store them on the calling thread.
const PARALLEL_FILES: usize = 8;

/// Files up to this size are read whole; larger ones are streamed.
const SMALL_FILE: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;

/// Which overlay wrote an upper directory: they mark changes differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upper {
    /// Kernel overlayfs: whiteouts are 0:0 character devices, opaque
    /// directories carry `trusted.overlay.opaque=y` (`user.overlay.opaque`
    /// on `userxattr` mounts).
    Kernel,
    /// fuse-overlayfs: the same as root, and as an ordinary user `.wh.NAME`
    /// files, `.wh..wh..opq` markers and `user.fuseoverlayfs.opaque`.
    FuseOverlayfs,
}

/// How a scanned directory is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// An ordinary directory: every entry is content.
    Plain,
    /// Part of an upper directory: overlay markers are not content.
    Upper(Upper),
}

enum Item {
    File { slot: usize, executable: bool },
    Symlink(Target),
    Dir(Vec<(Name, Item)>),
}

/// Files to hash, deduplicated by inode (hard links are hashed once).
#[derive(Default)]
struct Files {
    paths: Vec<PathBuf>,
    by_inode: HashMap<(u64, u64), usize>,
}

impl Files {
    fn add(&mut self, path: PathBuf, meta: &std::fs::Metadata) -> usize {
        let key = (meta.dev(), meta.ino());
        if let Some(slot) = self.by_inode.get(&key) {
            return *slot;
        }
        self.paths.push(path);
        let slot = self.paths.len() - 1;
        self.by_inode.insert(key, slot);
        slot
    }
}

fn name_of(path: &Path, raw: &std::ffi::OsStr) -> Result<Name> {
    Name::new(raw.as_bytes()).map_err(|e| match e {
        strata_store::Error::BadName { reason, .. } => strata_store::Error::BadName {
            name: path.display().to_string(),
            reason,
        }
        .into(),
        other => other.into(),
    })
}

fn is_whiteout_dev(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// fuse-overlayfs bookkeeping names: `.wh.NAME` whiteouts and opaque markers.
const WH_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKERS: [&[u8]; 2] = [b".wh..wh..opq", b".wh..opq"];

fn xattr_is(path: &Path, name: &str, value: &[u8]) -> Result<bool> {
    Ok(sys::lgetxattr(path, name)
        .map_err(Error::io("read extended attributes of", path))?
        .is_some_and(|v| v == value))
}

fn is_opaque(dir: &Path, upper: Upper) -> Result<bool> {
    for attr in [
        "trusted.overlay.opaque",
        "user.overlay.opaque",
        "user.fuseoverlayfs.opaque",
    ] {
        if xattr_is(dir, attr, b"y")? {
            return Ok(true);
        }
    }
    if upper == Upper::FuseOverlayfs {
        for m in OPAQUE_MARKERS {
            if std::fs::symlink_metadata(dir.join(std::ffi::OsStr::from_bytes(m))).is_ok() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn has_redirect(dir: &Path) -> Result<bool> {
    for attr in ["trusted.overlay.redirect", "user.overlay.redirect"] {
        if sys::lgetxattr(dir, attr)
            .map_err(Error::io("read extended attributes of", dir))?
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(std::ffi::OsString, PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let entry = entry.map_err(Error::io("list", dir))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        out.push((entry.file_name(), path, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads a whole directory as new content.
fn scan_full(dir: &Path, mode: Mode, files: &mut Files) -> Result<Vec<(Name, Item)>> {
    let mut out = Vec::new();
    for (raw, path, meta) in read_dir_sorted(dir)? {
        if let Mode::Upper(upper) = mode {
            // Inside a new or opaque directory nothing of the base shows
            // through, so deletion markers have nothing to delete.
            if is_whiteout_dev(&meta) {
                continue;
            }
            if upper == Upper::FuseOverlayfs && raw.as_bytes().starts_with(WH_PREFIX) {
                continue;
            }
        }
        let name = name_of(&path, &raw)?;
        let ft = meta.file_type();
        let item = if ft.is_dir() {
            Item::Dir(scan_full(&path, mode, files)?)
        } else if ft.is_symlink() {
            Item::Symlink(read_target(&path)?)
        } else if ft.is_file() {
            Item::File {
                slot: files.add(path, &meta),
                executable: meta.mode() & 0o100 != 0,
            }
        } else {
            return Err(Error::UnsupportedFileType {
                path,
                kind: strata_store::special_file_kind(ft),
            });
        };
        out.push((name, item));
    }
    Ok(out)
}

fn read_target(path: &Path) -> Result<Target> {
    let t = std::fs::read_link(path).map_err(Error::io("read the symlink", path))?;
    Target::new(t.as_os_str().as_bytes()).map_err(|e| match e {
        strata_store::Error::BadName { reason, .. } => strata_store::Error::BadName {
            name: path.display().to_string(),
            reason,
        }
        .into(),
        other => other.into(),
    })
}

/// A change found in an upper directory.
enum Change {
    Remove,
    Set(Item),
}

/// Walks one upper directory at `rel` against the base directory `base`
/// (its tree digest; `None` when the base has no directory there).
#[allow(clippy::too_many_arguments)]
fn scan_upper(
    store: &Store,
    upper_dir: &Path,
    merged_dir: &Path,
    rel: &RelPath,
    base: Option<Digest>,
    upper: Upper,
    files: &mut Files,
    out: &mut Vec<(RelPath, Change)>,
) -> Result<()> {
    let base_tree = match base {
        Some(d) => store.tree(&d)?,
        None => Tree::empty(),
    };
    for (raw, path, meta) in read_dir_sorted(upper_dir)? {
        let bytes = raw.as_bytes();
        if upper == Upper::FuseOverlayfs && bytes.starts_with(WH_PREFIX) {
            if OPAQUE_MARKERS.contains(&bytes) {
                continue;
            }
            let target = std::ffi::OsStr::from_bytes(&bytes[WH_PREFIX.len()..]);
            let name = name_of(&path, target)?;
            if base_tree.get(name.as_bytes()).is_some() {
                out.push((rel.join(name), Change::Remove));
            }
            continue;
        }
        let name = name_of(&path, &raw)?;
        let at = rel.join(name.clone());
        if is_whiteout_dev(&meta) {
            if base_tree.get(name.as_bytes()).is_some() {
                out.push((at, Change::Remove));
            }
            continue;
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            let base_dir = base_tree.get(name.as_bytes()).and_then(Entry::dir_digest);
            let merged = merged_dir.join(&raw);
            if has_redirect(&path)? {
                // Its content lives elsewhere in the lower layers: read the
                // merged view. (Work directories mount with
                // redirect_dir=off, so this is only a safety net.)
                out.push((
                    at,
                    Change::Set(Item::Dir(scan_full(&merged, Mode::Plain, files)?)),
                ));
            } else if base_dir.is_none() || is_opaque(&path, upper)? {
                out.push((
                    at,
                    Change::Set(Item::Dir(scan_full(&path, Mode::Upper(upper), files)?)),
                ));
            } else {
                scan_upper(store, &path, &merged, &at, base_dir, upper, files, out)?;
            }
        } else if ft.is_symlink() {
            out.push((at, Change::Set(Item::Symlink(read_target(&path)?))));
        } else if ft.is_file() {
            let slot = files.add(path, &meta);
            out.push((
                at,
                Change::Set(Item::File {
                    slot,
                    executable: meta.mode() & 0o100 != 0,
                }),
            ));
        } else {
            return Err(Error::UnsupportedFileType {
                path,
                kind: strata_store::special_file_kind(ft),
            });
        }
    }
    Ok(())
}

/// Writes a file's bytes as a blob (published, not yet synced). With
/// `adopt` (the file is in a work directory about to be emptied) a file
/// nothing else has open or links to, and that this process owns, is moved
/// into the store rather than copied: a write lease, held from before hashing until the move, proves
/// that no one can change the bytes in between.
fn store_file(store: &Store, path: &Path, adopt: bool) -> Result<(Digest, u64)> {
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(Error::io("open", path))?;
    let meta = f.metadata().map_err(Error::io("stat", path))?;
    let len = meta.len();
    // Only a file this process owns: its owner could otherwise make the
    // blob writable again (a task running as another user).
    let ours = meta.uid() == sys::euid();
    let leased = adopt && ours && meta.is_file() && meta.nlink() == 1 && sys::take_write_lease(&f);
    let stored = store_open_file(store, &mut f, path, len, leased);
    if leased {
        sys::release_lease(&f);
    }
    stored
}

/// [`store_file`] once the file is open: moved into the store when `leased`
/// (and the store can take it), else copied. Each byte is read once (twice
/// only for a large file the store could not take).
fn store_open_file(
    store: &Store,
    f: &mut File,
    path: &Path,
    len: u64,
    leased: bool,
) -> Result<(Digest, u64)> {
    if len <= SMALL_FILE {
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf).map_err(Error::io("read", path))?;
        let digest = Digest::of(&buf);
        if !leased || store.blobs().adopt(&digest, path)? == Adopted::Unsupported {
            store.blobs().put_hashed(&digest, &buf)?;
        }
        return Ok((digest, buf.len() as u64));
    }
    if leased {
        let (digest, size) =
            strata_store::hash_reader(f, CHUNK).map_err(Error::io("read", path))?;
        if store.blobs().adopt(&digest, path)? != Adopted::Unsupported {
            return Ok((digest, size));
        }
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(Error::io("read", path))?;
    }
    let mut w = store.blobs().writer()?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])
            .map_err(Error::io("write the blob of", path))?;
    }
    let staged = w.finish()?;
    let out = (staged.digest(), staged.size());
    staged.publish()?;
    Ok(out)
}

/// Hashes every file in parallel and makes the blobs durable.
fn store_files(store: &Store, files: &Files, adopt: bool) -> Result<Vec<(Digest, u64)>> {
    // A few files are stored on this thread: handing them to rayon's pool
    // costs two thread switches, more than storing a small file.
    let done: Vec<(Digest, u64)> = if files.paths.len() < PARALLEL_FILES {
        files
            .paths
            .iter()
            .map(|p| store_file(store, p, adopt))
            .collect::<Result<_>>()?
    } else {
        files
            .paths
            .par_iter()
            .map(|p| store_file(store, p, adopt))
            .collect::<Result<_>>()?
    };
    // Always, even with nothing new: callers rely on the capture's sync to
    // cover blobs they published just before (a task's log).
    store.blobs().sync()?;
    Ok(done)
}

/// Turns a scanned item into an entry, collecting the trees it needs.
fn to_entry(item: Item, hashed: &[(Digest, u64)], trees: &mut Vec<Tree>) -> Result<Entry> {
    Ok(match item {
        Item::File { slot, executable } => {
            let (digest, size) = hashed[slot];
            Entry::File {
                digest,
                size,
                executable,
            }
        }
        Item::Symlink(target) => Entry::Symlink { target },
        Item::Dir(children) => {
            let tree = to_tree(children, hashed, trees)?;
            Entry::Dir { digest: tree }
        }
    })
}

fn to_tree(
    children: Vec<(Name, Item)>,
    hashed: &[(Digest, u64)],
    trees: &mut Vec<Tree>,
) -> Result<Digest> {
    let mut entries = Vec::with_capacity(children.len());
    for (name, item) in children {
        entries.push((name, to_entry(item, hashed, trees)?));
    }
    let tree = Tree::from_entries(entries)?;
    let d = tree.digest();
    trees.push(tree);
    Ok(d)
}

/// The layer of a plain directory, stored (trees and blobs, no layer record).
/// With `adopt`, files may be moved into the store (the directory is about
/// to be emptied).
pub(crate) fn capture_dir(store: &Store, dir: &Path, adopt: bool) -> Result<Digest> {
    let mut files = Files::default();
    let items = scan_full(dir, Mode::Plain, &mut files)?;
    let hashed = store_files(store, &files, adopt)?;
    let mut trees = Vec::new();
    let root = to_tree(items, &hashed, &mut trees)?;
    store.put_trees(trees)?;
    Ok(root)
}

/// The layer `base` + the changes recorded in an overlay's upper directory,
/// stored (trees and blobs, no layer record). `merged` is the overlay's
/// mount point, read only for redirected directories.
pub(crate) fn capture_upper(
    store: &Store,
    base: &Digest,
    upper_dir: &Path,
    merged: &Path,
    upper: Upper,
) -> Result<Digest> {
    let mut files = Files::default();
    let mut changes = Vec::new();
    scan_upper(
        store,
        upper_dir,
        merged,
        &RelPath::root(),
        Some(*base),
        upper,
        &mut files,
        &mut changes,
    )?;
    // Never moved out of an upper directory: the overlay is still mounted on it.
    let hashed = store_files(store, &files, false)?;
    let mut trees = Vec::new();
    let mut edits = Vec::with_capacity(changes.len());
    for (path, change) in changes {
        let entry = match change {
            Change::Remove => None,
            Change::Set(item) => Some(to_entry(item, &hashed, &mut trees)?),
        };
        edits.push((path, entry));
    }
    if edits.is_empty() {
        return Ok(*base);
    }
    store.put_trees(trees)?;
    Ok(store.edit(base, &edits)?)
}
