use redb::Database;

use super::migrate::{V1_BY_ZEQOND, V1_HASHES, V2_TREE};
use super::read;
use super::*;

fn entry(i: u64) -> Entry {
    Entry {
        kind: "event",
        actor: "test".into(),
        transition_id: [1; 16],
        payload: format!("{{\"i\":{i}}}").into_bytes(),
    }
}

/// The writer's in-memory head and right edge give the same stored rows, tree hashes and
/// head as appending one row per writer (which reads its siblings from the table), across
/// transactions, several machines and sizes on both sides of powers of two; and the
/// result passes `verify_machine`.
#[test]
fn batched_appends_store_what_single_appends_store_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let batched = Database::create(dir.path().join("a.redb")).unwrap();
    let single = Database::create(dir.path().join("b.redb")).unwrap();
    let now = 1_700_000_000_000;
    for (db, slugs) in [(&batched, ["m1", "m2"]), (&single, ["m1", "m2"])] {
        let txn = db.begin_write().unwrap();
        let mut w = LogWriter::open(&txn).unwrap();
        for s in slugs {
            w.create(s, 7).unwrap();
        }
        w.finish().unwrap();
        txn.commit().unwrap();
    }
    let mut seq = 0;
    for batch in [1u64, 2, 5, 64, 1, 200, 3] {
        let txn = batched.begin_write().unwrap();
        let mut w = LogWriter::open(&txn).unwrap();
        for i in seq..seq + batch {
            for s in ["m1", "m2"] {
                let row = w.append(s, entry(i), now + i as i64).unwrap();
                assert_eq!(row.seq, i);
            }
        }
        w.finish().unwrap();
        txn.commit().unwrap();
        for i in seq..seq + batch {
            let txn = single.begin_write().unwrap();
            for s in ["m1", "m2"] {
                append(&txn, s, entry(i), now + i as i64).unwrap();
            }
            txn.commit().unwrap();
        }
        seq += batch;
    }
    let dump = |db: &Database| {
        let txn = db.begin_read().unwrap();
        let mut out = Vec::new();
        for def in [ROWS, TREE] {
            for e in txn.open_table(def).unwrap().iter().unwrap() {
                let (k, v) = e.unwrap();
                out.push((k.value().0.to_owned(), k.value().1, v.value().to_vec()));
            }
        }
        for s in ["m1", "m2"] {
            let head = read::head(&txn, s).unwrap().unwrap();
            assert_eq!(head.size, seq);
            let v = verify_machine(&txn, s, |_, _| {}).unwrap();
            assert_eq!(v.broken, None, "{s}");
            out.push((s.to_owned(), u64::MAX, store::encode(&head)));
        }
        out
    };
    assert_eq!(dump(&batched), dump(&single));
}

const BASE_MS: i64 = 1_700_000_000_000;

/// Two machines' logs of 67 rows each, written in several transactions; each slug's rows
/// sit in 0.3-Zeqond steps, so Zeqonds hold 3-4 rows and runs cross transaction ends. The
/// clock steps back once. Returns the rows per machine.
fn sample_log(db: &Database) -> u64 {
    let base = BASE_MS;
    let mut seq = 0u64;
    for (i, batch) in [5u64, 1, 9, 17, 2, 33].into_iter().enumerate() {
        let txn = db.begin_write().unwrap();
        let mut w = LogWriter::open(&txn).unwrap();
        if i == 0 {
            w.create("m1", 0).unwrap();
            w.create("m2", 0).unwrap();
        }
        for _ in 0..batch {
            let t = if i == 4 {
                base
            } else {
                base + seq as i64 * 233
            };
            w.append("m1", entry(seq), t).unwrap();
            w.append("m2", entry(seq), t + 777).unwrap();
            seq += 1;
        }
        w.finish().unwrap();
        txn.commit().unwrap();
    }
    seq
}

