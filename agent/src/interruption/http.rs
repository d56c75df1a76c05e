//! The little HTTP/1.1 a metadata service needs: GET or PUT to a
//! link-local (or, in tests, loopback) address with a few headers, a
//! bounded answer, a deadline. Plain hyper over a tokio socket; metadata
//! services do not speak TLS.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest metadata answer read (Azure's scheduled events are the biggest:
/// a few KiB).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where a metadata service listens: `host:port` (`http://` optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            return Err(format!(
                "{text:?} is not a metadata endpoint like 169.254.169.254 or 127.0.0.1:8080"
            ));
        }
        match rest.rsplit_once(':') {
            Some((host, port)) => Ok(Self {
                host: host.to_string(),
                port: port
                    .parse()
                    .map_err(|_| format!("{text:?}: port {port:?} is not a number"))?,
            }),
            None => Ok(Self {
                host: rest.to_string(),
                port: 80,
            }),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// One answer: status, headers we read, body text.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub body: String,
}

/// Sends one request and reads the answer, all within `timeout`.
pub async fn call(
    endpoint: &Endpoint,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Answer, String> {
    tokio::time::timeout(timeout, call_unbounded(endpoint, method, path, headers))
        .await
        .map_err(|_| format!("{endpoint} did not answer {path} within {timeout:?}"))?
}

async fn call_unbounded(
    endpoint: &Endpoint,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake with {endpoint}: {e}"))?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, endpoint.host.as_str());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request for {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{path} on {endpoint}: {e}"))?;
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get(hyper::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading {path} from {endpoint}: {e}"))?
        .to_bytes();
    driver.abort();
    Ok(Answer {
        status,
        etag,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
