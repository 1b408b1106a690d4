//! The replication protocol's errors, typed: the server maps them to `ErrorCode` (its
//! API) and `StoreError` (its block interface) once, at its edges.

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
    /// The volume's record could not be read or changed: the metadata service did not
    /// answer, refused, or the record kept changing (another owner may hold it).
    #[error("the volume's record: {why}")]
    Record {
        /// What the metadata service said, or what changed.
        why: String,
    },
    /// Something the owner must keep on its own disk (a copy's bitmap, its copy's epoch
    /// fence) could not be saved.
    #[error("{what} cannot be saved: {why}")]
    Persist {
        /// What could not be saved.
        what: &'static str,
        /// The store's or file system's error.
        why: String,
    },
    /// Asked of the owner's own copy what only another copy can do.
    #[error("the owner's own copy is recorded as not active")]
    OwnCopy,
    /// A hand-over cannot be made now (a copy's failure is not in the record yet).
    #[error("no clean hand-over now: {why}")]
    NotNow {
        /// Why not.
        why: &'static str,
    },
}

/// " (a copy has seen epoch E)", or nothing.
fn seen(newer: Option<u64>) -> String {
    newer.map(|e| format!(" (a copy has seen epoch {e})")).unwrap_or_default()
}
