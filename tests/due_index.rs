//! The timer index (`instances::DUE`) holds a lower bound of each instance's deadline: a step
//! that moves the deadline later leaves the index alone, and the timer pass
//! (`instances::timers::fire_pass`) moves entries that come up early, fires nothing before its
//! deadline, and fires in deadline order, also when a pass is cut short. Time is simulated:
//! every step and pass gets its `now`.

mod common;

use serde_json::{json, Value};
use smgate::chart::Event;
use smgate::instances::{self, timers, Charts, Steps};

const NOW: i64 = 1_700_000_000_000;
/// The example heartbeat chart: `online` → `stale` after 30 s without a heartbeat.
const STALE_MS: i64 = 30_000;

/// Runs `f` on a run of steps in one committed write transaction.
fn steps<T>(db: &redb::Database, f: impl FnOnce(&mut Steps) -> T) -> T {
    let txn = db.begin_write().unwrap();
    let out = {
        let mut steps = Steps::open(&txn).unwrap();
        let out = f(&mut steps);
        steps.finish().unwrap();
        out
    };
    txn.commit().unwrap();
    out
}

/// A fresh store with machine `m` on the example heartbeat chart.
fn with_machine() -> (tempfile::TempDir, std::sync::Arc<redb::Database>) {
    let dir = tempfile::tempdir().unwrap();
    let db = common::open_db(dir.path());
    let txn = db.begin_write().unwrap();
    common::create_heartbeat_machine(&txn, "m", NOW);
    txn.commit().unwrap();
    (dir, db)
}

/// c: entry at 30 s, deadline 45 s (one heartbeat at 15 s). d: entry and deadline 40 s.
fn c_and_d(db: &redb::Database, charts: &Charts) {
    create(db, charts, "c", NOW);
    heartbeat(db, charts, "c", NOW + 15_000);
    create(db, charts, "d", NOW + 10_000);
}

fn create(db: &redb::Database, charts: &Charts, slug: &str, at: i64) {
    steps(db, |s| {
        s.create_instance(
            charts,
            "m",
            slug,
            Value::Null,
            None,
            &common::operator(),
            "test",
            at,
        )
        .unwrap();
    });
}

fn heartbeat(db: &redb::Database, charts: &Charts, slug: &str, at: i64) {
    steps(db, |s| {
        s.send_event(
            charts,
            "m",
            slug,
            Event::new("HEARTBEAT", json!({})),
            &common::operator(),
            "test",
            at,
        )
        .unwrap();
    });
}

/// Every index entry, in index order: (entry time relative to NOW, instance).
fn index(db: &redb::Database) -> Vec<(i64, String)> {
    let txn = db.begin_read().unwrap();
    instances::due(&txn, i64::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(d, _, s)| (d - NOW, s))
        .collect()
}

/// One timer pass at `now` over at most `limit` entries, as the timer task runs it; the
/// instances fired, in order.
fn pass(db: &redb::Database, charts: &Charts, now: i64, limit: usize) -> Vec<String> {
    let batch = {
        let txn = db.begin_read().unwrap();
        instances::due(&txn, now, limit).unwrap()
    };
    let truncated = batch.len() == limit;
    steps(db, |s| {
        timers::fire_pass(s, charts, batch, truncated, now)
            .unwrap()
            .into_iter()
            .map(|sent| sent.instance.slug)
            .collect()
    })
}

/// An instance's tags and its next deadline (relative to NOW).
fn state(db: &redb::Database, slug: &str) -> (Vec<String>, Option<i64>) {
    let txn = db.begin_read().unwrap();
    let i = instances::instance(&txn, "m", slug).unwrap().unwrap();
    let views = instances::public_states(&txn, &Charts::default(), "m").unwrap();
    let view = views.iter().find(|v| v["instance"] == slug).unwrap();
    let tags = view["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    (tags, i.next_due.map(|d| d - NOW))
}

#[test]
fn heartbeats_leave_the_index_alone_and_early_entries_move_to_the_deadline() {
    let (_dir, db) = with_machine();
    let charts = Charts::default();
    create(&db, &charts, "a", NOW);
    create(&db, &charts, "b", NOW);
    assert_eq!(
        index(&db),
        vec![(STALE_MS, "a".into()), (STALE_MS, "b".into())]
    );

    // Two heartbeats move a's deadline to 20 s + 30 s; its entry stays where it was.
    heartbeat(&db, &charts, "a", NOW + 10_000);
    heartbeat(&db, &charts, "a", NOW + 20_000);
    assert_eq!(state(&db, "a").1, Some(20_000 + STALE_MS));
    assert_eq!(
        index(&db),
        vec![(STALE_MS, "a".into()), (STALE_MS, "b".into())]
    );

    // At 35 s both entries are up; only b is really due. a's entry moves to its deadline.
    assert_eq!(pass(&db, &charts, NOW + 35_000, 256), vec!["b".to_string()]);
    assert_eq!(state(&db, "a").0, vec!["online".to_string()]);
    assert_eq!(state(&db, "b").0, vec!["stale".to_string()]);
    let b_next = state(&db, "b").1.unwrap();
    let mut want = vec![(20_000 + STALE_MS, "a".to_string()), (b_next, "b".into())];
    want.sort();
    assert_eq!(index(&db), want);

    // Nothing fires before the deadline; at it, a goes stale and its entry follows.
    assert!(pass(&db, &charts, NOW + 49_999, 256).is_empty());
    assert_eq!(pass(&db, &charts, NOW + 50_000, 256), vec!["a".to_string()]);
    assert_eq!(state(&db, "a").0, vec!["stale".to_string()]);
    let a_next = state(&db, "a").1.unwrap();
    assert!(index(&db).contains(&(a_next, "a".into())));
    assert_eq!(index(&db).len(), 2);
}

#[test]
fn a_pass_fires_in_deadline_order_not_entry_order_even_when_cut_short() {
    let (_dir, db) = with_machine();
    let charts = Charts::default();
    c_and_d(&db, &charts);
    assert_eq!(
        index(&db),
        vec![(STALE_MS, "c".into()), (10_000 + STALE_MS, "d".into())]
    );

    // A pass cut short after c's entry (limit 1) may only fire deadlines up to 30 s: c's
    // entry moves to 45 s and nothing fires, although c's deadline has passed by now.
    assert!(pass(&db, &charts, NOW + 60_000, 1).is_empty());
    assert_eq!(
        index(&db),
        vec![
            (10_000 + STALE_MS, "d".into()),
            (15_000 + STALE_MS, "c".into())
        ]
    );
    assert_eq!(
        pass(&db, &charts, NOW + 60_000, 256),
        vec!["d".to_string(), "c".to_string()]
    );

    // The same from scratch in one uncut pass: deadline order, not entry order.
    let (_dir, db) = with_machine();
    c_and_d(&db, &charts);
    assert_eq!(
        pass(&db, &charts, NOW + 60_000, 256),
        vec!["d".to_string(), "c".to_string()]
    );
}
