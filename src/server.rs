//! The wiring of a running gateway: start-up and orderly shutdown. The one module that knows
//! every part; only `main.rs` imports it.
//!
//! `start` opens the store, starts the writer, binds the listener, hands each background task
//! the pieces it uses (the timer task, the agents' ticker, the upstream sync, MQTT) and each
//! HTTP API area its own part ([`http::Api`], built by `http_api`), and returns at once with a [`Running`] handle. `Running::shutdown`
//! stops accepting, lets requests finish, commits the last batch, and only then returns.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agents::{self, Agents};
use crate::auth::RateLimiter;
use crate::clock;
use crate::config::Config;
use crate::gateway::{self, Identity, InitError};
use crate::http;
use crate::instances::{self, Charts};
use crate::machines;
use crate::metrics::Metrics;
use crate::mqtt;
use crate::store::{GroupCommit, Store, StoreError, StoreOptions};
use crate::sync::{self, client::SyncState};
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

/// What a running gateway is made of, built once by [`start`]; each background task and each
/// API area gets the part of it that it uses.
pub struct Parts {
    pub config: Config,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub identity: Arc<Identity>,
    pub tls: Arc<Acceptor>,
    pub metrics: Arc<Metrics>,
    /// Upstream sync status: written by the sync task, read by the API.
    pub sync: Arc<SyncState>,
    pub machine_defaults: machines::Defaults,
    pub started: Instant,
    pub started_ms: i64,
    /// Compiled statecharts by version id (the API, the timer task and MQTT).
    pub charts: Arc<Charts>,
    /// Timers fired by the timer task, for `/metrics`.
    pub timers_fired: Arc<AtomicU64>,
    /// Agent runs: config, the credential sealing key, ticker counters.
    pub agents: Arc<Agents>,
    /// MQTT counters, and the hook through which committed steps reach the state publisher.
    pub mqtt: Arc<mqtt::Shared>,
}

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    /// The pieces every task and API area was given a part of (benchmarks and tests reach
    /// the writer through it).
    pub parts: Arc<Parts>,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<()>,
    timers: JoinHandle<()>,
    agents: JoinHandle<()>,
    mqtt: Option<mqtt::Running>,
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
        self.parts.writer.shutdown().await;
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
        let c = &self.parts.config;
        self.parts.tls.reload(&c.cert_path(), &c.key_path())
    }
}

