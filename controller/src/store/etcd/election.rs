//! Leader election on etcd: a compare-and-swap of one key held by a lease.
//!
//! A controller campaigns by granting itself a lease of `ttl` and creating
//! `<prefix>leader` (value: the address clients and agents should dial)
//! only if the key does not exist, in one transaction. The one whose
//! create succeeds leads; its [`Fence`] (the key's create revision) goes
//! into every later write's transaction ([`super::EtcdStore`]), so once
//! the key is gone (the lease lapsed) or belongs to another controller,
//! none of its writes is applied.
//!
//! The leader keeps the lease alive every `ttl / 4`. It stops acting on
//! its own clock before etcd can let another start: the lease was alive
//! when the last acknowledged keep-alive was *sent*, so etcd holds it at
//! least until `sent + ttl`; the leader gives up at `sent + ttl - margin`
//! ([`Leadership::lost`] fires), where `margin` covers the clocks' drift.
//! A paused (SIGSTOP) leader therefore wakes with its deadline passed and
//! stops before it does anything; what it was about to write is refused
//! by the fence anyway.
//!
//! Standbys poll the key ([`Election::campaign`] returns only on winning)
//! and report the current leader through [`Election::leader`], which the
//! standby's gRPC answers name.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use gpufleet_proto::etcd::etcdserverpb::request_op::Request;
use gpufleet_proto::etcd::etcdserverpb::response_op::Response;
use gpufleet_proto::etcd::etcdserverpb::{
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{EtcdClient, Fence};
use crate::store::StoreError;

/// How often a standby looks at the leader key.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct ElectionOptions {
    /// The address this controller announces as leader (what clients and
    /// agents dial).
    pub advertise: String,
    /// The leader lease: how long a dead leader holds the fleet up.
    pub ttl: Duration,
}

/// One controller's part in the election.
#[derive(Debug)]
pub struct Election {
    client: Arc<EtcdClient>,
    key: Vec<u8>,
    options: ElectionOptions,
    leader: Arc<Mutex<Option<String>>>,
}

/// Held while this controller leads. Dropping it stops the keep-alives
/// (and the lease lapses); [`Leadership::resign`] gives it up at once.
#[derive(Debug)]
pub struct Leadership {
    pub fence: Fence,
    lease: i64,
    /// Until when this controller may act (moved on by each keep-alive).
    deadline: Arc<Mutex<std::time::Instant>>,
    lost: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
    client: Arc<EtcdClient>,
}

