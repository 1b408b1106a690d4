//! The node-local log-structured store (`docs/design/store.md`). In progress (issue #3):
//! the journal's on-disk format ([`journal`]), the log that writes data and journal slots
//! in order and replays them after a crash ([`log`]), and the engine that keeps a
//! copy-on-write tree per volume (`strata-blockmap`) and the VBA map over the log
//! ([`engine`]). All file access goes through `strata_io::sim::RawFile`.
//!
//! Must not depend on any front end (NBD, HTTP). The store is a synchronous core: it
//! spawns no tasks and awaits nothing; callers drive it from their own threads.

pub mod engine;
pub mod journal;
pub mod log;
pub mod store;

pub use store::{LogStore, LogVolume};
