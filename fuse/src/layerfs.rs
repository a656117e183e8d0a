//! `LayerFs`: a read-only FUSE filesystem serving layers lazily from the store.
//!
//! Inode numbers are given out per path on first use (lookup or readdir) and
//! kept for the life of the mount, so memory grows with the number of
//! distinct paths visited, never beyond the size of the mounted layers.
//! Trees are read from the index on demand and kept in a bounded cache;
//! file contents are read by offset from the blob files, never copied.
//!
//! Layers never change, so every reply tells the kernel to cache entries,
//! attributes, directory listings and pages for as long as it likes.
//!
//! Opening a file costs no request at all unless accesses are traced: the
//! first `open` answers ENOSYS, which tells the kernel (Linux 3.17+) to open
//! every file of the mount without asking, keep its pages cached and never
//! send `release`. Reads are served by inode (a traced mount's opens get no
//! file handle either), from a few blob files kept open. The mount is read-only, so the
//! kernel refuses writing opens itself. A task reading three small inputs
//! makes 8 requests instead of 14.
//!
//! A mount made with [`ReadPath::Passthrough`] (`ci mount`) answers opens
//! instead, with FUSE passthrough (Linux 6.9+, CAP_SYS_ADMIN): the open
//! reply names the blob file (a backing id, one per inode while it is
//! open), and the kernel reads it itself, with no request and no copy per
//! read. Where the kernel or the process cannot, the mount falls back to
//! the zero-message opens and reads above ([`ReadPath::Served`]).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use strata_store::{Blob, Digest, Entry, Name, RelPath, Store, Target, Tree, FIXED_MTIME};

use crate::trace::{AccessTrace, TracedPath};
use crate::{Error, Result};

/// How long the kernel may trust what we reply: layers never change.
const TTL: Duration = Duration::from_secs(u32::MAX as u64);

/// The handle of a passthrough open (others get 0): its release drops a
/// use of the inode's backing id.
const PASSTHROUGH_FH: u64 = 1;

/// Set to `0` to serve every read through LayerFs, as where the kernel
/// cannot pass reads through (documented in docs/BENCHMARKS.md, "FUSE").
pub const PASSTHROUGH_ENV: &str = "CI_FUSE_PASSTHROUGH";

/// Trees kept in memory at most, counted in entries (about 100 bytes each).
const TREE_CACHE_ENTRIES: usize = 2_000_000;

const ROOT_INO: u64 = 1;

/// Blob files kept open for reads (which are served by inode).
const OPEN_BLOBS: usize = 32;

/// Reads up to this size are served on the FUSE thread (a `pread`, usually
/// from the page cache); larger ones go to a blocking thread.
const INLINE_READ: usize = 128 * 1024;
const BLKSIZE: u32 = 128 * 1024;

const LOOKED_UP: u8 = 1;
const LISTED: u8 = 2;
const READ: u8 = 4;

/// What a [`LayerFs`] serves at its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layers {
    /// One layer: its root tree is the mount's root.
    One(Digest),
    /// A directory of layers, one sub-directory per name (e.g. every task
    /// output of a run). A name is a relative path (`app/web:build`):
    /// `/` makes intermediate directories. Each component follows the rules
    /// of tree entry names; a layer cannot also be the parent of another.
    Named(Vec<(String, Digest)>),
    /// Nothing at first: top-level directories ("views") are added and
    /// removed while mounted ([`crate::MountHandle::add_view`]), each serving
    /// one [`Layers::One`] or [`Layers::Named`]. The engine mounts one per
    /// build and gives every task a view of its inputs, so inputs are never
    /// copied. A view's name is never reused within a mount: the kernel may
    /// keep resolving it to what it first served.
    Views,
}

