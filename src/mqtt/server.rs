//! smgate as the devices' MQTT server (`mqtt.mode = "embedded"`, the default): the listeners,
//! the sessions, and the batcher that commits ingest publishes and releases their acks.
//!
//! - **Listeners**: plain MQTT on `mqtt.listen`, MQTT over TLS on `mqtt.tls_listen` (the
//!   gateway's certificate, swapped on SIGHUP with the HTTPS one). At most
//!   `mqtt.max_connections` connections; a CONNECT must arrive within
//!   `mqtt.connect_timeout_secs`. Each connection is one task (`conn.rs`).
//! - **Sessions** are named by the key's subject and the client id (`machine:<slug>|<id>`,
//!   `account:<zid>|<id>`, `anonymous|<id>`), so that a key of one machine cannot take over,
//!   or clear the dedup entries of, a device of another that happens to use the same client id.
//!   A second connection of the same session takes it over (the first is closed).
//! - **The batcher** takes the ingest publishes of every connection from one bounded queue
//!   (so a flood pushes back through TCP), applies up to `mqtt.batch_size` of them in one
//!   `GroupCommit::write`, and only after that commit is durable hands each connection its
//!   acks; the connection writes them in arrival order. Several batches may wait for the
//!   writer at once; it commits them in order.
//! - **States and emits** of committed steps reach subscribers through the `Shared` outbox
//!   and the router task (`router.rs`), so the HTTP API and the timers publish the same way.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use super::codec::{Message, Out, QoS, Reason};
use super::ingest::{self, Forget, Outcome, Rules};
use super::router::{Grant, Link, Router};
use super::{topic, MqttConfig, Shared};
use crate::auth::{self, Principal};
use crate::clock;
use crate::instances::Charts;
use crate::store::{GroupCommit, Store, StoreError};
use crate::tls::Acceptor;

/// What the server needs from the gateway.
pub struct Deps {
    pub cfg: MqttConfig,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub charts: Arc<Charts>,
    pub shared: Arc<Shared>,
    pub gateway_id: String,
    pub tls: Arc<Acceptor>,
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    server: Arc<Server>,
}

impl Running {
    /// Waits for the `offline` status to be queued for subscribers, the batcher to commit and
    /// ack what it has, and the connections to close.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        // Connections that are still open (a client that does not read its acks) get a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.server.connections.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What the batcher tells a connection once a commit is durable, beside the ack itself: the
/// dedup entry that the delivery wrote (to forget it later), or the QoS 2 packet id that now
/// waits for its PUBREL.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub pkid: u16,
    pub tag: u64,
    pub qos2: bool,
    /// The commit wrote a new entry (not a duplicate of an earlier delivery).
    pub new_entry: bool,
}

/// Where the ack of a piece of work goes.
pub struct Reply {
    pub link: Arc<Link>,
    pub slot: u64,
    pub pkid: u16,
    pub qos: QoS,
}

pub enum Work {
    /// An ingest publish; no reply for QoS 0 and Wills.
    Publish(ingest::Message, Option<Reply>),
    /// A PUBREL of an ingest QoS 2 publish: its entry goes, then PUBCOMP.
    Release(Forget, Reply),
    /// Entries that can no longer be redelivered.
    Forget(Forget),
}

pub struct Server {
    pub cfg: MqttConfig,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub shared: Arc<Shared>,
    pub router: Router,
    pub work: mpsc::Sender<Work>,
    /// Tells connections to finish: set after the gateway's `offline` status is queued.
    pub shutdown: watch::Receiver<bool>,
    /// Open connections (a gauge for `/metrics` and for shutdown).
    pub connections: AtomicU64,
    sessions: Mutex<Sessions>,
    gateway_id: String,
    birth: u64,
}

#[derive(Default)]
struct Sessions {
    /// Session name → its connection.
    online: HashMap<Arc<str>, Arc<Link>>,
    /// Session name → what a persistent session keeps while its client is away.
    parked: HashMap<Arc<str>, Parked>,
    /// Session name → the Will of its last connection, waiting for its delay.
    wills: HashMap<Arc<str>, PendingWill>,
}

