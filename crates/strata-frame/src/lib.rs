//! Strata's data-plane wire (`docs/design/replication.md`): [`frame`], the binary frames
//! nodes exchange for component I/O and forwarded volume requests (checksummed with
//! crc32c, authenticated with a BLAKE3 MAC keyed from the cluster secret), and [`client`],
//! a connection to one node's data plane inside the inter-node channel, carrying many
//! requests at once.
//!
//! Apart from the replication core (`strata-replica`, which does no I/O): the frames are
//! read from async streams and the client owns sockets and tasks. Used by the server (its
//! data plane serves the frames, its replicated volumes send them), the integration tests
//! and the fuzz targets.
//!
//! Invariants: decoding untrusted bytes never panics; a frame is accepted only if its
//! magic, kind, lengths, crc and MAC all check; a caller that gives up mid-frame kills its
//! connection, so no half frame is ever followed by another. No store, no metadata
//! service, no NBD.

pub mod client;
pub mod frame;
