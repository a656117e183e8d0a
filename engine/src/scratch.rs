//! Where a run's tasks work: `<store>/work/<run>/`.
//!
//! - One directory per job slot (`s0`, `s1`, …), reused task after task: its
//!   empty work directory `wd`, the `log` and the `context` file are
//!   truncated, never deleted and made again. On ext4 without a journal,
//!   allocating an inode scans past every inode deleted in the last minutes,
//!   so a short task that makes and deletes a dozen files spends more on that
//!   than on its command.
//! - One FUSE mount (`in/`) serving every task's inputs as a view
//!   ([`Layers::Views`]): nothing is copied, and inputs are read-only even for
//!   root. Where FUSE does not work (or `inputs = "copy"`), inputs are checked
//!   out into the slot and deleted after the task.
//!
//! - The run's job tokens: `-j N` lets N commands (or merges, or source
//!   ingests) run at once. A task takes a token for its command only, so
//!   preparing the next task and capturing the last one's output overlap
//!   with the commands running.
//!
//! The whole directory goes when the run ends (the mount first); a crashed
//! run's is removed by the next build ([`crate::build`]'s `clean_scratch`) and
//! its mount by `strata_fuse::cleanup_stale`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use strata_fuse::{mount_layers, AllowOther, Layers, MountHandle, MountOptions};
use strata_store::Store;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink};
use crate::model::InputMode;
use crate::BuildError;

pub(crate) struct Scratch {
    root: PathBuf,
    store: Store,
    mode: Option<InputMode>,
    events: EventSink,
    /// Made on first use, so a build where every task is cached mounts nothing.
    inputs: OnceLock<Option<MountHandle>>,
    init: Mutex<()>,
    free: Mutex<Vec<PathBuf>>,
    slots: AtomicUsize,
    views: AtomicU64,
    jobs: Semaphore,
    /// The blobs of every input layer found complete in this run, so that
    /// a layer's trees are read once per run, not once per reader.
    complete:
        Mutex<std::collections::HashMap<strata_store::Digest, Arc<Vec<strata_store::Digest>>>>,
}

impl Scratch {
    /// Nothing is made yet: the directory, the slots and the inputs mount
    /// come on first use. `jobs` (at least 1) commands may run at once.
    pub(crate) fn new(
        store: Store,
        root: PathBuf,
        mode: Option<InputMode>,
        events: EventSink,
        jobs: usize,
    ) -> Scratch {
        Scratch {
            root,
            store,
            mode,
            events,
            inputs: OnceLock::new(),
            init: Mutex::new(()),
            free: Mutex::new(Vec::new()),
            slots: AtomicUsize::new(0),
            views: AtomicU64::new(0),
            jobs: Semaphore::new(jobs.max(1)),
            complete: Mutex::new(Default::default()),
        }
    }

    /// Whether the run's inputs mount has answered a read with an error
    /// (a blob gone from the store reads as `EIO`).
    pub(crate) fn mount_failed(&self) -> bool {
        self.inputs
            .get()
            .and_then(|m| m.as_ref())
            .is_some_and(|m| m.last_error().is_some())
    }

    /// The first object of `layer` that is not stored, or `None`. Before a
    /// command (`again` false) a layer found complete earlier in the run is
    /// not looked at again; after one (`again` true), its blob files are
    /// checked to still exist (no tree goes during a run: the build holds
    /// the store's write lock, so no other process writes the index).
    pub(crate) fn first_missing(
        &self,
        layer: strata_store::Digest,
        again: bool,
    ) -> Result<Option<strata_store::Digest>, BuildError> {
        let known = self
            .complete
            .lock()
            .ok()
            .and_then(|m| m.get(&layer).cloned());
        if let Some(blobs) = known {
            if !again {
                return Ok(None);
            }
            for b in blobs.iter() {
                if !self.store.blobs().contains(b)? {
                    return Ok(Some(*b));
                }
            }
            return Ok(None);
        }
        let closure = match self.store.closure(&[layer]) {
            Ok(c) => c,
            // Held only remotely: fetched, every object checked, when the
            // task's directories are made.
            Err(strata_store::Error::MissingTree(d))
                if d == layer && self.store.remote_layer(&layer)?.is_some() =>
            {
                return Ok(None)
            }
            Err(strata_store::Error::MissingTree(d)) => return Ok(Some(d)),
            Err(e) => return Err(e.into()),
        };
        for (b, _) in &closure.blobs {
            if !self.store.blobs().contains(b)? {
                return Ok(Some(*b));
            }
        }
        let blobs = closure.blobs.into_iter().map(|(b, _)| b).collect();
        if let Ok(mut m) = self.complete.lock() {
            m.insert(layer, Arc::new(blobs));
        }
        Ok(None)
    }

