//! The directory cache: what an ingest saw of each directory, so that an
//! unchanged directory costs one `stat` per entry and nothing more.
//!
//! One record per directory (family `dircache`, keyed by the directory's
//! absolute path): the directory's own stat signature, the digest of the
//! ignore rules that filtered it, its tree digest and the stats of its
//! subtree, and for each entry kept its name, kind and stat signature (with
//! the blob digest of a file and the target of a symlink). The layout is in
//! `docs/FORMAT.md` ("The directory cache").
//!
//! Why a directory's signature is enough to skip `readdir`: adding, removing
//! or renaming an entry changes the directory's mtime and ctime. Why a record
//! is not trusted right after it was written: timestamps are coarse, so a
//! change within the same tick as the scan could leave them unmoved (git's
//! "racy clean" problem); signatures newer than [`RACY_MARGIN_NS`] before the
//! record was written never match.

use std::collections::HashMap;

use crate::{Digest, LayerStats};

/// A signature is trusted only for what last changed at least this long
/// before the record holding it was written.
pub(crate) const RACY_MARGIN_NS: i64 = 1_000_000_000;

/// The record layout's version (its first byte); other versions are misses.
const VERSION: u8 = 1;

/// The stat fields that must all match for a cached entry to be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatSig {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl StatSig {
    pub(crate) fn of_stat(st: &libc::stat) -> StatSig {
        StatSig {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }

    /// A signature no file has (inode 0): stored for a file that changed
    /// while it was read, so the entry never matches.
    pub(crate) const NEVER: StatSig = StatSig {
        size: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 0,
        dev: 0,
    };

    /// Whether `self` (just seen) equals `cached` and last changed long
    /// enough before `cached_at_ns` to be trusted.
    pub(crate) fn trusts(&self, cached: &StatSig, cached_at_ns: i64) -> bool {
        self == cached
            && self.ino != 0
            && self.mtime_ns.max(self.ctime_ns) < cached_at_ns.saturating_sub(RACY_MARGIN_NS)
    }
}

/// What a record keeps of one entry of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cached {
    File {
        sig: StatSig,
        executable: bool,
        digest: Digest,
    },
    Symlink {
        sig: StatSig,
        target: Vec<u8>,
    },
    /// A subdirectory: its own record says the rest.
    Dir,
}

/// Which ignore files the directory holds (whether or not they are
/// themselves ignored): they are read again at every ingest.
pub(crate) mod has {
    pub const GITIGNORE: u8 = 1;
    pub const IGNORE: u8 = 2;
    pub const CIIGNORE: u8 = 4;
    pub const GIT: u8 = 8;
}

/// One directory as an ingest last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirRecord {
    /// When the scan that wrote it started (ns since the epoch).
    pub cached_at_ns: i64,
    /// The digest of the ignore rules and options that filtered the entries.
    pub rules: Digest,
    /// The directory's own signature (its size is left out: 0).
    pub sig: StatSig,
    /// Its tree and the stats of its subtree.
    pub tree: Digest,
    pub stats: LayerStats,
    /// [`has`] bits.
    pub ignore_files: u8,
    /// The entries kept (ignored ones are not listed), sorted by name.
    pub entries: Vec<(Vec<u8>, Cached)>,
}

fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put_sig(v: &mut Vec<u8>, s: &StatSig) {
    for x in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
        put_u64(v, x);
    }
}

/// Offset of `cached_at_ns` in an encoded record (tests shift it).
pub const CACHED_AT_OFFSET: usize = 1;
/// Offset of the tree digest in an encoded record (GC and verify read it).
pub const TREE_OFFSET: usize = 41;

