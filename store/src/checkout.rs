//! Checkout: a layer becomes an ordinary directory.
//!
//! Files get the stored executable bit (0755 or 0644), directories 0755, and
//! everything the one fixed mtime [`crate::FIXED_MTIME`]. File contents are
//! reflinked from the blob files where the filesystem can, copied otherwise.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use filetime::FileTime;
use rayon::prelude::*;

use crate::{Digest, Entry, Error, Result, Store, FIXED_MTIME};

/// What a checkout wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckoutReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

impl Store {
    /// Writes the layer rooted at `root` into `dest`, which must not exist or
    /// be an empty directory.
    pub fn checkout(&self, root: &Digest, dest: &Path) -> Result<CheckoutReport> {
        match fs::read_dir(dest) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::Io {
                        action: "check out into",
                        path: dest.to_owned(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the directory is not empty; choose a new or empty directory",
                        ),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dest).map_err(Error::io("create", dest))?;
            }
            Err(e) => return Err(Error::io("open", dest)(e)),
        }
        let mut report = CheckoutReport::default();
        let mut files = Vec::new();
        let mut dirs = vec![dest.to_owned()];
        self.plan(root, dest, &mut files, &mut dirs, &mut report)?;
        files
            .par_iter()
            .map(|(path, digest, executable)| self.write_file(path, digest, *executable))
            .collect::<Result<Vec<()>>>()?;
        // Directories last, deepest first: writing into one moves its mtime.
        let t = FileTime::from_unix_time(FIXED_MTIME, 0);
        for dir in dirs.iter().rev() {
            filetime::set_file_times(dir, t, t).map_err(Error::io("set the mtime of", dir))?;
        }
        Ok(report)
    }

    /// Creates directories and symlinks, and lists the files to write.
    fn plan(
        &self,
        tree: &Digest,
        dir: &Path,
        files: &mut Vec<(PathBuf, Digest, bool)>,
        dirs: &mut Vec<PathBuf>,
        report: &mut CheckoutReport,
    ) -> Result<()> {
        let t = FileTime::from_unix_time(FIXED_MTIME, 0);
        for (name, entry) in self.tree(tree)?.entries() {
            let path = dir.join(name.as_os_str());
            match entry {
                Entry::Dir { digest } => {
                    fs::create_dir(&path).map_err(Error::io("create", &path))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(Error::io("set permissions on", &path))?;
                    report.dirs += 1;
                    dirs.push(path.clone());
                    self.plan(digest, &path, files, dirs, report)?;
                }
                Entry::Symlink { target } => {
                    std::os::unix::fs::symlink(target.as_os_str(), &path)
                        .map_err(Error::io("create the symlink", &path))?;
                    filetime::set_symlink_file_times(&path, t, t)
                        .map_err(Error::io("set the mtime of", &path))?;
                    report.symlinks += 1;
                }
                Entry::File {
                    digest,
                    size,
                    executable,
                } => {
                    files.push((path, *digest, *executable));
                    report.files += 1;
                    report.bytes += size;
                }
            }
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, digest: &Digest, executable: bool) -> Result<()> {
        match self.blobs.file_path(digest) {
            Some(src) => {
                if !src.exists() {
                    return Err(Error::MissingBlob(*digest));
                }
                reflink_copy::reflink_or_copy(&src, path).map_err(Error::io("copy to", path))?;
            }
            None => {
                let blob = self.blob(digest)?;
                let mut out = fs::File::create(path).map_err(Error::io("create", path))?;
                let mut reader = crate::blob::BlobReader::new(&*blob);
                std::io::copy(&mut reader, &mut out).map_err(Error::io("write", path))?;
                out.flush().map_err(Error::io("write", path))?;
            }
        }
        let mode = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(Error::io("set permissions on", path))?;
        let t = FileTime::from_unix_time(FIXED_MTIME, 0);
        filetime::set_file_times(path, t, t).map_err(Error::io("set the mtime of", path))
    }
}
