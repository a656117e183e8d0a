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
use crate::{
    ActionEntry, Batch, Digest, Entry, Family, Flow, LabelEntry, LayerRecord, Lease, Lineage,
    Result, Store, Tree,
};

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

/// What a scan calls with each key and value.
type ScanFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<Flow> + 'a;

/// A key as a message shows it: text when it is text, else hex.
fn show_key(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_owned(),
        _ => hex::encode(k),
    }
}

/// Which stored trees are complete: every blob they name is in `blobs`
/// and every tree they name is stored and complete.
fn completeness(
    trees: &std::collections::HashMap<Digest, Option<Tree>>,
    blobs: &HashSet<Digest>,
) -> std::collections::HashMap<Digest, bool> {
    let mut done: std::collections::HashMap<Digest, bool> = Default::default();
    for root in trees.keys() {
        // Children first, without recursion: (tree, whether its children
        // were pushed).
        let mut stack = vec![(*root, false)];
        while let Some((d, expanded)) = stack.pop() {
            if done.contains_key(&d) {
                continue;
            }
            let Some(Some(tree)) = trees.get(&d) else {
                done.insert(d, false);
                continue;
            };
            if !expanded {
                stack.push((d, true));
                for (_, e) in tree.entries() {
                    if let Entry::Dir { digest } = e {
                        if !done.contains_key(digest) {
                            stack.push((*digest, false));
                        }
                    }
                }
                continue;
            }
            let whole = tree.entries().iter().all(|(_, e)| match e {
                Entry::File { digest, .. } => blobs.contains(digest),
                Entry::Dir { digest } => done.get(digest).copied().unwrap_or(false),
                Entry::Symlink { .. } => true,
            });
            done.insert(d, whole);
        }
    }
    done
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
        // The file-level stat cache of older stores is read no more.
        self.meta.scan(Family::StatCache, &[], &mut |k, _| {
            batch.delete(Family::StatCache, k.to_vec());
            Ok(Flow::Continue)
        })?;
        // A directory record names its tree, which names its blobs.
        self.meta.scan(Family::DirCache, &[], &mut |k, v| {
            if crate::dircache::record_tree(v).is_none_or(|d| !live_trees.contains(&d)) {
                batch.delete(Family::DirCache, k.to_vec());
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
        // A reclaiming open released the reserve; made again if there is
        // room now (best effort: the store works without it).
        if let (false, Some(root)) = (opts.dry_run, &self.root) {
            let _ = crate::open::make_reserve(root);
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

    /// Checks the index's own files (tables present, whole, checksums),
    /// re-hashes every blob, decodes every record of every family and
    /// checks every reference between records. A record that cannot be read
    /// is a problem naming its family and key, never skipped as absent.
    // One arm per family reads better than guards falling through to `_`.
    #[allow(clippy::collapsible_match)]
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();

        // A damaged table hides records: what it hides must not read as
        // absent, so the families it holds are reported and not checked
        // further (their reads would fail, or see too little).
        let damage = self.meta.check_integrity()?;
        let damaged: HashSet<String> = damage.iter().filter_map(|d| d.family.clone()).collect();
        for d in &damage {
            problems.push(Problem {
                what: "damaged index".into(),
                detail: d.to_string(),
            });
        }
        // Reads every record of `family` into `f`; a read that fails is a
        // problem, and `false` says the family was not read whole.
        let scan = |family: Family, problems: &mut Vec<Problem>, f: &mut ScanFn<'_>| -> bool {
            if damaged.contains(family.name()) {
                return false;
            }
            match self.meta.scan(family, &[], f) {
                Ok(()) => true,
                Err(e) => {
                    problems.push(Problem {
                        what: "damaged index".into(),
                        detail: format!("family `{}`: {e}", family.name()),
                    });
                    false
                }
            }
        };
        // With tables missing or unreadable, what the families hold is
        // some earlier state, each family its own: references between
        // them mean nothing until the index is repaired. Blobs are checked.
        let tables_damaged = !damage.is_empty();
        let corrupt = |family: Family, key: &[u8]| Problem {
            what: "corrupt record".into(),
            detail: format!("family `{}`, key `{}`", family.name(), show_key(key)),
        };

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

        if tables_damaged {
            report.problems = problems;
            return Ok(report);
        }
        let mut tree_keys: HashSet<Digest> = HashSet::new();
        let mut trees: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let trees_whole = scan(Family::Trees, &mut problems, &mut |k, v| {
            if let Some(d) = Digest::from_slice(k) {
                tree_keys.insert(d);
            }
            trees.push((k.to_vec(), v.to_vec()));
            Ok(Flow::Continue)
        });
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
                    Entry::Dir { digest } if trees_whole && !tree_keys.contains(digest) => problems
                        .push(Problem {
                            what: "missing tree".into(),
                            detail: format!("`{digest}` (directory `{name}` in tree `{key}`)"),
                        }),
                    _ => {}
                }
            }
        }

        // A layer held only remotely is not missing: it is fetched on use.
        // With the trees family unreadable, which trees exist is unknown:
        // references to trees are not checked (the damage is reported).
        let remote: HashSet<Digest> = match self.remote_layers() {
            Ok(r) => r.into_iter().map(|(d, _)| d).collect(),
            Err(e) => {
                problems.push(Problem {
                    what: "corrupt record".into(),
                    detail: format!("family `remote`: {e}"),
                });
                HashSet::new()
            }
        };
        let mut held_remotely: HashSet<Digest> = HashSet::new();
        let mut need_tree = |what: &str, d: &Digest, problems: &mut Vec<Problem>| {
            if !trees_whole || tree_keys.contains(d) {
            } else if remote.contains(d) {
                held_remotely.insert(*d);
            } else {
                problems.push(Problem {
                    what: "missing tree".into(),
                    detail: format!("`{d}` ({what})"),
                });
            }
        };
        let mut found: Vec<(Family, Vec<u8>, Vec<u8>)> = Vec::new();
        for family in [
            Family::Layers,
            Family::Lineage,
            Family::Refs,
            Family::Labels,
            Family::Actions,
            Family::Runs,
            Family::Leases,
            Family::Events,
            Family::StatCache,
            Family::DirCache,
            Family::Remote,
            Family::LazyActions,
        ] {
            scan(family, &mut problems, &mut |k, v| {
                found.push((family, k.to_vec(), v.to_vec()));
                Ok(Flow::Continue)
            });
        }
        let need_blob = |what: &str, b: &Digest, problems: &mut Vec<Problem>| {
            if !blob_sizes.contains_key(b) {
                problems.push(Problem {
                    what: "missing blob".into(),
                    detail: format!("`{b}` ({what})"),
                });
            }
        };
        for (family, k, v) in &found {
            let family = *family;
            let digest_key = Digest::from_slice(k);
            match family {
                Family::Layers => match (digest_key, serde_json::from_slice::<LayerRecord>(v)) {
                    (Some(d), Ok(_)) => need_tree("a recorded layer", &d, &mut problems),
                    _ => problems.push(corrupt(family, k)),
                },
                Family::Lineage => match (digest_key, serde_json::from_slice::<Lineage>(v)) {
                    (Some(d), Ok(l)) => {
                        if let Some(p) = l.parent {
                            need_tree(
                                &format!("the parent of layer `{}`", d.short()),
                                &p,
                                &mut problems,
                            );
                        }
                    }
                    _ => problems.push(corrupt(family, k)),
                },
                Family::Refs => match (std::str::from_utf8(k), Digest::from_slice(v)) {
                    (Ok(name), Some(d)) if crate::records::check_ref_name(name).is_ok() => {
                        need_tree(&format!("ref `{name}`"), &d, &mut problems)
                    }
                    _ => problems.push(corrupt(family, k)),
                },
                Family::Labels => match serde_json::from_slice::<LabelEntry>(v) {
                    Ok(e) => need_tree(
                        &format!("the output of `{}`", String::from_utf8_lossy(k)),
                        &e.layer,
                        &mut problems,
                    ),
                    Err(_) => problems.push(corrupt(family, k)),
                },
                Family::Actions | Family::LazyActions => {
                    match (digest_key, serde_json::from_slice::<ActionEntry>(v)) {
                        (Some(d), Ok(a)) => {
                            let lazy = if family == Family::LazyActions {
                                "lazy "
                            } else {
                                ""
                            };
                            let what = format!("{lazy}action `{}`", &d.to_hex()[..12]);
                            for l in &a.layers {
                                need_tree(&what, l, &mut problems);
                            }
                            for b in &a.blobs {
                                need_blob(&what, b, &mut problems);
                            }
                        }
                        _ => problems.push(corrupt(family, k)),
                    }
                }
                Family::Runs => {
                    let id = String::from_utf8_lossy(k);
                    match self.run(&id) {
                        Ok(Some(run)) => {
                            let what = format!("run `{id}`");
                            for l in &run.layers {
                                need_tree(&what, l, &mut problems);
                            }
                            for b in &run.blobs {
                                need_blob(&what, b, &mut problems);
                            }
                        }
                        _ => problems.push(corrupt(family, k)),
                    }
                }
                Family::Remote => {
                    let ok = digest_key.is_some()
                        && serde_json::from_slice::<crate::RemoteLayer>(v).is_ok();
                    if !ok {
                        problems.push(corrupt(family, k));
                    }
                }
                Family::Leases => {
                    if serde_json::from_slice::<Lease>(v).is_err() {
                        problems.push(corrupt(family, k));
                    }
                }
                Family::Events => {
                    // The key is a run id, 0, a big-endian sequence number;
                    // the value the engine's JSON, which the store only
                    // checks is JSON.
                    let key_ok = k.len() > 9 && k[k.len() - 9] == 0;
                    let value_ok = serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok();
                    if !key_ok || !value_ok {
                        problems.push(corrupt(family, k));
                    }
                }
                Family::StatCache => match v.get(48..80).and_then(Digest::from_slice) {
                    Some(d) if blob_sizes.contains_key(&d) => {}
                    Some(_) => problems.push(Problem {
                        what: "stale stat-cache entry".into(),
                        detail: format!("`{}`", String::from_utf8_lossy(k)),
                    }),
                    None => problems.push(corrupt(family, k)),
                },
                Family::DirCache => match crate::dircache::DirRecord::decode(v) {
                    Some(r) => need_tree("a directory-cache record", &r.tree, &mut problems),
                    None => problems.push(corrupt(family, k)),
                },
                _ => {}
            }
        }
        if !damaged.contains(Family::Sha256.name())
            && !damaged.contains(Family::BazelActions.name())
        {
            if let Err(e) = self.cas_verify(&blob_sizes, &mut problems) {
                problems.push(Problem {
                    what: "damaged index".into(),
                    detail: format!("Bazel's families: {e}"),
                });
            }
        }
        report.held_remotely = held_remotely.len() as u64;
        report.problems = problems;
        Ok(report)
    }

    /// Drops every record that names an object no longer stored (after a
    /// repair set tables aside, or a blob was deleted by hand), so that the
    /// index is consistent again: a tree is complete when every blob it
    /// names is stored and every tree it names is complete; incomplete
    /// trees go, and so do layer records, refs, labels and action entries
    /// naming an incomplete layer (a build then runs again what made it).
    /// Run records keep the engine's record and lose only the GC roots that
    /// are gone; lineage loses a parent that is gone. Stat-cache entries and
    /// Bazel's rows of missing blobs go too. Returns what was dropped.
    // One arm per family reads better than guards falling through to `_`.
    #[allow(clippy::collapsible_match)]
    pub fn drop_dangling(&self) -> Result<Vec<Problem>> {
        self.check_writable()?;
        let _exclusive = self.publishing.write();
        let mut dropped = Vec::new();
        let mut batch = Batch::new();
        let mut blobs: HashSet<Digest> = HashSet::new();
        self.blobs.for_each(&mut |d, _| {
            blobs.insert(d);
            Ok(())
        })?;
        let mut trees: std::collections::HashMap<Digest, Option<Tree>> = Default::default();
        self.meta.scan(Family::Trees, &[], &mut |k, v| {
            match Digest::from_slice(k) {
                Some(d) => {
                    let tree = Tree::decode(v).ok().filter(|_| Digest::of(v) == d);
                    trees.insert(d, tree);
                }
                None => batch.delete(Family::Trees, k.to_vec()),
            }
            Ok(Flow::Continue)
        })?;
        let complete = completeness(&trees, &blobs);
        let mut lost_trees = 0;
        for (d, ok) in &complete {
            if !ok {
                batch.delete(Family::Trees, d.as_bytes().to_vec());
                lost_trees += 1;
            }
        }
        if lost_trees > 0 {
            dropped.push(Problem {
                what: "dropped".into(),
                detail: format!("{lost_trees} trees that name objects no longer stored"),
            });
        }
        // A layer with a `remote` record is held remotely once its local
        // trees are gone: records may name it (not an action entry).
        let mut remote: HashSet<Digest> = HashSet::new();
        self.meta.scan(Family::Remote, &[], &mut |k, _| {
            remote.extend(Digest::from_slice(k));
            Ok(Flow::Continue)
        })?;
        let whole = |d: &Digest| complete.get(d).copied().unwrap_or(false);
        let ok = |d: &Digest| whole(d) || remote.contains(d);
        let mut drop = |batch: &mut Batch, family: Family, k: &[u8], detail: String| {
            batch.delete(family, k.to_vec());
            dropped.push(Problem {
                what: "dropped".into(),
                detail,
            });
        };

        let mut rows: Vec<(Family, Vec<u8>, Vec<u8>)> = Vec::new();
        for family in [
            Family::Layers,
            Family::Lineage,
            Family::Refs,
            Family::Labels,
            Family::Actions,
            Family::Runs,
            Family::StatCache,
            Family::DirCache,
        ] {
            self.meta.scan(family, &[], &mut |k, v| {
                rows.push((family, k.to_vec(), v.to_vec()));
                Ok(Flow::Continue)
            })?;
        }
        let mut runs = Vec::new();
        for (family, k, v) in rows {
            let key = show_key(&k);
            match family {
                Family::Layers => {
                    if !Digest::from_slice(&k).is_some_and(|d| ok(&d)) {
                        drop(&mut batch, family, &k, format!("layer `{key}`"));
                    }
                }
                Family::Lineage => match (
                    Digest::from_slice(&k),
                    serde_json::from_slice::<Lineage>(&v),
                ) {
                    (Some(d), Ok(mut l)) if ok(&d) => {
                        if l.parent.is_some_and(|p| !ok(&p)) {
                            l.parent = None;
                            batch.put(
                                family,
                                k.clone(),
                                serde_json::to_vec(&l).unwrap_or_default(),
                            );
                        }
                    }
                    _ => batch.delete(family, k.clone()),
                },
                Family::Refs => {
                    if !Digest::from_slice(&v).is_some_and(|d| ok(&d)) {
                        drop(
                            &mut batch,
                            family,
                            &k,
                            format!("ref `{key}` (its layer is gone)"),
                        );
                    }
                }
                Family::Labels => {
                    if !serde_json::from_slice::<LabelEntry>(&v).is_ok_and(|e| ok(&e.layer)) {
                        drop(
                            &mut batch,
                            family,
                            &k,
                            format!("the latest output of `{key}` (it will be built again)"),
                        );
                    }
                }
                Family::Actions => {
                    let whole = serde_json::from_slice::<ActionEntry>(&v).is_ok_and(|a| {
                        a.layers.iter().all(whole) && a.blobs.iter().all(|b| blobs.contains(b))
                    });
                    if !whole {
                        let key = hex::encode(&k);
                        drop(
                            &mut batch,
                            family,
                            &k,
                            format!("cached action `{}`", &key[..key.len().min(12)]),
                        );
                    }
                }
                Family::Runs => runs.push(key),
                Family::StatCache => {
                    if !v
                        .get(48..80)
                        .and_then(Digest::from_slice)
                        .is_some_and(|d| blobs.contains(&d))
                    {
                        batch.delete(family, k.clone());
                    }
                }
                Family::DirCache => {
                    if !crate::dircache::record_tree(&v).is_some_and(|d| whole(&d)) {
                        batch.delete(family, k.clone());
                    }
                }
                _ => {}
            }
        }
        let bazel = self.cas_sweep(&blobs, &mut batch)?;
        if bazel > 0 {
            dropped.push(Problem {
                what: "dropped".into(),
                detail: format!("{bazel} Bazel action entries naming missing blobs"),
            });
        }
        self.meta.write(batch)?;
        for id in runs {
            match self.run(&id) {
                Ok(Some(mut run)) => {
                    let (layers, blobs_before) = (run.layers.len(), run.blobs.len());
                    run.layers.retain(|l| ok(l));
                    run.blobs.retain(|b| blobs.contains(b));
                    let gone = layers - run.layers.len() + blobs_before - run.blobs.len();
                    if gone > 0 {
                        self.put_run(&id, &run)?;
                        dropped.push(Problem {
                            what: "dropped".into(),
                            detail: format!(
                                "{gone} outputs and logs of run `{id}` (the run stays)"
                            ),
                        });
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    let mut b = Batch::new();
                    b.delete(Family::Runs, id.as_bytes().to_vec());
                    self.meta.write(b)?;
                    dropped.push(Problem {
                        what: "dropped".into(),
                        detail: format!("run `{id}` (its record cannot be read)"),
                    });
                }
            }
        }
        self.meta.sync()?;
        Ok(dropped)
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
