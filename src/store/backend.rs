//! Test backends over the database file, so that tests exercise the real error and recovery
//! paths of the store. Each sits under `writeback::WriteBack` in place of redb's `FileBackend`.
//!
//! # A full disk: [`DiskLimit`]
//! The file may not grow past its size at the moment the limit is switched on. That is what
//! ENOSPC looks like to redb (writes into already-allocated pages still succeed). It can also
//! be told that the next fsync is slow (a busy SD card), for the paths that must cope with a
//! commit that takes longer than a Zeqond.
//!
//! # A power cut: [`PowerCut`]
//! A disk whose write cache is lost with the power. Every `write` and `set_len` stays in this
//! process's memory (non-overlapping extents and the length the file will have) until a
//! `sync_data` applies it to the file, length first and then the extents in offset order,
//! syncs the file, and only then forgets it; reads see the file with the unsynced writes over
//! it. So in a process that uses it, **SIGKILL is a power cut**: whatever no completed sync
//! covered never reached the file, and the page cache cannot save it as it saves plain writes.
//! A kill in the middle of a sync's write-out leaves part of a commit in the file, as a power
//! cut during a flush can. Offset order puts redb's header (offset 0) first, so a torn commit
//! is the hard kind: a new header over pages that were not written. redb must tell it from a
//! whole commit (by its checksums, or by its two-phase commit with `store.quick_repair`), and
//! the tests check that it does and that every acknowledged write survives.
//!
//! In-process, [`PowerCut::cut`] is the same cut: the unsynced writes are dropped, the file is
//! released and every later I/O of the backends opened so far fails, so a test can open the
//! file with a fresh `Store` and look at what survived; [`PowerCut::cut_during_write_out`]
//! tears a sync's write-out after a given number of extents. [`PowerCut::restore`] lets the
//! stopped store reopen the file, so that it answers what was in flight at once.
//!
//! `SMGATE_TEST_POWER_CUT=1` runs a gateway on it (`config.rs`, `Config::store_options`), for
//! the black-box power-cut tests; the store logs a warning at open. Never on a real device: its
//! memory grows with every write until the next sync, and a crash loses what plain writes would
//! have kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use redb::backends::FileBackend;
use redb::StorageBackend;

use super::StoreError;

/// Shared switch: `u64::MAX` means no limit; anything else is the largest allowed file size.
#[derive(Debug, Clone)]
pub struct DiskLimit {
    limit: Arc<AtomicU64>,
    current_len: Arc<AtomicU64>,
    /// Milliseconds the next `sync_data` waits before syncing (0: none); taken by that sync.
    slow_sync_ms: Arc<AtomicU64>,
}

