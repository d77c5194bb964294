//! `smgate hub` on a highly available PostgreSQL: a pg_auto_failover formation (monitor,
//! primary, synchronous standby; `common/autofailover.rs`), the hub connected with a multi-host
//! URL (`target_session_attrs=read-write`), simulated gateways ingesting through it, and the
//! primary SIGKILLed mid-ingest.
//!
//! Invariant checked: a 200 from the hub means the batch is committed on the primary and on
//! its synchronous standby, so after the monitor promotes the standby every batch the hub had
//! acknowledged is on the new primary; the hub reconnects to it by itself (the pool drops the
//! dead connections, a new one picks the host that takes writes), ingest goes on, and every
//! log there equals its gateway's, verified against the gateway-signed checkpoint.

#[path = "common/autofailover.rs"]
mod autofailover;
mod common;
#[path = "common/hubsim.rs"]
mod hubsim;
#[path = "common/pg.rs"]
mod pg;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use autofailover::Formation;
use hubsim::{check_log, client, HubProc, Pusher, SimGateway, SimLog};
use smgate::hub::pg::Pg;

/// Gateways × machines × rows pushed in batches of `BATCH_ROWS`: 1,200 batches.
const GATEWAYS: u64 = 10;
const MACHINES: usize = 2;
const ROWS: usize = 600;
const BATCH_ROWS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_mid_ingest_fails_over_and_every_acknowledged_batch_survives() {
    let Some(mut formation) = Formation::start().await else {
        return;
    };
    // Without a synchronous standby a failover may lose acknowledged commits: the test
    // would prove nothing.
    formation.assert_synchronous().await;
    let url = formation.url("smgate");
    let dir = tempfile::tempdir().unwrap();
    let env = [("SMGATE_HUB_TIMEOUT_MS", "3000"), ("RUST_LOG", "error")];
    let hub = HubProc::start(dir.path(), &url, &env);
    let config = smgate::config::HubConfig {
        database_url: url.clone(),
        ..Default::default()
    };
    let db = Pg::connect(&config).await.unwrap();
    let mut fleet = Vec::new();
    for g in 0..GATEWAYS {
        let mut gw = SimGateway::new(200 + g);
        gw.enroll_in(&db).await;
        let logs: Vec<SimLog> = (0..MACHINES)
            .map(|m| {
                let mut log = SimLog::new(&format!("ha{m}"));
                log.grow(ROWS, "main");
                log
            })
            .collect();
        fleet.push(Arc::new((gw, logs)));
    }
    let pusher = Pusher::new(client(dir.path()), std::slice::from_ref(&hub));
    let mut tasks = Vec::new();
    for entry in &fleet {
        for m in 0..MACHINES {
            let (entry, pusher) = (entry.clone(), pusher.clone());
            tasks.push(tokio::spawn(async move {
                let (gw, logs) = &*entry;
                pusher.push(gw, &logs[m], BATCH_ROWS).await
            }));
        }
    }
    let total_batches = GATEWAYS * MACHINES as u64 * ROWS as u64 / BATCH_ROWS;
    while pusher.acked.load(Ordering::Relaxed) < total_batches / 6 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = pusher.acked.load(Ordering::Relaxed);
    formation.kill(0);
    eprintln!("primary SIGKILLed after {at_kill} of {total_batches} batches acknowledged");
    formation
        .wait_states(&["", "wait_primary"], Duration::from_secs(120))
        .await;
    // What the hub had acknowledged by now is on the new primary.
    let acked = pusher.acked_sizes.lock().unwrap().clone();
    let at_failover = pusher.acked.load(Ordering::Relaxed);
    let new_primary = formation.client(1, "smgate").await;
    for ((gw, machine), size) in &acked {
        let stored: i64 = new_primary
            .query_opt(
                "SELECT size FROM logs WHERE gw = $1 AND machine = $2",
                &[gw, machine],
            )
            .await
            .unwrap()
            .map_or(0, |r| r.get(0));
        assert!(
            stored as u64 >= *size,
            "{gw}/{machine}: the hub acknowledged {size} rows, the new primary has {stored}"
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = pusher.acked.load(Ordering::Relaxed);
    let retries = pusher.retries.load(Ordering::Relaxed);
    eprintln!("{at_failover} batches acknowledged at failover, {total} in all, {retries} retries");
    assert!(at_kill < total_batches, "the kill came after the ingest");
    assert!(
        retries > 0,
        "no batch was refused while the primary was down"
    );
    assert!(total > at_failover, "ingest went on on the new primary");
    for entry in &fleet {
        for log in &entry.1 {
            check_log(&new_primary, &entry.0, log).await;
        }
    }
}
