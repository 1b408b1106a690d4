//! Strata's replication data plane (`docs/design/replication.md`). Built so far: [`frame`],
//! the binary frames nodes exchange for component I/O (checksummed, authenticated with the
//! cluster secret); [`fence`], the epoch fence by which a component refuses anything
//! stamped with an epoch older than the newest it has seen; [`client`], a connection to
//! one node carrying many requests at once; and [`schedule`], the resync scheduler's
//! decisions (which job starts next, how many run, the slots a node grants), sans-I/O.
//! The owner, the write fan-out, STALE marking, bitmaps and resync come next.
//!
//! No store, no metadata service, no NBD; decoding untrusted bytes never panics.

pub mod client;
pub mod fence;
pub mod frame;
pub mod schedule;
