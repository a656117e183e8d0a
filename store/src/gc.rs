//! Garbage collection, verification and usage.
//!
//! GC marks from the roots (refs, the latest output of every task label, the lineage of rooted layers, the most
//! recent runs, leases of live processes), then sweeps records first and blob
//! files last, so no record ever points at a missing blob, even if GC is
//! interrupted.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;

use rayon::prelude::*;

use crate::blob::BlobReader;
use crate::{Batch, Digest, Entry, Family, Flow, Result, Store, Tree};

/// How to collect.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// The layers and logs of this many most recent runs are kept.
    pub keep_runs: usize,
    /// Report what would be freed, delete nothing.
    pub dry_run: bool,
    /// Action-cache entries are roots too: a cache server's entries are what
    /// it is for, and it evicts them itself, by last use (`ci serve
    /// --cache-max-size`), before it collects.
    pub keep_cache: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            keep_runs: 10,
            dry_run: false,
            keep_cache: false,
        }
    }
}

/// What a collection freed (or, in a dry run, would free).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub roots: u64,
    pub layers_freed: u64,
    pub trees_freed: u64,
    pub blobs_freed: u64,
    pub bytes_freed: u64,
    pub actions_dropped: u64,
    pub runs_dropped: u64,
    pub blobs_kept: u64,
    pub bytes_kept: u64,
}

/// One inconsistency found by [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What is wrong, e.g. `corrupt blob`, `missing tree`.
    pub what: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.detail)
    }
}

/// The outcome of a verification; it passed when `problems` is empty.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub trees_checked: u64,
    /// Layers named here but held only at a remote cache (fetched on use):
    /// not problems.
    pub held_remotely: u64,
    pub problems: Vec<Problem>,
}

/// What the store holds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub trees: u64,
    pub tree_bytes: u64,
    pub layers: u64,
    pub refs: u64,
    pub runs: u64,
    pub actions: u64,
    /// Bazel's SHA-256 → blob rows (`sha256` family).
    pub sha256: u64,
    /// Bazel / REAPI action entries (`bazel_actions` family).
    pub bazel_actions: u64,
}

fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn digests_of(v: &[u8]) -> Option<Digest> {
    Digest::from_slice(v)
}

