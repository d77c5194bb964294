//! Ledger benchmark: rows/s appended in batches (one fsync per batch) against a plain redb
//! insert of the same row bytes, and proof generation at 1,000,000 rows.
//!
//! `cargo bench --bench ledger` (set LEDGER_BENCH_ROWS to change the 1M figure).

use std::time::Instant;

use redb::{Database, Durability, ReadableTableMetadata, TableDefinition};
use smgate::ledger::log::{self, Entry, LogWriter};
use smgate::ledger::Row;

const PLAIN: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("plain");
const BATCH: u64 = 1000;

fn entry(i: u64) -> Entry {
    // A typical transition row: ~150 bytes of canonical JSON.
    let payload = format!(
        "{{\"event\":\"HEARTBEAT\",\"from\":[\"online\"],\"instance\":\"device-{:05}\",\"payload_hash\":\"{:064x}\",\"to\":[\"online\"]}}",
        i % 1000,
        i
    );
    Entry {
        kind: "transition",
        actor: "mqtt".into(),
        transition_id: [7; 16],
        payload: payload.into_bytes(),
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: u64 = 200_000;

    // 1. The log: rows + tree hashes + head + zeqond index, in batches of BATCH per commit.
    let db = Database::builder()
        .set_cache_size(64 << 20)
        .create(dir.path().join("log.redb"))
        .expect("db");
    // The entries are made before the clock starts, as the plain inserts' bytes are: what
    // is timed is the log's own work (encoding, hashing, tree, inserts, commit).
    let mut entries: Vec<Entry> = (0..rows).map(entry).collect::<Vec<_>>();
    entries.reverse();
    let t = Instant::now();
    let mut stored_bytes = 0u64;
    let mut seq = 0;
    while seq < rows {
        let txn = db.begin_write().expect("txn");
        {
            let mut w = LogWriter::open(&txn).expect("open");
            if seq == 0 {
                w.create("bench", 0).expect("create");
            }
            for _ in 0..BATCH {
                let e = entries.pop().expect("an entry per row");
                let row = w
                    .append("bench", e, 1_700_000_000_000 + seq as i64)
                    .expect("append");
                stored_bytes += row.stored_len() as u64;
                seq += 1;
            }
            w.finish().expect("heads");
        }
        txn.commit().expect("commit");
    }
    let log_secs = t.elapsed().as_secs_f64();

    // 2. The same row bytes, plain inserts, same batching and durability.
    let plain_rows: Vec<Vec<u8>> = {
        let txn = db.begin_read().expect("read");
        log::read::rows(&txn, "bench", 0, rows)
            .expect("rows")
            .iter()
            .map(Row::encode_stored)
            .collect()
    };
    let db2 = Database::builder()
        .set_cache_size(64 << 20)
        .create(dir.path().join("plain.redb"))
        .expect("db");
    let t = Instant::now();
    for chunk in plain_rows.chunks(BATCH as usize).enumerate() {
        let txn = db2.begin_write().expect("txn");
        {
            let mut table = txn.open_table(PLAIN).expect("table");
            for (i, bytes) in chunk.1.iter().enumerate() {
                table
                    .insert(
                        ("bench", chunk.0 as u64 * BATCH + i as u64),
                        bytes.as_slice(),
                    )
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let plain_secs = t.elapsed().as_secs_f64();
    println!("append {rows} rows in batches of {BATCH} (one fsync per batch):");
    println!("  smgate log   {:>10.0} rows/s  ({:.2} µs/row, {:.0} B/row stored)  target ≥ 200000 rows/s", rows as f64 / log_secs, log_secs * 1e6 / rows as f64, stored_bytes as f64 / rows as f64);
    println!(
        "  plain redb   {:>10.0} rows/s  ({:.2} µs/row)",
        rows as f64 / plain_secs,
        plain_secs * 1e6 / rows as f64
    );
    println!(
        "  cost ratio   {:>10.2}× a plain insert of the same bytes",
        log_secs / plain_secs
    );
    drop(db2);

    // 3. Proofs at 1M rows.
    let big: u64 = std::env::var("LEDGER_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let t = Instant::now();
    while seq < big {
        let mut txn = db.begin_write().expect("txn");
        txn.set_durability(if seq + 10_000 >= big {
            Durability::Immediate
        } else {
            Durability::None
        });
        {
            let mut w = LogWriter::open(&txn).expect("open");
            for _ in 0..10_000.min(big - seq) {
                w.append("bench", entry(seq), 1_700_000_000_000 + seq as i64)
                    .expect("append");
                seq += 1;
            }
            w.finish().expect("heads");
        }
        txn.commit().expect("commit");
    }
    println!(
        "grew the log to {big} rows in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let read = db.begin_read().expect("read");
    assert_eq!(
        read.open_table(log::ROWS)
            .expect("rows")
            .len()
            .expect("len"),
        big
    );
    let samples = 2000u64;
    let t = Instant::now();
    let mut total_hashes = 0;
    for i in 0..samples {
        let s = (i * 7_919_993) % big;
        total_hashes += log::read::prove_inclusion(&read, "bench", s, big)
            .expect("proof")
            .len();
    }
    let inc = t.elapsed().as_secs_f64() / samples as f64;
    let t = Instant::now();
    for i in 1..=samples {
        let m = (i * 499_979) % big + 1;
        log::read::prove_consistency(&read, "bench", m, big).expect("proof");
    }
    let cons = t.elapsed().as_secs_f64() / samples as f64;
    let t = Instant::now();
    for _ in 0..samples {
        log::read::tree_hash(&read, "bench", big).expect("root");
    }
    let root = t.elapsed().as_secs_f64() / samples as f64;
    println!("at {big} rows: inclusion proof {:.1} µs ({} hashes), consistency proof {:.1} µs, tree root {:.1} µs",
        inc * 1e6, total_hashes / samples as usize, cons * 1e6, root * 1e6);
}
