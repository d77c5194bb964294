//! MQTT heartbeats as statechart transitions.
//!
//! - `codec`   — MQTT 3.1.1 and 5 packets through rumqttc's codecs, in the server's terms.
//! - `server`  — smgate as the devices' MQTT server (the default, `mode = "embedded"`):
//!   listeners, sessions, authentication, and the batcher that acks after the commit.
//! - `conn`    — one device connection: acks in arrival order, bounded windows, Wills.
//! - `router`  — subscriptions, retained messages, per-subscriber queues.
//! - `topic`   — topic grammar (`<prefix>/<machine>/<instance>/heartbeat|events/<TYPE>`), pure.
//! - `ingest`  — applying one batch of messages inside one write transaction: statechart
//!   steps, the packet-id dedup table, the bounded dead-letter table. No I/O besides redb.
//! - `client`  — `mode = "external"`: a rumqttc client of a broker that the site already runs.
//!
//! # What an ack means
//! A QoS 1 PUBLISH on an ingest topic is answered with PUBACK (QoS 2: PUBREC) only after the
//! write transaction that applied it, or dead-lettered it, is durable (its sync done). Acks on
//! one connection leave in the order the publishes arrived. So when a device holds a PUBACK,
//! its heartbeat is a committed transition with its log row, whatever happens to the gateway
//! next (tests kill it with SIGKILL and with a storage backend that drops every unsynced write).
//! Publishes on other topics are relayed to subscribers and acked on receipt, not persisted.
//!
//! # Exactly once
//! The transaction that applies a message also stores, per (session, packet id),
//! SHA-256(topic ‖ 0x00 ‖ payload) and the batch's tag (`ingest::INFLIGHT`). A device that did
//! not receive its PUBACK (the gateway crashed or the connection dropped) sends the message
//! again with DUP and the same packet id; an entry with the same hash means it was committed,
//! and it is acked without being applied again. A message without DUP is always new.
//!
//! Why the record is exact now that smgate is the receiver: a device reuses a packet id only
//! after it has received our PUBACK for it, and our PUBACK leaves only after the commit, so
//! the entry for an id always describes the latest delivery on it that we committed, and no
//! settling of acks (the PINGREQ/PINGRESP round of `client`, which an external broker needs)
//! is involved. One case is beyond any receiver, and it is the protocol's: a device reuses a
//! packet id for a message *identical* to the committed one (same topic and payload), and the
//! gateway crashes before committing it. The device then resends it with DUP, exactly as it
//! would resend the first message had its PUBACK been lost; the two cases are the same bytes
//! on the wire and the same state on disk, so one of them must be misjudged. We take it for
//! the redelivery. Devices avoid it by carrying a sequence number or a timestamp in the
//! payload (the example firmware does), or by publishing at QoS 2: there the PUBREL tells the
//! receiver that the PUBREC arrived, the entry is removed in a commit before PUBCOMP, and the
//! packet id is free only after that, so QoS 2 is exactly once without exception.
//!
//! The table stays small: a 3.1.1 or 5 client can have at most its inflight window of QoS 1
//! messages unacknowledged, and acks leave in order, so only the latest `mqtt.receive_maximum`
//! committed deliveries of a session can still be resent; older entries are removed as newer
//! ones commit (MQTT 5 clients are held to that window by the Receive Maximum we announce;
//! 3.1.1 clients must not use a larger inflight window than `receive_maximum`). A clean
//! session removes its entries before its CONNACK.
//!
mod client;
pub mod codec;
mod conn;
pub mod ingest;
pub mod router;
pub mod server;
pub mod topic;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{watch, Notify};

/// The MQTT side of a running gateway.
pub enum Running {
    Server(server::Running),
    External(client::Running),
}

