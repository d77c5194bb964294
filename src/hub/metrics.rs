//! `GET /metrics` of the hub, in the Prometheus text format: the ingest answers by status
//! (200, 400, 401, 409 conflicts, 503 unavailable), rows received and stored, compare-and-sets
//! lost to other hubs, the time each ingest waited for its store, and the database pool.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Stats;
use crate::metrics::{counter, histogram};

/// Upper bounds of the store latency buckets, in seconds.
const BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A histogram of durations with fixed buckets ([`BOUNDS`] and +Inf), lock-free.
#[derive(Debug, Default)]
pub struct Latency {
    counts: [AtomicU64; BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BOUNDS.iter().position(|b| s <= *b).unwrap_or(BOUNDS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// A database pool's connections: open, idle, and requests waiting for one.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// The hub's metrics; `pool` is `None` for the embedded store.
pub fn render(stats: &Stats, pool: Option<PoolState>) -> String {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    counter(
        &mut out,
        "smgate_hub_ingest_requests_total",
        "Ingest requests received.",
        l(&stats.requests),
    );
    let answers = [
        ("200", l(&stats.accepted)),
        ("400", l(&stats.bad_requests)),
        ("401", l(&stats.unauthorized)),
        ("409", l(&stats.conflicts)),
        ("503", l(&stats.unavailable)),
    ];
    let name = "smgate_hub_ingest_answers_total";
    let _ = writeln!(
        out,
        "# HELP {name} Ingest answers by status (409: fork or tampered, 503: store unavailable).\n# TYPE {name} counter"
    );
    for (status, n) in answers {
        let _ = writeln!(out, "{name}{{status=\"{status}\"}} {n}");
    }
    for (name, help, value) in [
        (
            "smgate_hub_rows_received_total",
            "Rows in ingest requests.",
            &stats.rows_received,
        ),
        (
            "smgate_hub_rows_stored_total",
            "Rows this hub stored (new rows only).",
            &stats.rows_stored,
        ),
        (
            "smgate_hub_stored_row_bytes_total",
            "Bytes of the rows this hub stored.",
            &stats.stored_row_bytes,
        ),
        (
            "smgate_hub_body_bytes_total",
            "Bytes of ingest request bodies.",
            &stats.body_bytes,
        ),
        (
            "smgate_hub_lost_races_total",
            "Compare-and-sets lost to another hub (the batch was re-checked).",
            &stats.lost_races,
        ),
    ] {
        counter(&mut out, name, help, l(value));
    }
    let lat = &stats.store_latency;
    let bounds: Vec<String> = BOUNDS.iter().map(f64::to_string).collect();
    let counts: Vec<u64> = lat.counts.iter().map(l).collect();
    histogram(
        &mut out,
        "smgate_hub_store_seconds",
        "Time one ingest waited for its store (reads and commit).",
        &bounds,
        &counts,
        l(&lat.sum_us) as f64 / 1e6,
    );
    if let Some(p) = pool {
        for (name, help, v) in [
            (
                "smgate_hub_db_pool_max",
                "Most database connections of this hub.",
                p.max_size,
            ),
            (
                "smgate_hub_db_pool_open",
                "Open database connections.",
                p.size,
            ),
            (
                "smgate_hub_db_pool_idle",
                "Idle database connections.",
                p.available,
            ),
            (
                "smgate_hub_db_pool_waiting",
                "Requests waiting for a database connection.",
                p.waiting,
            ),
        ] {
            gauge(&mut out, name, help, v as f64);
        }
    }
    out
}