impl Default for DiskLimit {
    fn default() -> Self {
        DiskLimit {
            limit: Arc::new(AtomicU64::new(u64::MAX)),
            current_len: Arc::new(AtomicU64::new(0)),
            slow_sync_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl DiskLimit {
    /// From now on the file cannot grow: writes past its current end fail with ENOSPC.
    pub fn fill(&self) {
        self.limit
            .store(self.current_len.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// The next fsync takes `ms` milliseconds longer (once).
    pub fn slow_next_sync(&self, ms: u64) {
        self.slow_sync_ms.store(ms, Ordering::SeqCst);
    }

    /// Space was freed.
    pub fn free(&self) {
        self.limit.store(u64::MAX, Ordering::SeqCst);
    }

    pub(super) fn backend(&self, file: File) -> Result<LimitedBackend, StoreError> {
        let inner = FileBackend::new(file).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let len = inner
            .len()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.current_len.store(len, Ordering::SeqCst);
        Ok(LimitedBackend {
            inner,
            switch: self.clone(),
        })
    }
}

#[derive(Debug)]
pub(super) struct LimitedBackend {
    inner: FileBackend,
    switch: DiskLimit,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl StorageBackend for LimitedBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        if len > self.switch.limit.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        self.inner.set_len(len)?;
        self.switch.current_len.store(len, Ordering::SeqCst);
        Ok(())
    }

    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        let slow = self.switch.slow_sync_ms.swap(0, Ordering::SeqCst);
        if slow > 0 {
            std::thread::sleep(std::time::Duration::from_millis(slow));
        }
        self.inner.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if offset + data.len() as u64 > self.switch.limit.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        self.inner.write(offset, data)
    }
}

/// Shared switch of the power-cut backend (module doc): cuts the power of every backend opened
/// through it, and restores it for backends opened later.
#[derive(Debug, Clone, Default)]
pub struct PowerCut {
    supply: Arc<Supply>,
}

#[derive(Debug, Default)]
struct Supply {
    /// No backend can be opened (the power is off).
    off: AtomicBool,
    /// Extents that write-outs may still write before the power is cut in the middle of one
    /// (0: not armed).
    cut_after: AtomicU64,
    /// The disks opened through this switch; a dropped one is gone.
    disks: Mutex<Vec<Weak<Disk>>>,
}

impl PowerCut {
    /// Cuts the power: every backend opened through this switch loses what no completed sync
    /// covered, closes the file (releasing redb's lock on it) and fails every later I/O; none
    /// can be opened until [`PowerCut::restore`]. Returns once none of them touches the file:
    /// a write-out in progress stops before its next extent.
    pub fn cut(&self) {
        self.supply.cut();
    }

    /// Cuts the power in the middle of a write-out: after the `extents`-th extent that
    /// `sync_data` writes from now on, or after a later one if that was the last of its
    /// write-out, so that the file holds part of a commit and never a whole one.
    pub fn cut_during_write_out(&self, extents: u64) {
        self.supply
            .cut_after
            .store(extents.max(1), Ordering::SeqCst);
    }

    pub fn is_off(&self) -> bool {
        self.supply.off.load(Ordering::SeqCst)
    }

    /// The power is back: backends opened from now on start from what the file holds. Those
    /// opened before the cut stay dead.
    pub fn restore(&self) {
        self.supply.cut_after.store(0, Ordering::SeqCst);
        self.supply.off.store(false, Ordering::SeqCst);
    }

    pub(super) fn backend(&self, file: File) -> Result<VolatileDisk, StoreError> {
        // Checked under the lock that a cut takes after switching off, so that no backend
        // escapes a cut that races with its opening.
        let mut disks = self.supply.lock_disks();
        if self.is_off() {
            return Err(StoreError::Unavailable(power_off().to_string()));
        }
        let file = FileBackend::new(file)?;
        let len = file.len().map_err(super::io_error)?;
        let disk = Arc::new(Disk {
            dead: AtomicBool::new(false),
            state: Mutex::new(DiskState {
                file: Some(file),
                file_len: len,
                unsynced: Unsynced {
                    extents: BTreeMap::new(),
                    len,
                    kept: len,
                },
            }),
        });
        disks.retain(|d| d.strong_count() > 0);
        disks.push(Arc::downgrade(&disk));
        Ok(VolatileDisk {
            disk,
            supply: self.supply.clone(),
        })
    }
}

impl Supply {
    fn lock_disks(&self) -> MutexGuard<'_, Vec<Weak<Disk>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cut(&self) {
        self.off.store(true, Ordering::SeqCst);
        let disks: Vec<Arc<Disk>> = self.lock_disks().iter().filter_map(Weak::upgrade).collect();
        // All dead before any is cleared, so that no write-out goes on to its next extent.
        for d in &disks {
            d.dead.store(true, Ordering::SeqCst);
        }
        for d in &disks {
            d.lock().switch_off();
        }
    }

    /// Called after each extent a write-out writes: whether the power goes now. The count
    /// stops at the last extent until a write-out has more to write.
    fn cut_due(&self, more_to_write: bool) -> bool {
        let counted =
            self.cut_after
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                    0 => None,
                    1 if !more_to_write => None,
                    n => Some(n - 1),
                });
        counted == Ok(1)
    }
}

