//! The forest: every tree of a node's volumes, sharing pages copy-on-write.

use crate::pages::{MemPages, Node, PageId, PageStore};
use crate::{EXTENT_BLOCKS_MAX, INTERIOR_CHILDREN_MAX, LEAF_ENTRIES_MAX};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What a run of LBAs maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Block `lba + i` lives at VBA `vba + i`.
    Data {
        /// The VBA of the extent's first block.
        vba: u64,
    },
    /// The run reads as zeroes and holds no data.
    Zero,
}

/// A run of LBAs and what it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First LBA.
    pub lba: u64,
    /// Blocks; never zero.
    pub length: u64,
    /// Where the blocks are.
    pub target: Target,
}

impl Extent {
    /// One past the last LBA.
    pub fn end(&self) -> u64 {
        self.lba + self.length
    }

    /// The part of this extent within `from..to` (which must overlap it).
    pub fn slice(&self, from: u64, to: u64) -> Extent {
        let start = from.max(self.lba);
        let end = to.min(self.end());
        debug_assert!(start < end);
        let target = match self.target {
            Target::Data { vba } => Target::Data { vba: vba + (start - self.lba) },
            Target::Zero => Target::Zero,
        };
        Extent { lba: start, length: end - start, target }
    }
}

/// The keys a page covers, remembered by `validate` for pages reached again.
#[derive(Clone, Copy, Debug)]
struct Span {
    first: u64,
    last_lba: u64,
    end: u64,
}

/// A tree: a volume head, a snapshot or a clone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreeId(pub u64);

/// What the forest refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No tree with this id.
    #[error("tree {0:?} does not exist")]
    NoSuchTree(TreeId),
    /// Snapshots are read-only.
    #[error("tree {0:?} is a snapshot and cannot change")]
    Frozen(TreeId),
    /// A zero-length or overflowing range.
    #[error("bad range {lba}+{length}")]
    BadRange {
        /// First LBA.
        lba: u64,
        /// Blocks.
        length: u64,
    },
}

#[derive(Clone, Debug)]
struct Tree {
    root: PageId,
    /// Snapshots never change.
    frozen: bool,
    /// Pages with a seq at or below this may be shared (invariant 2).
    shared_seq: u64,
}

/// Every tree of a node, sharing pages.
pub struct Forest<P: PageStore = MemPages> {
    pages: P,
    refs: HashMap<PageId, u32>,
    seq: u64,
    trees: BTreeMap<TreeId, Tree>,
    next_tree: u64,
    leaf_max: usize,
    interior_max: usize,
}

impl Default for Forest<MemPages> {
    fn default() -> Self {
        Forest::new(MemPages::default())
    }
}

impl<P: PageStore> Forest<P> {
    /// An empty forest over `pages` (which must be empty).
    pub fn new(pages: P) -> Forest<P> {
        Forest::with_fanout(pages, LEAF_ENTRIES_MAX, INTERIOR_CHILDREN_MAX)
    }

    /// Like [`Forest::new`] with other page capacities: tests use tiny ones to get deep
    /// trees from few extents.
    pub fn with_fanout(pages: P, leaf_max: usize, interior_max: usize) -> Forest<P> {
        assert!(pages.is_empty(), "a new forest starts with no pages");
        assert!(leaf_max >= 2 && interior_max >= 3, "pages must split into non-empty halves");
        Forest {
            pages,
            refs: HashMap::new(),
            seq: 0,
            trees: BTreeMap::new(),
            next_tree: 0,
            leaf_max,
            interior_max,
        }
    }

