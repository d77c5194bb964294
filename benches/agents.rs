//! Agent runs: tick throughput and ticker jitter. A report, not a gate.
//!
//! `cargo bench --bench agents`
//!
//! 1. **ticks/s**: 100 live runs on one machine ticked through the writer, one write
//!    transaction (one fsync) per round of 100 ticks, as the ticker does each Zeqond: each
//!    tick charges the wallet, computes a generation (population 4), stores it and appends two
//!    log rows.
//! 2. **jitter**: a started gateway (in-process, real ticker) keeps over 100 live runs for
//!    40 Zeqonds (12 new runs each Zeqond, 10 generations each); lateness is each ticker
//!    tick's row time minus the start of its Zeqond (the row's time is taken inside the write
//!    transaction, before its fsync). Also counts gaps and doubles per run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use smgate::agents::{self, Enrichment, SpawnContext, SpawnRequest};
use smgate::auth::Principal;
use smgate::clock;
use smgate::config::Config;
use smgate::store::{GroupCommit, Store, StoreOptions};

type Failure = Box<dyn std::error::Error>;

const LIVE: usize = 100;
const ROUNDS: usize = 9;
const WAVES: usize = 5;

fn main() {
    if let Err(e) = report() {
        eprintln!("agents bench: FAILED: {e}");
        std::process::exit(1);
    }
}

