//! The store a node serves from: the [`Engine`] over `DIR/log`, behind the
//! `strata_io::Store` and `BlockVolume` traits the NBD front end speaks, plus snapshots,
//! clones, rollback and accounting for the node's API.
//!
//! Concurrency: one `RwLock` around the engine. Reads (and extents) share it; writes,
//! trims, zeroes and metadata changes hold it exclusively while they append to the log
//! (a `pwrite` into the page cache); a batch of writes (`write_many`) holds it once for
//! all of them (a `pwritev` of their blocks per stretch of consecutive log slots, usually
//! one, and one write of the journal slot, plus one per slot it fills). A sync holds it
//! only to seal the open journal slot; the `fdatasync` runs without it, so writes continue
//! while a flush waits on the device, and every write completed before the seal is
//! covered by the sync.
//!
//! Byte ranges that do not fall on 4 KiB blocks are read-modify-written under the
//! exclusive lock, so two unaligned writers of one block never lose each other's bytes. A
//! batch with such a range is written one write at a time, under one hold of the lock.
//!
//! Maintenance: a background thread cleans segments that are mostly dead (a few hundred
//! blocks per lock hold, so I/O goes on between steps) and writes a checkpoint
//! (`DIR/checkpoint`, replaced atomically) when the log has grown by
//! [`CHECKPOINT_BYTES`] or the cleaner emptied segments; then it hands the emptied
//! segments back to the allocator, and punches free segments beyond a small reserve so
//! their space returns to the file system. A clean shutdown checkpoints too, so a
//! restart replays almost nothing.
//!
//! Invariants:
//! 1. A failed `fdatasync`, or a failed write of the log after the engine may have taken a
//!    record in, makes the store refuse every later write and sync until it is reopened
//!    ([`StoreError::Failed`]): its memory may no longer match what replay would rebuild,
//!    and the kernel may have dropped unsynced pages (fsyncgate).
//! 2. `create_volume`, `remove_volume` and every snapshot operation are durable when they
//!    return (they sync).

use crate::engine::{Engine, EngineError, Usage, ViewInfo, BLOCK_BYTES};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use strata_io::{check_range, BlockVolume, Extent, Store, StoreError, VolumeId, ZeroMode};
use strata_types::{Reserve, RESERVE_DEFAULT};

const BLOCK: u64 = BLOCK_BYTES as u64;

/// The file the log lives in, under the store's directory.
pub const LOG_FILE: &str = "log";
/// The checkpoint file, under the store's directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Log growth after which the maintenance thread writes a checkpoint (and so the most
/// log a restart replays).
pub const CHECKPOINT_BYTES: u64 = 1 << 30;
/// The cleaner runs while more than this share of the log's segments in use is dead
/// (and at least [`CLEAN_DEAD_MIN_BYTES`]).
pub const CLEAN_DEAD_SHARE: f64 = 0.25;
/// Dead space below which the cleaner does not run.
pub const CLEAN_DEAD_MIN_BYTES: u64 = 256 << 20;
/// Segments with at most this many live blocks (of 8192) are cleaned.
pub const CLEAN_LIVE_MAX: u32 = 2048;
/// Free segments the maintenance thread keeps written (zeroes) ahead of need.
pub const PREPARED_SEGMENTS: usize = 2;
/// Free segments kept allocated in the file for reuse; more are punched.
pub const FREE_SEGMENTS_KEPT: usize = 8;
/// Writes up to this size are done inline by the caller when the lock is free.
const INLINE_WRITE_BYTES_MAX: usize = 1 << 20;
/// Batches of writes up to this size in all are done inline when the lock is free.
const INLINE_BATCH_BYTES_MAX: usize = 4 << 20;
/// Blocks the cleaner moves per hold of the lock.
const CLEAN_STEP_BLOCKS: usize = 512;
/// Free file-system bytes below which the cleaner does not move blocks: a step's blocks
/// and records, with room to spare (the reserve is meant to hold far more).
const CLEAN_ROOM_BYTES: u64 = 4 * CLEAN_STEP_BLOCKS as u64 * BLOCK;
/// Snapshot deletes whose space the store follows until the log reuses it (the oldest
/// is forgotten beyond this).
pub const RECLAIMS_TRACKED: usize = 64;

/// A node's log-structured store.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    engine: RwLock<Engine<Arc<File>>>,
    file: Arc<File>,
    failed: AtomicBool,
    /// One checkpoint at a time; holds the log allocation count at the last one.
    checkpointing: std::sync::Mutex<u64>,
    /// Counters for monitoring ([`LogStore::stats`]).
    counters: Counters,
    /// The latest snapshot deletes' space not yet reused, oldest first (at most
    /// [`RECLAIMS_TRACKED`]; not kept across a restart).
    reclaims: std::sync::Mutex<std::collections::VecDeque<Reclaim>>,
    /// The file system's space and the reserve rule ([`LogStore::space`]).
    space: SpaceState,
}

/// What the store knows of its file system's space (updated by [`Shared::measure`]).
struct SpaceState {
    /// The reserve asked for (see [`LogStore::set_reserve`]).
    reserve: std::sync::Mutex<Reserve>,
    /// Bytes of the file system, free bytes and the reserve in bytes, as last measured.
    size_bytes: AtomicU64,
    free_bytes: AtomicU64,
    reserve_bytes: AtomicU64,
    /// The file system's own free bytes (`free_bytes` counts the log's free segments too).
    fs_free_bytes: AtomicU64,
    /// Whether the latest client write was refused for want of space.
    refusing: AtomicBool,
    /// Whether the last measure found the store nearly full (to log the changes).
    was_nearly_full: AtomicBool,
    /// Client writes refused for want of space since the store was opened.
    refused_writes: AtomicU64,
}

