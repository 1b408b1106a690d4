//! Strata's replication protocol core (`docs/design/replication.md`), sans-I/O: no tokio,
//! no clock reads, no files, no sockets (`clippy.toml` bans the clock, `std::fs` and
//! `std::net`; ARCHITECTURE.md's crate graph, checked by `cargo xtask tidy`, lets it
//! depend only on pure crates). Time, randomness and replies come in as arguments;
//! decisions go out as values. Built so far: [`fence`], the epoch fence by which a
//! component refuses anything stamped with an epoch older than the newest it has seen.
//! The owner's state, placement, resync plans and the takeover decision come next
//! (issue 16). The data-plane frames and their connection are `strata-frame`'s.
//!
//! No store, no metadata service, no NBD; decoding untrusted bytes never panics.

pub mod fence;
