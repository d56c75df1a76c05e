//! TLS on the controller's gRPC listener, mutual TLS for agents, and a client
//! with the CA. Certificates are made by the test (rcgen).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use gpufleet_agent::{AgentConfig, NodeConfig, TlsClientConfig};
use gpufleet_controller::ControllerConfig;
use gpufleet_controller::config::TlsServerConfig;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{
    GetJobRequest, JobSpec, JobState, ListNodesRequest, NodeState, SubmitJobRequest, WorkloadSpec,
};
use gpufleet_tests::eventually;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    agent_cert: String,
    agent_key: String,
}

fn pki() -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gpufleet test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names)?.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()])?;
    let (agent_cert, agent_key) = leaf(vec!["tls-node".into()])?;
    Ok(Pki {
        ca: ca_cert.pem(),
        server_cert,
        server_key,
        agent_cert,
        agent_key,
    })
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn agent_config(dir: &Path, endpoint: &str, tls: TlsClientConfig, id: &str) -> AgentConfig {
    let node = NodeConfig {
        address: None,
        id: Some(id.to_string()),
        provider: "aws".into(),
        region: "us-east-1".into(),
        zone: String::new(),
        instance_type: String::new(),
        price_per_gpu_hour_usd: 2.0,
        spot: false,
        labels: BTreeMap::new(),
    };
    AgentConfig {
        sample_interval: Duration::from_millis(200),
        stop_grace_period: Duration::from_secs(2),
        tls,
        log_max_bytes: 1 << 20,
        shim_program: Some(gpufleet_tests::test_shim()),
        ..AgentConfig::simulated(
            endpoint,
            gpufleet_tests::JOIN_TOKEN,
            node,
            vec!["2xL4".into()],
            dir.join(id),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_over_mutual_tls_and_plain_or_certless_peers_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki()?;
    let ca = write(dir.path(), "ca.pem", &pki.ca)?;
    let mut config = ControllerConfig::for_data_dir(dir.path().join("controller"));
    config.join_token = gpufleet_tests::JOIN_TOKEN.to_string();
    config.tls = TlsServerConfig {
        cert: Some(write(dir.path(), "server.pem", &pki.server_cert)?),
        key: Some(write(dir.path(), "server.key", &pki.server_key)?),
        client_ca: Some(ca.clone()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    config.listen = listener.local_addr()?;
    let controller = gpufleet_controller::start(config, Some(listener)).await?;
    let endpoint = format!("https://localhost:{port}");
    let admin_token = gpufleet_tests::admin_token_in(&dir.path().join("controller"))?;

    // An agent with a client certificate joins; one without is refused.
    let with_cert = TlsClientConfig {
        ca: Some(ca.clone()),
        cert: Some(write(dir.path(), "agent.pem", &pki.agent_cert)?),
        key: Some(write(dir.path(), "agent.key", &pki.agent_key)?),
    };
    let without_cert = TlsClientConfig {
        ca: Some(ca.clone()),
        cert: None,
        key: None,
    };
    let good = gpufleet_agent::start(
        agent_config(dir.path(), &endpoint, with_cert, "tls-node"),
        None,
    )
    .await?;
    let bad = gpufleet_agent::start(
        agent_config(dir.path(), &endpoint, without_cert, "certless"),
        None,
    )
    .await?;

    let pem = std::fs::read(&ca)?;
    let channel = Channel::from_shared(endpoint.clone())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?
        .connect()
        .await?;
    let channel = tonic::service::interceptor::InterceptedService::new(
        channel,
        gpufleet_tests::BearerToken::with(&admin_token)?,
    );
    let fleet = FleetClient::new(channel.clone());
    eventually("the agent with a certificate to be Ready", || {
        let mut fleet = fleet.clone();
        async move {
            let nodes = fleet
                .list_nodes(ListNodesRequest::default())
                .await?
                .into_inner()
                .nodes;
            Ok(nodes
                .iter()
                .any(|n| {
                    n.identity.as_ref().is_some_and(|i| i.node_id == "tls-node")
                        && n.state() == NodeState::Ready
                })
                .then_some(()))
        }
    })
    .await?;

    let mut jobs = JobsClient::new(channel);
    let job = jobs
        .submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                gpus_per_task: 2,
                workload: Some(WorkloadSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    let done = eventually("the job to succeed over TLS", || {
        let mut jobs = jobs.clone();
        let id = job.id.clone();
        async move {
            let job = jobs
                .get_job(GetJobRequest { job_id: id })
                .await?
                .into_inner();
            Ok((job.state() == JobState::Succeeded).then_some(job))
        }
    })
    .await?;
    assert_eq!(done.tasks[0].node_id, "tls-node");

    // The certless agent never registered.
    let nodes = fleet
        .clone()
        .list_nodes(ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    assert!(
        nodes
            .iter()
            .all(|n| n.identity.as_ref().is_some_and(|i| i.node_id != "certless"))
    );

    // A plaintext client cannot talk to a TLS listener.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await;
    if let Ok(plain) = plain {
        let err = FleetClient::new(plain)
            .list_nodes(ListNodesRequest::default())
            .await;
        assert!(err.is_err(), "plaintext must not work against TLS");
    }

    bad.shutdown().await?;
    good.shutdown().await?;
    controller.shutdown().await
}