impl Running {
    /// The plain MQTT listener's address (the server's, in `embedded` mode).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        match self {
            Running::Server(s) => Some(s.addr),
            Running::External(_) => None,
        }
    }

    /// The MQTT over TLS listener's address, when `mqtt.tls_listen` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        match self {
            Running::Server(s) => s.tls_addr,
            Running::External(_) => None,
        }
    }

    /// Waits for the tasks to finish after the shutdown signal: the last batch is committed
    /// and acked first.
    pub async fn stopped(self) {
        match self {
            Running::Server(s) => s.stopped().await,
            Running::External(c) => c.stopped().await,
        }
    }
}

/// Starts MQTT as configured; `None` when `mode = "off"`.
pub async fn start(
    deps: server::Deps,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<Running>, String> {
    match deps.cfg.mode {
        Mode::Off => Ok(None),
        Mode::External => client::start(deps, shutdown)
            .await
            .map(|c| Some(Running::External(c))),
        Mode::Embedded => server::start(deps, shutdown)
            .await
            .map(|s| Some(Running::Server(s))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// smgate is the devices' MQTT server, on `listen` (and `tls_listen`).
    Embedded,
    /// A broker such as mosquitto at `url`.
    External,
    /// No MQTT at all.
    Off,
}

/// `[mqtt]` of the configuration file; `firmware-config/smgate.toml` documents each option.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub mode: Mode,
    /// Address of the MQTT server. Port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// MQTT over TLS with the gateway's certificate; off when unset.
    pub tls_listen: Option<SocketAddr>,
    /// Admit clients without a key (labs only): they may publish and subscribe everywhere.
    pub allow_anonymous: bool,
    /// Ingest publishes one connection may have waiting for their commit (announced to MQTT 5
    /// clients as Receive Maximum); also how many committed deliveries per session are
    /// remembered for redelivery (3.1.1 devices must not use a larger inflight window).
    pub receive_maximum: u16,
    pub max_connections: usize,
    /// Seconds a client has to send CONNECT (and finish the TLS handshake).
    pub connect_timeout_secs: u64,
    /// Messages other than instance states queued for one subscriber; past it the subscriber
    /// is disconnected.
    pub max_queued_messages: usize,
    /// Retained messages kept for topics other than instance states (those come from redb).
    pub max_retained: usize,
    /// Seconds a persistent 3.1.1 session outlives its connection (0: until smgate stops);
    /// MQTT 5 clients set their own Session Expiry Interval.
    pub session_expiry_secs: u64,
    /// External broker: `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: Option<String>,
    /// PEM CA certificates that sign the external broker's certificate (`mqtts://`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require client certificates.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic_prefix: String,
    /// Empty means `smgate-<gateway id>`; must stay stable for the persistent session.
    pub client_id: Option<String>,
    pub keepalive_secs: u64,
    /// Largest MQTT packet the server (and the external client) accepts.
    pub max_packet_bytes: usize,
    /// Larger payloads are dead-lettered as `oversize` (and acked).
    pub max_payload_bytes: usize,
    /// Most messages applied in one write transaction.
    pub batch_size: usize,
    /// How long the first message of a batch waits for company.
    pub batch_wait_ms: u64,
    /// Dead letters kept per machine (oldest dropped first).
    pub dead_letter_cap: u64,
    /// Unacked QoS 1 messages the server sends one subscriber (at most its Receive
    /// Maximum); in external mode, the state publisher's outgoing window.
    pub inflight: u16,
    /// QoS of the retained state messages: 1 (default) or 0. A state is a snapshot that the
    /// next one supersedes, and every state is republished after each reconnect, so QoS 0
    /// loses nothing that matters and spares the broker an acknowledgement per step. But QoS
    /// 1's inflight window is also the publisher's flow control: at QoS 0 a broker that falls
    /// behind lets the socket fill until the write times out and the connection is redone.
    /// Emits are events and always go at QoS 1.
    pub state_qos: u8,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: Mode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls_listen: None,
            allow_anonymous: false,
            receive_maximum: 1024,
            max_connections: 10_000,
            connect_timeout_secs: 10,
            max_queued_messages: 1000,
            max_retained: 10_000,
            session_expiry_secs: 7 * 24 * 3600,
            url: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            topic_prefix: "smgate".into(),
            client_id: None,
            keepalive_secs: 30,
            max_packet_bytes: 256 * 1024,
            max_payload_bytes: 64 * 1024,
            batch_size: 4096,
            batch_wait_ms: 1,
            dead_letter_cap: 1000,
            inflight: 8192,
            state_qos: 1,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
        }
    }
}

