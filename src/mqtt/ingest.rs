//! Applying a batch of MQTT messages inside one write transaction.
//!
//! Each message becomes one of: one statechart step (`instances::send_event`, with its
//! `transition` row), a dead letter, or — for a redelivery of a message already committed — a
//! duplicate that changes nothing. Every non-duplicate QoS 1 message also records
//! `(client id, packet id) → SHA-256(topic ‖ 0x00 ‖ payload) ‖ batch tag` in [`INFLIGHT`], in
//! the same transaction, which is what lets a redelivery after a crash be recognised (module
//! doc of `mqtt`). An entry is removed by [`forget`] once the broker has provably processed our
//! PUBACK for it (the tag tells that delivery from a later one reusing the packet id), so the
//! table holds about one inflight window, and a packet id the broker reuses for a new message
//! never meets a stale entry (it could otherwise take an identical new message, such as the
//! same empty heartbeat, for a redelivery and drop it).
//!
//! Per-message failures never fail the batch: `send_event` and `create_instance` write nothing
//! when they fail, so the message is dead-lettered and the batch goes on. Only store errors
//! abort the batch; the caller then retries it with every message marked as redelivered.

use bytes::Bytes;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::topic;
use crate::chart::{ErrorKind, Event};
use crate::instances::{self, Charts, InstanceError};
use crate::store::{self, StoreError};

/// (client id, packet id) → SHA-256(topic ‖ 0x00 ‖ payload) ‖ tag (u64 LE) of the batch that
/// committed the message, for deliveries whose PUBACK the broker has not confirmed yet.
pub const INFLIGHT: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("mqtt_inflight");
/// (machine slug or "" for the gateway, n) → [`DeadLetter`].
pub const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("mqtt_dead_letters");
/// machine slug or "" → the next dead-letter number.
pub const DEAD_LETTER_NEXT: TableDefinition<&str, u64> =
    TableDefinition::new("mqtt_dead_letter_next");
/// Key in `store::META` of the birth sequence (bdSeq) of the ingest connection.
const BIRTH_KEY: &str = "mqtt_bd_seq";
/// Bytes of a dead letter's payload that are kept.
pub const KEPT_PAYLOAD: usize = 1024;

/// The authorizers' `auth` for MQTT messages, and the log's actor.
pub fn auth() -> Value {
    json!({"sub": "mqtt", "role": "operator"})
}
pub const ACTOR: &str = "mqtt";

