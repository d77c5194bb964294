//! The MQTT writer alone: what applying a heartbeat costs smgate's writer thread, without the
//! broker, the devices or the sockets that share the cores in `cargo bench --bench mqtt`.
//!
//! `cargo bench --bench ingest` — 10,000 instances of the example heartbeat machine (created
//! through auto-create first), then batches of 4,096 heartbeats to instances picked at random
//! (a fixed seed), each batch applied by `mqtt::ingest::apply_then_forget` in one write
//! transaction and committed with a sync, as the gateway's writer does. Reports per heartbeat:
//! CPU time of the applying thread (split into apply and commit), CPU time of the process (the
//! store's sync thread too), bytes written to the file, and wall time.
//!
//! Sizes: `TEST_INGEST_INSTANCES` (10,000), `TEST_INGEST_BATCH` (4,096), `TEST_INGEST_BATCHES`
//! (40 measured, after 4 that warm up); store options: `TEST_INGEST_CACHE_MB` and
//! `TEST_INGEST_WINDOW_MB` (the gateway's defaults, 12 and 16).
//!
//! Measured here (applying thread, µs per heartbeat; bytes written per heartbeat): 1,000
//! instances 14.1 (2,132 B), 10,000 instances 21.4–22.2 (3,915 B), 100,000 instances 32.3
//! (10,822 B); with 10,000 instances, batches of 1,024 26.2 (commit 10.1) and of 256 29.3
//! (commit 19.1); a 48 or 96 MiB cache 22.1–23.5, no better than 12.
//!
//! Instruction counts, which do not depend on what else the machine is doing, for comparing
//! two builds of the writer: build with symbols (`cargo bench --bench ingest --profile
//! profiling --no-run`; release binaries are stripped), then `TEST_INGEST_BATCHES=4 valgrind
//! --tool=callgrind --toggle-collect='*measured_batch*' target/profiling/deps/ingest-<hash>
//! --bench`; the total `Ir` divided by the heartbeats measured (printed) is instructions per
//! heartbeat (valgrind hides SHA-NI, so SHA-256 runs its slower software path there).

mod measure;

use std::time::{Duration, Instant};

use measure::{bytes_written, cpu_secs, env_u64};
use smgate::instances::{self, Charts};
use smgate::mqtt::ingest::{self, Message, Outcome, Rules};

const MACHINE: &str = "hb";

/// The allocator of the `smgate` binary, so that the writer here allocates as the gateway's
/// does.
#[global_allocator]
static ALLOCATOR: smgate::alloc::Allocator = smgate::alloc::Allocator;

/// CPU time of the calling thread, from `/proc/thread-self/schedstat` (nanoseconds on CPU).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// xorshift64*: a fixed sequence of instance picks, the same in every run.
struct Picks(u64);

impl Picks {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

struct Bench {
    db: std::sync::Arc<redb::Database>,
    charts: Charts,
    rules: Rules,
    /// The sending client's session (the dedup entries' key).
    client: std::sync::Arc<str>,
    /// Packet ids cycle through an inflight window, as a broker's do.
    pkid: u16,
    tag: u64,
    now_ms: i64,
}

/// Time spent in one measured batch.
#[derive(Default, Clone, Copy)]
struct Spent {
    apply: Duration,
    commit: Duration,
    wall: Duration,
}

impl Bench {
    fn messages(&mut self, devices: impl Iterator<Item = u64>) -> Vec<Message> {
        devices
            .map(|d| {
                self.pkid = self.pkid % 8192 + 1;
                Message::new(
                    self.client.clone(),
                    format!("smgate/{MACHINE}/dev-{d}/heartbeat"),
                    bytes::Bytes::from(format!("{{\"seq\":{},\"rssi\":-67}}", self.tag)),
                    self.pkid,
                    false,
                    self.rules.max_payload,
                )
            })
            .collect()
    }

    /// [`Bench::batch`] of the measured batches, and only of those: the name callgrind's
    /// `--toggle-collect` counts instructions in.
    #[inline(never)]
    fn measured_batch(&mut self, batch: &mut [Message]) -> Spent {
        self.batch(batch)
    }

