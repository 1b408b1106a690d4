//! The engine against a model. A proptest runs random sequences of every operation (create,
//! write, batch of writes, trim, zero, snapshot, clone, delete, rollback, resize, remove,
//! flush, crash and reopen) on the engine and on a model that mirrors the module doc: refusals
//! are the same errors and change nothing, every view reads as the model says, the lineage
//! (which views were made from which snapshot) matches, `validate` holds after every step, and
//! deleting a snapshot frees exactly its `usage().exclusive_blocks`. After a crash the engine
//! must be exactly the model after some prefix of the operations since the last flush (or the
//! last reopen), writes included: replay drops records only as a suffix (a batch may be cut
//! after any of its writes). Runs of many operations without a flush fill journal slots,
//! crashes cut files anywhere (not only at whole slots), and some writes are blocks of zeroes.
//! A second proptest checks `usage` against brute force. Unit tests cover each refusal, damaged
//! blocks, large writes, and three crashes the log's replay once got wrong.

use super::*;
use crate::journal::RECORDS_BYTES_MAX;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngAlgorithm;
use std::collections::{BTreeMap, BTreeSet};
use strata_io::sim::{SimFile, SimRng};

const B: u64 = BLOCK_BYTES as u64;

/// Ids the model test uses for volumes and snapshots.
const ID_SPACE: u64 = 12;
/// The largest volume in the model test, in blocks.
const MAX_BLOCKS: u64 = 10;

/// The content of block `index` of write `id` (> 0): every 16 bytes name both, so a block
/// read from anywhere else is recognised.
fn block(id: u64, index: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&id.to_le_bytes());
        chunk[8..16].copy_from_slice(&(index ^ i as u64).to_le_bytes());
    }
    b
}

/// The blocks of write `id`, `n` of them.
fn blocks(id: u64, n: u64) -> Vec<u8> {
    let mut all = Vec::with_capacity((n * B) as usize);
    for i in 0..n {
        all.extend_from_slice(&block(id, i));
    }
    all
}

/// Which `block` `data` is, if it is one.
fn decode_block(data: &[u8]) -> Option<(u64, u64)> {
    thread_local! {
        /// Blocks built so far: comparing with one is much faster than checking each word.
        static BUILT: std::cell::RefCell<HashMap<(u64, u64), Vec<u8>>> = Default::default();
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    let (id, index) = (word(0), word(8));
    let whole = BUILT.with_borrow_mut(|built| {
        data == built.entry((id, index)).or_insert_with(|| block(id, index)).as_slice()
    });
    (id != 0 && whole).then_some((id, index))
}

const ZEROES: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];

/// What a block holds; a hole (trimmed or never written) is `None` in an `Option<Val>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    /// Block `index` of write `id`.
    Data(u64, u64),
    /// Written with `write_zeroes`.
    Zero,
    /// A block of zeroes written with `write` (mapped to data, unlike `Zero`).
    ZeroData,
}

/// Reads all of view `id` and says what each block is, using its extents to tell zeroes
/// from holes. Panics on bytes that no write wrote.
fn read_view(engine: &Engine<SimFile>, id: u64) -> Vec<Option<Val>> {
    let n = engine.size(id).unwrap() / B;
    let mut buf = vec![0u8; (n * B) as usize];
    if let Err(e) = engine.read(id, 0, &mut buf) {
        panic!("reading view {id}: {e}");
    }
    let mut kinds = vec![None; n as usize];
    for e in engine.extents(id, 0, n).unwrap() {
        for lba in e.lba..e.end() {
            kinds[lba as usize] = Some(e.target);
        }
    }
    let mut vals = Vec::with_capacity(n as usize);
    for (lba, (data, kind)) in buf.chunks(BLOCK_BYTES).zip(kinds).enumerate() {
        let zero = data == ZEROES;
        vals.push(match kind {
            Some(Target::Data { .. }) if zero => Some(Val::ZeroData),
            Some(Target::Data { .. }) => match decode_block(data) {
                Some((w, i)) => Some(Val::Data(w, i)),
                None => panic!("view {id} block {lba}: data no write wrote"),
            },
            Some(Target::Zero) if zero => Some(Val::Zero),
            None if zero => None,
            _ => panic!("view {id} block {lba}: a zero or unmapped block reads non-zero"),
        });
    }
    vals
}

/// A view in the model: what the module doc says the engine keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MView {
    size: u64,
    /// The snapshot it was last made from (module doc, "Lineage").
    older: Option<u64>,
    info: ViewInfo,
    data: BTreeMap<u64, Val>,
}

/// Per view: its kind, size and older snapshot.
type Lineage = BTreeMap<u64, (ViewInfo, u64, Option<u64>)>;

/// One concrete operation. Each one the engine accepts logs exactly one record (writes are
/// shorter than `RUN_BLOCKS_MAX`), a batch one per write (see `Act::steps`), so a prefix of
/// the records is a prefix of the operations.
/// Write `write` > 0 writes `blocks(write, blocks)`; write 0 writes blocks of zeroes.
#[derive(Clone, Debug)]
enum Act {
    Create {
        id: u64,
        size: u64,
    },
    Write {
        view: u64,
        lba: u64,
        blocks: u64,
        write: u64,
    },
    /// `write_many` of (lba, blocks, write), each as in `Write`: one record each.
    WriteMany {
        view: u64,
        writes: Vec<(u64, u64, u64)>,
    },
    Trim {
        view: u64,
        lba: u64,
        blocks: u64,
    },
    Zero {
        view: u64,
        lba: u64,
        blocks: u64,
    },
    Snapshot {
        volume: u64,
        id: u64,
    },
    Clone {
        source: u64,
        id: u64,
    },
    Delete {
        snapshot: u64,
    },
    Rollback {
        volume: u64,
        snapshot: u64,
    },
    Resize {
        volume: u64,
        size: u64,
    },
    Remove {
        volume: u64,
    },
}

/// The largest write the model test makes, in blocks.
const WRITE_BLOCKS: u64 = 3;
const _: () = assert!(WRITE_BLOCKS as usize <= RUN_BLOCKS_MAX, "one record per write");

impl Act {
    /// The operations it is, one per record it logs (a batch's writes in order).
    fn steps(&self) -> Vec<Act> {
        match self {
            Act::WriteMany { view, writes } => writes
                .iter()
                .map(|&(lba, blocks, write)| Act::Write { view: *view, lba, blocks, write })
                .collect(),
            act => vec![act.clone()],
        }
    }

    fn run(&self, engine: &mut Engine<SimFile>) -> Result<(), EngineError> {
        match *self {
            Act::Create { id, size } => engine.create_volume(id, size),
            Act::Write { view, lba, blocks: n, write: 0 } => {
                engine.write(view, lba, &vec![0; (n * B) as usize])
            }
            Act::Write { view, lba, blocks: n, write } => {
                engine.write(view, lba, &blocks(write, n))
            }
            Act::WriteMany { view, ref writes } => {
                let data: Vec<(u64, Vec<u8>)> = writes
                    .iter()
                    .map(|&(lba, n, write)| match write {
                        0 => (lba, vec![0; (n * B) as usize]),
                        _ => (lba, blocks(write, n)),
                    })
                    .collect();
                let writes: Vec<(u64, &[u8])> = data.iter().map(|(l, d)| (*l, &d[..])).collect();
                engine.write_many(view, &writes)
            }
            Act::Trim { view, lba, blocks } => engine.trim(view, lba, blocks),
            Act::Zero { view, lba, blocks } => engine.write_zeroes(view, lba, blocks),
            Act::Snapshot { volume, id } => engine.snapshot(volume, id),
            Act::Clone { source, id } => engine.clone_snapshot(source, id),
            Act::Delete { snapshot } => engine.delete_snapshot(snapshot),
            Act::Rollback { volume, snapshot } => engine.rollback(volume, snapshot),
            Act::Resize { volume, size } => engine.resize(volume, size),
            Act::Remove { volume } => engine.remove_volume(volume),
        }
    }
}

