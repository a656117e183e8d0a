//! Keeps the store under `--cache-max-size`: when it is larger, action
//! entries of every protocol (native and Bazel's) are dropped least
//! recently used first (last use in this process, else when they were
//! made), Bazel's CAS names that no remaining entry needs go with them, and
//! then GC, which keeps what the remaining entries name (`keep_cache`),
//! frees the objects no one names any more. An entry always goes before the
//! objects it needs, never after.

use std::time::Duration;

use std::collections::HashSet;

use strata_store::{Batch, BazelAction, Digest, DigestFunction, Family, Flow, GcOptions, Store};

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

/// One cache entry, of either protocol: its row and what it alone may hold.
struct Candidate {
    used_ms: u64,
    family: Family,
    key: Vec<u8>,
    /// Native entries: their layers (for the size estimate).
    layers: Vec<Digest>,
    /// Bazel entries: the bytes they name, as far as the row says.
    bazel_refs: usize,
}

/// Every entry of both protocols, least recently used first.
fn candidates(store: &Store, cache: &CacheState) -> strata_store::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    store.meta().scan(Family::Actions, &[], &mut |k, v| {
        if let Ok(e) = serde_json::from_slice::<strata_store::ActionEntry>(v) {
            out.push(Candidate {
                used_ms: cache
                    .last_use(Family::Actions, k)
                    .unwrap_or(e.created.saturating_mul(1000)),
                family: Family::Actions,
                key: k.to_vec(),
                layers: e.layers,
                bazel_refs: 0,
            });
        }
        Ok(Flow::Continue)
    })?;
    store.meta().scan(Family::BazelActions, &[], &mut |k, v| {
        if let Some(a) = BazelAction::decode(v) {
            out.push(Candidate {
                used_ms: cache
                    .last_use(Family::BazelActions, k)
                    .unwrap_or(a.created_ms),
                family: Family::BazelActions,
                key: k.to_vec(),
                layers: Vec::new(),
                bazel_refs: a.refs.len(),
            });
        }
        Ok(Flow::Continue)
    })?;
    out.sort_by(|a, b| (a.used_ms, &a.key).cmp(&(b.used_ms, &b.key)));
    Ok(out)
}

/// Deletes the SHA-256 rows (Bazel's CAS names) that no remaining Bazel
/// entry needs, so GC with `keep_cache` may sweep their blobs.
fn unname_unused_cas(store: &Store) -> strata_store::Result<()> {
    let mut needed: HashSet<[u8; 32]> = HashSet::new();
    store.meta().scan(Family::BazelActions, &[], &mut |_, v| {
        for r in BazelAction::decode(v).map(|a| a.refs).unwrap_or_default() {
            if r.function == DigestFunction::Sha256 {
                needed.insert(r.hash);
            }
        }
        Ok(Flow::Continue)
    })?;
    let mut batch = Batch::new();
    store.meta().scan(Family::Sha256, &[], &mut |k, _| {
        if <[u8; 32]>::try_from(k).map_or(true, |h| !needed.contains(&h)) {
            batch.delete(Family::Sha256, k.to_vec());
        }
        Ok(Flow::Continue)
    })?;
    store.meta().write(batch)
}

/// One round; returns the entries dropped.
pub fn evict(store: &Store, cache: &CacheState, max: u64) -> strata_store::Result<u64> {
    let mut total = size(store)?;
    if total <= max {
        return Ok(0);
    }
    let target = (max as f64 * LOW_WATER) as u64;
    let entries = candidates(store, cache)?;
    let blobs = store.usage()?.blobs.max(1);
    let average_object = total / blobs;
    let mut dropped = 0;
    let mut next = 0;
    // Drop entries until what they alone hold would bring the store under
    // the mark, collect, and measure again (objects are shared, so the
    // estimate is rough both ways).
    loop {
        let mut batch = Batch::new();
        let mut estimate = 0u64;
        while next < entries.len() && total.saturating_sub(estimate) > target {
            let c = &entries[next];
            estimate += match c.family {
                Family::Actions => store.closure(&c.layers).map(|c| c.bytes()).unwrap_or(0),
                // The row does not say sizes: count one average object each.
                _ => (c.bazel_refs as u64).max(1) * average_object,
            };
            batch.delete(c.family, c.key.clone());
            cache.forget(c.family, &c.key);
            next += 1;
        }
        dropped += batch.len() as u64;
        store.meta().write(batch)?;
        unname_unused_cas(store)?;
        store.gc(&GcOptions {
            keep_cache: true,
            ..GcOptions::default()
        })?;
        total = size(store)?;
        if total <= target || next >= entries.len() {
            break;
        }
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