impl DirRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(150 + self.entries.len() * 90);
        v.push(VERSION);
        put_u64(&mut v, self.cached_at_ns as u64);
        v.extend_from_slice(self.rules.as_bytes());
        v.extend_from_slice(self.tree.as_bytes());
        put_sig(&mut v, &self.sig);
        for x in [
            self.stats.files,
            self.stats.dirs,
            self.stats.symlinks,
            self.stats.bytes,
        ] {
            put_u64(&mut v, x);
        }
        v.push(self.ignore_files);
        v.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (name, c) in &self.entries {
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(name);
            match c {
                Cached::File {
                    sig,
                    executable,
                    digest,
                } => {
                    v.push(if *executable { 1 } else { 0 });
                    put_sig(&mut v, sig);
                    v.extend_from_slice(digest.as_bytes());
                }
                Cached::Symlink { sig, target } => {
                    v.push(2);
                    put_sig(&mut v, sig);
                    v.extend_from_slice(&(target.len() as u16).to_le_bytes());
                    v.extend_from_slice(target);
                }
                Cached::Dir => v.push(3),
            }
        }
        v
    }

    /// `None` for anything that is not a whole record of this version: a
    /// record that cannot be read is a miss, never an error.
    pub(crate) fn decode(v: &[u8]) -> Option<DirRecord> {
        let mut r = Reader(v);
        if r.u8()? != VERSION {
            return None;
        }
        let cached_at_ns = r.u64()? as i64;
        let rules = Digest::from_slice(r.take(32)?)?;
        let tree = Digest::from_slice(r.take(32)?)?;
        let sig = r.sig()?;
        let stats = LayerStats {
            files: r.u64()?,
            dirs: r.u64()?,
            symlinks: r.u64()?,
            bytes: r.u64()?,
        };
        let ignore_files = r.u8()?;
        let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let mut entries = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let name = r.take(len)?.to_vec();
            let c = match r.u8()? {
                k @ (0 | 1) => {
                    let sig = r.sig()?;
                    let digest = Digest::from_slice(r.take(32)?)?;
                    Cached::File {
                        sig,
                        executable: k == 1,
                        digest,
                    }
                }
                2 => {
                    let sig = r.sig()?;
                    let len = r.u16()? as usize;
                    Cached::Symlink {
                        sig,
                        target: r.take(len)?.to_vec(),
                    }
                }
                3 => Cached::Dir,
                _ => return None,
            };
            entries.push((name, c));
        }
        r.0.is_empty().then_some(DirRecord {
            cached_at_ns,
            rules,
            sig,
            tree,
            stats,
            ignore_files,
            entries,
        })
    }

    /// The entries by name.
    pub(crate) fn by_name(&self) -> HashMap<&[u8], &Cached> {
        self.entries
            .iter()
            .map(|(n, c)| (n.as_slice(), c))
            .collect()
    }
}

/// The tree digest a record names, for GC and verify; `None` when the value
/// is not a record this version reads.
pub(crate) fn record_tree(v: &[u8]) -> Option<Digest> {
    if v.first() != Some(&VERSION) {
        return None;
    }
    v.get(TREE_OFFSET..TREE_OFFSET + 32)
        .and_then(Digest::from_slice)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn sig(&mut self) -> Option<StatSig> {
        Some(StatSig {
            size: self.u64()?,
            mtime_ns: self.u64()? as i64,
            ctime_ns: self.u64()? as i64,
            ino: self.u64()?,
            dev: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_to_itself_and_a_cut_one_is_a_miss() {
        let sig = StatSig {
            size: 5,
            mtime_ns: 7,
            ctime_ns: 8,
            ino: 9,
            dev: 10,
        };
        let r = DirRecord {
            cached_at_ns: 123,
            rules: Digest::of(b"r"),
            sig,
            tree: Digest::of(b"t"),
            stats: LayerStats {
                files: 1,
                dirs: 1,
                symlinks: 1,
                bytes: 5,
            },
            ignore_files: has::GITIGNORE,
            entries: vec![
                (
                    b"a".to_vec(),
                    Cached::File {
                        sig,
                        executable: true,
                        digest: Digest::of(b"a"),
                    },
                ),
                (b"d".to_vec(), Cached::Dir),
                (
                    b"l".to_vec(),
                    Cached::Symlink {
                        sig,
                        target: b"a".to_vec(),
                    },
                ),
            ],
        };
        let v = r.encode();
        assert_eq!(DirRecord::decode(&v), Some(r.clone()));
        assert_eq!(record_tree(&v), Some(r.tree));
        assert_eq!(DirRecord::decode(&v[..v.len() - 1]), None);
        let mut longer = v.clone();
        longer.push(0);
        assert_eq!(DirRecord::decode(&longer), None);
    }
}