    /// The current operation sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Pages stored.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    fn tree(&self, id: TreeId) -> Result<&Tree, Error> {
        self.trees.get(&id).ok_or(Error::NoSuchTree(id))
    }

    fn add_tree(&mut self, tree: Tree) -> TreeId {
        self.next_tree += 1;
        let id = TreeId(self.next_tree);
        self.trees.insert(id, tree);
        id
    }

    /// Creates an empty writable tree.
    pub fn create(&mut self) -> TreeId {
        self.seq += 1;
        let root = self.pages.insert(Node::Leaf { seq: self.seq, entries: Vec::new() });
        self.refs.insert(root, 1);
        self.add_tree(Tree { root, frozen: false, shared_seq: self.seq - 1 })
    }

    /// Takes a read-only snapshot of `tree` in O(1): it shares the tree's root, and every
    /// page of the tree becomes shared, so the next change of each copies it first.
    pub fn snapshot(&mut self, tree: TreeId) -> Result<TreeId, Error> {
        let root = self.tree(tree)?.root;
        self.seq += 1;
        let seq = self.seq;
        let t = self.trees.get_mut(&tree).expect("looked up above");
        t.shared_seq = seq;
        *self.refs.get_mut(&root).expect("roots are referenced") += 1;
        Ok(self.add_tree(Tree { root, frozen: true, shared_seq: seq }))
    }

    /// Creates a writable tree that starts as a copy of `source` (a clone), sharing pages.
    pub fn clone_tree(&mut self, source: TreeId) -> Result<TreeId, Error> {
        let root = self.tree(source)?.root;
        self.seq += 1;
        let seq = self.seq;
        let s = self.trees.get_mut(&source).expect("looked up above");
        if !s.frozen {
            s.shared_seq = seq; // the source's pages are now shared with the clone
        }
        *self.refs.get_mut(&root).expect("roots are referenced") += 1;
        Ok(self.add_tree(Tree { root, frozen: false, shared_seq: seq }))
    }

    /// Removes a tree, freeing the pages no other tree uses.
    pub fn drop_tree(&mut self, tree: TreeId) -> Result<(), Error> {
        let t = self.trees.remove(&tree).ok_or(Error::NoSuchTree(tree))?;
        self.release(t.root);
        Ok(())
    }

    /// Collects the VBAs that only `snapshot` holds, the first step of deleting it (the
    /// seed's method): walk the snapshot's tree, skipping every subtree whose page another
    /// tree also references (all of it survives); for each extent of a page only this tree
    /// holds, keep the blocks that `newer` (the one tree made from this snapshot since: the
    /// next newer snapshot of the same volume, or its head; `None` if there is none) does
    /// not map to the same VBA, and that `older` (the next older snapshot
    /// and the VBA watermark when it was taken) does not hold either: a VBA above the
    /// watermark was allocated after `older` was taken, so it cannot be there.
    ///
    /// VBAs are gathered into a buffer of at most `buffer_max` entries; each time it fills,
    /// and at the end, it is sorted and handed to `sink`, so memory stays bounded and the
    /// caller removes the VBAs from its VBA map in order. The caller must not have clones
    /// of `snapshot` (their blocks would be counted as exclusive). The forest is not
    /// changed; drop the tree afterwards.
    pub fn exclusive_vbas(
        &self,
        snapshot: TreeId,
        older: Option<(TreeId, u64)>,
        newer: Option<TreeId>,
        buffer_max: usize,
        mut sink: impl FnMut(&[u64]),
    ) -> Result<(), Error> {
        assert!(buffer_max > 0, "the buffer holds at least one VBA");
        let root = self.tree(snapshot)?.root;
        if let Some(newer) = newer {
            self.tree(newer)?;
        }
        if let Some((older, _)) = older {
            self.tree(older)?;
        }
        let mut buffer = Vec::with_capacity(buffer_max.min(1 << 20));
        let mut pending = vec![root];
        while let Some(id) = pending.pop() {
            // A page with another reference is reachable from another tree: everything
            // below it stays.
            if self.refs[&id] > 1 {
                continue;
            }
            match self.pages.get(id) {
                Node::Interior { children, .. } => pending.extend(children.iter().rev()),
                Node::Leaf { entries, .. } => {
                    for e in entries {
                        let Target::Data { vba } = e.target else { continue };
                        let mut kept = newer.map(|n| self.same_mapping(n, e)).unwrap_or_default();
                        if let Some((older, watermark)) = older {
                            if vba < watermark {
                                kept.extend(self.same_mapping(older, e));
                            }
                        }
                        kept.sort_unstable();
                        let mut lba = e.lba;
                        for (start, end) in kept.into_iter().chain([(e.end(), e.end())]) {
                            while lba < start {
                                buffer.push(vba + (lba - e.lba));
                                if buffer.len() == buffer_max {
                                    buffer.sort_unstable();
                                    sink(&buffer);
                                    buffer.clear();
                                }
                                lba += 1;
                            }
                            lba = lba.max(end);
                        }
                    }
                }
            }
        }
        if !buffer.is_empty() {
            buffer.sort_unstable();
            sink(&buffer);
        }
        Ok(())
    }

    /// The LBA ranges (start, end) of data extent `e` that `tree` maps to the same VBAs.
    fn same_mapping(&self, tree: TreeId, e: &Extent) -> Vec<(u64, u64)> {
        let Target::Data { vba } = e.target else { return Vec::new() };
        let mut found = Vec::new();
        self.collect(self.trees[&tree].root, e.lba, e.end(), &mut found);
        found
            .iter()
            .filter(|f| match f.target {
                // Same offset between LBA and VBA: the same blocks.
                Target::Data { vba: other } => other.wrapping_sub(f.lba) == vba.wrapping_sub(e.lba),
                Target::Zero => false,
            })
            .map(|f| (f.lba.max(e.lba), f.end().min(e.end())))
            .collect()
    }

    /// Drops one reference to `id`, freeing it (and, recursively, its children) at zero.
    fn release(&mut self, id: PageId) {
        let mut pending = vec![id];
        while let Some(id) = pending.pop() {
            let count = self.refs.get_mut(&id).expect("released pages are referenced");
            assert!(*count > 0, "reference count underflow on {id:?}");
            *count -= 1;
            if *count == 0 {
                self.refs.remove(&id);
                if let Node::Interior { children, .. } = self.pages.remove(id) {
                    pending.extend(children);
                }
            }
        }
    }

    /// The extents of `tree` overlapping `lba..lba+length`, clipped to it, in order.
    /// Unmapped runs are absent.
    pub fn lookup(&self, tree: TreeId, lba: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = check_range(lba, length)?;
        let mut out = Vec::new();
        self.collect(self.tree(tree)?.root, lba, end, &mut out);
        Ok(out.into_iter().map(|e| e.slice(lba, end)).collect())
    }

    fn collect(&self, id: PageId, lba: u64, end: u64, out: &mut Vec<Extent>) {
        match self.pages.get(id) {
            Node::Leaf { entries, .. } => {
                // Sorted and disjoint, so their ends are sorted too: a binary search to
                // the first that reaches past `lba`, not a scan of the page.
                let first = entries.partition_point(|e| e.end() <= lba);
                out.extend(entries[first..].iter().take_while(|e| e.lba < end).copied());
            }
            Node::Interior { keys, children, .. } => {
                // Child `first` holds the keys around `lba`; an extent starting in the child
                // before it may still reach into the range (only its last extent can, since
                // extents do not overlap and no page but a root is empty).
                let first = keys.partition_point(|k| *k <= lba).saturating_sub(1);
                if first > 0 {
                    self.collect_tail(children[first - 1], lba, end, out);
                }
                for i in first..children.len() {
                    if i > first && keys[i] >= end {
                        break;
                    }
                    self.collect(children[i], lba, end, out);
                }
            }
        }
    }

    /// Adds the extent with the greatest LBA under `id` if it overlaps `lba..end`.
    fn collect_tail(&self, id: PageId, lba: u64, end: u64, out: &mut Vec<Extent>) {
        match self.pages.get(id) {
            Node::Leaf { entries, .. } => {
                if let Some(e) = entries.last() {
                    if e.lba < end && e.end() > lba {
                        out.push(*e);
                    }
                }
            }
            Node::Interior { children, .. } => {
                if let Some(last) = children.last() {
                    self.collect_tail(*last, lba, end, out);
                }
            }
        }
    }

    /// Maps `lba..lba+length` to `target`, replacing what was there.
    pub fn map(
        &mut self,
        tree: TreeId,
        lba: u64,
        length: u64,
        target: Target,
    ) -> Result<(), Error> {
        self.change(tree, lba, length, Some(target))
    }

    /// Unmaps `lba..lba+length` (a trim): the run becomes a hole.
    pub fn unmap(&mut self, tree: TreeId, lba: u64, length: u64) -> Result<(), Error> {
        self.change(tree, lba, length, None)
    }

    fn change(
        &mut self,
        tree: TreeId,
        lba: u64,
        length: u64,
        target: Option<Target>,
    ) -> Result<(), Error> {
        let end = check_range(lba, length)?;
        if self.tree(tree)?.frozen {
            return Err(Error::Frozen(tree));
        }
        self.seq += 1;
        let mut overlapping = Vec::new();
        self.collect(self.trees[&tree].root, lba, end, &mut overlapping);
        overlapping.dedup();
        for old in overlapping {
            self.remove_key(tree, old.lba);
            if old.lba < lba {
                self.insert(tree, old.slice(old.lba, lba));
            }
            if old.end() > end {
                self.insert(tree, old.slice(end, old.end()));
            }
        }
        if let Some(target) = target {
            let whole = Extent { lba, length, target };
            let mut start = lba;
            while start < end {
                let piece_end = end.min(start + EXTENT_BLOCKS_MAX);
                self.insert(tree, whole.slice(start, piece_end));
                start = piece_end;
            }
        }
        Ok(())
    }

    /// Makes the page at `id` private to `tree` (copying it if it may be shared) and
    /// returns the private page's id; the caller points the parent slot at it.
    fn make_private(&mut self, tree: TreeId, id: PageId) -> PageId {
        let shared_seq = self.trees[&tree].shared_seq;
        let node = self.pages.get(id);
        if node.seq() > shared_seq {
            // Changing a shared page in place would change a snapshot: crash instead.
            assert_eq!(self.refs[&id], 1, "a private page has one reference");
            return id;
        }
        let mut copy = node.clone();
        copy.set_seq(self.seq);
        if let Node::Interior { children, .. } = &copy {
            for child in children {
                *self.refs.get_mut(child).expect("children are referenced") += 1;
            }
        }
        let new = self.pages.insert(copy);
        self.refs.insert(new, 1);
        self.release(id);
        new
    }

    /// The private path from the root of `tree` to the leaf that holds `key`: each element
    /// is a page id and, for interior pages, the index of the child taken.
    fn private_path(&mut self, tree: TreeId, key: u64) -> Vec<(PageId, usize)> {
        let root = self.trees[&tree].root;
        let root = self.make_private(tree, root);
        self.trees.get_mut(&tree).expect("exists").root = root;
        let mut path = Vec::new();
        let mut id = root;
        loop {
            let (index, child) = match self.pages.get(id) {
                Node::Leaf { .. } => {
                    path.push((id, 0));
                    return path;
                }
                Node::Interior { keys, children, .. } => {
                    let index = keys.partition_point(|k| *k <= key).saturating_sub(1);
                    (index, children[index])
                }
            };
            let private = self.make_private(tree, child);
            if let Node::Interior { children, seq, .. } = self.pages.get_mut(id) {
                children[index] = private;
                *seq = self.seq;
            }
            path.push((id, index));
            id = private;
        }
    }

    fn insert(&mut self, tree: TreeId, extent: Extent) {
        let path = self.private_path(tree, extent.lba);
        let (leaf, _) = *path.last().expect("a path ends in a leaf");
        let overflow = match self.pages.get_mut(leaf) {
            Node::Leaf { entries, seq } => {
                let at = entries.partition_point(|e| e.lba < extent.lba);
                entries.insert(at, extent);
                *seq = self.seq;
                entries.len() > self.leaf_max
            }
            Node::Interior { .. } => unreachable!("paths end in leaves"),
        };
        if overflow {
            self.split(tree, &path);
        }
    }

    /// Splits the last page of `path`, and its ancestors as far as they overflow.
    fn split(&mut self, tree: TreeId, path: &[(PageId, usize)]) {
        let mut level = path.len() - 1;
        loop {
            let (id, _) = path[level];
            let (separator, right) = match self.pages.get_mut(id) {
                Node::Leaf { entries, seq } => {
                    let tail = entries.split_off(entries.len() / 2);
                    let separator = tail[0].lba;
                    (separator, Node::Leaf { seq: *seq, entries: tail })
                }
                Node::Interior { keys, children, seq } => {
                    let half = children.len() / 2;
                    let right_keys = keys.split_off(half);
                    let right_children = children.split_off(half);
                    let separator = right_keys[0];
                    (
                        separator,
                        Node::Interior { seq: *seq, keys: right_keys, children: right_children },
                    )
                }
            };
            let right = self.pages.insert(right);
            self.refs.insert(right, 1);
            if level == 0 {
                let root = self.pages.insert(Node::Interior {
                    seq: self.seq,
                    keys: vec![0, separator],
                    children: vec![id, right],
                });
                self.refs.insert(root, 1);
                self.trees.get_mut(&tree).expect("exists").root = root;
                return;
            }
            let (parent, index) = path[level - 1];
            let overflow = match self.pages.get_mut(parent) {
                Node::Interior { keys, children, .. } => {
                    keys.insert(index + 1, separator);
                    children.insert(index + 1, right);
                    children.len() > self.interior_max
                }
                Node::Leaf { .. } => unreachable!("parents are interior pages"),
            };
            if !overflow {
                return;
            }
            level -= 1;
        }
    }

    /// Removes the extent starting at `key` (it must exist), pruning emptied pages.
    fn remove_key(&mut self, tree: TreeId, key: u64) {
        let path = self.private_path(tree, key);
        let (leaf, _) = *path.last().expect("a path ends in a leaf");
        let empty = match self.pages.get_mut(leaf) {
            Node::Leaf { entries, .. } => {
                let at = entries.partition_point(|e| e.lba < key);
                assert!(entries.get(at).is_some_and(|e| e.lba == key), "removing a missing key");
                entries.remove(at);
                entries.is_empty()
            }
            Node::Interior { .. } => unreachable!("paths end in leaves"),
        };
        if empty {
            self.prune(tree, &path);
        }
    }

    /// Removes the empty last page of `path` from its parent, upwards while pages empty,
    /// and collapses a root with a single child.
    fn prune(&mut self, tree: TreeId, path: &[(PageId, usize)]) {
        let mut level = path.len() - 1;
        while level > 0 {
            let (id, _) = path[level];
            let (parent, index) = path[level - 1];
            let parent_empty = match self.pages.get_mut(parent) {
                Node::Interior { keys, children, .. } => {
                    keys.remove(index);
                    children.remove(index);
                    if let Some(first) = keys.first_mut() {
                        *first = 0; // the first child covers everything below the next key
                    }
                    children.is_empty()
                }
                Node::Leaf { .. } => unreachable!("parents are interior pages"),
            };
            self.release(id);
            if !parent_empty {
                break;
            }
            level -= 1;
        }
        if level == 0 {
            // Everything emptied: the root becomes an empty leaf.
            let (root, _) = path[0];
            if let Node::Interior { children, .. } = self.pages.get(root) {
                if children.is_empty() {
                    *self.pages.get_mut(root) = Node::Leaf { seq: self.seq, entries: Vec::new() };
                }
            }
        }
        self.collapse_root(tree);
    }

    fn collapse_root(&mut self, tree: TreeId) {
        loop {
            let root = self.trees[&tree].root;
            let only = match self.pages.get(root) {
                Node::Interior { children, .. } if children.len() == 1 => children[0],
                _ => return,
            };
            // The child inherits the root's place: one reference moves from root to tree.
            *self.refs.get_mut(&only).expect("children are referenced") += 1;
            self.trees.get_mut(&tree).expect("exists").root = only;
            self.release(root);
        }
    }

    /// Checks every invariant of the module doc; O(pages). Returns the first violation.
    pub fn validate(&self) -> Result<(), String> {
        // The seed's node maps: a page reached again (shared by snapshots and clones) is
        // not checked again; its span, remembered from the first visit, is checked
        // against the new parent's bounds. The cost is O(distinct pages), not O(trees ×
        // pages).
        let mut spans: HashMap<PageId, Option<Span>> = HashMap::new();
        let mut pointers: HashMap<PageId, u32> = HashMap::new();
        for (tree_id, tree) in &self.trees {
            *pointers.entry(tree.root).or_default() += 1;
            self.validate_page(
                *tree_id,
                tree,
                tree.root,
                (0, u64::MAX),
                &mut spans,
                &mut pointers,
            )?;
        }
        if pointers != self.refs {
            let differ = pointers.iter().find(|(id, n)| self.refs.get(id) != Some(n));
            return Err(format!("reference counts differ, e.g. {differ:?} (counted)"));
        }
        if spans.len() != self.pages.len() {
            return Err(format!("{} pages stored, {} reachable", self.pages.len(), spans.len()));
        }
        Ok(())
    }

    /// Checks page `id` within key bounds `[low, high)` (its first LBA, and every entry's,
    /// at or above `low` and below `high`; an extent may run past `high`, and the parent
    /// checks it ends before the next child's first), returning its span.
    fn validate_page(
        &self,
        tree_id: TreeId,
        tree: &Tree,
        id: PageId,
        (low, high): (u64, u64),
        spans: &mut HashMap<PageId, Option<Span>>,
        pointers: &mut HashMap<PageId, u32>,
    ) -> Result<Option<Span>, String> {
        let node = self.pages.get(id);
        if node.seq() > self.seq {
            return Err(format!("{id:?} has seq {} above the forest's {}", node.seq(), self.seq));
        }
        if !tree.frozen && node.seq() > tree.shared_seq && self.refs.get(&id) != Some(&1) {
            return Err(format!("{id:?} is private to {tree_id:?} by seq but shared"));
        }
        let within = |span: &Option<Span>| span.is_none_or(|s| s.first >= low && s.last_lba < high);
        if let Some(span) = spans.get(&id) {
            if !within(span) {
                return Err(format!(
                    "{id:?} (shared) lies outside its parent's range in {tree_id:?}"
                ));
            }
            return Ok(*span);
        }
        let span = match node {
            Node::Leaf { entries, .. } => {
                let mut previous_end = low;
                for e in entries {
                    if e.length == 0 || e.lba < previous_end || e.lba >= high {
                        return Err(format!("{id:?}: extent {e:?} out of order or range"));
                    }
                    previous_end = e.end();
                }
                match (entries.first(), entries.last()) {
                    (Some(f), Some(l)) => {
                        Some(Span { first: f.lba, last_lba: l.lba, end: l.end() })
                    }
                    _ => None,
                }
            }
            Node::Interior { keys, children, .. } => {
                if keys.len() != children.len() || children.is_empty() {
                    return Err(format!(
                        "{id:?}: {} keys, {} children",
                        keys.len(),
                        children.len()
                    ));
                }
                let mut span: Option<Span> = None;
                for i in 0..children.len() {
                    let child_low = if i == 0 { low } else { keys[i] };
                    let child_high = keys.get(i + 1).copied().unwrap_or(high);
                    if child_low >= child_high || child_low < low || child_high > high {
                        return Err(format!("{id:?}: separators out of order"));
                    }
                    *pointers.entry(children[i]).or_default() += 1;
                    let bounds = (child_low, child_high);
                    let child =
                        self.validate_page(tree_id, tree, children[i], bounds, spans, pointers)?;
                    let Some(child) = child else {
                        return Err(format!("{id:?}: child {:?} is empty", children[i]));
                    };
                    if let Some(so_far) = span {
                        if so_far.end > child.first {
                            return Err(format!("{id:?}: extents overlap across children"));
                        }
                    }
                    span = Some(Span {
                        first: span.map_or(child.first, |s| s.first),
                        last_lba: child.last_lba,
                        end: child.end,
                    });
                }
                span
            }
        };
        spans.insert(id, span);
        Ok(span)
    }

    /// Calls `f` with every extent of every tree, visiting each page once however many
    /// trees share it (the seed's node map): O(distinct pages), not O(trees × pages).
    pub fn for_each_distinct_extent(&self, mut f: impl FnMut(&Extent)) {
        let mut seen: HashSet<PageId> = HashSet::new();
        let mut pending: Vec<PageId> = self.trees.values().map(|t| t.root).collect();
        while let Some(id) = pending.pop() {
            if !seen.insert(id) {
                continue;
            }
            match self.pages.get(id) {
                Node::Leaf { entries, .. } => entries.iter().for_each(&mut f),
                Node::Interior { children, .. } => pending.extend(children),
            }
        }
    }

    /// One past the last LBA `tree` maps (0 when empty).
    pub fn end_lba(&self, tree: TreeId) -> Result<u64, Error> {
        let mut id = self.tree(tree)?.root;
        loop {
            match self.pages.get(id) {
                Node::Leaf { entries, .. } => return Ok(entries.last().map_or(0, |e| e.end())),
                Node::Interior { children, .. } => {
                    id = *children.last().expect("interior pages have children")
                }
            }
        }
    }
}

