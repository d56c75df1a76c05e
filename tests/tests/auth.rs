//! The auth matrix: every client RPC × every role × own and other tenant,
//! plus no token, a malformed token and a revoked token. A call "passes
//! auth" when its answer is anything but UNAUTHENTICATED or
//! PERMISSION_DENIED (a NOT_FOUND for a made-up node still proves the
//! caller was let in).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::secrets_client::SecretsClient;
use gpufleet_proto::v1::telemetry_client::TelemetryClient;
use gpufleet_proto::v1::tokens_client::TokensClient;
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::*;
use gpufleet_tests::{Authed, Cluster, NodeSpec, authed};
use prost::Message as _;
use tonic::{Code, Status};

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// What a row's call acts on: its own tenant's data or another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Own,
    Other,
}

/// Data the calls refer to, per side.
#[derive(Debug, Clone)]
struct Fixture {
    job: [String; 2],
    tenant: [String; 2],
    /// Tokens made fresh for each revoke call, per side.
    endpoint: String,
    root: String,
}

impl Fixture {
    fn side(&self, side: Side) -> usize {
        match side {
            Side::Own => 0,
            Side::Other => 1,
        }
    }
    fn job(&self, side: Side) -> String {
        self.job[self.side(side)].clone()
    }
    fn tenant(&self, side: Side) -> String {
        self.tenant[self.side(side)].clone()
    }
}

struct Row {
    method: &'static str,
    min_role: Role,
    /// The call touches one tenant's data, so a token of another tenant is refused.
    tenant_scoped: bool,
    /// Only tokens for every tenant may make it.
    fleet_admin: bool,
    call: fn(Authed, Fixture, Side) -> Call,
}

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