/// A read-only FUSE filesystem serving [`Layers`] from a [`Store`].
///
/// Every file is owned by root, files are 0644 or 0755 by their executable
/// bit, directories 0755, every time is [`FIXED_MTIME`]. Mount it with
/// [`crate::mount_layers`]; the type is public for callers that drive a
/// `fuse3` session themselves.
#[derive(Clone)]
pub struct LayerFs {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    store: Store,
    nodes: RwLock<Vec<Arc<Node>>>,
    trees: Mutex<TreeCache>,
    /// Directories made up for [`Layers::Named`], by digest; never stored.
    synthetic: RwLock<HashMap<Digest, Arc<Tree>>>,
    /// The views of a [`Layers::Views`] root, by name (removed ones too: a
    /// name is never reused).
    views: Mutex<std::collections::BTreeMap<Name, View>>,
    /// For a [`Layers::Views`] mount: one inode per file content (digest and
    /// executable bit) however many views show it, so the kernel's page
    /// cache of a file is shared by every task reading it.
    shared_files: Option<Mutex<HashMap<(Digest, bool), u64>>>,
    /// For reads, which are served by inode (see the module's doc): the
    /// most recently read blobs, by inode, newest last.
    by_inode: Mutex<Vec<(u64, Arc<dyn Blob>)>>,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
    trace: Option<Mutex<HashMap<u64, u8>>>,
    /// The last error met while serving, for diagnostics (replies say EIO).
    last_error: Mutex<Option<String>>,
    pub(crate) passthrough: Passthrough,
    /// Read requests served (none for a file the kernel reads itself).
    reads: AtomicU64,
}

/// How a mount's file reads are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// The kernel reads the blob files itself (FUSE passthrough).
    Passthrough,
    /// Every read is a request LayerFs answers, for the reason given.
    Served(String),
}

impl std::fmt::Display for ReadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadPath::Passthrough => {
                write!(f, "the kernel reads blob files itself (FUSE passthrough)")
            }
            ReadPath::Served(why) => write!(f, "LayerFs serves every read ({why})"),
        }
    }
}

/// The passthrough state of a mount.
pub(crate) struct Passthrough {
    /// Asked for by the mount (and not turned off by [`PASSTHROUGH_ENV`]).
    wanted: bool,
    /// Granted at INIT and not refused by the probe: opens are answered
    /// for the whole mount (never ENOSYS, which would end them).
    granted: AtomicBool,
    /// Granted and not refused since: newly opened inodes get a backing id.
    on: AtomicBool,
    /// Why reads are served, once `on` is false.
    why_not: Mutex<String>,
    /// The backing id of each inode open for passthrough, with its opens.
    /// The kernel wants one id per inode for all its open files.
    backing: Mutex<HashMap<u64, (BackingId, u64)>>,
}

impl Passthrough {
    fn new(why_not: Option<String>) -> Passthrough {
        Passthrough {
            wanted: why_not.is_none(),
            granted: AtomicBool::new(false),
            on: AtomicBool::new(false),
            why_not: Mutex::new(why_not.unwrap_or_default()),
            backing: Mutex::new(HashMap::new()),
        }
    }

    fn grant(&self) {
        self.granted.store(true, Ordering::Release);
        self.on.store(true, Ordering::Release);
    }

    fn is_granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// No passthrough for this mount at all: before the first open, so
    /// opens can still be made to cost no request.
    pub(crate) fn refuse_before_opens(&self, why: String) {
        self.refuse(why);
        self.granted.store(false, Ordering::Release);
    }

    /// No passthrough for files opened from now on (those open keep theirs).
    fn refuse(&self, why: String) {
        *self.why_not.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.on.store(false, Ordering::Release);
    }

    pub(crate) fn read_path(&self) -> ReadPath {
        if self.is_on() {
            ReadPath::Passthrough
        } else {
            ReadPath::Served(
                self.why_not
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )
        }
    }

