//! The on-disk form of a tree page: 4096 bytes, little-endian, checksummed
//! (`docs/design/store.md`, "Tree page").
//!
//! ```text
//! 0   4  crc32c of bytes 4..4096
//! 4   2  kind: 1 = leaf, 2 = interior
//! 6   2  entry count
//! 8   8  seq of the operation that last wrote the page
//! 16  8  owner tree id (for fsck reports)
//! 24  …  leaf entries (24 B): lba u64, length u32, flags u32 (bit 0 = zero extent), vba u64
//!        interior entries (16 B): key u64, child page u64
//! ```
//! Decoding untrusted bytes returns [`Corruption`], never panics; a property test feeds it
//! arbitrary and bit-flipped pages.

use crate::forest::{Extent, Target};
use crate::pages::{Node, PageId};
use strata_types::le::{u16_at, u32_at, u64_at};

/// Bytes in a page.
pub const PAGE_BYTES: usize = 4096;
const HEADER_BYTES: usize = 24;
const LEAF_ENTRY_BYTES: usize = 24;
const INTERIOR_ENTRY_BYTES: usize = 16;
/// Extents per leaf page.
pub const LEAF_CAPACITY: usize = (PAGE_BYTES - HEADER_BYTES) / LEAF_ENTRY_BYTES;
/// Children per interior page.
pub const INTERIOR_CAPACITY: usize = (PAGE_BYTES - HEADER_BYTES) / INTERIOR_ENTRY_BYTES;

const _: () = assert!(LEAF_CAPACITY == crate::LEAF_ENTRIES_MAX);
const _: () = assert!(INTERIOR_CAPACITY == crate::INTERIOR_CHILDREN_MAX);

const KIND_LEAF: u16 = 1;
const KIND_INTERIOR: u16 = 2;
const FLAG_ZERO: u32 = 1;

/// A page that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Corruption {
    /// The page is not 4096 bytes long.
    #[error("page is {0} bytes, not {PAGE_BYTES}")]
    Length(usize),
    /// The checksum does not match.
    #[error("page checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The crc in the page.
        stored: u32,
        /// The crc of its bytes.
        computed: u32,
    },
    /// The checksum matches but a field is impossible (a bug that wrote it, or a forgery).
    #[error("page is malformed: {0}")]
    Malformed(&'static str),
}

/// Encodes `node` of tree `owner` into a page.
///
/// Panics if the node holds more entries than a page does: the forest splits pages before
/// that, so it would be a bug, never bad input.
pub fn encode(node: &Node, owner: u64) -> Box<[u8; PAGE_BYTES]> {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    let (kind, count) = match node {
        Node::Leaf { entries, .. } => (KIND_LEAF, entries.len()),
        Node::Interior { children, .. } => (KIND_INTERIOR, children.len()),
    };
    page[4..6].copy_from_slice(&kind.to_le_bytes());
    page[6..8].copy_from_slice(&u16::try_from(count).expect("page entry count").to_le_bytes());
    page[8..16].copy_from_slice(&node.seq().to_le_bytes());
    page[16..24].copy_from_slice(&owner.to_le_bytes());
    let mut at = HEADER_BYTES;
    match node {
        Node::Leaf { entries, .. } => {
            assert!(entries.len() <= LEAF_CAPACITY, "leaf overflows its page");
            for e in entries {
                let length = u32::try_from(e.length).expect("extents are split to fit a u32");
                let (flags, vba) = match e.target {
                    Target::Data { vba } => (0, vba),
                    Target::Zero => (FLAG_ZERO, 0),
                };
                page[at..at + 8].copy_from_slice(&e.lba.to_le_bytes());
                page[at + 8..at + 12].copy_from_slice(&length.to_le_bytes());
                page[at + 12..at + 16].copy_from_slice(&flags.to_le_bytes());
                page[at + 16..at + 24].copy_from_slice(&vba.to_le_bytes());
                at += LEAF_ENTRY_BYTES;
            }
        }
        Node::Interior { keys, children, .. } => {
            assert!(children.len() <= INTERIOR_CAPACITY, "interior overflows its page");
            for (key, child) in keys.iter().zip(children) {
                page[at..at + 8].copy_from_slice(&key.to_le_bytes());
                page[at + 8..at + 16].copy_from_slice(&child.0.to_le_bytes());
                at += INTERIOR_ENTRY_BYTES;
            }
        }
    }
    let crc = crc32c::crc32c(&page[4..]);
    page[0..4].copy_from_slice(&crc.to_le_bytes());
    page
}

