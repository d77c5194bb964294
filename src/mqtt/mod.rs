//! MQTT heartbeats as statechart transitions.
//!
//! - `topic`   — topic grammar (`<prefix>/<machine>/<instance>/heartbeat|events/<TYPE>`), pure.
//! - `ingest`  — applying one batch of messages inside one write transaction: statechart
//!   steps, the packet-id dedup table, the bounded dead-letter table. No I/O besides redb.
//! - `client`  — the rumqttc connections: the ingest connection (persistent session, manual
//!   acks, Last Will), the batcher that acks only after commit, and the state publisher.
//! - `broker`  — the embedded rumqttd broker that `serve` starts in `mode = "embedded"`.
//!
//! # What an ack means
//! A message is acked to the broker (PUBACK) only after the write transaction that applied it
//! (or dead-lettered it) has committed. The same transaction stores, per packet id of our
//! session, SHA-256(topic ‖ 0x00 ‖ payload) and the batch's tag. A broker redelivers an
//! unacked message after a reconnect with the DUP flag and the *same* packet id; if that packet
//! id maps to the same hash, the message was committed before the crash and is acked without
//! being applied again. A message without DUP is always new (the broker reuses a packet id only
//! after our PUBACK for it) and always applied.
//!
//! Packet ids are reused (rumqttd cycles through 100, mosquitto through 65,535), and devices
//! often send identical payloads (`{}` heartbeats), so an entry must not outlive the delivery
//! it describes: a new identical message on the reused id, not yet committed at a crash and
//! redelivered with DUP, would be taken for the old one and lost. So the entry is removed once
//! the broker has provably processed our PUBACK — a PINGRESP answered a PINGREQ written after
//! it, and brokers handle one connection's packets in order (`client`, "settling acks") — in
//! the next batch's transaction. What remains: the broker reuses the id, and the gateway crashes
//! with that new, identical message uncommitted, between the PINGRESP and the next commit
//! (about one batch time), all at once. With mosquitto's sequential packet ids (a reuse comes
//! 65,535 messages later) this cannot happen; with rumqttd, whose sessions die with the
//! gateway, there is no redelivery after a crash at all.
//!
//! With an external broker and a persistent session nothing acked is lost on a gateway crash.
//! With the embedded broker the device's PUBACK comes from the broker on receipt, before our
//! commit: a crash loses what the broker had accepted but we had not yet committed (at most the
//! batch in flight plus what was queued behind it; see `tests/mqtt.rs`).

mod broker;
mod client;
pub mod ingest;
pub mod topic;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;

pub use client::{start, Running};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// rumqttd inside the gateway process, on `listen`.
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
    /// Address of the embedded broker. Port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
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
    /// Largest MQTT packet the client and the embedded broker accept.
    pub max_packet_bytes: usize,
    /// Larger payloads are dead-lettered as `oversize` (and acked).
    pub max_payload_bytes: usize,
    /// Most messages applied in one write transaction.
    pub batch_size: usize,
    /// How long the first message of a batch waits for company.
    pub batch_wait_ms: u64,
    /// Dead letters kept per machine (oldest dropped first).
    pub dead_letter_cap: u64,
    /// Unacked QoS 1 messages the embedded broker sends one connection; outgoing window of
    /// the state publisher.
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
        if self.batch_size == 0 || self.inflight == 0 || self.dead_letter_cap == 0 {
            return Err(
                "mqtt.batch_size, mqtt.inflight and mqtt.dead_letter_cap must be at least 1".into(),
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
    /// Publishes read from the ingest connection and not yet taken into a batch; reading
    /// pauses at `client::queue_cap`.
    pub(crate) ingest_queued: AtomicU64,
    /// The most there have been since start.
    pub(crate) ingest_queued_peak: AtomicU64,
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
            "MQTT ingest connections established.",
            self.connects.load(Ordering::Relaxed),
        );
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
            "MQTT publishes read and waiting for a batch (reading pauses at 4 batches).",
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