impl MqttConfig {
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.topic_prefix;
        if p.is_empty() || p.contains(['+', '#', '\0']) || p.starts_with('/') || p.ends_with('/') {
            return Err(
                "mqtt.topic_prefix must be non-empty, without + # or a leading/trailing /".into(),
            );
        }
        if self.mode == Mode::External && self.url.as_deref().is_none_or(str::is_empty) {
            return Err(
                "mqtt.mode = \"external\" needs mqtt.url (mqtt://host:port or mqtts://host:port)"
                    .into(),
            );
        }
        if self.state_qos > 1 {
            return Err("mqtt.state_qos must be 0 or 1".into());
        }
        if self.batch_size == 0
            || self.inflight == 0
            || self.dead_letter_cap == 0
            || self.receive_maximum == 0
            || self.max_connections == 0
            || self.max_queued_messages == 0
        {
            return Err(
                "mqtt.batch_size, mqtt.inflight, mqtt.dead_letter_cap, mqtt.receive_maximum, mqtt.max_connections and mqtt.max_queued_messages must be at least 1".into(),
            );
        }
        if self.max_payload_bytes >= self.max_packet_bytes {
            return Err("mqtt.max_payload_bytes must be smaller than mqtt.max_packet_bytes".into());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("mqtt.client_cert and mqtt.client_key go together".into());
        }
        Ok(())
    }
}

/// Applies `messages`, then removes the `forget` entries, in one group commit. A commit that
/// fails is retried with every message as a redelivery (part of the batch may have been
/// committed; the dedup table decides). Returns the messages, their outcomes and the batch's
/// tag once the commit is durable; `None` when the gateway stops first (nothing is acked, so
/// the senders send again).
pub(crate) async fn commit_batch(
    writer: &crate::store::GroupCommit,
    charts: &Arc<crate::instances::Charts>,
    rules: &Arc<ingest::Rules>,
    mut messages: Vec<ingest::Message>,
    mut forget: Vec<ingest::Forget>,
    shutdown: &watch::Receiver<bool>,
) -> Option<(Vec<ingest::Message>, Vec<ingest::Outcome>, u64)> {
    use crate::store::StoreError;
    let raws: Vec<ingest::Raw> = messages.iter().map(ingest::Message::raw).collect();
    let kept_forget = forget.clone();
    // Tells this batch's dedup entries from those of any other delivery of the same packet id.
    let tag = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let mut retry = std::time::Duration::from_millis(50);
    loop {
        let (c, r, mut m, f) = (
            charts.clone(),
            rules.clone(),
            std::mem::take(&mut messages),
            std::mem::take(&mut forget),
        );
        let result = writer
            .write(move |txn| {
                let now = crate::clock::now_ms();
                ingest::apply_then_forget(txn, &c, &r, &mut m, tag, &f, now).map(|o| (o, m))
            })
            .await;
        match result {
            Ok((outcomes, m)) => {
                abort_before_ack(&m, &outcomes);
                return Some((m, outcomes, tag));
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = raws.len(), "MQTT batch not committed; retrying");
                if matches!(e, StoreError::ShuttingDown) || *shutdown.borrow() {
                    return None;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(std::time::Duration::from_secs(5));
                let max = rules.max_payload;
                messages = raws.iter().map(|r| r.clone().redelivery(max)).collect();
                forget = kept_forget.clone();
            }
        }
    }
}

