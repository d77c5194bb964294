//! [`Deps`]: what the HTTP handlers use of the running gateway. `server::start` builds it
//! from the pieces it also hands to the background tasks (each task gets only its pieces).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::ApiError;
use crate::agents::Agents;
use crate::auth::{self, AuthError, Principal, RateLimiter, Slug};
use crate::clock;
use crate::config::Config;
use crate::gateway::Identity;
use crate::instances::Charts;
use crate::machines;
use crate::metrics::Metrics;
use crate::store::{GroupCommit, Store};
use crate::sync::client::SyncState;
use crate::tls::Acceptor;

/// What the HTTP API of one running gateway shares between its handlers.
pub struct Deps {
    pub config: Config,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub identity: Arc<Identity>,
    pub tls: Arc<Acceptor>,
    pub metrics: Metrics,
    /// Upstream sync status, shared with the sync task; read by `/api/sync/status`.
    pub sync: Arc<SyncState>,
    pub spinup_limit: RateLimiter<IpAddr>,
    /// Writes per machine (slug).
    pub write_limit: RateLimiter<Slug>,
    /// Reads per machine by callers other than its owner.
    pub read_limit: RateLimiter<Slug>,
    pub machine_defaults: machines::Defaults,
    pub started: Instant,
    pub started_ms: i64,
    /// Compiled statecharts by version id (shared with the timer task and MQTT).
    pub charts: Arc<Charts>,
    /// Timers fired by the timer task (a counter it shares for `/metrics`).
    pub timers_fired: Arc<AtomicU64>,
    /// Agent runs: config, the credential sealing key, ticker counters (shared with the ticker).
    pub agents: Arc<Agents>,
    /// MQTT counters, and the hook through which committed steps reach the state publisher.
    pub mqtt: Arc<crate::mqtt::Shared>,
}

impl Deps {
    /// Resolves the bearer token of a request.
    pub fn principal(&self, bearer: Option<&str>) -> Result<Principal, AuthError> {
        let now = clock::now_ms();
        // Store errors surface through `view` so that a read during a reopen is retried.
        self.store
            .view(|txn| match auth::resolve(txn, bearer, now) {
                Err(AuthError::Store(e)) => Err(e),
                other => Ok(other),
            })?
    }

    pub fn rate_limited(&self, retry_after: u64) -> ApiError {
        self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        ApiError::rate_limited(retry_after)
    }

    /// The Prometheus text of `/metrics`.
    pub fn render_metrics(&self) -> String {
        let machines = self.store.view(machines::count).unwrap_or(0);
        let mut out = self.metrics.render(
            self.writer.stats(),
            &[
                (
                    "smgate_uptime_seconds",
                    "Seconds since start.",
                    self.started.elapsed().as_secs_f64(),
                ),
                (
                    "smgate_machines",
                    "Machines on this gateway.",
                    machines as f64,
                ),
                (
                    "smgate_process_resident_bytes",
                    "Resident set size of the process.",
                    crate::metrics::rss_bytes() as f64,
                ),
            ],
        );
        out.push_str(&self.mqtt.render());
        crate::metrics::counter(
            &mut out,
            "smgate_timers_fired_total",
            "Statechart timers fired by the timer task.",
            self.timers_fired.load(Ordering::Relaxed),
        );
        for (name, help, value) in [
            (
                "smgate_agent_ticks_total",
                "Agent ticks the ticker committed.",
                &self.agents.ticked,
            ),
            (
                "smgate_agent_ticks_skipped_total",
                "Agent ticks the ticker skipped (run ended, already ticked, payer cannot pay).",
                &self.agents.skipped,
            ),
            (
                "smgate_agent_ticker_overruns_total",
                "Ticker passes that returned after the next Zeqond began (a slow commit).",
                &self.agents.overruns,
            ),
        ] {
            crate::metrics::counter(&mut out, name, help, value.load(Ordering::Relaxed));
        }
        // One read transaction for the store-derived gauges; skipped (not zeroed) when the
        // store is unavailable, so a reopen does not look like an empty backlog.
        let from_store = self.store.view(|txn| {
            let timers = crate::instances::pending_timers(txn)?;
            let mut lag = Vec::new();
            for m in machines::all(txn)? {
                let size = crate::ledger::log::read::head(txn, &m.slug)?.map_or(0, |h| h.size);
                let acked = crate::sync::client::acked(txn, &m.slug)?.min(size);
                lag.push((m.slug.into(), (size - acked) as f64));
            }
            Ok((timers, lag))
        });
        if let Ok((timers, lag)) = from_store {
            let _ = writeln!(
                out,
                "# HELP smgate_timers_pending Statechart timers waiting to fire.\n# TYPE smgate_timers_pending gauge\nsmgate_timers_pending {timers}"
            );
            crate::metrics::labelled_gauge(
                &mut out,
                "smgate_sync_lag_rows",
                "Log rows not yet acknowledged by the upstream, per machine.",
                "machine",
                &lag,
            );
        }
        out
    }
}
