//! The replication protocol's errors, typed: the server maps them to `ErrorCode` and
//! `StoreError` once, at its edge.

/// Why the owner could not do what it was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// Another owner took the volume (or may have): this one serves nothing more.
    #[error("this node no longer owns the volume{}", seen(*newer))]
    Deposed {
        /// The newer epoch a copy has seen, if one said so.
        newer: Option<u64>,
    },
    /// A copy failed and its failure could not be recorded: nothing more is acknowledged
    /// by this owner.
    #[error("a copy failed and cannot be marked stale: {why}")]
    Unrecorded {
        /// The metadata service's answer.
        why: String,
    },
    /// Too few copies are ACTIVE for a write to be acknowledged.
    #[error("only {active} copies are active, {needed} needed")]
    TooFewActive {
        /// ACTIVE copies now.
        active: usize,
        /// The volume's `min_replicas`.
        needed: usize,
    },
    /// A copy's node (or the owner's own store) has no room for the write.
    #[error("no space left on a copy's node")]
    NoSpace,
    /// A copy failed (what a copy's node or the network said).
    #[error("the copy on node {node} failed: {why}")]
    CopyFailed {
        /// The copy's node.
        node: u64,
        /// What went wrong.
        why: String,
    },
}

/// " (a copy has seen epoch E)", or nothing.
fn seen(newer: Option<u64>) -> String {
    newer.map(|e| format!(" (a copy has seen epoch {e})")).unwrap_or_default()
}
