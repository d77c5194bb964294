//! The MQTT tasks of a running gateway.
//!
//! - The **ingest connection** (`clean_session = false`, stable client id, manual acks, Last
//!   Will `offline`) polls its event loop, hands each incoming publish to the batcher, and
//!   writes the acks the batcher releases. Both are bounded here, not by the broker:
//!   - **Reading stops** while [`queue_cap`] publishes wait for the batcher, so the TCP window
//!     closes and the broker keeps the backlog (its job: `max_queued_messages`). The broker's
//!     inflight window does not do this: mosquitto 2.0.11 at `max_inflight_messages 1000`
//!     stops a client that never acks at 1,000, but keeps sending to one that acks, so
//!     devices outrunning the writer once left 270,000 publishes (100+ MiB) queued in the
//!     gateway (`cargo bench --bench mqtt`), and a probe client acking 5,000/s held 54,805
//!     unacked publishes within a second.
//!   - **Acks are written by this task straight to the connection**, all that are ready in one
//!     write and one flush, not through rumqttc's request channel: its event loop takes one
//!     request per poll against a read of up to ten packets, so acks fell behind the reads
//!     and a paused reader could not have written them at all. An ack belongs to the
//!     connection its publish came in on; one for a lost connection is dropped (the broker
//!     redelivers the message to the next one, and the dedup entry acks it there).
//! - The **batcher** takes what has arrived (up to `batch_size`, waiting at most
//!   `batch_wait_ms` for company), applies it in one `GroupCommit::write`, and only after that
//!   commit acks each message and hands the committed steps to the publisher. Up to
//!   `BATCHES_IN_FLIGHT` batches wait for the writer at once (it commits them in order, and
//!   folds those queued together into one transaction), so the broker's inflight window keeps
//!   flowing while one commits and the batch size still follows the load.
//! - **Settling acks**: the ingest task writes its connection's packets in order. Once a
//!   PINGRESP arrives for a PINGREQ written after a PUBACK, the broker has processed that PUBACK
//!   (mosquitto and rumqttd handle one connection's packets in order), will not redeliver the
//!   message and may reuse its packet id. The settled acks travel to the batcher through the
//!   same channel as the publishes, after every publish the connection delivered before the
//!   PINGRESP, and the batcher removes their dedup entries (`ingest::forget`) after applying
//!   the publishes of its batch, in the same transaction. That order matters: after a
//!   reconnect the broker resends an unacked message, and our ack of the first copy may
//!   settle while the resent copy is still on its way to the batcher; the copy must still
//!   find its entry. The ingest task writes a PINGREQ whenever written acks wait for settling
//!   and no ping is outstanding.
//! - The **publisher** has its own connection (so state traffic never delays acks). It drains
//!   the outbox of `Shared` (the latest state per instance, plus emits), publishes states
//!   retained (at `mqtt.state_qos`, 1 by default) and emits at QoS 1, and republishes every
//!   state after each (re)connect. The outbox is a
//!   map keyed by instance, so its memory is bounded by the instance count whatever the load.
//!
//! Shutdown: the batcher finishes and acks its batch, then the ingest connection publishes
//! `offline` and disconnects, and the publisher flushes what is queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    PubAck, Publish, QoS, StateError, SubscribeFilter, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::ingest::{self, Message, Rules};
use super::server::Deps;
use super::{topic, MqttConfig};
use crate::store::StoreError;