fn job_spec(tenant: String) -> JobSpec {
    JobSpec {
        tenant,
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn rows() -> Vec<Row> {
    use Role::*;
    let mut rows = vec![
        Row {
            method: "gpufleet.v1.Jobs/SubmitJob",
            min_role: Submitter,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .submit_job(SubmitJobRequest {
                            spec: Some(job_spec(f.tenant(side))),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/GetJob",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .get_job(GetJobRequest {
                            job_id: f.job(side),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/ListJobs",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .list_jobs(ListJobsRequest {
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/CancelJob",
            min_role: Submitter,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .cancel_job(CancelJobRequest {
                            job_id: f.job(side),
                            reason: "auth matrix".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/WatchJob",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .watch_job(WatchJobRequest {
                            job_id: f.job(side),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/StreamJobLogs",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .stream_job_logs(StreamJobLogsRequest {
                            job_id: f.job(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Jobs/ExplainJob",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(JobsClient::new(c)
                        .explain_job(ExplainJobRequest {
                            job_id: f.job(side),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/ListNodes",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .list_nodes(ListNodesRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/GetNode",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .get_node(GetNodeRequest {
                            node_id: "auth-node".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/GetCapacity",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .get_capacity(GetCapacityRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/CordonNode",
            min_role: Operator,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .cordon_node(CordonNodeRequest {
                            node_id: "no-such-node".into(),
                            reason: String::new(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/UncordonNode",
            min_role: Operator,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .uncordon_node(UncordonNodeRequest {
                            node_id: "no-such-node".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/DrainNode",
            min_role: Operator,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .drain_node(DrainNodeRequest {
                            node_id: "no-such-node".into(),
                            deadline_seconds: 0,
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/UncordonGpu",
            min_role: Operator,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .uncordon_gpu(UncordonGpuRequest {
                            node_id: "no-such-node".into(),
                            gpu_uuid: "GPU-none".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/ResetNodeIdentity",
            min_role: Admin,
            tenant_scoped: false,
            fleet_admin: true,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .reset_node_identity(ResetNodeIdentityRequest {
                            node_id: "no-such-node".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Telemetry/GetLatest",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(TelemetryClient::new(c)
                        .get_latest(GetLatestRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Telemetry/GetHistory",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(TelemetryClient::new(c)
                        .get_history(GetHistoryRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Telemetry/GetAggregates",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(TelemetryClient::new(c)
                        .get_aggregates(GetAggregatesRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/ListUsageRecords",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .list_usage_records(ListUsageRecordsRequest {
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/GetUsageReport",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .get_usage_report(UsageReportRequest {
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/TopUsage",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .top_usage(TopUsageRequest {
                            by: UsageDimension::Tenant as i32,
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/UsageByGeneration",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .usage_by_generation(UsageByGenerationRequest {
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/MarketTightness",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .market_tightness(MarketTightnessRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/MarketElasticity",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .market_elasticity(MarketElasticityRequest {
                            region: "us-east-1".into(),
                            generation: GpuGeneration::Hopper as i32,
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/MarketPrices",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .market_prices(gpufleet_proto::v1::MarketPricesRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/MarketInterruptions",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .market_interruptions(
                            gpufleet_proto::v1::MarketInterruptionsRequest::default(),
                        )
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Usage/UsageWaste",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(UsageClient::new(c)
                        .usage_waste(gpufleet_proto::v1::UsageWasteRequest {
                            by: UsageDimension::Tenant as i32,
                            tenant: f.tenant(side),
                            ..Default::default()
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Fleet/SetMigLayout",
            min_role: Operator,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(FleetClient::new(c)
                        .set_mig_layout(gpufleet_proto::v1::SetMigLayoutRequest {
                            node_id: "no-such-node".into(),
                            gpu_uuid: "GPU-none".into(),
                            profiles: vec!["1g.10gb".into()],
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Secrets/PutRegistrySecret",
            min_role: Submitter,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(SecretsClient::new(c)
                        .put_registry_secret(PutRegistrySecretRequest {
                            tenant: f.tenant(side),
                            name: "matrix".into(),
                            registry: "registry.example.com".into(),
                            username: "bot".into(),
                            password: "pw".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Secrets/ListRegistrySecrets",
            min_role: Viewer,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(SecretsClient::new(c)
                        .list_registry_secrets(ListRegistrySecretsRequest {
                            tenant: f.tenant(side),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Secrets/DeleteRegistrySecret",
            min_role: Submitter,
            tenant_scoped: true,
            fleet_admin: false,
            // NOT_FOUND for a secret already gone still passes auth.
            call: |c, f, side| {
                Box::pin(async move {
                    ok(SecretsClient::new(c)
                        .delete_registry_secret(DeleteRegistrySecretRequest {
                            tenant: f.tenant(side),
                            name: "matrix".into(),
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Tokens/CreateToken",
            min_role: Admin,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    ok(TokensClient::new(c)
                        .create_token(CreateTokenRequest {
                            name: "made-by-matrix".into(),
                            role: Role::Viewer as i32,
                            tenant: f.tenant(side),
                            ttl_seconds: 0,
                        })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Tokens/ListTokens",
            min_role: Admin,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move {
                    ok(TokensClient::new(c)
                        .list_tokens(ListTokensRequest::default())
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Tokens/RevokeToken",
            min_role: Admin,
            tenant_scoped: true,
            fleet_admin: false,
            call: |c, f, side| {
                Box::pin(async move {
                    // A fresh victim of the side's tenant, made with the root token.
                    let victim =
                        TokensClient::new(authed(&f.endpoint, &f.root).await.map_err(|e| {
                            Status::internal(format!("cannot connect as root: {e}"))
                        })?)
                        .create_token(CreateTokenRequest {
                            name: "victim".into(),
                            role: Role::Viewer as i32,
                            tenant: f.tenant(side),
                            ttl_seconds: 0,
                        })
                        .await?
                        .into_inner()
                        .info
                        .unwrap_or_default();
                    ok(TokensClient::new(c)
                        .revoke_token(RevokeTokenRequest { id: victim.id })
                        .await)
                })
            },
        },
        Row {
            method: "gpufleet.v1.Tokens/WhoAmI",
            min_role: Viewer,
            tenant_scoped: false,
            fleet_admin: false,
            call: |c, _, _| {
                Box::pin(async move { ok(TokensClient::new(c).who_am_i(WhoAmIRequest {}).await) })
            },
        },
    ];
    rows.sort_by_key(|r| r.method);
    rows
}

/// Every method of the client-facing services: a new RPC without a row in
/// the matrix fails this test.
fn client_methods() -> anyhow::Result<BTreeSet<String>> {
    let set = prost_types::FileDescriptorSet::decode(gpufleet_proto::FILE_DESCRIPTOR_SET)?;
    let mut out = BTreeSet::new();
    for file in &set.file {
        for service in &file.service {
            let name = service.name();
            // AgentControl authenticates agents (join token, node secret);
            // Agent is the node-local API (api_token).
            if matches!(name, "AgentControl" | "Agent") {
                continue;
            }
            for method in &service.method {
                out.insert(format!("{}.{name}/{}", file.package(), method.name()));
            }
        }
    }
    Ok(out)
}

fn refused(result: &Result<(), Status>) -> Option<Code> {
    match result {
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            Some(s.code())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_role_and_tenant() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[NodeSpec::new(
        "auth-node",
        "aws",
        "us-east-1",
        "8xH100-SXM-80GB",
        3.0,
    )])
    .await?;
    let endpoint = cluster.endpoint();
    let root = cluster.admin_token.clone();

    let covered: BTreeSet<String> = rows().iter().map(|r| r.method.to_string()).collect();
    assert_eq!(
        client_methods()?,
        covered,
        "every client RPC needs a row in the auth matrix"
    );

    // One long job per tenant, submitted by the all-tenant admin.
    let mut jobs = cluster.jobs().await?;
    let mut job_ids = Vec::new();
    for tenant in ["team-a", "team-b"] {
        let mut spec = job_spec(tenant.to_string());
        spec.workload = Some(WorkloadSpec {
            argv: vec!["sleep".into(), "300".into()],
            ..Default::default()
        });
        let job = jobs
            .submit_job(SubmitJobRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("no job"))?;
        assert_eq!(job.spec.as_ref().map(|s| s.tenant.as_str()), Some(tenant));
        job_ids.push(job.id);
    }
    let fixture = Fixture {
        job: [job_ids[0].clone(), job_ids[1].clone()],
        tenant: ["team-a".into(), "team-b".into()],
        endpoint: endpoint.clone(),
        root: root.clone(),
    };

    let mut tokens = TokensClient::new(cluster.channel().await?);
    let mut checked = 0;
    let mut failures = Vec::new();
    for role in [Role::Viewer, Role::Submitter, Role::Operator, Role::Admin] {
        let token = tokens
            .create_token(CreateTokenRequest {
                name: format!("matrix-{}", role.as_str_name().to_ascii_lowercase()),
                role: role as i32,
                tenant: "team-a".into(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .token;
        for row in rows() {
            for side in [Side::Own, Side::Other] {
                let client = authed(&endpoint, &token).await?;
                let result = (row.call)(client, fixture.clone(), side).await;
                let allowed = role >= row.min_role
                    && !row.fleet_admin
                    && !(row.tenant_scoped && side == Side::Other);
                let got = refused(&result);
                let ok = if allowed {
                    got.is_none()
                } else {
                    got == Some(Code::PermissionDenied)
                };
                if !ok {
                    failures.push(format!(
                        "{} as {:?} of team-a on {side:?} data: expected {}, got {result:?}",
                        row.method,
                        role,
                        if allowed {
                            "to pass"
                        } else {
                            "PERMISSION_DENIED"
                        }
                    ));
                }
                checked += 1;
            }
        }
    }

    // The all-tenant admin passes everything, on both sides.
    for row in rows() {
        for side in [Side::Own, Side::Other] {
            let result = (row.call)(authed(&endpoint, &root).await?, fixture.clone(), side).await;
            if let Some(code) = refused(&result) {
                failures.push(format!("{} as root: refused with {code:?}", row.method));
            }
            checked += 1;
        }
    }

    // No token, a malformed one and a revoked one: UNAUTHENTICATED everywhere.
    let revoked = tokens
        .create_token(CreateTokenRequest {
            name: "soon-revoked".into(),
            role: Role::Admin as i32,
            tenant: "*".into(),
            ttl_seconds: 0,
        })
        .await?
        .into_inner();
    tokens
        .revoke_token(RevokeTokenRequest {
            id: revoked.info.clone().unwrap_or_default().id,
        })
        .await?;
    let channel = tonic::transport::Channel::from_shared(endpoint.clone())?
        .connect()
        .await?;
    for (what, client) in [
        (
            "no token",
            tonic::service::interceptor::InterceptedService::new(
                channel.clone(),
                gpufleet_tests::BearerToken::none(),
            ),
        ),
        ("a malformed token", authed(&endpoint, "not-a-token").await?),
        ("a revoked token", authed(&endpoint, &revoked.token).await?),
    ] {
        for row in rows() {
            let result = (row.call)(client.clone(), fixture.clone(), Side::Own).await;
            if refused(&result) != Some(Code::Unauthenticated) {
                failures.push(format!(
                    "{} with {what}: expected UNAUTHENTICATED, got {result:?}",
                    row.method
                ));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_sees_only_its_tenant() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[NodeSpec::new(
        "scope-node",
        "aws",
        "us-east-1",
        "4xH100-SXM-80GB",
        3.0,
    )])
    .await?;
    let mut tokens = TokensClient::new(cluster.channel().await?);
    let mut token_for = async |tenant: &str| -> anyhow::Result<String> {
        Ok(tokens
            .create_token(CreateTokenRequest {
                name: format!("sub-{tenant}"),
                role: Role::Submitter as i32,
                tenant: tenant.into(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .token)
    };
    let a = token_for("team-a").await?;
    let b = token_for("team-b").await?;
    let endpoint = cluster.endpoint();
    let submit = async |token: &str| -> anyhow::Result<Job> {
        JobsClient::new(authed(&endpoint, token).await?)
            .submit_job(SubmitJobRequest {
                // No tenant named: the token's tenant is used.
                spec: Some(job_spec(String::new())),
            })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("no job"))
    };
    let job_a = submit(&a).await?;
    let job_b = submit(&b).await?;
    assert_eq!(
        job_a.spec.as_ref().map(|s| s.tenant.as_str()),
        Some("team-a")
    );
    for job in [&job_a, &job_b] {
        cluster
            .wait_job(&job.id, "to finish", |j| j.state() == JobState::Succeeded)
            .await?;
    }

    // Listing without a tenant filter shows only the token's own jobs.
    let listed = JobsClient::new(authed(&endpoint, &a).await?)
        .list_jobs(ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    let ids: Vec<&str> = listed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, vec![job_a.id.as_str()]);

    // Usage: records and reports are narrowed to the token's tenant.
    let mut usage = UsageClient::new(authed(&endpoint, &a).await?);
    let records = usage
        .list_usage_records(ListUsageRecordsRequest::default())
        .await?
        .into_inner()
        .records;
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r.tenant == "team-a"), "{records:?}");
    let top = usage
        .top_usage(TopUsageRequest {
            by: UsageDimension::Tenant as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let tenants: Vec<&str> = top.rows.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(tenants, vec!["team-a"]);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_limit_gets_resource_exhausted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = gpufleet_controller::ControllerConfig::for_data_dir(dir.path());
    config.listen = listener.local_addr()?;
    // A burst of 5, refilled at one request per 100 s: the 6th call in a
    // row is over the limit however slow this machine is.
    config.rate_limit = Some(gpufleet_controller::auth::RateLimit {
        per_second: 0.01,
        burst: 5.0,
    });
    let controller = gpufleet_controller::start(config, Some(listener)).await?;
    let token = gpufleet_tests::admin_token_in(dir.path())?;
    let mut fleet = FleetClient::new(authed(&controller.endpoint(), &token).await?);
    for _ in 0..5 {
        fleet.list_nodes(ListNodesRequest::default()).await?;
    }
    let err = fleet
        .list_nodes(ListNodesRequest::default())
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("rate limit"), "{}", err.message());
    controller.shutdown().await
}
