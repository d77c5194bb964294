//! A storage backend that holds redb's page writes in memory until the next `sync_data`, and
//! can run that write-out and sync in the background.
//!
//! redb keeps a transaction's dirty pages in a write buffer of a tenth of its cache
//! (`store.cache_mb`). A batch of MQTT steps across thousands of instances dirties more than
//! that (one instance leaf per message), so redb writes
//! the oldest dirty pages to the file in the middle of the transaction, and reads them back
//! with `pread` when a later step of the same transaction touches them again; then the commit
//! writes them once more. Each of those is a system call and a copy through the kernel.
//!
//! Here those writes land in a map instead, a read of a held page is answered from it, and
//! `sync_data` writes everything held, in file order with contiguous pages coalesced into one
//! `pwrite`, before it syncs. Nothing changes for durability: a write is only durable after
//! `sync_data` in either case, and redb syncs before and after it writes the commit's header,
//! so the order the commit protocol relies on is kept. What a `SIGKILL` loses is the same as
//! with plain file writes: nothing that a sync covered.
//!
//! The map is bounded (its *window*, `store.write_window_mb`, [`MAX_HELD`] by default): past
//! it, what is held joins the sync thread's queue (below) as a job that is written out but not
//! synced, as redb would have written it, and the writer thread goes on without waiting for
//! the device (it used to write it out itself, after waiting for the last commit's sync).
//! `set_len` and a write or read that overlaps a held write partially write out what is held
//! first (redb does not do that in practice: it reads and writes the same page ranges), so the
//! order of writes to any byte never changes.
//!
//! # Write-out and sync in the background
//! The writer thread may ask for the syncs of a commit to be *deferred*
//! ([`Durability::defer`]). `sync_data` then queues what is held, as one job, for this
//! backend's sync thread, which writes each job out and syncs it, in order; redb's commit
//! returns at once, and the writer builds the next transaction while the device flushes the
//! last one. It answers the committed requests only when [`Durability::wait`] says their
//! syncs are done. A commit makes one sync (its pages and its header; redb's checksums tell
//! a torn commit from a whole one), or two with `store.quick_repair` (redb's two-phase
//! commit: its pages and the new header slot, then the header's switch to that slot). Each
//! is a job, so the whole commit overlaps the next batch.
//!
//! The order of writes on the device is unchanged: jobs are written out one after the other,
//! each synced before the next is written, and what is held joins the queue behind them; a
//! write-out or `set_len` in the caller waits for the queue to drain first. So a commit is
//! durable before any later page reaches the file — it can never be torn by the next one
//! reusing its freed pages, with or without power. Until a job is in the file, reads of its
//! pages are answered from it. At most a window's bytes wait in the queue; past that,
//! `sync_data` waits for it.
//!
//! The window also decides how often a page reaches the file. redb keeps a transaction's
//! dirty pages in a write buffer of a tenth of its cache; past that it evicts them to this
//! backend and reads them back here when it changes them again. A page written again while
//! it is held is written once; a page written again after its first write joined the queue is
//! written twice. A large MQTT batch writes about half of its pages here more than once, so a
//! bigger window writes fewer bytes per heartbeat to the file, for more memory while a backlog
//! drains (the figures per window size: docs/performance.md, "Figures from code comments").
//!
//! redb makes a commit visible to new read transactions as soon as its commit returns, so a
//! reader could see a commit that is not yet durable, and a crash would then take back what it
//! was shown. [`Durability::wait_visible`] closes that gap: a read transaction waits for the
//! syncs of every commit it can see (`Store::read` does it for every reader), one commit's at
//! most.
//!
//! A write-out or sync that fails in the background is reported to the requests of its commit
//! and sticks: nothing more reaches the file, every later write-out in the caller fails, so
//! redb's next commit fails and the writer reopens the database, which then reads only what
//! the device holds.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::StorageBackend;

/// The default window (`store.write_window_mb`): bytes held before they are written out
/// without waiting for a sync, and bytes queued for the sync thread before `sync_data` waits
/// for it.
pub const MAX_HELD: usize = 16 << 20;
/// Largest single coalesced write.
const MAX_RUN: usize = 1 << 20;

#[derive(Debug, Default)]
struct Held {
    /// offset → bytes written there, not yet passed on.
    writes: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    /// Length of the longest held write (bounds the search for overlaps).
    longest: usize,
}