    /// Applies `batch` in one write transaction and commits it; every message must apply.
    fn batch(&mut self, batch: &mut [Message]) -> Spent {
        self.tag += 1;
        self.now_ms += 1;
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let txn = self.db.begin_write().expect("begin");
        let out = ingest::apply_then_forget(
            &txn,
            &self.charts,
            &self.rules,
            batch,
            self.tag,
            &[],
            self.now_ms,
        )
        .expect("apply");
        let applied = thread_cpu();
        txn.commit().expect("commit");
        let done = thread_cpu();
        let refused = out
            .iter()
            .filter(|o| !matches!(o, Outcome::Applied { .. }))
            .count();
        assert_eq!(refused, 0, "every heartbeat applies");
        Spent {
            apply: applied - cpu,
            commit: done - applied,
            wall: wall.elapsed(),
        }
    }
}

fn main() {
    let instances = env_u64("TEST_INGEST_INSTANCES", 10_000);
    let batch_size = env_u64("TEST_INGEST_BATCH", 4096);
    let batches = env_u64("TEST_INGEST_BATCHES", 40);
    let dir = tempfile::tempdir().expect("tempdir");
    // The gateway's store options (`store.cache_mb`, `store.write_window_mb`), or others.
    let mut options = smgate::store::StoreOptions {
        tables: smgate::gateway::TABLES,
        ..Default::default()
    };
    if let Some(mb) = std::env::var("TEST_INGEST_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.cache_bytes = usize::checked_shl(mb, 20).unwrap_or(usize::MAX);
    }
    if let Some(mb) = std::env::var("TEST_INGEST_WINDOW_MB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.write_window_bytes = usize::checked_shl(mb, 20).unwrap_or(usize::MAX);
    }
    let store = smgate::store::Store::open(&dir.path().join("db.redb"), options).expect("store");
    let mut b = Bench {
        client: "anonymous|device-sim".into(),
        db: store.database().expect("database"),
        charts: Charts::default(),
        rules: Rules {
            prefix: "smgate".into(),
            client_id: "smgate-bench".into(),
            max_payload: 1024,
            dead_letter_cap: 1000,
        },
        pkid: 0,
        tag: 0,
        now_ms: 1_700_000_000_000,
    };
    let def = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("firmware-config/machines/heartbeat.json"),
    )
    .expect("heartbeat.json");
    {
        let txn = b.db.begin_write().expect("begin");
        let owner = smgate::auth::Zid::parse("ZEQ00000000001").expect("zid");
        let defaults = smgate::machines::Defaults {
            region: "bench".into(),
            parent_origin: "https://bench".into(),
        };
        let request =
            smgate::machines::NewMachine::from_json(&serde_json::json!({ "slug": MACHINE }))
                .expect("request");
        smgate::machines::create(&txn, &owner, "bench", request, &defaults, b.now_ms)
            .expect("machine");
        instances::create_version(&txn, MACHINE, &def, None, true, "bench", b.now_ms)
            .expect("version");
        instances::set_auto_create(&txn, MACHINE, true).expect("auto-create");
        txn.commit().expect("commit");
    }
    // Every instance is created by its first heartbeat, in batches of the measured size.
    let mut next = 0;
    while next < instances {
        let end = (next + batch_size).min(instances);
        let mut batch = b.messages(next..end);
        b.batch(&mut batch);
        next = end;
    }
    let mut picks = Picks(0x9e37_79b9_7f4a_7c15);
    let mut run = |b: &mut Bench, n: u64, measured: bool| {
        let mut total = Spent::default();
        for _ in 0..n {
            let mut batch = b.messages((0..batch_size).map(|_| picks.next(instances)));
            let s = if measured {
                b.measured_batch(&mut batch)
            } else {
                b.batch(&mut batch)
            };
            total.apply += s.apply;
            total.commit += s.commit;
            total.wall += s.wall;
        }
        total
    };
    run(&mut b, 4, false);
    let me = std::process::id();
    let (process, written) = (cpu_secs(me), bytes_written(me));
    let spent = run(&mut b, batches, true);
    let process = Duration::from_secs_f64(cpu_secs(me) - process);
    let written = bytes_written(me) - written;
    let n = (batches * batch_size) as f64;
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
    println!(
        "MQTT writer alone: {instances} instances, {batches} batches of {batch_size} heartbeats ({n:.0} measured)"
    );
    println!(
        "  applying thread CPU per heartbeat: {:.2} µs (apply {:.2}, commit {:.2})",
        us(spent.apply + spent.commit),
        us(spent.apply),
        us(spent.commit)
    );
    println!(
        "  process CPU per heartbeat (with the sync thread): {:.2} µs; wall {:.2} µs ({:.0} heartbeats/s)",
        us(process),
        us(spent.wall),
        n / spent.wall.as_secs_f64()
    );
    println!("  bytes written per heartbeat: {:.0}", written / n);
}
