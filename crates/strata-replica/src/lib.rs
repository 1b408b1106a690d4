//! Strata's replication protocol core (`docs/design/replication.md`), sans-I/O: no tokio,
//! no clock reads, no files, no sockets (`clippy.toml` bans the clock, `std::fs` and
//! `std::net`; ARCHITECTURE.md's crate graph, checked by `cargo xtask tidy`, lets it
//! depend only on pure crates). Time, randomness and replies come in as arguments;
//! decisions go out as values, in the shape of openraft's Engine: the server executes
//! them, and the deterministic simulation (`strata-sim`) runs the same code.
//!
//! - [`record`]: the records the metadata service stores for a replicated volume and the
//!   API returns (volume, component with its [`CopyState`], owner, clean hand-over).
//! - [`placement`]: which nodes hold a volume's copies.
//! - [`owner`]: the owner's state, one track per copy, and its write path as
//!   `begin`/`finish`/`conclude` returning commands (save a bitmap, record a STALE mark,
//!   hold acknowledgments); `validate()` checks its invariants.
//! - [`resync`]: the resync plan, a copy brought level step by step (scan, copy a run,
//!   flush, activate).
//! - [`snapshot`]: a replicated volume's snapshots: the barrier, the record's changes,
//!   undoing a half-made one, a pending copy's catch-up, what a copy removes.
//! - [`lease`]: the read-lease rules of a node that is not the owner.
//! - [`takeover`]: who takes an ownerless or moved volume, and when.
//! - [`timing`]: every timeout and period in one value.
//! - [`schedule`]: the resync scheduler's decisions (which job starts next, how many
//!   run, the slots a node grants).
//! - [`fence`]: the epoch fence by which a component refuses anything stamped with an
//!   epoch older than the newest it has seen.
//! - [`error`]: the protocol's typed errors.
//! - [`mutation`]: with the `mutations` feature only (the simulation's), knobs that
//!   re-open flaws the simulation found, each at its decision point.
//!
//! The data-plane frames and their connection are `strata-frame`'s.
//!
//! No store, no metadata service, no NBD; decoding untrusted bytes (frames, records)
//! never panics.
//!
//! [`CopyState`]: record::CopyState

pub mod error;
pub mod fence;
pub mod lease;
pub mod mutation;
pub mod owner;
pub mod placement;
pub mod record;
pub mod resync;
pub mod schedule;
pub mod snapshot;
pub mod takeover;
pub mod timing;