/// The engine's lineage, from its public view of it.
fn engine_lineage(engine: &Engine<SimFile>) -> Lineage {
    let ids = engine.view_ids();
    let mut older = BTreeMap::new();
    for id in &ids {
        for young in engine.dependents(*id) {
            assert!(older.insert(young, *id).is_none(), "{young} made from two views");
        }
    }
    ids.iter()
        .map(|id| {
            let info = engine.info(*id).unwrap();
            (*id, (info, engine.size(*id).unwrap(), older.get(id).copied()))
        })
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    views: BTreeMap<u64, MView>,
}

impl Model {
    fn lineage(&self) -> Lineage {
        self.views.iter().map(|(id, v)| (*id, (v.info.clone(), v.size, v.older))).collect()
    }

    fn volumes(&self) -> Vec<u64> {
        let ids = self.views.iter().filter(|(_, v)| matches!(v.info, ViewInfo::Volume { .. }));
        ids.map(|(id, _)| *id).collect()
    }

    fn snapshots(&self) -> Vec<u64> {
        let ids = self.views.iter().filter(|(_, v)| matches!(v.info, ViewInfo::Snapshot { .. }));
        ids.map(|(id, _)| *id).collect()
    }

    /// The views made from `id`, in id order.
    fn younger(&self, id: u64) -> Vec<u64> {
        self.views.iter().filter(|(_, v)| v.older == Some(id)).map(|(k, _)| *k).collect()
    }

    fn volume(&self, id: u64) -> Result<&MView, EngineError> {
        let view = self.views.get(&id).ok_or(EngineError::NotFound(id))?;
        match view.info {
            ViewInfo::Volume { .. } => Ok(view),
            ViewInfo::Snapshot { .. } => Err(EngineError::ReadOnly(id)),
        }
    }

    fn snapshot(&self, id: u64) -> Result<&MView, EngineError> {
        let view = self.views.get(&id).ok_or(EngineError::NotFound(id))?;
        match view.info {
            ViewInfo::Snapshot { .. } => Ok(view),
            ViewInfo::Volume { .. } => Err(EngineError::NotSnapshot(id)),
        }
    }

    fn free(&self, id: u64) -> Result<(), EngineError> {
        match self.views.contains_key(&id) {
            true => Err(EngineError::Exists(id)),
            false => Ok(()),
        }
    }

    fn good_size(size: u64) -> Result<(), EngineError> {
        match size > 0 && size.is_multiple_of(B) {
            true => Ok(()),
            false => Err(EngineError::BadSize(size)),
        }
    }

    fn range(size: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        match blocks > 0 && lba + blocks <= size / B {
            true => Ok(()),
            false => Err(EngineError::OutOfRange { lba, blocks, size }),
        }
    }

    fn family(&self, volume: u64) -> Vec<u64> {
        let ViewInfo::Volume { snapshots } = &self.views[&volume].info else { unreachable!() };
        snapshots.iter().copied().chain([volume]).collect()
    }

    /// What the engine must answer, in the order it checks.
    fn check(&self, act: &Act) -> Result<(), EngineError> {
        match *act {
            Act::Create { id, size } => {
                self.free(id)?;
                Self::good_size(size)
            }
            Act::Write { view, lba, blocks, .. }
            | Act::Trim { view, lba, blocks }
            | Act::Zero { view, lba, blocks } => Self::range(self.volume(view)?.size, lba, blocks),
            // Every entry, in order, before anything is written.
            Act::WriteMany { .. } => act.steps().iter().try_for_each(|step| self.check(step)),
            Act::Snapshot { volume, id } => {
                self.volume(volume)?;
                self.free(id)
            }
            Act::Clone { source, id } => {
                self.snapshot(source)?;
                self.free(id)
            }
            Act::Delete { snapshot } => {
                self.snapshot(snapshot)?;
                let dependents = self.younger(snapshot);
                match dependents.len() > 1 {
                    true => Err(EngineError::HasDependents { id: snapshot, dependents }),
                    false => Ok(()),
                }
            }
            Act::Rollback { volume, snapshot } => {
                self.volume(volume)?;
                match self.snapshot(snapshot)?.info {
                    ViewInfo::Snapshot { volume: of } if of == volume => Ok(()),
                    _ => Err(EngineError::NotOfVolume { volume, snapshot }),
                }
            }
            Act::Resize { volume, size } => {
                self.volume(volume)?;
                Self::good_size(size)
            }
            Act::Remove { volume } => {
                self.volume(volume)?;
                let family = self.family(volume);
                let outside: Vec<u64> = family
                    .iter()
                    .flat_map(|id| self.younger(*id))
                    .filter(|id| !family.contains(id))
                    .collect();
                match outside.is_empty() {
                    true => Ok(()),
                    false => Err(EngineError::HasDependents { id: volume, dependents: outside }),
                }
            }
        }
    }

    /// Applies an operation `check` accepted.
    fn apply(&mut self, act: &Act) {
        match *act {
            Act::WriteMany { .. } => act.steps().iter().for_each(|step| self.apply(step)),
            Act::Create { id, size } => {
                let info = ViewInfo::Volume { snapshots: Vec::new() };
                let data = BTreeMap::new();
                self.views.insert(id, MView { size, older: None, info, data });
            }
            Act::Write { view, lba, blocks, write } => {
                let v = self.views.get_mut(&view).unwrap();
                for i in 0..blocks {
                    let val = if write == 0 { Val::ZeroData } else { Val::Data(write, i) };
                    v.data.insert(lba + i, val);
                }
            }
            Act::Trim { view, lba, blocks } | Act::Zero { view, lba, blocks } => {
                let val = matches!(act, Act::Zero { .. }).then_some(Val::Zero);
                let v = self.views.get_mut(&view).unwrap();
                for l in lba..lba + blocks {
                    match val {
                        Some(val) => v.data.insert(l, val),
                        None => v.data.remove(&l),
                    };
                }
            }
            Act::Snapshot { volume, id } => {
                let head = self.views.get_mut(&volume).unwrap();
                let snap = MView {
                    size: head.size,
                    older: head.older.replace(id),
                    info: ViewInfo::Snapshot { volume },
                    data: head.data.clone(),
                };
                let ViewInfo::Volume { snapshots } = &mut head.info else { unreachable!() };
                snapshots.push(id);
                self.views.insert(id, snap);
            }
            Act::Clone { source, id } => {
                let snap = &self.views[&source];
                let info = ViewInfo::Volume { snapshots: Vec::new() };
                let clone =
                    MView { size: snap.size, older: Some(source), info, data: snap.data.clone() };
                self.views.insert(id, clone);
            }
            Act::Delete { snapshot } => {
                let younger = self.younger(snapshot);
                let gone = self.views.remove(&snapshot).unwrap();
                if let Some(young) = younger.first() {
                    self.views.get_mut(young).unwrap().older = gone.older;
                }
                let ViewInfo::Snapshot { volume } = gone.info else { unreachable!() };
                if let Some(ViewInfo::Volume { snapshots }) =
                    self.views.get_mut(&volume).map(|v| &mut v.info)
                {
                    snapshots.retain(|s| *s != snapshot);
                }
            }
            Act::Rollback { volume, snapshot } => {
                let snap = self.views[&snapshot].clone();
                let head = self.views.get_mut(&volume).unwrap();
                head.data = snap.data;
                head.size = snap.size;
                head.older = Some(snapshot);
            }
            Act::Resize { volume, size } => {
                let v = self.views.get_mut(&volume).unwrap();
                for lba in size / B..v.size / B {
                    v.data.remove(&lba);
                }
                v.size = size;
            }
            Act::Remove { volume } => {
                for id in self.family(volume) {
                    self.views.remove(&id);
                }
            }
        }
    }
}

/// Compares errors; dependents as sets (the engine lists them per family member).
fn same_error(want: &EngineError, got: &EngineError) -> bool {
    match (want, got) {
        (
            EngineError::HasDependents { id: a, dependents: x },
            EngineError::HasDependents { id: b, dependents: y },
        ) => {
            let (mut x, mut y) = (x.clone(), y.clone());
            x.sort_unstable();
            y.sort_unstable();
            a == b && x == y
        }
        (EngineError::Io(_), _) | (_, EngineError::Io(_)) => false,
        _ => format!("{want:?}") == format!("{got:?}"),
    }
}

