//! The forest against a model: a map per tree from block to what it reads (`None` for a
//! hole), for random sequences of map / unmap / snapshot / clone / drop, with
//! `validate()` after every step.

use super::*;
use crate::{MemPages, EXTENT_BLOCKS_MAX, INTERIOR_CHILDREN_MAX, LEAF_ENTRIES_MAX};
use proptest::prelude::*;
use std::collections::BTreeMap;

type Model = BTreeMap<TreeId, BTreeMap<u64, Target>>;

#[derive(Clone, Debug)]
enum Op {
    Map { tree: usize, lba: u64, length: u64, zero: bool },
    Unmap { tree: usize, lba: u64, length: u64 },
    Snapshot { tree: usize },
    Clone { tree: usize },
    Drop { tree: usize },
}

fn op() -> impl Strategy<Value = Op> {
    // A small LBA space makes overlaps, splits and merges frequent.
    let lba = 0u64..600;
    let length = 1u64..40;
    prop_oneof![
        6 => (any::<usize>(), lba.clone(), length.clone(), any::<bool>()).prop_map(
            |(tree, lba, length, zero)| Op::Map { tree, lba, length, zero: zero && lba % 7 == 0 }
        ),
        2 => (any::<usize>(), lba, length)
            .prop_map(|(tree, lba, length)| Op::Unmap { tree, lba, length }),
        1 => any::<usize>().prop_map(|tree| Op::Snapshot { tree }),
        1 => any::<usize>().prop_map(|tree| Op::Clone { tree }),
        1 => any::<usize>().prop_map(|tree| Op::Drop { tree }),
    ]
}

fn read(forest: &Forest, tree: TreeId, lba: u64, length: u64) -> BTreeMap<u64, Target> {
    let mut blocks = BTreeMap::new();
    for e in forest.lookup(tree, lba, length).unwrap() {
        for i in 0..e.length {
            let target = match e.target {
                Target::Data { vba } => Target::Data { vba: vba + i },
                Target::Zero => Target::Zero,
            };
            assert!(blocks.insert(e.lba + i, target).is_none(), "lookup overlaps");
        }
    }
    blocks
}

fn check(forest: &Forest, model: &Model) {
    forest.validate().unwrap();
    for (tree, blocks) in model {
        assert_eq!(&read(forest, *tree, 0, 1000), blocks, "tree {tree:?}");
    }
}

fn run(ops: Vec<Op>, leaf_max: usize, interior_max: usize) {
    let mut forest = Forest::with_fanout(MemPages::default(), leaf_max, interior_max);
    let mut model = Model::new();
    let mut writable = vec![forest.create()];
    let mut all = writable.clone();
    model.insert(writable[0], BTreeMap::new());
    let mut next_vba = 1u64;
    for op in ops {
        match op {
            Op::Map { tree, lba, length, zero } if !writable.is_empty() => {
                let t = writable[tree % writable.len()];
                let target = if zero { Target::Zero } else { Target::Data { vba: next_vba } };
                next_vba += length;
                forest.map(t, lba, length, target).unwrap();
                let m = model.get_mut(&t).unwrap();
                for i in 0..length {
                    let value = match target {
                        Target::Data { vba } => Target::Data { vba: vba + i },
                        Target::Zero => Target::Zero,
                    };
                    m.insert(lba + i, value);
                }
            }
            Op::Unmap { tree, lba, length } if !writable.is_empty() => {
                let t = writable[tree % writable.len()];
                forest.unmap(t, lba, length).unwrap();
                let m = model.get_mut(&t).unwrap();
                for i in 0..length {
                    m.remove(&(lba + i));
                }
            }
            Op::Snapshot { tree } if !writable.is_empty() => {
                let t = writable[tree % writable.len()];
                let s = forest.snapshot(t).unwrap();
                assert_eq!(forest.map(s, 0, 1, Target::Zero), Err(Error::Frozen(s)));
                let copy = model[&t].clone();
                model.insert(s, copy);
                all.push(s);
            }
            Op::Clone { tree } if !all.is_empty() => {
                let source = all[tree % all.len()];
                let c = forest.clone_tree(source).unwrap();
                let copy = model[&source].clone();
                model.insert(c, copy);
                writable.push(c);
                all.push(c);
            }
            Op::Drop { tree } if all.len() > 1 => {
                let t = all.remove(tree % all.len());
                writable.retain(|w| *w != t);
                forest.drop_tree(t).unwrap();
                model.remove(&t);
                assert_eq!(forest.lookup(t, 0, 1), Err(Error::NoSuchTree(t)));
            }
            _ => {}
        }
        check(&forest, &model);
    }
    // Dropping every tree frees every page.
    for t in all {
        forest.drop_tree(t).unwrap();
    }
    assert_eq!(forest.page_count(), 0);
    forest.validate().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn forest_matches_the_model(ops in proptest::collection::vec(op(), 1..400)) {
        run(ops, LEAF_ENTRIES_MAX, INTERIOR_CHILDREN_MAX);
    }

    #[test]
    fn deep_trees_match_the_model(ops in proptest::collection::vec(op(), 1..300)) {
        // Tiny pages: every few writes split a leaf, interior pages split and prune too.
        run(ops, 3, 3);
    }
}

