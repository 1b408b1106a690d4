//! The node-local log-structured store (`docs/design/store.md`). In progress (issue #3):
//! so far the journal's on-disk format ([`journal`]) and the log that writes data and
//! journal slots in order and replays them after a crash ([`log`]). The copy-on-write
//! block map lives in `strata-blockmap`; the store will tie both together over files
//! written through `strata_io::sim::RawFile`.
//!
//! Must not depend on any front end (NBD, HTTP). The store is a synchronous core: it
//! spawns no tasks and awaits nothing; callers drive it from their own threads.

pub mod journal;
pub mod log;