impl SpaceState {
    fn new() -> SpaceState {
        SpaceState {
            reserve: std::sync::Mutex::new(RESERVE_DEFAULT),
            size_bytes: AtomicU64::new(0),
            free_bytes: AtomicU64::new(0),
            reserve_bytes: AtomicU64::new(0),
            fs_free_bytes: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            was_nearly_full: AtomicBool::new(false),
            refused_writes: AtomicU64::new(0),
        }
    }
}

/// A store's file system space and its reserve ([`LogStore::space`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Space {
    /// Bytes of the file system the store lives on.
    pub size_bytes: u64,
    /// Bytes free for data, as last measured (every 0.5 s): free on the file system (for
    /// unprivileged users) plus the log's free segments kept for reuse.
    pub free_bytes: u64,
    /// Bytes client writes leave free: the store's own work, deletes and the metadata
    /// service take them.
    pub reserve_bytes: u64,
    /// Free space is below the reserve plus the larger of the reserve and a tenth of the
    /// file system (at the default reserve of 5 %, 85 % used, Ceph's `nearfull`): the
    /// store cleans eagerly and gives every free segment back to the file system.
    pub nearly_full: bool,
    /// The latest client write was refused (ENOSPC) for want of space.
    pub full: bool,
    /// Client writes refused for want of space since the store was opened.
    pub refused_writes: u64,
}

/// The space a deleted snapshot held alone, by segment, until each segment is freed.
struct Reclaim {
    snapshot: u64,
    freed_blocks: u64,
    /// Segment -> blocks of it the delete made dead; a segment leaves when a checkpoint
    /// frees it (the cleaner moved its other blocks out, or they died too).
    waiting: std::collections::HashMap<u64, u64>,
}

/// How far the log has reused the space a deleted snapshot held alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimStatus {
    /// The snapshot's id.
    pub snapshot: u64,
    /// Bytes the delete made dead (what the snapshot held alone).
    pub freed_bytes: u64,
    /// Of those, bytes in segments not freed yet.
    pub waiting_bytes: u64,
    /// Of those, bytes in segments the cleaner leaves as they are: more than
    /// [`CLEAN_LIVE_MAX`] of their blocks still live, or the log writing into them.
    pub held_bytes: u64,
}

/// Upper bounds of the buckets of [`StoreStats::journal_batch_blocks`]: log blocks (data
/// and journal) a journal sync made durable.
pub const BATCH_BUCKETS: [u64; 7] = [1, 4, 16, 64, 256, 1024, 4096];

/// What the store has done since it was opened, counted as it goes.
#[derive(Default)]
struct Counters {
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    synced_blocks: AtomicU64,
    /// The log's allocation count at the latest sync's seal.
    synced_through: AtomicU64,
    /// Syncs by batch size: one per bucket of [`BATCH_BUCKETS`], then the rest.
    batches: [AtomicU64; BATCH_BUCKETS.len() + 1],
    cleaned_blocks: AtomicU64,
    cleaned_segments: AtomicU64,
    checkpoints: AtomicU64,
}

impl Counters {
    /// Counts a journal sync that sealed the log at allocation count `allocated`.
    fn synced(&self, allocated: u64, took: std::time::Duration) {
        let before = self.synced_through.fetch_max(allocated, Ordering::Relaxed);
        let blocks = allocated.saturating_sub(before);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.synced_blocks.fetch_add(blocks, Ordering::Relaxed);
        let bucket = BATCH_BUCKETS.iter().position(|&le| blocks <= le);
        self.batches[bucket.unwrap_or(BATCH_BUCKETS.len())].fetch_add(1, Ordering::Relaxed);
    }
}

/// A store's space and activity, for monitoring. Counters count since the store was
/// opened.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Bytes of the log's segments in use.
    pub log_bytes: u64,
    /// Bytes of live data (blocks some volume or snapshot maps).
    pub live_bytes: u64,
    /// Bytes of the segments in use that hold no live data (what the cleaner can free).
    pub dead_bytes: u64,
    /// Segments in use.
    pub segments: u64,
    /// The size of a segment.
    pub segment_bytes: u64,
    /// Journal syncs (`fdatasync` of the log for flushes and metadata changes).
    pub journal_syncs: u64,
    /// Seconds those syncs took in all (sealing, `fdatasync`, noting it).
    pub journal_sync_seconds: f64,
    /// Bytes of log those syncs made durable.
    pub journal_synced_bytes: u64,
    /// Syncs by the log blocks each made durable: the count for each bucket of
    /// [`BATCH_BUCKETS`] (at most that many blocks), then for larger ones.
    pub journal_batch_blocks: [u64; BATCH_BUCKETS.len() + 1],
    /// Bytes of live data the cleaner moved out of mostly-dead segments.
    pub cleaned_bytes: u64,
    /// Segments the cleaner emptied.
    pub cleaned_segments: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// A volume or snapshot of a [`LogStore`].
