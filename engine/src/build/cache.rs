//! The action cache side of a task: looking its key up (the store, then
//! the cache wrapped around it) and recording a result under its key and
//! its label.

use std::collections::BTreeMap;

use serde::Deserialize;
use strata_store::{ActionEntry, Digest, LabelEntry, Payload};

use crate::key::ActionPreimage;
use crate::record::{now_ms, TaskRecord, TaskState};
use crate::BuildError;

use super::{ActionPayload, CommandAction, Engine};

impl Engine {
    /// The cached result of `key`: the store's own when it has one (no
    /// thread hop for the common hit), else what the cache finds, off the
    /// async threads (a remote cache waits on the network).
    pub(super) async fn cached(&self, key: Digest) -> Result<Option<ActionEntry>, BuildError> {
        if let Some(hit) = self.inner.store.action(&key)? {
            return Ok(Some(hit));
        }
        let cache = self.inner.cache.clone();
        tokio::task::spawn_blocking(move || cache.lookup(&key))
            .await
            .map_err(|e| BuildError::Join(e.to_string()))?
            .map_err(BuildError::from)
    }

    /// Makes sure the layers a task is about to read are stored here: those
    /// held only remotely (a lazy cache's hits) are fetched, all of them in
    /// one transfer. Returns the layers still not stored (the cache could
    /// not provide them, or they were never here); empty when all are.
    pub(super) async fn ensure_present(
        &self,
        layers: &[Digest],
    ) -> Result<Vec<Digest>, BuildError> {
        let store = &self.inner.store;
        let mut remote = Vec::new();
        let mut missing = Vec::new();
        for l in layers {
            if remote.contains(l) || missing.contains(l) || store.has_tree(l)? {
                continue;
            }
            match store.remote_layer(l)? {
                Some(_) => remote.push(*l),
                None => missing.push(*l),
            }
        }
        if !remote.is_empty() {
            let cache = self.inner.cache.clone();
            let still = tokio::task::spawn_blocking(move || cache.fetch(&remote))
                .await
                .map_err(|e| BuildError::Join(e.to_string()))??;
            missing.extend(still);
        }
        Ok(missing)
    }

    /// [`Engine::ensure_present`], and an error naming the first layer still
    /// held only remotely (and where) when the cache could not provide it.
    pub(super) async fn fetch_inputs(&self, layers: &[Digest]) -> Result<(), BuildError> {
        for l in self.ensure_present(layers).await? {
            if let Some(r) = self.inner.store.remote_layer(&l)? {
                return Err(BuildError::HeldRemotely {
                    layer: l.to_hex(),
                    url: r.url,
                });
            }
        }
        Ok(())
    }

    /// The cached result of `key`, decoded; an entry that does not decode
    /// (written by another version) is a miss.
    pub(super) async fn cached_hit(&self, key: Digest) -> Result<Option<Hit>, BuildError> {
        Ok(self
            .cached(key)
            .await?
            .and_then(|hit| hit.payload.decode::<Hit>().ok()))
    }

    /// A command answered from the cache: `rec` says so, and the hit is
    /// recorded as the label's latest output.
    pub(super) fn command_hit(
        &self,
        label: &str,
        action: &CommandAction,
        hit: Hit,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        rec.state = TaskState::Succeeded;
        rec.cached = true;
        rec.output = Some(hit.output);
        rec.log = hit.log;
        rec.context = hit.context.clone();
        rec.exit_code = Some(0);
        let done = Outcome {
            output: hit.output,
            context: &hit.context,
            log: hit.log,
        };
        let key = action.pre.key();
        self.record_success(
            label,
            &action.pre,
            key,
            &action.input_labels,
            done,
            run_id,
            false,
        )
    }

