//! NBD front end: the wire codec ([`codec`], pure) and a tokio server ([`serve`]) that
//! exposes [`strata_io::BlockVolume`]s as NBD exports.
//!
//! The server knows nothing of catalogs or names beyond what an [`ExportProvider`] tells
//! it; it must not depend on the HTTP API, the CLI or the metadata service.
//! Design: `docs/design/nbd.md`.

mod buffers;
pub mod codec;
mod server;

pub use server::{serve, Export, ExportProvider, ExportSummary};
