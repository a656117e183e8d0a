//! What a set of layers needs, object by object, and the action cache as a
//! trait (the local store is one; a remote cache is a decorator around it).

use std::collections::HashSet;

use crate::{ActionEntry, Digest, Entry, Error, Family, Result, Store, Tree};

/// Every object that a set of layers is made of.
#[derive(Debug, Default)]
pub struct Closure {
    /// Each tree's digest and canonical bytes, every tree after the trees it
    /// names: stored in this order, no tree ever names a missing one.
    pub trees: Vec<(Digest, Vec<u8>)>,
    /// Each blob's digest and size, once.
    pub blobs: Vec<(Digest, u64)>,
}

impl Closure {
    /// The bytes of every object (trees and blobs).
    pub fn bytes(&self) -> u64 {
        let trees: u64 = self.trees.iter().map(|(_, b)| b.len() as u64).sum();
        trees + self.blobs.iter().map(|(_, s)| s).sum::<u64>()
    }

    pub fn objects(&self) -> usize {
        self.trees.len() + self.blobs.len()
    }
}

impl Store {
    /// The trees and blobs of the layers rooted at `roots`. A tree that is
    /// not stored is [`Error::MissingTree`]; blobs are listed as the trees
    /// name them (whether each is stored is the caller's question).
    pub fn closure(&self, roots: &[Digest]) -> Result<Closure> {
        let mut out = Closure::default();
        let mut seen_trees = HashSet::new();
        let mut seen_blobs = HashSet::new();
        // (tree, its bytes once read): a tree is emitted when popped the
        // second time, after everything it names.
        let mut stack: Vec<(Digest, Option<Vec<u8>>)> = Vec::new();
        for root in roots {
            if seen_trees.insert(*root) {
                stack.push((*root, None));
            }
        }
        while let Some((digest, bytes)) = stack.pop() {
            if let Some(bytes) = bytes {
                out.trees.push((digest, bytes));
                continue;
            }
            let bytes = self
                .meta
                .get(Family::Trees, digest.as_bytes())?
                .ok_or(Error::MissingTree(digest))?;
            let tree = Tree::decode(&bytes)?;
            stack.push((digest, Some(bytes)));
            for (_, entry) in tree.entries() {
                match entry {
                    Entry::Dir { digest } => {
                        if seen_trees.insert(*digest) {
                            stack.push((*digest, None));
                        }
                    }
                    Entry::File { digest, size, .. } => {
                        if seen_blobs.insert(*digest) {
                            out.blobs.push((*digest, *size));
                        }
                    }
                    Entry::Symlink { .. } => {}
                }
            }
        }
        Ok(out)
    }

    /// Whether every object of the layers rooted at `roots` is stored, and
    /// the first one that is not.
    pub fn first_missing(&self, roots: &[Digest]) -> Result<Option<Digest>> {
        let closure = match self.closure(roots) {
            Ok(c) => c,
            Err(Error::MissingTree(d)) => return Ok(Some(d)),
            Err(e) => return Err(e),
        };
        for (d, _) in &closure.blobs {
            if !self.blobs().contains(d)? {
                return Ok(Some(*d));
            }
        }
        Ok(None)
    }
}

/// Where a build looks action results up and shares the ones it makes.
///
/// The local [`Store`] is the plain implementation; a remote cache wraps it
/// (crate `strata-remote`), the way sccache stacks its storages: the engine
/// never asks whether a cache is remote.
pub trait ActionCache: Send + Sync {
    /// The result recorded under `key`; `None` on a miss. Every object it
    /// names is in the local store, except, for a cache that fetches lazily,
    /// layers held only remotely ([`Store::remote_layer`]): the caller
    /// brings those with [`ActionCache::fetch`] before it reads them.
    fn lookup(&self, key: &Digest) -> Result<Option<ActionEntry>>;

    /// Brings `layers`, held only remotely, into the local store, all
    /// together (one transfer where the backend can), and returns those of
    /// them still not stored here: the cache is unreachable, or no longer
    /// holds them. The plain store fetches nothing.
    fn fetch(&self, layers: &[Digest]) -> Result<Vec<Digest>> {
        Ok(layers.to_vec())
    }

    /// The build has just recorded `entry` under `key` in the local store.
    fn recorded(&self, key: &Digest, entry: &ActionEntry) {
        let _ = (key, entry);
    }

    /// Waits for what the cache still has to do (uploads), and says in one
    /// line what it did, when there is anything to say.
    fn finish(&self) -> Option<String> {
        None
    }
}

impl ActionCache for Store {
    /// The action cache's entry, or a lazy entry whose layers are all
    /// stored by now (never one naming a layer held only remotely).
    fn lookup(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        match self.action(key)? {
            Some(hit) => Ok(Some(hit)),
            None => self.promote_action(key),
        }
    }
}
