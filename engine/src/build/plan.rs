//! Predicting a build before it runs: for each task, whether it will come
//! from the action cache, and if not, why — the field of its action key that
//! changed since its previous action, as `ci explain` says it.
//!
//! A task's key depends on its inputs' outputs, so the plan walks the graph
//! in order: a source is resolved (a local directory ingested, a git ref
//! resolved), a task whose inputs are all known gets its key computed and
//! looked up; a task with an input that will be rebuilt will run too.
//! Ingesting a source stores its files, as the build would.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use strata_store::Digest;

use super::cache::Hit;
use super::{Done, Engine};
use crate::key::ActionPreimage;
use crate::model::TaskKind;
use crate::{BuildError, BuildOptions, Graph, Label};

/// What a build of a task is expected to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Prediction {
    /// The task's output will come from the action cache: nothing runs.
    pub will_cache: bool,
    /// Why it will run (`None` when it will be cached).
    pub reason: Option<String>,
    /// Its action key, when its inputs are known now.
    pub key: Option<Digest>,
    /// When an input (or the base, or a source's directory) changed since the
    /// previous action: the paths that differ, as `mount/path` (`base/…` for
    /// the base), at most [`CHANGED_PATHS_MAX`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_paths: Vec<String>,
}

/// How many changed paths a prediction lists.
pub const CHANGED_PATHS_MAX: usize = 50;

impl Prediction {
    fn run(reason: impl Into<String>, key: Option<Digest>) -> Prediction {
        Prediction {
            will_cache: false,
            reason: Some(reason.into()),
            key,
            changed_paths: Vec::new(),
        }
    }
}

impl Engine {
    /// Predicts, task by task, what building `targets` would do.
    pub async fn plan(
        &self,
        targets: &[Label],
        opts: &BuildOptions,
    ) -> Result<BTreeMap<String, Prediction>, BuildError> {
        let ws = &self.inner.ws;
        let graph = Graph::new(ws);
        let closure = graph.deps_closure(targets);
        let order = graph.topo_order_of(&closure);
        let mut known: HashMap<Label, Done> = HashMap::new();
        let mut out = BTreeMap::new();
        for label in order {
            let task = &ws.tasks[label];
            if let Some(missing) = task.inputs().into_iter().find(|l| !known.contains_key(*l)) {
                out.insert(
                    label.to_string(),
                    Prediction::run(format!("its input `{missing}` will run first"), None),
                );
                continue;
            }
            let inputs: Vec<(Label, Done)> = task
                .inputs()
                .into_iter()
                .map(|l| (l.clone(), known[l].clone()))
                .collect();
            let name = label.to_string();
            let (pre, input_labels, fallback) = match &task.kind {
                TaskKind::LocalSource(s) => {
                    let (dir, ingest) = self.local_source_ingest(&name, s);
                    let store = self.inner.store.clone();
                    let report = tokio::task::spawn_blocking(move || store.ingest(&dir, &ingest))
                        .await
                        .map_err(|e| BuildError::Join(e.to_string()))??;
                    // Whatever the cache says, the output is the directory as it is.
                    (
                        Self::local_source_preimage(s, report.layer),
                        BTreeMap::new(),
                        Some(report.layer),
                    )
                }
                TaskKind::GitSource(g) => {
                    let commit = super::resolve_git_source(&self.workspace_root(), g).await?;
                    (Self::git_source_preimage(g, &commit), BTreeMap::new(), None)
                }
                TaskKind::Timer(_) | TaskKind::Webhook(_) => {
                    out.insert(
                        name,
                        Prediction::run("it holds what the trigger brings", None),
                    );
                    continue;
                }
                TaskKind::Merge(m) => {
                    let (pre, labels) = Self::merge_action(m, &inputs);
                    (pre, labels, None)
                }
                TaskKind::Run(r) => {
                    let action = self.command_action(task, r, &inputs, opts).await?;
                    let key = action.pre.key();
                    if r.effects {
                        out.insert(
                            name,
                            Prediction::run(
                                "it has outside effects: it runs every time",
                                Some(key),
                            ),
                        );
                        continue;
                    }
                    if !r.pure {
                        out.insert(
                            name,
                            Prediction::run("it is not pure: it runs every time", Some(key)),
                        );
                        continue;
                    }
                    if opts.check {
                        out.insert(
                            name,
                            Prediction::run("`--check` runs cached tasks again", Some(key)),
                        );
                        continue;
                    }
                    (action.pre, action.input_labels, None)
                }
            };
            let key = pre.key();
            let hit = self
                .inner
                .store
                .action(&key)?
                .and_then(|e| e.payload.decode::<Hit>().ok());
            let prediction = match hit {
                Some(hit) => {
                    known.insert(
                        label.clone(),
                        Done {
                            output: hit.output,
                            context: hit.context,
                        },
                    );
                    Prediction {
                        will_cache: true,
                        reason: None,
                        key: Some(key),
                        changed_paths: Vec::new(),
                    }
                }
                None => {
                    if let Some(layer) = fallback {
                        known.insert(
                            label.clone(),
                            Done {
                                output: layer,
                                context: BTreeMap::new(),
                            },
                        );
                    }
                    let (reason, changed_paths) =
                        self.why_not_cached(&name, &pre, &input_labels)?;
                    let mut p = Prediction::run(reason, Some(key));
                    p.changed_paths = changed_paths;
                    p
                }
            };
            out.insert(name, prediction);
        }
        Ok(out)
    }

