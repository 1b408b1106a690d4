//! The node-local log-structured store (`docs/design/store.md`). In progress (issue #3):
//! so far the journal's on-disk format ([`journal`]). The copy-on-write block map lives
//! in `strata-blockmap`; the store will tie both to segment files written through
//! `strata_io::sim::RawFile`.
//!
//! Must not depend on any front end (NBD, HTTP) or on tokio: the store is a synchronous
//! core that callers drive from their own threads.

pub mod journal;