/// Asserts that the engine is the model: the same views, lineage, sizes and contents.
fn assert_matches(engine: &Engine<SimFile>, model: &Model) {
    assert_eq!(engine_lineage(engine), model.lineage(), "views or lineage differ");
    for (id, view) in &model.views {
        let vals = read_view(engine, *id);
        for (lba, got) in vals.iter().enumerate() {
            let want = view.data.get(&(lba as u64)).copied();
            assert_eq!(*got, want, "view {id} block {lba}");
        }
        let n = view.size / B;
        let err = engine.read(*id, n, &mut [0u8; BLOCK_BYTES]).unwrap_err();
        let want = EngineError::OutOfRange { lba: n, blocks: 1, size: view.size };
        assert!(same_error(&want, &err), "reading past the end of {id}: {err:?}");
    }
    let absent = ID_SPACE + 1; // never used
    let err = engine.read(absent, 0, &mut [0u8; BLOCK_BYTES]).unwrap_err();
    assert!(matches!(err, EngineError::NotFound(id) if id == absent), "{err:?}");
}

/// Asserts that `usage` of every view agrees with brute force over `vbas_of`.
fn assert_usage(engine: &Engine<SimFile>) {
    let ids = engine.view_ids();
    let mut holders: HashMap<u64, u32> = HashMap::new();
    for id in &ids {
        for vba in engine.vbas_of(*id) {
            *holders.entry(vba).or_default() += 1;
        }
    }
    for id in &ids {
        let vbas = engine.vbas_of(*id);
        let exclusive = vbas.iter().filter(|v| holders[*v] == 1).count() as u64;
        let want = Usage { mapped_blocks: vbas.len() as u64, exclusive_blocks: exclusive };
        assert_eq!(engine.usage(*id).unwrap(), want, "usage of view {id}");
    }
    assert_eq!(holders.len(), engine.vba_map_len(), "VBA map size");
}

/// An existing view of the right kind (usually), or any id.
#[derive(Clone, Debug)]
struct Pick {
    index: Index,
    wild: Option<u64>,
    /// Whether to pick among the views `of_preferring` prefers.
    prefer: bool,
}

impl Pick {
    fn of(&self, ids: &[u64]) -> u64 {
        match self.wild {
            Some(id) => id,
            None if ids.is_empty() => self.index.index(ID_SPACE as usize) as u64,
            None => ids[self.index.index(ids.len())],
        }
    }

    /// Like `of`, but half the time among the `preferred` ids matching `filter`, if any.
    fn of_preferring(&self, ids: &[u64], filter: impl Fn(u64) -> bool) -> u64 {
        let preferred: Vec<u64> = ids.iter().copied().filter(|id| filter(*id)).collect();
        match self.prefer && !preferred.is_empty() {
            true => self.of(&preferred),
            false => self.of(ids),
        }
    }

    /// A new id: usually a free one.
    fn new_id(&self, model: &Model) -> u64 {
        let free: Vec<u64> = (0..ID_SPACE).filter(|id| !model.views.contains_key(id)).collect();
        self.of(&free)
    }
}

/// A first block: usually inside the view, sometimes anywhere.
#[derive(Clone, Debug)]
struct Lba {
    index: Index,
    wild: Option<u64>,
}

impl Lba {
    fn of(&self, model: &Model, view: u64) -> u64 {
        let size = model.views.get(&view).map_or(MAX_BLOCKS, |v| v.size / B);
        self.wild.unwrap_or_else(|| self.index.index(size as usize) as u64)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        id: Pick,
        size: u64,
    },
    Write {
        view: Pick,
        lba: Lba,
        blocks: u64,
        /// Blocks of zeroes (which read the same wherever a crash left nothing).
        zeroes: bool,
    },
    /// `write_many` of (lba, blocks, zeroes), each as in `Write`.
    WriteMany {
        view: Pick,
        writes: Vec<(Lba, u64, bool)>,
    },
    Trim {
        view: Pick,
        lba: Lba,
        blocks: u64,
    },
    Zero {
        view: Pick,
        lba: Lba,
        blocks: u64,
    },
    Snapshot {
        volume: Pick,
        id: Pick,
    },
    Clone {
        source: Pick,
        id: Pick,
    },
    Delete {
        snapshot: Pick,
    },
    Rollback {
        volume: Pick,
        snapshot: Pick,
    },
    Resize {
        volume: Pick,
        size: u64,
    },
    Remove {
        volume: Pick,
    },
    /// `Engine::flush`, or `seal`, a sync of the file and `synced`.
    Flush {
        seal: bool,
    },
    Crash {
        seed: u64,
    },
    /// Many operations with no flush between them: they fill journal slots, which the log
    /// leaves without a sync. The disk may write back its cache before one of them.
    Burst {
        ops: Vec<Op>,
        write_back: Option<Index>,
    },
    /// The disk writes back its cache: a sync the log did not ask for, so nothing is
    /// promised, but a crash keeps no less than the disk wrote (an outcome the crash could
    /// have had anyway, made likely: records past a full journal slot survive more often).
    WriteBack,
}

impl Op {
    /// The concrete operation, given the model's views.
    fn resolve(&self, model: &Model, next_write: &mut u64) -> Act {
        let (volumes, snapshots) = (model.volumes(), model.snapshots());
        match self {
            Op::Create { id, size } => Act::Create { id: id.new_id(model), size: *size },
            Op::Write { view, lba, blocks, zeroes } => {
                let write = match zeroes {
                    true => 0,
                    false => {
                        *next_write += 1;
                        *next_write
                    }
                };
                let view = view.of(&volumes);
                Act::Write { view, lba: lba.of(model, view), blocks: *blocks, write }
            }
            Op::WriteMany { view, writes } => {
                let view = view.of(&volumes);
                let writes = writes
                    .iter()
                    .map(|(lba, blocks, zeroes)| {
                        let write = match zeroes {
                            true => 0,
                            false => {
                                *next_write += 1;
                                *next_write
                            }
                        };
                        (lba.of(model, view), *blocks, write)
                    })
                    .collect();
                Act::WriteMany { view, writes }
            }
            Op::Trim { view, lba, blocks } => {
                let view = view.of(&volumes);
                Act::Trim { view, lba: lba.of(model, view), blocks: *blocks }
            }
            Op::Zero { view, lba, blocks } => {
                let view = view.of(&volumes);
                Act::Zero { view, lba: lba.of(model, view), blocks: *blocks }
            }
            Op::Snapshot { volume, id } => {
                Act::Snapshot { volume: volume.of(&volumes), id: id.new_id(model) }
            }
            Op::Clone { source, id } => {
                // Often one no view was made from yet (a volume rolled back past it), so
                // that deleting it later goes ahead with the clone as its one dependent.
                let source = source.of_preferring(&snapshots, |s| model.younger(s).is_empty());
                Act::Clone { source, id: id.new_id(model) }
            }
            Op::Delete { snapshot } => {
                // Often one that can be deleted.
                let snapshot = snapshot.of_preferring(&snapshots, |s| model.younger(s).len() < 2);
                Act::Delete { snapshot }
            }
            Op::Rollback { volume, snapshot } => {
                let volume = volume.of(&volumes);
                let own = match model.views.get(&volume).map(|v| &v.info) {
                    Some(ViewInfo::Volume { snapshots: own }) if !own.is_empty() => own.clone(),
                    _ => snapshots,
                };
                // Often to an older snapshot than the newest: a rollback branch.
                let newest = own.last().copied();
                Act::Rollback {
                    volume,
                    snapshot: snapshot.of_preferring(&own, |s| Some(s) != newest),
                }
            }
            Op::Resize { volume, size } => Act::Resize { volume: volume.of(&volumes), size: *size },
            Op::Remove { volume } => Act::Remove { volume: volume.of(&volumes) },
            Op::Flush { .. } | Op::Crash { .. } | Op::Burst { .. } | Op::WriteBack => {
                unreachable!("not one engine operation")
            }
        }
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    (any::<Index>(), prop::option::weighted(0.1, 0..ID_SPACE + 1), any::<bool>())
        .prop_map(|(index, wild, prefer)| Pick { index, wild, prefer })
}

/// Mostly good sizes; some zero or not whole blocks.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        20 => (1..=MAX_BLOCKS).prop_map(|b| b * B),
        1 => Just(0),
        1 => (1..=MAX_BLOCKS).prop_map(|b| b * B - 512),
    ]
}

