//! Files for crash-consistency tests: a [`RawFile`] trait the log-structured store will
//! write through, implemented by `std::fs::File` and by [`SimFile`], which keeps the
//! *durable* image (what survives a power loss) apart from the *volatile* one (what reads
//! see now) and can crash at any moment.
//!
//! A crash keeps every synced byte and, of each write since the last sync, independently:
//! all of it, none of it, or a random subset of its 512-byte sectors (a torn write) — any
//! of which a disk with a volatile cache may do, in any order. Faults can be armed: the
//! next sync or write fails with EIO, or writes past a capacity fail with ENOSPC.
//! Randomness comes from a seed, so a failing case replays.

use std::io;
use std::sync::Mutex;

/// The file operations the store needs.
///
/// # Correctness
/// - `write_at` returns once a later `read_at` sees the data (it survives a crash of the
///   process, not a power loss).
/// - `sync` returns once every write that returned before it survives a power loss.
pub trait RawFile: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`, extending the file if needed.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` back to back from `offset`, as `write_at` of their concatenation
    /// would. No promise of atomicity: a crash may keep any part of it, like any
    /// unsynced write. The default calls `write_at` for each buffer in turn.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// The file's length.
    fn length_bytes(&self) -> io::Result<u64>;
    /// Frees `length` bytes from `offset` (a hole, within the file's length): they read as
    /// zeroes afterwards and cost no space. Like a write, durable after the next `sync`.
    fn punch(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Like `read_at`, but returns `Ok(false)` instead of waiting for the device (the data
    /// is not all cached). The default never tries.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Writes zeroes over `length` bytes from `offset` (within or past the end), so that
    /// the file system has those blocks allocated and written: a later write there
    /// changes no file system metadata. Durable after the next `sync`. The default
    /// writes them through `write_at`.
    fn zero_fill(&self, offset: u64, length: u64) -> io::Result<()> {
        zero_fill_with(offset, length, &vec![0u8; ZERO_CHUNK], |d, at| self.write_at(d, at))
    }
}

/// Bytes of zeroes one write of [`RawFile::zero_fill`] carries.
const ZERO_CHUNK: usize = 1 << 20;

/// Buffers one `pwritev` may carry (Linux's `UIO_MAXIOV`).
const IOVECS_MAX: usize = 1024;

/// Writes all of `bufs` back to back from `offset` through `write` (a `pwritev`: it
/// writes a prefix of the slices it is given at an offset and returns how many bytes),
/// calling it again after a short write from the first byte not written.
fn write_all_vectored(
    mut bufs: &[&[u8]],
    mut offset: u64,
    mut write: impl FnMut(&[io::IoSlice<'_>], u64) -> io::Result<usize>,
) -> io::Result<()> {
    // Bytes of `bufs[0]` already written.
    let mut skip = 0;
    let mut slices = Vec::with_capacity(bufs.len().min(IOVECS_MAX));
    while let Some((first, rest)) = bufs.split_first() {
        if skip == first.len() {
            (bufs, skip) = (rest, 0);
            continue;
        }
        slices.clear();
        slices.push(io::IoSlice::new(&first[skip..]));
        slices.extend(rest.iter().take(IOVECS_MAX - 1).map(|b| io::IoSlice::new(b)));
        let mut written = match write(&slices, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        offset += written as u64;
        while let Some(first) = bufs.first().filter(|_| written > 0) {
            let left = first.len() - skip;
            if written < left {
                skip += written;
                written = 0;
            } else {
                written -= left;
                (bufs, skip) = (&bufs[1..], 0);
            }
        }
    }
    Ok(())
}

/// Writes `zeroes` (up to its length at a time) over `length` bytes from `offset`.
fn zero_fill_with(
    offset: u64,
    length: u64,
    zeroes: &[u8],
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut at = 0;
    while at < length {
        let n = (length - at).min(zeroes.len() as u64) as usize;
        write(&zeroes[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

impl RawFile for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
    /// One `pwritev` (more after a short write, or past 1024 buffers).
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        write_all_vectored(bufs, offset, |slices, at| {
            rustix::io::pwritev(self, slices, at).map_err(io::Error::from)
        })
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn length_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        let length = buf.len();
        match preadv2(self, &mut [io::IoSliceMut::new(buf)], offset, ReadWriteFlags::NOWAIT) {
            Ok(n) => Ok(n == length),
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::INVAL) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn punch(&self, offset: u64, length: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(self, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, length)
            .map_err(io::Error::from)
    }
    /// Around the page cache (O_DIRECT, through a second descriptor of the same file):
    /// zeroes copied into the page cache cost as much CPU as the data later written over
    /// them, and only the blocks' allocation is wanted. Where O_DIRECT is refused (tmpfs),
    /// or the range is not 4 KiB aligned, through `write_at`.
    fn zero_fill(&self, offset: u64, length: u64) -> io::Result<()> {
        use rustix::fs::{open, Mode, OFlags};
        use std::os::fd::AsRawFd;
        const ALIGN: usize = 4096;
        let buffered =
            || zero_fill_with(offset, length, &vec![0u8; ZERO_CHUNK], |d, at| self.write_at(d, at));
        if !offset.is_multiple_of(ALIGN as u64) || !length.is_multiple_of(ALIGN as u64) {
            return buffered();
        }
        let path = format!("/proc/self/fd/{}", self.as_raw_fd());
        let Ok(direct) =
            open(path, OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC, Mode::empty())
        else {
            return buffered();
        };
        let direct = std::fs::File::from(direct);
        // An aligned run of zeroes inside a larger buffer (no allocator tricks needed).
        let room = vec![0u8; ZERO_CHUNK + ALIGN];
        let start = room.as_ptr().align_offset(ALIGN).min(ALIGN);
        let zeroes = &room[start..start + ZERO_CHUNK];
        let written = zero_fill_with(offset, length, zeroes, |d, at| {
            std::os::unix::fs::FileExt::write_all_at(&direct, d, at)
        });
        match written {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                buffered()
            }
            other => other,
        }
    }
}

impl<T: RawFile + ?Sized> RawFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(data, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn length_bytes(&self) -> io::Result<u64> {
        (**self).length_bytes()
    }
    fn punch(&self, offset: u64, length: u64) -> io::Result<()> {
        (**self).punch(offset, length)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        (**self).read_at_nowait(buf, offset)
    }
    fn zero_fill(&self, offset: u64, length: u64) -> io::Result<()> {
        (**self).zero_fill(offset, length)
    }
}

/// Sector size for torn writes.
pub const SECTOR_BYTES: usize = 512;

/// A deterministic pseudo-random generator (xorshift64*): tests need replayable choices
/// and no dependency.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed (any value, zero included).
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value below `bound` (> 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    /// Writes since the last sync, in order: (offset, data).
    pending: Vec<(u64, Vec<u8>)>,
    fail_next_sync: bool,
    fail_next_write: bool,
    capacity: Option<u64>,
    syncs: u64,
}

/// A simulated file with separate durable and volatile images.
#[derive(Default)]
pub struct SimFile {
    state: Mutex<State>,
}

/// What a crash did to the writes it found unsynced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CrashReport {
    /// Writes kept whole.
    pub kept: usize,
    /// Writes dropped.
    pub dropped: usize,
    /// Writes torn (some sectors kept).
    pub torn: usize,
}

fn put(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).expect("simulated files fit in memory");
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

impl SimFile {
    /// An empty file.
    pub fn new() -> SimFile {
        SimFile::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a power loss: the volatile image becomes the durable one plus whatever of
    /// the unsynced writes the disk happened to keep (chosen by `rng`).
    pub fn crash(&self, rng: &mut SimRng) -> CrashReport {
        let mut s = self.lock();
        let mut report = CrashReport::default();
        let pending = std::mem::take(&mut s.pending);
        for (offset, data) in pending {
            match rng.below(3) {
                0 => {
                    put(&mut s.durable, offset, &data);
                    report.kept += 1;
                }
                1 => report.dropped += 1,
                _ => {
                    for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                        if rng.below(2) == 0 {
                            put(&mut s.durable, offset + (i * SECTOR_BYTES) as u64, sector);
                        }
                    }
                    report.torn += 1;
                }
            }
        }
        s.volatile = s.durable.clone();
        report
    }

    /// The next `sync` fails with EIO (and syncs nothing).
    pub fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// The next `write_at` fails with EIO (and writes nothing).
    pub fn fail_next_write(&self) {
        self.lock().fail_next_write = true;
    }

    /// Writes that would grow the file past `bytes` fail with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// Syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Writes since the last sync.
    pub fn unsynced_writes(&self) -> usize {
        self.lock().pending.len()
    }
}

/// `write_vectored_at` is the default: each buffer is a write of its own, which a crash
/// independently keeps, drops or tears, as it may any part of one `pwritev`.
impl RawFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > s.volatile.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&s.volatile[start..end]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        if std::mem::take(&mut s.fail_next_write) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let end = offset.checked_add(data.len() as u64).ok_or(io::ErrorKind::InvalidInput)?;
        if s.capacity.is_some_and(|c| end > c) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        put(&mut s.volatile, offset, data);
        s.pending.push((offset, data.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if std::mem::take(&mut s.fail_next_sync) {
            // Like Linux after a failed fsync: the pending writes may be gone for good.
            s.pending.clear();
            return Err(io::Error::from_raw_os_error(5));
        }
        for (offset, data) in std::mem::take(&mut s.pending) {
            put(&mut s.durable, offset, &data);
        }
        s.syncs += 1;
        Ok(())
    }

    fn length_bytes(&self) -> io::Result<u64> {
        Ok(self.lock().volatile.len() as u64)
    }

    /// A punch is modelled as a write of zeroes (a crash may keep, drop or tear it).
    fn punch(&self, offset: u64, length: u64) -> io::Result<()> {
        let len = self.length_bytes()?;
        let end = offset.saturating_add(length).min(len);
        if end > offset {
            let zeroes = vec![0u8; usize::try_from(end - offset).expect("fits in memory")];
            self.write_at(&zeroes, offset)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_files_zero_fill_writes_zeroes_past_its_end_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("log"))
            .unwrap();
        f.write_at(&[7u8; 8192], 0).unwrap();
        f.write_at(&[9u8; 4096], 2 << 20).unwrap();
        // Aligned (around the page cache where the file system allows it), over old
        // data and past the end; then unaligned (through the page cache).
        f.zero_fill(4096, 3 << 20).unwrap();
        f.zero_fill((4 << 20) + 100, 5000).unwrap();
        f.sync().unwrap();
        assert_eq!(f.length_bytes().unwrap(), (4 << 20) + 5100);
        let mut all = vec![1u8; (4 << 20) + 5100];
        f.read_at(&mut all, 0).unwrap();
        assert!(all[..4096].iter().all(|&b| b == 7), "before the range: kept");
        assert!(all[4096..].iter().all(|&b| b == 0), "the ranges and the gap read zeroes");
    }

    /// Buffers of lengths 0..`n` (some empty), each byte naming its buffer and place.
    fn numbered_buffers(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| (0..i % 37).map(|j| (i * 7 + j) as u8).collect()).collect()
    }

    #[test]
    fn vectored_writes_resume_after_short_writes_and_interruptions() {
        let bufs = numbered_buffers(3000);
        let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let want: Vec<u8> = bufs.concat();
        for most in [1, 5, 36, 37, 100, 1 << 20] {
            let mut image = vec![0u8; 10 + want.len()];
            let mut calls = 0;
            write_all_vectored(&refs, 10, |slices, at| {
                calls += 1;
                assert!(slices.len() <= IOVECS_MAX);
                if calls % 5 == 0 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                // A short write: at most `most` bytes of the slices given.
                let bytes: Vec<u8> =
                    slices.iter().flat_map(|s| s.iter()).take(most).copied().collect();
                image[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
                Ok(bytes.len())
            })
            .unwrap();
            assert!(image[..10] == [0u8; 10], "nothing before the offset");
            assert!(image[10..] == want[..], "at most {most} bytes a call");
        }
        let stuck = write_all_vectored(&refs, 0, |_, _| Ok(0));
        assert_eq!(stuck.unwrap_err().kind(), io::ErrorKind::WriteZero);
        write_all_vectored(&[&[], &[]], 0, |_, _| panic!("nothing to write")).unwrap();
    }

    #[test]
    fn a_real_files_vectored_write_lands_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create_new(dir.path().join("log")).unwrap();
        f.write_at(&[9u8; 100], 0).unwrap();
        // More buffers than one pwritev takes; 4 KiB blocks like the log's.
        let bufs = numbered_buffers(2500);
        let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 4096]).collect();
        let refs: Vec<&[u8]> = bufs.iter().chain(&blocks).map(|b| &b[..]).collect();
        f.write_vectored_at(&refs, 50).unwrap();
        let want: Vec<u8> = refs.concat();
        let mut back = vec![0u8; 50 + want.len()];
        f.read_at(&mut back, 0).unwrap();
        assert!(back[..50] == [9u8; 50], "bytes before the offset kept");
        assert!(back[50..] == want[..], "the buffers, in order");
        assert_eq!(f.length_bytes().unwrap(), 50 + want.len() as u64);
    }

    #[test]
    fn synced_data_survives_every_crash_and_unsynced_data_may_not() {
        for seed in 0..200 {
            let f = SimFile::new();
            f.write_at(&[1u8; 4096], 0).unwrap();
            f.sync().unwrap();
            f.write_at(&[2u8; 4096], 0).unwrap();
            f.write_at(&[3u8; 4096], 4096).unwrap();
            let mut rng = SimRng::new(seed);
            let report = f.crash(&mut rng);
            assert_eq!(report.kept + report.dropped + report.torn, 2);
            let mut first = [0u8; 4096];
            f.read_at(&mut first, 0).unwrap();
            // Every sector is either the synced or the newer content, never anything else.
            for sector in first.chunks(SECTOR_BYTES) {
                assert!(sector.iter().all(|&b| b == 1) || sector.iter().all(|&b| b == 2));
            }
            assert_eq!(f.unsynced_writes(), 0);
        }
    }

    #[test]
    fn crashes_are_replayable_and_varied() {
        let outcome = |seed| {
            let f = SimFile::new();
            for i in 0..16u64 {
                f.write_at(&[i as u8 + 1; 1024], i * 1024).unwrap();
            }
            f.crash(&mut SimRng::new(seed));
            let mut all = vec![0u8; f.length_bytes().unwrap() as usize];
            f.read_at(&mut all, 0).unwrap();
            all
        };
        assert_eq!(outcome(7), outcome(7));
        let distinct: std::collections::HashSet<Vec<u8>> = (0..20).map(outcome).collect();
        assert!(distinct.len() > 10, "crashes should differ between seeds");
    }

    #[test]
    fn armed_faults_fail_once_and_change_nothing() {
        let f = SimFile::new();
        f.write_at(b"abc", 0).unwrap();
        f.fail_next_write();
        assert_eq!(f.write_at(b"zzz", 0).unwrap_err().raw_os_error(), Some(5));
        f.write_at(b"abd", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"xyz", 0).unwrap();
        f.fail_next_sync();
        assert_eq!(f.sync().unwrap_err().raw_os_error(), Some(5));
        // Like Linux after a failed fsync: reads still see the write, a later sync
        // succeeds, and yet the write never reaches the disk.
        f.sync().unwrap();
        let mut b = [0u8; 3];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"xyz");
        f.crash(&mut SimRng::new(1));
        f.set_capacity(Some(10));
        assert_eq!(f.write_at(&[0u8; 8], 4).unwrap_err().raw_os_error(), Some(28));
        let mut b = [0u8; 3];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"abd");
        assert!(f.read_at(&mut [0u8; 4], 0).is_err(), "reads past the end fail");
        assert_eq!(f.syncs(), 2);
    }
}
