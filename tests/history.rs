//! Transition history storage (`instances::history`): records written before runs existed,
//! runs, and the tail in the instance row read back as one sequence, at every cursor, across a
//! reopen, and gone with the instance.

mod common;

use redb::{ReadableTable, ReadableTableMetadata};
use serde_json::{json, Value};
use smgate::chart::Event;
use smgate::instances::{self, history, Charts, Steps, TransitionRecord};
use smgate::store;

const NOW: i64 = 1_700_000_000_000;

fn all(db: &redb::Database, slug: &str) -> Vec<(u64, TransitionRecord)> {
    let txn = db.begin_read().unwrap();
    instances::history(&txn, "m", slug, None, usize::MAX).unwrap()
}

/// `n`, event and the `i` of the event data of each record.
fn summary(records: &[(u64, TransitionRecord)]) -> Vec<(u64, String, Option<u64>)> {
    records
        .iter()
        .map(|(n, r)| {
            let data: Value = serde_json::from_slice(&r.data).unwrap_or(Value::Null);
            (*n, r.event.clone(), data["i"].as_u64())
        })
        .collect()
}

#[test]
fn legacy_records_runs_and_the_tail_read_back_in_order_at_every_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::open_db(dir.path());
    let charts = Charts::default();
    {
        let txn = db.begin_write().unwrap();
        common::create_heartbeat_machine(&txn, "m", NOW);
        let mut steps = Steps::open(&txn).unwrap();
        for slug in ["a", "b"] {
            steps
                .create_instance(
                    &charts,
                    "m",
                    slug,
                    Value::Null,
                    None,
                    &common::operator(),
                    "test",
                    NOW,
                )
                .unwrap();
        }
        steps.finish().unwrap();
        txn.commit().unwrap();
    }
    // Make "a" look like a row from before runs: its first record in the old per-record
    // table, the row itself without a tail.
    let created = all(&db, "a");
    assert_eq!(summary(&created), [(0, "xstate.init".into(), None)]);
    {
        let txn = db.begin_write().unwrap();
        {
            let mut legacy = txn.open_table(instances::HISTORY).unwrap();
            legacy
                .insert(("m", "a", 0), store::encode(&created[0].1).as_slice())
                .unwrap();
            let mut rows = txn.open_table(instances::INSTANCES).unwrap();
            let old =
                history::decode_instance(rows.get(("m", "a")).unwrap().unwrap().value()).unwrap();
            assert_eq!(old.recent.count, 1);
            rows.insert(("m", "a"), store::encode(&old).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    assert_eq!(summary(&all(&db, "a")), summary(&created));

    // 60 events, one of them with data larger than a run, in transactions of 7 steps.
    let big = "x".repeat(history::RUN_BYTES * 2);
    let mut expected = summary(&created);
    for chunk in (1..=60u64).collect::<Vec<_>>().chunks(7) {
        let txn = db.begin_write().unwrap();
        let mut steps = Steps::open(&txn).unwrap();
        for &i in chunk {
            let mut data = json!({"i": i});
            if i == 23 {
                data["pad"] = json!(big);
            }
            steps
                .send_event(
                    &charts,
                    "m",
                    "a",
                    Event::new("HEARTBEAT", data),
                    &common::operator(),
                    "test",
                    NOW,
                )
                .unwrap();
            expected.push((i, "HEARTBEAT".into(), Some(i)));
            if i % 10 == 0 {
                steps
                    .send_event(
                        &charts,
                        "m",
                        "b",
                        Event::new("HEARTBEAT", json!({"i": i})),
                        &common::operator(),
                        "test",
                        NOW,
                    )
                    .unwrap();
            }
        }
        steps.finish().unwrap();
        txn.commit().unwrap();
    }
    let full = all(&db, "a");
    assert_eq!(summary(&full), expected);
    assert!(full[23].1.data.len() > history::RUN_BYTES);

    // The three places are all in use: one legacy record, several runs, a tail.
    {
        let txn = db.begin_read().unwrap();
        let runs = txn.open_table(history::RUNS).unwrap();
        let firsts: Vec<u64> = runs
            .range(("m", "a", 0)..=("m", "a", u64::MAX))
            .unwrap()
            .map(|e| e.unwrap().0.value().2)
            .collect();
        assert!(firsts.len() >= 3, "runs start at {firsts:?}");
        assert_eq!(firsts[0], 1, "runs start after the legacy record");
        let row = txn.open_table(instances::INSTANCES).unwrap();
        let a = history::decode_instance(row.get(("m", "a")).unwrap().unwrap().value()).unwrap();
        assert_eq!(a.steps, 61);
        assert!(a.recent.count > 0 && a.recent.count < history::RUN_RECORDS);
        assert!(a.recent.bytes.len() < history::RUN_BYTES);
    }

    // Every cursor and page size gives the same sequence.
    for limit in [1, 2, 3, 5, 15, 16, 17, 100] {
        for after in std::iter::once(None).chain((0..=62).map(Some)) {
            let mut got = Vec::new();
            let mut cursor = after;
            loop {
                let txn = db.begin_read().unwrap();
                let page = instances::history(&txn, "m", "a", cursor, limit).unwrap();
                assert!(page.len() <= limit);
                let done = page.len() < limit;
                cursor = page.last().map(|(n, _)| *n).or(cursor);
                got.extend(page);
                if done {
                    break;
                }
            }
            let want: Vec<_> = expected
                .iter()
                .filter(|(n, ..)| after.is_none_or(|a| *n > a))
                .cloned()
                .collect();
            assert_eq!(summary(&got), want, "after {after:?}, limit {limit}");
        }
    }
    let b: Vec<_> = summary(&all(&db, "b"));
    assert_eq!(b.len(), 7);
    assert!(b[1..]
        .iter()
        .enumerate()
        .all(|(k, r)| r.2 == Some(10 * (k as u64 + 1))));

    // Committed means durable: the same after reopening.
    drop(db);
    let db = common::open_db(dir.path());
    assert_eq!(summary(&all(&db, "a")), expected);

    // Deleting the instance takes all three places with it, and only its own records.
    {
        let txn = db.begin_write().unwrap();
        instances::delete_instance(&txn, "m", "a", "test", NOW).unwrap();
        txn.commit().unwrap();
    }
    assert!(all(&db, "a").is_empty());
    let txn = db.begin_read().unwrap();
    let runs = txn.open_table(history::RUNS).unwrap();
    assert_eq!(
        runs.range(("m", "a", 0)..=("m", "a", u64::MAX))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        txn.open_table(instances::HISTORY).unwrap().len().unwrap(),
        0
    );
    assert_eq!(summary(&all(&db, "b")), b);
    drop((runs, txn));

    // A row claiming more tail records than steps is reported as corrupt, not misnumbered.
    let txn = db.begin_write().unwrap();
    {
        let mut rows = txn.open_table(instances::INSTANCES).unwrap();
        let mut row =
            history::decode_instance(rows.get(("m", "b")).unwrap().unwrap().value()).unwrap();
        row.recent.count = u32::try_from(row.steps).unwrap() + 1;
        rows.insert(("m", "b"), history::encode_instance(&row).as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
    let txn = db.begin_read().unwrap();
    let err = instances::history(&txn, "m", "b", None, 100).unwrap_err();
    assert!(
        matches!(&err, store::StoreError::Corrupt(m) if m.contains("history records after")),
        "{err}"
    );
}
