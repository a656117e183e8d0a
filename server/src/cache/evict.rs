//! Keeps the store under `--cache-max-size`: when it is larger, action
//! entries are dropped least recently used first (last use in this process,
//! else when they were made), and then GC, which keeps what the remaining
//! entries name (`keep_cache`), frees the objects no one names any more.
//! An entry always goes before the objects it needs, never after.

use std::time::Duration;

use strata_store::{Batch, Digest, Family, Flow, GcOptions, Store};

use super::CacheState;
use crate::api::AppState;

/// How often the size is checked without uploads.
const PERIOD: Duration = Duration::from_secs(30);
/// Eviction brings the store down to this fraction of the limit, so that it
/// does not run again at the next upload.
const LOW_WATER: f64 = 0.9;

pub fn start(state: &AppState) {
    let Some(max) = state.cache.max_size else {
        return;
    };
    let store = state.store.clone();
    let cache = state.cache.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PERIOD) => {}
                _ = cache.wake.notified() => {}
            }
            let (s, c) = (store.clone(), cache.clone());
            let done = tokio::task::spawn_blocking(move || evict(&s, &c, max)).await;
            if let Ok(Err(e)) = done {
                eprintln!("warning: cache eviction failed: {e}");
            }
        }
    });
}

/// Bytes the store's objects take.
fn size(store: &Store) -> strata_store::Result<u64> {
    let u = store.usage()?;
    Ok(u.blob_bytes + u.tree_bytes)
}

/// One round; returns the entries dropped.
pub fn evict(store: &Store, cache: &CacheState, max: u64) -> strata_store::Result<u64> {
    let mut total = size(store)?;
    if total <= max {
        return Ok(0);
    }
    let target = (max as f64 * LOW_WATER) as u64;
    // Every entry with when it was last used, oldest first.
    let mut entries: Vec<(u64, Digest, Vec<Digest>)> = Vec::new();
    store.meta().scan(Family::Actions, &[], &mut |k, v| {
        if let (Some(key), Ok(e)) = (
            Digest::from_slice(k),
            serde_json::from_slice::<strata_store::ActionEntry>(v),
        ) {
            let used = cache
                .last_use(Family::Actions, k)
                .unwrap_or(e.created.saturating_mul(1000));
            entries.push((used, key, e.layers));
        }
        Ok(Flow::Continue)
    })?;
    entries.sort_by_key(|(used, key, _)| (*used, *key));
    let mut dropped = 0;
    let mut next = 0;
    // Drop entries until what they alone hold would bring the store under
    // the mark, collect, and measure again (objects are shared, so the
    // estimate is rough both ways).
    while total > target && next < entries.len() {
        let mut batch = Batch::new();
        let mut estimate = 0u64;
        while next < entries.len() && total.saturating_sub(estimate) > target {
            let (_, key, layers) = &entries[next];
            estimate += store.closure(layers).map(|c| c.bytes()).unwrap_or(0);
            batch.delete(Family::Actions, key.as_bytes().to_vec());
            cache.forget(Family::Actions, key.as_bytes());
            next += 1;
        }
        dropped += batch.len() as u64;
        store.meta().write(batch)?;
        store.gc(&GcOptions {
            keep_cache: true,
            ..GcOptions::default()
        })?;
        total = size(store)?;
    }
    cache.evicted(dropped);
    if dropped > 0 {
        eprintln!(
            "note: evicted {dropped} cache entries (least recently used); the store holds {} of \
             its {} limit",
            total, max
        );
    }
    Ok(dropped)
}