impl Store {
    /// Removes everything not reachable from the roots; see the module doc.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        if !opts.dry_run {
            self.check_writable()?;
        }
        // No publication in this process may be half-way while we mark.
        let _exclusive = self.publishing.write();
        let mut report = GcReport::default();
        let mut batch = Batch::new();

        // Roots.
        let mut root_layers: Vec<Digest> = self.refs()?.into_iter().map(|(_, d)| d).collect();
        root_layers.extend(self.labels()?.into_iter().map(|(_, e)| e.layer));
        let mut live_blobs: HashSet<Digest> = HashSet::new();
        let run_ids = self.run_ids()?;
        let keep_from = run_ids.len().saturating_sub(opts.keep_runs);
        for (i, id) in run_ids.iter().enumerate() {
            if i < keep_from {
                batch.delete(Family::Runs, id.as_bytes().to_vec());
                self.meta.scan(
                    Family::Events,
                    &crate::records::events_prefix(id),
                    &mut |k, _| {
                        batch.delete(Family::Events, k.to_vec());
                        Ok(Flow::Continue)
                    },
                )?;
                report.runs_dropped += 1;
            } else if let Some(run) = self.run(id)? {
                root_layers.extend(run.layers);
                live_blobs.extend(run.blobs);
            }
        }
        for (key, lease) in self.leases()? {
            if pid_alive(lease.pid) {
                root_layers.extend(lease.layers);
            } else {
                batch.delete(Family::Leases, key);
            }
        }
        if opts.keep_cache {
            self.meta.scan(Family::Actions, &[], &mut |_, v| {
                if let Ok(a) = serde_json::from_slice::<crate::ActionEntry>(v) {
                    root_layers.extend(a.layers);
                    live_blobs.extend(a.blobs);
                }
                Ok(Flow::Continue)
            })?;
            self.cas_roots(&mut live_blobs)?;
        }
        // The lineage of every rooted layer is kept too.
        let mut rooted: HashSet<Digest> = root_layers.iter().copied().collect();
        let mut i = 0;
        while i < root_layers.len() {
            if let Some(l) = self.lineage(&root_layers[i])? {
                if let Some(p) = l.parent {
                    if rooted.insert(p) {
                        root_layers.push(p);
                    }
                }
            }
            i += 1;
        }
        root_layers.sort();
        root_layers.dedup();
        report.roots = root_layers.len() as u64;

        // Mark.
        let mut live_trees: HashSet<Digest> = HashSet::new();
        for layer in &root_layers {
            if self.has_tree(layer)? {
                self.mark(layer, &mut live_trees, &mut live_blobs)?;
            }
        }
        // Cached actions survive when all their layers do; their logs with them.
        self.meta.scan(Family::Actions, &[], &mut |k, v| {
            let keep = match serde_json::from_slice::<crate::ActionEntry>(v) {
                Ok(a) if a.layers.iter().all(|l| live_trees.contains(l)) => {
                    live_blobs.extend(a.blobs);
                    true
                }
                _ => false,
            };
            if !keep {
                batch.delete(Family::Actions, k.to_vec());
                report.actions_dropped += 1;
            }
            Ok(Flow::Continue)
        })?;

        // Lazy entries hold nothing here but their logs; they, and the
        // records of remote-only layers that they or a root name, stay.
        let mut remote_named: HashSet<Digest> = root_layers.iter().copied().collect();
        for (_, a) in self.lazy_actions()?.into_iter() {
            if let Some(a) = a {
                remote_named.extend(a.layers);
                live_blobs.extend(a.blobs);
            }
        }
        self.meta.scan(Family::Remote, &[], &mut |k, _| {
            if digests_of(k).is_none_or(|d| !remote_named.contains(&d)) {
                batch.delete(Family::Remote, k.to_vec());
            }
            Ok(Flow::Continue)
        })?;

        // Sweep records.
        self.meta.scan(Family::Trees, &[], &mut |k, _| {
            if digests_of(k).is_none_or(|d| !live_trees.contains(&d)) {
                batch.delete(Family::Trees, k.to_vec());
                report.trees_freed += 1;
            }
            Ok(Flow::Continue)
        })?;
        for family in [Family::Layers, Family::Lineage] {
            self.meta.scan(family, &[], &mut |k, _| {
                if digests_of(k).is_none_or(|d| !live_trees.contains(&d)) {
                    batch.delete(family, k.to_vec());
                    if family == Family::Layers {
                        report.layers_freed += 1;
                    }
                }
                Ok(Flow::Continue)
            })?;
        }
        self.meta.scan(Family::StatCache, &[], &mut |k, v| {
            let d = v.get(48..80).and_then(Digest::from_slice);
            if d.is_none_or(|d| !live_blobs.contains(&d)) {
                batch.delete(Family::StatCache, k.to_vec());
            }
            Ok(Flow::Continue)
        })?;
        // Bazel's SHA-256 rows and action entries go with their blobs.
        report.actions_dropped += self.cas_sweep(&live_blobs, &mut batch)?;
        if !opts.dry_run {
            self.meta.write(batch)?;
            // The deletions must be durable before any blob file goes.
            self.meta.sync()?;
        }

        // Sweep blobs, only after no record names them.
        let mut dead = Vec::new();
        self.blobs.for_each(&mut |d, size| {
            if live_blobs.contains(&d) {
                report.blobs_kept += 1;
                report.bytes_kept += size;
            } else {
                dead.push((d, size));
            }
            Ok(())
        })?;
        for (d, size) in dead {
            report.blobs_freed += 1;
            report.bytes_freed += if opts.dry_run {
                size
            } else {
                self.blobs.delete(&d)?
            };
        }
        Ok(report)
    }

    fn mark(
        &self,
        tree: &Digest,
        trees: &mut HashSet<Digest>,
        blobs: &mut HashSet<Digest>,
    ) -> Result<()> {
        let mut stack = vec![*tree];
        while let Some(d) = stack.pop() {
            if !trees.insert(d) {
                continue;
            }
            let t = match self.tree(&d) {
                Ok(t) => t,
                // A missing subtree is verify's to report; mark what exists.
                Err(crate::Error::MissingTree(_)) => continue,
                Err(e) => return Err(e),
            };
            for (_, e) in t.entries() {
                match e {
                    Entry::File { digest, .. } => {
                        blobs.insert(*digest);
                    }
                    Entry::Dir { digest } => stack.push(*digest),
                    Entry::Symlink { .. } => {}
                }
            }
        }
        Ok(())
    }

    /// Re-hashes every blob and checks every reference between records.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();

        let mut blob_list = Vec::new();
        self.blobs.for_each(&mut |d, size| {
            blob_list.push((d, size));
            Ok(())
        })?;
        report.blobs_checked = blob_list.len() as u64;
        for stray in self.blobs.strays()? {
            problems.push(Problem {
                what: "stray file".into(),
                detail: format!(
                    "`{}` is not a blob; remove it (nothing refers to it)",
                    stray.display()
                ),
            });
        }
        let bad: Vec<Problem> = blob_list
            .par_iter()
            .filter_map(|(d, _)| self.check_blob(d).err())
            .collect();
        problems.extend(bad);
        let blob_sizes: std::collections::HashMap<Digest, u64> = blob_list.into_iter().collect();

        let mut tree_keys: HashSet<Digest> = HashSet::new();
        let mut trees: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.meta.scan(Family::Trees, &[], &mut |k, v| {
            if let Some(d) = Digest::from_slice(k) {
                tree_keys.insert(d);
            }
            trees.push((k.to_vec(), v.to_vec()));
            Ok(Flow::Continue)
        })?;
        report.trees_checked = trees.len() as u64;
        for (k, v) in &trees {
            let key = hex::encode(k);
            let tree = match Tree::decode(v) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem {
                        what: "corrupt tree".into(),
                        detail: format!("`{key}`: {e}"),
                    });
                    continue;
                }
            };
            if Digest::of(v).as_bytes()[..] != k[..] {
                problems.push(Problem {
                    what: "corrupt tree".into(),
                    detail: format!("`{key}` is stored under the wrong digest"),
                });
            }
            for (name, e) in tree.entries() {
                match e {
                    Entry::File { digest, size, .. } => match blob_sizes.get(digest) {
                        None => problems.push(Problem {
                            what: "missing blob".into(),
                            detail: format!("`{digest}` (file `{name}` in tree `{key}`)"),
                        }),
                        Some(s) if s != size => problems.push(Problem {
                            what: "wrong blob size".into(),
                            detail: format!(
                                "`{digest}` is {s} bytes, tree `{key}` says {size} for `{name}`"
                            ),
                        }),
                        Some(_) => {}
                    },
                    Entry::Dir { digest } if !tree_keys.contains(digest) => {
                        problems.push(Problem {
                            what: "missing tree".into(),
                            detail: format!("`{digest}` (directory `{name}` in tree `{key}`)"),
                        })
                    }
                    _ => {}
                }
            }
        }

        // A layer held only remotely is not missing: it is fetched on use.
        let remote: HashSet<Digest> = self.remote_layers()?.into_iter().map(|(d, _)| d).collect();
        let mut held_remotely: HashSet<Digest> = HashSet::new();
        let mut need_tree = |what: &str, d: &Digest, problems: &mut Vec<Problem>| {
            if !tree_keys.contains(d) && remote.contains(d) {
                held_remotely.insert(*d);
            } else if !tree_keys.contains(d) {
                problems.push(Problem {
                    what: "missing tree".into(),
                    detail: format!("`{d}` ({what})"),
                });
            }
        };
        for (d, _) in self.layers()? {
            need_tree("a recorded layer", &d, &mut problems);
            if let Some(l) = self.lineage(&d)? {
                if let Some(p) = l.parent {
                    need_tree(
                        &format!("the parent of layer `{}`", d.short()),
                        &p,
                        &mut problems,
                    );
                }
            }
        }
        for (name, d) in self.refs()? {
            need_tree(&format!("ref `{name}`"), &d, &mut problems);
        }
        for (label, e) in self.labels()? {
            need_tree(&format!("the output of `{label}`"), &e.layer, &mut problems);
        }
        let mut actions = Vec::new();
        self.meta.scan(Family::Actions, &[], &mut |k, v| {
            actions.push((
                hex::encode(k),
                serde_json::from_slice::<crate::ActionEntry>(v).ok(),
            ));
            Ok(Flow::Continue)
        })?;
        for (key, a) in actions {
            let Some(a) = a else {
                problems.push(Problem {
                    what: "corrupt record".into(),
                    detail: format!("action `{key}`"),
                });
                continue;
            };
            for l in &a.layers {
                need_tree(&format!("action `{}`", &key[..12]), l, &mut problems);
            }
            for b in &a.blobs {
                if !blob_sizes.contains_key(b) {
                    problems.push(Problem {
                        what: "missing blob".into(),
                        detail: format!("`{b}` (action `{}`)", &key[..12]),
                    });
                }
            }
        }
        for (key, a) in self.lazy_actions()? {
            let key = key.to_hex();
            let Some(a) = a else {
                problems.push(Problem {
                    what: "corrupt record".into(),
                    detail: format!("lazy action `{key}`"),
                });
                continue;
            };
            for l in &a.layers {
                need_tree(&format!("lazy action `{}`", &key[..12]), l, &mut problems);
            }
            for b in &a.blobs {
                if !blob_sizes.contains_key(b) {
                    problems.push(Problem {
                        what: "missing blob".into(),
                        detail: format!("`{b}` (lazy action `{}`)", &key[..12]),
                    });
                }
            }
        }
        for id in self.run_ids()? {
            let Some(run) = self.run(&id).ok().flatten() else {
                problems.push(Problem {
                    what: "corrupt record".into(),
                    detail: format!("run `{id}`"),
                });
                continue;
            };
            for l in &run.layers {
                need_tree(&format!("run `{id}`"), l, &mut problems);
            }
            for b in &run.blobs {
                if !blob_sizes.contains_key(b) {
                    problems.push(Problem {
                        what: "missing blob".into(),
                        detail: format!("`{b}` (run `{id}`)"),
                    });
                }
            }
        }
        self.meta.scan(Family::StatCache, &[], &mut |k, v| {
            match v.get(48..80).and_then(Digest::from_slice) {
                Some(d) if blob_sizes.contains_key(&d) => {}
                _ => problems.push(Problem {
                    what: "stale stat-cache entry".into(),
                    detail: format!("`{}`", String::from_utf8_lossy(k)),
                }),
            }
            Ok(Flow::Continue)
        })?;
        self.cas_verify(&blob_sizes, &mut problems)?;
        report.held_remotely = held_remotely.len() as u64;
        report.problems = problems;
        Ok(report)
    }

    fn check_blob(&self, d: &Digest) -> std::result::Result<(), Problem> {
        let problem = |detail: String| Problem {
            what: "corrupt blob".into(),
            detail,
        };
        let blob = match self.blobs.open(d) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(problem(format!("`{d}` vanished while verifying"))),
            Err(e) => return Err(problem(format!("`{d}`: {e}"))),
        };
        let mut hasher = crate::blob::Hasher::new();
        let mut reader = BlobReader::new(&*blob);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) => return Err(problem(format!("`{d}` cannot be read: {e}"))),
            }
        }
        let (got, _) = hasher.finish();
        if &got != d {
            return Err(problem(format!(
                "`{d}` holds content whose digest is `{got}`"
            )));
        }
        Ok(())
    }

    /// Counts what the store holds.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        self.blobs.for_each(&mut |_, size| {
            u.blobs += 1;
            u.blob_bytes += size;
            Ok(())
        })?;
        self.meta.scan(Family::Trees, &[], &mut |_, v| {
            u.trees += 1;
            u.tree_bytes += v.len() as u64;
            Ok(Flow::Continue)
        })?;
        for (family, count) in [
            (Family::Layers, &mut u.layers),
            (Family::Refs, &mut u.refs),
            (Family::Runs, &mut u.runs),
            (Family::Actions, &mut u.actions),
        ] {
            self.meta.scan(family, &[], &mut |_, _| {
                *count += 1;
                Ok(Flow::Continue)
            })?;
        }
        (u.sha256, u.bazel_actions) = self.cas_usage()?;
        Ok(u)
    }
}