    /// Records a successful action: in the action cache when `cacheable`,
    /// and as the label's latest output (left as it is when neither the key
    /// nor the output changed, so a fully cached build writes nothing per task).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_success(
        &self,
        label: &str,
        pre: &ActionPreimage,
        key: Digest,
        input_labels: &BTreeMap<String, String>,
        done: Outcome<'_>,
        run_id: &str,
        cacheable: bool,
    ) -> Result<(), BuildError> {
        let store = &self.inner.store;
        let payload = |previous| ActionPayload {
            output: done.output,
            context: done.context.clone(),
            log: done.log,
            key,
            preimage: pre.clone(),
            input_labels: input_labels.clone(),
            run: run_id.to_owned(),
            previous,
        };
        let key_name = self.label_record_key(label);
        let before = store.label(&key_name)?;
        // Most often (a cached build) the label already names this action
        // and output: the two fields are all that is decoded, and nothing
        // else is built.
        let head = before
            .as_ref()
            .and_then(|b| b.payload.decode::<LabelHead>().ok());
        let label_unchanged = matches!(&head, Some(h) if h.key == key && h.output == done.output);
        if label_unchanged && !cacheable {
            return Ok(());
        }
        let previous = match head {
            Some(_) if !label_unchanged => before
                .and_then(|b| b.payload.decode::<ActionPayload>().ok())
                .and_then(|b| {
                    if b.key != key {
                        Some(Box::new(b.preimage))
                    } else {
                        b.previous
                    }
                }),
            _ => None,
        };
        // One encoding serves both records unless the label keeps a
        // previous preimage.
        let plain = Payload::new(&payload(None)).map_err(BuildError::encode("an action"))?;
        let action = cacheable.then(|| ActionEntry {
            layers: vec![done.output],
            blobs: done.log.into_iter().collect(),
            payload: plain.clone(),
            created: now_ms() / 1000,
        });
        let label_entry = match (label_unchanged, previous) {
            (true, _) => None,
            (false, None) => Some(LabelEntry {
                layer: done.output,
                payload: plain,
                updated: now_ms() / 1000,
            }),
            (false, Some(previous)) => Some(LabelEntry {
                layer: done.output,
                payload: Payload::new(&payload(Some(previous)))
                    .map_err(BuildError::encode("a label record"))?,
                updated: now_ms() / 1000,
            }),
        };
        store.put_action_and_label(
            action.as_ref().map(|a| (&key, a)),
            label_entry.as_ref().map(|l| (key_name.as_str(), l)),
        )?;
        if let Some(a) = &action {
            self.inner.cache.recorded(&key, a);
        }
        Ok(())
    }

    /// Looks up `pre`; on a hit fills `rec` and returns true.
    pub(super) async fn try_cache(
        &self,
        label: &str,
        pre: &ActionPreimage,
        input_labels: &BTreeMap<String, String>,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<bool, BuildError> {
        let key = pre.key();
        rec.key = Some(key);
        let Some(p) = self.cached_hit(key).await? else {
            return Ok(false);
        };
        rec.state = TaskState::Succeeded;
        rec.cached = true;
        rec.output = Some(p.output);
        rec.context = p.context.clone();
        let done = Outcome {
            output: p.output,
            context: &p.context,
            log: None,
        };
        self.record_success(label, pre, key, input_labels, done, run_id, false)?;
        Ok(true)
    }

    /// Records a computed output of a non-command task (merge, source).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &self,
        label: &str,
        pre: &ActionPreimage,
        input_labels: &BTreeMap<String, String>,
        output: Digest,
        context: BTreeMap<String, String>,
        run_id: &str,
        rec: &mut TaskRecord,
    ) -> Result<(), BuildError> {
        let done = Outcome {
            output,
            context: &context,
            log: None,
        };
        // `try_cache` computed the key before the work was done.
        let key = rec.key.unwrap_or_else(|| pre.key());
        self.record_success(label, pre, key, input_labels, done, run_id, true)?;
        rec.state = TaskState::Succeeded;
        rec.output = Some(output);
        rec.context = context;
        rec.attempts = 1;
        Ok(())
    }
}

/// The fields of an [`ActionPayload`] a cache hit needs.
#[derive(Deserialize)]
pub(super) struct Hit {
    pub(super) output: Digest,
    #[serde(default)]
    pub(super) context: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) log: Option<Digest>,
}

/// The fields of a label's [`ActionPayload`] that say whether it changed.
#[derive(Deserialize)]
struct LabelHead {
    key: Digest,
    output: Digest,
}

/// What a successful action produced.
pub(super) struct Outcome<'a> {
    pub(super) output: Digest,
    pub(super) context: &'a BTreeMap<String, String>,
    pub(super) log: Option<Digest>,
}
