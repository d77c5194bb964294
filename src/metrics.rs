//! Counters for `/metrics`, rendered in the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::BatchStats;
use crate::store::{LATENCY_BOUNDS, SIZE_BOUNDS};

#[derive(Default)]
pub struct Metrics {
    /// (method, route template, status) → count.
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
    pub rate_limited: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub connections: AtomicU64,
}

impl Metrics {
    /// Counts a request under its route template (see `http::openapi::route_template`), so
    /// that labels stay few whatever the slugs are.
    pub fn record_request(&self, method: &str, route: &'static str, status: u16) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((method.to_string(), route, status)).or_insert(0) += 1;
        }
    }

    pub fn render(&self, batches: &BatchStats, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP smgate_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE smgate_http_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for ((method, route, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "smgate_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        counter(
            &mut out,
            "smgate_rate_limited_total",
            "Requests refused with 429.",
            self.rate_limited.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "smgate_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            self.tls_handshake_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "smgate_connections_total",
            "Accepted TCP connections.",
            self.connections.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "smgate_commits_total",
            "Write transactions committed or attempted.",
            batches.commits.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "smgate_commit_failures_total",
            "Write transactions whose commit failed.",
            batches.failed_commits.load(Ordering::Relaxed),
        );
        if let Ok(sizes) = batches.size_buckets.lock() {
            let labels: Vec<String> = SIZE_BOUNDS.iter().map(|b| b.to_string()).collect();
            histogram(
                &mut out,
                "smgate_commit_batch_size",
                "Write requests per commit.",
                &labels,
                &sizes[..],
                batches.requests.load(Ordering::Relaxed) as f64,
            );
        }
        if let Ok(lat) = batches.latency_buckets.lock() {
            let labels: Vec<String> = LATENCY_BOUNDS.iter().map(|b| b.to_string()).collect();
            let sum = batches.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            histogram(
                &mut out,
                "smgate_commit_seconds",
                "Commit latency (one fsync per batch).",
                &labels,
                &lat[..],
                sum,
            );
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// A gauge with one label, one sample per value (e.g. sync lag per machine).
pub fn labelled_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (value, v) in values {
        let value = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {v}");
    }
}

pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

pub fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[String],
    counts: &[u64],
    sum: f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        let le = bounds.get(i).map(String::as_str).unwrap_or("+Inf");
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
}

/// Resident set size of this process, from `VmRSS` in `/proc/self/status` (0 where that file
/// does not exist). The kernel reports it in kB, so the page size (4 KiB on most x86 kernels,
/// 16 KiB on some ARM ones) needs no guess.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