/// A Will ready to publish, its authorization decided when its connection ended.
pub enum Will {
    /// On an ingest topic: applied as the client's publish would have been.
    Apply(ingest::Message),
    /// On any other topic: relayed.
    Relay(Message),
}

/// A delayed Will: the connection it belongs to, and how its waiting task is told that the
/// session came back (`false`: never publish it) or ended (`true`: publish it now).
struct PendingWill {
    link: Arc<Link>,
    settle: oneshot::Sender<bool>,
}

/// What a persistent session keeps between its connections (its subscriptions, and what was
/// queued for them meanwhile, stay in the router).
#[derive(Default)]
pub struct Parked {
    /// The latest committed deliveries from the client, (packet id, tag), oldest first: the
    /// ones it may still redeliver (module doc of `mqtt`).
    pub window: VecDeque<(u16, u64)>,
    /// Deliveries to the client that it has not acked, oldest first: sent again with their
    /// packet ids and DUP when it comes back (3.1.1 §4.4, 5.0 §4.4).
    pub unacked: Vec<(u16, Message)>,
    /// When the session ends if its client has not come back (None: when smgate stops).
    pub expires: Option<Instant>,
}

impl Parked {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

/// Batches handed to the writer and not yet acked: while one commits, the next is already on
/// its way, so the devices' windows keep flowing and the batch size follows the load.
const BATCHES_IN_FLIGHT: usize = 4;

/// Binds the listeners (after the retained `online` status is in place) and starts the tasks.
pub async fn start(d: Deps, shutdown: watch::Receiver<bool>) -> Result<Running, String> {
    let cfg = d.cfg.clone();
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        format!(
            "cannot listen for MQTT on {}: {e} (another MQTT broker on that port? set \
                 mqtt.listen, e.g. SMGATE_MQTT_LISTEN=127.0.0.1:1884, or mqtt.mode)",
            cfg.listen
        )
    })?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tls_listener = match cfg.tls_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("cannot listen for MQTT over TLS on {a}: {e}"))?,
        ),
        None => None,
    };
    let tls_addr = match &tls_listener {
        Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let birth = d
        .writer
        .write(ingest::next_birth)
        .await
        .map_err(|e: StoreError| e.to_string())?;
    let (work_tx, work_rx) = mpsc::channel(queue_cap(cfg.batch_size));
    // Connections stop after the `offline` status is queued for their subscribers.
    let (stop_tx, stop_rx) = watch::channel(false);
    d.shared.start_publishing();
    let server = Arc::new(Server {
        router: Router::new(d.store.clone(), d.charts.clone(), &cfg, d.shared.clone()),
        cfg: cfg.clone(),
        store: d.store.clone(),
        writer: d.writer.clone(),
        shared: d.shared.clone(),
        work: work_tx,
        shutdown: stop_rx,
        connections: AtomicU64::new(0),
        sessions: Default::default(),
        gateway_id: d.gateway_id.clone(),
        birth,
    });
    // Retained before the first device can connect.
    server.status("online");
    let rules = Arc::new(Rules {
        prefix: cfg.topic_prefix.clone(),
        client_id: String::new(),
        max_payload: cfg.max_payload_bytes,
        dead_letter_cap: cfg.dead_letter_cap,
    });
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let mut tasks = vec![
        tokio::spawn({
            let (server, mut shutdown) = (server.clone(), shutdown.clone());
            async move {
                let _ = shutdown.changed().await;
                server.status("offline");
                let _ = stop_tx.send(true);
            }
        }),
        tokio::spawn(batcher(
            server.clone(),
            d.charts.clone(),
            rules,
            work_rx,
            shutdown.clone(),
        )),
        tokio::spawn(router_task(server.clone(), shutdown.clone())),
        tokio::spawn(revocations(server.clone(), shutdown.clone())),
        tokio::spawn(expire_sessions(server.clone(), shutdown.clone())),
        tokio::spawn(accept(
            server.clone(),
            listener,
            None,
            limit.clone(),
            shutdown.clone(),
        )),
    ];
    if let Some(l) = tls_listener {
        tasks.push(tokio::spawn(accept(
            server.clone(),
            l,
            Some(d.tls.clone()),
            limit,
            shutdown.clone(),
        )));
    }
    tracing::info!(%addr, tls = ?tls_addr, bd_seq = birth, "MQTT server listening");
    Ok(Running {
        addr,
        tls_addr,
        tasks,
        server,
    })
}

