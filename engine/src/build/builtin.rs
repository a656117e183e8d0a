//! The built-in kinds, which run no command: merges, local and git
//! sources, and the event sources (timers, webhooks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_store::{Digest, IngestOptions, Lineage, MergePolicy};
use tokio_util::sync::CancellationToken;

use crate::key::ActionPreimage;
use crate::model::{self, OnConflict, Task, TaskKind};
use crate::record::{now_ms, TaskRecord, TaskState};
use crate::scratch::Scratch;
use crate::{BuildError, Label};

use super::{cancelled, quoted, slug, BuildOptions, Done, Engine};

impl Engine {
    /// A merge's action key preimage and the labels of its sides.
    pub(crate) fn merge_action(
        m: &model::Merge,
        inputs: &[(Label, Done)],
    ) -> (ActionPreimage, BTreeMap<String, String>) {
        let by_label: BTreeMap<&Label, &Done> = inputs.iter().map(|(l, d)| (l, d)).collect();
        let base = by_label[&m.base].output;
        let sides: Vec<Digest> = m.sides.iter().map(|s| by_label[s].output).collect();
        let mut pre = ActionPreimage::new("merge", "store");
        pre.base = Some(base);
        pre.context = Self::inherited_context(inputs);
        for (i, s) in sides.iter().enumerate() {
            pre.inputs.insert(format!("side{i:03}"), *s);
        }
        pre.extra.insert(
            "on_conflict".into(),
            format!("{:?}", m.on_conflict).to_lowercase(),
        );
        let input_labels: BTreeMap<String, String> = m
            .sides
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("side{i:03}"), s.to_string()))
            .collect();
        (pre, input_labels)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_merge(
        &self,
        task: &Task,
        m: &model::Merge,
        inputs: &[(Label, Done)],
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let by_label: BTreeMap<&Label, &Done> = inputs.iter().map(|(l, d)| (l, d)).collect();
        let base = by_label[&m.base].output;
        let sides: Vec<Digest> = m.sides.iter().map(|s| by_label[s].output).collect();
        let policy = match m.on_conflict {
            OnConflict::Fail => MergePolicy::Fail,
            OnConflict::Ours => MergePolicy::Ours,
            OnConflict::Theirs => MergePolicy::Theirs,
        };
        let (pre, input_labels) = Self::merge_action(m, inputs);
        if self
            .try_cache(&label, &pre, &input_labels, run_id, rec)
            .await?
        {
            return Ok(());
        }
        let read: Vec<Digest> = std::iter::once(base).chain(sides.iter().copied()).collect();
        self.fetch_inputs(&read).await?;
        let Some(_token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let store = self.inner.store.clone();
        let merged = tokio::task::spawn_blocking(
            move || -> Result<Result<Digest, Vec<String>>, BuildError> {
                let mut acc = sides[0];
                let mut conflicts = Vec::new();
                for side in &sides[1..] {
                    let out = store.merge(&base, &acc, side, policy)?;
                    conflicts.extend(out.conflicts.iter().map(|p| p.to_string()));
                    match out.merged {
                        Some(d) => acc = d,
                        None => return Ok(Err(conflicts)),
                    }
                }
                store.record_layer(
                    &acc,
                    Some(&Lineage {
                        parent: Some(base),
                        task: None,
                        how: "merge".into(),
                        created: now_ms() / 1000,
                    }),
                )?;
                Ok(Ok(acc))
            },
        )
        .await
        .map_err(|e| BuildError::Join(e.to_string()))??;
        match merged {
            Ok(out) => self.settle(
                &label,
                &pre,
                &input_labels,
                out,
                pre.context.clone(),
                run_id,
                rec,
            ),
            Err(conflicts) => {
                rec.state = TaskState::Failed;
                rec.attempts = 1;
                rec.error = Some(format!(
                    "Merge conflict: both sides changed {} differently; reconcile them or set `on_conflict = \"ours\"` or `\"theirs\"`",
                    quoted(&conflicts)
                ));
                Ok(())
            }
        }
    }

    /// Where a local source's directory is and how it is ingested.
    pub(crate) fn local_source_ingest(
        &self,
        label: &str,
        s: &model::LocalSource,
    ) -> (PathBuf, IngestOptions) {
        let dir = self.workspace_root().join(&s.path);
        let mut exclude = s.exclude.clone();
        // Never ingest the store itself when it lives in the workspace.
        if let Some(store_root) = self.inner.store.root() {
            if let (Ok(d), Ok(st)) = (
                std::fs::canonicalize(&dir),
                std::fs::canonicalize(store_root),
            ) {
                if let Ok(rel) = st.strip_prefix(&d) {
                    if !rel.as_os_str().is_empty() {
                        exclude.push(format!("/{}", rel.display()));
                    }
                }
            }
        }
        let opts = IngestOptions {
            ignore_files: true,
            exclude,
            lineage: Some(Lineage {
                parent: None,
                task: Some(label.to_owned()),
                how: "source".into(),
                created: now_ms() / 1000,
            }),
            ..IngestOptions::default()
        };
        (dir, opts)
    }

    /// The preimage of a git source whose ref resolved to `commit`.
    pub(crate) fn git_source_preimage(g: &model::GitSource, commit: &str) -> ActionPreimage {
        let mut pre = ActionPreimage::new("git_source", "store");
        pre.extra.insert("url".into(), g.url.clone());
        pre.extra.insert("commit".into(), commit.to_owned());
        pre
    }

    /// The preimage of a local source whose directory ingested as `layer`.
    pub(crate) fn local_source_preimage(s: &model::LocalSource, layer: Digest) -> ActionPreimage {
        let mut pre = ActionPreimage::new("local_source", "store");
        pre.base = Some(layer);
        pre.extra.insert("path".into(), s.path.clone());
        pre.extra.insert("exclude".into(), s.exclude.join("\n"));
        pre
    }

    pub(super) async fn run_local_source(
        &self,
        task: &Task,
        s: &model::LocalSource,
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let (dir, opts) = self.local_source_ingest(&label, s);
        let store = self.inner.store.clone();
        let Some(token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let report = tokio::task::spawn_blocking(move || store.ingest(&dir, &opts))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))??;
        drop(token);
        let pre = Self::local_source_preimage(s, report.layer);
        self.settle_ingested(&label, &pre, report.layer, run_id, rec)
            .await
    }

    /// A timer or webhook: its output is the payload this run was given (the
    /// tick, the delivery), written as files and ingested; its key is that
    /// layer, so the same payload twice is a cache hit downstream.
    pub(super) async fn run_event_source(
        &self,
        task: &Task,
        opts: &BuildOptions,
        scratch: &Scratch,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let files = match opts.payloads.get(&label) {
            Some(files) => files.clone(),
            None => default_payload(&task.kind),
        };
        let dir = scratch.root().join(format!("{}-payload", slug(&label)));
        let write = |dir: &Path| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            for (name, bytes) in &files {
                std::fs::write(dir.join(name), bytes)?;
            }
            Ok(())
        };
        write(&dir).map_err(|source| BuildError::Io {
            action: "write the payload of",
            path: dir.clone(),
            source,
        })?;
        let layer = self
            .ingest_scratch(&label, dir, "event", Vec::new())
            .await?;
        let mut pre = ActionPreimage::new(task.kind_name(), "store");
        pre.base = Some(layer);
        self.settle_ingested(&label, &pre, layer, run_id, rec).await
    }

    /// A source whose layer is made before its key is known (the key is
    /// the layer): a hit is reported as cached, else `layer` is recorded.
    async fn settle_ingested(
        &self,
        label: &str,
        pre: &ActionPreimage,
        layer: Digest,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let no_inputs = BTreeMap::new();
        if self.try_cache(label, pre, &no_inputs, run_id, rec).await? {
            return Ok(());
        }
        self.settle(label, pre, &no_inputs, layer, BTreeMap::new(), run_id, rec)
    }

    /// Ingests a directory this run made in its scratch (a fetched
    /// repository, a payload) as `label`'s layer, then removes it.
    async fn ingest_scratch(
        &self,
        label: &str,
        dir: PathBuf,
        how: &str,
        exclude: Vec<String>,
    ) -> Result<Digest, BuildError> {
        let store = self.inner.store.clone();
        let opts = IngestOptions {
            exclude,
            no_stat_cache: true,
            lineage: Some(Lineage {
                parent: None,
                task: Some(label.to_owned()),
                how: how.into(),
                created: now_ms() / 1000,
            }),
            ..IngestOptions::default()
        };
        let d2 = dir.clone();
        let report = tokio::task::spawn_blocking(move || store.ingest(&d2, &opts))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))??;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(report.layer)
    }

    pub(super) async fn run_git_source(
        &self,
        task: &Task,
        g: &model::GitSource,
        scratch: &Scratch,
        cancel: &CancellationToken,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let label = task.label.to_string();
        let url = git_url(&self.workspace_root(), g);
        let commit = crate::git::resolve(&url, &g.rev).await?;
        let pre = Self::git_source_preimage(g, &commit);
        if self
            .try_cache(&label, &pre, &BTreeMap::new(), run_id, rec)
            .await?
        {
            return Ok(());
        }
        let Some(_token) = self.job(scratch, cancel, rec).await else {
            cancelled(rec);
            return Ok(());
        };
        let dir = scratch.root().join(format!("{}-git", slug(&label)));
        crate::git::fetch(&url, &commit, &dir).await?;
        let layer = self
            .ingest_scratch(&label, dir, "git", vec!["/.git".into()])
            .await?;
        let mut ctx = BTreeMap::new();
        ctx.insert("CI_GIT_COMMIT".to_owned(), commit);
        self.settle(&label, &pre, &BTreeMap::new(), layer, ctx, run_id, rec)
    }
}

/// What a timer or webhook holds when the run was given nothing for it: an
/// empty tick or payload, the same every time, so plain builds are reproducible.
fn default_payload(kind: &TaskKind) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    match kind {
        TaskKind::Webhook(_) => {
            files.insert("payload.json".to_owned(), b"{}".to_vec());
            files.insert("event".to_owned(), Vec::new());
            files.insert("delivery".to_owned(), Vec::new());
        }
        _ => {
            files.insert("tick.json".to_owned(), b"{}".to_vec());
        }
    }
    files
}

/// Removes work directories of runs that ended without cleaning up (the
/// store's write lock guarantees no other build is using them).
/// Where a git source's repository is: its URL, or its path against the
/// workspace root.
fn git_url(root: &Path, g: &model::GitSource) -> String {
    if g.url.contains("://") || g.url.contains('@') || Path::new(&g.url).is_absolute() {
        g.url.clone()
    } else {
        root.join(&g.url).display().to_string()
    }
}

/// The commit a git source's ref names now (what its next build would fetch).
pub async fn resolve_git_source(root: &Path, g: &model::GitSource) -> Result<String, BuildError> {
    crate::git::resolve(&git_url(root, g), &g.rev).await
}