/// The external-broker side of a running gateway.
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits for the tasks to finish after the shutdown signal.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the client tasks against the broker at `mqtt.url` (`mode = "external"`).
pub async fn start(deps: Deps, shutdown: watch::Receiver<bool>) -> Result<Running, String> {
    let deps = Arc::new(deps);
    let cfg = deps.cfg.clone();
    let (host, port, secure) = parse_url(cfg.url.as_deref().unwrap_or_default())?;
    let tls = if secure {
        Some(tls_config(&cfg)?)
    } else {
        None
    };
    let client_id = cfg
        .client_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("smgate-{}", deps.gateway_id));
    let birth = deps
        .writer
        .write(ingest::next_birth)
        .await
        .map_err(|e: StoreError| e.to_string())?;
    let status = topic::status(&cfg.topic_prefix, &deps.gateway_id);

    let mut opts = options(&cfg, &client_id, &host, port, tls.clone());
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_last_will(will(&status, "offline", birth));
    // The request channel carries the subscriptions, the status messages and the DISCONNECT;
    // acks bypass it (module doc).
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let mut pub_opts = options(&cfg, &format!("{client_id}-pub"), &host, port, tls);
    pub_opts.set_clean_session(true);
    let (pub_client, pub_eventloop) = AsyncClient::new(pub_opts, 1024);

    let (in_tx, in_rx) = mpsc::unbounded_channel();
    deps.shared.start_publishing();
    let (republish_tx, republish_rx) = mpsc::unbounded_channel();
    let (batcher_done_tx, batcher_done_rx) = oneshot::channel();
    let (publisher_stop_tx, publisher_stop_rx) = oneshot::channel();
    let (pub_conn_stop_tx, pub_conn_stop_rx) = oneshot::channel();
    let rules = Arc::new(Rules {
        prefix: cfg.topic_prefix.clone(),
        client_id: client_id.clone(),
        max_payload: cfg.max_payload_bytes,
        dead_letter_cap: cfg.dead_letter_cap,
    });
    let (subscribed_tx, _subscribed) = watch::channel(false);
    let acks = Arc::new(Acks::default());
    let ingest = Ingest {
        deps: deps.clone(),
        client: client.clone(),
        acks: acks.clone(),
        status,
        birth,
        subscriptions: topic::subscriptions(&cfg.topic_prefix),
        subscribed: subscribed_tx,
    };
    let tasks = vec![
        tokio::spawn(ingest.run(eventloop, in_tx, batcher_done_rx)),
        tokio::spawn(batcher(
            Batcher {
                deps: deps.clone(),
                rules,
                acks,
            },
            in_rx,
            shutdown,
            (batcher_done_tx, publisher_stop_tx),
        )),
        tokio::spawn(publisher_connection(
            deps.clone(),
            pub_eventloop,
            republish_tx,
            pub_conn_stop_rx,
        )),
        tokio::spawn(publisher(
            deps.clone(),
            pub_client,
            republish_rx,
            publisher_stop_rx,
            pub_conn_stop_tx,
        )),
    ];
    tracing::info!(mode = ?cfg.mode, broker = %format!("{host}:{port}"), client_id = %client_id, bd_seq = birth, "MQTT started");
    Ok(Running { tasks })
}

fn options(
    cfg: &MqttConfig,
    id: &str,
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(cfg.keepalive_secs.max(1)))
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
        .set_inflight(cfg.inflight);
    if let Some(u) = &cfg.username {
        o.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    o
}

fn will(status_topic: &str, status: &str, birth: u64) -> LastWill {
    LastWill::new(
        status_topic,
        status_payload(status, birth),
        QoS::AtLeastOnce,
        true,
    )
}