/// Everything the log answers: rows per Zeqond, tree hashes, proofs, verification.
fn answers(db: &Database, seq: u64) -> Vec<String> {
    let base = BASE_MS;
    let txn = db.begin_read().unwrap();
    let mut out = Vec::new();
    for s in ["m1", "m2"] {
        let v = verify_machine(&txn, s, |_, _| {}).unwrap();
        assert_eq!(v.broken, None, "{s}");
        out.push(format!("{s} rows {}", v.rows));
        for z in clock::zeqond(base) - 1..clock::zeqond(base + 100 * 233) + 3 {
            out.push(format!(
                "{s} z{z} {:?}",
                read::seqs_at_zeqond(&txn, s, z).unwrap()
            ));
        }
        for size in [1, 2, 7, 8, 9, 31, 32, 33, seq] {
            out.push(format!(
                "{s} root {size} {:?}",
                read::tree_hash(&txn, s, size).unwrap()
            ));
            for at in [0, size / 2, size - 1] {
                let p = read::prove_inclusion(&txn, s, at, size).unwrap();
                out.push(format!("{s} incl {at} {size} {p:?}"));
            }
            let p = read::prove_consistency(&txn, s, size / 3 + 1, size).unwrap();
            out.push(format!("{s} cons {size} {p:?}"));
        }
    }
    out
}

/// A flipped byte anywhere in a tree chunk names the row whose hashes hold it, and bytes
/// past the last row's hashes are reported against that row.
#[test]
fn verify_names_the_row_of_a_damaged_tree_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("t.redb")).unwrap();
    let seq = sample_log(&db);
    assert_eq!(seq % CHUNK_ROWS, 3, "the last chunk is incomplete");
    let damage = |c: u64, f: &dyn Fn(&mut Vec<u8>)| {
        let txn = db.begin_write().unwrap();
        let old = {
            let mut t = txn.open_table(TREE).unwrap();
            let old = t.get(("m1", c)).unwrap().unwrap().value().to_vec();
            let mut v = old.clone();
            f(&mut v);
            t.insert(("m1", c), v.as_slice()).unwrap();
            old
        };
        txn.commit().unwrap();
        let broken = verify_machine(&db.begin_read().unwrap(), "m1", |_, _| {})
            .unwrap()
            .broken;
        let txn = db.begin_write().unwrap();
        txn.open_table(TREE)
            .unwrap()
            .insert(("m1", c), old.as_slice())
            .unwrap();
        txn.commit().unwrap();
        broken.map(|(at, _)| at)
    };
    // Chunk 2 holds rows 32..=47; row 32 + j starts at chunk_offset(j).
    for j in [0, 1, 7, 14, 15] {
        let at = chunk_offset(j);
        assert_eq!(
            damage(2, &|v| v[at + 5] ^= 1),
            Some(32 + j),
            "row {}",
            32 + j
        );
    }
    assert_eq!(damage(2, &|v| v.truncate(v.len() - 32)), Some(47));
    let last = seq / CHUNK_ROWS;
    assert_eq!(damage(last, &|v| v.extend([0; 32])), Some(seq - 1));
    assert_eq!(damage(last, &|_| {}), None);
}

/// Each row's tree hashes, split out of the chunks: (slug, seq, bytes).
fn tree_by_row(txn: &WriteTransaction) -> Vec<(String, u64, Vec<u8>)> {
    let tree = txn.open_table(TREE).unwrap();
    let mut out = Vec::new();
    for e in tree.iter().unwrap() {
        let (k, v) = e.unwrap();
        let (slug, c) = k.value();
        let (mut seq, mut rest) = (c * CHUNK_ROWS, v.value());
        while !rest.is_empty() {
            let (row, more) = rest.split_at(row_tree_len(seq));
            out.push((slug.to_owned(), seq, row.to_vec()));
            (seq, rest) = (seq + 1, more);
        }
    }
    out
}