/// Decodes a page: the node and its owner tree id.
pub fn decode(page: &[u8]) -> Result<(Node, u64), Corruption> {
    if page.len() != PAGE_BYTES {
        return Err(Corruption::Length(page.len()));
    }
    let stored = u32_at(page, 0);
    let computed = crc32c::crc32c(&page[4..]);
    if stored != computed {
        return Err(Corruption::Checksum { stored, computed });
    }
    let kind = u16_at(page, 4);
    let count = usize::from(u16_at(page, 6));
    let seq = u64_at(page, 8);
    let owner = u64_at(page, 16);
    let node = match kind {
        KIND_LEAF => {
            if count > LEAF_CAPACITY {
                return Err(Corruption::Malformed("leaf entry count exceeds the page"));
            }
            let mut entries = Vec::with_capacity(count);
            for i in 0..count {
                let at = HEADER_BYTES + i * LEAF_ENTRY_BYTES;
                let lba = u64_at(page, at);
                let length = u64::from(u32_at(page, at + 8));
                let flags = u32_at(page, at + 12);
                let vba = u64_at(page, at + 16);
                if length == 0 || lba.checked_add(length).is_none() {
                    return Err(Corruption::Malformed("leaf extent is empty or overflows"));
                }
                let target = match flags {
                    0 => Target::Data { vba },
                    FLAG_ZERO => Target::Zero,
                    _ => return Err(Corruption::Malformed("unknown extent flags")),
                };
                entries.push(Extent { lba, length, target });
            }
            Node::Leaf { seq, entries }
        }
        KIND_INTERIOR => {
            if count == 0 || count > INTERIOR_CAPACITY {
                return Err(Corruption::Malformed("interior child count out of range"));
            }
            let mut keys = Vec::with_capacity(count);
            let mut children = Vec::with_capacity(count);
            for i in 0..count {
                let at = HEADER_BYTES + i * INTERIOR_ENTRY_BYTES;
                keys.push(u64_at(page, at));
                children.push(PageId(u64_at(page, at + 8)));
            }
            Node::Interior { seq, keys, children }
        }
        _ => return Err(Corruption::Malformed("unknown page kind")),
    };
    Ok((node, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extent() -> impl Strategy<Value = Extent> {
        (0u64..1 << 40, 1u64..=u64::from(u32::MAX), any::<Option<u64>>()).prop_map(
            |(lba, length, vba)| Extent {
                lba,
                length,
                target: vba.map_or(Target::Zero, |vba| Target::Data { vba }),
            },
        )
    }

    fn node() -> impl Strategy<Value = Node> {
        prop_oneof![
            (any::<u64>(), proptest::collection::vec(extent(), 0..=LEAF_CAPACITY))
                .prop_map(|(seq, entries)| Node::Leaf { seq, entries }),
            (any::<u64>(), proptest::collection::vec((any::<u64>(), any::<u64>()), 1..=254))
                .prop_map(|(seq, pairs)| Node::Interior {
                    seq,
                    keys: pairs.iter().map(|p| p.0).collect(),
                    children: pairs.iter().map(|p| PageId(p.1)).collect(),
                }),
        ]
    }

    proptest! {
        #[test]
        fn pages_round_trip(node in node(), owner in any::<u64>()) {
            let page = encode(&node, owner);
            prop_assert_eq!(decode(&page[..]), Ok((node, owner)));
        }

        #[test]
        fn a_flipped_bit_is_caught(node in node(), bit in 0usize..PAGE_BYTES * 8) {
            let mut page = encode(&node, 7);
            page[bit / 8] ^= 1 << (bit % 8);
            let caught = matches!(decode(&page[..]), Err(Corruption::Checksum { .. }));
            prop_assert!(caught, "a flipped bit decoded");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn well_checksummed_garbage_never_panics(
            body in proptest::collection::vec(any::<u8>(), PAGE_BYTES - 4),
            leaf in any::<bool>(),
        ) {
            let mut page = vec![0u8; 4];
            page.extend_from_slice(&body);
            // A valid kind, so the entry parsers see the garbage too.
            let kind = if leaf { KIND_LEAF } else { KIND_INTERIOR };
            page[4..6].copy_from_slice(&kind.to_le_bytes());
            let crc = crc32c::crc32c(&page[4..]);
            page[0..4].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&page);
        }
    }

    #[test]
    fn a_short_page_is_refused() {
        assert_eq!(decode(&[0u8; 100]), Err(Corruption::Length(100)));
    }
}