fn power_off() -> io::Error {
    io::Error::other("the power is off (power-cut test backend)")
}

#[derive(Debug)]
struct Disk {
    /// Set by a cut; never cleared.
    dead: AtomicBool,
    state: Mutex<DiskState>,
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
struct DiskState {
    /// `None` once the power is cut.
    file: Option<FileBackend>,
    /// The file's own length (only this backend changes it: redb's lock).
    file_len: u64,
    unsynced: Unsynced,
}

#[derive(Debug, PartialEq)]
enum WriteOut {
    Whole,
    /// The power was cut in its middle (`PowerCut::cut_during_write_out`).
    Torn,
}

impl DiskState {
    fn switch_off(&mut self) {
        self.file = None;
        self.unsynced.extents = BTreeMap::new();
    }

    /// Writes what is unsynced to the file: its length first, so that no extent lands past its
    /// end, then the extents in offset order. Stops if the power goes meanwhile.
    fn write_out(&mut self, dead: &AtomicBool, supply: &Supply) -> io::Result<WriteOut> {
        let (file, unsynced) = (self.file.as_ref().ok_or_else(power_off)?, &self.unsynced);
        if unsynced.kept < self.file_len {
            file.set_len(unsynced.kept)?;
            self.file_len = unsynced.kept;
        }
        if unsynced.len != self.file_len {
            file.set_len(unsynced.len)?;
            self.file_len = unsynced.len;
        }
        let count = unsynced.extents.len();
        for (i, (&offset, data)) in unsynced.extents.iter().enumerate() {
            if dead.load(Ordering::SeqCst) {
                return Err(power_off());
            }
            file.write(offset, data)?;
            if supply.cut_due(i + 1 < count) {
                return Ok(WriteOut::Torn);
            }
        }
        Ok(WriteOut::Whole)
    }
}

/// What the disk holds only in its volatile cache.
#[derive(Debug)]
struct Unsynced {
    /// offset → bytes written there; no two overlap.
    extents: BTreeMap<u64, Vec<u8>>,
    /// The length the file will have.
    len: u64,
    /// The file's bytes from here on were cut off by a shrink: they read as zeros if it grows
    /// again.
    kept: u64,
}

impl Unsynced {
    /// The extents that overlap `offset..end`, last first.
    fn overlapping(&self, offset: u64, end: u64) -> impl Iterator<Item = (&u64, &Vec<u8>)> {
        // No two overlap, so their ends grow with their offsets.
        self.extents
            .range(..end)
            .rev()
            .take_while(move |(&o, w)| o + w.len() as u64 > offset)
    }

    /// A later write wins where it overlaps earlier ones, which it joins into one extent.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        self.len = self.len.max(end);
        if data.is_empty() {
            return;
        }
        if let Some(w) = self.extents.get_mut(&offset) {
            if w.len() == data.len() {
                w.copy_from_slice(data);
                return;
            }
        }
        let earlier: Vec<u64> = self.overlapping(offset, end).map(|(&o, _)| o).collect();
        let (Some(&first), Some(&last)) = (earlier.last(), earlier.first()) else {
            self.extents.insert(offset, data.to_vec());
            return;
        };
        let start = offset.min(first);
        let stop = end.max(last + self.extents[&last].len() as u64);
        let mut joined = vec![0; (stop - start) as usize];
        for o in earlier {
            if let Some(w) = self.extents.remove(&o) {
                let at = (o - start) as usize;
                joined[at..at + w.len()].copy_from_slice(&w);
            }
        }
        let at = (offset - start) as usize;
        joined[at..at + data.len()].copy_from_slice(data);
        self.extents.insert(start, joined);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.extents.split_off(&len);
            if let Some((&o, w)) = self.extents.iter_mut().next_back() {
                w.truncate(w.len().min((len - o) as usize));
            }
            self.kept = self.kept.min(len);
        }
        self.len = len;
    }
}

/// The power-cut backend (module doc), opened by [`PowerCut`].
#[derive(Debug)]
pub(super) struct VolatileDisk {
    disk: Arc<Disk>,
    supply: Arc<Supply>,
}