fn check_range(lba: u64, length: u64) -> Result<u64, Error> {
    match lba.checked_add(length) {
        Some(end) if length > 0 => Ok(end),
        _ => Err(Error::BadRange { lba, length }),
    }
}

#[cfg(test)]
mod tests;

/// Saving and loading a forest (the store's checkpoints).
///
/// ```text
/// seq u64, next_tree u64, leaf_max u32, interior_max u32, last page id u64,
/// trees u64, then per tree: id u64, root page u64, frozen u8, shared_seq u64
/// pages u64, then per page: id u64, length u16, the page's first `length` bytes
///   (its 4 KiB form, checksummed, with the zero tail left out)
/// ```
/// Reference counts are not saved: loading recounts them from the structure and then
/// validates the whole forest, so a damaged save is refused, never half-loaded.
impl Forest<MemPages> {
    /// Appends the forest's saved form to `out`.
    pub fn save(&self, out: &mut Vec<u8>) {
        let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        put(out, self.seq);
        put(out, self.next_tree);
        out.extend_from_slice(&(self.leaf_max as u32).to_le_bytes());
        out.extend_from_slice(&(self.interior_max as u32).to_le_bytes());
        put(out, self.pages.last_id());
        put(out, self.trees.len() as u64);
        for (id, tree) in &self.trees {
            put(out, id.0);
            put(out, tree.root.0);
            out.push(u8::from(tree.frozen));
            put(out, tree.shared_seq);
        }
        put(out, self.pages.len() as u64);
        for (id, node) in self.pages.iter() {
            let page = crate::page::encode(node, 0);
            let used = page.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            put(out, id.0);
            out.extend_from_slice(&(used as u16).to_le_bytes());
            out.extend_from_slice(&page[..used]);
        }
    }