    /// Backing ids held (one per inode open for passthrough).
    pub(crate) fn backing_ids(&self) -> usize {
        self.backing.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

struct View {
    ino: u64,
    digest: Digest,
    live: bool,
}

/// What an open directory lists: a tree, and for the views root the inode
/// of each entry (views have theirs already).
#[derive(Clone)]
struct Listing {
    tree: Arc<Tree>,
    inos: Option<Arc<[u64]>>,
}

struct Node {
    parent: u64,
    name: Option<Name>,
    kind: NodeKind,
}

enum NodeKind {
    Dir {
        digest: Digest,
        /// Inode of each entry of the tree, by index; 0 until given out.
        children: OnceLock<Box<[AtomicU64]>>,
        nlink: OnceLock<u32>,
    },
    File {
        digest: Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Target,
    },
    /// The root of a [`Layers::Views`] mount.
    Views,
}

#[derive(Default)]
struct TreeCache {
    map: HashMap<Digest, (Arc<Tree>, u64)>,
    entries: usize,
    tick: u64,
}

impl TreeCache {
    fn get(&mut self, d: &Digest) -> Option<Arc<Tree>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(d).map(|(t, used)| {
            *used = tick;
            t.clone()
        })
    }

    fn insert(&mut self, d: Digest, t: Arc<Tree>) {
        self.tick += 1;
        self.entries += t.len() + 1;
        if let Some((old, _)) = self.map.insert(d, (t, self.tick)) {
            self.entries -= old.len() + 1;
        }
        if self.entries > TREE_CACHE_ENTRIES {
            // Drop the least recently used half; trees in use stay alive
            // through their `Arc`s.
            let mut ages: Vec<(u64, Digest)> =
                self.map.iter().map(|(d, (_, u))| (*u, *d)).collect();
            ages.sort_unstable();
            for (_, d) in ages.iter().take(ages.len() / 2) {
                if let Some((t, _)) = self.map.remove(d) {
                    self.entries -= t.len() + 1;
                }
            }
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl LayerFs {
    /// A filesystem serving `layers` from `store`, recording accesses when
    /// `trace` is set, asking the kernel for passthrough reads when
    /// `passthrough` is set. Fails when a layer's root tree is not in the
    /// store or a name of [`Layers::Named`] is invalid or repeated.
    pub fn new(store: Store, layers: &Layers, trace: bool, passthrough: bool) -> Result<LayerFs> {
        let why_not = if !passthrough {
            Some("this mount opens files without asking LayerFs".to_owned())
        } else if std::env::var_os(PASSTHROUGH_ENV).is_some_and(|v| v == "0") {
            Some(format!("{PASSTHROUGH_ENV}=0"))
        } else {
            None
        };
        let mut synthetic = HashMap::new();
        let root = root_kind(&store, layers, &mut synthetic)?;
        let shared_files = matches!(root, NodeKind::Views).then(|| Mutex::new(HashMap::new()));
        let root = Arc::new(Node {
            parent: ROOT_INO,
            name: None,
            kind: root,
        });
        Ok(LayerFs {
            inner: Arc::new(Inner {
                store,
                nodes: RwLock::new(vec![root]),
                trees: Mutex::new(TreeCache::default()),
                synthetic: RwLock::new(synthetic),
                views: Mutex::new(Default::default()),
                shared_files,
                by_inode: Mutex::new(Vec::with_capacity(OPEN_BLOBS)),
                dirs: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                trace: trace.then(|| Mutex::new(HashMap::new())),
                last_error: Mutex::new(None),
                passthrough: Passthrough::new(why_not),
                reads: AtomicU64::new(0),
            }),
        })
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

/// The root directory serving `layers`; made-up directories go to `synthetic`.
fn root_kind(
    store: &Store,
    layers: &Layers,
    synthetic: &mut HashMap<Digest, Arc<Tree>>,
) -> Result<NodeKind> {
    let digest = match layers {
        Layers::Views => return Ok(NodeKind::Views),
        Layers::One(d) => {
            if !store.has_tree(d)? {
                return Err(strata_store::Error::MissingTree(*d).into());
            }
            *d
        }
        Layers::Named(list) => {
            let mut paths = Vec::with_capacity(list.len());
            for (name, d) in list {
                let bad = |source| Error::BadLayerName {
                    name: name.clone(),
                    source,
                };
                let path = RelPath::parse(name.as_bytes()).map_err(bad)?;
                if path.is_root() {
                    return Err(bad(strata_store::Error::BadName {
                        name: name.clone(),
                        reason: "a layer name is empty",
                    }));
                }
                if !store.has_tree(d)? {
                    return Err(strata_store::Error::MissingTree(*d).into());
                }
                paths.push((path, *d, name));
            }
            if paths.is_empty() {
                let empty = Tree::empty();
                let d = empty.digest();
                synthetic.insert(d, Arc::new(empty));
                d
            } else {
                synthesize(&paths, 0, synthetic)?
            }
        }
    };
    Ok(NodeKind::Dir {
        digest,
        children: OnceLock::new(),
        nlink: OnceLock::new(),
    })
}

impl Inner {
    /// Adds the view `name` at the root of a [`Layers::Views`] mount.
    pub(crate) fn add_view(&self, name: &str, layers: &Layers) -> Result<()> {
        let bad = |reason: &'static str| Error::BadLayerName {
            name: name.to_owned(),
            source: strata_store::Error::BadName {
                name: name.to_owned(),
                reason,
            },
        };
        let root_is_views = self
            .node(ROOT_INO)
            .is_ok_and(|n| matches!(n.kind, NodeKind::Views));
        if !root_is_views {
            return Err(bad("this mount does not serve views"));
        }
        if matches!(layers, Layers::Views) {
            return Err(bad("a view cannot hold views"));
        }
        let key = Name::new(name.as_bytes().to_vec()).map_err(|source| Error::BadLayerName {
            name: name.to_owned(),
            source,
        })?;
        let mut made = HashMap::new();
        let kind = root_kind(&self.store, layers, &mut made)?;
        let NodeKind::Dir { digest, .. } = &kind else {
            return Err(bad("a view must be a directory"));
        };
        let digest = *digest;
        self.synthetic
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(made);
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if views.contains_key(&key) {
            return Err(bad("a view of this name was already served by this mount"));
        }
        let ino = {
            let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
            nodes.push(Arc::new(Node {
                parent: ROOT_INO,
                name: Some(key.clone()),
                kind,
            }));
            nodes.len() as u64
        };
        views.insert(
            key,
            View {
                ino,
                digest,
                live: true,
            },
        );
        Ok(())
    }

    /// Takes the view `name` away (what is open in it stays readable).
    pub(crate) fn remove_view(&self, name: &str) {
        let Ok(key) = Name::new(name.as_bytes().to_vec()) else {
            return;
        };
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = views.get_mut(&key) {
            v.live = false;
        }
    }

    /// The live views, as a listing of the root.
    fn views_listing(&self) -> Result<Listing> {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<(&Name, &View)> = views.iter().filter(|(_, v)| v.live).collect();
        let tree = Tree::from_entries(
            live.iter()
                .map(|(n, v)| ((*n).clone(), Entry::Dir { digest: v.digest }))
                .collect(),
        )?;
        Ok(Listing {
            tree: Arc::new(tree),
            inos: Some(live.iter().map(|(_, v)| v.ino).collect()),
        })
    }

    fn node(&self, ino: u64) -> std::result::Result<Arc<Node>, Errno> {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        ino.checked_sub(1)
            .and_then(|i| nodes.get(i as usize))
            .cloned()
            .ok_or_else(|| errno(libc::ENOENT))
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Errno {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{what}: {e}"));
        errno(libc::EIO)
    }

    /// The blob of file `ino`, for a read: one of the last [`OPEN_BLOBS`]
    /// read, else opened now.
    fn blob_of(&self, ino: u64) -> std::result::Result<Arc<dyn Blob>, Errno> {
        {
            let mut open = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = open.iter().rposition(|(n, _)| *n == ino) {
                let hit = open.remove(i);
                let blob = hit.1.clone();
                open.push(hit);
                return Ok(blob);
            }
        }
        let node = self.node(ino)?;
        let NodeKind::File { digest, .. } = &node.kind else {
            return Err(errno(libc::EISDIR));
        };
        let blob: Arc<dyn Blob> = Arc::from(
            self.store
                .blob(digest)
                .map_err(|e| self.fail("open a blob", e))?,
        );
        let mut open = self.by_inode.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= OPEN_BLOBS {
            open.remove(0);
        }
        open.push((ino, blob.clone()));
        Ok(blob)
    }

    fn tree(&self, digest: &Digest) -> std::result::Result<Arc<Tree>, Errno> {
        if let Some(t) = self
            .synthetic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(t.clone());
        }
        if let Some(t) = self
            .trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(t);
        }
        let t = Arc::new(
            self.store
                .tree(digest)
                .map_err(|e| self.fail("read a tree", e))?,
        );
        self.trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*digest, t.clone());
        Ok(t)
    }

    /// What the directory `node` lists.
    fn listing(&self, node: &Node) -> std::result::Result<Listing, Errno> {
        match node.kind {
            NodeKind::Views => self
                .views_listing()
                .map_err(|e| self.fail("list the views", e)),
            _ => Ok(Listing {
                tree: self.dir_tree(node)?,
                inos: None,
            }),
        }
    }

    fn dir_tree(&self, node: &Node) -> std::result::Result<Arc<Tree>, Errno> {
        match &node.kind {
            NodeKind::Dir { digest, .. } => self.tree(digest),
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    /// The inode of entry `idx` of the directory `dir` (inode `dir_ino`),
    /// given out on first use.
    fn child(&self, dir_ino: u64, dir: &Node, tree: &Tree, idx: usize) -> u64 {
        let NodeKind::Dir { children, .. } = &dir.kind else {
            return 0;
        };
        let slots = children.get_or_init(|| (0..tree.len()).map(|_| AtomicU64::new(0)).collect());
        let Some(slot) = slots.get(idx) else {
            return 0;
        };
        let ino = slot.load(Ordering::Acquire);
        if ino != 0 {
            return ino;
        }
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        // Another request may have given it out while we waited for the lock.
        let ino = slot.load(Ordering::Acquire);
        if ino != 0 {
            return ino;
        }
        let (name, entry) = &tree.entries()[idx];
        let shared_key = match (entry, &self.shared_files) {
            (
                Entry::File {
                    digest, executable, ..
                },
                Some(shared),
            ) => {
                let key = (*digest, *executable);
                if let Some(ino) = shared.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
                    slot.store(*ino, Ordering::Release);
                    return *ino;
                }
                Some(key)
            }
            _ => None,
        };
        let kind = match entry {
            Entry::Dir { digest } => NodeKind::Dir {
                digest: *digest,
                children: OnceLock::new(),
                nlink: OnceLock::new(),
            },
            Entry::File {
                digest,
                size,
                executable,
            } => NodeKind::File {
                digest: *digest,
                size: *size,
                executable: *executable,
            },
            Entry::Symlink { target } => NodeKind::Symlink {
                target: target.clone(),
            },
        };
        nodes.push(Arc::new(Node {
            parent: dir_ino,
            name: Some(name.clone()),
            kind,
        }));
        let ino = nodes.len() as u64;
        slot.store(ino, Ordering::Release);
        if let (Some(key), Some(shared)) = (shared_key, &self.shared_files) {
            shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, ino);
        }
        ino
    }

    fn attr(&self, ino: u64, node: &Node) -> std::result::Result<FileAttr, Errno> {
        let (kind, perm, size, nlink) = match &node.kind {
            NodeKind::Dir { nlink, .. } => {
                let n = match nlink.get() {
                    Some(n) => *n,
                    None => {
                        let tree = self.dir_tree(node)?;
                        let subdirs = tree
                            .entries()
                            .iter()
                            .filter(|(_, e)| matches!(e, Entry::Dir { .. }))
                            .count();
                        let n = u32::try_from(subdirs + 2).unwrap_or(u32::MAX);
                        *nlink.get_or_init(|| n)
                    }
                };
                (FileType::Directory, 0o755, 4096, n)
            }
            NodeKind::File {
                size, executable, ..
            } => (
                FileType::RegularFile,
                if *executable { 0o755 } else { 0o644 },
                *size,
                1,
            ),
            NodeKind::Symlink { target } => {
                (FileType::Symlink, 0o777, target.as_bytes().len() as u64, 1)
            }
            NodeKind::Views => (FileType::Directory, 0o755, 4096, 2),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(FIXED_MTIME.max(0) as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        })
    }

    fn note(&self, ino: u64, what: u8) {
        if let Some(t) = &self.trace {
            *t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(ino)
                .or_insert(0) |= what;
        }
    }

    /// The path of an inode inside the mount.
    fn path_of(&self, ino: u64) -> RelPath {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        let mut names = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let Some(n) = cur.checked_sub(1).and_then(|i| nodes.get(i as usize)) else {
                break;
            };
            if let Some(name) = &n.name {
                names.push(name.clone());
            }
            cur = n.parent;
        }
        names.reverse();
        RelPath::from_names(names)
    }

    /// A snapshot of the trace, `None` when the mount is not traced.
    pub(crate) fn trace(&self) -> Option<AccessTrace> {
        let t = self.trace.as_ref()?;
        let seen: Vec<(u64, u8)> = t
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, f)| (*i, *f))
            .collect();
        Some(AccessTrace::new(
            seen.into_iter()
                .map(|(ino, f)| TracedPath {
                    path: self.path_of(ino),
                    looked_up: f & LOOKED_UP != 0,
                    listed: f & LISTED != 0,
                    read: f & READ != 0,
                })
                .collect(),
        ))
    }