pub struct LogVolume {
    shared: Arc<Shared>,
    id: u64,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Engine<Arc<File>>> {
        self.engine.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Engine<Arc<File>>>, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed);
        }
        Ok(self.engine.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// The engine locked for a write, or `None` if another thread holds the lock.
    fn try_write(&self) -> Result<Option<RwLockWriteGuard<'_, Engine<Arc<File>>>>, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed);
        }
        match self.engine.try_write() {
            Ok(engine) => Ok(Some(engine)),
            Err(std::sync::TryLockError::WouldBlock) => Ok(None),
            Err(std::sync::TryLockError::Poisoned(e)) => Ok(Some(e.into_inner())),
        }
    }

    /// Maps an engine error; an I/O error of a change fails the store (invariant 1).
    fn fail(&self, e: EngineError) -> StoreError {
        // The store's change of state is logged once; each failed request is logged
        // where a front end answers it (with its volume and offset).
        if let EngineError::Io(_) = e {
            if !self.failed.swap(true, Ordering::AcqRel) {
                tracing::error!(dir = %self.dir.display(), "the store's log failed: {e}; \
                    refusing writes until restart");
            }
        }
        store_error(e)
    }

    /// Measures the file system's space (`statvfs`) with the engine locked, so that no
    /// slot is handed out between the measure and the engine learning it.
    fn measure(&self, engine: &mut Engine<Arc<File>>) {
        let Ok(st) = rustix::fs::statvfs(&self.dir) else { return };
        let size = st.f_blocks.saturating_mul(st.f_frsize);
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let reserve = self.space.reserve.lock().unwrap_or_else(|e| e.into_inner()).bytes_of(size);
        engine.set_space(Some((free, reserve)));
        self.space.size_bytes.store(size, Ordering::Relaxed);
        self.space.fs_free_bytes.store(free, Ordering::Relaxed);
        // Free segments kept for reuse (or prepared) are free for data too: counted, the
        // nearly-full state does not flip each time they are punched or prepared.
        let kept = engine.backed_free_bytes();
        self.space.free_bytes.store(free.saturating_add(kept), Ordering::Relaxed);
        // Said once each way (leaving it 2 % of the file system past the line, so a store
        // at the line does not say it every pass): an operator has time to act before
        // writes are refused.
        let was = self.space.was_nearly_full.load(Ordering::Relaxed);
        let margin = if was { size / 50 } else { 0 };
        let line = reserve + reserve.max(size / 10) + margin;
        let nearly_full = size > 0 && free.saturating_add(kept) < line;
        if self.space.was_nearly_full.swap(nearly_full, Ordering::Relaxed) != nearly_full {
            let free = strata_types::format_size(free.saturating_add(kept));
            let reserve = strata_types::format_size(reserve);
            if nearly_full {
                tracing::warn!(dir = %self.dir.display(), "the disk is nearly full: {free} \
                    free; client writes get ENOSPC once only the {reserve} reserve is left");
            } else {
                tracing::info!(dir = %self.dir.display(), "the disk is no longer nearly full: \
                    {free} free");
            }
        }
        self.space.reserve_bytes.store(reserve, Ordering::Relaxed);
    }

    /// Runs a client write `f`. If the engine refuses it for want of space, the free
    /// segments kept for reuse are punched and the space measured again (the cleaner or
    /// a delete may have freed some, or the file already held the slots written since)
    /// and `f` tried once more; a second refusal is
    /// ENOSPC, which fails nothing: the write changed nothing and the store serves on.
    fn client_write(
        &self,
        engine: &mut Engine<Arc<File>>,
        mut f: impl FnMut(&mut Engine<Arc<File>>) -> Result<(), EngineError>,
    ) -> Result<(), StoreError> {
        let result = match f(engine) {
            Err(EngineError::Full { .. }) => {
                self.make_room(engine);
                f(engine)
            }
            other => other,
        };
        match result {
            Ok(()) => {
                if self.space.refusing.load(Ordering::Relaxed)
                    && self.space.refusing.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(dir = %self.dir.display(), "space was freed: client writes \
                        are accepted again");
                }
                Ok(())
            }
            Err(e @ EngineError::Full { .. }) => {
                self.space.refused_writes.fetch_add(1, Ordering::Relaxed);
                if !self.space.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), "the disk is full up to its \
                        reserve: client writes get ENOSPC ({e}); trim, or delete volumes or \
                        snapshots, to free space (reads, trims and deletes go on)");
                }
                Err(StoreError::NoSpace)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Gives the free segments kept for reuse back to the file system (fallocate, no data
    /// written: the measure does not see their space otherwise) and measures again.
    fn make_room(&self, engine: &mut Engine<Arc<File>>) {
        let surplus = engine.take_surplus_free(0);
        if Engine::punch(engine.file(), &surplus).is_ok() {
            engine.return_punched(&surplus);
        } else {
            engine.return_free(&surplus);
        }
        self.measure(engine);
    }

    /// Whether free space is below the reserve plus the larger of the reserve and a
    /// tenth of the file system (see [`Space::nearly_full`]).
    fn nearly_full(&self) -> bool {
        let size = self.space.size_bytes.load(Ordering::Relaxed);
        let reserve = self.space.reserve_bytes.load(Ordering::Relaxed);
        let free = self.space.free_bytes.load(Ordering::Relaxed);
        size > 0 && free < reserve + reserve.max(size / 10)
    }

    fn sync(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let (through, allocated) = {
            let mut engine = self.write()?;
            (engine.seal().map_err(|e| self.fail(e))?, engine.log_allocated())
        };
        if let Err(e) = self.file.sync_data() {
            if !self.failed.swap(true, Ordering::AcqRel) {
                tracing::error!(dir = %self.dir.display(), "fdatasync of the log failed: {e}; \
                    refusing writes until restart");
            }
            return Err(StoreError::io("fdatasync the log")(e));
        }
        self.write()?.synced(through).map_err(|e| self.fail(e))?;
        self.counters.synced(allocated, started.elapsed());
        Ok(())
    }

    /// Runs a metadata change, then syncs it.
    fn change(
        &self,
        f: impl FnOnce(&mut Engine<Arc<File>>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let mut engine = self.write().map_err(|e| EngineError::Io(std::io::Error::other(e)))?;
        f(&mut engine).inspect_err(|e| {
            if let EngineError::Io(_) = e {
                self.failed.store(true, Ordering::Release);
            }
        })?;
        drop(engine);
        self.sync().map_err(|e| EngineError::Io(std::io::Error::other(e)))
    }
}

/// The maintenance thread: runs until the store is dropped.
fn maintenance(store: std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Some(shared) = store.upgrade() else { return };
        if shared.failed.load(Ordering::Acquire) {
            continue;
        }
        let store = LogStore { shared };
        if let Err(e) = store.maintain(4, false) {
            tracing::warn!("store maintenance failed: {e}");
        }
    }
}

