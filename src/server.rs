//! The running gateway: shared state, start-up, and orderly shutdown.
//!
//! `start` opens the store, starts the writer, binds the listener and returns at once with a
//! [`Running`] handle; `Running::shutdown` stops accepting, lets requests finish, commits the
//! last batch, and only then returns.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{self, AuthError, Principal, RateLimiter};
use crate::clock;
use crate::config::Config;
use crate::gateway::{self, Identity, InitError};
use crate::http::ApiError;
use crate::machines;
use crate::metrics::Metrics;
use crate::store::{GroupCommit, Store, StoreError, StoreOptions};
use crate::tls::{Acceptor, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MQTT: {0}")]
    Mqtt(String),
}

/// State shared by every request handler.
pub struct Gateway {
    pub config: Config,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub identity: Identity,
    pub tls: Arc<Acceptor>,
    pub metrics: Metrics,
    /// Upstream sync status, shared by the sync task and `/api/sync/status`.
    pub sync: crate::sync::client::SyncState,
    pub spinup_limit: RateLimiter<IpAddr>,
    /// Writes per machine (slug).
    pub write_limit: RateLimiter<String>,
    /// Reads per machine by callers other than its owner.
    pub read_limit: RateLimiter<String>,
    pub machine_defaults: machines::Defaults,
    pub started: Instant,
    pub started_ms: i64,
    /// Compiled statecharts by version id.
    pub charts: Arc<crate::instances::Charts>,
    pub timers_fired: std::sync::atomic::AtomicU64,
    /// Agent runs: config, the credential sealing key, ticker counters.
    pub agents: crate::agents::Agents,
    /// MQTT counters, and the hook through which committed steps reach the state publisher.
    pub mqtt: Arc<crate::mqtt::Shared>,
}

impl Gateway {
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
                    rss_bytes() as f64,
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
                lag.push((m.slug, (size - acked) as f64));
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

/// Resident set size from `/proc/self/statm` (0 where that file does not exist).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<()>,
    timers: JoinHandle<()>,
    agents: JoinHandle<()>,
    mqtt: Option<crate::mqtt::Running>,
}

impl Running {
    /// SIGTERM semantics: stop accepting, finish in-flight requests, commit the last batch.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
        let _ = self.timers.await;
        let _ = self.agents.await;
        // The MQTT batcher commits and acks its last batch before the writer stops.
        if let Some(m) = self.mqtt {
            m.stopped().await;
        }
        self.gateway.writer.shutdown().await;
    }

    /// Address of the MQTT server, when it runs.
    pub fn mqtt_broker(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|m| m.listen_addr())
    }

    /// Address of the MQTT over TLS listener, when it runs.
    pub fn mqtt_tls(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|m| m.tls_addr())
    }

    /// Re-reads the certificate and key (SIGHUP).
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        let c = &self.gateway.config;
        self.gateway.tls.reload(&c.cert_path(), &c.key_path())
    }
}

/// Starts the gateway; initialises the data directory first if it is empty. The returned
/// `Option` carries what `init` made, so the caller can show the owner key once.
pub async fn start(
    config: Config,
    store_options: Option<StoreOptions>,
) -> Result<(Running, Option<gateway::Initialised>), StartError> {
    let started = Instant::now();
    let initialised = if gateway::is_initialised(&config) {
        None
    } else {
        Some(gateway::init(&config).await?)
    };
    let options = store_options.unwrap_or_else(|| gateway::store_options(&config));
    let store = Store::open(&config.db_path(), options)?;
    let writer = GroupCommit::start(store.clone());
    let identity = Identity::load(&gateway::identity_path(&config))?;
    let tls = Arc::new(Acceptor::load(&config.cert_path(), &config.key_path())?);
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.http.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.http.listen,
        source,
    })?;
    let gw = Arc::new(Gateway {
        spinup_limit: RateLimiter::per_minute(config.limits.spinup_per_minute_per_ip),
        write_limit: RateLimiter::per_minute(config.limits.writes_per_minute_per_machine),
        read_limit: RateLimiter::per_minute(config.limits.reads_per_minute_per_machine),
        machine_defaults: machines::Defaults {
            region: config.gateway.region.clone(),
            parent_origin: config.parent_origin(),
        },
        agents: crate::agents::Agents::new(&config)?,
        config,
        store,
        writer,
        identity,
        tls,
        metrics: Metrics::default(),
        sync: Default::default(),
        started,
        started_ms: clock::now_ms(),
        charts: Arc::default(),
        timers_fired: Default::default(),
        mqtt: Default::default(),
    });
    let (tx, rx) = watch::channel(false);
    // Not awaited on shutdown: an unsaved ack only means that batch is sent again.
    tokio::spawn(crate::sync::client::run(gw.clone(), rx.clone()));
    let http = tokio::spawn(crate::http::serve(listener, gw.clone(), rx.clone()));
    let timers = tokio::spawn(crate::instances::timers::run(gw.clone(), rx.clone()));
    let agents = tokio::spawn(crate::agents::ticker::run(gw.clone(), rx.clone()));
    let mqtt = crate::mqtt::start(gw.clone(), rx)
        .await
        .map_err(StartError::Mqtt)?;
    Ok((
        Running {
            addr,
            gateway: gw,
            shutdown: tx,
            http,
            timers,
            agents,
            mqtt,
        },
        initialised,
    ))
}
