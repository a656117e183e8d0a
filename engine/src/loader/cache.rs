//! The load cache: a workspace model kept with everything its evaluation read.
//!
//! Evaluating a thousand tasks of Starlark and validating them takes tens of
//! milliseconds, most of a build where every task is cached. A load writes
//! the model it produced to `<cache dir>/<key>.json` with the digest of every
//! file it read (`ci.toml`, each `BUILD.star`, each `load()`ed library), the
//! files it found absent, the source directories it found (`local_source`
//! checks its path), and the packages each `//prefix/...` pattern found.
//! The next load with the same key re-reads those files and walks for those
//! packages again; when every digest and every list is the same, the
//! evaluation would be the same too (Starlark here reads nothing else: no
//! environment, no clock, no other file), so the model is reused without
//! evaluating or validating anything.
//!
//! The key is the workspace root, the patterns, and the identity of the
//! running binary (path, size, modification time), so a rebuilt `ci` never
//! reads a model an older one wrote. A file that cannot be read or parsed is
//! a miss; a cache that cannot be written is ignored: the cache only ever
//! saves time. What is lost on a hit: the output of `print()` in
//! `BUILD.star` files, which shows only when they are evaluated.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use strata_store::Digest;

use crate::label::Pattern;
use crate::model::Workspace;

use super::Loader;

/// Bumped whenever what a cached load holds changes meaning.
const FORMAT: u32 = 1;

/// Cache files kept at most; the oldest go when a write finds more.
const MAX_ENTRIES: usize = 256;

/// What one evaluation read: workspace-relative files with their digest
/// (`None`: found absent), directories found to exist, and the packages
/// found under each prefix.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reads {
    pub(crate) files: BTreeMap<String, Option<Digest>>,
    pub(crate) dirs: Vec<String>,
    pub(crate) packages: BTreeMap<String, Vec<String>>,
}

impl Reads {
    pub(crate) fn file(&mut self, file: &str, bytes: &[u8]) {
        self.files.insert(file.to_owned(), Some(Digest::of(bytes)));
    }

    pub(crate) fn absent(&mut self, file: &str) {
        self.files.insert(file.to_owned(), None);
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    format: u32,
    reads: Reads,
    workspace: Workspace,
}

/// The cache file of a load of `patterns` in `loader`'s workspace.
pub(crate) fn entry_path(dir: &Path, loader: &Loader, patterns: &[Pattern]) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let meta = fs::metadata(&exe).ok()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut text = format!(
        "strata load cache {FORMAT}\n{}\n{}\n{}\n{mtime}\n",
        exe.display(),
        meta.len(),
        loader.root.display()
    );
    for p in patterns {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    Some(dir.join(format!("{}.json", Digest::of(text.as_bytes()))))
}

/// The cached model at `path`, if everything it read is unchanged.
pub(crate) fn lookup(path: &Path, loader: &Loader) -> Option<Workspace> {
    let bytes = fs::read(path).ok()?;
    let entry: Entry = serde_json::from_slice(&bytes).ok()?;
    if entry.format != FORMAT {
        return None;
    }
    for (file, digest) in &entry.reads.files {
        let now = match fs::read(loader.root.join(file)) {
            Ok(bytes) => Some(Digest::of(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => return None,
        };
        if now != *digest {
            return None;
        }
    }
    if !entry
        .reads
        .dirs
        .iter()
        .all(|d| loader.root.join(d).is_dir())
    {
        return None;
    }
    for (prefix, found) in &entry.reads.packages {
        if loader.find_packages(prefix).ok()? != *found {
            return None;
        }
    }
    let mut ws = entry.workspace;
    ws.root = Some(loader.root.clone());
    Some(ws)
}

/// Writes the entry atomically (a temporary file renamed over it); errors
/// are ignored. Prunes the directory when it holds too many entries.
pub(crate) fn store(path: &Path, reads: Reads, workspace: &Workspace) {
    let Some(dir) = path.parent() else { return };
    if fs::create_dir_all(dir).is_err() {
        return;
    }
    let entry = Entry {
        format: FORMAT,
        reads,
        workspace: workspace.clone(),
    };
    let Ok(bytes) = serde_json::to_vec(&entry) else {
        return;
    };
    let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) else {
        return;
    };
    if io::Write::write_all(&mut tmp, &bytes).is_err() || tmp.persist(path).is_err() {
        return;
    }
    prune(dir);
}

fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= MAX_ENTRIES {
        return;
    }
    files.sort();
    for (_, p) in &files[..files.len() - MAX_ENTRIES / 2] {
        let _ = fs::remove_file(p);
    }
}
