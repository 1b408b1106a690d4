//! Strata's metadata service (`docs/design/meta.md`). Built so far: [`state`], the
//! deterministic state machine every member applies committed commands to: versioned
//! keys with compare-and-swap and transactions, node sessions with incarnations that
//! fence a downed node's late requests, leases, and a bounded history for watches; and
//! [`linearizability`], the checker the simulation and the multi-process tests will run
//! over clients' CAS histories; [`raft`], the openraft 0.9 storage (log, vote and
//! snapshots in redb), an in-process network for tests and the leader's reaper; and
//! [`rpc`], the authenticated inter-node RPC over TCP. `strata serve` and the cluster
//! commands come next.
//!
//! Must not depend on the store, NBD or HTTP. The state machine is pure: no I/O, no clock
//! (time arrives in commands, from the leader), no threads.

pub mod linearizability;
pub mod raft;
pub mod rpc;
pub mod service;
pub mod state;
