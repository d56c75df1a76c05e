//! The highest seq applied from each agent survives a controller restart,
//! so events an agent replays from its outbox are applied once.

use gpufleet_controller::state::Controller;
use gpufleet_proto::v1::{AgentHello, controller_message};

mod common;
use common::open;

fn hello() -> AgentHello {
    common::hello(
        "node-a",
        common::gpus("node-a", "L4", 1, 24 << 30),
        Vec::new(),
    )
}

/// `last_seq` of the hello ack a fresh session starts with.
fn hello_ack_seq(controller: &Controller) -> anyhow::Result<u64> {
    let mut session = controller.connect_agent(hello())?;
    // The ack leaves once the hello's writes are durable.
    controller.wait_settled()?;
    match session.downlink.try_recv()?.body {
        Some(controller_message::Body::HelloAck(ack)) => Ok(ack.last_seq),
        other => anyhow::bail!("expected a hello ack first, got {other:?}"),
    }
}

#[test]
fn applied_seqs_survive_a_restart_and_close_refuses_new_ones() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let controller = open(dir.path())?;
        assert_eq!(hello_ack_seq(&controller)?, 0);
        // Accepted, applied, then acknowledged (write first, then ack).
        assert!(controller.accept_seq("node-a", 10));
        controller.applied_seq("node-a", 10);
        assert!(controller.accept_seq("node-a", 11));
        controller.applied_seq("node-a", 11);
        assert!(!controller.accept_seq("node-a", 11), "a replay is refused");
        // Unsequenced messages (hello, heartbeats) are always applied.
        assert!(controller.accept_seq("node-a", 0));
        assert_eq!(controller.persist_agent_seqs()?, 1);
        assert_eq!(controller.persist_agent_seqs()?, 0, "nothing changed");
        controller.close();
        assert!(
            !controller.accept_seq("node-a", 12),
            "a closing controller applies nothing more"
        );
    }
    let controller = open(dir.path())?;
    assert_eq!(hello_ack_seq(&controller)?, 11);
    assert!(!controller.accept_seq("node-a", 11));
    assert!(controller.accept_seq("node-a", 12));
    Ok(())
}
