//! High availability: several controllers share their state in etcd and
//! elect one leader (docs/ha.md).
//!
//! [`run`] is the controller binary in etcd mode: it binds its listener,
//! answers as a standby ([`standby`]) while it campaigns
//! ([`crate::store::etcd::election`]), and once elected reloads the state
//! from etcd and serves as the leader on the same listener
//! ([`acceptor`]). Every write of the leader carries its fence, so a
//! deposed leader's writes are refused by etcd.
//!
//! A leader that loses its leadership (its lease deadline passed, or a
//! write was fenced) exits at once with [`EXIT_LOST_LEADERSHIP`] instead
//! of unwinding in place, as Kubernetes' controller-manager and scheduler
//! do: nothing it holds in memory (queued writes, open streams, a
//! scheduling pass) can act after that instant, and its supervisor
//! (systemd `Restart=always`, a Kubernetes Deployment) starts it again as
//! a standby.

pub mod acceptor;
pub mod probe;
pub mod standby;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use gpufleet_proto::v1::agent_control_server::AgentControlServer;
use gpufleet_proto::v1::fleet_server::FleetServer;
use gpufleet_proto::v1::jobs_server::JobsServer;
use gpufleet_proto::v1::telemetry_server::TelemetryServer;
use gpufleet_proto::v1::tokens_server::TokensServer;
use gpufleet_proto::v1::usage_server::UsageServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

use crate::config::{ControllerConfig, EtcdConfig};
use crate::service::{
    AgentControlService, FleetService, JobsService, TelemetryService, TokensService, UsageService,
};
use crate::store::EtcdStore;
use crate::store::etcd::EtcdClient;
use crate::store::etcd::election::{Election, ElectionOptions, Leadership};

use self::acceptor::Acceptor;
use self::standby::Redirect;

/// The health service a standby and the leader both report SERVING: a
/// liveness probe asks for it (readiness asks for "", the leader only).
pub const LIVENESS_SERVICE: &str = "gpufleet.live";

/// The exit code of a leader that lost its leadership.
pub const EXIT_LOST_LEADERSHIP: i32 = 3;

/// How [`run`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The shutdown signal came; leadership (if held) was handed back.
    Shutdown,
    /// This controller was the leader and is no longer: the caller exits
    /// at once with [`EXIT_LOST_LEADERSHIP`].
    LostLeadership,
}

/// Connects to etcd (logging in off the async workers).
pub async fn connect(etcd: &EtcdConfig) -> anyhow::Result<Arc<EtcdClient>> {
    let options = etcd.options.clone();
    tokio::task::spawn_blocking(move || EtcdClient::connect(options))
        .await
        .context("the etcd connect task failed")?
        .context("cannot connect to etcd")
}

/// The URL this controller announces as leader.
pub fn advertise_url(
    config: &ControllerConfig,
    etcd: &EtcdConfig,
    bound: std::net::SocketAddr,
) -> String {
    etcd.advertise_url.clone().unwrap_or_else(|| {
        let scheme = if config.tls.cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{bound}")
    })
}

