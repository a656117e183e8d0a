//! Which entries a workspace ingest leaves out, decided as the `ignore`
//! crate's walker decides them with the options ingest has always used
//! (`.gitignore`, `.ignore`, `.ciignore` and `.git/info/exclude` in every
//! directory from the root down, no parent directories above the root, no
//! global gitignore, hidden files kept, `.git` left out), but one directory
//! at a time, so the walk can skip reading a directory whose listing it
//! already knows.
//!
//! Precedence, as in `ignore`: the `exclude` patterns first; then, looking
//! from the directory up to the root, the nearest match in `.ciignore`
//! files, else in `.ignore` files, else in `.gitignore` files, else in a
//! `.git/info/exclude`.
//!
//! Every [`Rules`] carries a digest of everything that decides what its
//! directory's children are (the root, the options, the path and content of
//! every ignore file in effect): a directory-cache record made under other
//! rules does not list the right entries.

use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::overrides::{Override, OverrideBuilder};

use crate::dircache::has;
use crate::{Digest, Error, Result};

/// The ignore files of one directory that has any.
struct Layer {
    parent: Option<Arc<Layer>>,
    ciignore: Gitignore,
    ignore: Gitignore,
    gitignore: Gitignore,
    exclude: Gitignore,
}

/// The rules in effect for one directory's children.
#[derive(Clone)]
pub(super) struct Rules {
    /// The nearest directory with ignore files, and the ones above it.
    layers: Option<Arc<Layer>>,
    pub digest: Digest,
}

/// What every directory of one ingest shares.
pub(super) struct Options {
    overrides: Option<Override>,
    pub ignore_files: bool,
}

impl Options {
    /// The options of an ingest of `root`, and the rules of the root's own
    /// parent (none yet).
    pub(super) fn new(
        root: &Path,
        ignore_files: bool,
        exclude: &[String],
    ) -> Result<(Options, Rules)> {
        let overrides = if exclude.is_empty() {
            None
        } else {
            let mut ob = OverrideBuilder::new(root);
            for p in exclude {
                ob.add(&format!("!{p}"))
                    .map_err(|source| Error::BadPattern {
                        pattern: p.clone(),
                        source,
                    })?;
            }
            Some(ob.build().map_err(|source| Error::BadPattern {
                pattern: exclude.join(", "),
                source,
            })?)
        };
        let mut h = blake3::Hasher::new();
        h.update(b"strata ingest rules 1\0");
        h.update(root.as_os_str().as_bytes());
        h.update(&[0, ignore_files as u8]);
        for p in exclude {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        let rules = Rules {
            layers: None,
            digest: h.finalize().into(),
        };
        Ok((
            Options {
                overrides,
                ignore_files,
            },
            rules,
        ))
    }

    /// Whether the entry at `path` (a child of a directory ruled by
    /// `rules`) is left out.
    pub(super) fn ignored(&self, rules: &Rules, name: &[u8], path: &Path, is_dir: bool) -> bool {
        if self.ignore_files && name == b".git" {
            return true;
        }
        if let Some(ov) = &self.overrides {
            let m = ov.matched(path, is_dir);
            if !m.is_none() {
                return m.is_ignore();
            }
        }
        let Some(top) = &rules.layers else {
            return false;
        };
        // Nearest match per kind, then kinds in order of precedence.
        let mut found = [None, None, None, None];
        let mut layer = Some(top);
        while let Some(l) = layer {
            for (slot, gi) in
                found
                    .iter_mut()
                    .zip([&l.ciignore, &l.ignore, &l.gitignore, &l.exclude])
            {
                if slot.is_none() {
                    let m = gi.matched(path, is_dir);
                    if !m.is_none() {
                        *slot = Some(m.is_ignore());
                    }
                }
            }
            layer = l.parent.as_ref();
        }
        found.into_iter().flatten().next().unwrap_or(false)
    }
}

impl Rules {
    /// The rules for the children of `dir`, whose entries include the
    /// ignore files `present` says ([`has`] bits); these are read now.
    pub(super) fn child(&self, opts: &Options, dir: &Path, present: u8) -> Result<Rules> {
        if !opts.ignore_files || present == 0 {
            return Ok(self.clone());
        }
        let mut h = blake3::Hasher::new();
        h.update(self.digest.as_bytes());
        h.update(&(dir.as_os_str().len() as u64).to_le_bytes());
        h.update(dir.as_os_str().as_bytes());
        let mut read = |bit: u8, file: Option<PathBuf>| -> Result<Gitignore> {
            let Some(file) = file.filter(|_| present & bit != 0) else {
                return Ok(Gitignore::empty());
            };
            let gi = matcher(dir, &file, &mut h)?;
            h.update(&[bit]);
            Ok(gi)
        };
        let ciignore = read(has::CIIGNORE, Some(dir.join(".ciignore")))?;
        let ignore = read(has::IGNORE, Some(dir.join(".ignore")))?;
        let gitignore = read(has::GITIGNORE, Some(dir.join(".gitignore")))?;
        let exclude = read(has::GIT, git_exclude_file(dir))?;
        let digest = h.finalize().into();
        Ok(Rules {
            layers: Some(Arc::new(Layer {
                parent: self.layers.clone(),
                ciignore,
                ignore,
                gitignore,
                exclude,
            })),
            digest,
        })
    }
}

/// Reads one ignore file (a missing one is empty, as in `ignore`) into a
/// matcher rooted at `dir`, hashing its content into `h`.
fn matcher(dir: &Path, file: &Path, h: &mut blake3::Hasher) -> Result<Gitignore> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            h.update(b"absent\0");
            return Ok(Gitignore::empty());
        }
        Err(e) => return Err(Error::io("read the ignore file", file)(e)),
    };
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
    let mut b = GitignoreBuilder::new(dir);
    // A line that is not a pattern fails the ingest, as the walker's
    // partial errors always did. (Read again here: the builder names the
    // file and line in its errors.)
    if let Some(source) = b.add(file) {
        return Err(Error::Walk { source });
    }
    b.build().map_err(|source| Error::Walk { source })
}

/// `dir/.git/info/exclude`, or for a worktree (`.git` a file naming the
/// repository) the `info/exclude` of its common directory; `None` when
/// `.git` names no repository with one.
fn git_exclude_file(dir: &Path) -> Option<PathBuf> {
    let dot_git = dir.join(".git");
    let meta = std::fs::metadata(&dot_git).ok()?;
    if !meta.is_file() {
        return Some(dot_git.join("info/exclude"));
    }
    let first_line = |p: &Path| -> Option<String> {
        let f = std::fs::File::open(p).ok()?;
        std::io::BufReader::new(f).lines().next()?.ok()
    };
    let line = first_line(&dot_git)?;
    let git_dir = dir.join(line.strip_prefix("gitdir: ")?);
    let common = first_line(&git_dir.join("commondir"))?;
    let common = if common.starts_with('.') {
        git_dir.join(common)
    } else {
        PathBuf::from(common)
    };
    Some(common.join("info/exclude"))
}