/// Ingest work waiting for the batcher at which connections wait to hand more: enough for
/// every batch in flight to be full, so the queue never starves the writer (a queue of one
/// batch saved some memory but left the writer waiting for work: `docs/performance.md`).
fn queue_cap(batch_size: usize) -> usize {
    BATCHES_IN_FLIGHT * batch_size.max(1)
}

impl Server {
    /// Publishes the gateway's retained status.
    fn status(&self, status: &str) {
        let payload =
            serde_json::to_vec(&serde_json::json!({"status": status, "bdSeq": self.birth}))
                .unwrap_or_default();
        self.router.publish(Message {
            topic: topic::status(&self.cfg.topic_prefix, &self.gateway_id),
            payload: payload.into(),
            qos: QoS::AtLeastOnce,
            retain: true,
            origin: None,
        });
    }

    /// Checks a CONNECT's credentials: a `zsm_` machine key or `zeq_ak_` account key as the
    /// password, looked up by SHA-256 like a bearer token; no password only with
    /// `mqtt.allow_anonymous`. Returns the grant and the session's subject.
    pub fn authenticate(&self, password: Option<&str>) -> Result<(Grant, String), Reason> {
        let prefix = &self.cfg.topic_prefix;
        let Some(key) = password else {
            if self.cfg.allow_anonymous {
                return Ok((Grant::anonymous(prefix), "anonymous".into()));
            }
            return Err(Reason::NotAuthorized);
        };
        if !(key.starts_with(auth::ACCOUNT_KEY_PREFIX) || key.starts_with(auth::MACHINE_KEY_PREFIX))
        {
            return Err(Reason::NotAuthorized);
        }
        let now = clock::now_ms();
        let principal = self
            .store
            .view(|txn| match auth::resolve(txn, Some(key), now) {
                Err(auth::AuthError::Store(e)) => Err(e),
                other => Ok(other),
            })
            .map_err(|_| Reason::ServerUnavailable)?
            .map_err(|_| Reason::NotAuthorized)?;
        let subject = match &principal {
            Principal::Account { zid, .. } => format!("account:{zid}"),
            Principal::MachineKey { slug, .. } => format!("machine:{slug}"),
            Principal::Anonymous => return Err(Reason::NotAuthorized),
        };
        Ok((Grant::key(prefix, principal), subject))
    }

    /// Makes `link` the connection of `session`; closes the one it replaces. A link with a
    /// clean start starts the session empty (its subscriptions, its dedup window and its
    /// entries in the store go, before the CONNACK, so no entry of the old session can be
    /// taken for a message of the new). Returns whether a session was present, and its dedup
    /// window.
    pub async fn open_session(
        &self,
        session: &Arc<str>,
        link: &Arc<Link>,
    ) -> Result<(bool, Parked), StoreError> {
        let clean = link.clean_start;
        let parked = {
            let mut s = self
                .sessions
                .lock()
                .map_err(|_| StoreError::Unavailable("sessions lock poisoned".into()))?;
            if let Some(old) = s.online.insert(session.clone(), link.clone()) {
                old.kick(Reason::SessionTakenOver);
            }
            // A new connection to the session: a delayed Will is never published if it
            // resumes the session, and at once if it starts a new one (5.0 §3.1.2.5).
            if let Some(w) = s.wills.remove(session) {
                let _ = w.settle.send(clean);
            }
            s.parked.remove(session)
        };
        // A session that expired while its client was away is gone, as if never made.
        let parked = match parked {
            Some(p) if p.expired(Instant::now()) => {
                self.router.drop_session(session);
                None
            }
            p => p,
        };
        if clean {
            self.router.drop_session(session);
            let has_entries = self.store.view(|txn| ingest::has_entries(txn, session))?;
            if has_entries {
                let forget = [Forget::Client(session.clone())];
                self.writer
                    .write(move |txn| ingest::forget(txn, &forget))
                    .await?;
            }
            return Ok((false, Parked::default()));
        }
        let subscribed = self.router.resume(session, link);
        Ok((subscribed || parked.is_some(), parked.unwrap_or_default()))
    }

