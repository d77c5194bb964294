//! Hub ingest on PostgreSQL against its ceiling: rows/s and batches/s that `smgate hub`
//! processes (1 and 3 hub processes, batches of 256 and 4,096 rows) beside a plain binary
//! `COPY` of the same rows into the same table (`log_rows`) in the same run, on one throwaway
//! PostgreSQL cluster (`tests/common/pg.rs`: loopback, `fsync=off` for both sides).
//!
//! `cargo bench --bench hub` — `HUB_BENCH_LOGS` logs (32) of `HUB_BENCH_ROWS_PER_LOG` rows
//! (8,192) are signed once; each configuration pushes all of them as fresh gateways (new ids),
//! one task per log, each batch to the next hub in turn, retried on 503 as a gateway does.
//! The batches' bodies (rows, gateway-signed checkpoint, consistency proof) are built before
//! the clock starts, so the figures are the hub's and the database's work, not the simulated
//! gateways'. Bytes stored per row: growth of the hub's tables (indexes and partitions
//! included) over the rows a configuration stored, beside the rows' own size.
//!
//! Figures: docs/performance.md. Needs PostgreSQL (Debian's postgresql-15).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/hubsim.rs"]
mod hubsim;
mod measure;
#[path = "../tests/common/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubsim::{client, HubProc, SimGateway, SimLog};
use measure::env_u64;
use smgate::hub::pg::Pg;
use smgate::sync::{CONTENT_TYPE, INGEST_PATH};

/// The hub's tables, whose growth is the bytes stored.
const TABLES: &str = "'logs', 'log_rows', 'log_checkpoints', 'log_tiles'";

/// One log's batches, encoded, in order, and the token they go with.
struct Pushes {
    token: String,
    bodies: Vec<Vec<u8>>,
}

/// Fresh gateways (ids from `first_id`) for `logs`, one per 4 logs, enrolled; every log cut
/// into batches of `batch_rows`, each proving consistency from the previous one.
async fn prepare(db: &Pg, logs: &[SimLog], first_id: u64, batch_rows: u64) -> Vec<Pushes> {
    let mut out = Vec::new();
    let mut gw = SimGateway::new(first_id);
    for (i, log) in logs.iter().enumerate() {
        if i % 4 == 0 {
            gw = SimGateway::new(first_id + i as u64 / 4);
            gw.enroll_in(db).await;
        }
        let mut bodies = Vec::new();
        let mut from = 0;
        while from < log.size() {
            let to = (from + batch_rows).min(log.size());
            bodies.push(postcard::to_allocvec(&log.batch(&gw, from, to, from)).unwrap());
            from = to;
        }
        out.push(Pushes {
            token: gw.token.clone(),
            bodies,
        });
    }
    out
}

/// Posts one body until the hub answers 200 (503 and transport errors are retried).
async fn post_until_stored(c: &reqwest::Client, hub: &str, token: &str, body: &[u8]) {
    loop {
        let res = c
            .post(format!("https://{hub}{INGEST_PATH}"))
            .bearer_auth(token)
            .header("content-type", CONTENT_TYPE)
            .body(body.to_vec())
            .send()
            .await;
        match res.map(|r| r.status().as_u16()) {
            Ok(200) => return,
            Ok(503) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(s) => panic!("the hub answered {s}"),
        }
    }
}

