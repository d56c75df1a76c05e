//! Where price documents come from: a local file (`file:/etc/prices.csv`
//! or a bare path) or a URL (`http://…`, `https://…`, TLS verified against
//! the Mozilla roots). Every fetch is bounded in time and size. Tests point
//! a URL source at a server on loopback.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::table::MAX_DOCUMENT_BYTES;

/// A place a price document is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceSource {
    File(std::path::PathBuf),
    Url {
        https: bool,
        host: String,
        port: u16,
        /// Path and query, e.g. `/prices.json`.
        path: String,
        /// As configured, for messages.
        text: String,
    },
}

impl PriceSource {
    /// Parses a configured source; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!(
                    "{text:?} names no file; write file:/path/prices.csv"
                ));
            }
            return Ok(Self::File(path.into()));
        }
        let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else if text.starts_with('/') {
            return Ok(Self::File(text.into()));
        } else {
            return Err(format!(
                "{text:?} is not a price source; use file:/path/prices.csv, http://host/prices.json or https://…"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("{text:?}: port {port:?} is not a number"))?;
                (host, port)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        Ok(Self::Url {
            https,
            host: host.to_string(),
            port,
            path: path.to_string(),
            text: text.to_string(),
        })
    }

    /// The document, at most [`MAX_DOCUMENT_BYTES`], within `timeout`.
    pub async fn fetch(&self, timeout: Duration) -> Result<String, String> {
        match tokio::time::timeout(timeout, self.fetch_unbounded_time()).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    async fn fetch_unbounded_time(&self) -> Result<String, String> {
        match self {
            Self::File(path) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if meta.len() > MAX_DOCUMENT_BYTES as u64 {
                    return Err(format!(
                        "{} is {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
                        path.display(),
                        meta.len()
                    ));
                }
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
            Self::Url {
                https,
                host,
                port,
                path,
                ..
            } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
                if *https {
                    let tls = tls_connect(host, tcp).await?;
                    get(TokioIo::new(tls), host, path).await
                } else {
                    get(TokioIo::new(tcp), host, path).await
                }
            }
        }
    }
}

impl std::fmt::Display for PriceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Url { text, .. } => f.write_str(text),
        }
    }
}

async fn tls_connect(
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}

async fn get<I>(io: I, host: &str, path: &str) -> Result<String, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with {host}: {e}"))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "gpufleet-controller")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request for {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path} from {host}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|e| {
            format!("reading the answer of {host}: {e} (at most {MAX_DOCUMENT_BYTES} bytes)")
        })?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(format!("GET {path} from {host} answered {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| format!("the answer of {host} is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_clear_errors() {
        assert_eq!(
            PriceSource::parse("file:/etc/p.csv"),
            Ok(PriceSource::File("/etc/p.csv".into()))
        );
        assert_eq!(
            PriceSource::parse("file:///etc/p.csv"),
            Ok(PriceSource::File("/etc/p.csv".into()))
        );
        assert_eq!(
            PriceSource::parse("/etc/p.csv"),
            Ok(PriceSource::File("/etc/p.csv".into()))
        );
        match PriceSource::parse("https://prices.example.com/v1/gpu.json").unwrap() {
            PriceSource::Url {
                https,
                host,
                port,
                path,
                ..
            } => {
                assert!(https);
                assert_eq!(
                    (host.as_str(), port, path.as_str()),
                    ("prices.example.com", 443, "/v1/gpu.json")
                );
            }
            other => panic!("{other:?}"),
        }
        match PriceSource::parse("http://127.0.0.1:8080").unwrap() {
            PriceSource::Url { port, path, .. } => assert_eq!((port, path.as_str()), (8080, "/")),
            other => panic!("{other:?}"),
        }
        assert!(
            PriceSource::parse("ftp://x")
                .unwrap_err()
                .contains("is not a price source")
        );
        assert!(
            PriceSource::parse("http://h:x/")
                .unwrap_err()
                .contains("port \"x\"")
        );
    }

    #[tokio::test]
    async fn fetches_over_http_from_loopback_and_refuses_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            ] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = socket.read(&mut buf).await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let source = PriceSource::parse(&format!("http://{addr}/prices.csv")).unwrap();
        assert_eq!(source.fetch(Duration::from_secs(5)).await.unwrap(), "hello");
        let err = source.fetch(Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("404"), "{err}");
        server.await.unwrap();
        let missing = PriceSource::parse("file:/nonexistent/prices.csv").unwrap();
        assert!(
            missing
                .fetch(Duration::from_secs(1))
                .await
                .unwrap_err()
                .starts_with("cannot read")
        );
    }
}