    /// The connection of `session` ended; a persistent session keeps its subscriptions, its
    /// dedup window and its unacked deliveries for the next connection. When that connection
    /// has already taken over, the unacked deliveries are queued for it again.
    pub fn close_session(
        &self,
        session: &Arc<str>,
        link: &Arc<Link>,
        persistent: bool,
        mut parked: Parked,
    ) {
        let Ok(mut s) = self.sessions.lock() else {
            return;
        };
        let current = s.online.get(session).is_some_and(|l| Arc::ptr_eq(l, link));
        if current {
            s.online.remove(session);
        }
        if !persistent {
            if current {
                self.router.drop_session(session);
            }
            return;
        }
        if !current {
            if let Some(online) = s.online.get(session) {
                let unacked = std::mem::take(&mut parked.unacked);
                self.router
                    .requeue(online, unacked.into_iter().map(|(_, m)| m).collect());
            }
        }
        if current || !s.parked.contains_key(session) {
            s.parked.insert(session.clone(), parked);
        }
    }

    /// Publishes a client's Will, without an ack.
    pub async fn publish_will(&self, will: Will) {
        self.shared.wills.fetch_add(1, Ordering::Relaxed);
        match will {
            Will::Apply(m) => {
                let _ = self.work.send(Work::Publish(m, None)).await;
            }
            Will::Relay(m) => self.relay(m),
        }
    }

    /// Passes a publish on a topic outside the gateway's prefix to its subscribers (acked on
    /// receipt, not persisted).
    pub fn relay(&self, m: Message) {
        self.shared.relayed.fetch_add(1, Ordering::Relaxed);
        self.router.publish(m);
    }

    /// Publishes the Will of `link`'s connection to `session` after `delay` (MQTT 5 Will
    /// Delay Interval), unless a new connection resumes the session first; a new connection
    /// that starts a clean session publishes it at once. When smgate stops first it is not
    /// published, like the Wills of the clients still connected then: the gateway's own
    /// `offline` status says that none of its clients is reachable.
    pub fn delay_will(
        self: &Arc<Self>,
        session: &Arc<str>,
        link: &Arc<Link>,
        delay: Duration,
        will: Will,
    ) {
        let (settle, settled) = oneshot::channel();
        let pending = PendingWill {
            link: link.clone(),
            settle,
        };
        let taken = {
            let Ok(mut s) = self.sessions.lock() else {
                return;
            };
            match s.online.get(session) {
                // A new connection took the session over before this one ended: it resumed
                // the session (never published) or started a new one (published now).
                Some(other) if !Arc::ptr_eq(other, link) => Some(other.clean_start),
                _ => {
                    s.wills.insert(session.clone(), pending);
                    None
                }
            }
        };
        let (server, session, link) = (self.clone(), session.clone(), link.clone());
        tokio::spawn(async move {
            let publish = match taken {
                Some(now) => now,
                None => server.settle_will(&session, &link, delay, settled).await,
            };
            if publish {
                server.publish_will(will).await;
            }
        });
    }