/// Pushes every log (one task each) through `hubs`; returns the wall time.
async fn push(c: &reqwest::Client, hubs: &[HubProc], work: Vec<Pushes>) -> Duration {
    let addrs: Arc<Vec<String>> = Arc::new(hubs.iter().map(|h| h.addr.clone()).collect());
    let turn = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|p| {
            let (c, addrs, turn) = (c.clone(), addrs.clone(), turn.clone());
            tokio::spawn(async move {
                for body in &p.bodies {
                    let i = turn.fetch_add(1, Ordering::Relaxed) as usize % addrs.len();
                    post_until_stored(&c, &addrs[i], &p.token, body).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

async fn tables_bytes(db: &tokio_postgres::Client) -> i64 {
    let sql = format!(
        "SELECT sum(pg_total_relation_size(i.inhrelid))::int8 FROM pg_inherits i \
         WHERE i.inhparent::regclass::text IN ({TABLES})"
    );
    db.query_one(&sql, &[]).await.unwrap().get(0)
}

/// The ceiling: every row, as the hub stores it, in one binary `COPY` into `log_rows` under
/// gateway ids no configuration uses. Returns the wall time.
async fn copy_ceiling(db: &tokio_postgres::Client, logs: &[SimLog]) -> Duration {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let started = Instant::now();
    let sink = db
        .copy_in("COPY log_rows (gw, machine, seq, row) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let types = [Type::TEXT, Type::TEXT, Type::INT8, Type::BYTEA];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    for (i, log) in logs.iter().enumerate() {
        let gw = SimGateway::new(0xc0_0000 + i as u64 / 4).id;
        for (seq, row) in log.rows.iter().enumerate() {
            let seq = seq as i64;
            writer
                .as_mut()
                .write(&[&gw, &log.machine, &seq, row])
                .await
                .unwrap();
        }
    }
    writer.finish().await.unwrap();
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let Some(pg) = pg::Postgres::start() else {
        return;
    };
    let (n_logs, per_log) = (
        env_u64("HUB_BENCH_LOGS", 32),
        env_u64("HUB_BENCH_ROWS_PER_LOG", 8_192),
    );
    let logs: Vec<SimLog> = (0..n_logs)
        .map(|m| {
            let mut log = SimLog::new(&format!("bench{m}"));
            log.grow(per_log as usize, "main");
            log
        })
        .collect();
    let rows = n_logs * per_log;
    let row_bytes: usize = logs.iter().flat_map(|l| &l.rows).map(Vec::len).sum();
    let config = smgate::config::HubConfig {
        database_url: pg.url(),
        ..Default::default()
    };
    let db = Pg::connect(&config).await.unwrap();
    db.migrate().await.unwrap();
    let sql = pg.client().await;
    let copy = copy_ceiling(&sql, &logs).await.as_secs_f64();
    let ceiling = rows as f64 / copy;
    println!(
        "hub ingest on PostgreSQL (one local cluster, loopback, fsync=off): {rows} rows in {n_logs} logs, {:.0} B per row",
        row_bytes as f64 / rows as f64
    );
    println!("  binary COPY into log_rows (ceiling)   {ceiling:>9.0} rows/s  ({copy:.2} s)");
    let dir = tempfile::tempdir().unwrap();
    let env = [("SMGATE_HUB_TIMEOUT_MS", "60000"), ("RUST_LOG", "error")];
    let mut hubs: Vec<HubProc> = Vec::new();
    let mut next_id = 0x100_0000;
    for (n_hubs, batch_rows) in [(1, 256), (1, 4_096), (3, 256), (3, 4_096)] {
        while hubs.len() < n_hubs {
            hubs.push(HubProc::start(dir.path(), &pg.url(), &env));
        }
        let work = prepare(&db, &logs, next_id, batch_rows).await;
        next_id += 0x1_0000;
        let batches: usize = work.iter().map(|p| p.bodies.len()).sum();
        let before = tables_bytes(&sql).await;
        let secs = push(&client(dir.path()), &hubs, work).await.as_secs_f64();
        let stored = (tables_bytes(&sql).await - before) as f64 / rows as f64;
        let rate = rows as f64 / secs;
        println!(
            "  {n_hubs} hub{} × {batch_rows:>5}-row batches       {rate:>9.0} rows/s  {:>7.0} batches/s  {:.2} of the ceiling  {stored:.0} B stored per row  ({secs:.2} s)",
            if n_hubs == 1 { " " } else { "s" },
            batches as f64 / secs,
            rate / ceiling,
        );
    }
}
