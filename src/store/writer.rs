//! The one writer: group commit over a queue of write requests.
//!
//! Requests wait in a bounded queue. The writer thread takes the first, then everything else
//! already queued (up to `max_batch`), runs them all in one write transaction, commits once
//! (one fsync), and only then answers each request. Under load the batch grows by itself, so
//! fsyncs per request fall as the request rate rises; an idle gateway commits each request at
//! once. The thread is a plain OS thread because commits block on fsync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use redb::WriteTransaction;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Store, StoreError};

/// Runs a request inside the batch transaction and returns how to answer it once the commit
/// outcome is known.
/// Without a transaction (the database could not begin one) it answers with that error.
type Run = Box<dyn FnOnce(Result<&WriteTransaction, StoreError>) -> Finish + Send>;
type Finish = Box<dyn FnOnce(Option<StoreError>) + Send>;

enum Job {
    Write(Run),
    /// Commit what is queued before it, then stop.
    Stop(oneshot::Sender<()>),
}

/// Commit statistics for `/metrics`.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub failed_commits: AtomicU64,
    /// Batch-size histogram: counts of batches with size ≤ 1, 2, 4, … 1024, +Inf.
    pub size_buckets: Mutex<[u64; 12]>,
    /// Commit latency histogram, seconds: ≤ .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, +Inf.
    pub latency_buckets: Mutex<[u64; 11]>,
    pub latency_sum_us: AtomicU64,
}

pub const SIZE_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
pub const LATENCY_BOUNDS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

impl BatchStats {
    fn record(&self, size: usize, seconds: f64, ok: bool) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(size as u64, Ordering::Relaxed);
        if !ok {
            self.failed_commits.fetch_add(1, Ordering::Relaxed);
        }
        let si = SIZE_BOUNDS
            .iter()
            .position(|b| size as u64 <= *b)
            .unwrap_or(SIZE_BOUNDS.len());
        let li = LATENCY_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        if let Ok(mut s) = self.size_buckets.lock() {
            s[si] += 1;
        }
        if let Ok(mut l) = self.latency_buckets.lock() {
            l[li] += 1;
        }
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

/// Handle to the writer thread; clone it freely.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Job>,
    stats: Arc<BatchStats>,
    commits: watch::Receiver<u64>,
}

impl GroupCommit {
    /// Starts the writer thread for `store`.
    pub fn start(store: Arc<Store>) -> GroupCommit {
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(BatchStats::default());
        let thread_stats = stats.clone();
        let (commit_tx, commits) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("smgate-writer".into())
            .spawn(move || writer_loop(store, rx, thread_stats, commit_tx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the writer thread"));
        GroupCommit { tx, stats, commits }
    }

    /// Changes after every successful commit (the value counts commits). Live readers such
    /// as SSE streams wait on it instead of polling the store.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Runs `f` in the next batch transaction and answers after that transaction is durable.
    ///
    /// `f` must return `Err` before writing anything if it fails (see the module doc of
    /// `store`): the transaction is shared with other requests.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&WriteTransaction) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, E>>();
        let run: Run = Box::new(move |txn| {
            let outcome = match txn {
                Ok(txn) => f(txn),
                Err(e) => Err(E::from(e)),
            };
            Box::new(move |commit_error| {
                let answer = match (outcome, commit_error) {
                    (Ok(_), Some(e)) => Err(E::from(e)),
                    (outcome, _) => outcome,
                };
                let _ = reply_tx.send(answer);
            })
        });
        self.tx
            .send(Job::Write(run))
            .await
            .map_err(|_| E::from(StoreError::ShuttingDown))?;
        reply_rx
            .await
            .unwrap_or_else(|_| Err(E::from(StoreError::ShuttingDown)))
    }

    /// Commits everything queued so far and stops the writer; later writes get `ShuttingDown`.
    pub async fn shutdown(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Job::Stop(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

fn writer_loop(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Job>,
    stats: Arc<BatchStats>,
    commits: watch::Sender<u64>,
) {
    let max_batch = store.options().max_batch.max(1);
    let mut batch: Vec<Run> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        let mut stop = None;
        match first {
            Job::Write(run) => batch.push(run),
            Job::Stop(done) => stop = Some(done),
        }
        while stop.is_none() && batch.len() < max_batch {
            match rx.try_recv() {
                Ok(Job::Write(run)) => batch.push(run),
                Ok(Job::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && commit_batch(&store, &mut batch, &stats) {
            commits.send_modify(|n| *n += 1);
        }
        if let Some(done) = stop {
            rx.close();
            // Requests that raced the stop are dropped unrun: dropping a request drops its
            // reply sender, and the waiting caller then sees `ShuttingDown`.
            while rx.try_recv().is_ok() {}
            // Release the database before answering, so the caller can reopen the file.
            drop(store);
            let _ = done.send(());
            return;
        }
    }
}

/// Runs and commits one batch; true when the commit succeeded.
fn commit_batch(store: &Store, batch: &mut Vec<Run>, stats: &BatchStats) -> bool {
    let started = Instant::now();
    let size = batch.len();
    let begun = store.database().and_then(|db| {
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(store.options().quick_repair);
        Ok(txn)
    });
    let (finishes, commit) = match begun {
        Ok(txn) => {
            let finishes: Vec<Finish> = batch.drain(..).map(|run| run(Ok(&txn))).collect();
            (finishes, txn.commit().map_err(StoreError::from))
        }
        Err(e) => {
            // No transaction: every request is answered with the error, none is run.
            for run in batch.drain(..) {
                run(Err(e.clone()))(None);
            }
            stats.record(size, started.elapsed().as_secs_f64(), false);
            tracing::error!(error = %e, "cannot begin a write transaction");
            recover(store, &e);
            return false;
        }
    };
    match commit {
        Ok(()) => {
            stats.record(size, started.elapsed().as_secs_f64(), true);
            for finish in finishes {
                finish(None);
            }
            true
        }
        Err(error) => {
            tracing::error!(error = %error, batch = size, "commit failed; batch refused");
            stats.record(size, started.elapsed().as_secs_f64(), false);
            // Reopen before answering, so a caller that reads right after its refusal finds
            // the store readable.
            recover(store, &error);
            for finish in finishes {
                finish(Some(error.clone()));
            }
            false
        }
    }
}

/// After an I/O error redb refuses every further operation on the handle; reopen it so that
/// readers keep working and the next batch can try again.
fn recover(store: &Store, error: &StoreError) {
    if matches!(
        error,
        StoreError::Full(_) | StoreError::Unavailable(_) | StoreError::Recovering
    ) {
        if let Err(e) = store.reopen() {
            tracing::error!(error = %e, "reopening the database failed; will retry on next write");
        }
    }
}