    /// Waits for a delayed Will to settle: whether to publish it.
    async fn settle_will(
        &self,
        session: &Arc<str>,
        link: &Arc<Link>,
        delay: Duration,
        mut settled: oneshot::Receiver<bool>,
    ) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            r = &mut settled => r.unwrap_or(false),
            _ = tokio::time::sleep(delay) => {
                // The delay passed, unless a new connection settled the Will meanwhile.
                self.take_will(session, link) || settled.try_recv().unwrap_or(false)
            }
            _ = shutdown.wait_for(|stop| *stop) => false,
        }
    }

    /// Removes `link`'s delayed Will from `session`: true if it was still waiting.
    fn take_will(&self, session: &Arc<str>, link: &Arc<Link>) -> bool {
        let Ok(mut s) = self.sessions.lock() else {
            return false;
        };
        match s.wills.get(session) {
            Some(w) if Arc::ptr_eq(&w.link, link) => s.wills.remove(session).is_some(),
            _ => false,
        }
    }

    /// Reason code of an ingest outcome in a v5 PUBACK / PUBREC.
    fn reason(outcome: &Outcome) -> Reason {
        match outcome {
            Outcome::Dead("not_authorized") => Reason::NotAuthorized,
            Outcome::Dead("invalid_json") => Reason::PayloadFormatInvalid,
            _ => Reason::Success,
        }
    }
}

async fn accept(
    server: Arc<Server>,
    listener: TcpListener,
    tls: Option<Arc<Acceptor>>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            server.shared.connect_refused("max_connections");
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => super::conn::serve(server, sock, peer).await,
                Some(tls) => {
                    let timeout = Duration::from_secs(server.cfg.connect_timeout_secs.max(1));
                    match tokio::time::timeout(timeout, tls.get_mqtt().accept(sock)).await {
                        Ok(Ok(stream)) => super::conn::serve(server, stream, peer).await,
                        _ => server.shared.connect_refused("tls_handshake"),
                    }
                }
            }
        });
    }
}

/// Fans committed states and emits out to subscribers.
async fn router_task(server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    let qos = match server.cfg.state_qos {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = server.shared.wake.notified() => {}
        }
        server
            .router
            .publish_outbox(server.shared.take_outbox(), qos);
    }
    server
        .router
        .publish_outbox(server.shared.take_outbox(), qos);
}

/// Closes the connections of revoked keys.
async fn revocations(server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = server.shared.revoke_wake.notified() => {}
        }
        let revoked = server.shared.take_revoked();
        if let Ok(s) = server.sessions.lock() {
            for link in s.online.values() {
                if link
                    .grant
                    .key_id()
                    .is_some_and(|id| revoked.iter().any(|r| r == id))
                {
                    link.kick(Reason::NotAuthorized);
                }
            }
        }
    }
}

/// Ends the persistent sessions whose clients stayed away past their expiry, so that
/// abandoned sessions do not keep subscriptions and queues (a returning client finds out at
/// once: `open_session` checks too).
async fn expire_sessions(server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let Ok(mut s) = server.sessions.lock() else {
            continue;
        };
        let expired: Vec<Arc<str>> = s
            .parked
            .iter()
            .filter(|(name, p)| p.expired(now) && !s.online.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            s.parked.remove(&name);
            server.router.drop_session(&name);
        }
    }
}

#[derive(Default)]
struct Batch {
    messages: Vec<ingest::Message>,
    replies: Vec<Option<Reply>>,
    releases: Vec<(Forget, Reply)>,
    forget: Vec<Forget>,
}

impl Batch {
    fn add(&mut self, w: Work) {
        match w {
            Work::Publish(m, r) => {
                self.messages.push(m);
                self.replies.push(r);
            }
            Work::Release(f, r) => self.releases.push((f, r)),
            Work::Forget(f) => self.forget.push(f),
        }
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.releases.is_empty() && self.forget.is_empty()
    }
}