pub struct Message {
    /// Topic and payload are fixed at [`Message::new`]: the hash and data are derived from them.
    topic: String,
    payload: Bytes,
    pub pkid: u16,
    pub dup: bool,
    /// [`content_hash`] of topic and payload.
    hash: [u8; 32],
    /// The payload as event data, or why it cannot be: (dead-letter reason, message).
    data: Result<Value, (&'static str, String)>,
}

impl Message {
    /// A received message, with the work that needs no transaction done here, before the
    /// batch reaches the writer thread: the content hash, the size check and the JSON parse.
    pub fn new(topic: String, payload: Bytes, pkid: u16, dup: bool, max_payload: usize) -> Message {
        let hash = content_hash(&topic, &payload);
        let data = event_data(&payload, max_payload);
        Message {
            topic,
            payload,
            pkid,
            dup,
            hash,
            data,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// A payload as event data: a JSON object, or `{}` for an empty (or blank) payload.
fn event_data(payload: &[u8], max_payload: usize) -> Result<Value, (&'static str, String)> {
    if payload.len() > max_payload {
        return Err((
            "oversize",
            format!(
                "the payload is {} bytes; the limit is {max_payload}",
                payload.len()
            ),
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(("invalid_json", "the payload must be a JSON object".into())),
        Err(e) => Err((
            "invalid_json",
            format!("the payload is not valid JSON: {e}"),
        )),
    }
}

pub struct Rules {
    pub prefix: String,
    pub client_id: String,
    pub max_payload: usize,
    pub dead_letter_cap: u64,
}

pub enum Outcome {
    /// A committed step: what is published and run after the commit (the rest of the step's
    /// result is dropped on the writer thread, so that batches waiting for their acks hold
    /// no more than this).
    Applied {
        machine: String,
        instance: String,
        view: Value,
        effects: Vec<crate::chart::Effect>,
    },
    /// A redelivery of the message committed by the batch with this tag: acked, not applied.
    Duplicate(u64),
    Dead(&'static str),
}

impl Outcome {
    /// The tag of the [`INFLIGHT`] entry that this message's PUBACK settles: `tag` of the
    /// batch, or the original batch's for a duplicate. None for QoS 0 (no packet id).
    pub fn entry_tag(&self, pkid: u16, tag: u64) -> Option<u64> {
        match self {
            _ if pkid == 0 => None,
            Outcome::Duplicate(t) => Some(*t),
            _ => Some(tag),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    /// The first [`KEPT_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
    pub payload_len: u64,
    pub reason: String,
    pub message: String,
    pub ts_ms: i64,
}

pub fn content_hash(topic: &str, payload: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0u8]);
    h.update(payload);
    h.finalize().into()
}

/// Applies `batch` in `txn`, in order; one outcome per message. `tag` names this batch in the
/// [`INFLIGHT`] entries it writes (unique per batch; a random number will do). Messages with
/// packet id 0 (QoS 0) are never redelivered and leave no entry. Each message's event data is
/// taken: a batch is applied once (a retry builds its messages again).
pub fn apply(
    txn: &WriteTransaction,
    charts: &Charts,
    rules: &Rules,
    batch: &mut [Message],
    tag: u64,
    now_ms: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let mut out = Vec::with_capacity(batch.len());
    let mut entry = [0u8; 40];
    entry[32..].copy_from_slice(&tag.to_le_bytes());
    // Only this function touches INFLIGHT inside the batch, so it stays open for the whole
    // batch instead of being opened twice per message.
    let mut inflight = txn.open_table(INFLIGHT)?;
    // The instance and log tables likewise stay open for the whole batch.
    let mut steps = instances::Steps::open(txn)?;
    let mut machines = Machines::default();
    for m in batch {
        let hash = m.hash;
        if m.dup && m.pkid != 0 {
            let seen = inflight
                .get((rules.client_id.as_str(), m.pkid))?
                .and_then(|v| {
                    let v = v.value();
                    (v.len() >= 32 && v[..32] == hash).then(|| stored_tag(v))
                });
            if let Some(original) = seen {
                out.push(Outcome::Duplicate(original));
                continue;
            }
        }
        let outcome = match route(txn, &mut steps, charts, rules, &mut machines, m, now_ms)? {
            Ok(o) => o,
            Err((machine, reason, message)) => {
                dead_letter(txn, rules, machine, m, reason, &message, now_ms)?;
                Outcome::Dead(reason)
            }
        };
        if m.pkid != 0 {
            entry[..32].copy_from_slice(&hash);
            inflight.insert((rules.client_id.as_str(), m.pkid), entry.as_slice())?;
        }
        out.push(outcome);
    }
    steps.finish()?;
    Ok(out)
}

/// One batch transaction as the batcher runs it: [`apply`] the messages, then [`forget`] the
/// settled acks that arrived with them. In that order: a settled ack can belong to the first
/// copy of a message whose resent copy (after a reconnect) is in this very batch, and that
/// copy must still find its entry.
pub fn apply_then_forget(
    txn: &WriteTransaction,
    charts: &Charts,
    rules: &Rules,
    batch: &mut [Message],
    tag: u64,
    settled: &[(u16, u64)],
    now_ms: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let outcomes = apply(txn, charts, rules, batch, tag, now_ms)?;
    forget(txn, &rules.client_id, settled)?;
    Ok(outcomes)
}

/// Which machines exist, looked up once per batch: machines are not created or deleted
/// inside an MQTT batch (the batch is one request of the group commit, run alone).
#[derive(Default)]
struct Machines {
    known: std::collections::HashMap<String, bool>,
}

impl Machines {
    fn exists(&mut self, txn: &WriteTransaction, slug: &str) -> Result<bool, StoreError> {
        if let Some(&e) = self.known.get(slug) {
            return Ok(e);
        }
        let e = txn.open_table(store::MACHINES)?.get(slug)?.is_some();
        self.known.insert(slug.to_owned(), e);
        Ok(e)
    }
}

/// The batch tag of an [`INFLIGHT`] value (0 for entries written before tags existed).
fn stored_tag(v: &[u8]) -> u64 {
    v.get(32..40)
        .and_then(|t| t.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Removes the [`INFLIGHT`] entries of deliveries whose PUBACK the broker has processed:
/// `(packet id, tag)` pairs; an entry since rewritten by a later delivery (another tag) stays.
/// The broker will not redeliver those messages, and must not find their entries when it
/// reuses the packet ids.
pub fn forget(
    txn: &WriteTransaction,
    client_id: &str,
    settled: &[(u16, u64)],
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(INFLIGHT)?;
    for &(pkid, tag) in settled {
        let same = t
            .get((client_id, pkid))?
            .is_some_and(|v| stored_tag(v.value()) == tag);
        if same {
            t.remove((client_id, pkid))?;
        }
    }
    Ok(())
}

/// (machine to file the dead letter under, reason code, message).
type Refusal = (String, &'static str, String);

fn route(
    txn: &WriteTransaction,
    steps: &mut instances::Steps,
    charts: &Charts,
    rules: &Rules,
    machines: &mut Machines,
    m: &mut Message,
    now_ms: i64,
) -> Result<Result<Outcome, Refusal>, StoreError> {
    let t = match topic::parse(&rules.prefix, &m.topic) {
        Ok(t) => t,
        Err(u) => {
            let machine = u
                .machine
                .filter(|s| machines.exists(txn, s).unwrap_or(false))
                .unwrap_or("");
            return Ok(Err((machine.into(), "unknown_topic", u.why.into())));
        }
    };
    if !machines.exists(txn, t.machine)? {
        return Ok(Err((
            String::new(),
            "unknown_machine",
            format!("no machine `{}` on this gateway", t.machine),
        )));
    }
    let refuse = |reason, message: String| Ok(Err((t.machine.to_owned(), reason, message)));
    let data = match std::mem::replace(&mut m.data, Ok(Value::Null)) {
        Ok(data) => data,
        Err((reason, message)) => return refuse(reason, message),
    };
    let auth = auth();
    let event = Event::new(t.event, data);
    let refused = |e| refusal(e).map(|(r, msg)| Err((t.machine.to_owned(), r, msg)));
    // The common case first: the instance exists. `send_event` writes nothing when it fails,
    // so a missing instance costs one failed lookup before it is created.
    let sent = match send(steps, charts, &t, event.clone(), &auth, now_ms) {
        Err(InstanceError::NotFound(_)) if steps.instance(t.machine, t.instance)?.is_none() => {
            let meta: instances::ChartMeta =
                match txn.open_table(instances::CHARTS)?.get(t.machine)? {
                    Some(v) => store::decode(v.value())?,
                    None => Default::default(),
                };
            if !meta.auto_create_instances {
                return refuse(
                    "unknown_instance",
                    format!(
                        "no instance `{}`, and the machine does not auto-create instances",
                        t.instance
                    ),
                );
            }
            if let Err(e) = steps.create_instance(
                charts,
                t.machine,
                t.instance,
                Value::Null,
                None,
                &auth,
                ACTOR,
                now_ms,
            ) {
                return refused(e);
            }
            send(steps, charts, &t, event, &auth, now_ms)
        }
        other => other,
    };
    match sent {
        Ok(sent) => Ok(Ok(Outcome::Applied {
            machine: t.machine.to_owned(),
            instance: sent.instance.slug,
            view: sent.view,
            effects: sent.effects,
        })),
        Err(e) => refused(e),
    }
}

fn send(
    steps: &mut instances::Steps,
    charts: &Charts,
    t: &topic::DeviceTopic,
    event: Event,
    auth: &Value,
    now_ms: i64,
) -> Result<instances::Sent, InstanceError> {
    steps.send_event(charts, t.machine, t.instance, event, auth, ACTOR, now_ms)
}

/// The dead-letter reason of a failed step; store errors abort the batch instead.
fn refusal(e: InstanceError) -> Result<(&'static str, String), StoreError> {
    let reason = match &e {
        InstanceError::Store(s) => return Err(s.clone()),
        InstanceError::Rejected(_) | InstanceError::MissingScope(_) => "rejected_by_authorizer",
        InstanceError::NotFound(_) => "unknown_instance",
        InstanceError::Conflict(_) => "instance_paused",
        InstanceError::Invalid { .. } => "invalid_event",
        InstanceError::NoMigrationPath(_) => "transition_failed",
        InstanceError::Chart(c) if c.kind == ErrorKind::Input => "invalid_event",
        InstanceError::Chart(_) => "transition_failed",
    };
    Ok((reason, e.to_string()))
}

fn dead_letter(
    txn: &WriteTransaction,
    rules: &Rules,
    machine: String,
    m: &Message,
    reason: &'static str,
    message: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut next = txn.open_table(DEAD_LETTER_NEXT)?;
    let n = next.get(machine.as_str())?.map(|v| v.value()).unwrap_or(0);
    next.insert(machine.as_str(), n + 1)?;
    let letter = DeadLetter {
        topic: m.topic.chars().take(512).collect(),
        payload: m.payload[..m.payload.len().min(KEPT_PAYLOAD)].to_vec(),
        payload_len: m.payload.len() as u64,
        reason: reason.into(),
        message: message.chars().take(512).collect(),
        ts_ms: now_ms,
    };
    let mut t = txn.open_table(DEAD_LETTERS)?;
    t.insert((machine.as_str(), n), store::encode(&letter).as_slice())?;
    if n >= rules.dead_letter_cap {
        // Drop everything at or below the window (the cap may have been lowered).
        let floor = n + 1 - rules.dead_letter_cap;
        let old: Vec<u64> = t
            .range((machine.as_str(), 0)..(machine.as_str(), floor))?
            .map(|e| e.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for k in old {
            t.remove((machine.as_str(), k))?;
        }
    }
    Ok(())
}

/// Dead letters of `machine` ("" for the gateway's own), newest first, at most `limit`,
/// with their numbers.
pub fn dead_letters(
    txn: &ReadTransaction,
    machine: &str,
    limit: usize,
) -> Result<Vec<(u64, DeadLetter)>, StoreError> {
    let t = match txn.open_table(DEAD_LETTERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in t.range((machine, 0)..=(machine, u64::MAX))?.rev() {
        let (k, v) = e?;
        out.push((k.value().1, store::decode(v.value())?));
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// Takes the next birth sequence number (bdSeq) and stores it.
pub fn next_birth(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(store::META)?;
    let n = match meta.get(BIRTH_KEY)? {
        Some(v) => store::decode::<u64>(v.value())? + 1,
        None => 1,
    };
    meta.insert(BIRTH_KEY, store::encode(&n).as_slice())?;
    // Create this module's tables on first start, so readers never meet a missing one.
    txn.open_table(INFLIGHT)?;
    txn.open_table(DEAD_LETTERS)?;
    txn.open_table(DEAD_LETTER_NEXT)?;
    Ok(n)
}

/// Every instance's public view, for republishing after a reconnect: (machine, instance,
/// view), in key order after `after`, at most `limit`.
pub fn states_after(
    txn: &ReadTransaction,
    charts: &Charts,
    after: Option<(&str, &str)>,
    limit: usize,
) -> Result<Vec<(String, String, Value)>, StoreError> {
    let t = txn.open_table(instances::INSTANCES)?;
    let mut out = Vec::new();
    let range = match after {
        Some(k) => t.range(k..)?,
        None => t.range(("", "")..)?,
    };
    for e in range {
        let (k, v) = e?;
        let (m, s) = k.value();
        if after == Some((m, s)) {
            continue;
        }
        let inst = instances::history::decode_instance(v.value())?;
        let Some(version) = instances::version(txn, m, &inst.version_id)? else {
            continue;
        };
        let Ok(chart) = charts.get(&version) else {
            continue;
        };
        let state: crate::chart::InstanceState = match serde_json::from_slice(&inst.state) {
            Ok(s) => s,
            Err(_) => continue,
        };
        out.push((
            m.to_owned(),
            s.to_owned(),
            instances::public_view(&chart, &state, inst.ts_ms),
        ));
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}