/// Starts the gateway; initialises the data directory first if it is empty. The returned
/// `Option` carries what `init` made, so the caller can show the owner key once. `store_options`
/// replaces the configured ones (tests use it for their storage hooks); the gateway's tables
/// are set either way.
pub async fn start(
    config: Config,
    store_options: Option<StoreOptions>,
) -> Result<(Running, Option<gateway::Initialised>), StartError> {
    let started = Instant::now();
    let paths = config.paths();
    let initialised = if paths.is_initialised() {
        None
    } else {
        Some(gateway::init(&paths, config.store_options()).await?)
    };
    let mut options = store_options.unwrap_or_else(|| config.store_options());
    options.tables = gateway::TABLES;
    let store = Store::open(&paths.db(), options)?;
    let writer = GroupCommit::start(store.clone());
    let identity = Arc::new(Identity::load(&paths.identity())?);
    let tls = Arc::new(Acceptor::load(&paths.cert, &paths.key)?);
    let bind = |source| StartError::Bind {
        addr: config.http.listen,
        source,
    };
    let listener = TcpListener::bind(config.http.listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let agents = Arc::new(Agents::from_secret(
        config.agents.clone(),
        &gateway::identity_secret(&paths)?,
    ));
    let parts = Arc::new(Parts {
        machine_defaults: machines::Defaults {
            region: config.gateway.region.clone(),
            parent_origin: config.parent_origin(),
        },
        agents,
        store,
        writer,
        identity,
        tls,
        metrics: Default::default(),
        sync: Default::default(),
        started,
        started_ms: clock::now_ms(),
        charts: Default::default(),
        timers_fired: Default::default(),
        mqtt: Default::default(),
        config,
    });
    let (tx, rx) = watch::channel(false);
    // Not awaited on shutdown: an unsaved ack only means that batch is sent again.
    tokio::spawn(sync::client::run(sync_deps(&parts), rx.clone()));
    let http = tokio::spawn(http::serve(listener, http_api(&parts), rx.clone()));
    let timers = tokio::spawn(instances::timers::run(timer_deps(&parts), rx.clone()));
    let ticker = agents::ticker::Deps {
        store: parts.store.clone(),
        writer: parts.writer.clone(),
        agents: parts.agents.clone(),
    };
    let agents = tokio::spawn(agents::ticker::run(ticker, rx.clone()));
    let mqtt = mqtt::start(mqtt_deps(&parts), rx)
        .await
        .map_err(StartError::Mqtt)?;
    Ok((
        Running {
            addr,
            parts,
            shutdown: tx,
            http,
            timers,
            agents,
            mqtt,
        },
        initialised,
    ))
}

/// The timer task's pieces: its commits reach the MQTT state publisher.
fn timer_deps(p: &Parts) -> instances::timers::Deps {
    let mqtt = p.mqtt.clone();
    instances::timers::Deps {
        store: p.store.clone(),
        writer: p.writer.clone(),
        charts: p.charts.clone(),
        fired: p.timers_fired.clone(),
        on_commit: Box::new(move |sent| mqtt.committed_all(sent)),
    }
}

fn sync_deps(p: &Parts) -> sync::client::Deps {
    sync::client::Deps {
        config: p.config.upstream.clone(),
        store: p.store.clone(),
        writer: p.writer.clone(),
        identity: p.identity.clone(),
        state: p.sync.clone(),
    }
}

fn mqtt_deps(p: &Parts) -> mqtt::server::Deps {
    mqtt::server::Deps {
        cfg: p.config.mqtt.clone(),
        store: p.store.clone(),
        writer: p.writer.clone(),
        charts: p.charts.clone(),
        shared: p.mqtt.clone(),
        gateway_id: p.identity.id.clone(),
        tls: p.tls.clone(),
    }
}

/// The HTTP API's areas, each with what it uses. The per-machine limits are one pair shared
/// by every area, so a machine has one read and one write budget.
fn http_api(p: &Parts) -> http::Api {
    let limits = p.config.limits.clone();
    let common = Arc::new(http::Common {
        store: p.store.clone(),
        metrics: p.metrics.clone(),
    });
    let machine_limits = Arc::new(http::MachineLimits {
        write: RateLimiter::per_minute(limits.writes_per_minute_per_machine),
        read: RateLimiter::per_minute(limits.reads_per_minute_per_machine),
    });
    let max_json_bytes = p.config.http.max_json_bytes;
    http::Api {
        http: p.config.http.clone(),
        tls: p.tls.clone(),
        machines: Arc::new(http::MachinesDeps {
            common: common.clone(),
            writer: p.writer.clone(),
            max_json_bytes,
            spinup_limit: RateLimiter::per_minute(limits.spinup_per_minute_per_ip),
            defaults: p.machine_defaults.clone(),
            mqtt: p.mqtt.clone(),
        }),
        chain: Arc::new(http::ChainDeps {
            common: common.clone(),
            writer: p.writer.clone(),
            max_json_bytes,
            limits: machine_limits.clone(),
            identity: p.identity.clone(),
        }),
        pages: Arc::new(http::PagesDeps {
            common: common.clone(),
            writer: p.writer.clone(),
            max_json_bytes,
            limits: machine_limits.clone(),
            charts: p.charts.clone(),
        }),
        instances: Arc::new(http::InstancesDeps {
            common: common.clone(),
            writer: p.writer.clone(),
            limits: machine_limits,
            charts: p.charts.clone(),
            mqtt: p.mqtt.clone(),
        }),
        agents: Arc::new(http::AgentsDeps {
            common: common.clone(),
            writer: p.writer.clone(),
            max_json_bytes,
            defaults: p.machine_defaults.clone(),
            agents: p.agents.clone(),
        }),
        sync: Arc::new(http::SyncDeps {
            common: common.clone(),
            upstream: p.config.upstream.clone(),
            identity: p.identity.clone(),
            state: p.sync.clone(),
        }),
        ops: Arc::new(http::OpsDeps {
            common: common.clone(),
            identity: p.identity.clone(),
            region: p.config.gateway.region.clone(),
            started: p.started,
            started_ms: p.started_ms,
            writer: p.writer.clone(),
            timers_fired: p.timers_fired.clone(),
            agents: p.agents.clone(),
            mqtt: p.mqtt.clone(),
            sync: p.sync.clone(),
        }),
        console: Arc::new(http::ConsoleDeps {
            common: common.clone(),
            writer: p.writer.clone(),
        }),
        common,
    }
}
