//! Blobs as read-only files: `blobs/ab/cdef…`, staged in `tmp/` and renamed
//! into place, so a blob file is either absent or whole.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Adopted, Blob, BlobStore, BlobWriter, Hasher, StagedBlob};
use crate::{Digest, Error, Result};

/// Blob storage in a directory of files.
pub struct FsBlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    /// Blobs published since the last sync (shared with writers).
    pending: Pending,
    /// A reader's handle: it holds no lock, so it must not write or delete.
    read_only: bool,
}

impl FsBlobStore {
    /// Uses `blobs/` and `tmp/` under `root`, creating them when missing.
    /// The two must be on one filesystem (renames move staged blobs into place).
    pub fn open(root: &Path) -> Result<FsBlobStore> {
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        for dir in [&blobs, &tmp] {
            fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        }
        Ok(FsBlobStore {
            blobs,
            tmp,
            pending: Pending::default(),
            read_only: false,
        })
    }

    /// Reads an existing store's `blobs/`; refuses every write.
    pub fn open_read_only(root: &Path) -> FsBlobStore {
        FsBlobStore {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            pending: Pending::default(),
            read_only: true,
        }
    }

    fn refuse_if_read_only(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.blobs.clone(),
            });
        }
        Ok(())
    }

    /// Removes everything left in `tmp/` by an interrupted operation; returns
    /// how many entries were removed. Only call while holding the write lock.
    pub fn sweep_staging(&self) -> Result<usize> {
        let mut removed = 0;
        let entries = fs::read_dir(&self.tmp).map_err(Error::io("list", &self.tmp))?;
        for entry in entries {
            let entry = entry.map_err(Error::io("list", &self.tmp))?;
            let path = entry.path();
            let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.map_err(Error::io("remove the leftover", &path))?;
            removed += 1;
        }
        Ok(removed)
    }

    fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.blobs.join(&hex[..2]).join(&hex[2..])
    }
}

struct FileBlob(File, u64);

impl Blob for FileBlob {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.1 {
            return Ok(0);
        }
        self.0.read_at(buf, offset)
    }
    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.0))
    }
}

/// Above this many blobs to make durable, one `syncfs` is cheaper than one
/// `fdatasync` per blob (an ingest of 20,000 files); below it, syncing only
/// the new blobs spares writing out everything else dirty on the filesystem
/// (a task's output of a few files).
const FSYNC_EACH_MAX: usize = 32;

/// Blobs published and not yet made durable.
#[derive(Clone, Default)]
struct Pending(std::sync::Arc<std::sync::Mutex<PendingBlobs>>);

#[derive(Default)]
struct PendingBlobs {
    paths: Vec<PathBuf>,
    /// More than [`FSYNC_EACH_MAX`] were published: the next sync is a syncfs.
    many: bool,
    /// A shard directory was made: `blobs/` itself changed.
    new_shard: bool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingBlobs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the shard directory `dest` goes in (missing on its first
    /// blob); `blobs/` itself then changed and needs its sync.
    fn make_shard(&self, dest: &Path) -> Result<()> {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
            self.lock().new_shard = true;
        }
        Ok(())
    }

    fn push(&self, path: PathBuf) {
        let mut p = self.lock();
        if p.many {
            return;
        }
        p.paths.push(path);
        if p.paths.len() > FSYNC_EACH_MAX {
            p.many = true;
            p.paths.clear();
        }
    }
}

struct FsWriter {
    file: tempfile::NamedTempFile,
    hasher: Hasher,
    dest_dir: PathBuf,
    pending: Pending,
}

impl Write for FsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter for FsWriter {
    fn finish(self: Box<Self>) -> Result<Box<dyn StagedBlob>> {
        let (digest, size) = self.hasher.finish();
        let hex = digest.to_hex();
        let dest = self.dest_dir.join(&hex[..2]).join(&hex[2..]);
        // Close the file now: an import may stage thousands of blobs.
        let path = self.file.into_temp_path();
        Ok(Box::new(FsStaged {
            path,
            digest,
            size,
            dest,
            pending: self.pending,
        }))
    }
}

/// A staged blob: its temporary file is removed on drop unless published.
struct FsStaged {
    path: tempfile::TempPath,
    digest: Digest,
    size: u64,
    dest: PathBuf,
    pending: Pending,
}

impl StagedBlob for FsStaged {
    fn digest(&self) -> Digest {
        self.digest
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn publish(self: Box<Self>) -> Result<()> {
        if self.dest.exists() {
            return Ok(()); // Same digest, same bytes: keep the stored one.
        }
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o444))
            .map_err(Error::io("set permissions on", &*self.path))?;
        let dest = self.dest;
        match self.path.persist(&dest) {
            Ok(()) => {}
            Err(e) if e.error.kind() == io::ErrorKind::NotFound => {
                self.pending.make_shard(&dest)?;
                e.path
                    .persist(&dest)
                    .map_err(|e| Error::io("move a blob to", &dest)(e.error))?;
            }
            Err(e) => return Err(Error::io("move a blob to", &dest)(e.error)),
        }
        self.pending.push(dest);
        Ok(())
    }
}

/// Makes everything on the filesystem of `dir` durable with one call.
fn syncfs(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(Error::io("open", dir))?;
    use std::os::fd::AsRawFd;
    // SAFETY: `f` is an open file descriptor for the duration of the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::io("sync the filesystem of", dir)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl FsBlobStore {
    fn staging_file(&self) -> Result<tempfile::NamedTempFile> {
        self.refuse_if_read_only()?;
        tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .map_err(Error::io("create a staging file in", &self.tmp))
    }
}

