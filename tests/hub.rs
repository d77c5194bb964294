//! `smgate hub` on PostgreSQL: real hub processes (the binary) against a real PostgreSQL
//! cluster started per test (`common/pg.rs`), fed by simulated gateways that sign their logs
//! with their own keys and push batches over HTTPS as the gateway's sync client does (retry
//! the same rows until a 200, move the watermark to what the hub says it stores;
//! `common/hubsim.rs`).
//!
//! Invariants checked, each by the test named after it: any number of hubs share one database
//! and every log there equals its gateway's, verified against the gateway-signed checkpoint;
//! two hubs given the same batch store it once and both answer the same 200; a hub killed
//! between its inserts and `COMMIT` stores nothing and another hub takes the batch; a restart
//! of PostgreSQL mid-ingest loses nothing that was acknowledged; a fork gets 409 and its signed
//! evidence is kept; a database that stops answering gives 503 within the timeout; an auditor
//! verifies a log from the tile endpoints alone; `smgate hub import` brings an embedded hub's
//! file over verified, and twice changes nothing; the operator API answers the operator key
//! alone, on both stores.

mod common;
#[path = "common/hubsim.rs"]
mod hubsim;
#[path = "common/pg.rs"]
mod pg;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{line_value, verify_cosignature};
use hubsim::{check_log, client, hub_cli, post, HubProc, Pusher, SimGateway, SimLog};
use pg::Postgres;
use smgate::hub::pg::Pg;
use smgate::ledger::{tlog, Hash};