    /// Loads a forest saved by [`Forest::save`] from the front of `bytes`; returns it and
    /// the bytes it used. Refuses anything malformed or inconsistent.
    pub fn load(bytes: &[u8]) -> Result<(Forest<MemPages>, usize), String> {
        let mut r = Reader { bytes, at: 0 };
        let seq = r.u64()?;
        let next_tree = r.u64()?;
        let leaf_max = r.u32()? as usize;
        let interior_max = r.u32()? as usize;
        if !(2..=LEAF_ENTRIES_MAX).contains(&leaf_max)
            || !(3..=INTERIOR_CHILDREN_MAX).contains(&interior_max)
        {
            return Err("page capacities out of range".into());
        }
        let last_id = r.u64()?;
        let tree_count = r.u64()?;
        let mut trees = BTreeMap::new();
        for _ in 0..tree_count {
            let id = TreeId(r.u64()?);
            let root = PageId(r.u64()?);
            let frozen = r.u8()? != 0;
            let shared_seq = r.u64()?;
            trees.insert(id, Tree { root, frozen, shared_seq });
        }
        let page_count = r.u64()?;
        let mut pages = HashMap::new();
        let mut page = vec![0u8; crate::page::PAGE_BYTES];
        for _ in 0..page_count {
            let id = PageId(r.u64()?);
            let used = usize::from(r.u16()?);
            if used > page.len() || id.0 > last_id || id.0 == 0 {
                return Err(format!("page {id:?} is malformed"));
            }
            page.fill(0);
            page[..used].copy_from_slice(r.take(used)?);
            let (node, _) = crate::page::decode(&page).map_err(|e| format!("page {id:?}: {e}"))?;
            if pages.insert(id, node).is_some() {
                return Err(format!("page {id:?} saved twice"));
            }
        }
        let mut refs: HashMap<PageId, u32> = HashMap::new();
        for tree in trees.values() {
            *refs.entry(tree.root).or_default() += 1;
        }
        for node in pages.values() {
            if let Node::Interior { children, .. } = node {
                for child in children {
                    *refs.entry(*child).or_default() += 1;
                }
            }
        }
        if let Some(missing) = refs.keys().find(|id| !pages.contains_key(id)) {
            return Err(format!("page {missing:?} is referenced but not saved"));
        }
        let forest = Forest {
            pages: MemPages::from_saved(pages, last_id),
            refs,
            seq,
            trees,
            next_tree,
            leaf_max,
            interior_max,
        };
        forest.validate()?;
        Ok((forest, r.at))
    }
}

/// Reads little-endian fields, refusing to run past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| "the saved forest is truncated".to_owned())?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}
