//! Access tracing: which paths of a mount were looked up, listed or read.

use strata_store::RelPath;

/// How one path of a traced mount was used. A path appears once, with every
/// kind of use seen while the mount was up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TracedPath {
    /// The path inside the mount (for a multi-layer mount the first
    /// component is the layer's name).
    pub path: RelPath,
    /// The path was resolved (`stat`, `open`, `cd` through it…).
    pub looked_up: bool,
    /// The directory was listed (`readdir`).
    pub listed: bool,
    /// The file was opened or the symlink read.
    pub read: bool,
}

/// Every path a traced mount served, sorted by path.
///
/// The kernel caches what LayerFs returns, so each path is seen by LayerFs
/// at least once per mount when it is used, but not every time: a trace says
/// *whether* a path was used, never how often.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AccessTrace {
    paths: Vec<TracedPath>,
}

impl AccessTrace {
    pub(crate) fn new(mut paths: Vec<TracedPath>) -> AccessTrace {
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        AccessTrace { paths }
    }

    /// Every traced path, sorted.
    pub fn paths(&self) -> &[TracedPath] {
        &self.paths
    }

    /// The files opened and symlinks read.
    pub fn read(&self) -> impl Iterator<Item = &RelPath> {
        self.paths.iter().filter(|p| p.read).map(|p| &p.path)
    }

    /// The directories listed.
    pub fn listed(&self) -> impl Iterator<Item = &RelPath> {
        self.paths.iter().filter(|p| p.listed).map(|p| &p.path)
    }

    /// The entry recorded for exactly `path`, if it was used at all.
    pub fn get(&self, path: &RelPath) -> Option<&TracedPath> {
        self.paths
            .binary_search_by(|p| p.path.cmp(path))
            .ok()
            .map(|i| &self.paths[i])
    }

    /// Whether `dir` was listed or anything below it was used: the question
    /// "did the task use this input at all?" for an input mounted at `dir` of
    /// a multi-layer mount. Only looking `dir` itself up does not count.
    pub fn used_below(&self, dir: &RelPath) -> bool {
        let depth = dir.components().len();
        self.paths.iter().any(|p| {
            p.path.components().len() >= depth
                && p.path.components()[..depth] == *dir.components()
                && (p.read || p.listed || p.path.components().len() > depth)
        })
    }
}
