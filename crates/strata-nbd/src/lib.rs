//! NBD front end: the wire codec ([`codec`], pure) and a tokio server ([`serve`]) that
//! exposes [`strata_io::BlockVolume`]s as NBD exports, plain or over TLS (require mode:
//! nothing but STARTTLS before TLS), handing each export's access decision to the
//! [`ExportProvider`] with the [`Client`]'s address and certificate subject.
//!
//! The server knows nothing of catalogs or names beyond what an [`ExportProvider`] tells
//! it; it must not depend on the HTTP API, the CLI or the metadata service.
//! Design: `docs/design/nbd.md`.

mod buffers;
pub mod codec;
mod server;
mod stream;

pub use server::{serve, Client, Export, ExportProvider, ExportSummary, Options, Refusal};
