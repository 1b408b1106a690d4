//! Storage traits, group commit, and the file abstraction the store writes through.
//!
//! - [`BlockVolume`]: one volume's bytes: read, write, trim, zero, extents, sync. Front ends
//!   (NBD today) speak only this trait.
//! - [`Store`]: the set of volumes one node holds: create, open, remove, enumerate by id.
//! - [`GroupSync`]: group commit: concurrent FLUSH/FUA requests of a volume share one sync.
//! - [`sim`]: the `RawFile` trait the log-structured store (`strata-store`) writes through,
//!   implemented by `std::fs::File` and by `SimFile`, which crashes at any moment (durable
//!   vs volatile images, torn writes).
//! - [`net`]: inter-node connections: their source address, the authenticated and
//!   encrypted channel every one runs (Noise NNpsk0), the flood-proof listener, the frame
//!   writer task.
//!
//! This crate must not depend on any front end (NBD, HTTP) or on the metadata service.
//! Design: `docs/design/nbd.md` (durability section).

mod group_sync;
pub mod net;
pub mod sim;

pub use group_sync::{GroupSync, SyncCallback, SyncError};

use bytes::Bytes;
use std::sync::Arc;

/// A volume's id inside one store. Names live in the catalog; the store never sees them,
/// so a name can never become a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub u64);

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The range lies (partly) past the end of the volume.
    #[error("range {offset}+{length} is past the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
        /// The volume's size.
        size: u64,
    },
    /// No space left on the device.
    #[error("no space left on the device")]
    NoSpace,
    /// The backend cannot do this operation quickly or at all.
    #[error("operation not supported by the backend: {what}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
    },
    /// No volume with this id.
    #[error("volume {id} not found in the store")]
    NotFound {
        /// The id asked for.
        id: VolumeId,
    },
    /// An earlier sync failed: the volume refuses writes and syncs until it is reopened,
    /// because the kernel may already have dropped the unsynced data (fsyncgate).
    #[error("volume is failed after an earlier sync error; restart the node to recover")]
    Failed,
    /// The volume is a read-only snapshot.
    #[error("the volume is a read-only snapshot")]
    ReadOnly,
    /// Stored data or metadata failed its checksum: the block is not returned.
    #[error("{message}")]
    Corrupt {
        /// What failed, where.
        message: String,
    },
    /// An operating-system I/O error.
    #[error("{op}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Wraps an OS error of operation `op`; ENOSPC, EDQUOT and EFBIG become `NoSpace`.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| {
            if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
                || source.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
                || source.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error())
            {
                StoreError::NoSpace
            } else {
                StoreError::Io { op, source }
            }
        }
    }

    /// Like [`StoreError::io`] for a rustix error.
    pub fn errno(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> StoreError {
        move |e| StoreError::io(op)(std::io::Error::from(e))
    }
}

/// A run of a volume with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never zero.
    pub length: u64,
    /// True if the run is not allocated (a hole); it reads as zeroes.
    pub hole: bool,
    /// True if the run is known to read as zeroes.
    pub zero: bool,
}

/// How WRITE_ZEROES may achieve its zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// The range may become a hole (thin).
    MayTrim,
    /// The range must stay allocated (NBD `NO_HOLE`).
    Allocate,
}