    /// Why `pre` has no cached result: what changed since the label's
    /// previous action, as `ci explain` says it, and the paths that differ in
    /// the input layers that changed.
    fn why_not_cached(
        &self,
        label: &str,
        pre: &ActionPreimage,
        input_labels: &BTreeMap<String, String>,
    ) -> Result<(String, Vec<String>), BuildError> {
        let Some(prev) = super::previous_payload(&self.inner.store, &self.label_record_key(label))?
        else {
            return Ok((
                "it has not run in this workspace before".to_owned(),
                Vec::new(),
            ));
        };
        if prev.key == pre.key() {
            return Ok((
                "its cached result is gone (collected by `ci store gc`)".to_owned(),
                Vec::new(),
            ));
        }
        let lines = crate::key::explain(&prev.preimage, pre, input_labels);
        let reason = match lines.len() {
            0 => "its key changed (a new key format)".to_owned(),
            1..=3 => lines.join("; "),
            n => format!("{}; and {} more changes", lines[..3].join("; "), n - 3),
        };
        // Down to the files: diff each input layer that changed. A layer
        // the store no longer has (collected) just lists nothing.
        let store = &self.inner.store;
        let mut paths = Vec::new();
        let mut pairs: Vec<(String, Digest, Digest)> = Vec::new();
        for (mount, new) in &pre.inputs {
            if let Some(old) = prev.preimage.inputs.get(mount).filter(|o| *o != new) {
                pairs.push((mount.clone(), *old, *new));
            }
        }
        if let (Some(old), Some(new)) = (prev.preimage.base, pre.base) {
            if old != new {
                let name = if pre.kind == "local_source" {
                    ""
                } else {
                    "base"
                };
                pairs.push((name.to_owned(), old, new));
            }
        }
        'pairs: for (mount, old, new) in pairs {
            let Ok(changes) = store.diff(&old, &new) else {
                continue;
            };
            for c in changes {
                if paths.len() >= CHANGED_PATHS_MAX {
                    break 'pairs;
                }
                let letter = c.letter();
                paths.push(if mount.is_empty() {
                    format!("{letter} {}", c.path)
                } else {
                    format!("{letter} {mount}/{}", c.path)
                });
            }
        }
        Ok((reason, paths))
    }
}