/// Whether the cleaner should run: enough of the log is dead (see [`CLEAN_DEAD_SHARE`]).
fn cleaner_due(engine: &Engine<Arc<File>>) -> bool {
    let dead = engine.dead_blocks() * BLOCK;
    dead >= CLEAN_DEAD_MIN_BYTES && dead as f64 > engine.log_bytes() as f64 * CLEAN_DEAD_SHARE
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new file
/// (write a temporary file, fsync, rename, fsync the directory).
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn store_error(e: EngineError) -> StoreError {
    match e {
        EngineError::Io(e) => StoreError::io("write the log")(e),
        EngineError::Corrupt { .. } => StoreError::Corrupt { message: e.to_string() },
        EngineError::OutOfRange { lba, blocks, size } => {
            StoreError::OutOfRange { offset: lba * BLOCK, length: blocks * BLOCK, size }
        }
        EngineError::ReadOnly(_) => StoreError::ReadOnly,
        EngineError::Full { .. } => StoreError::NoSpace,
        EngineError::NotFound(id) => StoreError::NotFound { id: VolumeId(id) },
        e => StoreError::Io { op: "store", source: std::io::Error::other(e.to_string()) },
    }
}

impl LogStore {
    /// Opens the store in `dir` (creating it if empty), replaying its log.
    pub fn open(dir: &Path) -> Result<LogStore, EngineError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let exists = path.exists();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        );
        let engine = Self::open_engine(dir, file.clone(), exists, true)?;
        if !exists {
            File::open(dir)?.sync_all()?;
        }
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            engine: RwLock::new(engine),
            file,
            failed: AtomicBool::new(false),
            checkpointing: std::sync::Mutex::new(0),
            counters: Counters::default(),
            reclaims: std::sync::Mutex::default(),
            space: SpaceState::new(),
        });
        shared.measure(&mut shared.write().expect("not failed"));
        let store = LogStore { shared };
        // Which free segments were punched is not kept across a restart: punch them all
        // (a hole punched again costs nothing), so the space counted free is.
        if let Err(e) = store.punch_free(0) {
            tracing::warn!("free unused segments: {e}");
        }
        let weak = Arc::downgrade(&store.shared);
        std::thread::Builder::new().name("strata-maint".into()).spawn(move || maintenance(weak))?;
        Ok(store)
    }

    fn open_engine(
        dir: &Path,
        file: Arc<File>,
        exists: bool,
        writable: bool,
    ) -> Result<Engine<Arc<File>>, EngineError> {
        let checkpoint = match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if !writable {
            return Engine::inspect(file, checkpoint.as_deref());
        }
        match checkpoint {
            Some(bytes) => Engine::open_checkpoint(file, &bytes),
            None if exists && file.metadata()?.len() > 0 => Engine::open(file),
            None => Ok(Engine::create(file)),
        }
    }

    /// Cleans up to `segments` mostly-dead segments, then writes a checkpoint if the log
    /// grew by [`CHECKPOINT_BYTES`], the cleaner moved blocks, or `force`. Returns the
    /// blocks moved. The maintenance thread calls it; so do shutdown and tests.
    ///
    /// On a nearly full store ([`Space::nearly_full`]) the cleaner runs whenever a
    /// segment can be emptied (each frees at least three quarters of a segment), as long
    /// as the file system has room for its moves; every free segment is punched (so the
    /// file system, and the reserve rule, see its space); none is prepared.
    pub fn maintain(&self, segments: usize, force: bool) -> Result<usize, StoreError> {
        self.shared.measure(&mut *self.shared.write()?);
        let short = self.shared.nearly_full();
        let (candidates, emptied) = {
            let engine = self.shared.read();
            // Nearly full: due as soon as a segment can be emptied, or is empty already (a
            // deleted volume's own segments wait for nothing but a checkpoint).
            let short_due = short
                && (!engine.clean_candidates(CLEAN_LIVE_MAX).is_empty()
                    || !engine.empty_segments().is_empty());
            if force || short_due || cleaner_due(&engine) {
                // Segments already empty need no move, only a checkpoint: without one
                // the space of a deleted snapshot written in one go (whole segments of
                // its own) would wait for the next 1 GiB of log.
                (engine.clean_candidates(CLEAN_LIVE_MAX), !engine.empty_segments().is_empty())
            } else {
                (Vec::new(), false)
            }
        };
        let mut moved = 0;
        'segments: for segment in candidates.into_iter().take(segments) {
            loop {
                let mut engine = self.shared.write()?;
                // The cleaner moves before it frees: never into the file system's last
                // bytes (a failed log write would fail the store).
                if engine.free_bytes().is_some_and(|f| f < CLEAN_ROOM_BYTES) {
                    tracing::debug!("the cleaner waits for room to move blocks into");
                    break 'segments;
                }
                let n = engine
                    .clean_step(segment, CLEAN_STEP_BLOCKS)
                    .map_err(|e| self.shared.fail(e))?;
                drop(engine);
                moved += n;
                self.shared.counters.cleaned_blocks.fetch_add(n as u64, Ordering::Relaxed);
                if n == 0 {
                    break;
                }
            }
            self.shared.counters.cleaned_segments.fetch_add(1, Ordering::Relaxed);
        }
        let grown = {
            let last = *self.shared.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.shared.read().log_allocated();
            now.saturating_sub(last) * BLOCK >= CHECKPOINT_BYTES
        };
        if force || moved > 0 || emptied || grown {
            self.checkpoint()?;
        }
        if short {
            self.punch_free(0)?;
        } else {
            self.prepare_segments()?;
        }
        Ok(moved)
    }

    /// Keeps [`PREPARED_SEGMENTS`] free segments whose blocks the file system has already
    /// allocated: appending into new file space makes every `fdatasync` commit the file
    /// system's journal too (measured: 5.3 k vs 8.5 k syncs/s here).
    fn prepare_segments(&self) -> Result<(), StoreError> {
        // Never into the reserve: a prepared segment takes its space from the file system.
        let fs_free = self.shared.space.fs_free_bytes.load(Ordering::Relaxed);
        let reserve = self.shared.space.reserve_bytes.load(Ordering::Relaxed);
        if fs_free < reserve + 2 * crate::log::SEGMENT_SLOTS * BLOCK {
            return Ok(());
        }
        let Some(segment) = self.shared.write()?.take_fresh(PREPARED_SEGMENTS) else {
            return Ok(());
        };
        let prepared = Engine::prepare(&*self.shared.file, segment);
        self.shared.write()?.prepared(segment, prepared.is_ok());
        prepared.map_err(StoreError::io("prepare a segment"))
    }

    /// Writes a checkpoint: the log is synced through the captured state first, the
    /// checkpoint file replaced atomically, then the segments it found empty are reused;
    /// free segments beyond [`FREE_SEGMENTS_KEPT`] are punched (their space returns to
    /// the file system).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut last = self.shared.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let (checkpoint, allocated) = {
            let mut engine = self.shared.write()?;
            (engine.checkpoint().map_err(|e| self.shared.fail(e))?, engine.log_allocated())
        };
        self.shared.file.sync_data().map_err(|e| {
            self.shared.failed.store(true, Ordering::Release);
            StoreError::io("fdatasync the log")(e)
        })?;
        write_atomically(&self.shared.dir, CHECKPOINT_FILE, &checkpoint.bytes)
            .map_err(StoreError::io("write the checkpoint"))?;
        self.shared.write()?.release_segments(&checkpoint.empty_segments);
        {
            let mut reclaims = self.shared.reclaims.lock().unwrap_or_else(|e| e.into_inner());
            for r in reclaims.iter_mut() {
                r.waiting.retain(|s, _| !checkpoint.empty_segments.contains(s));
            }
        }
        // Beyond a reserve of free segments, give the space back to the file system.
        let keep = if self.shared.nearly_full() { 0 } else { FREE_SEGMENTS_KEPT };
        self.punch_free(keep)?;
        *last = allocated;
        self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            bytes = checkpoint.bytes.len(),
            freed = checkpoint.empty_segments.len(),
            "checkpoint written"
        );
        Ok(())
    }

    /// Punches the free segments beyond the `keep` lowest (those not punched already):
    /// their space returns to the file system.
    fn punch_free(&self, keep: usize) -> Result<(), StoreError> {
        let surplus = self.shared.write()?.take_surplus_free(keep);
        if surplus.is_empty() {
            return Ok(());
        }
        let punched = Engine::punch(&*self.shared.file, &surplus);
        let mut engine = self.shared.write()?;
        if punched.is_ok() {
            engine.return_punched(&surplus);
            // The space is the file system's again: writes refused may go on now.
            self.shared.measure(&mut engine);
        } else {
            engine.return_free(&surplus);
        }
        punched.map_err(StoreError::io("free unused segments"))
    }

    /// Sets the space client writes leave free on the file system (the default is
    /// [`RESERVE_DEFAULT`]), in effect at once.
    pub fn set_reserve(&self, reserve: Reserve) {
        *self.shared.space.reserve.lock().unwrap_or_else(|e| e.into_inner()) = reserve;
        if let Ok(mut engine) = self.shared.write() {
            self.shared.measure(&mut engine);
        }
    }

    /// The file system's space as last measured, the reserve, and whether client writes
    /// are being refused.
    pub fn space(&self) -> Space {
        let s = &self.shared.space;
        Space {
            size_bytes: s.size_bytes.load(Ordering::Relaxed),
            free_bytes: s.free_bytes.load(Ordering::Relaxed),
            reserve_bytes: s.reserve_bytes.load(Ordering::Relaxed),
            nearly_full: self.shared.nearly_full(),
            full: s.refusing.load(Ordering::Relaxed),
            refused_writes: s.refused_writes.load(Ordering::Relaxed),
        }
    }

    /// Opens the store in `dir` for checking only: the log is replayed from a read-only
    /// file, so nothing on disk changes (every write would fail).
    pub fn open_read_only(dir: &Path) -> Result<LogStore, EngineError> {
        let file = Arc::new(File::open(dir.join(LOG_FILE))?);
        let engine = Self::open_engine(dir, file.clone(), true, false)?;
        let shared = Shared {
            dir: dir.to_owned(),
            engine: RwLock::new(engine),
            file,
            failed: AtomicBool::new(true),
            checkpointing: std::sync::Mutex::new(0),
            counters: Counters::default(),
            reclaims: std::sync::Mutex::default(),
            space: SpaceState::new(),
        };
        Ok(LogStore { shared: Arc::new(shared) })
    }

    /// A volume or snapshot by id.
    pub fn view(&self, id: u64) -> Result<Arc<LogVolume>, EngineError> {
        self.shared.read().size(id)?;
        Ok(Arc::new(LogVolume { shared: self.shared.clone(), id }))
    }

    /// Takes snapshot `snapshot` of `volume` (durable on return).
    pub fn snapshot(&self, volume: u64, snapshot: u64) -> Result<(), EngineError> {
        self.shared.change(|e| e.snapshot(volume, snapshot))
    }

    /// Makes volume `clone` from snapshot `source` (durable on return).
    pub fn clone_snapshot(&self, source: u64, clone: u64) -> Result<(), EngineError> {
        self.shared.change(|e| e.clone_snapshot(source, clone))
    }

    /// Returns `volume` to its snapshot `snapshot` (durable on return).
    pub fn rollback(&self, volume: u64, snapshot: u64) -> Result<(), EngineError> {
        self.shared.change(|e| e.rollback(volume, snapshot))
    }

    /// Deletes snapshot `snapshot` (durable on return). The blocks only it held are
    /// dead at once; their space is reused when the cleaner and a checkpoint free their
    /// segments, which [`LogStore::reclaims`] follows.
    pub fn delete_snapshot(&self, snapshot: u64) -> Result<(), EngineError> {
        // Held across the change, so no checkpoint frees a segment between the delete
        // and its record here (the order reclaims, then engine, as `reclaims` takes them).
        let mut reclaims = self.shared.reclaims.lock().unwrap_or_else(|e| e.into_inner());
        let mut live = None;
        self.shared.change(|e| {
            let before = e.live_by_segment();
            e.delete_snapshot(snapshot)?;
            live = Some((before, e.live_by_segment()));
            Ok(())
        })?;
        let (before, after) = live.expect("set by the change");
        let waiting: std::collections::HashMap<u64, u64> = before
            .iter()
            .filter_map(|(s, n)| {
                let dead = u64::from(n.saturating_sub(after.get(s).copied().unwrap_or(0)));
                (dead > 0).then_some((*s, dead))
            })
            .collect();
        let freed_blocks = waiting.values().sum();
        if reclaims.len() >= RECLAIMS_TRACKED {
            reclaims.pop_front();
        }
        reclaims.push_back(Reclaim { snapshot, freed_blocks, waiting });
        Ok(())
    }

    /// The latest snapshot deletes (at most [`RECLAIMS_TRACKED`], since the store was
    /// opened), oldest first, with the space each made dead and how much of it the log
    /// has not reused yet.
    pub fn reclaims(&self) -> Vec<ReclaimStatus> {
        let reclaims = self.shared.reclaims.lock().unwrap_or_else(|e| e.into_inner());
        let engine = self.shared.read();
        reclaims
            .iter()
            .map(|r| {
                let held = |s: &u64| engine.live_blocks(*s) > CLEAN_LIVE_MAX || engine.is_busy(*s);
                ReclaimStatus {
                    snapshot: r.snapshot,
                    freed_bytes: r.freed_blocks * BLOCK,
                    waiting_bytes: r.waiting.values().sum::<u64>() * BLOCK,
                    held_bytes: r
                        .waiting
                        .iter()
                        .filter(|(s, _)| held(s))
                        .map(|(_, n)| n)
                        .sum::<u64>()
                        * BLOCK,
                }
            })
            .collect()
    }

    /// Whether the cleaner runs now: at least [`CLEAN_DEAD_MIN_BYTES`] and more than
    /// [`CLEAN_DEAD_SHARE`] of the log's segments in use are dead.
    pub fn cleaner_due(&self) -> bool {
        cleaner_due(&self.shared.read())
    }

    /// Removes a volume and its snapshots (durable on return).
    pub fn remove(&self, volume: u64) -> Result<(), EngineError> {
        self.shared.change(|e| e.remove_volume(volume))
    }

    /// What view `id` is.
    pub fn info(&self, id: u64) -> Result<ViewInfo, EngineError> {
        self.shared.read().info(id)
    }

    /// Blocks view `id` maps and holds alone.
    pub fn usage(&self, id: u64) -> Result<Usage, EngineError> {
        self.shared.read().usage(id)
    }

    /// The views made from snapshot `id`.
    pub fn dependents(&self, id: u64) -> Vec<u64> {
        self.shared.read().dependents(id)
    }

    /// Every volume and snapshot id.
    pub fn view_ids(&self) -> Vec<u64> {
        self.shared.read().view_ids()
    }

    /// Bytes of live data: blocks some volume or snapshot maps.
    pub fn live_bytes(&self) -> u64 {
        self.shared.read().vba_map_len() as u64 * BLOCK
    }

    /// Bytes the log occupies.
    pub fn log_bytes(&self) -> u64 {
        self.shared.read().log_bytes()
    }

    /// The store's space and activity (see [`StoreStats`]).
    pub fn stats(&self) -> StoreStats {
        let (log_bytes, live_bytes, dead_bytes) = {
            let engine = self.shared.read();
            (engine.log_bytes(), engine.vba_map_len() as u64 * BLOCK, engine.dead_blocks() * BLOCK)
        };
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let segment_bytes = crate::log::SEGMENT_SLOTS * BLOCK;
        StoreStats {
            log_bytes,
            live_bytes,
            dead_bytes,
            segments: log_bytes / segment_bytes,
            segment_bytes,
            journal_syncs: load(&c.syncs),
            journal_sync_seconds: load(&c.sync_nanos) as f64 / 1e9,
            journal_synced_bytes: load(&c.synced_blocks) * BLOCK,
            journal_batch_blocks: std::array::from_fn(|i| load(&c.batches[i])),
            cleaned_bytes: load(&c.cleaned_blocks) * BLOCK,
            cleaned_segments: load(&c.cleaned_segments),
            checkpoints: load(&c.checkpoints),
        }
    }

    /// Checks the store's structures (and with `data`, every live block's crc); returns
    /// a list of problems, empty when the store is consistent.
    pub fn check(&self, data: bool) -> Vec<String> {
        self.check_with(data, &mut |_, _| {})
    }

    /// As [`LogStore::check`], telling `progress` (bytes read, bytes to read) while it
    /// reads the blocks.
    pub fn check_with(&self, data: bool, progress: &mut dyn FnMut(u64, u64)) -> Vec<String> {
        let engine = self.shared.read();
        let mut problems = Vec::new();
        if let Err(e) = engine.validate() {
            problems.push(e);
        }
        if data {
            match engine.verify_data_with(progress) {
                Ok(bad) => {
                    for vba in bad {
                        problems.push(format!("VBA {vba}: the block fails its checksum"));
                    }
                }
                Err(e) => problems.push(format!("reading the log: {e}")),
            }
        }
        problems
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.shared.sync()
    }
}

