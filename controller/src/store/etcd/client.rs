//! The connection to an etcd cluster: endpoints tried in turn, TLS, user
//! and password auth, and a runtime of its own so that the synchronous
//! [`crate::store::Store`] calls can wait for it from any thread.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use gpufleet_proto::etcd::etcdserverpb::auth_client::AuthClient;
use gpufleet_proto::etcd::etcdserverpb::kv_client::KvClient;
use gpufleet_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use gpufleet_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use gpufleet_proto::etcd::etcdserverpb::{AuthenticateRequest, StatusRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::store::StoreError;

/// How a controller reaches etcd (the `etcd_*` config keys).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port`, `https://host:port` or `unix:///path`.
    pub endpoints: Vec<String>,
    /// Every key this controller writes starts with it, so several fleets
    /// can share one etcd.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
    /// Longest wait for one etcd call before the next endpoint is tried.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA bundle that signed the etcd members' certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key, when etcd requires client certificates.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct EtcdAuth {
    pub username: String,
    pub password: String,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            tls: None,
            auth: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Adds etcd's auth token (the `token` header) to every call.
#[derive(Clone, Default)]
pub(crate) struct TokenHeader(
    Arc<RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>>,
);

impl tonic::service::Interceptor for TokenHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let token = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(token) = token {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

pub(crate) type Svc = InterceptedService<Channel, TokenHeader>;

/// One etcd cluster: a channel per endpoint (connected lazily), the one in
/// use, and the runtime every call runs on.
pub struct EtcdClient {
    options: EtcdOptions,
    channels: Vec<Channel>,
    current: Mutex<usize>,
    token: TokenHeader,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.options.endpoints)
            .field("prefix", &self.options.prefix)
            .finish()
    }
}

impl Drop for EtcdClient {
    fn drop(&mut self) {
        // May be dropped inside another runtime, where a blocking shutdown
        // would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string().into())
}

/// Whether an etcd error means "try another member" (the member is down,
/// partitioned or not the one that can answer).
pub(crate) fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    ) || status.message().contains("leader changed")
        || status.message().contains("no leader")
}

fn auth_expired(status: &tonic::Status) -> bool {
    status.message().contains("invalid auth token")
}