/// Test hook `TEST_MQTT_ABORT_BEFORE_ACK=<topic>`: the process exits right after committing a
/// batch that applied a message on that topic, before acking it, as a crash would, so that
/// the sender redelivers it.
fn abort_before_ack(messages: &[ingest::Message], outcomes: &[ingest::Outcome]) {
    static TOPIC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(topic) = TOPIC.get_or_init(|| std::env::var("TEST_MQTT_ABORT_BEFORE_ACK").ok()) else {
        return;
    };
    let hit = messages
        .iter()
        .zip(outcomes)
        .any(|(m, o)| m.topic() == topic && matches!(o, ingest::Outcome::Applied { .. }));
    if hit {
        tracing::error!(%topic, "TEST_MQTT_ABORT_BEFORE_ACK: exiting after the commit");
        // Like a crash: no destructor runs, nothing more is written or acked.
        std::process::exit(86);
    }
}

/// (machine, instance, public view, effects) of a step an MQTT batch committed.
pub(crate) type CommittedStep = (String, String, Value, Vec<crate::chart::Effect>);

/// An `emit` effect of a committed step: published once, not retained.
#[derive(Debug)]
pub struct Emit {
    pub machine: String,
    pub instance: String,
    pub name: String,
    pub data: Value,
}

/// Emits queued for the publisher beyond this are dropped (and counted): a burst of emits
/// must not grow memory without bound while the broker is slow or away.
const MAX_QUEUED_EMITS: usize = 10_000;

/// What the state publisher has to send. Only the latest state of an instance matters (it is
/// retained), so states are a map keyed by instance: under any load the outbox holds at most
/// one view per instance, and a slow broker makes states coalesce instead of queueing. Views
/// are kept as their JSON payload: a `Value` tree of a view takes several times its ~150 bytes
/// of JSON, and with a publisher behind, two outboxes of every instance are alive at once (the
/// one being published and the next).
#[derive(Default)]
pub struct Outbox {
    pub states: HashMap<(String, String), Vec<u8>>,
    pub emits: VecDeque<Emit>,
}

/// Counters for `/metrics` and the outbox through which the batcher and other tasks (timers,
/// HTTP) hand committed steps to the publisher. Lives in the `Gateway`; nothing is queued
/// until MQTT starts.
#[derive(Default)]
pub struct Shared {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    dead: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub connects: AtomicU64,
    /// Established ingest connections that were lost (broker gone, or silent for a
    /// keepalive period).
    pub connection_losses: AtomicU64,
    pub emits_dropped: AtomicU64,
    /// Publishes read from the ingest connections and not yet taken into a batch; reading
    /// pauses at `client::queue_cap` (external mode) or `server::queue_cap`.
    pub(crate) ingest_queued: AtomicU64,
    /// The most there have been since start.
    pub(crate) ingest_queued_peak: AtomicU64,
    /// Connections refused, by reason.
    refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Ingest publishes outside the client's rights (dead-lettered as `not_authorized`).
    pub publishes_refused: AtomicU64,
    pub subscriptions_refused: AtomicU64,
    pub relayed: AtomicU64,
    pub wills: AtomicU64,
    /// Subscribers disconnected for falling behind their queue bound.
    pub subscribers_dropped: AtomicU64,
    pub retained_refused: AtomicU64,
    /// Key ids revoked since the server last looked; it closes their connections.
    revoked: Mutex<Vec<String>>,
    pub(crate) revoke_wake: Notify,
    publishing: AtomicBool,
    outbox: Mutex<Outbox>,
    /// Wakes the publisher when the outbox becomes non-empty.
    pub(crate) wake: Notify,
}

impl Shared {
    pub fn dead_letter(&self, reason: &'static str) {
        if let Ok(mut d) = self.dead.lock() {
            *d.entry(reason).or_insert(0) += 1;
        }
    }

