//! One listener, several servers in turn: a controller in etcd mode serves
//! standby answers until it leads, then the real services, on the same
//! address. The acceptor owns the listener and hands each connection to
//! the server of the current phase.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Accepted connections waiting for their server, at most.
const BACKLOG: usize = 256;

type Sink = mpsc::Sender<std::io::Result<TcpStream>>;

pub struct Acceptor {
    local_addr: SocketAddr,
    current: Arc<Mutex<Option<Sink>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Acceptor {
    pub fn spawn(listener: TcpListener) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let current: Arc<Mutex<Option<Sink>>> = Arc::default();
        let sinks = Arc::clone(&current);
        let task = tokio::spawn(async move {
            loop {
                let accepted = listener.accept().await;
                let accepted = accepted.map(|(stream, _)| {
                    // See server.rs: small desired-state writes must not
                    // wait for a delayed ACK.
                    let _ = stream.set_nodelay(true);
                    stream
                });
                let sink = sinks.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // Between phases (no sink) the connection is dropped and
                // the client retries.
                if let Some(sink) = sink {
                    let _ = sink.send(accepted).await;
                }
            }
        });
        Ok(Self {
            local_addr,
            current,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connections of the next phase; the previous phase gets no more.
    pub fn next_phase(&self) -> ReceiverStream<std::io::Result<TcpStream>> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        ReceiverStream::new(rx)
    }
}