impl Store for LogStore {
    fn create_volume(
        &self,
        id: VolumeId,
        size_bytes: u64,
    ) -> Result<Arc<dyn BlockVolume>, StoreError> {
        self.shared.change(|e| e.create_volume(id.0, size_bytes)).map_err(store_error)?;
        Ok(Arc::new(LogVolume { shared: self.shared.clone(), id: id.0 }))
    }

    fn open_volume(&self, id: VolumeId) -> Result<Arc<dyn BlockVolume>, StoreError> {
        Ok(self.view(id.0).map_err(store_error)?)
    }

    fn remove_volume(&self, id: VolumeId) -> Result<(), StoreError> {
        self.remove(id.0).map_err(store_error)
    }

    fn volume_ids(&self) -> Result<Vec<VolumeId>, StoreError> {
        let engine = self.shared.read();
        Ok(engine
            .view_ids()
            .into_iter()
            .filter(|id| matches!(engine.info(*id), Ok(ViewInfo::Volume { .. })))
            .map(VolumeId)
            .collect())
    }

    fn free_bytes(&self) -> Result<u64, StoreError> {
        let st = rustix::fs::statvfs(&self.shared.dir).map_err(StoreError::errno("statvfs"))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Whether `data` at `offset` is whole blocks (or nothing).
fn whole_blocks(offset: u64, data: &[u8]) -> bool {
    offset.is_multiple_of(BLOCK) && data.len().is_multiple_of(BLOCK_BYTES)
}

/// The blocks covering bytes `offset..offset+length` (length > 0): first block, count.
fn covering(offset: u64, length: u64) -> (u64, u64) {
    let first = offset / BLOCK;
    (first, (offset + length).div_ceil(BLOCK) - first)
}

impl LogVolume {
    fn size(&self) -> u64 {
        self.shared.read().size(self.id).unwrap_or(0)
    }

    /// Writes `data` at byte `offset` with the engine locked: whole blocks directly, a
    /// partial first or last block by reading it first.
    fn write_locked(
        &self,
        engine: &mut Engine<Arc<File>>,
        data: &[u8],
        offset: u64,
    ) -> Result<(), StoreError> {
        self.write_locked_with(engine, data, offset, false)
    }

    /// [`LogVolume::write_locked`]; `from_reserve`: the write may take the reserve (the
    /// partial edges of a trim or a zeroing, which work on a full store).
    fn write_locked_with(
        &self,
        engine: &mut Engine<Arc<File>>,
        data: &[u8],
        offset: u64,
        from_reserve: bool,
    ) -> Result<(), StoreError> {
        let write = |engine: &mut Engine<Arc<File>>, lba: u64, blocks: &[u8]| {
            if from_reserve {
                let id = self.id;
                engine.write_from_reserve(id, lba, blocks).map_err(|e| self.shared.fail(e))
            } else {
                self.shared.client_write(engine, |e| e.write(self.id, lba, blocks))
            }
        };
        let size = engine.size(self.id).map_err(store_error)?;
        check_range(offset, data.len() as u64, size)?;
        if data.is_empty() {
            return Ok(());
        }
        let (first, blocks) = covering(offset, data.len() as u64);
        if offset.is_multiple_of(BLOCK) && data.len().is_multiple_of(BLOCK_BYTES) {
            return write(engine, first, data);
        }
        let mut buf = vec![0u8; (blocks * BLOCK) as usize];
        let head = (offset - first * BLOCK) as usize;
        let end = head + data.len();
        if head != 0 {
            engine.read(self.id, first, &mut buf[..BLOCK_BYTES]).map_err(store_error)?;
        }
        if !end.is_multiple_of(BLOCK_BYTES) && (blocks > 1 || head == 0) {
            let last = buf.len() - BLOCK_BYTES;
            engine.read(self.id, first + blocks - 1, &mut buf[last..]).map_err(store_error)?;
        }
        buf[head..end].copy_from_slice(data);
        write(engine, first, &buf)
    }

    /// Writes each `(offset, data)` in order with the engine locked, every range checked
    /// first: all together when each is whole blocks, otherwise one by one.
    fn write_many_locked(
        &self,
        engine: &mut Engine<Arc<File>>,
        writes: &[(u64, &[u8])],
    ) -> Result<(), StoreError> {
        let size = engine.size(self.id).map_err(store_error)?;
        for (offset, data) in writes {
            check_range(*offset, data.len() as u64, size)?;
        }
        if !writes.iter().all(|(offset, data)| whole_blocks(*offset, data)) {
            return writes
                .iter()
                .try_for_each(|(offset, data)| self.write_locked(engine, data, *offset));
        }
        let blocks: Vec<(u64, &[u8])> = writes
            .iter()
            .filter(|(_, data)| !data.is_empty())
            .map(|(offset, data)| (offset / BLOCK, *data))
            .collect();
        self.shared.client_write(engine, |e| e.write_many(self.id, &blocks))
    }

    /// Reads bytes at `offset` with the engine locked: whole blocks directly, otherwise the
    /// covering blocks and a copy. With `nowait`, `Ok(false)` when the device would wait.
    fn read_locked(
        &self,
        engine: &Engine<Arc<File>>,
        buf: &mut [u8],
        offset: u64,
        nowait: bool,
    ) -> Result<bool, StoreError> {
        let size = engine.size(self.id).map_err(store_error)?;
        check_range(offset, buf.len() as u64, size)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let (first, blocks) = covering(offset, buf.len() as u64);
        if offset.is_multiple_of(BLOCK) && buf.len().is_multiple_of(BLOCK_BYTES) {
            return engine.read_with(self.id, first, buf, nowait).map_err(store_error);
        }
        let mut whole = vec![0u8; (blocks * BLOCK) as usize];
        if !engine.read_with(self.id, first, &mut whole, nowait).map_err(store_error)? {
            return Ok(false);
        }
        let head = (offset - first * BLOCK) as usize;
        buf.copy_from_slice(&whole[head..head + buf.len()]);
        Ok(true)
    }

    /// Zeroes `offset..offset+length`: whole blocks with `whole(lba, blocks)`, the partial
    /// edges by writing zero bytes.
    fn zero_range(
        &self,
        offset: u64,
        length: u64,
        whole: impl FnOnce(&mut Engine<Arc<File>>, u64, u64) -> Result<(), EngineError>,
    ) -> Result<(), StoreError> {
        let mut engine = self.shared.write()?;
        let size = engine.size(self.id).map_err(store_error)?;
        check_range(offset, length, size)?;
        if length == 0 {
            return Ok(());
        }
        let end = offset + length;
        let first_whole = offset.div_ceil(BLOCK);
        let end_whole = end / BLOCK;
        if first_whole >= end_whole {
            // Inside one block, or across one boundary with no whole block.
            let zeroes = vec![0u8; length as usize];
            return self.write_locked_with(&mut engine, &zeroes, offset, true);
        }
        if offset < first_whole * BLOCK {
            let zeroes = vec![0u8; (first_whole * BLOCK - offset) as usize];
            self.write_locked_with(&mut engine, &zeroes, offset, true)?;
        }
        if end > end_whole * BLOCK {
            let zeroes = vec![0u8; (end - end_whole * BLOCK) as usize];
            self.write_locked_with(&mut engine, &zeroes, end_whole * BLOCK, true)?;
        }
        whole(&mut engine, first_whole, end_whole - first_whole).map_err(|e| self.shared.fail(e))
    }
}

impl BlockVolume for LogVolume {
    fn size_bytes(&self) -> u64 {
        self.size()
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        let usage = self.shared.read().usage(self.id).map_err(store_error)?;
        Ok(usage.mapped_blocks * BLOCK)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.read_locked(&self.shared.read(), buf, offset, false).map(|_| ())
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool, StoreError> {
        // Neither the lock nor the device may make the caller (an async task) wait.
        let engine = match self.shared.engine.try_read() {
            Ok(engine) => engine,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        self.read_locked(&engine, buf, offset, true)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        let mut engine = self.shared.write()?;
        self.write_locked(&mut engine, data, offset)
    }

    fn try_write_at_nowait(&self, data: &[u8], offset: u64) -> Result<bool, StoreError> {
        // Whole blocks up to 1 MiB go into the page cache without reading the device, so
        // they are done inline when the lock is free; anything else (a read-modify-write,
        // a large write, a busy lock) goes to the blocking pool.
        if !whole_blocks(offset, data) || data.is_empty() || data.len() > INLINE_WRITE_BYTES_MAX {
            return Ok(false);
        }
        let Some(mut engine) = self.shared.try_write()? else { return Ok(false) };
        self.write_locked(&mut engine, data, offset)?;
        Ok(true)
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let mut engine = self.shared.write()?;
        self.write_many_locked(&mut engine, writes)
    }

    fn try_write_many_nowait(&self, writes: &[(u64, &[u8])]) -> Result<bool, StoreError> {
        // As `try_write_at_nowait`: whole blocks only (no read), and not too many bytes.
        let inline = |(offset, data): &(u64, &[u8])| {
            whole_blocks(*offset, data) && !data.is_empty() && data.len() <= INLINE_WRITE_BYTES_MAX
        };
        let total: usize = writes.iter().map(|(_, data)| data.len()).sum();
        if !writes.iter().all(inline) || total > INLINE_BATCH_BYTES_MAX {
            return Ok(false);
        }
        let Some(mut engine) = self.shared.try_write()? else { return Ok(false) };
        self.write_many_locked(&mut engine, writes)?;
        Ok(true)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let id = self.id;
        self.zero_range(offset, length, |e, lba, blocks| e.trim(id, lba, blocks))
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        let id = self.id;
        match mode {
            ZeroMode::MayTrim => {
                self.zero_range(offset, length, |e, lba, blocks| e.trim(id, lba, blocks))
            }
            ZeroMode::Allocate => {
                self.zero_range(offset, length, |e, lba, blocks| e.write_zeroes(id, lba, blocks))
            }
        }
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        extents_max: usize,
    ) -> Result<Vec<Extent>, StoreError> {
        let engine = self.shared.read();
        let size = engine.size(self.id).map_err(store_error)?;
        check_range(offset, length, size)?;
        let mut out: Vec<Extent> = Vec::new();
        if length == 0 {
            return Ok(out);
        }
        let (first, blocks) = covering(offset, length);
        let end = offset + length;
        let mut push = |from: u64, to: u64, hole: bool, zero: bool| {
            let (from, to) = (from.max(offset), to.min(end));
            if from >= to {
                return;
            }
            match out.last_mut() {
                Some(last) if last.hole == hole && last.zero == zero => last.length += to - from,
                _ => out.push(Extent { length: to - from, hole, zero }),
            }
        };
        let mut at = first * BLOCK;
        for e in engine.extents(self.id, first, blocks).map_err(store_error)? {
            push(at, e.lba * BLOCK, true, true);
            let zero = matches!(e.target, strata_blockmap::Target::Zero);
            push(e.lba * BLOCK, e.end() * BLOCK, false, zero);
            at = e.end() * BLOCK;
        }
        push(at, (first + blocks) * BLOCK, true, true);
        out.truncate(extents_max.max(1));
        Ok(out)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.shared.sync()
    }

    fn resize(&self, size_bytes: u64) -> Result<(), StoreError> {
        let mut engine = self.shared.write()?;
        engine.resize(self.id, size_bytes).map_err(|e| self.shared.fail(e))
    }

    fn has_room(&self, bytes: u64, writes: usize) -> bool {
        // Callers are async tasks: the lock is never waited for. A busy lock answers
        // true (a hint; the write itself is checked again). A store short of room gives
        // its kept free segments back and measures again first, as a refused write does.
        let room = match self.shared.engine.try_read() {
            Ok(engine) => engine.has_room(bytes, writes),
            Err(std::sync::TryLockError::WouldBlock) => return true,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().has_room(bytes, writes),
        };
        if room {
            return true;
        }
        match self.shared.try_write() {
            Ok(Some(mut engine)) => {
                self.shared.make_room(&mut engine);
                engine.has_room(bytes, writes)
            }
            Ok(None) | Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests;