impl Held {
    /// How held writes overlap `offset..offset + len`.
    fn overlap(&self, offset: u64, len: usize) -> Overlap {
        let end = offset.saturating_add(len as u64);
        let mut hits = self
            .writes
            .range(offset.saturating_sub(self.longest as u64)..end)
            .filter(move |(&o, w)| o + w.len() as u64 > offset);
        match (hits.next(), hits.next()) {
            (None, _) => Overlap::None,
            (Some((&o, w)), None) if o == offset && w.len() == len => Overlap::Exact,
            _ => Overlap::Partial,
        }
    }

    fn end(&self) -> u64 {
        self.writes
            .last_key_value()
            .map_or(0, |(&o, w)| o + w.len() as u64)
    }

    /// Writes everything to `file`, in offset order, contiguous writes as one, gathered in
    /// `buf` (the sync thread keeps one: a thread at rest does not give back memory it freed,
    /// so it should allocate none as it goes).
    fn write_to(&self, file: &impl StorageBackend, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut start = 0;
        buf.clear();
        for (&offset, data) in &self.writes {
            let joins = start + buf.len() as u64 == offset && buf.len() + data.len() <= MAX_RUN;
            if !joins && !buf.is_empty() {
                file.write(start, buf)?;
                buf.clear();
            }
            if buf.is_empty() {
                start = offset;
            }
            buf.extend_from_slice(data);
        }
        if !buf.is_empty() {
            file.write(start, buf)?;
            buf.clear();
        }
        Ok(())
    }
}

enum Overlap {
    None,
    /// One held write of exactly this range.
    Exact,
    Partial,
}

/// Which syncs are done: shared by a store's [`WriteBack`], its sync thread, the writer thread
/// (which defers syncs and waits for them) and readers. It outlives a reopen of the database.
#[derive(Debug, Default)]
pub struct Durability {
    /// Set by the writer thread around a commit whose syncs may finish in the background.
    defer: AtomicBool,
    syncs: Mutex<Syncs>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Syncs {
    /// Jobs queued so far, and the number of the last one done (written out, and synced if it
    /// asked for it; a sync covers every write before it).
    requested: u64,
    done: u64,
    /// Jobs not yet done, oldest first: (number, writes, whether a sync follows them). A job
    /// leaves once it is written (and synced, if it asks for it).
    jobs: VecDeque<(u64, Arc<Held>, bool)>,
    queued_bytes: usize,
    /// Jobs synced, to be freed by the thread that built them (the next `sync_data`): mimalloc
    /// returns a page to the system only once its owner thread has collected the blocks other
    /// threads freed on it, and a writer at rest would not.
    finished: Vec<Arc<Held>>,
    /// A background write-out or sync failed: the number of the first job that did, and what
    /// the device said (its kind tells a full disk from a failing one). Sticks until the
    /// database reopens.
    failed: Option<(u64, io::ErrorKind, String)>,
    /// Jobs of handles since reopened that were not written (from the failed one to the
    /// last): their commits stay refused, however late their answer is collected.
    lost: Vec<(u64, u64)>,
    /// The sync thread is to finish the queue and stop.
    stop: bool,
}

impl Durability {
    fn lock(&self) -> MutexGuard<'_, Syncs> {
        // Nothing panics while holding it; a poisoned lock still holds consistent numbers.
        self.syncs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_while<'a>(
        &self,
        guard: MutexGuard<'a, Syncs>,
        busy: impl FnMut(&mut Syncs) -> bool,
    ) -> MutexGuard<'a, Syncs> {
        self.changed
            .wait_while(guard, busy)
            .unwrap_or_else(|p| p.into_inner())
    }

    /// While on, `sync_data` queues its write-out and sync for the sync thread and returns.
    /// Only the writer thread turns it on, around a commit; it must then
    /// [`Durability::wait`] for the [`Durability::ticket`] before it answers anyone.
    pub fn defer(&self, on: bool) {
        self.defer.store(on, Ordering::SeqCst);
    }

    /// The job whose sync makes everything committed so far durable.
    pub fn ticket(&self) -> u64 {
        self.lock().requested
    }

    /// Waits until job `ticket` is synced; an error if it was not (it or an earlier job
    /// failed).
    pub fn wait(&self, ticket: u64) -> io::Result<()> {
        let s = self.wait_while(self.lock(), |s| s.done < ticket);
        if s.lost
            .iter()
            .any(|&(from, to)| (from..=to).contains(&ticket))
        {
            return Err(io::Error::other(
                "a background write or sync failed; the database was reopened",
            ));
        }
        match &s.failed {
            Some((from, ..)) if ticket >= *from => failure(&s),
            _ => Ok(()),
        }
    }

    /// Waits until every commit that a read transaction begun before this call can see is
    /// durable. A commit becomes visible only after its syncs were queued, so the jobs queued
    /// by now cover it. A failure does not hold readers: the writer reopens the database at
    /// its next commit.
    pub fn wait_visible(&self) {
        let _ = self.wait(self.ticket());
    }
}

