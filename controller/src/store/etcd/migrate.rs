//! Copies a controller's state from one store into etcd: how a sled data
//! dir becomes the state of three controllers (`gpufleet-controller
//! --migrate-from-sled DIR` with `store = "etcd"`; docs/ha.md).
//!
//! Records are copied as they are (same keys, same prost bytes), a
//! keyspace at a time, in transactions of at most [`OPS_PER_TXN`] writes
//! (etcd's default `--max-txn-ops` is 128). It refuses to run while a
//! controller leads on the prefix, or when the prefix already holds state,
//! so it never mixes two fleets or races a running one. Telemetry rollups
//! are not in the store: copy `rollups/` of the data dir to the controller
//! that will lead first, or let it rebuild from agents.

use super::EtcdStore;
use crate::store::{IdRange, Keyspace, Store, StoreError, WriteBatch};

/// Writes per etcd transaction.
pub const OPS_PER_TXN: usize = 100;

/// Records copied per keyspace.
pub type Copied = Vec<(Keyspace, usize)>;

/// Copies every keyspace of `from` into `to`.
pub fn copy_into(from: &dyn Store, to: &EtcdStore) -> Result<Copied, StoreError> {
    if let Some(leader) = to.leader()? {
        return Err(StoreError::Io(
            format!("a controller leads on this etcd prefix ({leader}): stop every controller before migrating").into(),
        ));
    }
    for space in Keyspace::ALL {
        let mut any = false;
        to.visit_raw(space, IdRange::default(), &mut |_, _| {
            any = true;
            false
        })?;
        if any {
            return Err(StoreError::Io(
                format!("etcd already holds state under this prefix ({space:?} records): migrate into an empty prefix (etcd_prefix)").into(),
            ));
        }
    }
    let mut copied = Vec::new();
    for space in Keyspace::ALL {
        let mut batch = WriteBatch::default();
        let mut in_batch = 0;
        let mut count = 0;
        let mut failed = None;
        from.visit_raw(space, IdRange::default(), &mut |id, value| {
            batch.put_raw(space, id, value.to_vec());
            in_batch += 1;
            count += 1;
            if in_batch == OPS_PER_TXN {
                in_batch = 0;
                if let Err(e) = to.apply(std::mem::take(&mut batch)) {
                    failed = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        to.apply(batch)?;
        copied.push((space, count));
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, load_all_by_id};

    #[test]
    fn every_record_arrives_once_and_a_second_run_is_refused() {
        let Some(to) = super::super::test_cluster::fresh_store() else {
            return;
        };
        let from = MemoryStore::new();
        let mut batch = WriteBatch::default();
        for n in 0..(2 * OPS_PER_TXN + 3) {
            batch.put_raw(Keyspace::Jobs, &format!("job-{n:04}"), vec![n as u8]);
        }
        batch.put_raw(Keyspace::Settings, "join-token", vec![7; 32]);
        from.apply(batch).unwrap();
        let copied = copy_into(&from, &to).unwrap();
        assert!(copied.contains(&(Keyspace::Jobs, 2 * OPS_PER_TXN + 3)));
        assert!(copied.contains(&(Keyspace::Settings, 1)));
        let jobs = to.scan_raw(Keyspace::Jobs).unwrap();
        assert_eq!(jobs, from.scan_raw(Keyspace::Jobs).unwrap());
        assert!(
            load_all_by_id::<gpufleet_proto::v1::Node>(&to, Keyspace::Nodes)
                .unwrap()
                .is_empty()
        );
        let again = copy_into(&from, &to).unwrap_err();
        assert!(again.to_string().contains("empty prefix"), "{again}");
    }
}