/// Everything the log answers is the same after the log is rewritten into schema 1's
/// layout and migrated back, with a chunk size that splits runs and machines across
/// transactions, and after running the migration a second time (an interrupted migration
/// is rerun from the start).
#[test]
fn schema_1_logs_migrate_to_the_chunked_layout() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("m.redb")).unwrap();
    let seq = sample_log(&db);
    let before = answers(&db, seq);
    // Zeqonds of several rows, including ones whose rows span two transactions (rows 4
    // and 5), and the Zeqond the clock stepped back to holding two runs.
    let zeqonds: Vec<&String> = before.iter().filter(|l| l.starts_with("m1 z")).collect();
    assert!(
        zeqonds.iter().any(|l| l.ends_with(" [4, 5, 6]")),
        "{zeqonds:?}"
    );
    assert!(
        zeqonds.iter().any(|l| l.ends_with(" [0, 32, 33]")),
        "{zeqonds:?}"
    );
    // Rewrite into schema 1: one hash per stored index, one index entry per row.
    let txn = db.begin_write().unwrap();
    {
        let runs = txn.open_table(ZEQOND_RUNS).unwrap();
        let mut hashes = txn.open_table(V1_HASHES).unwrap();
        let mut by_zeqond = txn.open_table(V1_BY_ZEQOND).unwrap();
        for (slug, seq, v) in tree_by_row(&txn) {
            let first = tlog::stored_hash_index(0, seq);
            for (i, h) in v.chunks(32).enumerate() {
                hashes.insert((slug.as_str(), first + i as u64), h).unwrap();
            }
        }
        for e in runs.iter().unwrap() {
            let (k, last) = e.unwrap();
            let (slug, z, first) = k.value();
            for q in first..=last.value() {
                by_zeqond.insert((slug, z, q), ()).unwrap();
            }
        }
    }
    txn.delete_table(TREE).unwrap();
    txn.delete_table(ZEQOND_RUNS).unwrap();
    txn.commit().unwrap();
    assert_eq!(migrate_from_schema_1(&db, 7).unwrap(), 2 * seq);
    assert_eq!(migrate_from_schema_2(&db, 7).unwrap(), 2 * seq);
    let once = answers(&db, seq);
    assert_eq!(migrate_from_schema_1(&db, 5).unwrap(), 2 * seq);
    assert_eq!(migrate_from_schema_2(&db, 40).unwrap(), 2 * seq);
    let txn = db.begin_write().unwrap();
    drop_schema_1_tables(&txn).unwrap();
    drop_schema_2_tables(&txn).unwrap();
    txn.commit().unwrap();
    assert_eq!(answers(&db, seq), before);
    assert_eq!(once, before);
    let txn = db.begin_read().unwrap();
    assert!(
        txn.open_table(V1_HASHES).is_err() && txn.open_table(V2_TREE).is_err(),
        "schema 1 and 2 tables are dropped"
    );
}

/// Schema 2's per-row tree hashes migrate into the same chunks the writer makes (the
/// tree table is byte-identical afterwards), also when run twice.
#[test]
fn schema_2_logs_migrate_to_the_chunked_layout() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("m.redb")).unwrap();
    let seq = sample_log(&db);
    let before = answers(&db, seq);
    let chunks = |db: &Database| -> Vec<(String, u64, Vec<u8>)> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(TREE).unwrap();
        t.iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().0.to_owned(), k.value().1, v.value().to_vec())
            })
            .collect()
    };
    let written = chunks(&db);
    assert_eq!(written.len(), 2 * seq.div_ceil(CHUNK_ROWS) as usize);
    let txn = db.begin_write().unwrap();
    {
        let mut old = txn.open_table(V2_TREE).unwrap();
        for (slug, seq, v) in tree_by_row(&txn) {
            old.insert((slug.as_str(), seq), v.as_slice()).unwrap();
        }
    }
    txn.delete_table(TREE).unwrap();
    txn.commit().unwrap();
    assert_eq!(migrate_from_schema_2(&db, 7).unwrap(), 2 * seq);
    assert_eq!(migrate_from_schema_2(&db, 1000).unwrap(), 2 * seq);
    let txn = db.begin_write().unwrap();
    drop_schema_2_tables(&txn).unwrap();
    txn.commit().unwrap();
    assert_eq!(chunks(&db), written);
    assert_eq!(answers(&db, seq), before);
}