fn status_payload(status: &str, birth: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"status": status, "bdSeq": birth})).unwrap_or_default()
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` → (host, port, tls).
fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, secure, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else {
        return Err(format!(
            "mqtt.url `{url}` must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse()
                .map_err(|_| format!("mqtt.url `{url}`: bad port `{p}`"))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("mqtt.url `{url}` has no host"));
    }
    Ok((host.to_string(), port, secure))
}

/// rustls with the ring provider, trusting only `ca_file`, with an optional client certificate.
fn tls_config(cfg: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = cfg
        .ca_file
        .as_ref()
        .ok_or("mqtts:// needs mqtt.ca_file (PEM CA certificates of the broker)")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Exponential backoff with full jitter in its upper half.
struct Backoff {
    min: u64,
    max: u64,
    next: u64,
}

impl Backoff {
    fn new(cfg: &MqttConfig) -> Backoff {
        let min = cfg.reconnect_min_ms.max(1);
        Backoff {
            min,
            max: cfg.reconnect_max_ms.max(min),
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = (uuid::Uuid::new_v4().as_u128() % (base as u128 / 2 + 1)) as u64;
        Duration::from_millis(base / 2 + jitter)
    }
}

/// Acks the batcher has released (after the commit), in batch order, for the ingest task to
/// write; and the wake-up it sends when there is something to write or room in the queue.
#[derive(Default)]
struct Acks {
    ready: Mutex<Vec<Ack>>,
    wake: Notify,
}

struct Ack {
    pkid: u16,
    /// The dedup entry this ack settles, if any.
    tag: Option<u64>,
    /// The connection the publish came in on (see [`Ingest::run`]).
    connection: u64,
}

/// Publishes waiting for the batcher at which the ingest task stops reading: enough for every
/// batch in flight to be full, so pausing never starves the writer.
fn queue_cap(batch_size: usize) -> u64 {
    (BATCHES_IN_FLIGHT * batch_size.max(1)) as u64
}

/// What the ingest task hands the batcher, in connection order.
enum Delivery {
    /// A publish and the number of the connection it came in on.
    Publish(Publish, u64),
    /// Acks the broker has processed: `(packet id, batch tag)` entries to forget.
    Settled(Vec<(u16, u64)>),
}

struct Ingest {
    deps: Arc<Deps>,
    client: AsyncClient,
    acks: Arc<Acks>,
    status: String,
    birth: u64,
    subscriptions: [String; 2],
    subscribed: watch::Sender<bool>,
}

/// The ingest connection's state across reconnects.
struct Session {
    connected: bool,
    /// Numbers the connections (one per CONNACK): an ack is written only on the connection
    /// its publish came in on.
    connection: u64,
    settle: Settle,
    /// When the broker last sent anything.
    heard: tokio::time::Instant,
    backoff: Backoff,
    keep_alive: Duration,
}

/// What the ingest loop does next.
enum Next {
    Event(Result<Event, ConnectionError>),
    /// Acks to write, or room in the queue: go round again.
    Again,
    /// The batcher is done: say goodbye.
    Stop,
}

impl Ingest {
    async fn run(
        mut self,
        mut eventloop: EventLoop,
        to_batcher: mpsc::UnboundedSender<Delivery>,
        mut batcher_done: oneshot::Receiver<()>,
    ) {
        let deps = self.deps.clone();
        let queued = &deps.shared.ingest_queued;
        let mut s = Session {
            connected: false,
            connection: 0,
            settle: Settle::default(),
            heard: tokio::time::Instant::now(),
            backoff: Backoff::new(&deps.cfg),
            keep_alive: Duration::from_secs(deps.cfg.keepalive_secs.max(1)),
        };
        loop {
            let event = match self.next(&mut eventloop, &mut s, &mut batcher_done).await {
                Next::Event(e) => e,
                Next::Again => continue,
                Next::Stop => break,
            };
            if let Ok(Event::Incoming(_)) = &event {
                s.heard = tokio::time::Instant::now();
            }
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let n = queued.fetch_add(1, Ordering::Relaxed) + 1;
                    deps.shared
                        .ingest_queued_peak
                        .fetch_max(n, Ordering::Relaxed);
                    let _ = to_batcher.send(Delivery::Publish(p, s.connection));
                }
                Ok(Event::Outgoing(Outgoing::PingReq)) => {
                    // rumqttc's keepalive: it proves what was written before it, like ours.
                    // MQTT lets a client send PINGREQ at any time; each gets its PINGRESP.
                    eventloop.state.await_pingresp = false;
                    s.settle.probe();
                }
                Ok(Event::Incoming(Packet::PingResp)) => {
                    if let Some((_, settled)) = s.settle.probes.pop_front() {
                        if !settled.is_empty() {
                            let _ = to_batcher.send(Delivery::Settled(settled));
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    self.subscribed.send_replace(true);
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => self.connected(&mut s, ack),
                Ok(_) => {}
                Err(e) => {
                    self.lost(&mut eventloop, &mut s, e).await;
                    tokio::select! {
                        _ = tokio::time::sleep(s.backoff.delay()) => {}
                        _ = &mut batcher_done => break,
                    }
                }
            }
        }
        self.goodbye(&mut eventloop, &mut s).await;
    }

    /// Writes the acks that are ready, then waits for the next event: a packet read or
    /// written, a wake-up, the batcher's end, or the deadline of a silent connection.
    async fn next(
        &self,
        eventloop: &mut EventLoop,
        s: &mut Session,
        batcher_done: &mut oneshot::Receiver<()>,
    ) -> Next {
        // Events still buffered in the event loop describe packets already read or
        // written; they go first, so that our own writes keep the wire order of `settle`.
        let idle = eventloop.state.events.is_empty();
        let written = match s.connected && idle {
            true => {
                self.write_acks(eventloop, s.connection, &mut s.settle, s.keep_alive)
                    .await
            }
            false => Ok(()),
        };
        // Stop reading while the batcher is a queue behind: the broker keeps the rest.
        let cap = queue_cap(self.deps.cfg.batch_size);
        let paused = idle && self.deps.shared.ingest_queued.load(Ordering::Relaxed) >= cap;
        // rumqttc pings every keepalive period whatever the traffic, and drops the
        // connection if its previous PINGREQ is unanswered at that moment; under load ours
        // nearly always is, so that check would cut a healthy connection every period. It
        // is cleared as each PINGREQ leaves (`run`), and this deadline stands in for it: a
        // connection that has neither answered a PINGREQ nor sent anything else for a
        // whole keepalive period is dead. A broker with a backlog queues its PINGRESP
        // behind the publishes (docs/performance.md, MQTT), and each of those shows it
        // alive. Not while paused: the answer may be waiting, unread.
        let dead_at = match paused {
            true => None,
            false => s
                .settle
                .probes
                .front()
                .map(|(at, _)| (*at).max(s.heard) + s.keep_alive),
        };
        match written {
            Err(e) => {
                eventloop.clean();
                Next::Event(Err(e))
            }
            Ok(()) => tokio::select! {
                biased;
                _ = batcher_done => Next::Stop,
                ev = eventloop.poll(), if !paused => Next::Event(ev),
                _ = self.acks.wake.notified() => Next::Again,
                _ = async { tokio::time::sleep_until(dead_at.unwrap_or_else(tokio::time::Instant::now)).await }, if dead_at.is_some() => {
                    // What rumqttc does on an error: drop the network, keep the session state.
                    eventloop.clean();
                    Next::Event(Err(ConnectionError::MqttState(StateError::AwaitPingResp)))
                }
            },
        }
    }

    /// A CONNACK: subscribe and say `online`.
    fn connected(&self, s: &mut Session, ack: rumqttc::ConnAck) {
        s.connected = true;
        s.connection += 1;
        s.backoff.reset();
        self.deps.shared.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            session_present = ack.session_present,
            bd_seq = self.birth,
            "MQTT ingest connected"
        );
        let filters = self
            .subscriptions
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        // Never block the event loop: the request channel has room for these.
        if let Err(e) = self.client.try_subscribe_many(filters) {
            tracing::warn!(error = %e, "cannot queue the MQTT subscriptions");
        }
        if let Err(e) = self.client.try_publish(
            &self.status,
            QoS::AtLeastOnce,
            true,
            status_payload("online", self.birth),
        ) {
            tracing::warn!(error = %e, "cannot queue the MQTT birth message");
        }
    }

    /// The connection is gone: forget what it had not settled, and take a new birth number
    /// for the next one's Last Will.
    async fn lost(&mut self, eventloop: &mut EventLoop, s: &mut Session, e: ConnectionError) {
        tracing::warn!(error = %e, "MQTT ingest connection lost; reconnecting");
        // Acks not yet answered by a PINGRESP may never have reached the broker: their
        // entries stay. Outgoing events still buffered describe writes on the dead connection.
        s.settle = Settle::default();
        eventloop
            .state
            .events
            .retain(|e| !matches!(e, Event::Outgoing(_)));
        if !s.connected {
            return;
        }
        s.connected = false;
        self.deps
            .shared
            .connection_losses
            .fetch_add(1, Ordering::Relaxed);
        // A new connection is a new birth; its Last Will carries the new number.
        match self.deps.writer.write(ingest::next_birth).await {
            Ok(n) => self.birth = n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the MQTT birth sequence");
                self.birth += 1;
            }
        }
        eventloop
            .mqtt_options
            .set_last_will(will(&self.status, "offline", self.birth));
    }

    /// Orderly stop: the batcher has released its last acks. A clean DISCONNECT suppresses
    /// the Last Will, so say `offline` ourselves first.
    async fn goodbye(&self, eventloop: &mut EventLoop, s: &mut Session) {
        if !s.connected {
            return;
        }
        let _ = self
            .write_acks(eventloop, s.connection, &mut s.settle, s.keep_alive)
            .await;
        let _ = self.client.try_publish(
            &self.status,
            QoS::AtLeastOnce,
            true,
            status_payload("offline", self.birth),
        );
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

impl Ingest {
    /// Writes the acks the batcher has released for this connection, and a PINGREQ to settle
    /// them when none is outstanding, with one flush. A connection that takes none of it for a
    /// keepalive period is dead.
    async fn write_acks(
        &self,
        eventloop: &mut EventLoop,
        connection: u64,
        settle: &mut Settle,
        keep_alive: Duration,
    ) -> Result<(), ConnectionError> {
        let ready = self
            .acks
            .ready
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        let Some(net) = eventloop.network.as_mut() else {
            return Ok(());
        };
        let write = async {
            let mut wrote = false;
            for a in ready.into_iter().filter(|a| a.connection == connection) {
                net.write(Packet::PubAck(PubAck::new(a.pkid))).await?;
                wrote = true;
                if let Some(tag) = a.tag {
                    settle.written.insert(a.pkid, tag);
                }
            }
            if !settle.written.is_empty() && settle.probes.is_empty() {
                net.write(Packet::PingReq).await?;
                settle.probe();
                wrote = true;
            }
            if wrote {
                net.flush().await?;
            }
            Ok(())
        };
        match tokio::time::timeout(keep_alive, write).await {
            Ok(r) => r.map_err(ConnectionError::MqttState),
            Err(_) => Err(ConnectionError::FlushTimeout),
        }
    }
}

/// The ingest connection's acks on their way to being settled (module doc).
#[derive(Default)]
struct Settle {
    /// Acks written since the last PINGREQ left: packet id → entry tag. Only the latest
    /// delivery of a packet id can still have its entry (each commit of a later one rewrote
    /// it), so an earlier ack of the same id is dropped here: while a PINGRESP waits behind a
    /// broker's backlog (half a minute has been seen) this holds at most 65,535 acks, where a
    /// list held every ack written meanwhile (700,000 in `cargo bench --bench mqtt`).
    written: HashMap<u16, u64>,
    /// One entry per PINGREQ on the wire, oldest first: when it left, and the acks written
    /// before it, which its PINGRESP (answers come in order) proves the broker processed.
    probes: VecDeque<(tokio::time::Instant, Vec<(u16, u64)>)>,
}

impl Settle {
    /// A PINGREQ has just been written.
    fn probe(&mut self) {
        let written = std::mem::take(&mut self.written).into_iter().collect();
        self.probes
            .push_back((tokio::time::Instant::now(), written));
    }
}

struct Batcher {
    deps: Arc<Deps>,
    rules: Arc<Rules>,
    acks: Arc<Acks>,
}

/// Batches handed to the writer and not yet acked. The broker's inflight window holds every
/// unacked message, so while one batch commits the next must already be on its way to the
/// writer: with one batch at a time the window drains to nothing during each commit and the
/// writer waits for the broker after it. The writer runs requests in the order they arrive
/// (FIFO), so batches commit in order; a failed batch is retried with every message marked as
/// redelivered, which the dedup table decides whatever later batches committed meanwhile.
const BATCHES_IN_FLIGHT: usize = 4;

async fn batcher(
    b: Batcher,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    mut shutdown: watch::Receiver<bool>,
    done: (oneshot::Sender<()>, oneshot::Sender<()>),
) {
    let size = b.deps.cfg.batch_size;
    let wait = Duration::from_millis(b.deps.cfg.batch_wait_ms);
    let b = Arc::new(b);
    let mut in_flight: std::collections::VecDeque<JoinHandle<bool>> = Default::default();
    let mut stopping = false;
    let (first_turn, mut previous_turn) = oneshot::channel::<()>();
    let _ = first_turn.send(());
    loop {
        // Reap finished batches in order; a batch that could not commit while stopping ends
        // the loop (it stays unacked, so the broker redelivers it).
        while in_flight.front().is_some_and(|t| t.is_finished()) {
            if let Some(t) = in_flight.pop_front() {
                if !t.await.unwrap_or(false) {
                    stopping = true;
                }
            }
        }
        if stopping {
            break;
        }
        if in_flight.len() >= BATCHES_IN_FLIGHT {
            if let Some(t) = in_flight.pop_front() {
                if !t.await.unwrap_or(false) {
                    break;
                }
            }
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            p = rx.recv() => match p { Some(p) => p, None => break },
            // Wake to reap the oldest batch when nothing arrives.
            Ok(ok) = async { match in_flight.front_mut() { Some(t) => t.await, None => std::future::pending().await } } => {
                in_flight.pop_front();
                if !ok {
                    break;
                }
                continue;
            }
        };
        let (mut batch, mut settled) = (Vec::new(), Vec::new());
        let queued = &b.deps.shared.ingest_queued;
        let add = |d: Delivery, batch: &mut Vec<_>, settled: &mut Vec<(u16, u64)>| match d {
            Delivery::Publish(p, connection) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                batch.push((p, connection));
            }
            Delivery::Settled(mut s) => settled.append(&mut s),
        };
        add(first, &mut batch, &mut settled);
        // Settled acks ride along with whatever batch they arrive in; they do not count.
        while batch.len() < size {
            match rx.try_recv() {
                Ok(d) => add(d, &mut batch, &mut settled),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && batch.len() < size && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            while batch.len() < size {
                tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => add(d, &mut batch, &mut settled),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        // Room in the queue: a paused ingest task may read again.
        b.acks.wake.notify_one();
        let (b, shutdown) = (b.clone(), shutdown.clone());
        // Acks leave in batch order (rumqttd drops a connection that acks out of order): each
        // batch acks after the previous one has (or has given up).
        let (next_turn, turn) = oneshot::channel();
        let turn = std::mem::replace(&mut previous_turn, turn);
        in_flight.push_back(tokio::spawn(async move {
            let ok = commit_and_ack(&b, batch, settled, &shutdown, turn).await;
            let _ = next_turn.send(());
            ok
        }));
    }
    // Let the batches already with the writer commit and be acked. Messages still queued are
    // not acked: the broker redelivers them to the next session.
    for t in in_flight {
        let _ = t.await;
    }
    let _ = done.0.send(());
    let _ = done.1.send(());
}

/// Applies one batch and acks it after the commit; false when the gateway is stopping and the
/// batch could not be committed (it stays unacked, so the broker redelivers it).
async fn commit_and_ack(
    b: &Batcher,
    batch: Vec<(Publish, u64)>,
    settled: Vec<(u16, u64)>,
    shutdown: &watch::Receiver<bool>,
    turn: oneshot::Receiver<()>,
) -> bool {
    let deps = &b.deps;
    let max_payload = b.rules.max_payload;
    let client: Arc<str> = b.rules.client_id.as_str().into();
    let messages: Vec<Message> = batch
        .iter()
        .map(|(p, _)| {
            Message::new(
                client.clone(),
                p.topic.clone(),
                p.payload.clone(),
                // QoS 0 has no packet id and is never redelivered: nothing to remember.
                if p.qos == QoS::AtMostOnce { 0 } else { p.pkid },
                p.dup,
                max_payload,
            )
        })
        .collect();
    let settled: Vec<ingest::Forget> = settled
        .into_iter()
        .map(|(pkid, tag)| ingest::Forget::Delivery(client.clone(), pkid, tag))
        .collect();
    let Some((messages, outcomes, tag)) = super::commit_batch(
        &deps.writer,
        &deps.charts,
        &b.rules,
        messages,
        settled,
        shutdown,
    )
    .await
    else {
        return false;
    };
    // The previous batch has acked (or stopped trying); an error means its task is gone.
    let _ = turn.await;
    if let Ok(mut ready) = b.acks.ready.lock() {
        let acks = batch.iter().zip(messages.iter().zip(&outcomes));
        ready.extend(acks.filter(|((p, _), _)| p.qos != QoS::AtMostOnce).map(
            |((p, connection), (m, o))| Ack {
                pkid: p.pkid,
                tag: o.entry_tag(m.pkid, tag),
                connection: *connection,
            },
        ));
    }
    b.acks.wake.notify_one();
    let mut steps = Vec::with_capacity(outcomes.len());
    steps.extend(outcomes.into_iter().filter_map(|o| deps.shared.tally(o)));
    deps.shared
        .applied
        .fetch_add(steps.len() as u64, Ordering::Relaxed);
    // One lock of the outbox per batch.
    deps.shared.committed_steps(
        steps
            .iter()
            .map(|(m, i, v, e)| (m.as_str(), i.as_str(), v, e.as_slice())),
    );
    true
}

async fn publisher_connection(
    deps: Arc<Deps>,
    mut eventloop: EventLoop,
    republish: mpsc::UnboundedSender<()>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Backoff::new(&deps.cfg);
    loop {
        let event = tokio::select! {
            biased;
            _ = &mut stop => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                let _ = republish.send(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "MQTT publisher connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay()) => {}
                    _ = &mut stop => break,
                }
            }
        }
    }
    // The publisher queued its last messages before the DISCONNECT; requests go out in order.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

async fn publisher(
    deps: Arc<Deps>,
    client: AsyncClient,
    mut republish: mpsc::UnboundedReceiver<()>,
    mut stop: oneshot::Receiver<()>,
    connection_stop: oneshot::Sender<()>,
) {
    let prefix = deps.cfg.topic_prefix.clone();
    let qos = match deps.cfg.state_qos {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(()) = republish.recv() => republish_all(&deps, &client, &prefix, qos).await,
            _ = deps.shared.wake.notified() => {
                if !publish(&client, &prefix, qos, deps.shared.take_outbox()).await {
                    // The request channel is closed: the connection task has stopped.
                    break;
                }
            }
        }
    }
    publish(&client, &prefix, qos, deps.shared.take_outbox()).await;
    let _ = client.try_disconnect();
    let _ = connection_stop.send(());
}

/// Publishes one outbox round: emits in commit order, then each instance's latest state.
/// False when the client is gone.
async fn publish(client: &AsyncClient, prefix: &str, qos: QoS, outbox: super::Outbox) -> bool {
    for e in outbox.emits {
        let payload = serde_json::to_vec(&e.data).unwrap_or_default();
        let t = topic::emit(prefix, &e.machine, &e.instance, &e.name);
        if client
            .publish(t, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return false;
        }
    }
    for ((machine, instance), payload) in outbox.states {
        let t = topic::state(prefix, &machine, &instance);
        if client.publish(t, qos, true, payload).await.is_err() {
            return false;
        }
    }
    true
}

async fn republish_all(deps: &Deps, client: &AsyncClient, prefix: &str, qos: QoS) {
    let mut after: Option<(String, String)> = None;
    let mut n = 0usize;
    loop {
        let page = deps.store.view(|txn| {
            ingest::states_after(
                txn,
                &deps.charts,
                after.as_ref().map(|(m, i)| (m.as_str(), i.as_str())),
                500,
            )
        });
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read states to republish");
                return;
            }
        };
        let Some(last) = page.last() else { break };
        after = Some((last.0.clone(), last.1.clone()));
        let full = page.len() == 500;
        for (m, i, view) in page {
            n += 1;
            let payload = serde_json::to_vec(&view).unwrap_or_default();
            if client
                .publish(topic::state(prefix, &m, &i), qos, true, payload)
                .await
                .is_err()
            {
                return;
            }
        }
        if !full {
            break;
        }
    }
    tracing::info!(states = n, "MQTT states republished");
}

#[cfg(test)]
mod tests {
    use super::Settle;

    #[test]
    fn acks_waiting_for_a_pingresp_keep_the_latest_delivery_of_each_packet_id() {
        let mut settle = Settle::default();
        // Packet id 7 acked three times (three deliveries) before the PINGREQ leaves.
        for (pkid, tag) in [(7, 11), (9, 21), (7, 13), (7, 15)] {
            settle.written.insert(pkid, tag);
        }
        settle.probe();
        settle.written.insert(7, 17);
        settle.probe();
        let mut first = settle.probes[0].1.clone();
        first.sort();
        assert_eq!(first, [(7, 15), (9, 21)]);
        assert_eq!(settle.probes[1].1, [(7, 17)]);
        assert!(settle.written.is_empty());
    }
}