/// A cluster, its migrations applied, and a library handle for enrolment.
async fn database() -> Option<(Postgres, Pg)> {
    let pg = Postgres::start()?;
    let config = smgate::config::HubConfig {
        database_url: pg.url(),
        ..Default::default()
    };
    let db = Pg::connect(&config).await.unwrap();
    assert_eq!(db.migrate().await.unwrap(), vec![1]);
    assert!(
        db.migrate().await.unwrap().is_empty(),
        "migrations run once"
    );
    Some((pg, db))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hubs_share_one_database_and_every_log_equals_its_gateways() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first = HubProc::start(dir.path(), &pg.url(), &[]);
    let hubs = [
        first,
        HubProc::start(dir.path(), &pg.url(), &[]),
        HubProc::start(dir.path(), &pg.url(), &[]),
    ];
    let gateways: usize = std::env::var("TEST_HUB_GATEWAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut fleet = Vec::new();
    for g in 0..gateways {
        let mut gw = SimGateway::new(g as u64);
        gw.enroll_in(&db).await;
        let logs: Vec<SimLog> = (0..5)
            .map(|m| {
                let mut log = SimLog::new(&format!("m{m}"));
                log.grow(40 + (g * 7 + m * 13) % 40, "main");
                log
            })
            .collect();
        fleet.push(Arc::new((gw, logs)));
    }
    let client = client(dir.path());
    let pusher = Pusher::new(client.clone(), &hubs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (g, entry) in fleet.iter().enumerate() {
        for m in 0..5 {
            let (entry, pusher) = (entry.clone(), pusher.clone());
            tasks.push(tokio::spawn(async move {
                let (gw, logs) = &*entry;
                let rows = 1 + ((g + m) % 16) as u64;
                pusher.push(gw, &logs[m], rows).await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let total_rows: u64 = fleet
        .iter()
        .flat_map(|e| e.1.iter().map(SimLog::size))
        .sum();
    eprintln!(
        "{gateways} gateways x 5 machines, {total_rows} rows in {} batches through 3 hubs in {:.1} s",
        pusher.acked.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    );
    let check = pg.client().await;
    for entry in &fleet {
        for log in &entry.1 {
            check_log(&check, &entry.0, log).await;
        }
    }
    // Every hub took part.
    for h in &hubs {
        let s = h.stats(&client).await;
        assert!(s["rows_stored"].as_u64().unwrap() > 0, "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_racing_the_same_batch_store_it_once_and_answer_the_same() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let release_str = release.to_str().unwrap().to_string();
    let slow = [
        ("SMGATE_HUB_TIMEOUT_MS", "120000"),
        ("TEST_HUB_HOLD_BEFORE_COMMIT", "race"),
        ("TEST_HUB_RELEASE_FILE", release_str.as_str()),
    ];
    let a = HubProc::start(dir.path(), &pg.url(), &slow);
    let b = HubProc::start(
        dir.path(),
        &pg.url(),
        &[("SMGATE_HUB_TIMEOUT_MS", "120000")],
    );
    let mut gw = SimGateway::new(1);
    gw.enroll_in(&db).await;
    let mut log = SimLog::new("race");
    log.grow(700, "main");
    let gw = Arc::new(gw);
    let batch = Arc::new(log.batch(&gw, 0, 700, 0));
    let client = client(dir.path());

    // A checks the batch, writes it and holds before COMMIT.
    let to_a = {
        let (client, addr, gw, batch) = (client.clone(), a.addr.clone(), gw.clone(), batch.clone());
        tokio::spawn(async move { post(&client, &addr, &gw.token, &batch).await })
    };
    a.wait_for_hold();
    // B checks the same batch against the same (empty) log and blocks on A's rows.
    let to_b = {
        let (client, addr, gw, batch) = (client.clone(), b.addr.clone(), gw.clone(), batch.clone());
        tokio::spawn(async move { post(&client, &addr, &gw.token, &batch).await })
    };
    let watch = pg.client().await;
    loop {
        let waiting: i64 = watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&release, b"go").unwrap();
    let (sa, ba, _) = to_a.await.unwrap().unwrap();
    let (sb, bb, _) = to_b.await.unwrap().unwrap();
    assert_eq!((sa, sb), (200, 200), "{ba} {bb}");
    assert_eq!(
        ba["stored_seq"], bb["stored_seq"],
        "both hubs answer the same"
    );
    assert_eq!(ba["stored_seq"], 699);
    // Both cosign the batch's checkpoint: both verified it, and it is the tree they hold.
    for (hub, body) in [(&a, &ba), (&b, &bb)] {
        let note = format!(
            "{}{}",
            batch.checkpoint,
            body["cosignature"].as_str().unwrap()
        );
        verify_cosignature(&note, &hub.cosigner);
    }
    let (stats_a, stats_b) = (a.stats(&client).await, b.stats(&client).await);
    assert_eq!(stats_a["rows_stored"], 700, "A committed: {stats_a}");
    assert_eq!(stats_b["rows_stored"], 0, "B committed nothing: {stats_b}");
    assert_eq!(
        stats_b["lost_races"], 1,
        "B lost the compare-and-set once: {stats_b}"
    );
    check_log(&watch, &gw, &log).await;
    let checkpoints: i64 = watch
        .query_one(
            "SELECT count(*) FROM log_checkpoints WHERE gw = $1",
            &[&gw.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_killed_between_its_inserts_and_commit_stores_nothing() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = HubProc::start(
        dir.path(),
        &pg.url(),
        &[
            ("SMGATE_HUB_TIMEOUT_MS", "120000"),
            ("TEST_HUB_HOLD_BEFORE_COMMIT", "killed"),
        ],
    );
    let b = HubProc::start(dir.path(), &pg.url(), &[]);
    let mut gw = SimGateway::new(2);
    gw.enroll_in(&db).await;
    let gw = Arc::new(gw);
    let mut log = SimLog::new("killed");
    log.grow(100, "main");
    let client = client(dir.path());
    let (s, body, _) = post(&client, &b.addr, &gw.token, &log.batch(&gw, 0, 100, 0))
        .await
        .unwrap();
    assert_eq!((s, body["stored_seq"].as_u64()), (200, Some(99)));

    log.grow(500, "main");
    let batch = Arc::new(log.batch(&gw, 100, 600, 100));
    let to_a = {
        let (client, addr, gw, batch) = (client.clone(), a.addr.clone(), gw.clone(), batch.clone());
        tokio::spawn(async move { post(&client, &addr, &gw.token, &batch).await })
    };
    a.wait_for_hold();
    a.child.kill().unwrap(); // SIGKILL
    a.child.wait().unwrap();
    assert!(to_a.await.unwrap().is_err(), "the killed hub answered");

    let watch = pg.client().await;
    let (size, rows): (i64, i64) = {
        let r = watch
            .query_one(
                "SELECT (SELECT size FROM logs WHERE gw = $1 AND machine = 'killed'), \
                 (SELECT count(*) FROM log_rows WHERE gw = $1 AND machine = 'killed')",
                &[&gw.id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (size, rows),
        (100, 100),
        "the killed hub's transaction left nothing"
    );
    // The gateway retries through the other hub.
    let (s, body, _) = post(&client, &b.addr, &gw.token, &batch).await.unwrap();
    assert_eq!((s, body["stored_seq"].as_u64()), (200, Some(599)), "{body}");
    check_log(&watch, &gw, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_mid_ingest_loses_nothing_acknowledged() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = [("SMGATE_HUB_TIMEOUT_MS", "3000")];
    let hubs = [
        HubProc::start(dir.path(), &pg.url(), &env),
        HubProc::start(dir.path(), &pg.url(), &env),
    ];
    let mut fleet = Vec::new();
    for g in 0..20u64 {
        let mut gw = SimGateway::new(100 + g);
        gw.enroll_in(&db).await;
        let logs: Vec<SimLog> = (0..2)
            .map(|m| {
                let mut log = SimLog::new(&format!("r{m}"));
                log.grow(600, "main");
                log
            })
            .collect();
        fleet.push(Arc::new((gw, logs)));
    }
    let pusher = Pusher::new(client(dir.path()), &hubs);
    let acked = &pusher.acked;
    let mut tasks = Vec::new();
    for entry in &fleet {
        for m in 0..2 {
            let (entry, pusher) = (entry.clone(), pusher.clone());
            tasks.push(tokio::spawn(async move {
                let (gw, logs) = &*entry;
                pusher.push(gw, &logs[m], 20).await
            }));
        }
    }
    // Mid-ingest: after a quarter of the 1,200 batches were acknowledged.
    while acked.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = acked.load(Ordering::Relaxed);
    pg.crash();
    pg.start_server();
    for t in tasks {
        t.await.unwrap();
    }
    let total = acked.load(Ordering::Relaxed);
    eprintln!("{before} batches acknowledged before the restart, {total} in all");
    assert!(total > before, "ingest went on after the restart");
    let check = pg.client().await;
    for entry in &fleet {
        for log in &entry.1 {
            check_log(&check, &entry.0, log).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forked_or_tampered_batch_gets_409_and_its_evidence_is_kept() {
    let Some((pg, _db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The CLI, as an operator runs it: migrate (already done: nothing to apply), enrol.
    let env_cli = |args: &[&str]| {
        let (ok, out, err) = hub_cli(dir.path(), &pg.url(), args);
        assert!(ok, "{err}");
        out
    };
    assert!(env_cli(&["hub", "migrate"]).contains("migrations applied: []"));
    let mut gw = SimGateway::new(3);
    gw.token = line_value(&env_cli(&["hub", "enroll", &gw.id, &gw.vkey]), "token ");
    let hub = HubProc::start(dir.path(), &pg.url(), &[]);
    let client = client(dir.path());
    let mut log = SimLog::new("forked");
    log.grow(10, "main");
    let (s, _, _) = post(&client, &hub.addr, &gw.token, &log.batch(&gw, 0, 10, 0))
        .await
        .unwrap();
    assert_eq!(s, 200);

    // A fork: the same gateway key signs another history from row 5 on.
    let fork = log.fork(5, 5);
    let forked = fork.batch(&gw, 5, 10, 5);
    let (s, body, _) = post(&client, &hub.addr, &gw.token, &forked).await.unwrap();
    assert_eq!(s, 409, "{body}");
    assert_eq!(
        (body["error"].as_str(), body["at"].as_u64()),
        (Some("fork"), Some(5))
    );

    // Tampered: a new row whose bytes no longer match its hash.
    log.grow(5, "main");
    let mut tampered = log.batch(&gw, 10, 15, 10);
    let n = tampered.rows[2].len();
    tampered.rows[2][n - 40] ^= 1;
    let (s, body, _) = post(&client, &hub.addr, &gw.token, &tampered)
        .await
        .unwrap();
    assert_eq!(s, 409, "{body}");
    assert_eq!(
        (body["error"].as_str(), body["at"].as_u64()),
        (Some("tampered"), Some(12))
    );
    // Sent again: one evidence row, seen twice.
    let (s, _, _) = post(&client, &hub.addr, &gw.token, &tampered)
        .await
        .unwrap();
    assert_eq!(s, 409);

    let db = pg.client().await;
    let rows = db
        .query(
            "SELECT kind, seq, checkpoint, row, stored_row, stored_checkpoint, times \
             FROM log_conflicts WHERE gw = $1 ORDER BY seq",
            &[&gw.id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (kind, seq, note): (String, i64, String) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((kind.as_str(), seq), ("fork", 5));
    // The evidence is signed: the fork's checkpoint verifies under the gateway's key, beside
    // the hub's own checkpoint of the other history, and both rows are kept.
    assert_eq!(note, forked.checkpoint);
    smgate::ledger::verify_note(&note, &gw.vkey).expect("evidence verifies");
    assert_eq!(
        rows[0].get::<_, Option<Vec<u8>>>(3),
        Some(fork.rows[5].clone())
    );
    assert_eq!(
        rows[0].get::<_, Option<Vec<u8>>>(4),
        Some(log.rows[5].clone())
    );
    assert_eq!(rows[0].get::<_, String>(5), log.checkpoint(&gw, 10));
    let (kind, seq, times): (String, i64, i64) = (rows[1].get(0), rows[1].get(1), rows[1].get(6));
    assert_eq!((kind.as_str(), seq, times), ("tampered", 12, 2));
    assert_eq!(
        rows[1].get::<_, Option<Vec<u8>>>(3),
        Some(tampered.rows[2].clone())
    );

    // What the hub had is untouched, and the true history goes on.
    let (s, body, _) = post(&client, &hub.addr, &gw.token, &log.batch(&gw, 10, 15, 10))
        .await
        .unwrap();
    assert_eq!((s, body["stored_seq"].as_u64()), (200, Some(14)));
    check_log(&db, &gw, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_stops_answering_gives_503_within_the_timeout() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let timeout_ms = 2_000u64;
    let hub = HubProc::start(
        dir.path(),
        &pg.url(),
        &[("SMGATE_HUB_TIMEOUT_MS", &timeout_ms.to_string())],
    );
    let mut gw = SimGateway::new(4);
    gw.enroll_in(&db).await;
    let client = client(dir.path());
    let mut log = SimLog::new("stopped");
    log.grow(20, "main");
    let (s, _, _) = post(&client, &hub.addr, &gw.token, &log.batch(&gw, 0, 10, 0))
        .await
        .unwrap();
    assert_eq!(s, 200);

    pg.signal_all("STOP");
    let started = Instant::now();
    let answer = post(&client, &hub.addr, &gw.token, &log.batch(&gw, 10, 20, 10)).await;
    let waited = started.elapsed();
    pg.signal_all("CONT");
    let (s, body, headers) = answer.unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        waited < Duration::from_millis(timeout_ms + 3_000),
        "503 came after {waited:?}, the timeout is {timeout_ms} ms"
    );
    // The database answers again: the retry is stored.
    let mut stored = None;
    for _ in 0..100 {
        if let Ok((200, body, _)) =
            post(&client, &hub.addr, &gw.token, &log.batch(&gw, 10, 20, 10)).await
        {
            stored = body["stored_seq"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, Some(19));
    check_log(&pg.client().await, &gw, &log).await;
}

/// What an auditor fetched: tiles and entry bundles by path, from the tlog-tiles endpoints.
struct Fetched {
    size: u64,
    tiles: HashMap<(u8, u64), Vec<Hash>>,
}

impl tlog::HashReader for Fetched {
    /// Stored hash `(level, n)` from the tile of level `level / 8` that holds its subtree:
    /// the `2^(level % 8)` tile hashes below it, hashed up (as Go's `tlog.TileHashReader`).
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, smgate::ledger::LedgerError> {
        indexes
            .iter()
            .map(|&i| {
                let (level, n) = tlog::split_stored_hash_index(i);
                let (tile_level, sub) = ((level / 8) as u8, level % 8);
                let first = n << sub;
                let tile = &self.tiles[&(tile_level, first / 256)];
                let mut hs: Vec<Hash> =
                    tile[(first % 256) as usize..(first % 256) as usize + (1 << sub)].to_vec();
                while hs.len() > 1 {
                    hs = hs
                        .chunks(2)
                        .map(|p| tlog::node_hash(&p[0], &p[1]))
                        .collect();
                }
                Ok(hs[0])
            })
            .collect()
    }
}

/// Walks one log through `/logs/<gw>/<machine>/…` only: the checkpoint (verified under the
/// gateway's key), every hash tile and entry bundle of its tree. Returns the checkpoint's
/// size and root, the tiles, and the entries (row hashes).
async fn audit(
    client: &reqwest::Client,
    hub: &HubProc,
    gw: &SimGateway,
    machine: &str,
) -> (Fetched, Hash, Vec<Hash>) {
    let base = format!("https://{}/logs/{}/{machine}", hub.addr, gw.id);
    let note = client
        .get(format!("{base}/checkpoint"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The checkpoint verifies under the gateway's key and under the hub's.
    let body = smgate::ledger::verify_note(&note, &gw.vkey).expect("checkpoint verifies");
    verify_cosignature(&note, &hub.cosigner);
    let cp = smgate::ledger::parse_checkpoint(&body).unwrap();
    let mut fetched = Fetched {
        size: cp.size,
        tiles: HashMap::new(),
    };
    let get = |path: String| {
        let client = client.clone();
        async move {
            let res = client.get(&path).send().await.unwrap();
            assert_eq!(res.status(), 200, "{path}");
            let cache = res.headers()["cache-control"].to_str().unwrap().to_string();
            (res.bytes().await.unwrap().to_vec(), cache)
        }
    };
    for level in 0..8u8 {
        let nodes = cp.size >> (8 * u32::from(level));
        if nodes == 0 {
            break;
        }
        for index in 0..nodes.div_ceil(256) {
            let width = (nodes - index * 256).min(256);
            let mut path = format!(
                "{base}/tile/{level}/{}",
                smgate::hub::tiles::index_path(index)
            );
            if width < 256 {
                path.push_str(&format!(".p/{width}"));
            }
            let (bytes, cache) = get(path).await;
            assert_eq!(bytes.len() as u64, width * 32);
            assert_eq!(cache.contains("immutable"), width == 256, "{cache}");
            let hashes = bytes.chunks(32).map(|c| c.try_into().unwrap()).collect();
            fetched.tiles.insert((level, index), hashes);
        }
    }
    let mut entries = Vec::new();
    for index in 0..cp.size.div_ceil(256) {
        let width = (cp.size - index * 256).min(256);
        let mut path = format!(
            "{base}/tile/entries/{}",
            smgate::hub::tiles::index_path(index)
        );
        if width < 256 {
            path.push_str(&format!(".p/{width}"));
        }
        let (bytes, _) = get(path).await;
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            entries.push(rest[2..2 + len].try_into().unwrap());
            rest = &rest[2 + len..];
        }
    }
    assert_eq!(entries.len() as u64, cp.size);
    // Beyond the tree: 404.
    let beyond = client
        .get(format!(
            "{base}/tile/0/{}",
            smgate::hub::tiles::index_path(cp.size / 256 + 1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 404);
    (fetched, cp.root, entries)
}

/// An auditor who holds an older checkpoint of the log checks, from tiles alone, that the
/// tree has the signed root, that entries are included, and that the old tree is a prefix.
fn verify_audit(fetched: &Fetched, root: &Hash, entries: &[Hash], old: (u64, Hash)) {
    let size = fetched.size;
    assert_eq!(
        &tlog::tree_hash(size, fetched).unwrap(),
        root,
        "root from tiles"
    );
    // Every 97th entry and the last ones: proofs through every tile level.
    let last = entries.len().saturating_sub(300);
    for (i, e) in entries
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 97 == 0 || *i >= last)
    {
        let proof = tlog::prove_record(size, i as u64, fetched).unwrap();
        tlog::check_record(&proof, size, root, i as u64, &tlog::record_hash(e))
            .unwrap_or_else(|_| panic!("inclusion of entry {i}"));
    }
    let proof = tlog::prove_tree(size, old.0, fetched).unwrap();
    tlog::check_tree(&proof, size, root, old.0, &old.1)
        .expect("consistency with the old checkpoint");
}

async fn walk_a_log_through_the_tiles(
    hub_proc: &HubProc,
    client: &reqwest::Client,
    gw: &SimGateway,
) {
    let hub = hub_proc.addr.as_str();
    let mut log = SimLog::new("audited");
    log.grow(300, "main");
    let first = log.batch(gw, 0, 300, 0);
    let (s, body, _) = post(client, hub, &gw.token, &first).await.unwrap();
    assert_eq!(s, 200);
    // The ingest answer carries the hub's cosignature of the batch's checkpoint.
    let cosigned = format!(
        "{}{}",
        first.checkpoint,
        body["cosignature"].as_str().unwrap()
    );
    verify_cosignature(&cosigned, &hub_proc.cosigner);
    smgate::ledger::verify_note(&cosigned, &gw.vkey).expect("still verifies for the gateway");
    let (old, old_root, _) = audit(client, hub_proc, gw, "audited").await;
    assert_eq!(old.size, 300);
    // More batches, of sizes that cross tile boundaries at both levels.
    log.grow(66_000 - 300, "main");
    let mut acked = 300;
    for step in [17u64, 239, 256, 4_096, 61_092] {
        let batch = log.batch(gw, acked, acked + step, acked);
        let (s, body, _) = post(client, hub, &gw.token, &batch).await.unwrap();
        assert_eq!(s, 200, "{body}");
        acked += step;
    }
    assert_eq!(acked, 66_000);
    let (fetched, root, entries) = audit(client, hub_proc, gw, "audited").await;
    assert_eq!(fetched.size, 66_000);
    let row_hashes: Vec<Hash> = log
        .rows
        .iter()
        .map(|r| r[r.len() - 32..].try_into().unwrap())
        .collect();
    assert_eq!(entries, row_hashes, "entry bundles hold the rows' hashes");
    verify_audit(&fetched, &root, &entries, (300, old_root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_auditor_verifies_a_log_from_the_tile_endpoints_alone_on_postgres() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A 61,092-row batch is one INSERT: give a loaded debug build room (this is about tiles).
    let hub = HubProc::start(dir.path(), &pg.url(), &[("SMGATE_HUB_TIMEOUT_MS", "60000")]);
    let mut gw = SimGateway::new(5);
    gw.enroll_in(&db).await;
    walk_a_log_through_the_tiles(&hub, &client(dir.path()), &gw).await;
    check_log(&pg.client().await, &gw, &{
        let mut log = SimLog::new("audited");
        log.grow(66_000, "main");
        log
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_auditor_verifies_a_log_from_the_tile_endpoints_alone_on_the_embedded_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(dir.path(), "", &[]);
    let mut gw = SimGateway::new(6);
    let (ok, out, err) = common::cli(dir.path(), &["hub", "enroll", &gw.id, &gw.vkey]);
    assert!(ok, "{err}");
    gw.token = line_value(&out, "token ");
    walk_a_log_through_the_tiles(&hub, &client(dir.path()), &gw).await;
}

/// Pushes every log of `gw` through `hub` in batches of 64 rows.
async fn push_all(hub: &HubProc, client: &reqwest::Client, gw: &SimGateway, logs: &[SimLog]) {
    let pusher = Pusher::new(client.clone(), std::slice::from_ref(hub));
    for log in logs {
        pusher.push(gw, log, 64).await;
    }
}

/// Enrols `gw` at the hub in `dir` through the CLI (`url` empty: the embedded hub).
fn enroll_by_cli(dir: &std::path::Path, url: &str, gw: &mut SimGateway) {
    let (ok, out, err) = hub_cli(dir, url, &["hub", "enroll", &gw.id, &gw.vkey]);
    assert!(ok, "{err}");
    gw.token = line_value(&out, "token ");
}

/// `smgate hub import` of an embedded hub's file: refused with a message that says what to
/// do for a missing file, a database without the hub schema and a file a running hub holds;
/// otherwise every gateway, log, checkpoint and conflict arrives, verified, the tile
/// endpoints of a hub on PostgreSQL serve exactly what the embedded hub serves, and a second
/// import changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_copies_an_embedded_hub_file_and_a_second_import_changes_nothing() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let embedded = HubProc::start(old.path(), "", &[]);
    let old_client = client(old.path());
    let mut fleet = Vec::new();
    for g in 0..3u64 {
        let mut gw = SimGateway::new(300 + g);
        enroll_by_cli(old.path(), "", &mut gw);
        let logs: Vec<SimLog> = (0..2)
            .map(|m| {
                let mut log = SimLog::new(&format!("imp{m}"));
                log.grow(if m == 0 { 300 } else { 40 + g as usize }, "main");
                log
            })
            .collect();
        push_all(&embedded, &old_client, &gw, &logs).await;
        fleet.push((gw, logs));
    }
    // A conflict for the file to keep, and a gateway enrolled without logs.
    let (gw0, log0) = (&fleet[0].0, &fleet[0].1[1]);
    let forked = log0.fork(20, 30).batch(gw0, 20, 50, 20);
    let (s, _, _) = post(&old_client, &embedded.addr, &gw0.token, &forked)
        .await
        .unwrap();
    assert_eq!(s, 409);
    enroll_by_cli(old.path(), "", &mut SimGateway::new(399));
    drop(embedded);

    let file = old.path().join("hub.redb");
    let import = |f: &std::path::Path| {
        hub_cli(
            new.path(),
            &pg.url(),
            &["hub", "import", f.to_str().unwrap()],
        )
    };
    let (ok, _, err) = import(&old.path().join("missing.redb"));
    assert!(!ok && err.contains("no such hub file"), "{err}");
    let (ok, _, err) = import(&file);
    assert!(!ok && err.contains("smgate hub migrate"), "{err}");
    let (ok, _, err) = hub_cli(new.path(), &pg.url(), &["hub", "migrate"]);
    assert!(ok, "{err}");
    let (ok, out, err) = import(&file);
    assert!(ok, "{err}");
    assert!(
        out.contains("imported 6 logs (1023 new rows), 4 gateways enrolled"),
        "{out}"
    );
    let (ok, out, err) = import(&file);
    assert!(ok, "{err}");
    assert!(
        out.contains("imported 6 logs (0 new rows), 0 gateways enrolled, 4 already"),
        "{out}"
    );

    let embedded = HubProc::start(old.path(), "", &[]);
    let (ok, _, err) = import(&file);
    assert!(!ok && err.contains("locked by a running hub"), "{err}");
    let on_pg = HubProc::start(new.path(), &pg.url(), &[]);
    let (new_client, db) = (client(new.path()), pg.client().await);
    for (gw, logs) in &fleet {
        for log in logs {
            check_log(&db, gw, log).await;
            let (a, root_a, entries_a) = audit(&old_client, &embedded, gw, &log.machine).await;
            let (b, root_b, entries_b) = audit(&new_client, &on_pg, gw, &log.machine).await;
            assert_eq!((a.size, root_a, &entries_a), (b.size, root_b, &entries_b));
            assert_eq!(a.tiles, b.tiles, "{}/{}: tiles", gw.id, log.machine);
        }
    }
    let conflicts = db
        .query(
            "SELECT kind, seq, times, checkpoint FROM log_conflicts WHERE gw = $1",
            &[&gw0.id],
        )
        .await
        .unwrap();
    assert_eq!(conflicts.len(), 1, "the conflict is copied once");
    let (kind, seq, times, note): (String, i64, i64, String) = (
        conflicts[0].get(0),
        conflicts[0].get(1),
        conflicts[0].get(2),
        conflicts[0].get(3),
    );
    assert_eq!((kind.as_str(), seq, times), ("fork", 20, 1));
    assert_eq!(note, forked.checkpoint);
    // The gateways keep their tokens: a gateway pushes on to the hub on PostgreSQL.
    let (gw, logs) = &mut fleet[1];
    logs[0].grow(10, "main");
    let (s, body, _) = post(
        &new_client,
        &on_pg.addr,
        &gw.token,
        &logs[0].batch(gw, 300, 310, 300),
    )
    .await
    .unwrap();
    assert_eq!((s, body["stored_seq"].as_u64()), (200, Some(309)), "{body}");
}

/// The operator API's routes, each with a path parameter filled in.
fn operator_paths(gw: &str) -> Vec<String> {
    [
        "/v1/gateways",
        "/v1/gateways/{gw}",
        "/v1/gateways/{gw}/machines",
        "/v1/gateways/{gw}/machines/op0",
        "/v1/gateways/{gw}/machines/op0/rows",
        "/v1/gateways/{gw}/conflicts",
        "/v1/stats",
        "/metrics",
    ]
    .iter()
    .map(|p| p.replace("{gw}", gw))
    .collect()
}

async fn get_as(
    client: &reqwest::Client,
    hub: &HubProc,
    path: &str,
    key: Option<&str>,
) -> (u16, String) {
    let mut req = client.get(hub.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// Every operator route answers the operator key alone: 401 to no key, a wrong key and a
/// gateway's own sync token; the auditors' paths stay public. Then what it answers: gateways
/// by page, a gateway's machines with lag and last checkpoint, conflicts with their signed
/// evidence, and metrics.
async fn operator_api(hub: &HubProc, dir: &std::path::Path, gws: &[SimGateway], pg: bool) {
    let client = client(dir);
    let op = Some(common::HUB_OPERATOR_KEY);
    let mut log = SimLog::new("op0");
    log.grow(120, "main");
    // The gateway has 120 rows and sends the first 100: 20 rows of lag.
    let batch = log.batch(&gws[0], 0, 100, 0);
    let (s, _, _) = post(&client, &hub.addr, &gws[0].token, &batch)
        .await
        .unwrap();
    assert_eq!(s, 200);
    let forked = log.fork(50, 60).batch(&gws[0], 50, 110, 0);
    let (s, _, _) = post(&client, &hub.addr, &gws[0].token, &forked)
        .await
        .unwrap();
    assert_eq!(s, 409);
    let gw = gws[0].id.clone();
    for path in operator_paths(&gw) {
        for (who, key, want) in [
            ("anonymous", None, 401),
            ("a wrong key", Some("smo_not-the-operator"), 401),
            ("the gateway's sync token", Some(gws[0].token.as_str()), 401),
            ("the operator", op, 200),
        ] {
            let (status, body) = get_as(&client, hub, &path, key).await;
            assert_eq!(status, want, "{path} as {who}: {body}");
        }
    }
    let (s, _) = get_as(&client, hub, &format!("/logs/{gw}/op0/checkpoint"), None).await;
    assert_eq!(s, 200, "the auditors' path is public");

    let json = |t: String| serde_json::from_str::<serde_json::Value>(&t).unwrap();
    let page = json(get_as(&client, hub, "/v1/gateways?limit=1", op).await.1);
    assert_eq!(page["gateways"].as_array().unwrap().len(), 1);
    let after = page["next"].as_str().unwrap().to_owned();
    let page2 = json(
        get_as(
            &client,
            hub,
            &format!("/v1/gateways?limit=1&after={after}"),
            op,
        )
        .await
        .1,
    );
    let ids = [
        &page["gateways"][0]["gateway_id"],
        &page2["gateways"][0]["gateway_id"],
    ];
    assert_eq!(ids, [&gws[0].id, &gws[1].id]);
    let nums = |v: &serde_json::Value, keys: &[&str]| -> Vec<Option<u64>> {
        keys.iter().map(|k| v[k].as_u64()).collect()
    };
    let one = json(
        get_as(&client, hub, &format!("/v1/gateways/{gw}"), op)
            .await
            .1,
    );
    let want = [Some(1), Some(100), Some(20)];
    assert_eq!(nums(&one, &["machines", "rows", "lag_rows"]), want);
    let path = format!("/v1/gateways/{gw}/machines/op0");
    let m = json(get_as(&client, hub, &path, op).await.1);
    let want = [Some(100), Some(120), Some(20)];
    assert_eq!(
        nums(&m, &["stored_size", "gateway_head_size", "lag_rows"]),
        want
    );
    assert_eq!(m["checkpoint"].as_str(), Some(batch.checkpoint.as_str()));
    assert!(m["last_ingest_age_ms"].as_i64().unwrap() >= 0);
    let c = json(
        get_as(&client, hub, &format!("/v1/gateways/{gw}/conflicts"), op)
            .await
            .1,
    );
    let c = &c["conflicts"][0];
    assert_eq!(
        (c["kind"].as_str(), c["at"].as_u64(), c["times"].as_u64()),
        (Some("fork"), Some(50), Some(1))
    );
    smgate::ledger::verify_note(c["checkpoint"].as_str().unwrap(), &gws[0].vkey)
        .expect("signed evidence");
    assert_eq!(
        c["stored_checkpoint"].as_str(),
        Some(batch.checkpoint.as_str())
    );
    let metrics = get_as(&client, hub, "/metrics", op).await.1;
    for line in [
        "smgate_hub_ingest_answers_total{status=\"200\"} 1",
        "smgate_hub_ingest_answers_total{status=\"409\"} 1",
        "smgate_hub_rows_stored_total 100",
        "smgate_hub_store_seconds_count 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    assert_eq!(metrics.contains("smgate_hub_db_pool_open"), pg, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_api_answers_the_operator_key_alone_on_postgres() {
    let Some((pg, db)) = database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(dir.path(), &pg.url(), &[]);
    let mut gws = [SimGateway::new(400), SimGateway::new(401)];
    for gw in &mut gws {
        gw.enroll_in(&db).await;
    }
    operator_api(&hub, dir.path(), &gws, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_api_answers_the_operator_key_alone_on_the_embedded_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(dir.path(), "", &[]);
    let mut gws = [SimGateway::new(400), SimGateway::new(401)];
    for gw in &mut gws {
        enroll_by_cli(dir.path(), "", gw);
    }
    operator_api(&hub, dir.path(), &gws, false).await;
}
