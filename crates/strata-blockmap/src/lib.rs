//! A copy-on-write B+tree of extents — a volume's LBA → VBA map — whose trees (volume
//! heads, snapshots, clones) share pages. The core of the log-structured store of issue #3
//! (design: `docs/design/store.md`); not yet wired into a store.
//!
//! Pure: no I/O, no clock, no threads. Pages live in a [`PageStore`] ([`MemPages`] here;
//! the store will back it with its page file).
//!
//! # Invariants (checked by [`Forest::validate`])
//! 1. Leaf extents are sorted by LBA, non-empty and non-overlapping; an interior page's
//!    separators increase and every key below child `i` lies in `[key i, key i+1)`.
//! 2. Every page records the sequence number of the operation that last wrote it. A page
//!    of a writable tree whose seq is greater than the tree's `shared_seq` (the seq of its
//!    newest snapshot, or of the clone that made it) is private to that tree and changed in
//!    place; any other page may be shared and is copied before a change (the seed's rule).
//!    Hence a private page has exactly one reference.
//! 3. A page's reference count equals the number of pointers to it (tree roots and
//!    interior pages); a page with no reference is freed at once, so every stored page is
//!    reachable.
//! 4. Snapshots are immutable: no operation changes a page reachable from a snapshot.

mod forest;
pub mod page;
mod pages;

pub use forest::{Error, Extent, Forest, Target, TreeId};
pub use pages::{MemPages, Node, PageId, PageStore};

/// The longest extent: its length is a `u32` on disk; longer runs are stored as several.
pub const EXTENT_BLOCKS_MAX: u64 = u32::MAX as u64;

/// Entries per leaf before it splits (24-byte entries in a 4 KiB page, see the design).
pub const LEAF_ENTRIES_MAX: usize = 169;
/// Children per interior page before it splits.
pub const INTERIOR_CHILDREN_MAX: usize = 254;
