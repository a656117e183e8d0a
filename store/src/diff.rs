//! Diff, apply and three-way merge of layers, over trees. Equal subtrees
//! (same digest) are skipped without being read.

use std::collections::BTreeSet;

use crate::{Batch, Digest, Entry, Error, Kind, Name, RelPath, Result, Store, Tree};

/// How a path differs between two layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Removed,
    /// Same kind, other content (file bytes or executable bit, symlink target).
    Modified,
    /// A file became a directory, a symlink a file, …
    TypeChanged,
}

/// One difference. An added or removed directory is one change (its whole
/// subtree), not one per file inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub path: RelPath,
    pub kind: ChangeKind,
    pub old: Option<Entry>,
    pub new: Option<Entry>,
}

/// What to do when both sides of a merge changed a path differently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergePolicy {
    /// Produce no layer; list the conflicting paths.
    #[default]
    Fail,
    /// Take our side for every conflicting path.
    Ours,
    /// Take their side for every conflicting path.
    Theirs,
}

/// The result of a three-way merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The merged layer; `None` when there were conflicts under [`MergePolicy::Fail`].
    pub merged: Option<Digest>,
    /// Paths both sides changed differently (resolved by the policy, if any).
    pub conflicts: Vec<RelPath>,
}

impl Store {
    /// Every path that differs from layer `a` to layer `b`, sorted by path.
    pub fn diff(&self, a: &Digest, b: &Digest) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        self.diff_trees(&RelPath::root(), a, b, &mut out)?;
        Ok(out)
    }

    fn diff_trees(
        &self,
        at: &RelPath,
        a: &Digest,
        b: &Digest,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        if a == b {
            return Ok(());
        }
        let (ta, tb) = (self.tree(a)?, self.tree(b)?);
        for (name, ea, eb) in union(&ta, &tb) {
            let path = at.join(name.clone());
            match (ea, eb) {
                (Some(x), Some(y)) if x == y => {}
                (Some(Entry::Dir { digest: x }), Some(Entry::Dir { digest: y })) => {
                    self.diff_trees(&path, x, y, out)?;
                }
                (Some(x), Some(y)) => {
                    let kind = if x.kind() == y.kind() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::TypeChanged
                    };
                    out.push(Change {
                        path,
                        kind,
                        old: Some(x.clone()),
                        new: Some(y.clone()),
                    });
                }
                (Some(x), None) => out.push(Change {
                    path,
                    kind: ChangeKind::Removed,
                    old: Some(x.clone()),
                    new: None,
                }),
                (None, Some(y)) => out.push(Change {
                    path,
                    kind: ChangeKind::Added,
                    old: None,
                    new: Some(y.clone()),
                }),
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Applies edits to the layer `base`: each path is set to the entry, or
    /// removed for `None`. Missing parent directories are created. Returns
    /// the new root, with every new tree stored.
    pub fn edit(&self, base: &Digest, edits: &[(RelPath, Option<Entry>)]) -> Result<Digest> {
        let _hold = self.hold();
        let mut batch = Batch::new();
        let root = self.edit_tree(Some(base), edits, &mut batch)?;
        self.meta.write(batch)?;
        Ok(root)
    }

    /// Applies a diff (from [`Store::diff`]) to `base`.
    pub fn apply(&self, base: &Digest, changes: &[Change]) -> Result<Digest> {
        let edits: Vec<(RelPath, Option<Entry>)> = changes
            .iter()
            .map(|c| (c.path.clone(), c.new.clone()))
            .collect();
        self.edit(base, &edits)
    }

    fn edit_tree(
        &self,
        base: Option<&Digest>,
        edits: &[(RelPath, Option<Entry>)],
        batch: &mut Batch,
    ) -> Result<Digest> {
        let mut entries: std::collections::BTreeMap<Name, Entry> = match base {
            Some(d) => self.tree(d)?.into_entries().into_iter().collect(),
            None => Default::default(),
        };
        // Group edits by first component: deeper edits recurse.
        let mut here: Vec<(&Name, &Option<Entry>)> = Vec::new();
        let mut deeper: std::collections::BTreeMap<Name, Vec<(RelPath, Option<Entry>)>> =
            Default::default();
        for (path, entry) in edits {
            match path.components() {
                [] => {
                    return Err(Error::BadName {
                        name: ".".into(),
                        reason: "the root of a layer cannot be replaced by an edit",
                    })
                }
                [name] => here.push((name, entry)),
                [first, rest @ ..] => deeper
                    .entry(first.clone())
                    .or_default()
                    .push((RelPath::from_names(rest.to_vec()), entry.clone())),
            }
        }
        for (name, entry) in here {
            match entry {
                Some(e) => entries.insert(name.clone(), e.clone()),
                None => entries.remove(name),
            };
        }
        for (name, sub) in deeper {
            let sub_base = match entries.get(&name) {
                Some(Entry::Dir { digest }) => Some(*digest),
                _ => None,
            };
            let digest = self.edit_tree(sub_base.as_ref(), &sub, batch)?;
            entries.insert(name, Entry::Dir { digest });
        }
        let tree = Tree::from_entries(entries.into_iter().collect())?;
        let digest = tree.digest();
        let bytes = tree.encode();
        if !self.has_tree(&digest)? {
            batch.put(crate::Family::Trees, digest.as_bytes().to_vec(), bytes);
        }
        Ok(digest)
    }

    /// Three-way merge of `ours` and `theirs`, both made from `base`. A path
    /// changed by one side takes that side; changed identically by both, that
    /// value; changed differently, a conflict (directories on both sides are
    /// merged recursively, so only the conflicting paths inside are listed).
    pub fn merge(
        &self,
        base: &Digest,
        ours: &Digest,
        theirs: &Digest,
        policy: MergePolicy,
    ) -> Result<MergeOutcome> {
        let _hold = self.hold();
        let mut conflicts = Vec::new();
        let mut batch = Batch::new();
        let root = self.merge_trees(
            &RelPath::root(),
            Some(base),
            ours,
            theirs,
            policy,
            &mut conflicts,
            &mut batch,
        )?;
        if !conflicts.is_empty() && policy == MergePolicy::Fail {
            return Ok(MergeOutcome {
                merged: None,
                conflicts,
            });
        }
        self.meta.write(batch)?;
        Ok(MergeOutcome {
            merged: Some(root),
            conflicts,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_trees(
        &self,
        at: &RelPath,
        base: Option<&Digest>,
        ours: &Digest,
        theirs: &Digest,
        policy: MergePolicy,
        conflicts: &mut Vec<RelPath>,
        batch: &mut Batch,
    ) -> Result<Digest> {
        if ours == theirs {
            return Ok(*ours);
        }
        if base == Some(ours) {
            return Ok(*theirs);
        }
        if base == Some(theirs) {
            return Ok(*ours);
        }
        let tb = match base {
            Some(d) => self.tree(d)?,
            None => Tree::empty(),
        };
        let (to, tt) = (self.tree(ours)?, self.tree(theirs)?);
        let mut names: BTreeSet<&Name> = BTreeSet::new();
        for t in [&tb, &to, &tt] {
            names.extend(t.entries().iter().map(|(n, _)| n));
        }
        let mut merged: Vec<(Name, Entry)> = Vec::new();
        for name in names {
            let b = tb.get(name.as_bytes());
            let o = to.get(name.as_bytes());
            let t = tt.get(name.as_bytes());
            let pick = if o == t {
                o.cloned()
            } else if o == b {
                t.cloned()
            } else if t == b {
                o.cloned()
            } else if let (Some(Entry::Dir { digest: od }), Some(Entry::Dir { digest: td })) =
                (o, t)
            {
                let bd = b.and_then(Entry::dir_digest);
                let path = at.join(name.clone());
                Some(Entry::Dir {
                    digest: self.merge_trees(
                        &path,
                        bd.as_ref(),
                        od,
                        td,
                        policy,
                        conflicts,
                        batch,
                    )?,
                })
            } else {
                conflicts.push(at.join(name.clone()));
                match policy {
                    MergePolicy::Theirs => t.cloned(),
                    MergePolicy::Ours | MergePolicy::Fail => o.cloned(),
                }
            };
            if let Some(e) = pick {
                merged.push((name.clone(), e));
            }
        }
        let tree = Tree::from_entries(merged)?;
        self.stage_tree(batch, &tree)
    }
}

/// Names of both trees in order, with each side's entry.
fn union<'a>(a: &'a Tree, b: &'a Tree) -> Vec<(&'a Name, Option<&'a Entry>, Option<&'a Entry>)> {
    let (mut i, mut j) = (0, 0);
    let (ea, eb) = (a.entries(), b.entries());
    let mut out = Vec::with_capacity(ea.len().max(eb.len()));
    while i < ea.len() || j < eb.len() {
        match (ea.get(i), eb.get(j)) {
            (Some((na, xa)), Some((nb, xb))) => match na.cmp(nb) {
                std::cmp::Ordering::Less => {
                    out.push((na, Some(xa), None));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push((nb, None, Some(xb)));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push((na, Some(xa), Some(xb)));
                    i += 1;
                    j += 1;
                }
            },
            (Some((na, xa)), None) => {
                out.push((na, Some(xa), None));
                i += 1;
            }
            (None, Some((nb, xb))) => {
                out.push((nb, None, Some(xb)));
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}

impl Change {
    /// One letter for listings: `A`, `D`, `M` or `T`.
    pub fn letter(&self) -> char {
        match self.kind {
            ChangeKind::Added => 'A',
            ChangeKind::Removed => 'D',
            ChangeKind::Modified => 'M',
            ChangeKind::TypeChanged => 'T',
        }
    }

    pub fn new_kind(&self) -> Option<Kind> {
        self.new.as_ref().map(Entry::kind)
    }
}

/// One difference as `ci store diff --json` and the HTTP API show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChangeRow {
    pub path: String,
    pub change: ChangeKind,
    pub old_kind: Option<Kind>,
    pub new_kind: Option<Kind>,
}

impl ChangeRow {
    /// `A`, `D`, `M` or `T`, as [`Change::letter`].
    pub fn letter(&self) -> char {
        match self.change {
            ChangeKind::Added => 'A',
            ChangeKind::Removed => 'D',
            ChangeKind::Modified => 'M',
            ChangeKind::TypeChanged => 'T',
        }
    }
}

impl From<Change> for ChangeRow {
    fn from(c: Change) -> ChangeRow {
        ChangeRow {
            old_kind: c.old.as_ref().map(Entry::kind),
            new_kind: c.new_kind(),
            change: c.kind,
            path: c.path.to_string(),
        }
    }
}
