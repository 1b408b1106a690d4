//! Pages and where they live.

use crate::forest::Extent;
use std::collections::HashMap;

/// A page's address in its [`PageStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId(pub u64);

/// A tree page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Extents, sorted by LBA.
    Leaf {
        /// Seq of the operation that last wrote this page.
        seq: u64,
        /// The extents.
        entries: Vec<Extent>,
    },
    /// Separators and children: child `i` holds the keys in `[keys[i], keys[i+1])`;
    /// `keys[0]` is 0.
    Interior {
        /// Seq of the operation that last wrote this page.
        seq: u64,
        /// Separators, one per child.
        keys: Vec<u64>,
        /// Children.
        children: Vec<PageId>,
    },
}

impl Node {
    /// The seq of the operation that last wrote this page.
    pub fn seq(&self) -> u64 {
        match self {
            Node::Leaf { seq, .. } | Node::Interior { seq, .. } => *seq,
        }
    }

    pub(crate) fn set_seq(&mut self, value: u64) {
        match self {
            Node::Leaf { seq, .. } | Node::Interior { seq, .. } => *seq = value,
        }
    }
}

/// Where pages live.
///
/// # Correctness
/// - `get` and `get_mut` are called only with ids `insert` returned and `remove` has not
///   taken back; implementations may panic otherwise (a bug, not bad input).
/// - `insert` never returns an id that is in use.
pub trait PageStore {
    /// The page `id`.
    fn get(&self, id: PageId) -> &Node;
    /// The page `id`, to change in place.
    fn get_mut(&mut self, id: PageId) -> &mut Node;
    /// Stores a new page.
    fn insert(&mut self, node: Node) -> PageId;
    /// Frees a page and returns it.
    fn remove(&mut self, id: PageId) -> Node;
    /// Pages stored.
    fn len(&self) -> usize;
    /// Whether no page is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pages in memory.
#[derive(Default, Debug)]
pub struct MemPages {
    pages: HashMap<PageId, Node>,
    next: u64,
}

impl MemPages {
    /// Every page, by id (to save them).
    pub fn iter(&self) -> impl Iterator<Item = (PageId, &Node)> {
        self.pages.iter().map(|(id, node)| (*id, node))
    }

    /// Pages loaded from a save: `next` is the last id handed out.
    pub fn from_saved(pages: HashMap<PageId, Node>, next: u64) -> MemPages {
        MemPages { pages, next }
    }

    /// The last id handed out.
    pub fn last_id(&self) -> u64 {
        self.next
    }
}

impl PageStore for MemPages {
    fn get(&self, id: PageId) -> &Node {
        self.pages.get(&id).expect("page ids come from insert")
    }

    fn get_mut(&mut self, id: PageId) -> &mut Node {
        self.pages.get_mut(&id).expect("page ids come from insert")
    }

    fn insert(&mut self, node: Node) -> PageId {
        self.next += 1;
        let id = PageId(self.next);
        self.pages.insert(id, node);
        id
    }

    fn remove(&mut self, id: PageId) -> Node {
        self.pages.remove(&id).expect("page ids come from insert")
    }

    fn len(&self) -> usize {
        self.pages.len()
    }
}
