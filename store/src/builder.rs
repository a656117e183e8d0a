//! Builds a tree bottom-up from a flat list of paths and entries.

use std::collections::BTreeMap;

use crate::{Batch, Digest, Entry, Error, LayerStats, Name, RelPath, Result, Store, Tree};

/// Collects `(path, entry)` pairs in any order, then stores the trees.
#[derive(Default)]
pub(crate) struct TreeBuilder {
    /// Directory path → its non-directory entries (and, while building, its
    /// finished subdirectories).
    dirs: BTreeMap<RelPath, Vec<(Name, Entry)>>,
    stats: LayerStats,
}

impl TreeBuilder {
    pub(crate) fn new() -> TreeBuilder {
        let mut b = TreeBuilder::default();
        b.dirs.insert(RelPath::root(), Vec::new());
        b
    }

    /// Declares a directory (and its ancestors); empty directories are kept.
    pub(crate) fn add_dir(&mut self, path: &RelPath) {
        let mut p = path.clone();
        loop {
            if self.dirs.contains_key(&p) {
                return;
            }
            self.dirs.insert(p.clone(), Vec::new());
            self.stats.dirs += 1;
            match p.parent() {
                Some(parent) => p = parent,
                None => return,
            }
        }
    }

    /// Adds a file or symlink (directories go through [`TreeBuilder::add_dir`],
    /// or [`TreeBuilder::add_subtree`] for stored ones).
    pub(crate) fn add(&mut self, path: &RelPath, entry: Entry) -> Result<()> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::BadName {
                name: ".".into(),
                reason: "the root of a layer must be a directory",
            });
        };
        match &entry {
            Entry::File { size, .. } => {
                self.stats.files += 1;
                self.stats.bytes += size;
            }
            Entry::Symlink { .. } => self.stats.symlinks += 1,
            Entry::Dir { .. } => {}
        }
        self.add_dir(&parent);
        if let Some(v) = self.dirs.get_mut(&parent) {
            v.push((name.clone(), entry));
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> LayerStats {
        self.stats
    }

    /// Stages every new tree into `batch`; returns the root tree digest.
    pub(crate) fn finish(mut self, store: &Store, batch: &mut Batch) -> Result<Digest> {
        let mut paths: Vec<RelPath> = self.dirs.keys().cloned().collect();
        // Deepest first, so every child is finished before its parent.
        paths.sort_by_key(|p| std::cmp::Reverse(p.components().len()));
        let mut root = None;
        for path in paths {
            let entries = self.dirs.remove(&path).unwrap_or_default();
            let tree = Tree::from_entries(entries).map_err(|e| match e {
                Error::BadName { name, reason } => Error::BadName {
                    name: format!("{}/{name}", path),
                    reason,
                },
                other => other,
            })?;
            let digest = store.stage_tree(batch, &tree)?;
            match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) => {
                    if let Some(v) = self.dirs.get_mut(&parent) {
                        v.push((name.clone(), Entry::Dir { digest }));
                    }
                }
                _ => root = Some(digest),
            }
        }
        root.ok_or(Error::CorruptTree {
            reason: "no root directory was built",
        })
    }
}
