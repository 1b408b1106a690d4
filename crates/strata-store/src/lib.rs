//! The node-local log-structured store (`docs/design/store.md`): the journal's on-disk
//! format ([`journal`]), the log that writes data and journal slots in order, allocates
//! segments and replays after a crash ([`log`]), the engine that keeps a copy-on-write
//! tree per view (`strata-blockmap`) and the VBA map over the log, with snapshots,
//! clones, checkpoints and the cleaner ([`engine`]), and [`LogStore`], the engine behind
//! the `strata-io` traits. All file access goes through `strata_io::sim::RawFile`.
//!
//! Must not depend on any front end (NBD, HTTP). The core is synchronous: it awaits
//! nothing; `LogStore` runs one maintenance thread (cleaning, checkpoints).

pub mod engine;
pub mod journal;
pub mod log;
pub mod store;

pub use store::{LogStore, LogVolume};