#[test]
fn many_extents_split_pages_and_snapshots_share_them() {
    let mut forest = Forest::default();
    let head = forest.create();
    // Every other block, so no two extents merge: 5000 extents, several levels.
    for i in 0..5000u64 {
        forest.map(head, i * 2, 1, Target::Data { vba: 10_000 + i }).unwrap();
    }
    forest.validate().unwrap();
    let pages = forest.page_count();
    assert!(pages > 5000 / LEAF_ENTRIES_MAX, "{pages} pages");
    let snap = forest.snapshot(head).unwrap();
    assert_eq!(forest.page_count(), pages, "a snapshot costs no page");
    // One write copies only the path to its leaf.
    forest.map(head, 4000, 1, Target::Zero).unwrap();
    forest.validate().unwrap();
    let copied = forest.page_count() - pages;
    assert!((1..=4).contains(&copied), "copied {copied} pages");
    assert_eq!(
        forest.lookup(snap, 4000, 1).unwrap(),
        vec![Extent { lba: 4000, length: 1, target: Target::Data { vba: 12_000 } }]
    );
    assert_eq!(
        forest.lookup(head, 4000, 1).unwrap(),
        vec![Extent { lba: 4000, length: 1, target: Target::Zero }]
    );
    // A second write to the same leaf changes it in place (its seq is newer than the
    // snapshot): no more copies.
    let before = forest.page_count();
    forest.map(head, 4002, 1, Target::Zero).unwrap();
    assert_eq!(forest.page_count(), before);
    forest.drop_tree(snap).unwrap();
    forest.validate().unwrap();
    forest.unmap(head, 0, 10_000).unwrap();
    forest.validate().unwrap();
    assert_eq!(forest.page_count(), 1, "an empty tree is one empty leaf");
}

#[test]
fn bad_ranges_and_trees_are_refused_and_change_nothing() {
    let mut forest = Forest::default();
    let head = forest.create();
    forest.map(head, 10, 5, Target::Data { vba: 1 }).unwrap();
    let seq = forest.seq();
    assert_eq!(forest.map(head, 0, 0, Target::Zero), Err(Error::BadRange { lba: 0, length: 0 }));
    assert!(matches!(forest.unmap(head, u64::MAX, 2), Err(Error::BadRange { .. })));
    assert_eq!(forest.snapshot(TreeId(99)), Err(Error::NoSuchTree(TreeId(99))));
    assert_eq!(forest.seq(), seq);
    assert_eq!(forest.lookup(head, 0, 100).unwrap().len(), 1);
    forest.validate().unwrap();
}

#[test]
fn tiny_pages_build_deep_trees_and_prune_them_away() {
    let mut forest = Forest::with_fanout(MemPages::default(), 3, 3);
    let head = forest.create();
    for i in 0..200u64 {
        forest.map(head, i * 3, 2, Target::Data { vba: i * 2 }).unwrap();
    }
    forest.validate().unwrap();
    // At most 3 extents per leaf and 3 children per interior page: at least 67 leaves
    // and 4 levels of interior pages.
    assert!(forest.page_count() >= 67 + 33, "{} pages", forest.page_count());
    let snap = forest.snapshot(head).unwrap();
    forest.unmap(head, 0, 1000).unwrap();
    forest.validate().unwrap();
    assert_eq!(forest.lookup(head, 0, 1000).unwrap(), vec![]);
    assert_eq!(forest.lookup(snap, 0, 1000).unwrap().len(), 200);
    forest.drop_tree(snap).unwrap();
    forest.validate().unwrap();
    assert_eq!(forest.page_count(), 1);
}

/// Every (lba, vba) a tree maps, per block.
fn data_blocks(forest: &Forest, tree: TreeId) -> BTreeMap<u64, u64> {
    read(forest, tree, 0, 1000)
        .into_iter()
        .filter_map(|(lba, t)| match t {
            Target::Data { vba } => Some((lba, vba)),
            Target::Zero => None,
        })
        .collect()
}

