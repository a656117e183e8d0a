//! Builds a tree bottom-up from a flat list of paths and entries.

use std::collections::HashMap;

use crate::{Batch, Digest, Entry, Error, LayerStats, Name, RelPath, Result, Store, Tree};

/// Collects `(path, entry)` pairs in any order, then stores the trees.
///
/// Directories are keyed by their path as bytes (`""` for the root,
/// `a/b` below it): an ingest adds tens of thousands of paths, and byte keys
/// cost one allocation where a `RelPath` costs one per component.
#[derive(Default)]
pub(crate) struct TreeBuilder {
    /// Directory path → its entries (files and symlinks as added; finished
    /// subdirectories are appended while building).
    dirs: HashMap<Vec<u8>, Vec<(Name, Entry)>>,
    stats: LayerStats,
}

/// The parent of a directory path (`a/b` → `a`, `a` → the root `""`).
fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

impl TreeBuilder {
    pub(crate) fn new() -> TreeBuilder {
        let mut b = TreeBuilder::default();
        b.dirs.insert(Vec::new(), Vec::new());
        b
    }

    /// Declares a directory (and its ancestors); empty directories are kept.
    pub(crate) fn add_dir(&mut self, path: &RelPath) {
        self.add_dir_bytes(&path.to_bytes());
    }

    /// [`TreeBuilder::add_dir`] for a path given as bytes (`a/b`); each
    /// component is checked when the trees are built.
    pub(crate) fn add_dir_bytes(&mut self, path: &[u8]) {
        let mut p = path;
        while !self.dirs.contains_key(p) {
            self.dirs.insert(p.to_vec(), Vec::new());
            self.stats.dirs += 1;
            p = parent_of(p);
        }
    }

    /// Adds a file or symlink (directories go through [`TreeBuilder::add_dir`]).
    pub(crate) fn add(&mut self, path: &RelPath, entry: Entry) -> Result<()> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::BadName {
                name: ".".into(),
                reason: "the root of a layer must be a directory",
            });
        };
        self.add_at(&parent.to_bytes(), name.clone(), entry);
        Ok(())
    }

    /// Adds a file or symlink named `name` in the directory `parent` (bytes).
    pub(crate) fn add_at(&mut self, parent: &[u8], name: Name, entry: Entry) {
        match &entry {
            Entry::File { size, .. } => {
                self.stats.files += 1;
                self.stats.bytes += size;
            }
            Entry::Symlink { .. } => self.stats.symlinks += 1,
            Entry::Dir { .. } => {}
        }
        self.add_dir_bytes(parent);
        if let Some(v) = self.dirs.get_mut(parent) {
            v.push((name, entry));
        }
    }

    pub(crate) fn stats(&self) -> LayerStats {
        self.stats
    }

    /// Stages every new tree into `batch`; returns the root tree digest.
    pub(crate) fn finish(mut self, store: &Store, batch: &mut Batch) -> Result<Digest> {
        let mut paths: Vec<Vec<u8>> = self.dirs.keys().cloned().collect();
        // Deepest first, so every child is finished before its parent.
        let depth = |p: &[u8]| {
            if p.is_empty() {
                0
            } else {
                1 + p.iter().filter(|b| **b == b'/').count()
            }
        };
        paths.sort_by_key(|p| std::cmp::Reverse(depth(p)));
        let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        let mut root = None;
        for path in paths {
            let entries = self.dirs.remove(&path).unwrap_or_default();
            let tree = Tree::from_entries(entries).map_err(|e| match e {
                Error::BadName { name, reason } => Error::BadName {
                    name: format!("{}/{name}", shown(&path)),
                    reason,
                },
                other => other,
            })?;
            let digest = store.stage_tree(batch, &tree)?;
            if path.is_empty() {
                root = Some(digest);
                continue;
            }
            let parent = parent_of(&path);
            let start = if parent.is_empty() {
                0
            } else {
                parent.len() + 1
            };
            let name = Name::new(&path[start..]).map_err(|e| match e {
                Error::BadName { reason, .. } => Error::BadName {
                    name: shown(&path),
                    reason,
                },
                other => other,
            })?;
            if let Some(v) = self.dirs.get_mut(parent) {
                v.push((name, Entry::Dir { digest }));
            }
        }
        root.ok_or(Error::CorruptTree {
            reason: "no root directory was built",
        })
    }
}