/// A shard directory of `blobs/`: two lowercase hex characters.
fn is_shard(entry: &fs::DirEntry) -> bool {
    let name = entry.file_name();
    let name = name.to_string_lossy();
    name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && entry.file_type().is_ok_and(|t| t.is_dir())
}

impl BlobStore for FsBlobStore {
    fn writer(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(FsWriter {
            file: self.staging_file()?,
            hasher: Hasher::new(),
            dest_dir: self.blobs.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn put_hashed(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        if self.contains(digest)? {
            return Ok(false);
        }
        let mut file = self.staging_file()?;
        file.write_all(bytes)
            .map_err(Error::io("write", file.path().to_owned()))?;
        Box::new(FsStaged {
            path: file.into_temp_path(),
            digest: *digest,
            size: bytes.len() as u64,
            dest: self.path_of(digest),
            pending: self.pending.clone(),
        })
        .publish()?;
        Ok(true)
    }

    fn adopt(&self, digest: &Digest, path: &Path) -> Result<Adopted> {
        self.refuse_if_read_only()?;
        if self.contains(digest)? {
            return Ok(Adopted::Exists);
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o444))
            .map_err(Error::io("set permissions on", path))?;
        let dest = self.path_of(digest);
        let moved = match fs::rename(path, &dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.exists() => {
                self.pending.make_shard(&dest)?;
                fs::rename(path, &dest)
            }
            other => other,
        };
        match moved {
            Ok(()) => {
                self.pending.push(dest);
                Ok(Adopted::Moved)
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(Adopted::Unsupported),
            Err(e) => Err(Error::io("move a blob to", &dest)(e)),
        }
    }

    fn contains(&self, digest: &Digest) -> Result<bool> {
        let path = self.path_of(digest);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", path)(e)),
        }
    }

    fn open(&self, digest: &Digest) -> Result<Option<Box<dyn Blob>>> {
        let path = self.path_of(digest);
        match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(Error::io("stat", &path))?.len();
                Ok(Some(Box::new(FileBlob(f, len))))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", path)(e)),
        }
    }

    fn file_path(&self, digest: &Digest) -> Option<PathBuf> {
        Some(self.path_of(digest))
    }

    fn for_each(&self, f: &mut dyn FnMut(Digest, u64) -> Result<()>) -> Result<()> {
        let shards = fs::read_dir(&self.blobs).map_err(Error::io("list", &self.blobs))?;
        let mut shard_dirs: Vec<(String, PathBuf)> = Vec::new();
        for shard in shards {
            let shard = shard.map_err(Error::io("list", &self.blobs))?;
            if !is_shard(&shard) {
                continue;
            }
            if let Some(name) = shard.file_name().to_str() {
                shard_dirs.push((name.to_owned(), shard.path()));
            }
        }
        shard_dirs.sort();
        for (prefix, dir) in shard_dirs {
            let mut names = Vec::new();
            for entry in fs::read_dir(&dir).map_err(Error::io("list", &dir))? {
                let entry = entry.map_err(Error::io("list", &dir))?;
                let Some(rest) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Ok(digest) = format!("{prefix}{rest}").parse::<Digest>() else {
                    continue;
                };
                let len = entry
                    .metadata()
                    .map_err(Error::io("stat", entry.path()))?
                    .len();
                names.push((digest, len));
            }
            names.sort();
            for (d, len) in names {
                f(d, len)?;
            }
        }
        Ok(())
    }

    fn strays(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let shards = match fs::read_dir(&self.blobs) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list", &self.blobs)(e)),
        };
        for shard in shards {
            let shard = shard.map_err(Error::io("list", &self.blobs))?;
            if !is_shard(&shard) {
                out.push(shard.path());
                continue;
            }
            let prefix = shard.file_name().to_string_lossy().into_owned();
            let dir = shard.path();
            for entry in fs::read_dir(&dir).map_err(Error::io("list", &dir))? {
                let entry = entry.map_err(Error::io("list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_blob = format!("{prefix}{name}").parse::<Digest>().is_ok()
                    && entry.file_type().is_ok_and(|t| t.is_file());
                if !is_blob {
                    out.push(entry.path());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, digest: &Digest) -> Result<u64> {
        self.refuse_if_read_only()?;
        let path = self.path_of(digest);
        let len = match fs::symlink_metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("stat", path)(e)),
        };
        fs::remove_file(&path).map_err(Error::io("remove", &path))?;
        Ok(len)
    }

    fn sync(&self) -> Result<()> {
        // Held throughout: a blob another thread published (and this one
        // found already there) is durable once this returns.
        let mut pending = self.pending.lock();
        if pending.many {
            syncfs(&self.blobs)?;
        } else if !pending.paths.is_empty() {
            let mut dirs = std::collections::BTreeSet::new();
            for path in &pending.paths {
                File::open(path)
                    .and_then(|f| f.sync_data())
                    .map_err(Error::io("sync", path))?;
                if let Some(d) = path.parent() {
                    dirs.insert(d.to_owned());
                }
            }
            // The renames are entries of these; a new shard directory is
            // an entry of `blobs/`.
            if pending.new_shard {
                dirs.insert(self.blobs.clone());
            }
            for d in &dirs {
                File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(Error::io("sync", d))?;
            }
        }
        pending.paths.clear();
        pending.many = false;
        pending.new_shard = false;
        Ok(())
    }
}