/// Campaigns and serves until `shutdown` resolves or leadership is lost.
pub async fn run(
    config: ControllerConfig,
    etcd: EtcdConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Ended> {
    let client = connect(&etcd).await?;
    let acceptor = Acceptor::spawn(listener)?;
    let advertise = advertise_url(&config, &etcd, acceptor.local_addr());
    let election = Election::new(
        Arc::clone(&client),
        ElectionOptions {
            advertise: advertise.clone(),
            ttl: etcd.leader_lease,
        },
    );
    tokio::pin!(shutdown);

    // Standby until elected.
    let (standby_stop, standby_stopped) = tokio::sync::oneshot::channel::<()>();
    let standby = serve_standby(&config, &acceptor, &election, async {
        let _ = standby_stopped.await;
    })
    .await?;
    tracing::info!(local_addr = %acceptor.local_addr(), %advertise, "{}", probe::STANDING_BY);
    let leadership = tokio::select! {
        leadership = election.campaign() => leadership,
        _ = &mut shutdown => {
            let _ = standby_stop.send(());
            let _ = standby.await;
            return Ok(Ended::Shutdown);
        }
    };
    let _ = standby_stop.send(());
    let _ = standby.await;

    // Leader: the state as etcd has it, every write fenced.
    let store = EtcdStore::new(Arc::clone(&client));
    store.set_fence(Some(leadership.fence.clone()));
    let fenced = store.fenced();
    let disarm = watchdog(leadership.deadline_handle());
    let running = crate::server::start_serving(
        config,
        Box::new(store),
        acceptor.next_phase(),
        acceptor.local_addr(),
    )
    .await?;
    tokio::select! {
        _ = leadership.lost() => Ok(Ended::LostLeadership),
        _ = fenced => Ok(Ended::LostLeadership),
        _ = &mut shutdown => {
            tracing::info!("shutting down; handing leadership over");
            let result = running.shutdown().await;
            disarm.store(true, std::sync::atomic::Ordering::SeqCst);
            hand_over(leadership).await;
            result.map(|()| Ended::Shutdown)
        }
    }
}

/// A thread outside the async runtime that exits the process once the
/// leadership deadline passed. The keep-alive task notices too, but a
/// process that was paused (SIGSTOP) wakes all its tasks at once, in no
/// set order: this thread needs no runtime turn to stop them.
/// Setting the returned flag stops it (a clean hand-over).
fn watchdog(
    deadline: Arc<std::sync::Mutex<std::time::Instant>>,
) -> Arc<std::sync::atomic::AtomicBool> {
    let disarmed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let disarm = Arc::clone(&disarmed);
    let spawned = std::thread::Builder::new()
        .name("leader-watchdog".into())
        .spawn(move || {
            loop {
                if disarmed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let until = *deadline.lock().unwrap_or_else(|p| p.into_inner());
                if std::time::Instant::now() >= until {
                    tracing::error!("the leadership deadline passed; exiting");
                    std::process::exit(EXIT_LOST_LEADERSHIP);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the leadership watchdog; the keep-alive task still steps down");
    }
    disarm
}

/// `--migrate-from-sled DIR`: copies that sled store into the configured
/// etcd. Returns what it copied, per keyspace.
pub async fn migrate_from_sled(
    etcd: &EtcdConfig,
    dir: std::path::PathBuf,
) -> anyhow::Result<crate::store::etcd::migrate::Copied> {
    let client = connect(etcd).await?;
    tokio::task::spawn_blocking(move || {
        let from = crate::store::SledStore::open(&dir)?;
        let to = EtcdStore::new(client);
        Ok(crate::store::etcd::migrate::copy_into(&from, &to)?)
    })
    .await
    .context("the migration task failed")?
}

/// Revokes the lease so a standby takes over at once.
async fn hand_over(leadership: Leadership) {
    leadership.resign().await;
}

/// Serves standby answers on the acceptor's next phase until `stop`.
async fn serve_standby(
    config: &ControllerConfig,
    acceptor: &Acceptor,
    election: &Election,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let leader = election.leader_handle();
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in [
        "",
        JobsServer::<JobsService>::NAME,
        FleetServer::<FleetService>::NAME,
        UsageServer::<UsageService>::NAME,
        TokensServer::<TokensService>::NAME,
        TelemetryServer::<TelemetryService>::NAME,
        AgentControlServer::<AgentControlService>::NAME,
    ] {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // Alive, though not leading: what a liveness probe asks.
    health
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gpufleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = crate::server::server_tls(&config.tls)? {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration")?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(Redirect::<JobsServer<JobsService>>::new(Arc::clone(
            &leader,
        )))
        .add_service(Redirect::<FleetServer<FleetService>>::new(Arc::clone(
            &leader,
        )))
        .add_service(Redirect::<UsageServer<UsageService>>::new(Arc::clone(
            &leader,
        )))
        .add_service(Redirect::<TokensServer<TokensService>>::new(Arc::clone(
            &leader,
        )))
        .add_service(Redirect::<TelemetryServer<TelemetryService>>::new(
            Arc::clone(&leader),
        ))
        .add_service(Redirect::<AgentControlServer<AgentControlService>>::new(
            leader,
        ));
    Ok(tokio::spawn(
        router.serve_with_incoming_shutdown(acceptor.next_phase(), stop),
    ))
}