/// Engine operations (no flush or crash); `lineage` weighs snapshot operations and
/// `writes` writes.
fn engine_op(lineage: u32, writes: u32) -> impl Strategy<Value = Op> {
    let lba = || {
        (any::<Index>(), prop::option::weighted(0.05, 0..MAX_BLOCKS + 1))
            .prop_map(|(index, wild)| Lba { index, wild })
    };
    let range = (pick(), lba(), 1..=WRITE_BLOCKS, prop::bool::weighted(0.2));
    let entry = (lba(), 1..=WRITE_BLOCKS, prop::bool::weighted(0.2));
    let batch = (pick(), proptest::collection::vec(entry, 1..6));
    let range0 = || (pick(), lba(), prop_oneof![20 => 1..=3u64, 1 => Just(0)]);
    prop_oneof![
        3 => (pick(), size()).prop_map(|(id, size)| Op::Create { id, size }),
        writes => range
            .prop_map(|(view, lba, blocks, zeroes)| Op::Write { view, lba, blocks, zeroes }),
        1 + writes / 4 => batch.prop_map(|(view, writes)| Op::WriteMany { view, writes }),
        2 => range0().prop_map(|(view, lba, blocks)| Op::Trim { view, lba, blocks }),
        2 => range0().prop_map(|(view, lba, blocks)| Op::Zero { view, lba, blocks }),
        4 * lineage => (pick(), pick()).prop_map(|(volume, id)| Op::Snapshot { volume, id }),
        2 * lineage => (pick(), pick()).prop_map(|(source, id)| Op::Clone { source, id }),
        2 * lineage => pick().prop_map(|snapshot| Op::Delete { snapshot }),
        3 * lineage => (pick(), pick())
            .prop_map(|(volume, snapshot)| Op::Rollback { volume, snapshot }),
        2 => (pick(), size()).prop_map(|(volume, size)| Op::Resize { volume, size }),
        1 => pick().prop_map(|volume| Op::Remove { volume }),
    ]
}

/// Operations; `crashes` adds flushes, crashes and bursts long enough to fill a journal
/// slot (a few thousand bytes of records), `lineage` weighs snapshot operations.
fn op(crashes: bool, lineage: u32) -> impl Strategy<Value = Op> {
    // Without crashes, a crash is a flush and a burst is short (a union option must weigh
    // something).
    let (flush, crash) = if crashes { (2, 2) } else { (1, 1) };
    let burst = if crashes { 120..240 } else { 1..3 };
    let bursts = prop_oneof![
        proptest::collection::vec(engine_op(lineage, 10), burst.clone()),
        // Few writes: a write whose data a crash lost ends replay, so records without data
        // are the ones that reach past a full journal slot.
        proptest::collection::vec(engine_op(lineage, 1), burst),
    ];
    prop_oneof![
        20 + 11 * lineage => engine_op(lineage, 10),
        flush => any::<bool>().prop_map(|seal| Op::Flush { seal }),
        crash => any::<u64>().prop_map(move |seed| match crashes {
            true => Op::Crash { seed },
            false => Op::Flush { seal: seed % 2 == 0 },
        }),
        1 => Just(Op::WriteBack),
        1 => (bursts, prop::option::of(any::<Index>()))
            .prop_map(|(ops, write_back)| Op::Burst { ops, write_back }),
    ]
}

/// The model the engine holds: its views, sizes, lineage and contents.
fn observe(engine: &Engine<SimFile>) -> Model {
    let views = engine_lineage(engine).into_iter().map(|(id, (info, size, older))| {
        let vals = read_view(engine, id).into_iter().enumerate();
        let data = vals.filter_map(|(lba, val)| Some((lba as u64, val?))).collect();
        (id, MView { size, older, info, data })
    });
    Model { views: views.collect() }
}

/// The first difference between two models, for failure messages.
fn difference(want: &Model, got: &Model) -> String {
    let ids: BTreeSet<u64> = want.views.keys().chain(got.views.keys()).copied().collect();
    for id in ids {
        let (w, g) = (want.views.get(&id), got.views.get(&id));
        if w != g {
            return format!("view {id}: the model has {w:?}, the engine {g:?}");
        }
    }
    "none".to_string()
}

/// The model test's state: the model, and what a crash may leave since the last flush.
struct Run {
    engine: Engine<SimFile>,
    model: Model,
    /// The model at the last flush (or reopen) and after each operation accepted since: a
    /// crash must leave exactly one of them, as replay keeps a prefix of the records.
    prefixes: Vec<Model>,
    next_write: u64,
    /// Whether to check `usage` against brute force after every step.
    check_usage: bool,
}

impl Run {
    fn new(check_usage: bool) -> Run {
        Run {
            engine: Engine::create(SimFile::new()),
            model: Model::default(),
            prefixes: vec![Model::default()],
            next_write: 0,
            check_usage,
        }
    }

    /// Everything before is durable: the model is what any crash must keep.
    fn flushed(&mut self) {
        self.prefixes = vec![self.model.clone()];
    }

    fn flush(&mut self, seal: bool) {
        if seal {
            let through = self.engine.seal().unwrap();
            self.engine.file().sync().unwrap();
            self.engine.synced(through).unwrap();
        } else {
            self.engine.flush().unwrap();
        }
        self.flushed();
    }

