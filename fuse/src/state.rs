//! Records of live mounts and work directories, so that what a crashed
//! process left behind is found and cleaned by the next one.
//!
//! One JSON file per mount or work directory in [`state_dir`], written before
//! anything is mounted and removed after everything is cleaned up. It names
//! the owning process (pid and start time, which survive pid reuse), the
//! mount points in unmount order and the scratch directory to remove.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::{sys, Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    pid: u32,
    start_time: Option<u64>,
    what: String,
    /// Unmounted in this order.
    mounts: Vec<PathBuf>,
    /// Removed after the mounts are gone.
    scratch: Option<PathBuf>,
    created: u64,
    /// The owner unmounts and exits on SIGTERM (`ci mount`).
    #[serde(default)]
    stop_on_sigterm: bool,
}

/// Removes its record when dropped.
#[derive(Debug)]
pub(crate) struct RecordGuard {
    path: PathBuf,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where records live: `$XDG_RUNTIME_DIR/strata/mounts`, else
/// `/run/strata/mounts` for root, else `$TMPDIR/strata-UID/mounts`.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return dir.join("strata").join("mounts");
        }
    }
    if sys::is_root() {
        return PathBuf::from("/run/strata/mounts");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir()
        .join(format!("strata-{uid}"))
        .join("mounts")
}

fn ensure_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(Error::io("create", &dir))?;
    Ok(dir)
}

/// Writes a record for this process; it is removed when the guard drops.
pub(crate) fn record(
    what: &str,
    mounts: &[PathBuf],
    scratch: Option<&Path>,
    stop_on_sigterm: bool,
) -> Result<RecordGuard> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = ensure_dir()?;
    let pid = std::process::id();
    let rec = Record {
        pid,
        start_time: sys::process_start_time(pid),
        what: what.to_owned(),
        mounts: mounts.to_vec(),
        scratch: scratch.map(Path::to_owned),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        stop_on_sigterm,
    };
    let name = format!("{pid}-{}.json", SEQ.fetch_add(1, Ordering::Relaxed));
    let path = dir.join(name);
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(&rec).map_err(|source| Error::BadRecord {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&tmp, bytes).map_err(Error::io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("write", &path))?;
    Ok(RecordGuard { path })
}

/// What [`cleanup_stale`] did for one dead process's mount or work directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleaned {
    /// The process that died.
    pub pid: u32,
    /// What it had mounted, e.g. `layer 1a2b3c4d5e6f` or `work directory`.
    pub what: String,
    /// Mount points unmounted (lazily: nobody served them any more).
    pub unmounted: Vec<PathBuf>,
    /// Scratch directories removed.
    pub removed: Vec<PathBuf>,
    /// Leftovers that could not be cleaned, each with the reason.
    pub problems: Vec<String>,
}

impl std::fmt::Display for Cleaned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cleaned up after process {} (it died), {}:",
            self.pid, self.what
        )?;
        for p in &self.unmounted {
            write!(f, " unmounted `{}`;", p.display())?;
        }
        for p in &self.removed {
            write!(f, " removed `{}`;", p.display())?;
        }
        for p in &self.problems {
            write!(f, " could not clean: {p};")?;
        }
        if self.unmounted.is_empty() && self.removed.is_empty() && self.problems.is_empty() {
            write!(f, " nothing was left")?;
        }
        Ok(())
    }
}

/// A mount or work directory whose process is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveMount {
    /// The process serving it.
    pub pid: u32,
    /// What is mounted, e.g. `layer 1a2b3c4d5e6f`.
    pub what: String,
    /// Its mount points.
    pub mounts: Vec<PathBuf>,
}

fn read_records(dir: &Path) -> Result<Vec<(PathBuf, Record)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", dir))?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) => out.push((path, r)),
            Err(source) => return Err(Error::BadRecord { path, source }),
        }
    }
    Ok(out)
}

/// Mounts and work directories of processes that are still running.
pub fn live_mounts() -> Result<Vec<LiveMount>> {
    Ok(read_records(&state_dir())?
        .into_iter()
        .filter(|(_, r)| sys::process_alive(r.pid, r.start_time))
        .map(|(_, r)| LiveMount {
            pid: r.pid,
            what: r.what,
            mounts: r.mounts,
        })
        .collect())
}

/// The live process that recorded a mount at `path`.
pub(crate) struct Owner {
    pub pid: u32,
    pub start_time: Option<u64>,
    pub stop_on_sigterm: bool,
}

pub(crate) fn owner_of(path: &Path) -> Result<Option<Owner>> {
    Ok(read_records(&state_dir())?
        .into_iter()
        .find(|(_, r)| {
            r.mounts.iter().any(|m| m == path) && sys::process_alive(r.pid, r.start_time)
        })
        .map(|(_, r)| Owner {
            pid: r.pid,
            start_time: r.start_time,
            stop_on_sigterm: r.stop_on_sigterm,
        }))
}

/// Finds every record of a process that died, unmounts its mounts (lazily,
/// since nobody serves them any more), removes its scratch directories and
/// the record. Returns one [`Cleaned`] per record, for the caller to print.
///
/// Call once at startup (`ci mount`, the engine before a build). Safe to run
/// from several processes at once: each record is claimed by one.
pub fn cleanup_stale() -> Result<Vec<Cleaned>> {
    let dir = state_dir();
    let mut out = Vec::new();
    for (path, rec) in read_records(&dir)? {
        if sys::process_alive(rec.pid, rec.start_time) {
            continue;
        }
        // Claim the record: of several cleaners, one rename wins.
        let claimed = path.with_extension(format!("cleaning-{}", std::process::id()));
        if std::fs::rename(&path, &claimed).is_err() {
            continue;
        }
        let mut c = Cleaned {
            pid: rec.pid,
            what: rec.what.clone(),
            unmounted: Vec::new(),
            removed: Vec::new(),
            problems: Vec::new(),
        };
        clean(&rec, &mut c);
        if c.problems.is_empty() {
            let _ = std::fs::remove_file(&claimed);
        } else {
            // Keep it for the next run to try again.
            let _ = std::fs::rename(&claimed, &path);
        }
        out.push(c);
    }
    Ok(out)
}

fn clean(rec: &Record, c: &mut Cleaned) {
    for m in &rec.mounts {
        // Nested mounts first (e.g. something a task mounted inside).
        let mut below = sys::mounts_below(m).unwrap_or_default();
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in below.iter().chain(std::iter::once(m)) {
            match sys::mount_at(p) {
                Ok(Some(_)) => match sys::unmount_any(p, true) {
                    Ok(()) => c.unmounted.push(p.clone()),
                    Err(e) => c.problems.push(format!(
                        "`{}` is still mounted ({e}); run `umount -l {}` as root",
                        p.display(),
                        p.display()
                    )),
                },
                Ok(None) => {}
                Err(e) => c.problems.push(format!("cannot read the mount table: {e}")),
            }
        }
    }
    if let Some(scratch) = &rec.scratch {
        if !c.problems.is_empty() {
            c.problems.push(format!(
                "`{}` was kept because a mount inside it remains",
                scratch.display()
            ));
            return;
        }
        match crate::workdir::remove_tree(scratch) {
            Ok(true) => c.removed.push(scratch.clone()),
            Ok(false) => {}
            Err(e) => c
                .problems
                .push(format!("cannot remove `{}`: {e}", scratch.display())),
        }
    }
}