    /// Read requests served so far.
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn kind_of(node: &Node) -> FileType {
        match node.kind {
            NodeKind::Dir { .. } | NodeKind::Views => FileType::Directory,
            NodeKind::File { .. } => FileType::RegularFile,
            NodeKind::Symlink { .. } => FileType::Symlink,
        }
    }
}

/// Builds the made-up directories holding named layers at `depth` of their
/// paths; returns the digest of the directory for this level.
fn synthesize(
    paths: &[(RelPath, Digest, &String)],
    depth: usize,
    out: &mut HashMap<Digest, Arc<Tree>>,
) -> Result<Digest> {
    let mut groups: std::collections::BTreeMap<&Name, Vec<(RelPath, Digest, &String)>> =
        Default::default();
    for (path, d, name) in paths {
        let c = &path.components()[depth];
        groups.entry(c).or_default().push((path.clone(), *d, *name));
    }
    let mut entries = Vec::with_capacity(groups.len());
    for (c, members) in groups {
        let leaf: Vec<_> = members
            .iter()
            .filter(|(p, _, _)| p.components().len() == depth + 1)
            .collect();
        let digest = match (leaf.as_slice(), members.len()) {
            ([(_, d, _)], 1) => *d,
            ([], _) => synthesize(&members, depth + 1, out)?,
            (list, _) => {
                let name = list
                    .first()
                    .map_or_else(String::new, |(_, _, n)| (*n).clone());
                return Err(Error::BadLayerName {
                    name: name.clone(),
                    source: strata_store::Error::BadName {
                        name,
                        reason: "the name is given twice, or is also the parent of another layer",
                    },
                });
            }
        };
        entries.push((c.clone(), Entry::Dir { digest }));
    }
    let tree = Tree::from_entries(entries)?;
    let digest = tree.digest();
    out.insert(digest, Arc::new(tree));
    Ok(digest)
}

