//! How a process that started controllers (a test, a benchmark, a
//! supervisor script) finds them from outside: the address a controller
//! logged when it bound its listener, and whether it leads (health
//! `SERVING`; a standby answers `NOT_SERVING`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The message a controller in etcd mode logs once its listener is bound,
/// with the field `local_addr`.
pub const STANDING_BY: &str = "controller standing by";

/// The listener address in a controller's JSON log (`log_format = "json"`),
/// once it has logged [`STANDING_BY`].
pub fn logged_address(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &entry["fields"];
        if fields["message"] != STANDING_BY {
            return None;
        }
        fields["local_addr"].as_str()?.parse().ok()
    })
}

/// Whether the controller at `addr` leads: its health is `SERVING`. One
/// that cannot be reached within `connect_timeout`, or does not answer
/// within a second, does not.
pub async fn is_serving(addr: SocketAddr, connect_timeout: Duration) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(connect_timeout)
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}
