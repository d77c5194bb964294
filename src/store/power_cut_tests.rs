//! What a commit guarantees (module doc of `store`), against power cuts: a write answered Ok
//! is in the file after any cut, and the file opens cleanly. The store runs on the power-cut
//! backend (module doc of `backend`), and the power goes at seeded points: after a number of
//! answers and a delay, or in the middle of a sync's write-out, so that the file holds a torn
//! commit.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{ReadableTable, TableDefinition};

use super::{GroupCommit, PowerCut, Store, StoreError, StoreOptions};

/// Row number → [`value_of`] it.
const NUMBERED: TableDefinition<u64, u64> = TableDefinition::new("power_cut_test");

/// The value stored in row `n`, so that a row read back is known to be the one written.
fn value_of(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// xorshift64: a fixed sequence per seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Writes numbered rows, one request each, until the power is off; records the numbers
/// answered Ok.
async fn write_rows(
    gc: GroupCommit,
    power: PowerCut,
    stop: Arc<AtomicBool>,
    numbers: Arc<AtomicU64>,
    acked: Arc<Mutex<Vec<u64>>>,
) {
    while !stop.load(Ordering::SeqCst) && !power.is_off() {
        let n = numbers.fetch_add(1, Ordering::SeqCst);
        let (power, stop) = (power.clone(), stop.clone());
        let written = gc
            .write(move |txn| {
                // A machine without power runs nothing. The stopped store answers what was
                // in flight once the power is back (`PowerCut::restore`); a request it runs
                // then must not be taken for one that was answered before the cut.
                if power.is_off() || stop.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("the power is off".into()));
                }
                txn.open_table(NUMBERED)?.insert(n, value_of(n))?;
                Ok::<_, StoreError>(())
            })
            .await;
        match written {
            Ok(()) => acked.lock().unwrap().push(n),
            Err(_) => return,
        }
    }
}

/// The rows in the file, opened by a fresh store as after a reboot (redb repairs what the cut
/// left), each checked against its value; then redb checks every page of it.
fn surviving_rows(path: &Path) -> BTreeSet<u64> {
    let store = Store::open(path, StoreOptions::default()).expect("the file opens after the cut");
    let rows = store
        .view(|txn| {
            let table = match txn.open_table(NUMBERED) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeSet::new()),
                Err(e) => return Err(e.into()),
            };
            let mut rows = BTreeSet::new();
            for row in table.iter()? {
                let (n, v) = row?;
                assert_eq!(v.value(), value_of(n.value()), "row {}", n.value());
                rows.insert(n.value());
            }
            Ok(rows)
        })
        .expect("the rows read after the cut");
    drop(store);
    let mut db = redb::Database::open(path).unwrap();
    assert!(
        db.check_integrity().unwrap(),
        "redb found the file damaged after the store opened and closed it"
    );
    rows
}

/// Waits for `done`, failing the test if it takes a minute (a stalled store).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "stalled waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_answered_before_a_power_cut_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    // (seed, store.quick_repair, the power goes after this many extents of a write-out; with
    // None it goes after a seeded delay). 1 tears right after redb's header.
    let rounds = [
        (1, false, None),
        (2, false, Some(1)),
        (3, true, None),
        (4, true, Some(1)),
        (5, false, Some(3)),
        (6, true, Some(2)),
        (7, false, None),
    ];
    let numbers = Arc::new(AtomicU64::new(0));
    let mut acked_before = BTreeSet::new();
    for (seed, quick_repair, torn_after) in rounds {
        let mut rng = Rng(seed);
        let power = PowerCut::default();
        let options = StoreOptions {
            quick_repair,
            power_cut: Some(power.clone()),
            ..StoreOptions::default()
        };
        let store = Store::open(&path, options).unwrap();
        let gc = GroupCommit::start(store.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(write_rows(
                    gc.clone(),
                    power.clone(),
                    stop.clone(),
                    numbers.clone(),
                    acked.clone(),
                ))
            })
            .collect();

        let answers = 20 + rng.below(300) as usize;
        until("answers", || acked.lock().unwrap().len() >= answers).await;
        match torn_after {
            Some(extents) => power.cut_during_write_out(extents),
            None => {
                tokio::time::sleep(Duration::from_micros(rng.below(20_000))).await;
                power.cut();
            }
        }
        until("the cut", || power.is_off()).await;
        stop.store(true, Ordering::SeqCst);
        let survived = tokio::task::spawn_blocking({
            let path = path.clone();
            move || surviving_rows(&path)
        })
        .await
        .unwrap();

        power.restore();
        for w in writers {
            w.await.unwrap();
        }
        gc.shutdown().await;
        drop(store);
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let lost: Vec<&u64> = (acked.iter().chain(&acked_before))
            .filter(|n| !survived.contains(n))
            .collect();
        assert!(
            lost.is_empty(),
            "round {seed}: {} of {} rows answered Ok were lost in the cut: {:?}",
            lost.len(),
            acked.len() + acked_before.len(),
            &lost[..lost.len().min(10)]
        );
        let written = numbers.load(Ordering::SeqCst);
        assert!(survived.iter().all(|&n| n < written), "a row never written");
        eprintln!(
            "round {seed}: {} answered Ok, {} rows survived of {written} requested",
            acked.len(),
            survived.len()
        );
        acked_before.extend(acked);
    }
}