    pub fn connect_refused(&self, reason: &'static str) {
        if let Ok(mut r) = self.refused.lock() {
            *r.entry(reason).or_insert(0) += 1;
        }
    }

    /// A key was revoked: its open MQTT connections are closed.
    pub fn key_revoked(&self, key_id: &str) {
        if let Ok(mut r) = self.revoked.lock() {
            r.push(key_id.to_owned());
        }
        self.revoke_wake.notify_one();
    }

    pub(crate) fn take_revoked(&self) -> Vec<String> {
        self.revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// Counts a committed message's outcome; the step to publish, when it was applied.
    pub(crate) fn tally(&self, outcome: ingest::Outcome) -> Option<CommittedStep> {
        match outcome {
            ingest::Outcome::Applied {
                machine,
                instance,
                view,
                effects,
            } => Some((machine, instance, view, effects)),
            ingest::Outcome::Duplicate(_) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                None
            }
            ingest::Outcome::Dead(reason) => {
                self.dead_letter(reason);
                None
            }
        }
    }

    /// Queues the retained state (and emits) of a committed step; never blocks.
    pub fn committed(&self, machine: &str, sent: &crate::instances::Sent) {
        self.committed_steps(std::iter::once((
            machine,
            sent.instance.slug.as_str(),
            &sent.view,
            sent.effects.as_slice(),
        )));
    }

    /// Committed steps of the timer task.
    pub fn committed_all(&self, sent: &[crate::instances::Sent]) {
        self.committed_steps(sent.iter().map(|s| {
            (
                s.instance.machine.as_str(),
                s.instance.slug.as_str(),
                &s.view,
                s.effects.as_slice(),
            )
        }));
    }

