//! A gang's rendezvous on this node: the free port rank 0's agent chooses
//! and the environment every rank's workload gets (docs/workloads.md,
//! "Multi-node gangs").

use std::net::TcpListener;

use gpufleet_proto::v1::Gang;

/// Names of the variables [`rendezvous_env`] sets, in its order.
pub const GANG_ENV_NAMES: &[&str] = &[
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "NODE_RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GPUFLEET_PEERS",
];

/// A port that is free on this host now: bound on every address, read,
/// and released for the workload to bind. Another process may take it in
/// between (the race every launcher that passes a port has); the gang
/// then fails as one and its retry policy restarts it with a new port.
pub fn pick_free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind(("0.0.0.0", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The variables distributed frameworks read. One task is one node's
/// share of the job with one process using all of its GPUs, as torchrun's
/// per-node agent sees it: RANK = NODE_RANK = the task index,
/// WORLD_SIZE = the number of tasks, LOCAL_RANK = 0, LOCAL_WORLD_SIZE = 1.
pub fn rendezvous_env(gang: &Gang) -> Vec<(String, String)> {
    let values = [
        gang.master_addr.clone(),
        gang.master_port.to_string(),
        gang.world_size.to_string(),
        gang.rank.to_string(),
        gang.rank.to_string(),
        "0".to_string(),
        "1".to_string(),
        gang.peers.join(","),
    ];
    GANG_ENV_NAMES
        .iter()
        .map(|name| name.to_string())
        .zip(values)
        .collect()
}

/// `env` with the gang's variables added, replacing any of the same name,
/// sorted by name.
pub fn with_rendezvous_env(mut env: Vec<(String, String)>, gang: &Gang) -> Vec<(String, String)> {
    env.retain(|(name, _)| !GANG_ENV_NAMES.contains(&name.as_str()));
    env.extend(rendezvous_env(gang));
    env.sort();
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_gets_every_variable_and_the_gangs_values_win() {
        let gang = Gang {
            rank: 2,
            world_size: 3,
            peers: vec!["10.0.0.1".into(), "10.0.0.2".into(), "10.0.0.3".into()],
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
        };
        let env = with_rendezvous_env(
            vec![("RANK".into(), "7".into()), ("A".into(), "b".into())],
            &gang,
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(get("A"), "b");
        assert_eq!(get("RANK"), "2");
        assert_eq!(get("NODE_RANK"), "2");
        assert_eq!(get("LOCAL_RANK"), "0");
        assert_eq!(get("LOCAL_WORLD_SIZE"), "1");
        assert_eq!(get("WORLD_SIZE"), "3");
        assert_eq!(get("MASTER_ADDR"), "10.0.0.1");
        assert_eq!(get("MASTER_PORT"), "29500");
        assert_eq!(get("GPUFLEET_PEERS"), "10.0.0.1,10.0.0.2,10.0.0.3");
        assert_eq!(env.iter().filter(|(n, _)| n == "RANK").count(), 1);
    }

    #[test]
    fn a_free_port_is_not_zero_and_can_be_bound_again() {
        let port = pick_free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind(("0.0.0.0", port)).unwrap();
    }
}