    fn crash(&mut self, seed: u64) {
        let engine = std::mem::replace(&mut self.engine, Engine::create(SimFile::new()));
        let file = engine.into_file();
        // With nothing unsynced (as right after a reopen), a crash loses nothing.
        let lossless = file.unsynced_writes() == 0;
        file.crash(&mut SimRng::new(seed));
        self.engine = Engine::open(file).expect("reopen after a crash");
        if let Err(e) = self.engine.validate() {
            panic!("after reopen: {e}");
        }
        // Exactly the state after some prefix of the operations since the last flush:
        // nothing flushed is lost, and nothing is lost but a suffix (writes included).
        let got = observe(&self.engine);
        let last = self.prefixes.last().expect("the flushed state");
        if lossless {
            assert!(got == *last, "a crash with nothing unsynced lost {}", difference(last, &got));
        }
        if !self.prefixes.contains(&got) {
            let closest = self.prefixes.iter().min_by_key(|m| {
                let ids = m.views.keys().chain(got.views.keys());
                ids.filter(|id| m.views.get(id) != got.views.get(id)).count()
            });
            panic!(
                "after a crash the engine is none of the {} states since the last flush; the \
                 closest differs in {}",
                self.prefixes.len(),
                difference(closest.expect("one"), &got)
            );
        }
        self.model = got;
        // `Engine::open` synced what replay decided: the next crash keeps at least this.
        self.flushed();
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Flush { seal } => self.flush(*seal),
            Op::Crash { seed } => self.crash(*seed),
            Op::WriteBack => self.engine.file().sync().unwrap(),
            Op::Burst { ops, write_back } => {
                let write_back = write_back.as_ref().map(|at| at.index(ops.len()));
                for (i, op) in ops.iter().enumerate() {
                    if write_back == Some(i) {
                        self.engine.file().sync().unwrap();
                    }
                    let act = op.resolve(&self.model, &mut self.next_write);
                    self.act(act);
                }
            }
            op => {
                let act = op.resolve(&self.model, &mut self.next_write);
                self.act(act);
            }
        }
    }

    /// Runs one operation on the engine and, unless it is refused, on the model.
    fn act(&mut self, act: Act) {
        let want = self.model.check(&act);
        let engine = &mut self.engine;
        let before = (engine.log_bytes(), engine.file().unsynced_writes(), engine.vba_map_len());
        // What the operation must free: a snapshot's or a rolled back head's exclusive
        // blocks, or the VBAs only a removed family holds.
        let freed = match (&act, &want) {
            (Act::Delete { snapshot: id }, Ok(())) | (Act::Rollback { volume: id, .. }, Ok(())) => {
                Some(engine.usage(*id).unwrap().exclusive_blocks as usize)
            }
            (Act::Remove { volume }, Ok(())) => {
                let family = self.model.family(*volume);
                let vbas = |ids: &mut dyn Iterator<Item = &u64>| -> BTreeSet<u64> {
                    ids.flat_map(|id| engine.vbas_of(*id)).collect()
                };
                let outside = vbas(&mut self.model.views.keys().filter(|id| !family.contains(id)));
                Some(vbas(&mut family.iter()).difference(&outside).count())
            }
            _ => None,
        };
        match (want, act.run(engine)) {
            (Ok(()), Ok(())) => {
                if let Some(freed) = freed {
                    let after = engine.vba_map_len();
                    assert_eq!(before.2 - after, freed, "{act:?} frees its exclusive blocks");
                }
                // A crash may keep any prefix of a batch's records.
                for step in act.steps() {
                    self.model.apply(&step);
                    self.prefixes.push(self.model.clone());
                }
            }
            (Err(want), Err(got)) => {
                assert!(same_error(&want, &got), "{act:?}: want {want:?}, got {got:?}");
                let after =
                    (engine.log_bytes(), engine.file().unsynced_writes(), engine.vba_map_len());
                assert_eq!(before, after, "refused {act:?} changed the engine");
            }
            (want, got) => panic!("{act:?}: want {want:?}, got {got:?}"),
        }
    }

    fn run(ops: &[Op], check_usage: bool) {
        let mut run = Run::new(check_usage);
        run.act(Act::Create { id: 0, size: MAX_BLOCKS * B });
        for op in ops {
            run.step(op);
            if let Err(e) = run.engine.validate() {
                panic!("after {op:?}: {e}");
            }
            assert_matches(&run.engine, &run.model);
            if run.check_usage {
                assert_usage(&run.engine);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        // Bursts draw thousands of values per case: ChaCha costs seconds in debug builds.
        rng_algorithm: RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    /// Every operation, flushes and crashes, against the model.
    #[test]
    fn engine_matches_the_model_across_crashes(
        ops in proptest::collection::vec(op(true, 1), 1..100),
    ) {
        Run::run(&ops, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_algorithm: RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    /// Snapshots, clones, rollbacks and deletes: `usage` matches brute force for every view
    /// after every step, and a delete frees exactly the snapshot's exclusive blocks.
    #[test]
    fn usage_and_deletes_account_exactly(
        ops in proptest::collection::vec(op(false, 3), 1..80),
    ) {
        Run::run(&ops, true);
    }
}

/// Asserts that `op` is refused with `want` and that the engine logged and changed nothing.
fn assert_refused(
    engine: &mut Engine<SimFile>,
    want: EngineError,
    op: impl FnOnce(&mut Engine<SimFile>) -> Result<(), EngineError>,
) {
    let state = |e: &Engine<SimFile>| {
        let vbas: Vec<Vec<u64>> = e.view_ids().iter().map(|id| e.vbas_of(*id)).collect();
        (e.log_bytes(), e.file().unsynced_writes(), e.vba_map_len(), engine_lineage(e), vbas)
    };
    let before = state(engine);
    match op(engine) {
        Ok(()) => panic!("not refused; want {want:?}"),
        Err(got) => assert!(same_error(&want, &got), "want {want:?}, got {got:?}"),
    }
    assert_eq!(state(engine), before, "a refusal changed the engine");
    engine.validate().unwrap();
}

/// Reads one block of a view.
fn read_block(engine: &Engine<SimFile>, view: u64, lba: u64) -> Result<Vec<u8>, EngineError> {
    let mut buf = vec![0u8; BLOCK_BYTES];
    engine.read(view, lba, &mut buf).map(|()| buf)
}

/// Crashes the engine's file with `seed` and reopens it.
fn crash_and_reopen(engine: Engine<SimFile>, seed: u64) -> Engine<SimFile> {
    let file = engine.into_file();
    file.crash(&mut SimRng::new(seed));
    let engine = Engine::open(file).unwrap();
    engine.validate().unwrap();
    engine
}

#[test]
fn unaligned_io_is_refused() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    for len in [0, 100, BLOCK_BYTES + 1] {
        assert_refused(&mut engine, EngineError::Unaligned, |e| e.write(1, 0, &vec![1; len]));
        // Checked first, before the volume is looked up.
        assert_refused(&mut engine, EngineError::Unaligned, |e| e.write(9, 0, &vec![1; len]));
        let err = engine.read(1, 0, &mut vec![0; len]).unwrap_err();
        assert!(matches!(err, EngineError::Unaligned), "{err:?}");
    }
}

#[test]
fn io_on_missing_volumes_and_past_the_end_is_refused() {
    let mut engine = Engine::create(SimFile::new());
    // Volumes are created explicitly: a write does not create one.
    assert_refused(&mut engine, EngineError::NotFound(1), |e| e.write(1, 0, &block(1, 0)));
    assert_refused(&mut engine, EngineError::NotFound(1), |e| e.trim(1, 0, 1));
    assert_refused(&mut engine, EngineError::NotFound(1), |e| e.write_zeroes(1, 0, 1));
    assert!(matches!(read_block(&engine, 1, 0), Err(EngineError::NotFound(1))));
    assert!(matches!(engine.size(1), Err(EngineError::NotFound(1))));
    assert!(matches!(engine.usage(1), Err(EngineError::NotFound(1))));
    engine.create_volume(1, 4 * B).unwrap();
    let size = 4 * B;
    let out = |lba, blocks| EngineError::OutOfRange { lba, blocks, size };
    assert_refused(&mut engine, out(3, 2), |e| e.write(1, 3, &blocks(1, 2)));
    assert_refused(&mut engine, out(4, 1), |e| e.write(1, 4, &block(1, 0)));
    assert_refused(&mut engine, out(u64::MAX, 1), |e| e.write(1, u64::MAX, &block(1, 0)));
    assert_refused(&mut engine, out(0, 0), |e| e.trim(1, 0, 0));
    assert_refused(&mut engine, out(2, 3), |e| e.trim(1, 2, 3));
    assert_refused(&mut engine, out(u64::MAX, 2), |e| e.trim(1, u64::MAX, 2));
    assert_refused(&mut engine, out(0, 0), |e| e.write_zeroes(1, 0, 0));
    assert_refused(&mut engine, out(1, 4), |e| e.write_zeroes(1, 1, 4));
    let err = engine.read(1, 3, &mut vec![0; 2 * BLOCK_BYTES]).unwrap_err();
    assert!(same_error(&out(3, 2), &err), "{err:?}");
    assert!(same_error(&out(0, 5), &engine.extents(1, 0, 5).unwrap_err()));
    // The last block is in range.
    engine.write(1, 3, &block(1, 0)).unwrap();
    assert_eq!(read_block(&engine, 1, 3).unwrap(), block(1, 0));
    // After a shrink, reads of what was cut are refused too.
    engine.resize(1, 2 * B).unwrap();
    let err = read_block(&engine, 1, 3).unwrap_err();
    assert!(same_error(&EngineError::OutOfRange { lba: 3, blocks: 1, size: 2 * B }, &err));
    engine.validate().unwrap();
}

#[test]
fn bad_sizes_and_taken_ids_are_refused() {
    let mut engine = Engine::create(SimFile::new());
    for size in [0, 1, 4095, B + 512] {
        assert_refused(&mut engine, EngineError::BadSize(size), |e| e.create_volume(1, size));
    }
    engine.create_volume(1, 2 * B).unwrap();
    engine.snapshot(1, 2).unwrap();
    for size in [0, 3, 3 * B - 1] {
        assert_refused(&mut engine, EngineError::BadSize(size), |e| e.resize(1, size));
    }
    // Volumes and snapshots share one id space.
    assert_refused(&mut engine, EngineError::Exists(1), |e| e.create_volume(1, B));
    assert_refused(&mut engine, EngineError::Exists(2), |e| e.create_volume(2, B));
    assert_refused(&mut engine, EngineError::Exists(1), |e| e.snapshot(1, 1));
    assert_refused(&mut engine, EngineError::Exists(2), |e| e.snapshot(1, 2));
    assert_refused(&mut engine, EngineError::Exists(1), |e| e.clone_snapshot(2, 1));
    assert_refused(&mut engine, EngineError::Exists(2), |e| e.clone_snapshot(2, 2));
    // The id check comes before the size check.
    assert_refused(&mut engine, EngineError::Exists(1), |e| e.create_volume(1, 0));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.resize(9, B));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.remove_volume(9));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.snapshot(9, 10));
}