async fn batcher(
    server: Arc<Server>,
    charts: Arc<Charts>,
    rules: Arc<Rules>,
    mut rx: mpsc::Receiver<Work>,
    mut shutdown: watch::Receiver<bool>,
) {
    let size = server.cfg.batch_size.max(1);
    let wait = Duration::from_millis(server.cfg.batch_wait_ms);
    let mut in_flight: VecDeque<JoinHandle<bool>> = VecDeque::new();
    let stopping = shutdown.clone();
    let commit = |batch: Batch| {
        let (server, charts, rules, shutdown) = (
            server.clone(),
            charts.clone(),
            rules.clone(),
            stopping.clone(),
        );
        tokio::spawn(
            async move { commit_and_ack(&server, &charts, &rules, batch, &shutdown).await },
        )
    };
    loop {
        while in_flight.front().is_some_and(|t| t.is_finished()) {
            if let Some(t) = in_flight.pop_front() {
                let _ = t.await;
            }
        }
        if in_flight.len() >= BATCHES_IN_FLIGHT {
            if let Some(t) = in_flight.pop_front() {
                let _ = t.await;
            }
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            w = rx.recv() => match w { Some(w) => w, None => break },
        };
        let mut batch = Batch::default();
        batch.add(first);
        while batch.messages.len() < size {
            match rx.try_recv() {
                Ok(w) => batch.add(w),
                Err(_) => break,
            }
        }
        if !batch.messages.is_empty() && batch.messages.len() < size && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            while batch.messages.len() < size {
                tokio::select! {
                    w = rx.recv() => match w {
                        Some(w) => batch.add(w),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        gauge_queue(&server.shared, rx.len());
        in_flight.push_back(commit(batch));
    }
    // Stopping: the connections read no more; what they queued is committed and acked.
    let mut last = Batch::default();
    while let Ok(w) = rx.try_recv() {
        last.add(w);
    }
    if !last.is_empty() {
        in_flight.push_back(commit(last));
    }
    for t in in_flight {
        let _ = t.await;
    }
}

/// Sets the `/metrics` gauges of the publishes waiting for a batch.
fn gauge_queue(shared: &Shared, queued: usize) {
    let queued = queued as u64;
    shared.ingest_queued.store(queued, Ordering::Relaxed);
    shared
        .ingest_queued_peak
        .fetch_max(queued, Ordering::Relaxed);
}

/// Applies one batch and, after the commit is durable, releases its acks; false when the
/// gateway is stopping and the batch could not be committed (it stays unacked).
async fn commit_and_ack(
    server: &Server,
    charts: &Arc<Charts>,
    rules: &Arc<Rules>,
    batch: Batch,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let Batch {
        messages,
        replies,
        releases,
        mut forget,
    } = batch;
    forget.extend(releases.iter().map(|(f, _)| f.clone()));
    let Some((messages, outcomes, tag)) =
        super::commit_batch(&server.writer, charts, rules, messages, forget, shutdown).await
    else {
        return false;
    };
    let shared = &server.shared;
    let mut steps = Vec::with_capacity(outcomes.len());
    // Each connection with acks in this batch is woken once, after all of them are in place,
    // so that it writes them in one go.
    let mut woken: HashMap<*const Link, Arc<Link>> = HashMap::new();
    let mut release = |r: Reply, out: Out, settled: Option<Settled>| {
        if let Ok(mut d) = r.link.done.lock() {
            d.push((r.slot, out, settled));
        }
        woken.entry(Arc::as_ptr(&r.link)).or_insert(r.link);
    };
    for ((m, outcome), reply) in messages.iter().zip(outcomes).zip(replies) {
        if let Some(r) = reply {
            let reason = Server::reason(&outcome);
            let settled = outcome.entry_tag(m.pkid, tag).map(|t| Settled {
                pkid: r.pkid,
                tag: t,
                qos2: r.qos == QoS::ExactlyOnce,
                new_entry: !matches!(outcome, Outcome::Duplicate(_)),
            });
            let out = match r.qos {
                QoS::ExactlyOnce => Out::PubRec(r.pkid, reason),
                _ => Out::PubAck(r.pkid, reason),
            };
            release(r, out, settled);
        }
        steps.extend(shared.tally(outcome));
    }
    for (_, r) in releases {
        let out = Out::PubComp(r.pkid);
        release(r, out, None);
    }
    for l in woken.into_values() {
        l.wake.notify_one();
    }
    shared
        .applied
        .fetch_add(steps.len() as u64, Ordering::Relaxed);
    shared.committed_steps(
        steps
            .iter()
            .map(|(m, i, v, e)| (m.as_str(), i.as_str(), v, e.as_slice())),
    );
    true
}