impl Leadership {
    /// Resolves once the leadership is lost (lease lapsed or revoked, or
    /// its deadline passed without a keep-alive answer).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|lost| *lost).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || std::time::Instant::now() >= self.deadline()
    }

    /// Until when this controller may act; a watchdog outside the async
    /// runtime (`crate::ha`) reads it.
    pub fn deadline(&self) -> std::time::Instant {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle on the deadline, for such a watchdog.
    pub fn deadline_handle(&self) -> Arc<Mutex<std::time::Instant>> {
        Arc::clone(&self.deadline)
    }

    /// Revokes the lease so a standby takes over without waiting for it
    /// to lapse (a clean shutdown).
    pub async fn resign(self) {
        self.keepalive.abort();
        let client = Arc::clone(&self.client);
        let lease = self.lease;
        let _ = client
            .call("lease revoke", |index| {
                let mut leases = client.lease(index);
                async move { leases.lease_revoke(LeaseRevokeRequest { id: lease }).await }
            })
            .await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl Election {
    pub fn new(client: Arc<EtcdClient>, options: ElectionOptions) -> Self {
        let mut key = client.options().prefix.as_bytes().to_vec();
        key.extend_from_slice(b"leader");
        Self {
            client,
            key,
            options,
            leader: Arc::default(),
        }
    }

    /// The leader's address as last seen (None: no leader known).
    pub fn leader(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A handle on the last-seen leader, for the standby's answers.
    pub fn leader_handle(&self) -> Arc<Mutex<Option<String>>> {
        Arc::clone(&self.leader)
    }

    fn set_leader(&self, leader: Option<String>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    /// Waits until this controller is the leader. Errors from etcd are
    /// logged and retried: a standby waits out an etcd outage.
    pub async fn campaign(&self) -> Leadership {
        let mut logged = None;
        loop {
            match self.try_lead().await {
                Ok(Some(leadership)) => {
                    self.set_leader(Some(self.options.advertise.clone()));
                    return leadership;
                }
                Ok(None) => {}
                Err(e) => {
                    let message = e.to_string();
                    if logged.as_ref() != Some(&message) {
                        tracing::warn!(error = %message, "cannot campaign for leadership; retrying");
                        logged = Some(message);
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One attempt: creates the key if nobody holds it.
    async fn try_lead(&self) -> Result<Option<Leadership>, StoreError> {
        let current = self.read_leader().await?;
        if let Some(leader) = current {
            if self.leader().as_ref() != Some(&leader) {
                tracing::info!(%leader, "standing by; the leader is elsewhere");
            }
            self.set_leader(Some(leader));
            return Ok(None);
        }
        let client = &self.client;
        let ttl = self.options.ttl.as_secs().max(1) as i64;
        let granted_at = Instant::now();
        let lease = client
            .call("lease grant", |index| {
                let mut leases = client.lease(index);
                async move { leases.lease_grant(LeaseGrantRequest { ttl, id: 0 }).await }
            })
            .await?
            .into_inner()
            .id;
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: self.key.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: self.key.clone(),
                    value: self.options.advertise.clone().into_bytes(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        };
        let response = client
            .call("campaign", |index| {
                let mut kv = client.kv(index);
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?
            .into_inner();
        if !response.succeeded {
            let _ = client
                .call("lease revoke", |index| {
                    let mut leases = client.lease(index);
                    async move { leases.lease_revoke(LeaseRevokeRequest { id: lease }).await }
                })
                .await;
            return Ok(None);
        }
        let revision = response
            .responses
            .first()
            .and_then(|r| match &r.response {
                Some(Response::ResponsePut(put)) => put.header.as_ref().map(|h| h.revision),
                _ => None,
            })
            .or(response.header.map(|h| h.revision))
            .unwrap_or_default();
        let fence = Fence {
            key: self.key.clone(),
            create_revision: revision,
        };
        tracing::info!(advertise = %self.options.advertise, lease, revision, "became the leader");
        let (lost_tx, lost) = watch::channel(false);
        let deadline = granted_at + self.deadline_after();
        let shared_deadline = Arc::new(Mutex::new(deadline.into_std()));
        let keepalive = tokio::spawn(keep_alive(
            Arc::clone(&self.client),
            lease,
            self.options.ttl,
            deadline,
            lost_tx,
            Arc::clone(&shared_deadline),
        ));
        Ok(Some(Leadership {
            fence,
            lease,
            deadline: shared_deadline,
            lost,
            keepalive,
            client: Arc::clone(&self.client),
        }))
    }

    fn deadline_after(&self) -> Duration {
        lease_deadline(self.options.ttl)
    }

    async fn read_leader(&self) -> Result<Option<String>, StoreError> {
        let client = &self.client;
        let key = self.key.clone();
        let response = client
            .call("leader read", |index| {
                let mut kv = client.kv(index);
                let request = RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                };
                async move { kv.range(request).await }
            })
            .await?
            .into_inner();
        Ok(response
            .kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Refreshes [`Election::leader`] (standbys call it while they wait).
    pub async fn refresh_leader(&self) {
        if let Ok(leader) = self.read_leader().await {
            self.set_leader(leader);
        }
    }
}

/// How long after a keep-alive was sent the leader may still act: the
/// lease's TTL less a margin for the clocks' drift and etcd's own timing
/// (a quarter of the TTL, at least 500 ms).
fn lease_deadline(ttl: Duration) -> Duration {
    let margin = (ttl / 4).max(Duration::from_millis(500));
    ttl.saturating_sub(margin)
}

/// Keeps the lease alive until it is lost; then says so on `lost`.
async fn keep_alive(
    client: Arc<EtcdClient>,
    lease: i64,
    ttl: Duration,
    mut deadline: Instant,
    lost: watch::Sender<bool>,
    shared_deadline: Arc<Mutex<std::time::Instant>>,
) {
    let every = ttl / 4;
    loop {
        let sent = Instant::now();
        let renewed = tokio::time::timeout_at(deadline, renew(&client, lease)).await;
        match renewed {
            Ok(Ok(true)) => {
                deadline = sent + lease_deadline(ttl);
                *shared_deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline.into_std();
            }
            Ok(Ok(false)) => {
                tracing::warn!(lease, "the leader lease expired; stepping down");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the leader lease"),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                lease,
                "no keep-alive answer before the lease deadline; stepping down"
            );
            let _ = lost.send(true);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// One keep-alive round trip; false when etcd says the lease is gone.
async fn renew(client: &Arc<EtcdClient>, lease: i64) -> Result<bool, StoreError> {
    let response = client
        .call("lease keep-alive", |index| {
            let mut leases = client.lease(index);
            async move {
                let request = tokio_stream::once(LeaseKeepAliveRequest { id: lease });
                let mut answers = leases.lease_keep_alive(request).await?.into_inner();
                answers
                    .message()
                    .await?
                    .ok_or_else(|| tonic::Status::unavailable("keep-alive stream closed"))
            }
        })
        .await?;
    Ok(response.ttl > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::{EtcdOptions, EtcdStore, test_cluster};
    use crate::store::{Keyspace, Store, StoreError, WriteBatch};

    fn write(store: &EtcdStore, id: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Settings, id, vec![1]);
        store.apply(batch)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_at_a_time_and_a_deposed_leaders_writes_are_refused() {
        let Some(shared) = test_cluster::fresh_store() else {
            return;
        };
        let options = shared.client().options().clone();
        let contender = |name: &str| {
            let client = EtcdClient::connect(EtcdOptions { ..options.clone() }).unwrap();
            let election = Election::new(
                Arc::clone(&client),
                ElectionOptions {
                    advertise: name.to_string(),
                    ttl: Duration::from_secs(2),
                },
            );
            (EtcdStore::new(client), election)
        };
        let (store_a, a) = contender("a:1");
        let (store_b, b) = contender("b:1");
        let lead_a = a.campaign().await;
        store_a.set_fence(Some(lead_a.fence.clone()));
        tokio::task::block_in_place(|| write(&store_a, "from-a")).unwrap();

        // b waits while a holds the lease, and sees who leads.
        let b_campaign = tokio::spawn(async move {
            let lead = b.campaign().await;
            (b, lead)
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!b_campaign.is_finished(), "two leaders at once");

        // a's keep-alives stop (as if it froze); its deadline passes
        // before the lease can lapse, then b takes over.
        lead_a.keepalive.abort();
        let (b, lead_b) = b_campaign.await.unwrap();
        assert_eq!(b.leader().as_deref(), Some("b:1"));
        assert_ne!(lead_b.fence, lead_a.fence);
        store_b.set_fence(Some(lead_b.fence.clone()));
        tokio::task::block_in_place(|| write(&store_b, "from-b")).unwrap();
        let refused = tokio::task::block_in_place(|| write(&store_a, "late-from-a"));
        assert!(matches!(refused, Err(StoreError::Fenced)), "{refused:?}");
        let late =
            tokio::task::block_in_place(|| store_a.get_raw(Keyspace::Settings, "late-from-a"));
        assert_eq!(late.unwrap(), None, "nothing of a fenced write is applied");
        lead_b.resign().await;
    }

    #[test]
    fn the_leader_stops_well_before_its_lease_can_lapse() {
        assert_eq!(
            lease_deadline(Duration::from_secs(4)),
            Duration::from_secs(3)
        );
        assert_eq!(
            lease_deadline(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }
}
