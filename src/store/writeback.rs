//! A storage backend that holds redb's page writes in memory until the next `sync_data`.
//!
//! redb keeps a transaction's dirty pages in a write buffer of a tenth of its cache (1.6 MiB
//! with the default 16 MiB). A batch of MQTT steps across thousands of instances dirties more
//! than that (one instance leaf per message, about 4 MiB for 1,024 messages), so redb writes
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
//! The map is bounded ([`MAX_HELD`]): past it, what is held is written out at once, as redb
//! would have written it. `set_len` and a write or read that overlaps a held write partially
//! write out what is held first (redb does not do that in practice: it reads and writes the
//! same page ranges), so the order of writes to any byte never changes.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use redb::StorageBackend;

/// Bytes held before they are written out without waiting for a sync. A batch of MQTT steps
/// dirties at most one 4 KiB instance leaf per message (8 MiB for 2,048), plus the log's pages.
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
}

enum Overlap {
    None,
    /// One held write of exactly this range.
    Exact,
    Partial,
}

#[derive(Debug)]
pub struct WriteBack<B: StorageBackend> {
    inner: B,
    held: Mutex<Held>,
}

impl<B: StorageBackend> WriteBack<B> {
    pub fn new(inner: B) -> Self {
        WriteBack {
            inner,
            held: Mutex::new(Held::default()),
        }
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Held>> {
        self.held
            .lock()
            .map_err(|_| io::Error::other("write-back buffer poisoned"))
    }

    /// Writes everything held to `inner`, in offset order, contiguous writes as one.
    fn write_out(&self, held: &mut Held) -> io::Result<()> {
        let writes = std::mem::take(&mut held.writes);
        held.bytes = 0;
        held.longest = 0;
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (offset, data) in writes {
            match &mut run {
                Some((start, buf))
                    if *start + buf.len() as u64 == offset && buf.len() + data.len() <= MAX_RUN =>
                {
                    buf.extend_from_slice(&data)
                }
                _ => {
                    if let Some((start, buf)) = run.take() {
                        self.inner.write(start, &buf)?;
                    }
                    run = Some((offset, data));
                }
            }
        }
        if let Some((start, buf)) = run {
            self.inner.write(start, &buf)?;
        }
        Ok(())
    }
}

impl<B: StorageBackend> StorageBackend for WriteBack<B> {
    fn len(&self) -> Result<u64, io::Error> {
        let end = self.lock()?.end();
        Ok(self.inner.len()?.max(end))
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let mut held = self.lock()?;
        match held.overlap(offset, len) {
            Overlap::None => {
                drop(held);
                self.inner.read(offset, len)
            }
            Overlap::Exact => Ok(held.writes[&offset].clone()),
            Overlap::Partial => {
                // A partial overlap: let the file answer, with everything held written first.
                self.write_out(&mut held)?;
                drop(held);
                self.inner.read(offset, len)
            }
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut held = self.lock()?;
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
        self.write_out(&mut held)?;
        drop(held);
        self.inner.sync_data(eventual)
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
        if held.bytes > MAX_HELD {
            self.write_out(&mut held)?;
        }
        Ok(())
    }
}

impl<B: StorageBackend> Drop for WriteBack<B> {
    /// What is held reaches the file, as plain writes would have (not synced).
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            if let Err(e) = self.write_out(&mut held) {
                tracing::warn!(error = %e, "store: held page writes not written at close");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::backends::InMemoryBackend;
    use std::sync::Arc;

    fn backend() -> WriteBack<InMemoryBackend> {
        let inner = InMemoryBackend::new();
        inner.set_len(64).unwrap();
        WriteBack::new(inner)
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

        let file = Shared(Arc::new(InMemoryBackend::new()));
        file.set_len(16).unwrap();
        let b = WriteBack::new(Shared(file.0.clone()));
        b.write(0, &[9; 4]).unwrap();
        assert_eq!(file.read(0, 4).unwrap(), vec![0; 4]);
        drop(b);
        assert_eq!(file.read(0, 4).unwrap(), vec![9; 4]);
    }

    #[derive(Debug)]
    struct Shared(Arc<InMemoryBackend>);

    impl StorageBackend for Shared {
        fn len(&self) -> Result<u64, io::Error> {
            self.0.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
            self.0.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.0.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
            self.0.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.0.write(offset, data)
        }
    }
}
