//! The etcd the end-to-end tests run against: one 3-member cluster per
//! test process, started on first use by the project's script
//! (tests/etcd/setup.sh, through the controller's `test_cluster`), each
//! test under a prefix of its own. Where etcd cannot run, a test prints
//! how to enable it and returns early, unless `CI` is set: then it fails.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gpufleet_controller::config::{EtcdConfig, StoreConfig};
use gpufleet_controller::store::etcd::EtcdOptions;
use gpufleet_controller::store::etcd::test_cluster::{EtcdCluster, Unavailable};

/// The process's cluster; None (after printing why) where etcd cannot run
/// and `CI` is not set.
pub fn shared() -> anyhow::Result<Option<&'static EtcdCluster>> {
    static SHARED: OnceLock<Result<EtcdCluster, Unavailable>> = OnceLock::new();
    match SHARED.get_or_init(|| EtcdCluster::start(3)) {
        Ok(cluster) => Ok(Some(cluster)),
        Err(unavailable) => skip_or_fail(unavailable).map(|()| None),
    }
}

/// A cluster of the test's own (for tests that kill members). None as
/// for [`shared`].
pub fn own(members: usize) -> anyhow::Result<Option<EtcdCluster>> {
    match EtcdCluster::start(members) {
        Ok(cluster) => Ok(Some(cluster)),
        Err(unavailable) => skip_or_fail(&unavailable).map(|()| None),
    }
}

fn skip_or_fail(unavailable: &Unavailable) -> anyhow::Result<()> {
    if std::env::var_os("CI").is_some() {
        anyhow::bail!("{unavailable} (CI is set, so this test fails instead of skipping)");
    }
    eprintln!("skipping: {unavailable}");
    Ok(())
}

/// A fresh key prefix, unique in this process.
pub fn fresh_prefix(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "/{what}-{}-{}/",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// `store = "etcd"` on `endpoints` under `prefix`, with a short leader
/// lease so failover tests take seconds.
pub fn store_config(endpoints: &[String], prefix: &str) -> StoreConfig {
    StoreConfig::Etcd(Box::new(EtcdConfig {
        options: EtcdOptions::new(endpoints.to_vec(), prefix),
        password_file: None,
        leader_lease: Duration::from_secs(2),
        advertise_url: None,
    }))
}

/// The store config of a fresh prefix on the shared cluster.
pub fn fresh_store_config() -> anyhow::Result<Option<StoreConfig>> {
    Ok(shared()?.map(|cluster| store_config(cluster.endpoints(), &fresh_prefix("e2e"))))
}