#[test]
fn snapshots_are_read_only() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.write(1, 0, &block(1, 0)).unwrap();
    engine.snapshot(1, 2).unwrap();
    let ro = EngineError::ReadOnly(2);
    assert_refused(&mut engine, ro, |e| e.write(2, 0, &block(2, 0)));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.trim(2, 0, 1));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.write_zeroes(2, 0, 1));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.resize(2, 8 * B));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.snapshot(2, 3));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.rollback(2, 2));
    assert_refused(&mut engine, EngineError::ReadOnly(2), |e| e.remove_volume(2));
    assert_eq!(read_block(&engine, 2, 0).unwrap(), block(1, 0));
    assert_eq!(engine.info(2).unwrap(), ViewInfo::Snapshot { volume: 1 });
}

#[test]
fn snapshot_operations_need_a_snapshot_of_the_right_volume() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.snapshot(1, 2).unwrap();
    engine.create_volume(3, 4 * B).unwrap();
    engine.snapshot(3, 4).unwrap();
    engine.clone_snapshot(2, 5).unwrap();
    assert_refused(&mut engine, EngineError::NotSnapshot(1), |e| e.clone_snapshot(1, 6));
    assert_refused(&mut engine, EngineError::NotSnapshot(1), |e| e.delete_snapshot(1));
    assert_refused(&mut engine, EngineError::NotSnapshot(3), |e| e.rollback(1, 3));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.clone_snapshot(9, 6));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.delete_snapshot(9));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.rollback(1, 9));
    assert_refused(&mut engine, EngineError::NotFound(9), |e| e.rollback(9, 2));
    // Rollback goes to one of the volume's own snapshots: not another volume's, and not
    // the snapshot a clone was made from.
    let other = EngineError::NotOfVolume { volume: 1, snapshot: 4 };
    assert_refused(&mut engine, other, |e| e.rollback(1, 4));
    let source = EngineError::NotOfVolume { volume: 5, snapshot: 2 };
    assert_refused(&mut engine, source, |e| e.rollback(5, 2));
}

#[test]
fn a_snapshot_two_views_were_made_from_is_not_deleted() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.write(1, 0, &blocks(1, 2)).unwrap();
    // A clone and the volume's head.
    engine.snapshot(1, 2).unwrap();
    engine.clone_snapshot(2, 3).unwrap();
    assert_eq!(engine.dependents(2), vec![1, 3]);
    let deps = |id, dependents| EngineError::HasDependents { id, dependents };
    assert_refused(&mut engine, deps(2, vec![1, 3]), |e| e.delete_snapshot(2));
    // The next snapshot and a clone.
    engine.snapshot(1, 4).unwrap();
    assert_eq!(engine.dependents(2), vec![3, 4]);
    assert_refused(&mut engine, deps(2, vec![3, 4]), |e| e.delete_snapshot(2));
    // A rollback branch: the head went back to 4, and 6 was taken after 4.
    engine.write(1, 1, &block(2, 0)).unwrap();
    engine.snapshot(1, 6).unwrap();
    engine.write(1, 2, &block(3, 0)).unwrap();
    engine.rollback(1, 4).unwrap();
    assert_eq!(engine.dependents(4), vec![1, 6]);
    assert_eq!(engine.dependents(6), Vec::<u64>::new());
    assert_refused(&mut engine, deps(4, vec![1, 6]), |e| e.delete_snapshot(4));
    // Refusals hold after a crash: they follow from the replayed lineage.
    engine.flush().unwrap();
    let mut engine = crash_and_reopen(engine, 7);
    assert_refused(&mut engine, deps(2, vec![3, 4]), |e| e.delete_snapshot(2));
    assert_refused(&mut engine, deps(4, vec![1, 6]), |e| e.delete_snapshot(4));
    // Once one of the two is gone, the delete goes ahead and frees exactly what only
    // the snapshot held.
    for (snapshot, then) in [(6, None), (4, None), (2, Some(3))] {
        if let Some(clone) = then {
            engine.remove_volume(clone).unwrap();
        }
        let exclusive = engine.usage(snapshot).unwrap().exclusive_blocks as usize;
        let before = engine.vba_map_len();
        engine.delete_snapshot(snapshot).unwrap();
        assert_eq!(before - engine.vba_map_len(), exclusive, "deleting {snapshot}");
        engine.validate().unwrap();
    }
    assert_eq!(engine.view_ids(), vec![1]);
    assert_eq!(read_block(&engine, 1, 0).unwrap(), block(1, 0));
    assert_eq!(read_block(&engine, 1, 1).unwrap(), block(1, 1));
    assert_eq!(read_block(&engine, 1, 2).unwrap(), vec![0; BLOCK_BYTES]);
    assert_eq!(engine.vba_map_len(), 2);
}

#[test]
fn a_volume_whose_snapshots_have_clones_is_not_removed() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.write(1, 0, &blocks(1, 4)).unwrap();
    engine.snapshot(1, 2).unwrap();
    engine.write(1, 1, &block(2, 0)).unwrap();
    engine.snapshot(1, 3).unwrap();
    engine.clone_snapshot(2, 4).unwrap();
    engine.clone_snapshot(3, 5).unwrap();
    engine.write(5, 2, &block(3, 0)).unwrap();
    let deps = |dependents| EngineError::HasDependents { id: 1, dependents };
    assert_refused(&mut engine, deps(vec![4, 5]), |e| e.remove_volume(1));
    engine.remove_volume(4).unwrap();
    assert_refused(&mut engine, deps(vec![5]), |e| e.remove_volume(1));
    // A snapshot of the clone takes its place as the view made from 3.
    engine.snapshot(5, 6).unwrap();
    assert_refused(&mut engine, deps(vec![6]), |e| e.remove_volume(1));
    engine.remove_volume(5).unwrap();
    assert_eq!(engine.view_ids(), vec![1, 2, 3]);
    engine.validate().unwrap();
    engine.remove_volume(1).unwrap();
    assert_eq!(engine.view_ids(), Vec::<u64>::new());
    assert_eq!(engine.vba_map_len(), 0);
    engine.validate().unwrap();
    // The ids are free again.
    engine.create_volume(2, B).unwrap();
    assert_eq!(read_block(&engine, 2, 0).unwrap(), vec![0; BLOCK_BYTES]);
}

#[test]
fn rollback_restores_contents_and_size_and_frees_what_was_written_since() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.write(1, 0, &block(1, 0)).unwrap();
    engine.snapshot(1, 2).unwrap();
    engine.resize(1, 8 * B).unwrap();
    engine.write(1, 5, &block(2, 0)).unwrap();
    engine.write(1, 0, &block(3, 0)).unwrap();
    assert_eq!(engine.usage(1).unwrap(), Usage { mapped_blocks: 2, exclusive_blocks: 2 });
    let before = engine.vba_map_len();
    engine.rollback(1, 2).unwrap();
    assert_eq!(before - engine.vba_map_len(), 2);
    assert_eq!(engine.size(1).unwrap(), 4 * B);
    assert_eq!(read_block(&engine, 1, 0).unwrap(), block(1, 0));
    assert!(matches!(read_block(&engine, 1, 5), Err(EngineError::OutOfRange { .. })));
    assert_eq!(engine.info(1).unwrap(), ViewInfo::Volume { snapshots: vec![2] });
    engine.validate().unwrap();
}