fn chain_delete(writes: Vec<Vec<(u64, u64)>>, victim: usize, buffer_max: usize, tiny: bool) {
    let mut forest =
        if tiny { Forest::with_fanout(MemPages::default(), 3, 3) } else { Forest::default() };
    let head = forest.create();
    // Snapshots in order, each with the VBA watermark when it was taken.
    let mut chain: Vec<(TreeId, u64)> = Vec::new();
    let mut next_vba = 1;
    for batch in writes {
        for (lba, length) in batch {
            forest.map(head, lba, length, Target::Data { vba: next_vba }).unwrap();
            next_vba += length;
        }
        chain.push((forest.snapshot(head).unwrap(), next_vba));
    }
    let victim = victim % chain.len();
    let (snapshot, _) = chain[victim];
    let older = victim.checked_sub(1).map(|i| chain[i]);
    let newer = Some(chain.get(victim + 1).map(|(t, _)| *t).unwrap_or(head));
    // Expected: the VBAs of the snapshot that no other tree maps.
    let others: std::collections::HashSet<u64> = chain
        .iter()
        .map(|(t, _)| *t)
        .chain([head])
        .filter(|t| *t != snapshot)
        .flat_map(|t| data_blocks(&forest, t).into_values())
        .collect();
    let expected: Vec<u64> = {
        let mut v: Vec<u64> = data_blocks(&forest, snapshot)
            .into_values()
            .filter(|vba| !others.contains(vba))
            .collect();
        v.sort_unstable();
        v
    };
    let mut got = Vec::new();
    forest
        .exclusive_vbas(snapshot, older, newer, buffer_max, |batch| {
            assert!(batch.len() <= buffer_max);
            assert!(batch.windows(2).all(|w| w[0] < w[1]), "each batch is sorted");
            got.extend_from_slice(batch);
        })
        .unwrap();
    got.sort_unstable();
    assert_eq!(got, expected);
    let before: BTreeMap<TreeId, BTreeMap<u64, u64>> = chain
        .iter()
        .map(|(t, _)| *t)
        .chain([head])
        .filter(|t| *t != snapshot)
        .map(|t| (t, data_blocks(&forest, t)))
        .collect();
    forest.drop_tree(snapshot).unwrap();
    forest.validate().unwrap();
    for (t, blocks) in before {
        assert_eq!(data_blocks(&forest, t), blocks, "deleting a snapshot changed {t:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn snapshot_delete_collects_exactly_the_exclusive_vbas(
        writes in proptest::collection::vec(
            proptest::collection::vec((0u64..500, 1u64..30), 0..25), 1..8),
        victim in any::<usize>(),
        buffer_max in 1usize..64,
        tiny in any::<bool>(),
    ) {
        chain_delete(writes, victim, buffer_max, tiny);
    }
}

#[test]
fn a_run_longer_than_a_u32_is_stored_as_several_extents() {
    let mut forest = Forest::default();
    let head = forest.create();
    let length = 3 * EXTENT_BLOCKS_MAX + 5;
    forest.map(head, 7, length, Target::Zero).unwrap();
    forest.validate().unwrap();
    let extents = forest.lookup(head, 0, u64::MAX / 2).unwrap();
    assert_eq!(extents.len(), 4);
    assert!(extents.iter().all(|e| e.length <= EXTENT_BLOCKS_MAX));
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), length);
    assert_eq!(extents[0].lba, 7);
}

/// A forest of a volume with many extents, two snapshots and a clone (deep trees, shared
/// pages), for the validation tests.
fn shared_forest() -> (Forest, TreeId) {
    let mut forest = Forest::with_fanout(MemPages::default(), 3, 3);
    let head = forest.create();
    for i in 0..60u64 {
        forest.map(head, i * 10, 5, Target::Data { vba: 1000 + i }).unwrap();
    }
    let snap = forest.snapshot(head).unwrap();
    forest.map(head, 3, 1, Target::Zero).unwrap();
    forest.snapshot(head).unwrap();
    forest.clone_tree(snap).unwrap();
    forest.validate().unwrap();
    (forest, snap)
}

#[test]
fn validation_finds_an_overlap_across_pages_even_in_a_shared_subtree() {
    let (mut forest, snap) = shared_forest();
    // Stretch the last extent of the snapshot's first leaf over its right neighbour.
    let mut id = forest.trees[&snap].root;
    while let Node::Interior { children, .. } = forest.pages.get(id) {
        id = children[0];
    }
    assert!(forest.refs[&id] > 1 || forest.trees.len() > 1);
    if let Node::Leaf { entries, .. } = forest.pages.get_mut(id) {
        entries.last_mut().unwrap().length = 1000;
    }
    let err = forest.validate().unwrap_err();
    assert!(err.contains("overlap") || err.contains("out of order"), "{err}");
}

#[test]
fn validation_finds_a_wrong_reference_count() {
    let (mut forest, snap) = shared_forest();
    let root = forest.trees[&snap].root;
    *forest.refs.get_mut(&root).unwrap() += 1;
    let err = forest.validate().unwrap_err();
    assert!(err.contains("reference counts differ"), "{err}");
}