    /// (machine, instance, public view, effects) of committed steps, in commit order, under one
    /// lock of the outbox.
    pub fn committed_steps<'a>(
        &self,
        steps: impl IntoIterator<Item = (&'a str, &'a str, &'a Value, &'a [crate::chart::Effect])>,
    ) {
        if !self.publishing.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut out) = self.outbox.lock() else {
            return;
        };
        let was_empty = out.states.is_empty() && out.emits.is_empty();
        for (machine, instance, view, effects) in steps {
            match out.states.get_mut(&(machine, instance) as &dyn OutboxKey) {
                Some(v) => {
                    v.clear();
                    let _ = serde_json::to_writer(&mut *v, view);
                }
                None => {
                    let payload = serde_json::to_vec(view).unwrap_or_default();
                    out.states
                        .insert((machine.to_owned(), instance.to_owned()), payload);
                }
            }
            for e in effects {
                if let Some(p) = emit(machine, instance, e) {
                    if out.emits.len() < MAX_QUEUED_EMITS {
                        out.emits.push_back(p);
                    } else {
                        self.emits_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let empty = out.states.is_empty() && out.emits.is_empty();
        drop(out);
        if was_empty && !empty {
            self.wake.notify_one();
        }
    }

    /// Starts queueing for a publisher.
    pub(crate) fn start_publishing(&self) {
        self.publishing.store(true, Ordering::Relaxed);
    }

    /// Everything queued so far; the publisher's next round.
    pub(crate) fn take_outbox(&self) -> Outbox {
        self.outbox
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let metric = |out: &mut String, kind: &str, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            metric(out, "counter", name, help, v)
        };
        c(
            &mut out,
            "smgate_mqtt_applied_total",
            "MQTT messages applied as statechart steps.",
            self.applied.load(Ordering::Relaxed),
        );
        c(
            &mut out,
            "smgate_mqtt_duplicates_total",
            "Redelivered MQTT messages acked without applying them again.",
            self.duplicates.load(Ordering::Relaxed),
        );
        c(
            &mut out,
            "smgate_mqtt_connects_total",
            "MQTT connections established (server: device connections; external: the ingest connection).",
            self.connects.load(Ordering::Relaxed),
        );
        for (name, help, v) in [
            (
                "smgate_mqtt_publishes_refused_total",
                "MQTT ingest publishes outside the client's rights (not applied, dead-lettered).",
                &self.publishes_refused,
            ),
            (
                "smgate_mqtt_subscriptions_refused_total",
                "MQTT SUBSCRIBE packets with a refused filter.",
                &self.subscriptions_refused,
            ),
            (
                "smgate_mqtt_relayed_total",
                "MQTT publishes on topics outside the prefix, relayed to subscribers.",
                &self.relayed,
            ),
            (
                "smgate_mqtt_wills_total",
                "MQTT Last Wills published after an abnormal disconnect.",
                &self.wills,
            ),
            (
                "smgate_mqtt_subscribers_dropped_total",
                "MQTT subscribers disconnected for falling behind their queue bound.",
                &self.subscribers_dropped,
            ),
            (
                "smgate_mqtt_retained_refused_total",
                "Retained MQTT messages not kept because mqtt.max_retained was reached.",
                &self.retained_refused,
            ),
        ] {
            c(&mut out, name, help, v.load(Ordering::Relaxed));
        }
        let refused = self.refused.lock().map(|d| d.clone()).unwrap_or_default();
        let _ = writeln!(out, "# HELP smgate_mqtt_connects_refused_total MQTT connections refused, by reason.\n# TYPE smgate_mqtt_connects_refused_total counter");
        for (reason, n) in refused {
            let _ = writeln!(
                out,
                "smgate_mqtt_connects_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        c(
            &mut out,
            "smgate_mqtt_connection_losses_total",
            "Established MQTT ingest connections that were lost.",
            self.connection_losses.load(Ordering::Relaxed),
        );
        metric(
            &mut out,
            "gauge",
            "smgate_mqtt_ingest_queued",
            "MQTT publishes read and waiting for a batch (reading pauses when the queue is full).",
            self.ingest_queued.load(Ordering::Relaxed),
        );
        metric(
            &mut out,
            "gauge",
            "smgate_mqtt_ingest_queued_peak",
            "The most MQTT publishes that have waited for a batch at once since start.",
            self.ingest_queued_peak.load(Ordering::Relaxed),
        );
        let dead = self.dead.lock().map(|d| d.clone()).unwrap_or_default();
        let total: u64 = dead.values().sum();
        c(
            &mut out,
            "smgate_mqtt_dead_letters_total",
            "MQTT messages dead-lettered (and acked).",
            total,
        );
        let _ = writeln!(out, "# HELP smgate_mqtt_dead_letters_by_reason_total MQTT dead letters by reason.\n# TYPE smgate_mqtt_dead_letters_by_reason_total counter");
        for (reason, n) in dead {
            let _ = writeln!(
                out,
                "smgate_mqtt_dead_letters_by_reason_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
}

fn emit(machine: &str, instance: &str, effect: &crate::chart::Effect) -> Option<Emit> {
    let crate::chart::Effect::Emit { topic, event, data } = effect else {
        return None;
    };
    let name = topic.as_deref().or(event.as_deref())?;
    // Emits stay under the instance's own topic tree: no wildcards, no empty levels.
    let name = name.trim_matches('/');
    if name.is_empty() || name.contains(['+', '#', '\0']) {
        return None;
    }
    Some(Emit {
        machine: machine.into(),
        instance: instance.into(),
        name: name.into(),
        data: data.clone(),
    })
}

/// Looks up `(String, String)` keys by `(&str, &str)` without allocating (the usual
/// borrowed-tuple-key trick), so a step of an instance already in the outbox allocates nothing.
trait OutboxKey {
    fn key(&self) -> (&str, &str);
}

impl OutboxKey for (String, String) {
    fn key(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl OutboxKey for (&str, &str) {
    fn key(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn OutboxKey + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn OutboxKey + 'a) {
        self
    }
}

impl std::hash::Hash for dyn OutboxKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

impl PartialEq for dyn OutboxKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn OutboxKey + '_ {}