#[test]
fn a_snapshot_whose_one_dependent_is_a_clone_is_deleted() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 4 * B).unwrap();
    engine.write(1, 0, &block(1, 0)).unwrap();
    engine.snapshot(1, 2).unwrap();
    engine.write(1, 1, &block(2, 0)).unwrap();
    engine.snapshot(1, 3).unwrap();
    engine.write(1, 2, &block(3, 0)).unwrap();
    // The head leaves 3 behind; a clone of 3 is then the one view made from it.
    engine.rollback(1, 2).unwrap();
    assert_eq!(engine.dependents(3), Vec::<u64>::new());
    engine.clone_snapshot(3, 4).unwrap();
    engine.write(4, 1, &block(4, 0)).unwrap();
    assert_eq!(engine.dependents(3), vec![4]);
    assert_usage(&engine);
    // Only 3 still holds block 1 as written by write 2.
    assert_eq!(engine.usage(3).unwrap(), Usage { mapped_blocks: 2, exclusive_blocks: 1 });
    let before = engine.vba_map_len();
    engine.delete_snapshot(3).unwrap();
    assert_eq!(before - engine.vba_map_len(), 1);
    engine.validate().unwrap();
    assert_usage(&engine);
    // The clone now hangs off 2, and holds the volume back from removal.
    assert_eq!(engine.dependents(2), vec![1, 4]);
    let deps = EngineError::HasDependents { id: 1, dependents: vec![4] };
    assert_refused(&mut engine, deps, |e| e.remove_volume(1));
    assert_eq!(read_block(&engine, 4, 0).unwrap(), block(1, 0));
    assert_eq!(read_block(&engine, 4, 1).unwrap(), block(4, 0));
    assert_eq!(read_block(&engine, 4, 2).unwrap(), vec![0; BLOCK_BYTES]);
    // The same after a replay.
    engine.flush().unwrap();
    let mut engine = crash_and_reopen(engine, 5);
    assert_eq!(engine.dependents(2), vec![1, 4]);
    assert_usage(&engine);
    engine.remove_volume(4).unwrap();
    engine.validate().unwrap();
    assert_usage(&engine);
    assert_eq!(read_block(&engine, 2, 0).unwrap(), block(1, 0));
    engine.remove_volume(1).unwrap();
    assert_eq!(engine.vba_map_len(), 0);
    engine.validate().unwrap();
}

/// The offset of the slot in `file` that holds `data`.
fn find_slot(file: &SimFile, data: &[u8]) -> u64 {
    let mut all = vec![0u8; file.length_bytes().unwrap() as usize];
    file.read_at(&mut all, 0).unwrap();
    let at = all.chunks(BLOCK_BYTES).position(|slot| slot == data).expect("the block is there");
    at as u64 * B
}

/// Flips bit `bit` of the byte at `offset`.
fn flip(file: &SimFile, offset: u64, bit: u8) {
    let mut byte = [0u8];
    file.read_at(&mut byte, offset).unwrap();
    file.write_at(&[byte[0] ^ (1 << bit)], offset).unwrap();
}

#[test]
fn a_flipped_bit_in_a_block_is_an_error_never_wrong_data() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(7, 8 * B).unwrap();
    engine.write(7, 2, &blocks(1, 3)).unwrap();
    engine.snapshot(7, 8).unwrap();
    engine.flush().unwrap();
    let Target::Data { vba } = engine.extents(7, 3, 1).unwrap()[0].target else { panic!() };
    let at = find_slot(engine.file(), &block(1, 1));
    flip(engine.file(), at + 100, 2);
    let corrupt = |engine: &Engine<SimFile>, view: u64, lba: u64, blocks: usize| {
        let mut buf = vec![0u8; blocks * BLOCK_BYTES];
        match engine.read(view, lba, &mut buf) {
            Err(EngineError::Corrupt { volume, lba, .. }) => (volume, lba),
            other => panic!("view {view}: {other:?}"),
        }
    };
    // Alone, within a longer read, and through the snapshot that shares it.
    assert_eq!(corrupt(&engine, 7, 3, 1), (7, 3));
    assert_eq!(corrupt(&engine, 7, 0, 8), (7, 3));
    assert_eq!(corrupt(&engine, 8, 2, 2), (8, 3));
    assert_eq!(read_block(&engine, 7, 2).unwrap(), block(1, 0));
    assert_eq!(read_block(&engine, 7, 4).unwrap(), block(1, 2));
    assert_eq!(engine.verify_data().unwrap(), vec![vba]);
    engine.validate().unwrap();
    // A flushed block stays damaged after a reopen: an error, not the older contents.
    engine.file().sync().unwrap();
    let mut engine = crash_and_reopen(engine, 1);
    assert_eq!(corrupt(&engine, 7, 3, 1), (7, 3));
    assert_eq!(corrupt(&engine, 8, 3, 1), (8, 3));
    assert_eq!(engine.verify_data().unwrap(), vec![vba]);
    // An overwrite replaces the volume's block; the snapshot still holds the bad one...
    engine.write(7, 3, &block(2, 0)).unwrap();
    assert_eq!(read_block(&engine, 7, 3).unwrap(), block(2, 0));
    assert_eq!(corrupt(&engine, 8, 3, 1), (8, 3));
    assert_eq!(engine.verify_data().unwrap(), vec![vba]);
    // ...until it is deleted.
    engine.delete_snapshot(8).unwrap();
    assert_eq!(engine.verify_data().unwrap(), Vec::<u64>::new());
    // An unflushed block damaged while the engine runs is an error too.
    engine.write(7, 6, &block(3, 0)).unwrap();
    let at = find_slot(engine.file(), &block(3, 0));
    flip(engine.file(), at + BLOCK_BYTES as u64 - 1, 7);
    assert_eq!(corrupt(&engine, 7, 6, 1), (7, 6));
    assert_eq!(engine.verify_data().unwrap().len(), 1);
    engine.validate().unwrap();
}

#[test]
fn writes_longer_than_one_record_are_split_and_replay() {
    let n = WRITE_BLOCKS_MAX as u64 + 1;
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, (n + 2) * B).unwrap();
    engine.write(1, 1, &blocks(1, n)).unwrap();
    engine.flush().unwrap();
    let engine = crash_and_reopen(engine, 3);
    let vals = read_view(&engine, 1);
    assert_eq!(vals[0], None);
    for i in 0..n {
        assert_eq!(vals[1 + i as usize], Some(Val::Data(1, i)), "block {i}");
    }
    assert_eq!(vals[n as usize + 1], None);
    assert_eq!(engine.usage(1).unwrap(), Usage { mapped_blocks: n, exclusive_blocks: n });
}

/// A copy of a crashed file (its durable image), to try several crashes from one state.
fn copy_file(file: &SimFile) -> SimFile {
    let copy = SimFile::new();
    let mut all = vec![0u8; file.length_bytes().unwrap() as usize];
    file.read_at(&mut all, 0).unwrap();
    copy.write_at(&all, 0).unwrap();
    copy.sync().unwrap();
    copy
}

/// When the open journal slot fills, `append` moves on to the next slot without a sync. A
/// crash can keep the next slot but lose the last rewrite of the full one; replay once
/// returned the records after that gap: here a write to a volume whose `Create` was lost,
/// and `Engine::open` panicked. (A slot now names its predecessor's crc.)
#[test]
fn a_full_journal_slot_is_no_gap_after_a_crash() {
    for seed in 0..100 {
        let mut engine = Engine::create(SimFile::new());
        engine.create_volume(1, 64 * B).unwrap();
        engine.flush().unwrap();
        // Fill the open slot to the last record that fits, which creates volume 2.
        let trims = (RECORDS_BYTES_MAX - 2 * 27) / 27;
        for i in 0..trims as u64 {
            engine.trim(1, i % 64, 1).unwrap();
        }
        engine.create_volume(2, B).unwrap();
        engine.write(2, 0, &block(1, 0)).unwrap();
        let file = engine.into_file();
        file.crash(&mut SimRng::new(seed));
        let reopened = std::panic::catch_unwind(|| Engine::open(file).map(|e| e.view_ids()));
        let Ok(Ok(views)) = reopened else { panic!("seed {seed}: reopen fails or panics") };
        assert!(views == [1] || views == [1, 2], "seed {seed}: {views:?}");
    }
}