/// One volume's bytes.
///
/// # Correctness
/// - `write_at`, `trim` and `write_zeroes` return only once their effect is visible to every
///   later `read_at` (from any thread) and survives a crash of this process (it is at least
///   in the kernel's page cache). They do not promise survival of a power loss.
/// - `sync` returns only once every write that returned before `sync` was called survives a
///   power loss. After a failed `sync` the volume refuses further writes and syncs
///   ([`StoreError::Failed`]) until it is reopened.
/// - Ranges are checked against the size: nothing past the end is read or written.
/// - Every method may block on the device; callers on an async runtime use
///   `spawn_blocking`, or first try the `try_*_nowait` variants.
pub trait BlockVolume: Send + Sync + 'static {
    /// The volume's current size in bytes.
    fn size_bytes(&self) -> u64;

    /// Bytes of the store this volume occupies.
    fn allocated_bytes(&self) -> Result<u64, StoreError>;

    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError>;

    /// Like `read_at`, but returns `Ok(false)` instead of blocking on the device (the data
    /// is not cached). The default never tries.
    fn try_read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError>;

    /// Like `write_at`, but returns `Ok(false)` instead of waiting on the device (a read,
    /// or a long wait). A buffered backend may still be throttled briefly by the kernel's
    /// dirty-page limits. The default never tries.
    fn try_write_at_nowait(&self, _data: &[u8], _offset: u64) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Writes each `(offset, data)` in turn, with the effect of `write_at` called for each
    /// in that order (a later one wins where two overlap). Every range is checked first:
    /// if one is out of range, nothing is written. A store may write them together (one
    /// lock, fewer system calls); if it fails part way, it is failed as `write_at` would
    /// be. The default calls `write_at` for each.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let size = self.size_bytes();
        for (offset, data) in writes {
            check_range(*offset, data.len() as u64, size)?;
        }
        writes.iter().try_for_each(|(offset, data)| self.write_at(data, *offset))
    }

    /// Like `write_many`, but returns `Ok(false)`, having written nothing, instead of
    /// waiting on the device or a lock. The default never tries.
    fn try_write_many_nowait(&self, _writes: &[(u64, &[u8])]) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Discards a range: it reads as zeroes afterwards and costs no space.
    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError>;

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError>;

    /// Describes the allocation of `offset..offset+length` as consecutive extents, at most
    /// `extents_max` of them (at least one); the last may end before the range does.
    fn extents(
        &self,
        offset: u64,
        length: u64,
        extents_max: usize,
    ) -> Result<Vec<Extent>, StoreError>;

    /// Hints that a range will be read soon.
    fn prefetch(&self, _offset: u64, _length: u64) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes every completed write durable (see the trait's correctness notes).
    fn sync(&self) -> Result<(), StoreError>;

    /// Changes the size. Shrinking discards the data past the new end.
    fn resize(&self, size_bytes: u64) -> Result<(), StoreError>;

    /// Whether writes of `bytes` in `writes` requests would be taken now rather than
    /// refused for want of space ([`StoreError::NoSpace`]). True by default.
    ///
    /// # Correctness
    /// A hint for a caller that must not start a write its volume would refuse (a
    /// replicated volume's owner, before other copies take it): true may still be
    /// followed by a refusal (other writes took the room meanwhile); false means a write
    /// now would be refused. It may block briefly (it may give space back first).
    fn has_room(&self, _bytes: u64, _writes: usize) -> bool {
        true
    }

    /// True for a volume whose I/O waits on other nodes (a replicated volume): a front end
    /// runs its requests as [`BlockVolume::submit`]'s futures on its own async runtime
    /// rather than as blocking calls, each on a thread of its own. False by default.
    fn asynchronous(&self) -> bool {
        false
    }

    /// One request as a future (same contract as the blocking method it names); a read's
    /// future yields the data, the others' an empty buffer. The default runs the blocking
    /// method on the runtime's blocking pool.
    fn submit(self: Arc<Self>, op: IoOp) -> IoFuture {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || op.run_blocking(&*self))
                .await
                .unwrap_or_else(|e| Err(StoreError::io("submit")(std::io::Error::other(e))))
        })
    }

    /// Writes (`IoOp::Write` each) that came together from one client, as one future: an
    /// asynchronous volume may apply them together. Two that overlap may take effect in
    /// either order (as two requests in flight at once may), but take the same on every
    /// copy. The default submits each as a task of its own.
    fn submit_writes(self: Arc<Self>, writes: Vec<IoOp>) -> WritesFuture {
        Box::pin(async move {
            let tasks: Vec<_> =
                writes.into_iter().map(|op| tokio::spawn(self.clone().submit(op))).collect();
            let mut out = Vec::with_capacity(tasks.len());
            for task in tasks {
                out.push(
                    task.await.unwrap_or_else(|e| {
                        Err(StoreError::io("submit")(std::io::Error::other(e)))
                    }),
                );
            }
            out
        })
    }
}

/// The future of writes submitted together (see [`BlockVolume::submit_writes`]): each
/// one's outcome, in their order.
pub type WritesFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Result<Bytes, StoreError>>> + Send>>;

/// A request's future (see [`BlockVolume::submit`]).
pub type IoFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, StoreError>> + Send>>;

/// One request to a volume, owning its data (see [`BlockVolume::submit`]).
#[derive(Clone, Debug)]
pub enum IoOp {
    /// `read_at` of `length` bytes.
    Read {
        /// Where.
        offset: u64,
        /// How many bytes.
        length: usize,
    },
    /// `write_at` (with `fua`: then `sync`, so the write is durable when it completes).
    Write {
        /// Where.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// Forced unit access: durable before it completes.
        fua: bool,
    },
    /// `trim`.
    Trim {
        /// Where.
        offset: u64,
        /// How many bytes.
        length: u64,
    },
    /// `write_zeroes`.
    Zero {
        /// Where.
        offset: u64,
        /// How many bytes.
        length: u64,
        /// Whether it may become a hole.
        mode: ZeroMode,
    },
    /// `sync`.
    Flush,
}

impl IoOp {
    /// Runs the request through `volume`'s blocking methods.
    pub fn run_blocking<V: BlockVolume + ?Sized>(self, volume: &V) -> Result<Bytes, StoreError> {
        match self {
            IoOp::Read { offset, length } => {
                let mut buf = vec![0u8; length];
                volume.read_at(&mut buf, offset).map(|()| Bytes::from(buf))
            }
            IoOp::Write { offset, data, fua } => {
                volume.write_at(&data, offset)?;
                if fua {
                    volume.sync()?;
                }
                Ok(Bytes::new())
            }
            IoOp::Trim { offset, length } => volume.trim(offset, length).map(|()| Bytes::new()),
            IoOp::Zero { offset, length, mode } => {
                volume.write_zeroes(offset, length, mode).map(|()| Bytes::new())
            }
            IoOp::Flush => volume.sync().map(|()| Bytes::new()),
        }
    }
}

/// The set of volumes one node stores, by id.
///
/// # Correctness
/// - `create_volume` returns a durable, empty volume: after a crash it exists with its size.
/// - `remove_volume` is durable when it returns; a crash in the middle leaves either the
///   whole volume or nothing.
pub trait Store: Send + Sync + 'static {
    /// Creates an empty volume of `size_bytes`.
    fn create_volume(
        &self,
        id: VolumeId,
        size_bytes: u64,
    ) -> Result<Arc<dyn BlockVolume>, StoreError>;

    /// Opens an existing volume.
    fn open_volume(&self, id: VolumeId) -> Result<Arc<dyn BlockVolume>, StoreError>;

    /// Removes a volume and frees its space.
    fn remove_volume(&self, id: VolumeId) -> Result<(), StoreError>;

    /// Every volume id present in the store.
    fn volume_ids(&self) -> Result<Vec<VolumeId>, StoreError>;

    /// Free bytes left for data.
    fn free_bytes(&self) -> Result<u64, StoreError>;
}

/// Checks `offset..offset+length` against `size`.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), StoreError> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, length, size }),
    }
}