fn failure(s: &Syncs) -> io::Result<()> {
    match &s.failed {
        Some((_, kind, e)) => Err(io::Error::new(
            *kind,
            format!("a background write or sync failed: {e}"),
        )),
        None => Ok(()),
    }
}

/// Writes out and syncs the queued jobs, one at a time, until told to stop.
fn sync_thread<B: StorageBackend>(file: Arc<B>, durability: Arc<Durability>) {
    let mut buf = Vec::with_capacity(MAX_RUN);
    loop {
        let s = durability.wait_while(durability.lock(), |s| s.done == s.requested && !s.stop);
        // The oldest job not done (after a failure, done jobs stay in the queue).
        let Some((n, job, sync)) = s.jobs.iter().find(|(n, ..)| *n > s.done).cloned() else {
            return;
        };
        let failed = s.failed.is_some();
        drop(s);
        // After a failure nothing more reaches the file; the jobs stay to answer reads.
        let outcome = if failed {
            Ok(())
        } else {
            job.write_to(&*file, &mut buf).and_then(|()| match sync {
                true => file.sync_data(false),
                false => Ok(()),
            })
        };
        let mut s = durability.lock();
        s.done = n;
        if let Err(e) = outcome {
            tracing::error!(error = %e, "store: a background write-out or sync failed");
            s.failed.get_or_insert_with(|| (n, e.kind(), e.to_string()));
        }
        if s.failed.is_none() {
            s.jobs.pop_front();
            s.queued_bytes -= job.bytes;
            s.finished.push(job);
        }
        durability.changed.notify_all();
    }
}

#[derive(Debug)]
pub struct WriteBack<B: StorageBackend> {
    inner: Arc<B>,
    held: Mutex<Held>,
    durability: Arc<Durability>,
    syncer: Option<std::thread::JoinHandle<()>>,
    /// Bytes held, and bytes queued, before a write-out ([`MAX_HELD`] by default).
    window: usize,
}

impl<B: StorageBackend> WriteBack<B> {
    /// Wraps `inner`; deferred write-outs and syncs run on a thread of its own. What an
    /// earlier handle on the file left in `durability` (a failure, jobs it could not write)
    /// is forgotten: this one starts from what the file holds. Tests use it; the store sets
    /// its window ([`WriteBack::with_window`]).
    #[cfg(test)]
    pub fn new(inner: B, durability: Arc<Durability>) -> io::Result<Self> {
        Self::with_window(inner, durability, MAX_HELD)
    }

