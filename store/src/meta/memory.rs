//! The index in memory, for tests and throwaway stores.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, Family, Flow, MetaStore, Visit};
use crate::Result;

type Maps = Vec<BTreeMap<Vec<u8>, Vec<u8>>>;

/// An index held in `BTreeMap`s, one per family.
pub struct MemoryMetaStore {
    maps: Mutex<Maps>,
}

impl Default for MemoryMetaStore {
    fn default() -> Self {
        MemoryMetaStore {
            maps: Mutex::new(vec![BTreeMap::new(); Family::ALL.len()]),
        }
    }
}

impl MemoryMetaStore {
    pub fn new() -> MemoryMetaStore {
        MemoryMetaStore::default()
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MetaStore for MemoryMetaStore {
    fn get(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.maps()[family.index()].get(key).cloned())
    }

    fn write(&self, batch: Batch) -> Result<()> {
        let mut maps = self.maps();
        for (family, key, value) in batch.ops {
            let map = &mut maps[family.index()];
            match value {
                Some(v) => {
                    map.insert(key, v);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn scan_from(
        &self,
        family: Family,
        prefix: &[u8],
        start: &[u8],
        f: &mut Visit<'_>,
    ) -> Result<()> {
        let start = start.max(prefix);
        // Copy the matching range out so `f` may call back into the store.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = self.maps()[family.index()]
            .range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in entries {
            if let Flow::Stop = f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
}
