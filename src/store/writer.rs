//! The one writer: group commit over a queue of write requests.
//!
//! Requests wait in a bounded queue. The writer thread takes the first, then everything else
//! already queued (up to `max_batch`), runs them all in one write transaction, commits once
//! (one fsync), and only then answers each request. Under load the batch grows by itself, so
//! fsyncs per request fall as the request rate rises; an idle gateway commits each request at
//! once. The thread is a plain OS thread because commits block on fsync.
//!
//! The commit's fsync itself runs in the background (module doc of `writeback`): the writer
//! hands the committed batch to a second thread, `smgate-durable`, which answers its requests
//! once the sync is done, and goes on to run the next batch meanwhile. So the device flushes
//! one batch while the CPU builds the next, and still nothing is answered before it is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;

use redb::WriteTransaction;
use tokio::sync::{mpsc, oneshot, watch};

use super::{io_error, Store, StoreError};

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

/// A committed batch whose sync may still be running: answered by [`answer_when_durable`].
struct Committed {
    ticket: u64,
    finishes: Vec<Finish>,
    started: Instant,
}

fn writer_loop(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Job>,
    stats: Arc<BatchStats>,
    commits: watch::Sender<u64>,
) {
    let (committed_tx, committed_rx) = std_mpsc::sync_channel::<Committed>(4);
    let durable = {
        let (store, stats) = (store.clone(), stats.clone());
        std::thread::Builder::new()
            .name("smgate-durable".into())
            .spawn(move || answer_when_durable(store, committed_rx, stats, commits))
    };
    let durable = match durable {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the thread that answers commits");
            return;
        }
    };
    let mut committed_tx = Some(committed_tx);
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
        if let (false, Some(tx)) = (batch.is_empty(), &committed_tx) {
            commit_batch(&store, &mut batch, &stats, tx);
        }
        if let Some(done) = stop {
            rx.close();
            // Requests that raced the stop are dropped unrun: dropping a request drops its
            // reply sender, and the waiting caller then sees `ShuttingDown`.
            while rx.try_recv().is_ok() {}
            // Answer what is committed, then release the database before answering the stop,
            // so the caller can reopen the file.
            committed_tx.take();
            let _ = durable.join();
            drop(store);
            let _ = done.send(());
            return;
        }
    }
}

/// Answers each committed batch once its sync is done, in commit order; counts the commit
/// for `/metrics` and wakes live readers.
fn answer_when_durable(
    store: Arc<Store>,
    committed: std_mpsc::Receiver<Committed>,
    stats: Arc<BatchStats>,
    commits: watch::Sender<u64>,
) {
    for c in committed {
        let synced = store.durability().wait(c.ticket);
        let size = c.finishes.len();
        stats.record(size, c.started.elapsed().as_secs_f64(), synced.is_ok());
        match synced {
            Ok(()) => {
                for finish in c.finishes {
                    finish(None);
                }
                commits.send_modify(|n| *n += 1);
            }
            Err(e) => {
                // The next commit fails on the same error and the writer reopens the store.
                tracing::error!(error = %e, batch = size, "sync failed; batch refused");
                let error = io_error(e);
                for finish in c.finishes {
                    finish(Some(error.clone()));
                }
            }
        }
    }
}

/// Runs and commits one batch, and passes it on to be answered when it is durable.
fn commit_batch(
    store: &Store,
    batch: &mut Vec<Run>,
    stats: &BatchStats,
    committed: &std_mpsc::SyncSender<Committed>,
) {
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
            store.durability().defer(true);
            let commit = txn.commit().map_err(StoreError::from);
            store.durability().defer(false);
            (finishes, commit)
        }
        Err(e) => {
            // No transaction: every request is answered with the error, none is run.
            for run in batch.drain(..) {
                run(Err(e.clone()))(None);
            }
            stats.record(size, started.elapsed().as_secs_f64(), false);
            tracing::error!(error = %e, "cannot begin a write transaction");
            recover(store, &e);
            return;
        }
    };
    match commit {
        Ok(()) => {
            let c = Committed {
                ticket: store.durability().ticket(),
                finishes,
                started,
            };
            if let Err(std_mpsc::SendError(c)) = committed.send(c) {
                // The answering thread is gone (it cannot be while the writer runs): answer
                // here, once durable.
                let synced = store.durability().wait(c.ticket).map_err(io_error);
                for finish in c.finishes {
                    finish(synced.as_ref().err().cloned());
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DiskLimit, StoreOptions, META};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn put(key: &'static str) -> impl FnOnce(&WriteTransaction) -> Result<(), StoreError> {
        move |txn| {
            txn.open_table(META)?.insert(key, [1u8].as_slice())?;
            Ok(())
        }
    }

    /// The writer runs the next batch while the device flushes the last one, answers each
    /// only once it is durable, and a reader meanwhile waits instead of seeing the commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_batch_runs_while_the_last_one_syncs_and_answers_wait_for_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskLimit::default();
        let options = StoreOptions {
            disk_limit: Some(disk.clone()),
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("db"), options).unwrap();
        let gc = GroupCommit::start(store.clone());
        gc.write(put("warm")).await.unwrap();

        let stall = Duration::from_millis(1500);
        disk.slow_next_sync(stall.as_millis() as u64);
        let t0 = Instant::now();
        let ran_first = Arc::new(AtomicBool::new(false));
        let first = tokio::spawn({
            let (gc, ran) = (gc.clone(), ran_first.clone());
            async move {
                gc.write(move |txn| {
                    ran.store(true, Ordering::SeqCst);
                    put("first")(txn)
                })
                .await
                .map(|()| Instant::now())
            }
        });
        while !ran_first.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The first batch is committing; the second is a batch of its own.
        let second_ran = Arc::new(Mutex::new(None));
        let second = tokio::spawn({
            let (gc, ran) = (gc.clone(), second_ran.clone());
            async move {
                gc.write(move |txn| {
                    *ran.lock().unwrap() = Some(Instant::now());
                    put("second")(txn)
                })
                .await
                .map(|()| Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reader = tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                let txn = store.read().unwrap();
                let seen = txn
                    .open_table(META)
                    .unwrap()
                    .get("first")
                    .unwrap()
                    .is_some();
                (seen, Instant::now())
            }
        });
        let first_answered = first.await.unwrap().unwrap();
        let second_answered = second.await.unwrap().unwrap();
        let (seen, read_returned) = reader.await.unwrap();
        let second_ran = second_ran.lock().unwrap().expect("the second batch ran");

        assert!(first_answered - t0 >= stall, "answered before its sync");
        assert!(
            second_ran - t0 < stall - Duration::from_millis(500),
            "the second batch waited for the first one's sync ({:?})",
            second_ran - t0
        );
        assert!(second_answered >= first_answered);
        assert!(seen, "the reader sees the first commit once it is durable");
        assert!(
            read_returned - t0 >= stall,
            "the reader did not wait for the sync"
        );
        gc.shutdown().await;
    }
}