fn request(problem: &str) -> SpawnRequest {
    SpawnRequest {
        problem: problem.into(),
        population: 4,
        generations: 10,
        precision: 0.0001,
        credential_id: None,
        parent_master_id: None,
        slug: None,
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report() -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(throughput())?;
    rt.block_on(jitter())?;
    Ok(())
}

async fn throughput() -> Result<(), Failure> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(
        &dir.path().join("smgate.redb"),
        StoreOptions {
            tables: smgate::gateway::TABLES,
            ..Default::default()
        },
    )?;
    let writer = GroupCommit::start(store);
    let defaults = smgate::machines::Defaults {
        region: "bench".into(),
        parent_origin: "bench".into(),
    };
    let t0 = clock::now_ms();
    let zid = writer
        .write(move |txn| -> Result<_, agents::AgentError> {
            let (account, _) = smgate::auth::create_account(txn, "bench", t0)?;
            agents::credit(txn, &account.zid, 1_000_000_000)?;
            Ok(account.zid)
        })
        .await?;
    let principal = Principal::Account {
        zid,
        key_id: "bench".into(),
    };
    let mut ticks = 0usize;
    let mut busy = Duration::ZERO;
    let mut now = t0;
    for wave in 0..WAVES {
        let (p, d) = (principal.clone(), defaults.clone());
        let ids: Vec<String> = writer
            .write(move |txn| -> Result<_, agents::AgentError> {
                let mut ids = Vec::new();
                for i in 0..LIVE {
                    let id = uuid::Uuid::new_v4().to_string();
                    let ctx = SpawnContext {
                        principal: &p,
                        agent_id: id.clone(),
                        max_live: u32::MAX,
                        defaults: &d,
                        enrichment: Enrichment::default(),
                        now_ms: now,
                    };
                    agents::spawn(
                        txn,
                        request(&format!("wave {wave} run {i} shield rho=2700 target=1e300")),
                        ctx,
                    )?;
                    ids.push(id);
                }
                Ok(ids)
            })
            .await?;
        for _ in 0..ROUNDS {
            now += clock::ZEQOND_MS;
            let ids = ids.clone();
            let started = Instant::now();
            let n = writer
                .write(move |txn| -> Result<usize, agents::AgentError> {
                    let mut n = 0;
                    for id in &ids {
                        if agents::tick(txn, id, "bench", "bench", Enrichment::default(), now)
                            .is_ok()
                        {
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .await?;
            busy += started.elapsed();
            ticks += n;
        }
    }
    writer.shutdown().await;
    let per_round = busy.as_secs_f64() * 1000.0 / (WAVES * ROUNDS) as f64;
    println!(
        "agents: {LIVE} live runs, {ticks} ticks in {:.3} s of writes",
        busy.as_secs_f64()
    );
    println!(
        "agents: ticks/s                    {:>10.0}",
        ticks as f64 / busy.as_secs_f64()
    );
    println!(
        "agents: ms per round of {LIVE} ticks  {per_round:>10.1}  (budget: one Zeqond, 777 ms)"
    );
    Ok(())
}

async fn jitter() -> Result<(), Failure> {
    let dir = tempfile::tempdir()?;
    let env = vec![
        ("SMGATE_HTTP_LISTEN".to_string(), "127.0.0.1:0".to_string()),
        ("SMGATE_MQTT_MODE".to_string(), "off".to_string()),
        ("SMGATE_LOG_LEVEL".to_string(), "warn".to_string()),
    ];
    let mut config = Config::load(None, env)?;
    config.data.dir = dir.path().join("data");
    let (running, made) = smgate::server::start(config, None).await?;
    let gw = running.parts.clone();
    let zid = made.ok_or("the data directory was not initialised")?.owner;
    let payer = zid.clone();
    gw.writer
        .write(move |txn| agents::credit(txn, &payer, 1_000_000_000))
        .await?;
    let principal = Principal::Account {
        zid: zid.clone(),
        key_id: "bench".into(),
    };
    let zeqonds = 40u64;
    // Runs live 10 Zeqonds: 12 new ones per Zeqond keep about 120 live (108 ticked by the ticker).
    let per_zeqond = LIVE / 10 + 2;
    for z in 0..zeqonds {
        let (p, d) = (principal.clone(), gw.machine_defaults.clone());
        gw.writer
            .write(move |txn| -> Result<(), agents::AgentError> {
                for i in 0..per_zeqond {
                    let ctx = SpawnContext {
                        principal: &p,
                        agent_id: uuid::Uuid::new_v4().to_string(),
                        max_live: u32::MAX,
                        defaults: &d,
                        enrichment: Enrichment::default(),
                        now_ms: clock::now_ms(),
                    };
                    agents::spawn(txn, request(&format!("z {z} run {i} target=1e300")), ctx)?;
                }
                Ok(())
            })
            .await?;
        gw.agents.wake.notify_one();
        let now = clock::now_ms();
        // Spawn in the middle of each Zeqond, away from the ticker's boundary.
        let wait = clock::ZEQOND_MS - now % clock::ZEQOND_MS + clock::ZEQOND_MS / 2;
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    tokio::time::sleep(Duration::from_millis(11 * clock::ZEQOND_MS as u64)).await;
    let slug = zid.as_str().to_ascii_lowercase();
    let rows = gw.store.view(|txn| {
        let size = smgate::ledger::log::read::head(txn, &slug)?
            .map(|h| h.size)
            .unwrap_or(0);
        smgate::ledger::log::read::rows(txn, &slug, 0, size)
    })?;
    running.shutdown().await;
    let mut late = Vec::new();
    let mut by_run: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut per_zeqond: BTreeMap<u64, usize> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.kind == "agent_tick") {
        let v: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let id = v["agent_id"].as_str().unwrap_or_default().to_string();
        by_run.entry(id).or_default().push(r.zeqond);
        if v["by"] == "ticker" {
            late.push(r.ts_ms - r.zeqond as i64 * clock::ZEQOND_MS);
            *per_zeqond.entry(r.zeqond).or_default() += 1;
        }
    }
    let (mut gaps, mut doubles) = (0, 0);
    for z in by_run.values() {
        for w in z.windows(2) {
            match w[1] - w[0] {
                0 => doubles += 1,
                1 => {}
                _ => gaps += 1,
            }
        }
    }
    late.sort_unstable();
    let most = per_zeqond.values().max().copied().unwrap_or(0);
    println!("agents: ticker over {zeqonds} Zeqonds, up to {most} live runs ticked per Zeqond, {} ticker ticks", late.len());
    println!(
        "agents: lateness after the Zeqond boundary  p50 {} ms  p99 {} ms  max {} ms",
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(0)
    );
    println!(
        "agents: gaps {gaps}  doubles {doubles}  (over {} runs)",
        by_run.len()
    );
    Ok(())
}
