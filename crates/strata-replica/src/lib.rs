//! Strata's replication (`docs/design/replication.md`), becoming the protocol's sans-I/O
//! core. Built so far: [`record`], the records of replicated volumes as the metadata
//! service stores them and the API returns them (volume, component with its [`CopyState`],
//! owner, clean hand-over), and [`placement`], which nodes hold a volume's copies: both
//! pure (data and decisions; no tokio, no clock, no files, no sockets). Then the data
//! plane: [`frame`], the binary frames nodes exchange for component I/O (checksummed,
//! authenticated with the cluster secret), [`fence`], the epoch fence by which a
//! component refuses anything stamped with an epoch older than the newest it has seen,
//! and [`client`], a connection to one node carrying many requests at once (on tokio).
//! The owner's write fan-out, STALE marking, bitmaps and resync still live in
//! `strata-server`'s `replicated.rs`.
//!
//! No store, no metadata service, no NBD; decoding untrusted bytes (frames, records)
//! never panics.
//!
//! [`CopyState`]: record::CopyState

pub mod client;
pub mod error;
pub mod fence;
pub mod frame;
pub mod mutation;
pub mod owner;
pub mod placement;
pub mod record;
pub mod takeover;
pub mod timing;
