//! Group commit through the controller: a change does not wait for the
//! disk, and nothing that depends on it (a job event, a desired state, an
//! ack) leaves before its write is durable. The store here stops in the
//! middle of its sync whenever the test closes a gate.

use std::sync::{Arc, Mutex};

use gpufleet_controller::store::{IdRange, Keyspace, SledStore, Store, StoreError, WriteBatch};
use gpufleet_proto::v1::{AgentHello, JobSpec, JobState, WorkloadSpec, controller_message};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::mpsc::error::TryRecvError as DownlinkEmpty;

mod common;

/// A sled store whose writes wait while the test holds `gate`.
struct GatedStore {
    inner: SledStore,
    gate: Arc<Mutex<()>>,
}

impl Store for GatedStore {
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        drop(self.gate.lock().unwrap_or_else(|p| p.into_inner()));
        self.inner.apply(batch)
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_raw(space, id)
    }

    fn visit_raw(
        &self,
        space: Keyspace,
        range: IdRange<'_>,
        visit: &mut dyn FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.inner.visit_raw(space, range, visit)
    }
}

fn hello() -> AgentHello {
    common::hello(
        "node-a",
        common::gpus("node-a", "L4", 1, 24 << 30),
        Vec::new(),
    )
}

fn spec() -> JobSpec {
    JobSpec {
        tasks: 1,
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn nothing_leaves_before_its_write_is_durable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gate = Arc::new(Mutex::new(()));
    let store = GatedStore {
        inner: SledStore::open(dir.path())?,
        gate: gate.clone(),
    };
    let controller = common::open_with(dir.path(), Box::new(store))?;
    let mut session = controller.connect_agent(hello())?;
    controller.wait_settled()?;
    while session.downlink.try_recv().is_ok() {}
    let mut events = controller.subscribe_jobs();

    // The disk stalls: changes still go through at once...
    let closed = gate.lock().unwrap_or_else(|p| p.into_inner());
    let job = controller.submit_job(spec())?;
    assert_eq!(controller.schedule_pass()?, 1);
    assert!(controller.accept_seq("node-a", 7));
    controller.applied_seq("node-a", 7);
    assert_eq!(
        controller.get_job(&job.id)?.state(),
        JobState::Scheduled,
        "the controller reads its own queued writes"
    );
    // ...but nothing that depends on them leaves.
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
    assert!(matches!(
        session.downlink.try_recv(),
        Err(DownlinkEmpty::Empty)
    ));

    drop(closed);
    controller.wait_settled()?;
    let states: Vec<JobState> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|job| job.state())
        .collect();
    assert_eq!(states, [JobState::Pending, JobState::Scheduled]);
    let mut sent = Vec::new();
    while let Ok(message) = session.downlink.try_recv() {
        sent.push(message.body);
    }
    match sent.as_slice() {
        [
            Some(controller_message::Body::DesiredState(desired)),
            Some(controller_message::Body::Ack(ack)),
        ] => {
            assert_eq!(desired.allocations.len(), 1);
            assert_eq!(ack.seq, 7);
        }
        other => anyhow::bail!("expected the desired state, then the ack; got {other:?}"),
    }
    Ok(())
}