impl EtcdClient {
    /// Builds the channels (nothing is dialled yet) and, with auth, logs in.
    pub fn connect(options: EtcdOptions) -> Result<Arc<Self>, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Open {
                path: "etcd".into(),
                source: "etcd_endpoints is empty: name at least one etcd member".into(),
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(io)?;
        let tls = options.tls.as_ref().map(tls_config).transpose()?;
        let channels = {
            let _entered = runtime.enter();
            options
                .endpoints
                .iter()
                .map(|url| channel(url, tls.clone(), options.request_timeout))
                .collect::<Result<Vec<_>, _>>()?
        };
        let client = Arc::new(Self {
            options,
            channels,
            current: Mutex::new(0),
            token: TokenHeader::default(),
            runtime: Some(runtime),
        });
        if client.options.auth.is_some() {
            client.authenticate()?;
        }
        Ok(client)
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// Runs `future` on the client's runtime and waits for it. Callable from
    /// any thread, inside another runtime too (it blocks that thread, as a
    /// disk read of the embedded store does).
    pub(crate) fn block<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(io("the etcd client is shut down"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| io("the etcd client is shut down"))
    }

    fn svc(&self, index: usize) -> Svc {
        InterceptedService::new(self.channels[index].clone(), self.token.clone())
    }

    pub(crate) fn kv(&self, index: usize) -> KvClient<Svc> {
        KvClient::new(self.svc(index)).max_decoding_message_size(64 << 20)
    }

    pub(crate) fn lease(&self, index: usize) -> LeaseClient<Svc> {
        LeaseClient::new(self.svc(index))
    }

    pub(crate) fn maintenance(&self, index: usize) -> MaintenanceClient<Svc> {
        MaintenanceClient::new(self.svc(index))
    }

    fn current(&self) -> usize {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `op` on the endpoint in use; when that member cannot answer,
    /// on each other one in turn (the one that answered stays in use).
    /// Every caller's operation is safe to repeat: a batch writes absolute
    /// values, so applying it twice leaves what applying it once does.
    pub(crate) async fn call<T, F, Fut>(
        self: &Arc<Self>,
        what: &str,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let count = self.channels.len();
        let first = self.current();
        let mut last = None;
        let mut reauthenticated = false;
        let mut attempt = 0;
        while attempt < count {
            let index = (first + attempt) % count;
            match op(index).await {
                Ok(value) => {
                    if index != first {
                        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = index;
                        tracing::info!(endpoint = %self.options.endpoints[index], "using another etcd member");
                    }
                    return Ok(value);
                }
                Err(status) if auth_expired(&status) && !reauthenticated => {
                    reauthenticated = true;
                    let me = Arc::clone(self);
                    me.authenticate_async().await?;
                    continue;
                }
                Err(status) if retryable(&status) => {
                    tracing::debug!(endpoint = %self.options.endpoints[index], error = %status, "etcd member did not answer");
                    last = Some(status);
                }
                Err(status) => return Err(io(format!("etcd {what}: {}", status.message()))),
            }
            attempt += 1;
        }
        Err(io(format!(
            "etcd {what}: no member of {} answered: {}",
            self.options.endpoints.join(","),
            last.map(|s| s.message().to_string()).unwrap_or_default()
        )))
    }

    fn authenticate(self: &Arc<Self>) -> Result<(), StoreError> {
        let me = Arc::clone(self);
        self.block(async move { me.authenticate_async().await })?
    }

    async fn authenticate_async(self: &Arc<Self>) -> Result<(), StoreError> {
        let Some(auth) = self.options.auth.clone() else {
            return Ok(());
        };
        // Not through `call`, which calls this when a token expired.
        let mut last = None;
        let mut token = None;
        for index in 0..self.channels.len() {
            let request = AuthenticateRequest {
                name: auth.username.clone(),
                password: auth.password.clone(),
            };
            match AuthClient::new(self.channels[index].clone())
                .authenticate(request)
                .await
            {
                Ok(response) => {
                    token = Some(response.into_inner().token);
                    break;
                }
                Err(status) if retryable(&status) => last = Some(status),
                Err(status) => {
                    return Err(io(format!(
                        "etcd refused user {:?}: {}; check etcd_username and etcd_password_file",
                        auth.username,
                        status.message()
                    )));
                }
            }
        }
        let Some(token) = token else {
            return Err(io(format!(
                "etcd authenticate: no member answered: {}",
                last.map(|s| s.message().to_string()).unwrap_or_default()
            )));
        };
        let value = token
            .parse()
            .map_err(|_| io("etcd returned an auth token that is not a header value"))?;
        *self.token.0.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// The cluster's status as one member sees it (a readiness check).
    pub fn status(self: &Arc<Self>) -> Result<String, StoreError> {
        let me = Arc::clone(self);
        self.block(async move {
            let response = me
                .call("status", |index| {
                    let mut client = me.maintenance(index);
                    async move { client.status(StatusRequest {}).await }
                })
                .await?
                .into_inner();
            Ok(format!(
                "etcd {} (leader {:x}, raft term {})",
                response.version, response.leader, response.raft_term
            ))
        })?
    }
}

fn tls_config(tls: &EtcdTls) -> Result<ClientTlsConfig, StoreError> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|source| StoreError::File {
            path: path.display().to_string(),
            what: format!("read the etcd {what} from"),
            source,
        })
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file, "CA")?));
    if let Some((cert, key)) = &tls.client_cert {
        config = config.identity(Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    Ok(config)
}

fn channel(
    url: &str,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
) -> Result<Channel, StoreError> {
    let bad = |why: String| StoreError::Open {
        path: url.to_string(),
        source: format!(
            "etcd_endpoints: {why}; use http://host:port, https://host:port or unix:///path"
        )
        .into(),
    };
    if let Some(path) = url.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        // The URI is a placeholder: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://etcd.invalid")
            .connect_timeout(timeout)
            .timeout(timeout);
        return Ok(endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            },
        )));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("unknown scheme".into()));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let tls = tls.unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::test_cluster::{EtcdCluster, skip_or_fail};
    use crate::store::{EtcdStore, Keyspace, Store, WriteBatch};

    fn etcdctl(cluster: &EtcdCluster, args: &[&str]) {
        let status = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(cluster.endpoints().join(","))
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "etcdctl {args:?}");
    }

    #[test]
    fn with_auth_on_the_store_logs_in_and_a_wrong_password_names_the_keys() {
        let cluster = match EtcdCluster::start(1) {
            Ok(cluster) => cluster,
            Err(unavailable) => {
                skip_or_fail(&unavailable);
                return;
            }
        };
        etcdctl(&cluster, &["user", "add", "root:secret-pw"]);
        etcdctl(&cluster, &["auth", "enable"]);
        let options = |password: &str| EtcdOptions {
            auth: Some(EtcdAuth {
                username: "root".into(),
                password: password.into(),
            }),
            ..EtcdOptions::new(cluster.endpoints().to_vec(), "/auth/")
        };
        let store = EtcdStore::new(EtcdClient::connect(options("secret-pw")).unwrap());
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Settings, "x", vec![1]);
        store.apply(batch).unwrap();
        assert_eq!(
            store.get_raw(Keyspace::Settings, "x").unwrap(),
            Some(vec![1])
        );

        let refused = EtcdClient::connect(options("wrong"))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("etcd_password_file"), "{refused}");
        // Without credentials etcd refuses the read.
        let anonymous = EtcdStore::new(
            EtcdClient::connect(EtcdOptions::new(cluster.endpoints().to_vec(), "/auth/")).unwrap(),
        );
        assert!(anonymous.get_raw(Keyspace::Settings, "x").is_err());
    }
}
