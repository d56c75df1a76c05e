//! A store in memory: the test double of [`Store`], and a second backend
//! that keeps the trait honest (nothing in it may assume sled).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{IdRange, Keyspace, Store, StoreError, WriteBatch};

/// Every record in one ordered map; a batch applies under one lock, so it
/// is atomic. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A panic mid-batch cannot leave half a batch: the map is only
        // changed after every op was built.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut records = self.records();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => records.insert(key.clone(), value.clone()),
                None => records.remove(key),
            };
        }
        Ok(())
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.records().get(&space.key(id)).cloned())
    }

    fn visit_raw(
        &self,
        space: Keyspace,
        range: IdRange<'_>,
        visit: &mut dyn FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let Some((start, end)) = space.bounds(range) else {
            return Ok(());
        };
        // A copy of the range, so that `visit` may call back into the store.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = self
            .records()
            .range(start..end)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        super::walk(entries.iter(), range.reverse, |(key, value)| {
            Ok(visit(&space.id_of(key), value))
        })
    }
}
