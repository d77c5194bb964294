//! A file backend that can be told the disk is full: the file may not grow past its size at the
//! moment the limit is switched on. That is what ENOSPC looks like to redb (writes into
//! already-allocated pages still succeed), so tests exercise the real error paths of the store.
//! It can also be told that the next fsync is slow (a busy SD card), for the paths that must
//! cope with a commit that takes longer than a Zeqond.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