/// A crash that cuts the file short inside the last journal slot (the file shorter than a
/// slot) makes replay skip that slot, though its kept sectors may decode. The next run
/// rewrites the slot and extends the file; a next crash that loses that rewrite once let
/// the old slot decode, and records the first replay dropped came back after the
/// application saw them gone. (Each run's first slot is now written and synced at open.)
#[test]
fn a_journal_slot_cut_short_by_a_crash_stays_lost() {
    let mut cases = 0;
    for seed in 0..40 {
        let mut engine = Engine::create(SimFile::new());
        engine.create_volume(0, 10 * B).unwrap();
        engine.snapshot(0, 1).unwrap();
        engine.flush().unwrap();
        // Two journal slots' worth of records: the log moves on twice without a sync, so
        // the slot the clone lands in may be the last one in the file.
        for i in 0..2 * (RECORDS_BYTES_MAX / 27) as u64 + 1 {
            engine.trim(0, i % 10, 1).unwrap();
        }
        engine.clone_snapshot(1, 7).unwrap();
        let file = engine.into_file();
        file.crash(&mut SimRng::new(seed));
        if file.length_bytes().unwrap().is_multiple_of(B) {
            continue;
        }
        let engine = Engine::open(file).unwrap();
        if engine.view_ids().contains(&7) {
            continue;
        }
        cases += 1;
        let file = engine.into_file();
        for seed2 in 0..20 {
            let mut engine = Engine::open(copy_file(&file)).unwrap();
            engine.write(0, 3, &block(5, 0)).unwrap();
            let engine = crash_and_reopen(engine, seed2);
            assert!(!engine.view_ids().contains(&7), "seeds {seed}, {seed2}: the clone is back");
        }
    }
    assert!(cases > 0, "no crash cut the slot short");
}

/// Replay once dropped a `Write` whose data did not survive but left its record in the
/// journal, while the next run reused both its slots and its VBAs. When the slots later
/// held data with the same crcs (zeroes here), a later replay applied the old record:
/// block 1 then mapped a VBA that a later write to block 5 reused, and read block 5's data.
/// (Replay now truncates there and records it in a `Truncate` record.)
#[test]
fn a_write_dropped_at_replay_never_comes_back() {
    for seed in 0..40 {
        let mut engine = Engine::create(SimFile::new());
        engine.create_volume(1, 8 * B).unwrap();
        engine.write(1, 0, &block(1, 0)).unwrap();
        engine.flush().unwrap();
        engine.write(1, 1, &[0u8; BLOCK_BYTES]).unwrap();
        let mut engine = crash_and_reopen(engine, seed);
        engine.write(1, 5, &block(9, 0)).unwrap();
        engine.write(1, 6, &block(10, 0)).unwrap();
        engine.flush().unwrap();
        let engine = crash_and_reopen(engine, 0);
        let zeroes = vec![0u8; BLOCK_BYTES];
        assert_eq!(read_block(&engine, 1, 1).unwrap(), zeroes, "seed {seed}: block 1");
        let vbas = engine.vbas_of(1);
        let distinct: BTreeSet<u64> = vbas.iter().copied().collect();
        assert_eq!(distinct.len(), vbas.len(), "seed {seed}: a VBA mapped twice: {vbas:?}");
    }
}

/// Blocks of the volume in the batch tests.
const BATCH_VOLUME_BLOCKS: u64 = 48;

/// Reads all of volume 1 as (write id, block index) per block, `None` for a hole.
fn contents(engine: &Engine<SimFile>) -> Vec<Option<(u64, u64)>> {
    read_view(engine, 1)
        .into_iter()
        .map(|v| match v {
            Some(Val::Data(id, i)) => Some((id, i)),
            None => None,
            other => panic!("only data was written: {other:?}"),
        })
        .collect()
}

/// Batches of (lba, blocks): some overlap, some longer than one record (`RUN_BLOCKS_MAX`),
/// enough of them to fill segments and journal slots.
fn batches() -> impl Strategy<Value = Vec<Vec<(u64, u64)>>> {
    let entry = (0..BATCH_VOLUME_BLOCKS).prop_flat_map(|lba| {
        let room = BATCH_VOLUME_BLOCKS - lba;
        (Just(lba), prop_oneof![4 => 1..=room.min(3), 1 => 1..=room])
    });
    proptest::collection::vec(proptest::collection::vec(entry, 1..24), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// `write_many` reads back (and after a reopen replays) exactly as the same writes one
    /// by one, and as a model.
    #[test]
    fn a_batch_is_the_same_writes_one_by_one(batches in batches()) {
        let new = || {
            let mut engine = Engine::create(SimFile::new());
            engine.create_volume(1, BATCH_VOLUME_BLOCKS * B).unwrap();
            engine
        };
        let (mut batched, mut single) = (new(), new());
        let mut model = vec![None; BATCH_VOLUME_BLOCKS as usize];
        let mut id = 0;
        for batch in batches {
            let data: Vec<(u64, Vec<u8>)> = batch
                .iter()
                .map(|(lba, n)| {
                    id += 1;
                    for i in 0..*n {
                        model[(lba + i) as usize] = Some((id, i));
                    }
                    (*lba, blocks(id, *n))
                })
                .collect();
            let writes: Vec<(u64, &[u8])> = data.iter().map(|(lba, d)| (*lba, &d[..])).collect();
            batched.write_many(1, &writes).unwrap();
            for (lba, data) in &writes {
                single.write(1, *lba, data).unwrap();
            }
            batched.validate().unwrap();
            prop_assert_eq!(&contents(&batched), &model);
            prop_assert_eq!(contents(&single), contents(&batched));
            prop_assert_eq!(single.usage(1).unwrap(), batched.usage(1).unwrap());
        }
        // A process crash (the page cache kept), then a power loss after a flush.
        let batched = Engine::open(batched.into_file()).unwrap();
        prop_assert_eq!(&contents(&batched), &model);
        let mut batched = batched;
        batched.flush().unwrap();
        let batched = crash_and_reopen(batched, id);
        prop_assert_eq!(&contents(&batched), &model);
    }
}

/// The writes of one `write_many`.
type Batch<'a> = Vec<(u64, &'a [u8])>;

#[test]
fn a_batch_with_one_bad_entry_is_refused_whole() {
    let mut engine = Engine::create(SimFile::new());
    engine.create_volume(1, 8 * B).unwrap();
    engine.create_volume(2, 8 * B).unwrap();
    engine.write(1, 0, &blocks(1, 8)).unwrap();
    engine.snapshot(1, 3).unwrap();
    let (good, long) = (blocks(2, 2), blocks(3, 3));
    let size = 8 * B;
    let refusals: Vec<(u64, EngineError, Batch)> = vec![
        (1, EngineError::OutOfRange { lba: 6, blocks: 3, size }, vec![(0, &good), (6, &long)]),
        (1, EngineError::OutOfRange { lba: 8, blocks: 2, size }, vec![(8, &good), (0, &good)]),
        (1, EngineError::Unaligned, vec![(0, &good), (2, &good[..100])]),
        (1, EngineError::Unaligned, vec![(0, &good), (2, &[])]),
        (3, EngineError::ReadOnly(3), vec![(0, &good)]),
        (9, EngineError::NotFound(9), vec![(0, &good)]),
    ];
    for (volume, want, writes) in refusals {
        let allocated = engine.log_allocated();
        assert_refused(&mut engine, want, |e| e.write_many(volume, &writes));
        assert_eq!(engine.log_allocated(), allocated, "no slot handed out");
        assert_eq!(
            read_view(&engine, 1),
            (0..8).map(|i| Some(Val::Data(1, i))).collect::<Vec<_>>()
        );
    }
    // An empty batch writes nothing and is no error.
    assert_changes_nothing(&mut engine, |e| e.write_many(1, &[]));
}

/// Asserts that `op` succeeds and changes nothing.
fn assert_changes_nothing(
    engine: &mut Engine<SimFile>,
    op: impl FnOnce(&mut Engine<SimFile>) -> Result<(), EngineError>,
) {
    let state = |e: &Engine<SimFile>| (e.log_allocated(), e.file().unsynced_writes());
    let before = state(engine);
    op(engine).unwrap();
    assert_eq!(state(engine), before);
}
