//! The connection's byte stream: plain TCP until STARTTLS, then TLS over it; and the
//! client's identity as TLS proved it.
//!
//! The handshake runs over [`Stream`] (it changes from plain to TLS half-way); the
//! transmission phase is generic over the concrete stream, so plain connections pay
//! nothing for TLS being possible.

use rustls::pki_types::CertificateDer;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Plain TCP, or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TlsSocket>>),
}

/// The socket under TLS: buffered for reading, because rustls reads at most 4 KiB a call
/// (a system call per 4 KiB of a 1 MiB WRITE without the buffer). Writes pass through.
pub(crate) type TlsSocket = BufReader<TcpStream>;

/// Bytes the buffer under TLS reads from the socket at once.
pub(crate) const TLS_SOCKET_BUFFER_BYTES: usize = 256 << 10;
/// Encrypted bytes rustls may hold for sending before it takes no more plaintext (its
/// default, 64 KiB, splits a 1 MiB reply into 16 writes).
pub(crate) const TLS_SEND_BUFFER_BYTES: usize = 1 << 20;

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The subject common name (CN) of the client's certificate, which rustls has verified
/// against the CA; `None` without a certificate or without a UTF-8 CN. x509-parser reads
/// it: rustls and webpki check the chain but expose no subject.
pub(crate) fn subject_of(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