impl VolatileDisk {
    fn lock(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let state = self.disk.lock();
        match (self.disk.dead.load(Ordering::SeqCst), &state.file) {
            (false, Some(_)) => Ok(state),
            _ => Err(power_off()),
        }
    }
}

impl StorageBackend for VolatileDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.lock()?.unsynced.len)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let state = self.lock()?;
        let (file, unsynced) = (state.file.as_ref().ok_or_else(power_off)?, &state.unsynced);
        let end = offset + len as u64;
        if end > unsynced.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {len} bytes at {offset} past the end ({})",
                    unsynced.len
                ),
            ));
        }
        // The file answers up to where it still holds the disk's bytes; zeros beyond.
        let from_file = end.min(state.file_len).min(unsynced.kept);
        let mut buf = match from_file.checked_sub(offset) {
            Some(n) if n > 0 => file.read(offset, n as usize)?,
            _ => Vec::new(),
        };
        buf.resize(len, 0);
        for (&o, w) in unsynced.overlapping(offset, end) {
            let (lo, hi) = (o.max(offset), (o + w.len() as u64).min(end));
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&w[(lo - o) as usize..(hi - o) as usize]);
        }
        Ok(buf)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.lock()?.unsynced.set_len(len);
        Ok(())
    }

    /// Applies what is unsynced to the file and syncs it, holding the lock throughout: a cut
    /// waits for the fsync, and a read never sees the file half written.
    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        let mut state = self.lock()?;
        if state.write_out(&self.disk.dead, &self.supply)? == WriteOut::Torn {
            self.disk.dead.store(true, Ordering::SeqCst);
            state.switch_off();
            drop(state);
            self.supply.cut();
            return Err(power_off());
        }
        state
            .file
            .as_ref()
            .ok_or_else(power_off)?
            .sync_data(eventual)?;
        state.unsynced.extents.clear();
        state.unsynced.kept = state.unsynced.len;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.lock()?.unsynced.write(offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A power-cut backend on a fresh file of `len` zero bytes, with its switch and path.
    fn disk(
        len: u64,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        PowerCut,
        VolatileDisk,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(len).unwrap();
        let power = PowerCut::default();
        let disk = power.backend(open(&path)).unwrap();
        (dir, path, power, disk)
    }

    fn open(path: &std::path::Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn reads_see_writes_before_their_sync_and_the_file_only_after() {
        let (_dir, path, _power, d) = disk(64);
        d.write(8, &[1; 8]).unwrap();
        d.write(60, &[2; 8]).unwrap();
        assert_eq!(d.len().unwrap(), 68, "a write past the end grows it");
        assert_eq!(d.read(0, 16).unwrap(), [[0; 8], [1; 8]].concat());
        assert_eq!(d.read(56, 12).unwrap(), [vec![0; 4], vec![2; 8]].concat());
        assert!(d.read(60, 9).is_err(), "a read past the end");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0; 64]);
        d.sync_data(false).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len(), 68);
        assert_eq!((&file[8..16], &file[60..]), (&[1; 8][..], &[2; 8][..]));
        assert_eq!(d.read(8, 8).unwrap(), vec![1; 8]);
    }

    /// The cut: what a sync covered is in the file, nothing else is, the file is released
    /// (redb can lock it again) and the old backend fails from then on.
    #[test]
    fn after_a_cut_the_file_holds_exactly_what_was_synced() {
        let (_dir, path, power, d) = disk(32);
        d.write(0, &[1; 8]).unwrap();
        d.set_len(48).unwrap();
        d.sync_data(false).unwrap();
        d.write(0, &[2; 4]).unwrap();
        d.write(40, &[3; 8]).unwrap();
        d.set_len(64).unwrap();
        power.cut();
        assert!(power.is_off());
        assert!(d.read(0, 8).is_err() && d.write(0, &[4]).is_err() && d.len().is_err());
        assert!(d.sync_data(false).is_err());
        assert!(power.backend(open(&path)).is_err(), "no backend while off");
        let file = redb::backends::FileBackend::new(open(&path)).expect("the lock is released");
        assert_eq!(file.len().unwrap(), 48);
        assert_eq!(
            file.read(0, 48).unwrap(),
            [vec![1; 8], vec![0; 40]].concat()
        );
        drop(file);
        power.restore();
        let again = power.backend(open(&path)).unwrap();
        assert_eq!(
            again.read(0, 48).unwrap(),
            [vec![1; 8], vec![0; 40]].concat()
        );
        assert!(
            d.read(0, 8).is_err(),
            "a backend from before the cut stays dead"
        );
    }

    #[test]
    fn a_shrink_then_a_growth_before_the_sync_reads_zeros_and_reaches_the_file() {
        let (_dir, path, _power, d) = disk(0);
        d.write(0, &[7; 64]).unwrap();
        d.sync_data(false).unwrap();
        d.write(20, &[8; 8]).unwrap();
        d.set_len(24).unwrap();
        assert_eq!(d.len().unwrap(), 24);
        assert_eq!(d.read(16, 8).unwrap(), [[7; 4], [8; 4]].concat());
        assert!(d.read(16, 9).is_err());
        d.set_len(40).unwrap();
        assert_eq!(
            d.read(16, 24).unwrap(),
            [vec![7; 4], vec![8; 4], vec![0; 16]].concat(),
            "what the shrink cut off reads as zeros, in the file and in the held write"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![7; 64],
            "not before the sync"
        );
        d.sync_data(false).unwrap();
        let want = [vec![7; 20], vec![8; 4], vec![0; 16]].concat();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(d.read(0, 40).unwrap(), want);
    }

    #[test]
    fn overlapping_writes_join_into_one_extent_and_the_later_one_wins() {
        let (_dir, path, _power, d) = disk(64);
        d.write(0, &[1; 8]).unwrap();
        d.write(16, &[2; 8]).unwrap();
        d.write(32, &[3; 8]).unwrap();
        // Over the end of the first, the whole second and the start of the third.
        d.write(4, &[4; 32]).unwrap();
        d.write(10, &[5; 2]).unwrap();
        let want = [vec![1; 4], vec![4; 6], vec![5; 2], vec![4; 24], vec![3; 4]].concat();
        assert_eq!(d.read(0, 40).unwrap(), want);
        {
            let state = d.lock().unwrap();
            let extents: Vec<(u64, usize)> = (state.unsynced.extents.iter())
                .map(|(&o, w)| (o, w.len()))
                .collect();
            assert_eq!(extents, [(0, 40)]);
        }
        d.write(48, &[6; 4]).unwrap();
        d.write(46, &[9; 2]).unwrap();
        assert_eq!(
            d.lock().unwrap().unsynced.extents.len(),
            3,
            "touching is not overlapping"
        );
        d.sync_data(false).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[..40], &want[..]);
        assert_eq!(&file[46..52], &[9, 9, 6, 6, 6, 6]);
    }

    /// A cut in the middle of a write-out leaves the extents before it in the file and none
    /// after; one armed past the last extent of a write-out waits for one with more to write.
    #[test]
    fn a_cut_during_a_write_out_tears_it_after_the_given_extent() {
        let (_dir, path, power, d) = disk(64);
        power.cut_during_write_out(2);
        d.write(0, &[1; 4]).unwrap();
        d.write(16, &[2; 4]).unwrap();
        d.sync_data(false).unwrap();
        assert!(!power.is_off(), "the second extent was the last");
        d.write(0, &[3; 4]).unwrap();
        d.write(16, &[4; 4]).unwrap();
        d.write(32, &[5; 4]).unwrap();
        assert!(d.sync_data(false).is_err());
        assert!(power.is_off());
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            (&file[0..4], &file[16..20], &file[32..36]),
            (&[3; 4][..], &[2; 4][..], &[0; 4][..])
        );
    }
}
