//! Serving the HTTP API: plain, or HTTPS with the node's TLS credentials.
//!
//! HTTPS is axum's own server over a [`TlsListener`], an `axum::serve::Listener` that
//! hands axum connections whose TLS handshake is done: axum keeps its graceful shutdown
//! and connection handling, and no other server crate comes in. Handshakes run
//! concurrently (a slow client holds up no other), each bounded by
//! [`HANDSHAKE_TIMEOUT`], at most [`HANDSHAKES_MAX`] at once (connections beyond that
//! are closed at once: a flood costs a bounded amount). A client speaking plain HTTP to
//! the HTTPS port gets a plain HTTP error naming the https:// URL to use.

use crate::guard::Local;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's address when the kernel cannot say (it names no host).
const UNKNOWN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// TLS handshakes in flight at most.
pub const HANDSHAKES_MAX: usize = 128;

/// The first byte of a TLS record carrying a handshake (a ClientHello starts with it).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// At most this much of a plain HTTP request is read before it is answered.
const PLAIN_REQUEST_MAX: usize = 16 * 1024;

/// Serves `router` on `listener` (over TLS with `tls`) until `stop` turns true; each
/// request carries its connection's [`Local`] address.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let service = router.into_make_service_with_connect_info::<Local>();
    match tls {
        None => axum::serve(listener, service).with_graceful_shutdown(stopped).await,
        Some(config) => {
            let listener = TlsListener {
                tcp: listener,
                acceptor: TlsAcceptor::from(config),
                handshakes: JoinSet::new(),
            };
            axum::serve(listener, service).with_graceful_shutdown(stopped).await
        }
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TcpListener>> for Local {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Local {
        Local(stream.io().local_addr().unwrap_or(UNKNOWN))
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Local {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Local {
        Local(stream.io().get_ref().0.local_addr().unwrap_or(UNKNOWN))
    }
}

/// A TCP listener whose connections come out with their TLS handshake done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    /// Handshakes in flight: each yields a connection, or nothing if it failed.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Both branches are cancel-safe (axum drops this future at shutdown).
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, peer)) if self.handshakes.len() < HANDSHAKES_MAX => {
                        self.handshakes.spawn(handshake(self.acceptor.clone(), tcp, peer));
                    }
                    Ok((_, peer)) => tracing::debug!(
                        %peer, "{HANDSHAKES_MAX} TLS handshakes in flight; closed a connection"
                    ),
                    // Out of descriptors, say: wait a little rather than spin.
                    Err(e) => {
                        tracing::warn!("accepting an HTTPS connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A connection's TLS handshake, within [`HANDSHAKE_TIMEOUT`]; a client that speaks plain
/// HTTP is told to use HTTPS.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            tell_to_use_https(tcp).await;
            return None;
        }
        match acceptor.accept(tcp).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(%peer, "TLS handshake failed: {e}");
                None
            }
        }
    })
    .await;
    Some((done.ok()??, peer))
}

/// Answers a plain HTTP request on the HTTPS port with a JSON error naming the URL to use
/// (after reading its head, so closing does not reset the connection before the client
/// reads the answer).
async fn tell_to_use_https(mut tcp: TcpStream) {
    let Ok(local) = tcp.local_addr() else { return };
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < PLAIN_REQUEST_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = serde_json::json!({
        "code": "invalid_argument",
        "message": format!(
            "the node serves HTTPS: use --api https://{local} (the URL https://{local}/)"
        ),
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    if tcp.write_all(response.as_bytes()).await.is_ok() {
        let _ = tcp.shutdown().await;
        // The rest of the request (a body), so the close is clean; bounded by the
        // handshake timeout.
        let mut sink = [0u8; 4096];
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    }
}