    /// Waits for a job token (first come, first served); `None` when
    /// `cancel` fires first.
    pub(crate) async fn job(&self, cancel: &CancellationToken) -> Option<SemaphorePermit<'_>> {
        tokio::select! {
            p = self.jobs.acquire() => p.ok(),
            _ = cancel.cancelled() => None,
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The inputs mount, when inputs are views: mounted on the first call,
    /// which also says once how inputs are laid out. Blocks.
    pub(crate) fn inputs(&self) -> Result<Option<&MountHandle>, BuildError> {
        if let Some(m) = self.inputs.get() {
            return Ok(m.as_ref());
        }
        let _one_at_a_time = self.init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = self.inputs.get() {
            return Ok(m.as_ref());
        }
        let (mount, note) = self.mount_inputs()?;
        self.events.send(Event::Note { message: note });
        Ok(self.inputs.get_or_init(|| mount).as_ref())
    }

    fn mount_inputs(&self) -> Result<(Option<MountHandle>, String), BuildError> {
        let mode = self.mode;
        if mode == Some(InputMode::Copy) {
            return Ok((
                None,
                "inputs: copies (`inputs = \"copy\"` in ci.toml)".into(),
            ));
        }
        if mode.is_none() {
            if let Some(why) = strata_fuse::fuse_problem() {
                return Ok((None, format!("inputs: copies ({why})")));
            }
        }
        let at = self.root.join("in");
        std::fs::create_dir_all(&at).map_err(BuildError::io("create", &at))?;
        let opts = MountOptions {
            allow_other: AllowOther::IfPermitted,
            trace: false,
            stop_on_sigterm: false,
        };
        match mount_layers(&self.store, &Layers::Views, &at, &opts) {
            Ok(m) => Ok((
                Some(m),
                "inputs: read-only FUSE views, nothing copied".into(),
            )),
            // Asked for explicitly: no silent fallback.
            Err(e) if mode.is_some() => Err(e.into()),
            Err(e) => {
                let _ = std::fs::remove_dir(&at);
                Ok((
                    None,
                    format!(
                        "inputs: copies (FUSE failed: {})",
                        crate::build::error_chain(&e)
                    ),
                ))
            }
        }
    }

    /// Whether the inputs mount is made already (calling [`Scratch::inputs`]
    /// then does not block).
    pub(crate) fn inputs_mounted(&self) -> bool {
        matches!(self.inputs.get(), Some(Some(_)))
    }

    /// A name for a view, never used before in this run.
    pub(crate) fn view_name(&self, slug: &str) -> String {
        let n = self.views.fetch_add(1, Ordering::Relaxed);
        format!("{n}-{slug}")
    }

    /// A slot directory for one attempt: reused when one is free, else made.
    pub(crate) fn slot(self: &Arc<Self>) -> Result<Slot, BuildError> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let dir = match reused {
            Some(d) => d,
            None => {
                let n = self.slots.fetch_add(1, Ordering::Relaxed);
                let d = self.root.join(format!("s{n}"));
                let wd = d.join("wd");
                std::fs::create_dir_all(&wd).map_err(BuildError::io("create", &wd))?;
                d
            }
        };
        Ok(Slot {
            scratch: self.clone(),
            dir,
            clean: false,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The mount first: removing through it would fail (read-only), and a
        // directory with a mount inside cannot go.
        if let Some(Some(m)) = self.inputs.take() {
            let _ = m.unmount();
        }
        let _ = strata_fuse::remove_tree(&self.root);
    }
}

/// One attempt's directory. Given back for the next attempt when the attempt
/// left it as it found it ([`Slot::reusable`]); otherwise it stays aside until
/// the run's directory is removed.
pub(crate) struct Slot {
    scratch: Arc<Scratch>,
    dir: PathBuf,
    clean: bool,
}

impl Slot {
    /// Where each thing of an attempt goes in this slot.
    pub(crate) fn paths(&self) -> SlotPaths {
        SlotPaths {
            dir: self.dir.clone(),
            work: self.dir.join("wd"),
            inputs: self.dir.join("in"),
            prev: self.dir.join("prev"),
            prev_in: self.dir.join("prev-in"),
            log: self.dir.join("log"),
            context: self.dir.join("context"),
        }
    }

    /// Marks the slot as left as found: its work directory and `in/` empty,
    /// nothing else in it but the log and context files.
    pub(crate) fn reusable(&mut self) {
        self.clean = true;
    }
}

/// The paths of a slot by role (owned: they travel to blocking threads).
#[derive(Clone, Debug)]
pub(crate) struct SlotPaths {
    /// The slot itself; a transform's work directory is made inside.
    pub(crate) dir: PathBuf,
    /// The empty work directory of a task without a base layer.
    pub(crate) work: PathBuf,
    /// `$CI_IN` of a task that reads nothing, and where copied inputs go.
    pub(crate) inputs: PathBuf,
    /// A copied previous output.
    pub(crate) prev: PathBuf,
    /// Copies of the previous run's inputs, one directory per mount name.
    pub(crate) prev_in: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) context: PathBuf,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.clean {
            self.scratch
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(std::mem::take(&mut self.dir));
        }
    }
}