    /// [`WriteBack::new`] with a window of `window` bytes (at least one page's worth is
    /// always held).
    pub fn with_window(inner: B, durability: Arc<Durability>, window: usize) -> io::Result<Self> {
        let inner = Arc::new(inner);
        {
            let mut s = durability.lock();
            if let Some((from, ..)) = s.failed.take() {
                let to = s.requested;
                s.lost.push((from, to));
            }
            s.stop = false;
            s.jobs.clear();
            s.finished.clear();
            s.queued_bytes = 0;
            s.done = s.requested;
            durability.changed.notify_all();
        }
        let syncer = {
            let (inner, durability) = (inner.clone(), durability.clone());
            std::thread::Builder::new()
                .name("smgate-sync".into())
                .spawn(move || sync_thread(inner, durability))?
        };
        Ok(WriteBack {
            inner,
            held: Mutex::new(Held::default()),
            durability,
            syncer: Some(syncer),
            window,
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Held>> {
        self.held
            .lock()
            .map_err(|_| io::Error::other("write-back buffer poisoned"))
    }

    /// Waits until the queue is written out and synced, before the file is touched here.
    fn settled(&self) -> io::Result<()> {
        let d = &self.durability;
        let s = d.wait_while(d.lock(), |s| s.done < s.requested);
        failure(&s)
    }

    /// Writes everything held to the file, after the queue.
    fn write_out(&self, held: &mut Held) -> io::Result<()> {
        self.settled()?;
        let writes = std::mem::take(held);
        writes.write_to(&*self.inner, &mut Vec::new())
    }

    /// Moves what is held to the end of the sync thread's queue, as one job, synced after it is
    /// written if `sync`. The caller keeps `held` locked, so no read misses the writes on
    /// their way. Waits while more than a window's bytes are queued.
    fn enqueue(&self, held: &mut Held, sync: bool) -> io::Result<()> {
        let job = Arc::new(std::mem::take(held));
        let d = &self.durability;
        let mut s = d.wait_while(d.lock(), |s| {
            s.queued_bytes > self.window && s.done < s.requested
        });
        let finished = std::mem::take(&mut s.finished);
        failure(&s)?;
        s.requested += 1;
        s.queued_bytes += job.bytes;
        let n = s.requested;
        s.jobs.push_back((n, job, sync));
        d.changed.notify_all();
        drop(s);
        drop(finished);
        Ok(())
    }

    /// A read answered by the queue: the newest job that holds exactly this range. `Err` when
    /// a job overlaps it partly (the caller then waits for the queue and reads the file).
    fn read_queued(&self, offset: u64, len: usize) -> Result<Option<Vec<u8>>, ()> {
        let s = self.durability.lock();
        for (_, job, _) in s.jobs.iter().rev() {
            match job.overlap(offset, len) {
                Overlap::None => {}
                Overlap::Exact => return Ok(Some(job.writes[&offset].clone())),
                Overlap::Partial => return Err(()),
            }
        }
        Ok(None)
    }
}

impl<B: StorageBackend> StorageBackend for WriteBack<B> {
    fn len(&self) -> Result<u64, io::Error> {
        let held = self.lock()?.end();
        let queued = (self.durability.lock().jobs.iter())
            .map(|(_, j, _)| j.end())
            .max()
            .unwrap_or(0);
        Ok(self.inner.len()?.max(held).max(queued))
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let mut held = self.lock()?;
        match held.overlap(offset, len) {
            Overlap::Exact => return Ok(held.writes[&offset].clone()),
            Overlap::None => {
                drop(held);
                match self.read_queued(offset, len) {
                    Ok(Some(data)) => return Ok(data),
                    Ok(None) => {}
                    Err(()) => self.settled()?,
                }
            }
            Overlap::Partial => {
                // A partial overlap: let the file answer, with everything held written first.
                self.write_out(&mut held)?;
                drop(held);
            }
        }
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut held = self.lock()?;
        self.settled()?;
        // Held writes happened before this call: past a new end they are cut off with the
        // rest, and they go out after the file has grown to hold them.
        if len < self.inner.len()? {
            self.write_out(&mut held)?;
            self.inner.set_len(len)
        } else {
            self.inner.set_len(len)?;
            self.write_out(&mut held)
        }
    }

    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        let mut held = self.lock()?;
        if !self.durability.defer.load(Ordering::SeqCst) {
            self.write_out(&mut held)?;
            drop(held);
            return self.inner.sync_data(eventual);
        }
        self.enqueue(&mut held, true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut held = self.lock()?;
        match held.overlap(offset, data.len()) {
            Overlap::None => {}
            Overlap::Exact => {
                if let Some(w) = held.writes.get_mut(&offset) {
                    w.copy_from_slice(data);
                }
                return Ok(());
            }
            Overlap::Partial => self.write_out(&mut held)?,
        }
        held.writes.insert(offset, data.to_vec());
        held.bytes += data.len();
        held.longest = held.longest.max(data.len());
        if held.bytes > self.window {
            self.enqueue(&mut held, false)?;
        }
        Ok(())
    }
}

impl<B: StorageBackend> Drop for WriteBack<B> {
    /// The queue and what is held reach the file, as plain writes would have (the queue
    /// synced, what is held not); then the sync thread stops.
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            if let Err(e) = self.write_out(&mut held) {
                tracing::warn!(error = %e, "store: held page writes not written at close");
            }
        }
        self.durability.lock().stop = true;
        self.durability.changed.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::backends::InMemoryBackend;

    fn backend() -> WriteBack<InMemoryBackend> {
        let inner = InMemoryBackend::new();
        inner.set_len(64).unwrap();
        WriteBack::new(inner, Arc::default()).unwrap()
    }

    #[test]
    fn held_writes_are_read_back_and_reach_the_file_on_sync() {
        let b = backend();
        b.write(0, &[1; 8]).unwrap();
        b.write(8, &[2; 8]).unwrap();
        b.write(32, &[3; 8]).unwrap();
        assert_eq!(b.read(8, 8).unwrap(), vec![2; 8]);
        // Not in the file yet.
        assert_eq!(b.inner.read(8, 8).unwrap(), vec![0; 8]);
        b.write(8, &[4; 8]).unwrap();
        assert_eq!(b.held.lock().unwrap().bytes, 24);
        b.sync_data(false).unwrap();
        assert_eq!(b.inner.read(0, 16).unwrap(), [[1; 8], [4; 8]].concat());
        assert_eq!(b.inner.read(32, 8).unwrap(), vec![3; 8]);
        assert!(b.held.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn partial_overlaps_keep_the_order_of_writes() {
        let b = backend();
        b.write(0, &[1; 16]).unwrap();
        // Overlaps the held write partially: the first write goes out before it is held.
        b.write(8, &[2; 16]).unwrap();
        assert_eq!(b.inner.read(0, 16).unwrap(), vec![1; 16]);
        // A read across both sees the second write over the first.
        assert_eq!(b.read(0, 24).unwrap(), [vec![1; 8], vec![2; 16]].concat());
        b.write(4, &[5; 4]).unwrap();
        b.sync_data(false).unwrap();
        assert_eq!(
            b.inner.read(0, 24).unwrap(),
            [vec![1; 4], vec![5; 4], vec![2; 16]].concat()
        );
    }

    #[test]
    fn growth_and_drop_pass_held_writes_on() {
        let b = backend();
        b.write(60, &[7; 8]).unwrap();
        assert_eq!(b.len().unwrap(), 68);
        b.set_len(128).unwrap();
        assert_eq!(b.inner.read(60, 8).unwrap(), vec![7; 8]);
        b.set_len(64).unwrap();
        assert_eq!(b.len().unwrap(), 64);

        let g = Gated::default();
        g.file.set_len(16).unwrap();
        let b = WriteBack::new(g.clone(), Arc::default()).unwrap();
        b.write(0, &[9; 4]).unwrap();
        assert_eq!(g.file.read(0, 4).unwrap(), vec![0; 4]);
        drop(b);
        assert_eq!(g.file.read(0, 4).unwrap(), vec![9; 4]);
    }

    /// A file that logs what reaches it, whose syncs wait for the test to let each one
    /// through (`release`), and fail while `fail` is set.
    #[derive(Debug, Clone, Default)]
    struct Gated {
        file: Arc<InMemoryBackend>,
        log: Arc<Mutex<Vec<String>>>,
        permits: Arc<(Mutex<u32>, Condvar)>,
        fail: Arc<AtomicBool>,
    }

    impl Gated {
        fn release(&self, n: u32) {
            *self.permits.0.lock().unwrap() += n;
            self.permits.1.notify_all();
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl StorageBackend for Gated {
        fn len(&self) -> Result<u64, io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
            self.log.lock().unwrap().push("sync".into());
            let mut permits = self.permits.0.lock().unwrap();
            while *permits == 0 {
                permits = self.permits.1.wait(permits).unwrap();
            }
            *permits -= 1;
            drop(permits);
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.log.lock().unwrap().push("synced".into());
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.log.lock().unwrap().push(format!("write {offset}"));
            self.file.write(offset, data)
        }
    }

    /// Runs `f` on a thread; its result arrives on the returned channel.
    fn on_thread<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(10);
    const SHORT: std::time::Duration = std::time::Duration::from_millis(100);

    /// Lets every sync through when dropped, so that a failing test unwinds instead of
    /// hanging in the backend's drop (declare it after the backend: it must drop first).
    struct OpenOnDrop(Gated);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.release(1_000);
        }
    }

    /// A page written again while it is held reaches the file once; written again after its
    /// first write left the window (here one page wide), it reaches the file twice. Either way
    /// the file ends with the last bytes written to each page.
    #[test]
    fn a_page_written_again_within_the_window_reaches_the_file_once() {
        const PAGE: usize = 4096;
        // Pages apart, so that no two writes are coalesced into one.
        let pages: Vec<u64> = (0..4).map(|i| (2 * i * PAGE) as u64).collect();
        for (window, writes) in [(4 * PAGE, 4), (PAGE, 8)] {
            let g = Gated::default();
            g.file.set_len((8 * PAGE) as u64).unwrap();
            let b = WriteBack::with_window(g.clone(), Arc::default(), window).unwrap();
            let _open = OpenOnDrop(g.clone());
            for round in 1..=2u8 {
                for &p in &pages {
                    b.write(p, &[round; PAGE]).unwrap();
                }
            }
            g.release(1);
            b.sync_data(false).unwrap();
            let log = g.log();
            let written = log.iter().filter(|l| l.starts_with("write")).count();
            assert_eq!(written, writes, "window {window}: {log:?}");
            for &p in &pages {
                assert_eq!(g.file.read(p, PAGE).unwrap(), vec![2; PAGE]);
            }
        }
    }

    /// Waits until the log has `n` entries (the sync thread writes in the background).
    fn log_reaches(g: &Gated, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + LONG;
        while g.log().len() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        g.log()
    }

    #[test]
    fn deferred_syncs_return_at_once_and_each_job_reaches_the_file_after_the_last_is_synced() {
        let g = Gated::default();
        g.file.set_len(64).unwrap();
        let d = Arc::new(Durability::default());
        let b = WriteBack::new(g.clone(), d.clone()).unwrap();
        let _open = OpenOnDrop(g.clone());
        b.write(0, &[1; 8]).unwrap();
        d.defer(true);
        // No sync is let through, yet sync_data returns: the sync thread writes and waits.
        b.sync_data(false).unwrap();
        assert_eq!(d.ticket(), 1);
        assert_eq!(log_reaches(&g, 2), ["write 0", "sync"]);
        let durable = on_thread({
            let d = d.clone();
            move || d.wait(1)
        });
        // The next commit queues behind the first, and its pages are read from the queue.
        b.write(8, &[2; 8]).unwrap();
        b.sync_data(false).unwrap();
        assert_eq!(d.ticket(), 2);
        // A reader that starts now sees both commits, so it waits for both syncs (started
        // before the second commit, it would rightly wait for the first only).
        let visible = on_thread({
            let d = d.clone();
            move || d.wait_visible()
        });
        assert_eq!(b.read(8, 8).unwrap(), vec![2; 8]);
        assert_eq!(g.file.read(8, 8).unwrap(), vec![0; 8]);
        assert_eq!(b.len().unwrap(), 64);
        assert!(
            durable.recv_timeout(SHORT).is_err(),
            "durable before its sync"
        );
        assert!(
            visible.recv_timeout(SHORT).is_err(),
            "visible before its sync"
        );
        assert_eq!(
            g.log(),
            ["write 0", "sync"],
            "written before the last job synced"
        );
        g.release(1);
        durable.recv_timeout(LONG).unwrap().unwrap();
        assert_eq!(
            log_reaches(&g, 5),
            ["write 0", "sync", "synced", "write 8", "sync"]
        );
        assert!(
            visible.recv_timeout(SHORT).is_err(),
            "visible before the last sync"
        );
        g.release(1);
        d.wait(2).unwrap();
        visible.recv_timeout(LONG).unwrap();
        assert_eq!(log_reaches(&g, 6)[5], "synced");
        // Not deferred: the write-out and sync run in the caller, as plain redb expects.
        d.defer(false);
        b.write(16, &[3; 8]).unwrap();
        g.release(1);
        b.sync_data(false).unwrap();
        assert_eq!(d.ticket(), 2);
        assert_eq!(g.log()[6..], ["write 16", "sync", "synced"]);
        assert_eq!(
            g.file.read(0, 24).unwrap(),
            [[1; 8], [2; 8], [3; 8]].concat()
        );
    }

    /// Past [`MAX_HELD`], what is held joins the queue as a job that is written but not
    /// synced: the writer does not wait for the sync of the commit before it, nothing of the
    /// new transaction reaches the file before that sync, and its pages are read from the
    /// queue until then.
    #[test]
    fn writes_past_the_limit_queue_behind_the_last_commit_without_waiting_for_its_sync() {
        let g = Gated::default();
        let page = 1 << 20;
        let pages = (MAX_HELD / page) as u64 + 1;
        g.file.set_len((pages + 1) * page as u64).unwrap();
        let d = Arc::new(Durability::default());
        let b = WriteBack::new(g.clone(), d.clone()).unwrap();
        let _open = OpenOnDrop(g.clone());
        // A commit whose sync is held back.
        b.write(0, &[1; 8]).unwrap();
        d.defer(true);
        b.sync_data(false).unwrap();
        d.defer(false);
        assert_eq!(log_reaches(&g, 2), ["write 0", "sync"]);
        // The next transaction writes more than MAX_HELD: every write returns at once.
        let big = vec![7u8; page];
        for i in 1..=pages {
            b.write(i * page as u64, &big).unwrap();
        }
        assert_eq!(d.ticket(), 2, "the excess is a job of its own");
        assert_eq!(b.held.lock().unwrap().bytes, 0);
        assert_eq!(
            b.read(page as u64, page).unwrap(),
            big,
            "read from the queue"
        );
        std::thread::sleep(SHORT);
        assert_eq!(g.log(), ["write 0", "sync"], "written before the last sync");
        assert_eq!(g.file.read(page as u64, 8).unwrap(), vec![0; 8]);
        g.release(1);
        d.wait(2).unwrap();
        let log = log_reaches(&g, 4);
        assert_eq!(log[..3], ["write 0", "sync", "synced"]);
        assert!(
            log[3..].iter().all(|l| l.starts_with("write ")),
            "the excess is written, not synced: {log:?}"
        );
        assert_eq!(g.file.read(page as u64, page).unwrap(), big);
    }

    #[test]
    fn a_failed_background_sync_fails_its_commit_and_every_later_write_until_reopened() {
        let g = Gated::default();
        g.file.set_len(64).unwrap();
        g.release(100);
        let d = Arc::new(Durability::default());
        let b = WriteBack::new(g.clone(), d.clone()).unwrap();
        d.defer(true);
        b.write(0, &[1; 8]).unwrap();
        b.sync_data(false).unwrap();
        d.wait(1).unwrap();
        g.fail.store(true, Ordering::SeqCst);
        b.write(8, &[2; 8]).unwrap();
        b.sync_data(false).unwrap();
        let e = d.wait(2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        d.wait(1).unwrap();
        b.write(16, &[3; 8]).unwrap();
        assert!(
            b.sync_data(false).is_err(),
            "a write-out after a failed sync"
        );
        assert!(b.set_len(128).is_err());
        // Readers are not held (the writer reopens at its next commit).
        d.wait_visible();
        d.defer(false);
        drop(b);
        g.fail.store(false, Ordering::SeqCst);
        let b = WriteBack::new(g.clone(), d.clone()).unwrap();
        // The failed job stays failed for an answer collected after the reopen.
        assert!(d.wait(2).is_err());
        d.wait(1).unwrap();
        d.defer(true);
        b.write(8, &[2; 8]).unwrap();
        b.sync_data(false).unwrap();
        assert_eq!(d.ticket(), 3);
        d.wait(3).unwrap();
        assert_eq!(g.file.read(8, 8).unwrap(), vec![2; 8]);
        d.defer(false);
    }

    #[test]
    fn a_redb_reader_waits_for_the_sync_of_a_commit_it_can_see() {
        use redb::{Database, TableDefinition};
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let g = Gated::default();
        g.release(1_000);
        let d = Arc::new(Durability::default());
        let db = Arc::new(
            Database::builder()
                .create_with_backend(WriteBack::new(g.clone(), d.clone()).unwrap())
                .unwrap(),
        );
        *g.permits.0.lock().unwrap() = 0;
        d.defer(true);
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(1, 10).unwrap();
        txn.commit().unwrap();
        d.defer(false);
        let read = on_thread({
            let (db, d) = (db.clone(), d.clone());
            move || {
                let txn = db.begin_read().unwrap();
                d.wait_visible();
                let t = txn.open_table(T).unwrap();
                t.get(1).unwrap().map(|v| v.value())
            }
        });
        assert!(
            read.recv_timeout(SHORT).is_err(),
            "read a commit before its sync"
        );
        g.release(1_000);
        assert_eq!(read.recv_timeout(LONG).unwrap(), Some(10));
    }
}