/// Up to `len` bytes of `blob` from `offset` (fewer at its end).
fn read_up_to(blob: &dyn Blob, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = blob.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// Lists one directory lazily from an offset: position 0 is `.`, 1 is `..`,
/// then the tree's entries in order. An entry's offset is the position of
/// the next one, so any offset the kernel hands back resumes exactly there.
struct DirIter {
    fs: Arc<Inner>,
    ino: u64,
    node: Arc<Node>,
    tree: Arc<Tree>,
    /// The inode of each entry, when they are not given out by `child`.
    inos: Option<Arc<[u64]>>,
    pos: u64,
}

struct Listed {
    ino: u64,
    kind: FileType,
    name: OsString,
    offset: u64,
    node: Arc<Node>,
}

impl DirIter {
    fn next_entry(&mut self) -> Option<std::result::Result<Listed, Errno>> {
        let pos = self.pos;
        let total = self.tree.len() as u64 + 2;
        if pos >= total {
            return None;
        }
        self.pos += 1;
        let offset = pos + 1;
        let res = match pos {
            0 => Ok(Listed {
                ino: self.ino,
                kind: FileType::Directory,
                name: OsString::from("."),
                offset,
                node: self.node.clone(),
            }),
            1 => self.fs.node(self.node.parent).map(|parent| Listed {
                ino: self.node.parent,
                kind: FileType::Directory,
                name: OsString::from(".."),
                offset,
                node: parent,
            }),
            _ => {
                let idx = (pos - 2) as usize;
                let ino = match &self.inos {
                    Some(inos) => inos.get(idx).copied().unwrap_or(0),
                    None => self.fs.child(self.ino, &self.node, &self.tree, idx),
                };
                self.fs.node(ino).map(|node| Listed {
                    ino,
                    kind: Inner::kind_of(&node),
                    name: self.tree.entries()[idx].0.as_os_str().to_owned(),
                    offset,
                    node,
                })
            }
        };
        Some(res)
    }
}

impl LayerFs {
    fn dir_iter(&self, ino: u64, fh: u64, offset: u64) -> std::result::Result<DirIter, Errno> {
        let fs = &self.inner;
        let node = fs.node(ino)?;
        let held = fs
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned();
        let listing = match held {
            Some(l) => l,
            None => fs.listing(&node)?,
        };
        Ok(DirIter {
            fs: fs.clone(),
            ino,
            node,
            tree: listing.tree,
            inos: listing.inos,
            pos: offset,
        })
    }

    fn lookup_entry(&self, parent: u64, name: &OsStr) -> std::result::Result<FileAttr, Errno> {
        let fs = &self.inner;
        let pnode = fs.node(parent)?;
        if let NodeKind::Views = pnode.kind {
            // Views come and go: a miss is an error reply, which the kernel
            // does not cache, and a hit names a view that never changes.
            let ino = Name::new(name.as_bytes().to_vec())
                .ok()
                .and_then(|key| {
                    let views = fs.views.lock().unwrap_or_else(|p| p.into_inner());
                    views.get(&key).filter(|v| v.live).map(|v| v.ino)
                })
                .ok_or_else(|| errno(libc::ENOENT))?;
            let node = fs.node(ino)?;
            fs.note(ino, LOOKED_UP);
            return fs.attr(ino, &node);
        }
        let tree = fs.dir_tree(&pnode)?;
        match tree
            .entries()
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
        {
            Ok(idx) => {
                let ino = fs.child(parent, &pnode, &tree, idx);
                let node = fs.node(ino)?;
                fs.note(ino, LOOKED_UP);
                fs.attr(ino, &node)
            }
            // A reply with inode 0 is a negative entry the kernel caches
            // too: compilers probing include paths ask again and again.
            Err(_) => {
                let mut attr = fs.attr(parent, &pnode)?;
                attr.ino = INodeNo(0);
                Ok(attr)
            }
        }
    }

    /// Answers an open of the file `ino` on a traced or passthrough mount.
    fn open_file(&self, ino: u64, reply: ReplyOpen) {
        let fs = &self.inner;
        fs.note(ino, READ);
        let reply = match self.open_backing(ino, reply) {
            Ok(()) => return,
            Err((reply, None)) => reply,
            Err((reply, Some(e))) => {
                // Whatever the cause (no CAP_SYS_ADMIN, blobs on a stacked
                // filesystem), it holds for the store's other blobs too.
                fs.passthrough
                    .refuse(format!("the kernel refused a blob as backing file: {e}"));
                reply
            }
        };
        // No handle: reads are served by inode, as without opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Answers with the blob file of `ino` as the backing file: the same
    /// backing id as its other opens, or one registered now (the blob's
    /// descriptor is closed at once; the kernel holds the file). Gives the
    /// reply back when the file is to be read through LayerFs, with the
    /// kernel's error when it refused the blob.
    fn open_backing(
        &self,
        ino: u64,
        reply: ReplyOpen,
    ) -> std::result::Result<(), (ReplyOpen, Option<std::io::Error>)> {
        let fs = &self.inner;
        let mut backing = fs
            .passthrough
            .backing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // An inode open for passthrough stays so: the kernel refuses a
        // cached open of it meanwhile (ETXTBSY).
        if let Some((id, uses)) = backing.get_mut(&ino) {
            *uses += 1;
            reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), id);
            return Ok(());
        }
        if !fs.passthrough.is_on() {
            return Err((reply, None));
        }
        let blob = match fs.node(ino).map(|n| match &n.kind {
            NodeKind::File { digest, .. } => fs.store.blob(digest).ok(),
            _ => None,
        }) {
            Ok(Some(blob)) => blob,
            // Reads will say what is wrong.
            _ => return Err((reply, None)),
        };
        // A blob kept in memory has no file to hand over.
        let Some(file) = blob.file() else {
            return Err((reply, None));
        };
        match reply.open_backing(file) {
            Ok(id) => {
                reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), &id);
                backing.insert(ino, (id, 1));
                Ok(())
            }
            Err(e) => Err((reply, Some(e))),
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let offered = config.capabilities();
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        let _ = config.add_capabilities(wanted & offered);
        let pt = &self.inner.passthrough;
        if pt.wanted {
            if !offered.contains(InitFlags::FUSE_PASSTHROUGH) {
                pt.refuse_before_opens(
                    "the kernel offers no FUSE passthrough (Linux 6.9+)".to_owned(),
                );
            } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                // Blob files on a plain filesystem; the mount itself may
                // still be the lower layer of an overlay.
                && config.set_max_stack_depth(1).is_ok()
            {
                pt.grant();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_entry(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .inner
            .node(ino.0)
            .and_then(|n| self.inner.attr(ino.0, &n))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(errno(libc::EROFS))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inner.node(ino.0) {
            Ok(node) => match &node.kind {
                NodeKind::Symlink { target } => {
                    self.inner.note(ino.0, READ);
                    reply.data(target.as_bytes())
                }
                _ => reply.error(errno(libc::EINVAL)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = &self.inner;
        let node = match fs.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let NodeKind::File { .. } = &node.kind else {
            return reply.error(errno(libc::EISDIR));
        };
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(errno(libc::EROFS));
        }
        if fs.trace.is_none() && !fs.passthrough.is_granted() {
            // From now on the kernel opens files without asking (see the
            // module's doc); only a traced or passthrough mount sees opens.
            return reply.error(errno(libc::ENOSYS));
        }
        self.open_file(ino.0, reply)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = &self.inner;
        fs.reads.fetch_add(1, Ordering::Relaxed);
        let blob = match fs.blob_of(ino.0) {
            Ok(b) => b,
            Err(e) => return reply.error(e),
        };
        let len = (size as u64).min(blob.size().saturating_sub(offset)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        let answer = move |fs: &Inner, blob: &dyn Blob, reply: ReplyData| match read_up_to(
            blob, len, offset,
        ) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fs.fail("read a blob", e)),
        };
        match crate::mount::runtime() {
            // Large reads leave the session's thread free for other requests.
            Ok(rt) if len > INLINE_READ => {
                let fs = fs.clone();
                rt.spawn_blocking(move || answer(&fs, &*blob, reply));
            }
            _ => answer(fs, &*blob, reply),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == PASSTHROUGH_FH {
            let mut backing = self
                .inner
                .passthrough
                .backing
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((_, uses)) = backing.get_mut(&ino.0) {
                *uses -= 1;
                if *uses == 0 {
                    // Dropping the id closes it: the kernel lets go of the
                    // blob file once no open file uses it.
                    backing.remove(&ino.0);
                }
            }
        }
        reply.ok()
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only filesystem; ENOSYS tells the kernel
        // to stop sending flush on every close.
        reply.error(errno(libc::ENOSYS))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self
            .inner
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        reply.statfs(
            0,
            0,
            0,
            files,
            0,
            BLKSIZE,
            strata_store::NAME_MAX as u32,
            BLKSIZE,
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = &self.inner;
        let listing = match fs.node(ino.0).and_then(|n| Ok((fs.listing(&n)?, n))) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let (listing, node) = listing;
        // The views root changes: its listing must not be cached.
        let flags = match node.kind {
            NodeKind::Views => FopenFlags::empty(),
            _ => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        };
        let fh = fs.next_fh.fetch_add(1, Ordering::Relaxed);
        fs.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, listing);
        fs.note(ino.0, LISTED);
        reply.opened(FileHandle(fh), flags)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut it = match self.dir_iter(ino.0, fh.0, offset) {
            Ok(it) => it,
            Err(e) => return reply.error(e),
        };
        while let Some(entry) = it.next_entry() {
            match entry {
                // Full: the kernel asks again from this entry's offset.
                Ok(l) => {
                    if reply.add(INodeNo(l.ino), l.offset, l.kind, &l.name) {
                        break;
                    }
                }
                Err(e) => return reply.error(e),
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let mut it = match self.dir_iter(ino.0, fh.0, offset) {
            Ok(it) => it,
            Err(e) => return reply.error(e),
        };
        while let Some(entry) = it.next_entry() {
            let attr = entry.and_then(|l| Ok((self.inner.attr(l.ino, &l.node)?, l)));
            match attr {
                Ok((attr, l)) => {
                    if reply.add(
                        INodeNo(l.ino),
                        l.offset,
                        &l.name,
                        &TTL,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                Err(e) => return reply.error(e),
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok()
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if let Err(e) = self.inner.node(ino.0) {
            return reply.error(e);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(errno(libc::EROFS));
        }
        reply.ok()
    }
}
