//! The wiring of a running gateway: start-up and orderly shutdown. The one module that knows
//! every part; only `main.rs` imports it.
//!
//! `start` opens the store, starts the writer, binds the listener, hands each background task
//! the pieces it uses (the timer task, the agents' ticker, the upstream sync, MQTT) and the
//! HTTP API its [`http::Deps`], and returns at once with a [`Running`] handle. `Running::shutdown`
//! stops accepting, lets requests finish, commits the last batch, and only then returns.

use std::net::SocketAddr;
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
use crate::sync;
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

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    /// What the HTTP handlers share (benchmarks and tests reach the writer through it).
    pub api: Arc<http::Deps>,
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
        self.api.writer.shutdown().await;
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
        let c = &self.api.config;
        self.api.tls.reload(&c.cert_path(), &c.key_path())
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
    let api = Arc::new(http::Deps {
        spinup_limit: RateLimiter::per_minute(config.limits.spinup_per_minute_per_ip),
        write_limit: RateLimiter::per_minute(config.limits.writes_per_minute_per_machine),
        read_limit: RateLimiter::per_minute(config.limits.reads_per_minute_per_machine),
        machine_defaults: machines::Defaults {
            region: config.gateway.region.clone(),
            parent_origin: config.parent_origin(),
        },
        agents,
        store,
        writer,
        identity,
        tls,
        metrics: Metrics::default(),
        sync: Default::default(),
        started,
        started_ms: clock::now_ms(),
        charts: Arc::<Charts>::default(),
        timers_fired: Default::default(),
        mqtt: Default::default(),
        config,
    });
    let (tx, rx) = watch::channel(false);
    // Not awaited on shutdown: an unsaved ack only means that batch is sent again.
    tokio::spawn(sync::client::run(sync_deps(&api), rx.clone()));
    let http = tokio::spawn(http::serve(listener, api.clone(), rx.clone()));
    let timers = tokio::spawn(instances::timers::run(timer_deps(&api), rx.clone()));
    let ticker = agents::ticker::Deps {
        store: api.store.clone(),
        writer: api.writer.clone(),
        agents: api.agents.clone(),
    };
    let agents = tokio::spawn(agents::ticker::run(ticker, rx.clone()));
    let mqtt = mqtt::start(mqtt_deps(&api), rx)
        .await
        .map_err(StartError::Mqtt)?;
    Ok((
        Running {
            addr,
            api,
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
fn timer_deps(api: &http::Deps) -> instances::timers::Deps {
    let mqtt = api.mqtt.clone();
    instances::timers::Deps {
        store: api.store.clone(),
        writer: api.writer.clone(),
        charts: api.charts.clone(),
        fired: api.timers_fired.clone(),
        on_commit: Box::new(move |sent| mqtt.committed_all(sent)),
    }
}

fn sync_deps(api: &http::Deps) -> sync::client::Deps {
    sync::client::Deps {
        config: api.config.upstream.clone(),
        store: api.store.clone(),
        writer: api.writer.clone(),
        identity: api.identity.clone(),
        state: api.sync.clone(),
    }
}

fn mqtt_deps(api: &http::Deps) -> mqtt::server::Deps {
    mqtt::server::Deps {
        cfg: api.config.mqtt.clone(),
        store: api.store.clone(),
        writer: api.writer.clone(),
        charts: api.charts.clone(),
        shared: api.mqtt.clone(),
        gateway_id: api.identity.id.clone(),
        tls: api.tls.clone(),
    }
}
